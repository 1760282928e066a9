"""The eight image-classification tasks of the quality benchmark, built offline.

Every image is ``16 x 16 x 3`` in ``[0, 1]``. Each task draws from its own
image distribution with its own label function, as the eight datasets of the
CLIP-ViT task-vector protocol do (the analogue is named in brackets):

=============  =======  ==========================================================
task           classes  images and label
=============  =======  ==========================================================
``digits``     10       a handwritten digit (scikit-learn's bundled 8x8 digits,
                        upsampled to 12x12), white on black, shifted   [MNIST]
``svhn``       10       a coloured digit on a coloured gradient background with a
                        cropped distractor digit at the border          [SVHN]
``shapes``     6        circle, square, triangle, semicircle, cross or ring, random
                        size, tilt, colour and place on noise           [GTSRB-ish]
``textures``   8        stripes (4 orientations), checkerboard, dot lattice,
                        concentric rings, smooth blobs; random colours   [DTD]
``count``      6        1 to 6 dots on a jittered grid                  [CLEVR-count]
``orientation`` 8       one bar; its angle in 8 bins of 22.5 degrees    [--]
``colour``     8        two shapes; the hue bin (of 8) of the larger one [--]
``symmetry``   4        a random block pattern: no symmetry, mirror left-right,
                        mirror up-down, or both                         [--]
=============  =======  ==========================================================

Digit tasks split the 1797 source digits by index (train 70 %, val 10 %,
test 20 %), so validation and test digits were never seen in training; the
procedural tasks draw fresh images per split from disjoint keys.

Pre-training (:func:`pretrain_data`) uses separate draws from all eight
families with a *coarse* 16-way label: the family and one bit per image,
for most families one bit of the task's label (digit >= 5, round shape,
stripes, even count, ...), for ``colour`` the hue of the *other* object. It
teaches the encoder what every family looks like and part of what matters,
but not the tasks themselves, so a linear probe on the pre-trained encoder
is well below fine-tuning (the role CLIP's zero-shot accuracy plays).

Everything is a pure function of a ``jax.random`` key.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SIZE = 16
CHANNELS = 3
MAX_CLASSES = 10
COLOUR_BINS = 8


class Task(NamedTuple):
    name: str
    num_classes: int
    analogue: str
    # gen(key, n, split) -> (images (n, 16, 16, 3) in [0, 1], labels (n,), pre-training bits (n,));
    # split picks the digit sources
    gen: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
    pretrain_bit: str  # what the pre-training bit is


class Split(NamedTuple):
    x: np.ndarray  # (T, n, 16, 16, 3) float32 in [0, 1]
    y: np.ndarray  # (T, n) int32


# --------------------------------------------------------------------------
# Rendering helpers. Random draws come from jax.random (explicit keys);
# rendering is vectorised NumPy over the batch (no per-shape XLA compiles).

_YY, _XX = np.meshgrid(np.arange(SIZE) + 0.5, np.arange(SIZE) + 0.5, indexing="ij")  # (16, 16)


_CHUNK = 1 << 16


@jax.jit
def _uniform_chunk(key: jax.Array) -> jax.Array:
    return jax.random.uniform(key, (_CHUNK,))


class _Draw:
    """Successive independent uniform draws from one key.

    Every draw is cut from fixed-size chunks ``uniform(fold_in(fold_in(key, i), j), (2**16,))``
    (one compiled function for every shape, so generating a split costs no XLA compiles).
    """

    def __init__(self, key: jax.Array):
        self.key, self.i = key, 0

    def uniform(self, shape, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
        self.i += 1
        k = jax.random.fold_in(self.key, self.i)
        size = math.prod(shape)
        chunks = [np.asarray(_uniform_chunk(jax.random.fold_in(k, j))) for j in range(-(-size // _CHUNK))]
        u = np.concatenate(chunks)[:size].reshape(shape)
        return (lo + (hi - lo) * u).astype(np.float32)

    def randint(self, shape, lo: int, hi: int) -> np.ndarray:
        return np.minimum(lo + np.floor(self.uniform(shape) * (hi - lo)).astype(np.int64), hi - 1)

    def bernoulli(self, shape, p: float = 0.5) -> np.ndarray:
        return self.uniform(shape) < p


@functools.lru_cache(maxsize=None)
def _upsample_matrix(src: int, dst: int) -> np.ndarray:
    """``(dst, src)`` cubic interpolation weights (``jax.image.resize`` of the identity)."""
    return np.asarray(jax.image.resize(jnp.eye(src), (dst, src), "cubic"))


def _b(x: np.ndarray) -> np.ndarray:
    """A per-example vector ``(n,)`` or ``(n, c)`` broadcast against ``(n, 16, 16[, c])``."""
    x = np.asarray(x, np.float32)
    return x[:, None, None] if x.ndim == 1 else x[:, None, None, :]


def _hsv(h, s, v) -> np.ndarray:
    """RGB ``(n, 3)`` of hues ``h`` in [0, 1), saturations ``s``, values ``v`` (each ``(n,)``)."""
    h, s, v = (np.asarray(a, np.float32)[:, None] for a in (h, s, v))
    k = np.mod(np.array([5.0, 3.0, 1.0]) + h * 6.0, 6.0)
    return (v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)).astype(np.float32)


def _rand_colour(d: _Draw, n: int, vmin: float = 0.6) -> np.ndarray:
    return _hsv(d.uniform((n,)), d.uniform((n,), 0.5, 1.0), d.uniform((n,), vmin, 1.0))


def _paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """``img (n, 16, 16, 3)``, ``mask (n, 16, 16)`` coverage, ``colour (n, 3)``."""
    m = mask[..., None]
    return img * (1.0 - m) + m * colour[:, None, None, :]


def _soft(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of the region ``sdf <= 0``."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _noise_bg(d: _Draw, n: int, level: float) -> np.ndarray:
    base = _hsv(d.uniform((n,)), np.full(n, 0.3), np.full(n, 0.15))
    return np.clip(base[:, None, None, :] + level * d.uniform((n, SIZE, SIZE, CHANNELS)), 0.0, 1.0)


def _shape_sdf(kind, cy, cx, r, theta) -> np.ndarray:
    """Signed distance (pixels) to one of 6 shapes (circle, square, triangle, semicircle, cross, ring; per example ``kind``), centre ``(cy, cx)``, size ``r``."""
    y, x = _YY[None] - _b(cy), _XX[None] - _b(cx)
    r, c, s = _b(r), _b(np.cos(theta)), _b(np.sin(theta))
    xr, yr = c * x + s * y, -s * x + c * y
    d = np.sqrt(x**2 + y**2)
    circle = d - r
    square = np.maximum(np.abs(xr), np.abs(yr)) - 0.8 * r
    angles = (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
    triangle = functools.reduce(np.maximum, [math.cos(a) * xr + math.sin(a) * yr for a in angles]) - 0.55 * r
    half_disc = np.maximum(d - r, yr - 0.15 * r)  # a semicircle, flat side through the centre
    arm = 0.3 * r
    cross = np.minimum(
        np.maximum(np.abs(xr) - r, np.abs(yr) - arm), np.maximum(np.abs(xr) - arm, np.abs(yr) - r)
    )
    ring = np.abs(d - 0.75 * r) - 0.28 * r - 0.3
    all_ = np.stack([circle, square, triangle, half_disc, cross, ring], axis=1)  # (n, 6, 16, 16)
    return np.take_along_axis(all_, np.asarray(kind)[:, None, None, None], axis=1)[:, 0]


# --------------------------------------------------------------------------
# Digits (scikit-learn's bundled 8x8 digits)


@functools.lru_cache(maxsize=1)
def _digit_source() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 1797 digits as 12x12 images in [0, 1], split by index into train/val/test."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn; no download

    d = load_digits()
    imgs = np.asarray(jax.image.resize(jnp.asarray(d.images / 16.0, jnp.float32), (len(d.target), 12, 12), "linear"))
    imgs = np.clip(imgs, 0.0, 1.0)
    labels = np.asarray(d.target, np.int32)
    n = len(labels)
    a, b = int(0.7 * n), int(0.8 * n)
    return {"train": (imgs[:a], labels[:a]), "val": (imgs[a:b], labels[a:b]), "test": (imgs[b:], labels[b:])}


def _place(glyphs: np.ndarray, oy: np.ndarray, ox: np.ndarray, width: int = SIZE) -> np.ndarray:
    """``(n, SIZE, width)`` canvases with each ``(12, 12)`` glyph at its offset."""
    n, g = glyphs.shape[0], glyphs.shape[1]
    out = np.zeros((n, SIZE, width), np.float32)
    for i in range(n):
        out[i, oy[i] : oy[i] + g, ox[i] : ox[i] + g] = glyphs[i]
    return out


def _pick_digits(d: _Draw, n: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    imgs, labels = _digit_source()[split]
    idx = d.randint((n,), 0, len(labels))
    return imgs[idx], labels[idx]


def gen_digits(key: jax.Array, n: int, split: str = "train"):
    d = _Draw(key)
    glyphs, labels = _pick_digits(d, n, split)
    oy, ox = d.randint((n,), 1, SIZE - 12), d.randint((n,), 1, SIZE - 12)
    hw = _place(glyphs, oy, ox) * _b(d.uniform((n,), 0.7, 1.0))
    img = hw[..., None] + 0.08 * d.uniform((n, SIZE, SIZE, CHANNELS))
    return np.clip(img, 0.0, 1.0), labels, (labels >= 5).astype(np.int32)


def gen_svhn(key: jax.Array, n: int, split: str = "train"):
    d = _Draw(key)
    glyphs, labels = _pick_digits(d, n, split)
    distract, _ = _pick_digits(d, n, split)
    c0, c1 = _rand_colour(d, n, 0.1), _rand_colour(d, n, 0.1)
    ramp = np.clip((_YY + _XX) / (2 * SIZE), 0, 1)[None, ..., None]
    img = c0[:, None, None] * (1 - ramp) + c1[:, None, None] * ramp
    fg = _place(glyphs, d.randint((n,), 1, SIZE - 12), d.randint((n,), 1, SIZE - 12))
    # a distractor digit mostly outside the canvas, at the left or the right edge
    dx = np.where(d.bernoulli((n,)), 2 * SIZE - 4, SIZE - 12 + 4)
    bg_digit = _place(distract, d.randint((n,), 0, 5), dx, width=3 * SIZE)[:, :, SIZE : 2 * SIZE]
    # digits contrast with the background: light on dark backgrounds, dark on light ones
    light_bg = (np.mean(0.5 * (c0 + c1), axis=1) > 0.45)[:, None]
    hue = _hsv(d.uniform((n,)), d.uniform((n,), 0.3, 0.9), np.ones(n))
    colour = np.where(light_bg, 0.15 * hue, 0.75 + 0.25 * hue)
    img = _paint(img, 0.5 * bg_digit, colour)
    img = _paint(img, fg, colour)
    return np.clip(img, 0.0, 1.0), labels, (labels % 2).astype(np.int32)


# --------------------------------------------------------------------------
# Procedural tasks


def gen_shapes(key: jax.Array, n: int, split: str = "train"):
    d = _Draw(key)
    labels = d.randint((n,), 0, 6)
    r = d.uniform((n,), 4.5, 6.5)
    cy = r + 0.5 + d.uniform((n,)) * (SIZE - 2 * r - 1)
    cx = r + 0.5 + d.uniform((n,)) * (SIZE - 2 * r - 1)
    theta = d.uniform((n,), -0.35, 0.35)  # upright, +-20 degrees
    img = _noise_bg(d, n, 0.15)
    img = _paint(img, _soft(_shape_sdf(labels, cy, cx, r, theta)), _rand_colour(d, n))
    return img, labels, ((labels == 0) | (labels == 5)).astype(np.int32)


def gen_textures(key: jax.Array, n: int, split: str = "train"):
    d = _Draw(key)
    labels = d.randint((n,), 0, 8)
    w = _b(2 * math.pi / d.uniform((n,), 3.0, 5.5))
    p0, p1 = _b(d.uniform((n,), 0, 2 * math.pi)), _b(d.uniform((n,), 0, 2 * math.pi))
    y, x = _YY[None], _XX[None]
    ry, rx = _b(d.uniform((n,), 0, SIZE)), _b(d.uniform((n,), 0, SIZE))
    up = _upsample_matrix(4, SIZE)
    blobs = np.einsum("ya,nab,xb->nyx", up, d.uniform((n, 4, 4), -1.7, 1.7), up)
    patterns = [
        np.sin(w * y + p0) + 0 * x,  # horizontal stripes
        np.sin(w * x + p0) + 0 * y,  # vertical stripes
        np.sin(w * (x + y) / math.sqrt(2) + p0),  # diagonal /
        np.sin(w * (x - y) / math.sqrt(2) + p0),  # diagonal \
        np.sin(w * x + p0) * np.sin(w * y + p1),  # checkerboard
        2 * np.maximum(np.cos(w * x + p0) * np.cos(w * y + p1) - 0.5, -0.5),  # dot lattice
        np.sin(w * np.sqrt((y - ry) ** 2 + (x - rx) ** 2) + p0),  # concentric rings
        blobs,  # smooth blobs
    ]
    p = np.stack(patterns, axis=1)[np.arange(n), labels]
    p = np.clip(0.5 + 0.5 * p, 0.0, 1.0)[..., None]
    c0, c1 = _rand_colour(d, n, 0.3), _rand_colour(d, n, 0.3)
    return c0[:, None, None] * p + c1[:, None, None] * (1 - p), labels, (labels < 4).astype(np.int32)


def gen_count(key: jax.Array, n: int, split: str = "train"):
    d = _Draw(key)
    labels = d.randint((n,), 0, 6)  # label c means c + 1 dots
    cells = np.argsort(d.uniform((n, 16)), axis=1)  # a random permutation of the 4x4 grid per example
    cy = (cells // 4) * 4 + 2.0 + d.uniform((n, 16), -0.8, 0.8)
    cx = (cells % 4) * 4 + 2.0 + d.uniform((n, 16), -0.8, 0.8)
    rad = d.uniform((n, 16), 1.2, 1.7)
    on = np.arange(16)[None] <= labels[:, None]
    dist = np.sqrt((_YY[None, None] - cy[..., None, None]) ** 2 + (_XX[None, None] - cx[..., None, None]) ** 2)
    mask = np.max(_soft(dist - rad[..., None, None]) * on[..., None, None], axis=1)
    return _paint(_noise_bg(d, n, 0.2), mask, _rand_colour(d, n, 0.8)), labels, (labels % 2).astype(np.int32)


def gen_orientation(key: jax.Array, n: int, split: str = "train"):
    d = _Draw(key)
    labels = d.randint((n,), 0, 8)
    theta = _b((labels + 0.5 + d.uniform((n,), -0.35, 0.35)) * math.pi / 8)
    half, width = _b(d.uniform((n,), 4.5, 7.0)), _b(d.uniform((n,), 0.6, 1.2))
    y = _YY[None] - _b(SIZE / 2 + d.uniform((n,), -2.0, 2.0))
    x = _XX[None] - _b(SIZE / 2 + d.uniform((n,), -2.0, 2.0))
    along = np.cos(theta) * x - np.sin(theta) * y
    across = np.sin(theta) * x + np.cos(theta) * y
    sdf = np.maximum(np.abs(along) - half, np.abs(across) - width)
    img = _paint(_noise_bg(d, n, 0.3), _soft(sdf), _rand_colour(d, n))
    return img, labels, ((labels >= 2) & (labels < 6)).astype(np.int32)


def gen_colour(key: jax.Array, n: int, split: str = "train"):
    d = _Draw(key)
    labels = d.randint((n,), 0, COLOUR_BINS)
    hue_big = (labels + 0.5 + d.uniform((n,), -0.3, 0.3)) / COLOUR_BINS
    hue_small = np.mod(hue_big + (d.randint((n,), 1, COLOUR_BINS) + d.uniform((n,), -0.3, 0.3)) / COLOUR_BINS, 1.0)
    r_big = d.uniform((n,), 4.0, 5.5)
    r_small = r_big * d.uniform((n,), 0.55, 0.75)
    # the two objects sit in opposite halves (left/right or top/bottom, either way round)
    lo = r_big + 0.3 + d.uniform((n,)) * (SIZE / 2 - r_big - 0.3)
    lo_o = r_big + 0.3 + d.uniform((n,)) * (SIZE - 2 * r_big - 0.6)
    hi = SIZE - r_small - 0.3 - d.uniform((n,)) * (SIZE / 2 - 2 * r_small)
    hi_o = r_small + 0.3 + d.uniform((n,)) * (SIZE - 2 * r_small - 0.6)
    vertical, mirror = d.bernoulli((n,)), d.bernoulli((n,))
    big = np.where(vertical[:, None], np.stack([lo, lo_o], 1), np.stack([lo_o, lo], 1))
    small = np.where(vertical[:, None], np.stack([hi, hi_o], 1), np.stack([hi_o, hi], 1))
    big = np.where(mirror[:, None], SIZE - big, big)
    small = np.where(mirror[:, None], SIZE - small, small)
    kinds = d.randint((n, 2), 0, 6)
    sv = d.uniform((n, 4), 0.7, 1.0)
    img = 0.35 + 0.1 * d.uniform((n, SIZE, SIZE, 1)) + np.zeros((1, 1, 1, CHANNELS), np.float32)
    img = _paint(img, _soft(_shape_sdf(kinds[:, 0], big[:, 0], big[:, 1], r_big, np.full(n, 0.3))),
                 _hsv(hue_big, sv[:, 0], sv[:, 1]))
    img = _paint(img, _soft(_shape_sdf(kinds[:, 1], small[:, 0], small[:, 1], r_small, np.zeros(n))),
                 _hsv(hue_small, sv[:, 2], sv[:, 3]))
    # pre-training bit: the *smaller* object's hue is in red..green (hue < 0.5), not the label
    return img, labels, (np.mod(hue_small, 1.0) < 0.5).astype(np.int32)


def gen_symmetry(key: jax.Array, n: int, split: str = "train"):
    d = _Draw(key)
    labels = d.randint((n,), 0, 4)
    p = (d.uniform((n, 8, 8)) < 0.45).astype(np.float32)
    lr = np.concatenate([p[:, :, :4], p[:, :, :4][:, :, ::-1]], axis=2)
    ud = np.concatenate([p[:, :4], p[:, :4][:, ::-1]], axis=1)
    q = p[:, :4, :4]
    top = np.concatenate([q, q[:, :, ::-1]], axis=2)
    both = np.concatenate([top, top[:, ::-1]], axis=1)
    pat = np.stack([p, lr, ud, both], axis=1)[np.arange(n), labels]
    pat = np.repeat(np.repeat(pat, 2, 1), 2, 2)
    img = _paint(_noise_bg(d, n, 0.1), pat, _rand_colour(d, n))
    return np.clip(img + 0.1 * d.uniform((n, SIZE, SIZE, CHANNELS)), 0.0, 1.0), labels, (labels > 0).astype(np.int32)


# Order matters: T = 4 uses the first four.
TASKS: tuple[Task, ...] = (
    Task("digits", 10, "MNIST", gen_digits, "digit >= 5"),
    Task("shapes", 6, "GTSRB", gen_shapes, "round shape (circle, ring)"),
    Task("textures", 8, "DTD", gen_textures, "stripes"),
    Task("count", 6, "CLEVR-count", gen_count, "even number of dots"),
    Task("svhn", 10, "SVHN", gen_svhn, "odd digit"),
    Task("orientation", 8, "--", gen_orientation, "closer to vertical than horizontal"),
    Task("colour", COLOUR_BINS, "--", gen_colour, "the smaller object's hue is red to green (not the label)"),
    Task("symmetry", 4, "--", gen_symmetry, "symmetric"),
)
TASK_NAMES = tuple(t.name for t in TASKS)
PRETRAIN_CLASSES = 2 * len(TASKS)


def task_data(key: jax.Array, sizes: dict[str, int], tasks: tuple[Task, ...] = TASKS) -> dict[str, Split]:
    """Train/val/test splits of every task: ``{split: Split((T, n, 16, 16, 3), (T, n))}``.

    Each (task, split) gets its own key ``fold_in(fold_in(key, task), split)``.
    """
    out = {}
    for s_i, (split, n) in enumerate(sizes.items()):
        xs, ys = [], []
        for t_i, task in enumerate(tasks):
            k = jax.random.fold_in(jax.random.fold_in(key, t_i), s_i)
            x, y, _ = task.gen(k, n, split)
            xs.append(x)
            ys.append(y)
        out[split] = Split(np.stack(xs).astype(np.float32), np.stack(ys).astype(np.int32))
    return out


def pretrain_data(key: jax.Array, per_task: int, tasks: tuple[Task, ...] = TASKS) -> tuple[jax.Array, jax.Array]:
    """Pre-training pool: ``per_task`` fresh images of every family, label ``2 * family + bit``.

    Draws from the digits' training sources only; shuffled.
    """
    xs, ys = [], []
    for t_i, task in enumerate(tasks):
        x, _, bit = task.gen(jax.random.fold_in(key, t_i), per_task, "train")
        xs.append(x)
        ys.append(2 * t_i + bit)
    x, y = np.concatenate(xs), np.concatenate(ys).astype(np.int32)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 10_000), x.shape[0]))
    return x[perm].astype(np.float32), y[perm]
