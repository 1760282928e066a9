"""PACT as the paper runs it, + TSV-M: pact_jax against the authors' loop with the fix (issue 18, item 9).

    python -m benchmarks.pact_speed                        # ViT-B/32, 1 block, T = 8 (minutes on 2 cores)
    python -m benchmarks.pact_speed --tiny --out /tmp/ps   # width 128, T = 3: seconds (the CI test)

One process, one synthetic ViT-B/32 block (torch layout ``(d_out, d_in)``:
attn in_proj (3w, w), out_proj (w, w), mlp c_fc (4w, w), c_proj (w, 4w)):

* ``W0 = G / sqrt(d_in)`` plus ``round(0.05 p)`` spikes (``p = min(d_out,
  d_in)``); task vectors ``A_t diag(exp(-i/6)) B_t^T`` (rank 32) plus 10 %
  Gaussian noise, scaled to ``||Delta_t|| = 1e-2 ||W0||``. Fixed seed.
* ``torch``: the authors' per-matrix loop (DESIGN.md §1a, their
  ``full-finetune/src/utils/pact_utils.py``) with the real ``W0`` and the
  fix: step 1 ``torch.linalg.svd(W0)``, ``V0K`` = top ``K = max(1,
  floor(0.8 p))`` right singular vectors; step 2 top ``k = min(10, p)`` right
  singular vectors of each ``Delta_t``; step 3 ``R_t`` = rank-revealing basis
  (SVD, left vectors with ``s > 1e-4 s_max``) of ``V0K - V_t V_t^T V0K``;
  step 4 ``P_j`` = the same basis of ``[R_i, i != j]``, ``Delta_j -= Delta_j
  P_j P_j^T``. The release recomputes step 1 for every task; here it runs once
  per matrix (a fairer baseline). ``orthonormalize="qr"`` reproduces the
  release (plain reduced QR in steps 3-4). Then TSV-M by
  :func:`benchmarks.baselines.torch_tsv`. ``torch.set_num_threads(2)``.
* ``pact_jax``: the Flax-layout transposes ``(d_in, d_out)``,
  ``pact_jax.merges.tsv(pact_jax.pact(pretrained, stacked))`` with pact's
  defaults (the paper's); before those defaults landed, the same settings as
  keywords (the report says which). Called eagerly, as a user would: first call
  (compiles every shape bucket) and ``--repeats`` steady calls; compile time =
  first - median steady. Randomized steps 1-2 (``svd="randomized"``) likewise.

Agreement: max over tasks and matrices of ``||filtered_jax - filtered_torch||
/ ||Delta_t||``, and ``||merged_jax - merged_torch|| / ||merged_torch||``
(targets 1e-3). Energy removed per matrix: ``||Delta - filtered||^2 /
||Delta||^2``. Writes ``pact_speed.md`` / ``pact_speed.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import pact_jax  # sets the CPU runtime before any JAX computation
import jax
import jax.numpy as jnp

K_RATIO, TASK_RANK, SPAN_TOL = 0.8, 10, 1e-4
TARGETS = {"ratio": 3.0, "compile_s": 10.0, "agreement": 1e-3}
TORCH_THREADS = 2


def shapes(width: int) -> dict[str, tuple[int, int]]:
    """Torch-layout ``(d_out, d_in)`` of one ViT block's matrices."""
    return {
        "attn_in_proj": (3 * width, width),
        "attn_out_proj": (width, width),
        "mlp_c_fc": (4 * width, width),
        "mlp_c_proj": (width, 4 * width),
    }


def ranks(d_out: int, d_in: int) -> tuple[int, int]:
    p = min(d_out, d_in)
    return max(1, int(K_RATIO * p)), min(TASK_RANK, p)


def make_block(width: int, tasks: int, blocks: int, seed: int):
    """``{name: (W0 (d_out, d_in), Delta (T, d_out, d_in))}``, float32, torch layout."""
    rng = np.random.default_rng(seed)
    out = {}
    for b in range(blocks):
        for name, (d_out, d_in) in shapes(width).items():
            p = min(d_out, d_in)
            w0 = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
            spikes = max(1, round(0.05 * p))
            u = np.linalg.qr(rng.standard_normal((d_out, spikes)))[0]
            v = np.linalg.qr(rng.standard_normal((d_in, spikes)))[0]
            w0 += (u * np.linspace(6.0, 3.0, spikes)) @ v.T
            rank = min(32, p)
            s = np.exp(-np.arange(rank) / 6.0)
            deltas = []
            for _ in range(tasks):
                a = np.linalg.qr(rng.standard_normal((d_out, rank)))[0]
                bb = np.linalg.qr(rng.standard_normal((d_in, rank)))[0]
                low = (a * s) @ bb.T
                noise = rng.standard_normal((d_out, d_in))
                d = low + 0.1 * np.linalg.norm(low) / np.linalg.norm(noise) * noise
                deltas.append(d * (1e-2 * np.linalg.norm(w0) / np.linalg.norm(d)))
            out[f"block_{b}/{name}"] = (w0.astype(np.float32), np.stack(deltas).astype(np.float32))
    return out


