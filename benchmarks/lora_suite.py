"""Quality of merging LoRA adapters, with and without PACT's LoRA variant (issue 16, item 5).

    python -m benchmarks.lora_suite                  # real MiniLM, the real-text suite's 8 tasks, ranks 8 and 16
    python -m benchmarks.lora_suite --quick          # the real model, tiny settings (minutes)
    python -m benchmarks.lora_suite --tiny           # a tiny random MiniLM, seconds (the CI test; no data needed)
    python -m benchmarks.lora_suite --ranks 8 --seeds 1 --out r8s1.md   # one part, e.g. side by side with others,
    python -m benchmarks.lora_suite --combine r8s0.json r8s1.json ...   # then one report from the parts' JSON

The zoo is the real-text MiniLM suite's (:mod:`benchmarks.minilm_suite`: the
same pre-trained all-MiniLM-L6-v2, the same tasks, texts, splits, frozen
bottom and per-task linear-probe heads, T = 8), but each task is fine-tuned
as a **LoRA adapter** instead of a full update of the top layer:

* PEFT's default targets for BERT, ``query`` and ``value`` (``--targets``
  adds ``key``, ``attn_out``, ``mlp_in``, ``mlp_out``), in the fine-tuned
  layers of the suite (the top ``trained_layers``); ``delta W = s B A`` with
  PEFT's initialisation (``A`` Kaiming-uniform, ``B = 0``; a fresh ``A`` per
  task and seed), ``s = lora_alpha / r`` (``lora_alpha = 2 r``: scale 2),
  biases and LayerNorms not trained (PEFT's ``bias="none"``); Adam with
  warm-up and cosine decay (lr :attr:`LoraConfig.lr`), the probe head fixed,
  as the suite (:func:`benchmarks.topzoo.make_trainer`).
* Each adapter is written as a PEFT folder
  (:func:`pact_jax.io.peft.save_adapter`: ``adapter_model.safetensors`` +
  ``adapter_config.json``) and read back against the base checkpoint with
  :func:`pact_jax.io.peft.load_adapter`, so every merge starts from what a
  user's PEFT folders give the library.
* Task vectors are the adapters' ``s B A`` (:func:`pact_jax.lora.dense_delta`,
  stacked: :meth:`merge.delta_from_stacked <pact_jax.chain>`); every other
  leaf is frozen (its task vector is exactly zero).

Settings: ``none`` (the method on the LoRA task vectors, through
:func:`pact_jax.recipes.make_merge`) and ``pact_lora``: PACT's LoRA variant
(DESIGN §1a step 9): :func:`pact_jax.pact` with its paper defaults and each
task's explicit space ``V_t`` = the row space of its ``A``
(:func:`pact_jax.lora.row_space`, ``k = r``) given as ``task_spaces``, then
the same merger. Note: ``K + (T - 1) r`` with ``K = 0.8 * 384 = 307`` reaches
MiniLM's 384 input dimensions at T = 8 for ``r >= 12``: at rank 16 the
protect space is everything and PACT removes the whole update (the library
warns); rank 8 (``307 + 56 = 363``) does not saturate.

Alpha: :func:`benchmarks.quality.choose_alpha` on the plan of
:func:`benchmarks.quality.alpha_plan` (``none``: the method's own authors'
range; ``pact_lora``: the authors' PACT range of that method, as the
``paper`` setting of the other suites; TIES / DARE-TIES: the whole grid),
test accuracy at the chosen alpha; the same evaluator, tables and report code
as the other suites (:class:`benchmarks.quality.TaskEvaluator`,
:mod:`benchmarks.report`). Normalised accuracy = merged / the LoRA-fine-tuned
model's accuracy on the task.

Caches: each seed's adapters (orbax, ``adapters/<task>``), heads and
``meta.json`` under ``<cache>/lora-<hash>/seed<s>/``
(:func:`benchmarks.topzoo.cached_seed`), PEFT folders next to them
(``peft/<task>``), the base model once (``base``); ``--cache-dir``, else
``$PACT_JAX_CACHE/lora_zoo``, else ``~/.cache/pact_jax/lora_zoo``.

Writes ``benchmarks/results_lora.md`` (``--out``; a temporary folder for
``--quick`` / ``--tiny``), the JSON and one PNG per rank next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import pact_jax
from pact_jax import lora, recipes
from benchmarks import minilm_suite as ms
from benchmarks import quality, report, sources, topzoo
from benchmarks import text_tasks as tt

PyTree = Any

METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts")
SETTINGS: tuple[str, ...] = ("none", "pact_lora")
SETTING_LABELS: Mapping[str, str] = {"none": "none", "pact_lora": "PACT LoRA variant (V_t = row space of A)"}
# Which setting's alpha plan (benchmarks.quality.alpha_plan) each setting here uses.
PLAN_SETTING: Mapping[str, str] = {"none": "none", "pact_lora": "paper"}
TARGETS: tuple[str, ...] = ("query", "key", "value", "attn_out", "mlp_in", "mlp_out")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The adapters: rank, ``lora_alpha`` (``None``: ``2 r``), target modules, learning rate, init."""

    rank: int = 8
    lora_alpha: float | None = None
    targets: tuple[str, ...] = ("query", "value")
    lr: float = 1e-3

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or self.rank < 1:
            raise ValueError(f"LoRA targets {list(self.targets)} (from {TARGETS}) and rank {self.rank} >= 1")

    @property
    def alpha(self) -> float:
        return float(2 * self.rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What :func:`benchmarks.topzoo.make_trainer` reads: the zoo's probe / fine-tuning settings, LoRA's lr."""

    probe_steps: int
    probe_batch: int
    probe_lr: float
    finetune_steps: int
    finetune_batch: int
    finetune_lr: float
    freeze_head: bool = True


@dataclasses.dataclass(frozen=True)
class LoraSuiteConfig:
    suite: ms.SuiteConfig = ms.suite_config("full")
    ranks: tuple[int, ...] = (8, 16)
    seeds: Mapping[int, tuple[int, ...]] | None = None  # per rank; None: suite.seeds for every rank
    lora: LoraConfig = LoraConfig()
    methods: tuple[str, ...] = METHODS

    def seeds_for(self, rank: int) -> tuple[int, ...]:
        return tuple((self.seeds or {}).get(rank, self.suite.seeds))

    def lora_for(self, rank: int) -> LoraConfig:
        return dataclasses.replace(self.lora, rank=rank)


def suite_config(mode: str = "full") -> LoraSuiteConfig:
    """``full``: the real-text suite's zoo (T = 8), 3 seeds, ranks 8 and 16; ``quick`` / ``tiny`` as the suite's."""
    cfg = ms.suite_config(mode, "real")
    if mode == "full":
        return LoraSuiteConfig(suite=cfg)
    return LoraSuiteConfig(suite=cfg, ranks=(2, 4) if mode == "tiny" else (8,),
                           methods=("task_arithmetic", "tsv", "iso_c") if mode == "tiny" else METHODS,
                           lora=LoraConfig(lr=1e-2 if mode == "tiny" else 1e-3))


# --------------------------------------------------------------------------
# Adapters: parameters, the adapted forward pass, training


def target_paths(model, zcfg: ms.TextZooConfig, targets: Sequence[str]) -> list[str]:
    """Leaf paths of the adapted kernels in the whole BERT tree (``params/layer_i/<target>/kernel``)."""
    return [f"params/{name}/{t}/kernel" for name in ms._trained_names(model, zcfg) for t in targets]


def init_adapter(key: jax.Array, layers: PyTree, targets: Sequence[str], rank: int) -> PyTree:
    """PEFT's init: ``a (r, d_in)`` Kaiming-uniform (bound ``1 / sqrt(d_in)``), ``b (d_out, r) = 0``."""
    out = {}
    for i, (name, layer) in enumerate(sorted(layers.items())):
        out[name] = {}
        for j, t in enumerate(targets):
            d_in, d_out = layer[t]["kernel"].shape
            k = jax.random.fold_in(key, 97 * i + j)
            bound = 1.0 / np.sqrt(d_in)
            out[name][t] = {"a": jax.random.uniform(k, (rank, d_in), jnp.float32, -bound, bound),
                            "b": jnp.zeros((d_out, rank), jnp.float32)}
    return out


def adapted(layers: PyTree, adapter: PyTree, scale: float) -> PyTree:
    """The trained layers with ``kernel + s (B A)^T`` on every adapted module (Flax kernels are ``(in, out)``)."""
    out = {}
    for name, layer in layers.items():
        mods = dict(layer)
        for t, f in adapter.get(name, {}).items():
            mods[t] = {**layer[t], "kernel": layer[t]["kernel"] + scale * (f["a"].T @ f["b"].T)}
        out[name] = mods
    return out


def build_seed(zcfg: ms.TextZooConfig, lcfg: LoraConfig, backbone: ms.Backbone, seed: int,
               data: Mapping[str, ms.TextData], probe_feats: np.ndarray, log: Callable[[str], None] = print):
    """Probes and LoRA fine-tunes every task of one seed: ``(adapters, heads, probes, meta)``."""
    model = backbone.cfg
    names = tuple(ms._trained_names(model, zcfg))
    layers = {k: backbone.params["params"][k] for k in names}
    tcfg = TrainConfig(zcfg.probe_steps, zcfg.probe_batch, zcfg.probe_lr, zcfg.finetune_steps,
                       zcfg.finetune_batch, lcfg.lr, zcfg.freeze_head)

    def features(adapter, x):
        states, mask = x
        return ms.top_pool(model, names, adapted(layers, adapter, lcfg.scale), states, mask)

    trainer = topzoo.make_trainer(tcfg, features, model.hidden, tt.MAX_CLASSES)

    def fresh_adapter(key, _, *args):  # a fresh A per task (as separate PEFT runs), drawn from the task's key
        k_train, k_init = jax.random.split(key)
        return trainer(k_train, init_adapter(k_init, layers, lcfg.targets, lcfg.rank), *args)

    tr = data["train"]
    train = [((tr.x[t], tr.mask[t]), tr.y[t], tr.x.shape[1]) for t in range(len(zcfg.tasks))]
    outs, heads, probes, meta = topzoo.build_seed(fresh_adapter, None, zcfg.tasks, seed, train, probe_feats,
                                                  ms.num_classes(zcfg), log)
    return outs, heads, probes, {**meta, "lora": dataclasses.asdict(lcfg)}


def digest(zcfg: ms.TextZooConfig, lcfg: LoraConfig, backbone_name: str) -> str:
    blob = json.dumps({"zoo": zcfg.digest(backbone_name), "lora": dataclasses.asdict(lcfg), "version": 1},
                      sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


# --------------------------------------------------------------------------
# PEFT folders and the merges (the library's user path)


def peft_factors(adapter: PyTree, scale: float) -> dict[str, lora.LoraFactors]:
    """``{PEFT module name: LoraFactors}`` of one trained adapter tree (``layer_i.<module>``, torch frame)."""
    return {f"{name}.{t}": lora.LoraFactors(np.asarray(f["a"]), np.asarray(f["b"]), scale)
            for name, mods in adapter.items() for t, f in mods.items()}


def export_and_load(folder: Path, base: Path, task_names: Sequence[str], adapters: Sequence[PyTree],
                    lcfg: LoraConfig) -> list[Any]:
    """Writes each adapter as a PEFT folder (once) and reads every one back against the base checkpoint:
    :func:`pact_jax.io.peft.load_adapter` results (``{base leaf path: LoraFactors}`` with their binding)."""
    from pact_jax.io import peft

    out = []
    for name, ad in zip(task_names, adapters):
        path = Path(folder) / name
        if not peft.is_adapter(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            peft.save_adapter(path, peft_factors(ad, lcfg.scale), base_model_name_or_path=str(base))
        out.append(peft.load_adapter(path, base))
    return out


def lora_rules(paths: Sequence[str]) -> pact_jax.LeafRules:
    """The adapted kernels are matrices (Flax ``(in, out)``); every other leaf is frozen (zero task vector)."""
    alts = "|".join(re.escape(p) for p in paths)
    return pact_jax.LeafRules(matrix=r"/kernel$", freeze=rf"^(?!({alts})$)", layout="flax")


class LoraZoo(NamedTuple):
    factors: list[Any]  # per task, pact_jax.io.peft.load_adapter of its PEFT folder
    heads: PyTree
    probes: PyTree
    meta: dict[str, Any]


class LoraEvaluator(quality.TaskEvaluator):
    """:class:`benchmarks.quality.TaskEvaluator` whose fine-tuned models are ``W0 + s B A``; keeps the
    stacked task vectors and PACT's LoRA explicit spaces as the library's adapter merge builds them
    (:func:`pact_jax.io.lora_merge.group_task_vectors`: ``s B A`` from the factors, row spaces of ``A``)."""

    def __init__(self, *, factors, **kw):
        from pact_jax.io.base import flatten, unflatten
        from pact_jax.io.lora_merge import group_task_vectors

        pre = kw["pretrained"]
        flat, self.spaces = group_task_vectors([f.bound for f in factors], flatten(pre), rules=kw["rules"])
        self.stacked = unflatten(flat)
        fts = [jax.tree_util.tree_map(lambda w, d, i=i: w + d[i], pre, self.stacked) for i in range(len(factors))]
        super().__init__(finetuned=fts, **kw)


def merged(ev: LoraEvaluator, method: str, setting: str) -> tuple[PyTree, float | None]:
    """``(merged delta, share of ||tau||^2 removed by PACT or None)`` of ``method`` under ``setting``."""
    kw = quality.recipe(method, "none")
    key = quality.merge_key(ev.seed, method) if recipes.needs_key(method, **kw) else None
    merge = recipes.make_merge(method, rules=ev.rules, **kw)
    if setting == "none":
        return jax.block_until_ready(merge.delta_from_stacked(ev.pre, ev.stacked, key=key)), None
    if setting != "pact_lora":
        raise ValueError(f"setting {setting!r}: one of {SETTINGS}")
    cleaned = ev.__dict__.get("_pact_lora")
    if cleaned is None:  # one PACT run per evaluator: the same filtered vectors whatever merger follows
        cleaned = jax.block_until_ready(pact_jax.pact(ev.pre, ev.stacked, task_spaces=ev.spaces, rules=ev.rules))
        ev.__dict__["_pact_lora"] = cleaned
    removed = quality._sq_norms(jax.tree_util.tree_map(jnp.subtract, ev.stacked, cleaned))
    energy = float(np.mean(removed / np.maximum(quality._sq_norms(ev.stacked), 1e-30)))
    return jax.block_until_ready(merge.delta_from_stacked(ev.pre, cleaned, key=key)), energy


def evaluate(ev: LoraEvaluator, methods: Sequence[str], protocol: quality.AlphaProtocol,
             log: Callable[[str], None]) -> dict[str, Any]:
    """Baselines and every (method, setting): one ``per_T[t][seed]`` entry of the report's format."""
    res = quality.evaluate_methods(ev, (), (), log, protocol)  # the baselines only
    res["methods"] = {m: {} for m in methods}
    for setting in SETTINGS:
        for method in methods:
            t0 = time.perf_counter()
            delta, energy = merged(ev, method, setting)
            merge_s = time.perf_counter() - t0
            plan = quality.alpha_plan(method, PLAN_SETTING[setting], ev.t, protocol.points, protocol.full_points)
            t0 = time.perf_counter()
            r = quality.choose_alpha(ev, delta, plan, protocol.chunk)
            acc = ev.test_acc(delta, r["alpha"])
            r.update(setting=setting, merge_s=merge_s, search_s=time.perf_counter() - t0, energy_removed=energy,
                     per_task=[float(a) for a in acc], mean=float(acc.mean()),
                     normalized=float(np.mean(acc / ev.finetuned)))
            res["methods"][method][setting] = r
            log(f"    T={ev.t} seed {ev.seed} {method:<16} {setting:<9} test {100 * r['mean']:5.1f} "
                f"(norm {100 * r['normalized']:5.1f}) alpha {r['alpha']:.3g} ({len(r['curve']['alpha'])} tried)"
                + ("" if energy is None else f", removes {100 * energy:.1f}% of ||tau||^2")
                + f"  [{merge_s:.1f} s merge, {r['search_s']:.1f} s alpha]")
    ev.__dict__.pop("_pact_lora", None)
    return res


def factor_agreement(ev: LoraEvaluator, factors: Sequence[Mapping[str, lora.LoraFactors]]) -> dict[str, float]:
    """Max relative difference between the factor-aware mergers (:mod:`pact_jax.lora`) and the dense recipes."""
    stacked = lora.stack_factors(factors)
    out = {}
    for method, fn in (("task_arithmetic", lora.task_arithmetic), ("tsv", lora.tsv)):
        dense = recipes.make_merge(method, rules=ev.rules).delta_from_stacked(ev.pre, ev.stacked)
        fac = fn(stacked, layout=dict(factors[0].layouts))
        flat = {"/".join(str(getattr(k, "key", k)) for k in p): v
                for p, v in jax.tree_util.tree_flatten_with_path(dense)[0]}
        out[method] = max(float(jnp.linalg.norm(fac[p] - flat[p]) / jnp.maximum(jnp.linalg.norm(flat[p]), 1e-30))
                          for p in fac)
    return out


# --------------------------------------------------------------------------
# Driver


def run(cfg: LoraSuiteConfig, cache: Path | None = None, log: Callable[[str], None] = print,
        backbone: ms.Backbone | None = None) -> dict[str, Any]:
    """Builds or loads each rank's and seed's adapters, exports them as PEFT folders and evaluates every merge."""
    from pact_jax import io

    t_start = time.perf_counter()
    sc, zc = cfg.suite, cfg.suite.zoo
    t = zc.num_tasks
    backbone = backbone or ms.load_backbone(sc)
    data = ms.make_data(zc, backbone, ("val", "test"))
    log(f"backbone {backbone.name}; validation / test data ready ({time.perf_counter() - t_start:.0f} s)")
    model, names = backbone.cfg, ms._trained_names(backbone.cfg, zc)
    full: dict[str, Any] = {}

    def training_data():  # only when some seed is not cached: the frozen bottom pass over train
        if not full:
            tr = ms.make_data(zc, backbone, ("train",))["train"]
            layers = {k: backbone.params["params"][k] for k in names}
            full["data"] = {**data, "train": tr}
            full["feats"] = np.stack([ms.pooled(model, names, layers, tr.x[i], tr.mask[i]) for i in range(len(tr.x))])
        return full["data"], full["feats"]

    root = Path(cache or topzoo.cache_root("lora_zoo")).expanduser().resolve()
    base = root / f"base-{hashlib.sha1(backbone.name.encode()).hexdigest()[:10]}"
    if not base.exists():
        io.save(base, backbone.params)
    out: dict[str, Any] = {}
    for rank in cfg.ranks:
        lcfg = cfg.lora_for(rank)
        seeds = cfg.seeds_for(rank)
        paths = target_paths(model, zc, lcfg.targets)
        rules = lora_rules(paths)
        folder = root / f"lora-{digest(zc, lcfg, backbone.name)}"

        def get_zoo(seed, lcfg=lcfg, folder=folder):
            build = lambda: build_seed(zc, lcfg, backbone, seed, *training_data(), log=log)  # noqa: E731
            ads, heads, probes, meta, cached = topzoo.cached_seed(folder / f"seed{seed}", zc.tasks, build, log)
            factors = export_and_load(folder / f"seed{seed}" / "peft", base, zc.tasks, ads, lcfg)
            tree = lambda h: jax.tree_util.tree_map(jnp.asarray, h)  # noqa: E731
            return LoraZoo(factors, tree(heads), tree(probes), meta), cached

        agreement: dict[str, Any] = {}

        def make_evaluator(zoo, t_, seed, rules=rules, agreement=agreement):
            factors, heads, probes, _ = zoo
            pre = {"params": {k: backbone.params["params"][k] for k in names}}  # all the accuracy reads
            d = lambda s: ((jnp.asarray(data[s].x[:t_]), jnp.asarray(data[s].mask[:t_])), jnp.asarray(data[s].y[:t_]))  # noqa: E731
            ev = LoraEvaluator(factors=factors[:t_], pretrained=pre, heads=heads, probe_heads=probes,
                               val=d("val"), test=d("test"), num_classes=ms.num_classes(zc)[:t_],
                               accuracy_fns=ms.make_accuracy(model, tuple(names)), seed=seed, rules=rules)
            agreement[str(seed)] = factor_agreement(ev, factors[:t_])
            return ev

        zoos, build, per_t, eval_s = topzoo.run_seeds(
            seeds, (t,), get_zoo, make_evaluator,
            lambda ev: evaluate(ev, cfg.methods, sc.alpha, log), log)
        res = {
            "rank": rank, "lora": {**dataclasses.asdict(lcfg), "scale": lcfg.scale, "paths": paths},
            "tasks": [{"name": tk.name, "classes": tk.num_classes, "class_names": list(tk.classes),
                       "description": tk.description, "source": ms.task_source(zc, tk)} for tk in zc.task_list],
            "config": {"setting_labels": dict(SETTING_LABELS), "seeds": list(seeds)},
            "per_T": per_t, "build": build, "eval_s": eval_s,
            "losses": {str(s): z.meta["losses"] for s, z in zoos.items()},
            "factor_vs_dense_rel_diff": agreement,
        }
        res["bars"] = quality.quality_bars(res)
        res["reading"] = report.reading(res)
        out[str(rank)] = res
    return {
        "command": None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": quality.machine(),
        "config": {"methods": list(cfg.methods), "settings": list(SETTINGS), "setting_labels": dict(SETTING_LABELS),
                   "plan_setting": dict(PLAN_SETTING), "ranks": list(cfg.ranks),
                   "alpha_protocol": dataclasses.asdict(sc.alpha), "method_kwargs": {
                       k: dict(v) for k, v in quality.METHOD_KWARGS.items()},
                   "zoo": dataclasses.asdict(zc), "backbone": sc.backbone, "lora": dataclasses.asdict(cfg.lora)},
        "model": backbone.name,
        "ranks": out,
        "timings": {"total_s": time.perf_counter() - t_start},
    }


def markdown(results: Mapping[str, Any], png: Mapping[str, str | None]) -> str:
    cfg, zc = results["config"], results["config"]["zoo"]
    ap = cfg["alpha_protocol"]
    lines = [
        "# Quality: merging LoRA adapters, with and without PACT's LoRA variant (issue 16)",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']} (shared with other jobs during the run: times are not speed measurements)  ",
        f"Date: {results['date']}  ",
        f"Run time: {results['timings']['total_s']:.0f} s in all"
        + (f" (runs combined, run side by side: {', '.join(f'{x:.0f} s' for x in results['timings']['parts_s'])})."
           if "parts_s" in results["timings"] else "."),
        "",
        f"Model: {results['model']}; tasks, texts and splits of the real-text MiniLM suite "
        f"(`benchmarks/minilm_suite.py`, T = {len(zc['tasks'])}: {', '.join(zc['tasks'])}), truncated to "
        f"{zc['seq_len']} word pieces; train {zc['train_size']}, validation {zc['val_size']}, test {zc['test_size']} "
        f"texts per task; the top {zc['trained_layers']} layer(s) adapted. Per task and seed: a linear probe on the "
        f"frozen encoder ({zc['probe_steps']} steps), then a LoRA adapter ({zc['finetune_steps']} Adam steps, batch "
        f"{zc['finetune_batch']}, warm-up + cosine) with the probe head fixed; PEFT's init (A Kaiming-uniform, "
        "B = 0, a fresh A per task), no bias or LayerNorm trained. Each adapter is saved as a PEFT folder "
        "(`pact_jax.io.peft.save_adapter`) and read back against the base checkpoint (`load_adapter`); task "
        "vectors are s·B·A, every other leaf frozen.",
        "",
        "Settings: **none** (`recipes.make_merge(method).delta_from_stacked`); **PACT LoRA variant**: "
        "`pact_jax.pact(..., task_spaces=pact_jax.lora.row_space(A))` (paper defaults: K = 0.8·d, the row space "
        "of each task's A as its explicit space, k = r), then the same merger. Mergers: "
        + ", ".join(f"{k} {v}" for k, v in cfg["method_kwargs"].items())
        + ". α by `benchmarks.quality.choose_alpha` (the other suites' protocol: the authors' range of the "
        "method — of its PACT variant for the PACT rows —, "
        f"{ap['points']} points, stop after {quality.PATIENCE} without a better validation mean, best by "
        f"validation normalised accuracy; TIES / DARE-TIES the whole grid of {ap['full_points'] or ap['points']} "
        "points; widened ×2 at the top, refined below the first point). Normalised = merged / the task's "
        "LoRA-fine-tuned model.",
        "",
    ]
    for rank, res in results["ranks"].items():
        lc = res["lora"]
        agree = res["factor_vs_dense_rel_diff"]
        worst = {m: max(a[m] for a in agree.values()) for m in next(iter(agree.values()))} if agree else {}
        lines += [
            f"# Rank {rank}",
            "",
            f"LoRA rank {rank}, lora_alpha {lc['lora_alpha'] or 2 * int(rank)} (scale {lc['scale']:g}), targets "
            f"{', '.join(lc['targets'])} ({len(lc['paths'])} matrices), lr {lc['lr']}. Seeds: "
            f"{', '.join(map(str, res['config']['seeds']))}. Factor-aware mergers (`pact_jax.lora`) against the "
            "dense recipes on the same adapters, max relative difference over seeds and matrices: "
            + ", ".join(f"{m} {v:.1e}" for m, v in worst.items()) + ".",
            "",
            *res["reading"],
            *report.results_lines(res, png.get(rank)),
        ]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], md_path: Path) -> list[Path]:
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    js = md_path.with_suffix(".json")
    js.write_text(json.dumps(results, indent=1, default=str))
    pngs = {r: report.plot(res, md_path.with_name(f"{md_path.stem}_r{r}.png")) for r, res in results["ranks"].items()}
    md_path.write_text(markdown(results, {r: p.name for r, p in pngs.items()}))
    return [md_path, js, *pngs.values()]


def combine(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One report from runs of the same configuration on different ranks or seeds (e.g. run in parallel):
    per rank, the seeds of every part; the bars and the reading recomputed; commands and run times listed."""
    keep = ("methods", "settings", "alpha_protocol", "zoo", "backbone", "lora")
    first = parts[0]
    for part in parts[1:]:
        bad = [k for k in keep if part["config"].get(k) != first["config"].get(k)]
        if bad:
            raise ValueError(f"cannot combine runs whose {', '.join(bad)} differ")
    ranks: dict[str, Any] = {}
    for part in parts:
        for rank, res in part["ranks"].items():
            if rank not in ranks:
                ranks[rank] = json.loads(json.dumps(res))
                continue
            into = ranks[rank]
            for t, seeds in res["per_T"].items():
                clash = set(seeds) & set(into["per_T"].setdefault(t, {}))
                if clash:
                    raise ValueError(f"rank {rank}: seeds {sorted(clash)} are in two of the runs combined")
                into["per_T"][t].update(seeds)
            for key in ("build", "losses", "factor_vs_dense_rel_diff"):
                into[key].update(res[key])
            into["eval_s"] += res["eval_s"]
    for res in ranks.values():
        for t in res["per_T"]:
            res["per_T"][t] = dict(sorted(res["per_T"][t].items(), key=lambda kv: int(kv[0])))
        res["config"]["seeds"] = sorted(int(s) for t in res["per_T"].values() for s in t)
        res["bars"] = quality.quality_bars(res)
        res["reading"] = report.reading(res)
    return {**first, "command": " ; ".join(p["command"] for p in parts),
            "config": {**first["config"], "ranks": [int(r) for r in ranks]},
            "ranks": dict(sorted(ranks.items(), key=lambda kv: int(kv[0]))),
            "timings": {"total_s": sum(p["timings"]["total_s"] for p in parts),
                        "parts_s": [p["timings"]["total_s"] for p in parts]}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRA ranks (default 8 16)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    p.add_argument("--seeds-later-ranks", type=int, nargs="+", default=None,
                   help="seeds for every rank after the first (default: --seeds)")
    p.add_argument("--methods", nargs="+", default=None, choices=quality.METHODS, help=f"default {' '.join(METHODS)}")
    p.add_argument("--targets", nargs="+", default=None, choices=TARGETS, help="adapted modules (default query value)")
    p.add_argument("--lr", type=float, default=None, help="LoRA learning rate (default 1e-3)")
    p.add_argument("--train-size", type=int, default=None, help="training texts per task (default: the suite's, 2048)")
    p.add_argument("--steps", type=int, default=None, help="LoRA fine-tuning steps (default: the suite's, 200)")
    p.add_argument("--points", type=int, default=None, help="points per alpha grid (default: the suite's, 10)")
    p.add_argument("--quick", action="store_true", help="the real model with tiny settings (minutes)")
    p.add_argument("--tiny", action="store_true", help="a tiny random MiniLM and stand-in texts (CI; seconds)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache (default: $PACT_JAX_CACHE/lora_zoo or ~/.cache/pact_jax/lora_zoo)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown output (default benchmarks/results_lora.md; a temporary folder for --quick / --tiny)")
    p.add_argument("--combine", type=Path, nargs="+", default=None, metavar="JSON",
                   help="write one report from the JSON results of earlier runs (other ranks or seeds; nothing is run)")
    return p


def config_from_args(args: argparse.Namespace) -> LoraSuiteConfig:
    cfg = suite_config("tiny" if args.tiny else "quick" if args.quick else "full")
    sc = cfg.suite
    if args.seeds:
        sc = dataclasses.replace(sc, seeds=tuple(args.seeds))
    zoo = {k: v for k, v in (("train_size", args.train_size), ("finetune_steps", args.steps)) if v}
    if zoo:
        sc = dataclasses.replace(sc, zoo=dataclasses.replace(sc.zoo, **zoo))
    if args.points:
        sc = dataclasses.replace(sc, alpha=dataclasses.replace(sc.alpha, points=args.points, full_points=args.points))
    lc = cfg.lora
    if args.targets:
        lc = dataclasses.replace(lc, targets=tuple(args.targets))
    if args.lr:
        lc = dataclasses.replace(lc, lr=args.lr)
    ranks = tuple(args.ranks or cfg.ranks)
    seeds = {r: tuple(args.seeds_later_ranks) for r in ranks[1:]} if args.seeds_later_ranks else None
    return dataclasses.replace(cfg, suite=sc, lora=lc, ranks=ranks, seeds=seeds,
                               methods=tuple(args.methods or cfg.methods))


def main(argv: Sequence[str] | None = None, backbone: ms.Backbone | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    out = report.output_path(args.out, Path(__file__).parent / "results_lora.md", args.quick or args.tiny)
    if args.combine:
        results = combine([json.loads(Path(p).read_text()) for p in args.combine])
        print("wrote " + ", ".join(str(p) for p in write(results, out)))
        return 0
    command = "python -m benchmarks.lora_suite" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    log = lambda s: print(s, flush=True)  # noqa: E731
    results = sources.or_exit(command, lambda: run(cfg, args.cache_dir, log, backbone))
    results["command"] = command
    paths = write(results, out)
    for rank, res in results["ranks"].items():
        print(f"rank {rank}:\n" + report.summary(res))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
