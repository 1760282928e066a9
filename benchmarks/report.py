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


def _rows(seeds) -> list[tuple[str, str]]:
    """``(method, setting)`` pairs in run order."""
    return [(m, st) for m, by in seeds[0]["methods"].items() for st in by]


def _stat(seeds, method: str, setting: str, field: str) -> list[Any]:
    return [s["methods"][method][setting][field] for s in seeds]


def _label(results: Mapping[str, Any], setting: str) -> str:
    return results["config"].get("setting_labels", {}).get(setting, setting)


def _grid_cell(r: Mapping[str, Any]) -> str:
    g = r["grid"]
    if g["points"] == 1:
        return f"{g['hi']:g} (fixed)"
    stop = f"stop after {g['patience']}" if g["patience"] else "whole grid"
    note = "†" if "no authors'" in g["source"] else "" if g["source"].startswith("authors'") else "‡"
    return f"({g['lo']:.3g}, {g['hi']:.3g}] × {g['points']}, {stop}{note}"


def _end_cell(seeds, method: str, setting: str) -> str:
    """Per seed: where the chosen alpha sits (h: top of the grid, l: its lowest point walked, w: grid
    widened, r: grid refined below its first point)."""
    marks = []
    for s in seeds:
        r = s["methods"][method][setting]
        m = ("w" if r.get("widened_to") else "") + ("r" if r.get("refined_to") else "") \
            + {"high": "h", "low": "l"}.get(r.get("at_end"), "")
        marks.append(m or "–")
    return "/".join(marks)


def summary_rows(results: Mapping[str, Any], t: str) -> list[list[str]]:
    seeds = _seeds(results, t)
    rows = []
    for label, key in (("pre-trained + probe heads", "pretrained"), ("individual fine-tuned", "finetuned")):
        rows.append([label, "", _ms([s[key]["mean"] for s in seeds]), _ms([s[key]["normalized"] for s in seeds]),
                     "", "", "", "", "", ""])
    for m, st in _rows(seeds):
        f = lambda field, st=st, m=m: _stat(seeds, m, st, field)
        has_base = st != "none" and "none" in seeds[0]["methods"][m]
        base = (lambda field, m=m: _stat(seeds, m, "none", field))
        energy = [e for e in f("energy_removed") if e is not None]
        rows.append([
            m, _label(results, st), _ms(f("mean")), _ms(f("normalized")),
            _delta(base("mean"), f("mean")) if has_base else "",
            _delta(base("normalized"), f("normalized")) if has_base else "",
            "/".join(f"{x:.3g}" for x in f("alpha")), _end_cell(seeds, m, st),
            _grid_cell(seeds[0]["methods"][m][st]),
            f"{100 * np.mean(energy):.1f}%" if energy else "",
        ])
    return rows


SUMMARY_HEADER = [
    "method", "setting", "test acc", "norm. acc", "Δ acc vs none", "Δ norm. vs none", "α (per seed)",
    "α at grid end (per seed)", "α grid", "‖τ‖² removed",
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
    for m, st in _rows(seeds):
        label = m if st == "none" else f"{m} + {_label(results, st)}"
        rows.append([label, *cells(np.asarray(_stat(seeds, m, st, "per_task")))])
    return rows


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
        "# Quality: what PACT (and SIFT) add to each merging method",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}  ",
        f"Run time: {tm['total_s']:.0f} s in all; zoo build (pre-training + fine-tuning, measured when built) "
        f"{', '.join(built)}; merges and evaluation {tm['eval_s']:.0f} s.",
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
        + (" (the same probe head)." if zc.get("freeze_head", False) else "."),
        "",
        *protocol_lines(results),
        "",
        *results.get("reading", []),
    ]
    return lines


