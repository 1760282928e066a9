"""Markdown, JSON and PNG output of :mod:`benchmarks.quality` and :mod:`benchmarks.minilm_suite` (no computation here)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _ms(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (sample std over seeds; no ± for one seed)."""
    v = scale * np.asarray(values, float)
    if v.size < 2:
        return f"{v.mean():.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _delta(a: Sequence[float], b: Sequence[float]) -> str:
    """Mean paired difference ``b - a`` in points, with its sample std over seeds."""
    d = 100.0 * (np.asarray(b, float) - np.asarray(a, float))
    sign = "+" if d.mean() >= 0 else ""
    if d.size < 2:
        return f"{sign}{d.mean():.1f}"
    return f"{sign}{d.mean():.1f} ± {d.std(ddof=1):.1f}"


def _seeds(results: Mapping[str, Any], t: str) -> list[Mapping[str, Any]]:
    return list(results["per_T"][t].values())


def _task_names(results: Mapping[str, Any], t: str) -> list[str]:
    return [task["name"] for task in results["tasks"][: int(t)]]


def _method_stat(seeds, method: str, variant: str, field: str) -> list[float]:
    return [s["methods"][method][variant][field] for s in seeds]


def summary_rows(results: Mapping[str, Any], t: str) -> list[list[str]]:
    seeds = _seeds(results, t)
    rows = []
    for label, key in (("pre-trained + probe heads", "pretrained"), ("individual fine-tuned", "finetuned")):
        rows.append([label, _ms([s[key]["mean"] for s in seeds]), "", "", _ms([s[key]["normalized"] for s in seeds]),
                     "", "", "", "", ""])
    for m in seeds[0]["methods"]:
        a, b = (lambda f, m=m: _method_stat(seeds, m, "plain", f)), (lambda f, m=m: _method_stat(seeds, m, "pact", f))
        alphas = "/".join(f"{x:g}" for x in a("alpha"))
        alphas_p = "/".join(f"{x:g}" for x in b("alpha"))
        rows.append([
            m, _ms(a("mean")), _ms(b("mean")), _delta(a("mean"), b("mean")),
            _ms(a("normalized")), _ms(b("normalized")), _delta(a("normalized"), b("normalized")),
            alphas, alphas_p, f"{100 * np.mean(b('energy_removed')):.1f}%",
        ])
    return rows


SUMMARY_HEADER = [
    "method", "acc", "acc +PACT", "Δ acc", "norm. acc", "norm. +PACT", "Δ norm.", "α (per seed)",
    "α +PACT", "‖τ‖² removed by PACT",
]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def per_task_rows(results: Mapping[str, Any], t: str, normalized: bool) -> list[list[str]]:
    seeds = _seeds(results, t)
    ft = np.asarray([s["finetuned"]["per_task"] for s in seeds])

    def cells(per_task: np.ndarray) -> list[str]:  # per_task: (seeds, T) accuracies
        vals = per_task / ft if normalized else per_task
        mean_over_tasks = vals.mean(axis=1)
        return [f"{100 * v:.1f}" for v in vals.mean(axis=0)] + [_ms(mean_over_tasks)]

    rows = [["pre-trained + probe heads", *cells(np.asarray([s["pretrained"]["per_task"] for s in seeds]))]]
    rows.append(["individual fine-tuned", *cells(ft)])
    for m in seeds[0]["methods"]:
        for variant, label in (("plain", m), ("pact", f"{m} + PACT")):
            rows.append([label, *cells(np.asarray([s["methods"][m][variant]["per_task"] for s in seeds]))])
    return rows


def ablation_lines(abl: Mapping[str, Any]) -> list[str]:
    lines = [
        f"Validation accuracy (%, mean over seeds {abl['seeds']}, T = {abl['T']}, alpha re-chosen on validation "
        "for every setting); one hyperparameter changed at a time from the library defaults. "
        "Δ is against the same method without PACT; **bold** is each method's best setting.",
        "",
    ]
    for method, res in abl["methods"].items():
        plain = float(np.mean(res["plain_val"]))
        best_i = int(np.argmax([np.mean(r["val"]) for r in res["rows"]]))
        lines += [f"**{method}** (no PACT: {100 * plain:.2f})", ""]
        rows = []
        for i, r in enumerate(res["rows"]):
            v = float(np.mean(r["val"]))
            cell = f"{100 * v:.2f}"
            rows.append([r["hyperparameter"], str(r["value"]), f"**{cell}**" if i == best_i else cell,
                         f"{100 * (v - plain):+.2f}"])
        lines += _table(["hyperparameter", "value", "val acc +PACT", "Δ vs no PACT"], rows) + [""]
    return lines