# --------------------------------------------------------------------------
# The authors' loop, in PyTorch, with the fix


class Steps:
    """Accumulated wall time per named step."""

    def __init__(self):
        self.s: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        yield
        self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0


def torch_basis(x, orthonormalize: str, tol: float = SPAN_TOL):
    """Orthonormal basis of ``x``'s columns: rank-revealing SVD (the fix) or the release's plain QR."""
    import torch

    if x.shape[1] == 0 or float(torch.linalg.norm(x)) < 1e-6:  # ~0: empty, as the release
        return x[:, :0]
    if orthonormalize == "qr":
        return torch.linalg.qr(x)[0]  # min(d, n) columns whatever the rank
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return u[:, s > tol * s[0]]


def torch_pact(w0, tau, *, orthonormalize: str = "svd", steps: Steps | None = None):
    """PACT steps 1-4 on one torch-layout matrix ``w0 (d_out, d_in)``, ``tau (T, d_out, d_in)``."""
    import torch

    steps = steps or Steps()
    t, d_out, d_in = tau.shape
    big_k, k = ranks(d_out, d_in)
    with steps("1 svd(W0)"):
        v0k = torch.linalg.svd(w0, full_matrices=False)[2][:big_k].T  # (d_in, K)
    rel = []
    for i in range(t):
        with steps("2 svd(Delta_t)"):
            vt = torch.linalg.svd(tau[i], full_matrices=False)[2][:k].T  # (d_in, k)
        with steps("3 basis R_t"):
            rel.append(torch_basis(v0k - vt @ (vt.T @ v0k), orthonormalize))
    out = tau.clone()
    for j in range(t):
        with steps("4 basis P_j"):
            cols = [rel[i] for i in range(t) if i != j and rel[i].shape[1] > 0]
            pj = torch_basis(torch.cat(cols, dim=1), orthonormalize) if cols else None
        if pj is not None:
            with steps("4 project"):
                out[j] = tau[j] - (tau[j] @ pj) @ pj.T
    return out


def torch_merge(data, orthonormalize: str = "svd", steps: Steps | None = None):
    """``({name: filtered (T, d_out, d_in)}, {name: TSV-M delta (d_out, d_in)})`` as NumPy."""
    import torch

    from benchmarks.baselines import torch_tsv

    steps = steps or Steps()
    filt, merged = {}, {}
    with torch.no_grad():
        for name, (w0, tau) in data.items():
            f = torch_pact(torch.from_numpy(w0), torch.from_numpy(tau), orthonormalize=orthonormalize, steps=steps)
            with steps("5 TSV-M"):
                merged[name] = torch_tsv(f, []).numpy()
            filt[name] = f.numpy()
    return filt, merged


# --------------------------------------------------------------------------
# pact_jax


def paper_defaults() -> bool:
    """Whether ``pact_jax.pact``'s defaults are the paper's (the new signature)."""
    params = inspect.signature(pact_jax.pact).parameters
    return "orthonormalize" in params and params["align_threshold"].default is None


def pact_kwargs(orthonormalize: str = "svd", svd: str = "exact") -> dict:
    """Keywords for :func:`pact_jax.pact`: none but the switches once the paper's defaults are in."""
    kw: dict = {} if svd == "exact" else {"svd": "randomized", "key": jax.random.key(0)}
    if paper_defaults():
        return {**kw, **({"orthonormalize": orthonormalize} if orthonormalize != "svd" else {})}
    if orthonormalize != "svd":
        return {}  # not offered by the old pact: skipped
    # The old signature: the same settings written out (cosines >= 1e-4 ~ relative tol, s_max = 1 here).
    return {**kw, "pretrained_rank": K_RATIO, "task_rank": TASK_RANK, "align_threshold": SPAN_TOL,
            "strength": 1.0, "side": "left", "span_tol": SPAN_TOL}


def to_flax(data):
    pre, stacked = {}, {}
    for name, (w0, tau) in data.items():
        block, layer = name.split("/")
        pre.setdefault(block, {})[layer] = {"kernel": jnp.asarray(w0.T)}
        stacked.setdefault(block, {})[layer] = {"kernel": jnp.asarray(tau.transpose(0, 2, 1))}
    return pre, stacked