def protocol_lines(results: Mapping[str, Any]) -> list[str]:
    """The settings and the alpha protocol, in words (both suites)."""
    cfg = results["config"]
    ap = cfg["alpha_protocol"]
    labels = cfg.get("setting_labels", {})
    plan = "; ".join(f"{m}: {', '.join(labels.get(s, s) for s in ss)}" for m, ss in cfg["plan"].items())
    recipes = "; ".join(f"{labels.get(s, s)} = `make_merge(..., {', '.join(f'{k}={v!r}' for k, v in kw.items())})`"
                        for s, kw in cfg["recipes"].items() if kw)
    return [
        "Settings (each merged through `pact_jax.recipes.make_merge`): " + recipes + ". Runs: " + plan + ". "
        "Scalar PACT before TIES / DARE-TIES is our own extension (DESIGN.md §1b), not the authors' method. "
        f"Mergers: {', '.join(f'{k} {v}' for k, v in cfg['method_kwargs'].items())}; weight averaging uses "
        f"alpha = {cfg['fixed_alpha'].get('average', 1.0)} (the mean model).",
        "",
        f"Alpha, chosen on the validation split (`pact_jax.alpha`): the authors' protocol where they give a range "
        f"(`linspace(lo, hi, {ap['points'] + 1})[1:]`"
        + ("" if ap["points"] == 30 else " (the authors use `linspace(lo, hi, 31)[1:]`; a coarser grid here, for time)")
        + f" walked upwards, stop after {ap['patience']} points without a "
        f"better {ap['stop_on']}, best by {ap['select_by']}; the authors' PACT-TA and SIFT-TA ranges scale the "
        "task mean and are divided by T here, where task arithmetic sums). † no authors' range for that "
        "(method, transform): the authors' PACT range of the method is used. ‡ no authors' range at all (PACT "
        f"light, TIES, DARE-TIES): the whole grid ({ap.get('full_points', ap['points'])} points) on the range shown, "
        "chosen here, best by the same criterion. "
        "Every setting whose best alpha was the grid's top value had its grid widened to twice that value (same "
        "number of points, all walked), and every setting whose best was the grid's first value had the same "
        "number of points walked below it, down towards 0; the column 'α at grid end' marks per seed w = widened, "
        "r = refined below, h = best at the top of the (widened) grid, l = best at the lowest point walked, "
        "– = inside. The test split is evaluated at the chosen alpha only.",
    ]


def results_lines(results: Mapping[str, Any], png_name: str | None) -> list[str]:
    """The per-T tables, the plot and the quality bars (shared by both quality suites)."""
    lines: list[str] = []
    for t in results["per_T"]:
        n_seeds = len(results["per_T"][t])
        names = _task_names(results, t)
        lines += [
            f"## T = {t} tasks",
            "",
            f"Test accuracy (%), mean ± std over {n_seeds} seed(s); Δ is the paired difference to the same method "
            "without a transform (setting − none), mean ± std over seeds; normalised = merged / fine-tuned, per "
            "task, averaged over tasks; ‖τ‖² removed = share of the task vectors' squared norm the transform "
            "removes, mean over tasks and seeds.",
            "",
            *_table(SUMMARY_HEADER, summary_rows(results, t)),
            "",
            "Absolute test accuracy per task (%, mean over seeds; last column mean ± std over seeds):",
            "",
            *_table(["method", *names, "avg"], per_task_rows(results, t, normalized=False)),
            "",
            "Normalised accuracy per task (%):",
            "",
            *_table(["method", *names, "avg"], per_task_rows(results, t, normalized=True)),
            "",
        ]
    if png_name:
        lines += [f"![normalised test accuracy per method and setting]({png_name})", ""]
    lines += ["## Quality bars", ""]
    lines += [f"- [{'x' if b['holds'] else ' '}] {b['bar']}: {b['value']} — **{'holds' if b['holds'] else 'FAILS'}**"
              for b in results["bars"]]
    lines.append("")
    return lines


def markdown(results: Mapping[str, Any], png_name: str | None,
             header: Callable[[Mapping[str, Any]], list[str]] = vit_header) -> str:
    return "\n".join(header(results) + results_lines(results, png_name)) + "\n"


SETTING_COLOURS = {"none": "#8c8c8c", "paper": "#d62728", "release": "#9467bd", "light": "#ff7f0e",
                   "sift": "#1f77b4", "scalar": "#2ca02c"}