def vit_header(results: Mapping[str, Any]) -> list[str]:
    """Title, command, machine and the ViT zoo's description (:mod:`benchmarks.quality`)."""
    cfg, z = results["config"], results["zoo"]
    zc = cfg["zoo"]
    v = z["vit"]
    build = z["build"]
    built = [f"seed {s}: {b['pretrain_s'] + b['finetune_s']:.0f} s" + (" (now cached)" if b["cached"] else "")
             for s, b in build.items()]
    tm = results["timings"]
    lines = [
        "# Quality: what PACT adds to each merging method",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}  ",
        f"Run time: {tm['total_s']:.0f} s in all; zoo build (pre-training + fine-tuning, measured when built) "
        f"{', '.join(built)}; merges and evaluation {tm['eval_s']:.0f} s"
        + (f"; ablation {tm['ablation_s']:.0f} s" if "ablation_s" in tm else "") + ".",
        "",
        "## Zoo",
        "",
        f"A Flax ViT encoder ({zc['vit']['image']}x{zc['vit']['image']}x3 images, {v['patch']}x{v['patch']} patches, "
        f"width {v['width']}, {v['depth']} blocks, {v['heads']} heads, MLP {v['mlp']}; {z['encoder_params']:,} parameters, "
        "all merged) and one linear head per task (kept per task, never merged).",
        f"Pre-trained for {zc['pretrain_steps']} steps (batch {zc['pretrain_batch']}, AdamW, lr {zc['pretrain_lr']}) on "
        f"{zc['pretrain_per_task']} separate images of each family with a coarse {2 * zc['num_tasks']}-way label "
        "(family x one bit per image, below); then per task a linear probe on the frozen encoder "
        f"({zc['probe_steps']} steps, Adam, lr {zc['probe_lr']}) and fine-tuning of the whole encoder from there "
        f"({zc['finetune_steps']} steps, batch {zc['finetune_batch']}, Adam, lr {zc['finetune_lr']}, cosine decay), "
        + ("the probe head kept fixed, as CLIP's zero-shot heads are in the usual protocol. "
           if zc.get("freeze_head", False) else "the head trained too (LP-FT). ")
        + "Splits per task: "
        f"train {zc['train_size']}, validation {zc['val_size']}, test {zc['test_size']}. Everything offline: "
        "scikit-learn's bundled digits and procedurally drawn images (`benchmarks/tasks.py`).",
        "",
        "A **seed** changes everything trained: pre-training initialisation and data order, each probe's and "
        "fine-tuning run's initialisation and data order, and the DARE / randomized-SVD keys of the merges. "
        "The images are the same for every seed.",
        "",
        *_table(["task", "classes", "analogue", "pre-training bit"],
                [[t["name"], t["classes"], t["analogue"], t["pretrain_bit"]] for t in results["tasks"]]),
        "",
        "Pre-trained baseline: the pre-trained encoder with each task's linear-probe head (trained on the frozen "
        "pre-trained encoder before fine-tuning). Merged models use each task's fine-tuned model's head"
        + (" (the same probe head). " if zc.get("freeze_head", False) else ". ")
        + "Weight averaging "
        f"uses alpha = {cfg['fixed_alpha'].get('average', 1.0)}; every other method (with and without PACT) has its "
        f"alpha chosen on the validation split from {{{', '.join(f'{a:g}' for a in cfg['alphas'])}}} "
        f"(extended by {', '.join(f'{a:g}' for a in cfg.get('alphas_extend', []))} while the largest value tried is "
        "the best), and the "
        f"test split is reported. Mergers: {', '.join(f'{m} {kw}' for m, kw in cfg['method_kwargs'].items())}; "
        "PACT with the library defaults through `pact_jax.recipes.make_merge`, in the perspective the recipe picks "
        f"({'; '.join(f'{p}: {chr(44).join(ms)}' for p, ms in cfg.get('pact_perspective', {}).items())}).",
        "",
    ]
    return lines


def results_lines(results: Mapping[str, Any], png_name: str | None) -> list[str]:
    """The per-T tables, the plot and the quality bars (shared by both quality suites)."""
    lines: list[str] = []
    for t in results["per_T"]:
        n_seeds = len(results["per_T"][t])
        names = _task_names(results, t)
        lines += [
            f"## T = {t} tasks",
            "",
            f"Test accuracy (%), mean ± std over {n_seeds} seed(s); Δ is the paired difference (PACT − plain); "
            "normalised = merged / fine-tuned, per task, averaged over tasks.",
            "",
            *_table(SUMMARY_HEADER, summary_rows(results, t)),
            "",
            f"Absolute test accuracy per task (%, mean over seeds; last column mean ± std over seeds):",
            "",
            *_table(["method", *names, "avg"], per_task_rows(results, t, normalized=False)),
            "",
            "Normalised accuracy per task (%):",
            "",
            *_table(["method", *names, "avg"], per_task_rows(results, t, normalized=True)),
            "",
        ]
    if png_name:
        lines += [f"![normalised accuracy per method, with and without PACT]({png_name})", ""]
    lines += ["## Quality bars", ""]
    lines += [f"- [{'x' if b['holds'] else ' '}] {b['bar']}: {b['value']} — **{'holds' if b['holds'] else 'FAILS'}**"
              for b in results["bars"]]
    lines.append("")
    if "ablation" in results:
        lines += ["## Ablation of PACT's hyperparameters", "", *ablation_lines(results["ablation"])]
    return lines