def from_flax(tree, name, stacked: bool):
    block, layer = name.split("/")
    x = np.asarray(tree[block][layer]["kernel"])
    return x.transpose(0, 2, 1) if stacked else x.T


def jax_merge(pre, stacked, kw):
    filtered = pact_jax.pact(pre, stacked, **kw)
    return jax.block_until_ready((filtered, pact_jax.merges.tsv(filtered)))


def log(msg: str) -> None:
    print(f"[pact_speed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(call, repeats: int) -> dict:
    t0 = time.perf_counter()
    result = call()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = call()
        runs.append(time.perf_counter() - t0)
    steady = statistics.median(runs) if runs else first
    return {"first_s": first, "steady_s": steady, "runs_s": runs, "compile_s": max(0.0, first - steady)}, result


# --------------------------------------------------------------------------
# Comparison


def agreement(data, filt_a, merged_a, filt_b, merged_b) -> dict:
    """Max relative differences of filtered task vectors (per ``||Delta_t||``) and merged deltas."""
    f_err = m_err = 0.0
    for name, (_, tau) in data.items():
        num = np.linalg.norm((filt_a[name] - filt_b[name]).reshape(len(tau), -1), axis=1)
        f_err = max(f_err, float((num / np.linalg.norm(tau.reshape(len(tau), -1), axis=1)).max()))
        ref = max(float(np.linalg.norm(merged_b[name])), 1e-30)
        m_err = max(m_err, float(np.linalg.norm(merged_a[name] - merged_b[name])) / ref)
    return {"filtered": f_err, "merged": m_err}


def energy_removed(tau, filt) -> np.ndarray:
    t = len(tau)
    return (np.linalg.norm((tau - filt).reshape(t, -1), axis=1) / np.linalg.norm(tau.reshape(t, -1), axis=1)) ** 2


def jax_outputs(data, result):
    filtered, merged = result
    return ({n: from_flax(filtered, n, True) for n in data}, {n: from_flax(merged, n, False) for n in data})


def run(width=768, tasks=8, blocks=1, repeats=1, seed=0, qr=True, randomized=True) -> dict:
    import torch

    torch.set_num_threads(TORCH_THREADS)
    torch.linalg.svd(torch.ones(8, 8))  # LAPACK's lazy start-up is not the loop's time
    data = make_block(width, tasks, blocks, seed)
    res: dict = {"width": width, "tasks": tasks, "blocks": blocks, "seed": seed, "rows": {}, "energy": {},
                 "pact_call": "defaults (paper)" if paper_defaults() else f"keywords {pact_kwargs()}"}
    steps = Steps()
    t0 = time.perf_counter()
    t_filt, t_merged = torch_merge(data, steps=steps)
    res["rows"]["torch loop (fix)"] = {"first_s": time.perf_counter() - t0, "steady_s": time.perf_counter() - t0,
                                       "compile_s": 0.0}
    res["torch_steps_s"] = steps.s
    log(f"torch loop (fix): {res['rows']['torch loop (fix)']['steady_s']:.1f} s")
    for name, (_, tau) in data.items():
        d_out, d_in = tau.shape[1:]
        big_k, k = ranks(d_out, d_in)
        res["energy"][name] = {"shape": [d_out, d_in], "K": big_k, "k": k, "protect_dims": big_k + (tasks - 1) * k,
                               "torch": energy_removed(tau, t_filt[name]).tolist()}
    pre, stacked = to_flax(data)
    variants = [("pact_jax exact", "svd", "exact")]
    variants += [("pact_jax randomized", "svd", "randomized")] if randomized else []
    outs = {}
    for label, ortho, svd in variants:
        row, result = timed(lambda: jax_merge(pre, stacked, pact_kwargs(ortho, svd)), repeats)
        outs[label] = jax_outputs(data, result)
        row["vs_torch"] = agreement(data, *outs[label], t_filt, t_merged)
        res["rows"][label] = row
        log(f"{label}: first {row['first_s']:.1f} s, steady {row['steady_s']:.1f} s")
        for name, (_, tau) in data.items():
            res["energy"][name][label] = energy_removed(tau, outs[label][0][name]).tolist()
    if randomized:
        res["rows"]["pact_jax randomized"]["vs_exact"] = agreement(data, *outs["pact_jax randomized"],
                                                                   *outs["pact_jax exact"])
    if qr:  # the release's defect, for comparison (no timing target)
        t0 = time.perf_counter()
        q_filt, q_merged = torch_merge(data, "qr")
        res["rows"]["torch loop (release qr)"] = {"first_s": time.perf_counter() - t0,
                                                  "steady_s": time.perf_counter() - t0, "compile_s": 0.0}
        for name, (_, tau) in data.items():
            res["energy"][name]["torch qr"] = energy_removed(tau, q_filt[name]).tolist()
        if pact_kwargs("qr"):
            row, result = timed(lambda: jax_merge(pre, stacked, pact_kwargs("qr")), repeats)
            filt, merged = jax_outputs(data, result)
            row["vs_torch"] = agreement(data, filt, merged, q_filt, q_merged)
            res["rows"]["pact_jax qr"] = row
            for name, (_, tau) in data.items():
                res["energy"][name]["pact_jax qr"] = energy_removed(tau, filt[name]).tolist()
    return res


# --------------------------------------------------------------------------
# Report


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, load {load:.1f}; "
            f"torch threads {TORCH_THREADS}; jax {jax.__version__} "
            f"(PJRT_NPROC={os.environ.get('PJRT_NPROC')}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')})")