def plot(results: Mapping[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = list(results["per_T"])
    lows = [100 * s["pretrained"]["normalized"] for t in ts for s in _seeds(results, t)]
    lows += [100 * r["normalized"] for t in ts for s in _seeds(results, t) for by in s["methods"].values()
             for r in by.values()]
    bottom = max(0.0, 10.0 * np.floor(min(lows) / 10.0) - 10.0)
    fig, axes = plt.subplots(1, len(ts), figsize=(8 * len(ts), 4.5), squeeze=False)
    for ax, t in zip(axes[0], ts):
        seeds = _seeds(results, t)
        methods = list(seeds[0]["methods"])
        settings = list(dict.fromkeys(st for m in methods for st in seeds[0]["methods"][m]))
        width = 0.8 / len(settings)
        for j, st in enumerate(settings):
            xs, means, errs = [], [], []
            for i, m in enumerate(methods):
                if st in seeds[0]["methods"][m]:
                    v = 100 * np.asarray(_stat(seeds, m, st, "normalized"))
                    xs.append(i + (j - (len(settings) - 1) / 2) * width)
                    means.append(v.mean())
                    errs.append(v.std(ddof=1) if v.size > 1 else 0.0)
            ax.bar(xs, means, width, yerr=errs if len(seeds) > 1 else None, capsize=2, label=_label(results, st),
                   color=SETTING_COLOURS.get(st))
        pre = 100 * np.mean([s["pretrained"]["normalized"] for s in seeds])
        ax.axhline(100, color="k", lw=0.8, ls="--", label="fine-tuned (100%)")
        ax.axhline(pre, color="tab:blue", lw=0.8, ls=":", label="pre-trained + probe")
        ax.set_xticks(np.arange(len(methods)), methods, rotation=30, ha="right")
        ax.set_ylabel("normalised test accuracy (%)")
        ax.set_title(f"T = {t} tasks, {len(seeds)} seed(s)")
        ax.set_ylim(bottom, 105)
        ax.legend(fontsize=7, loc="lower left", ncol=2)
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
    png = md_path.with_suffix(".png")
    plot(results, png)
    md_path.write_text(markdown(results, png.name, header))
    return [md_path, js, png]


def output_path(out: Path | None, committed: Path, reduced: bool) -> Path:
    """Where a suite writes: ``out`` if given; a fresh temporary folder for a reduced run (``--quick``,
    ``--tiny``), so that it never overwrites the committed results; else ``committed``."""
    if out is not None:
        return Path(out)
    if reduced:
        import tempfile

        return Path(tempfile.mkdtemp(prefix=committed.stem + "_")) / committed.name
    return committed


def publish(results: dict[str, Any], md_path: Path, command: str,
            header: Callable[[Mapping[str, Any]], list[str]] = vit_header) -> list[Path]:
    """A suite's last step: stores ``command`` and the :func:`reading` in ``results``, then :func:`write`;
    prints the :func:`summary` and the paths written, and returns those paths."""
    results["command"] = command
    results["reading"] = reading(results)
    paths = write(results, md_path, header=header)
    print()
    print(summary(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths


CLEAR_POINTS = 0.5  # a paired mean change is "clear" beyond this many points AND beyond its spread over seeds


def reading(results: Mapping[str, Any]) -> list[str]:
    """A plain-words reading of the numbers (generated, so it stays true when the suite is re-run).

    It states the paired differences and flags only those that clear a fixed bar (mean beyond
    :data:`CLEAR_POINTS` and beyond its sample std over seeds, with at least 2 seeds); with one seed it
    draws no verdict. It names the alpha choices that sat at an end of the grid, and transforms that
    remove nearly all of the task vectors, without guessing why.
    """
    lines = ["## Reading", ""]
    for t, by_seed in results["per_T"].items():
        seeds = list(by_seed.values())
        n = len(seeds)
        ft = np.mean([s["finetuned"]["mean"] for s in seeds])
        pre = np.mean([s["pretrained"]["mean"] for s in seeds])
        plain = {m: 100 * np.mean(_stat(seeds, m, "none", "mean")) for m in seeds[0]["methods"]
                 if "none" in seeds[0]["methods"][m]}
        best = max(plain, key=plain.get) if plain else None
        parts, helped, hurt = [], [], []
        for m, st in _rows(seeds):
            if st == "none" or "none" not in seeds[0]["methods"][m]:
                continue
            d = 100 * (np.asarray(_stat(seeds, m, st, "mean")) - np.asarray(_stat(seeds, m, "none", "mean")))
            sd = float(d.std(ddof=1)) if n > 1 else 0.0
            name = f"{m} + {_label(results, st)}"
            parts.append(f"{name} {d.mean():+.1f}" + (f" ± {sd:.1f}" if n > 1 else ""))
            if n > 1 and d.mean() > max(CLEAR_POINTS, sd):
                helped.append(name)
            elif n > 1 and d.mean() < -max(CLEAR_POINTS, sd):
                hurt.append(name)
        if n > 1:
            verdict = ("Clear gains (mean change beyond 0.5 points and beyond its spread over seeds): "
                       + (", ".join(helped) if helped else "none") + "; clear losses: "
                       + (", ".join(hurt) if hurt else "none") + "; every other change is within that bar.")
        else:
            verdict = "One seed: no spread to judge the changes by, so no verdict is drawn."
        lines.append(
            f"- T = {t}: fine-tuned {ft * 100:.1f}, pre-trained + probe {pre * 100:.1f}"
            + (f"; best merge without a transform {best} {plain[best]:.1f}" if best else "")
            + ". Paired change of the test accuracy against the same method without a transform (points, mean"
            + (f" ± std over {n} seeds" if n > 1 else ", one seed") + "): " + ", ".join(parts) + ". " + verdict
        )
    ends, empty = [], []
    for t, by_seed in results["per_T"].items():
        seeds = list(by_seed.values())
        for m, st in _rows(seeds):
            rs = [s["methods"][m][st] for s in seeds]
            high = [i for i, r in enumerate(rs) if r.get("at_end") == "high"]
            low = [i for i, r in enumerate(rs) if r.get("at_end") == "low"]
            name = m if st == "none" else f"{m} + {_label(results, st)}"
            if high:
                ends.append(f"{name} at T = {t} (top of the grid, {'widened ' if rs[high[0]].get('widened_to') else ''}"
                            f"for {len(high)} of {len(rs)} seeds)")
            if low:
                ends.append(f"{name} at T = {t} (lowest point walked for {len(low)} of {len(rs)} seeds"
                            f"{', refined below the grid' if rs[low[0]].get('refined_to') else ''})")
            e = [r["energy_removed"] for r in rs if r.get("energy_removed") is not None]
            if e and np.mean(e) >= 0.99:
                empty.append(f"{name} at T = {t} ({100 * np.mean(e):.2f}%)")
    if ends:
        lines.append("- Chosen alpha at an end of its grid (the validation optimum may lie outside the range "
                     "tried): " + "; ".join(ends) + ".")
    if empty:
        lines.append("- Transforms removing at least 99% of the task vectors' squared norm (what is merged is "
                     "then mostly what they leave: the leaves they do not filter): " + "; ".join(empty) + ".")
    held = [b for b in results.get("bars", []) if b["holds"]]
    failed = [b for b in results.get("bars", []) if not b["holds"]]
    lines.append(f"- Quality bars: {len(held)} of {len(held) + len(failed)} hold"
                 + (" (failing: " + "; ".join(b["bar"].split(" (")[0].split(":")[0] for b in failed) + ")" if failed else "")
                 + "; details below the tables.")
    return lines + [""]


def summary(results: Mapping[str, Any]) -> str:
    lines = []
    for t in results["per_T"]:
        lines.append(f"T = {t}: test accuracy % (mean ± std over seeds), paired Δ vs none")
        for r in summary_rows(results, t):
            lines.append(f"  {r[0]:<16} {r[1]:<32} {r[2]:>12}   norm {r[3]:>12}   Δ {r[4]:>12}   α {r[6]}")
    for b in results["bars"]:
        lines.append(f"[{'x' if b['holds'] else ' '}] {b['bar']}: {b['value']}")
    return "\n".join(lines)