def markdown(results: Mapping[str, Any], png_name: str | None,
             header: Callable[[Mapping[str, Any]], list[str]] = vit_header) -> str:
    return "\n".join(header(results) + results_lines(results, png_name)) + "\n"


def plot(results: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = list(results["per_T"])
    lows = [100 * s["pretrained"]["normalized"] for t in ts for s in _seeds(results, t)]
    lows += [100 * s["methods"][m][v]["normalized"] for t in ts for s in _seeds(results, t)
             for m in s["methods"] for v in ("plain", "pact")]
    bottom = max(0.0, 10.0 * np.floor(min(lows) / 10.0) - 10.0)
    fig, axes = plt.subplots(1, len(ts), figsize=(6.5 * len(ts), 4.2), squeeze=False)
    for ax, t in zip(axes[0], ts):
        seeds = _seeds(results, t)
        methods = list(seeds[0]["methods"])
        x = np.arange(len(methods))
        for off, variant, label, colour in ((-0.2, "plain", "without PACT", "#8c8c8c"), (0.2, "pact", "with PACT", "#d62728")):
            vals = np.asarray([[100 * s["methods"][m][variant]["normalized"] for s in seeds] for m in methods])
            err = vals.std(axis=1, ddof=1) if vals.shape[1] > 1 else None
            ax.bar(x + off, vals.mean(axis=1), 0.4, yerr=err, capsize=3, label=label, color=colour)
        pre = 100 * np.mean([s["pretrained"]["normalized"] for s in seeds])
        ax.axhline(100, color="k", lw=0.8, ls="--", label="fine-tuned (100%)")
        ax.axhline(pre, color="tab:blue", lw=0.8, ls=":", label="pre-trained + probe")
        ax.set_xticks(x, methods, rotation=30, ha="right")
        ax.set_ylabel("normalised accuracy (%)")
        ax.set_title(f"T = {t} tasks, {len(seeds)} seed(s)")
        ax.set_ylim(bottom, 105)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: Mapping[str, Any], md_path: Path,
          header: Callable[[Mapping[str, Any]], list[str]] = vit_header) -> list[Path]:
    """Writes the JSON, the PNG and the markdown (``header(results)`` lines, then :func:`results_lines`)."""
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    js = md_path.with_suffix(".json")
    js.write_text(json.dumps(results, indent=1, default=str))
    if not results["per_T"]:  # ablation only
        md_path.write_text(ablation_markdown(results))
        return [md_path, js]
    png = md_path.with_suffix(".png")
    plot(results, png)
    md_path.write_text(markdown(results, png.name, header))
    return [md_path, js, png]


def ablation_markdown(results: Mapping[str, Any]) -> str:
    tm = results["timings"]
    return "\n".join([
        "# Ablation of PACT's hyperparameters",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}  ",
        f"Run time: {tm.get('ablation_s', 0):.0f} s (zoo from the cache of `python -m benchmarks.quality`, "
        f"config {results['config']['zoo_digest']}).",
        "",
        *ablation_lines(results["ablation"]),
    ]) + "\n"


def summary(results: Mapping[str, Any]) -> str:
    lines = []
    if "ablation" in results:
        for method, res in results["ablation"]["methods"].items():
            best = max(res["rows"], key=lambda row: np.mean(row["val"]))
            lines.append(f"ablation {method}: no PACT {100 * np.mean(res['plain_val']):.2f}, defaults "
                         f"{100 * np.mean(res['rows'][0]['val']):.2f}, best {best['hyperparameter']}={best['value']} "
                         f"{100 * np.mean(best['val']):.2f} (validation)")
    for t in results["per_T"]:
        lines.append(f"T = {t}: test accuracy % (mean ± std over seeds)")
        for r in summary_rows(results, t):
            lines.append(f"  {r[0]:<26} {r[1]:>12} {r[2]:>12} {r[3]:>12}   norm {r[4]:>12} {r[5]:>12}")
    for b in results["bars"]:
        lines.append(f"[{'x' if b['holds'] else ' '}] {b['bar']}: {b['value']}")
    return "\n".join(lines)