def report(res: dict) -> str:
    torch_s = res["rows"]["torch loop (fix)"]["steady_s"]
    lines = [
        f"# PACT (paper defaults) + TSV-M: pact_jax vs the authors' loop with the fix", "",
        f"{res['date']}; {res['machine']}; torch {res['torch']}.", "",
        f"ViT block shapes at width {res['width']}, {res['blocks']} block(s), T = {res['tasks']}, seed {res['seed']}; "
        f"pact_jax called with {res['pact_call']}. Steady = median of {res['repeats']} call(s) after the first; "
        "torch loops run once. Agreement: max ||filtered - filtered_torch|| / ||Delta_t|| and "
        "||merged - merged_torch|| / ||merged_torch|| (randomized and qr: against their own reference, below).", "",
        "| implementation | first call s | steady s | compile s | torch / impl | filtered diff | merged diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in res["rows"].items():
        agr = r.get("vs_torch", {})
        ratio = torch_s / r["steady_s"] if not label.startswith("torch") else float("nan")
        lines.append(f"| {label} | {r['first_s']:.2f} | {r['steady_s']:.2f} | {r['compile_s']:.2f} | "
                     f"{ratio:.2f} | {agr.get('filtered', float('nan')):.1e} | {agr.get('merged', float('nan')):.1e} |")
    ex = res["rows"].get("pact_jax exact")
    if ex:
        ok = [f"ratio {torch_s / ex['steady_s']:.2f} (target >= {TARGETS['ratio']:g})",
              f"compile {ex['compile_s']:.1f} s (target < {TARGETS['compile_s']:g})",
              f"agreement {max(ex['vs_torch'].values()):.1e} (target <= {TARGETS['agreement']:g})"]
        lines += ["", "Targets (pact_jax exact): " + "; ".join(ok) + "."]
    rnd = res["rows"].get("pact_jax randomized")
    if rnd and "vs_exact" in rnd:
        lines += ["", f"Randomized vs exact pact_jax: filtered diff {rnd['vs_exact']['filtered']:.1e}, merged diff "
                      f"{rnd['vs_exact']['merged']:.1e}; steady {rnd['steady_s']:.2f} s vs {ex['steady_s']:.2f} s."]
    cols = [c for c in ("torch", "pact_jax exact", "pact_jax randomized", "torch qr", "pact_jax qr")
            if any(c in e for e in res["energy"].values())]
    lines += ["", "Energy removed, ||Delta - filtered||^2 / ||Delta||^2: mean over tasks (min-max).", "",
              "| matrix | torch (d_out, d_in) | K | k | K+(T-1)k | " + " | ".join(cols) + " |",
              "|---|---|---:|---:|---:|" + "---:|" * len(cols)]
    for name, e in res["energy"].items():
        cells = [f"{np.mean(e[c]):.1%} ({min(e[c]):.1%}-{max(e[c]):.1%})" if c in e else "" for c in cols]
        lines.append(f"| {name} | {tuple(e['shape'])} | {e['K']} | {e['k']} | {e['protect_dims']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Torch loop (fix) per step, s: "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(res["torch_steps_s"].items())) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=1, help="steady pact_jax calls after the first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-qr", action="store_true", help="skip the release's QR variant")
    ap.add_argument("--no-randomized", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="width 128, T = 3 (seconds; the CI test)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pact_speed"))
    args = ap.parse_args(argv)
    if args.tiny:
        args.width, args.tasks = 128, 3
    import torch

    t0 = time.perf_counter()
    res = run(args.width, args.tasks, args.blocks, args.repeats, args.seed, not args.no_qr, not args.no_randomized)
    res.update(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine(),
               torch=torch.__version__, repeats=args.repeats, wall_s=time.perf_counter() - t0)
    text = report(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pact_speed.md").write_text(text)
    (args.out / "pact_speed.json").write_text(json.dumps(res, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
