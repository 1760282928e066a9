"""CI smoke test of the speed benchmark (``benchmarks/speed.py``), on tiny shapes.

* pact_jax agrees with the plain NumPy loop of :mod:`benchmarks.baselines`
  (and with the PyTorch loop when torch is importable; torch is not a CI
  dependency) for every benchmarked recipe, exact SVD, on a tiny ViT
  (width 32, 2 blocks, T=2) and a tiny T5 (width 32, 1 layer per stack,
  T=3). Tolerances are ``speed.TOL``: TIES 1e-5 (the same thresholds; only
  the order of float32 sums differs), TSV-M / Iso-CTS 5e-3 (float32 SVDs from
  different LAPACKs; Iso-CTS's polar factor of a square concatenation amplifies
  rounding: measured up to 1.4e-3 for both pact_jax and PyTorch against a
  float64 run of the NumPy loop). The error is per leaf,
  ``||x - x_pact_jax||_F / ||x - W0||_F``, over all leaves, those with
  rank-deficient polar factors included (``speed.agreement``).
* The NumPy randomized path is close to the exact one on the generator's
  well-separated spectra.
* ``python -m benchmarks.speed --quick`` runs end to end into a temporary
  directory (markdown, JSON, two PNGs) in under 60 s (the time bound is
  checked only when the load average does not exceed the core count).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` lives at the repository root

from benchmarks import baselines, flops, models, speed  # noqa: E402

CASES = [("vit_tiny", 2), ("t5_tiny", 3)]


def _torch_or_skip():
    torch = pytest.importorskip("torch", reason="torch is not a CI dependency (the 'bench' extra)")
    torch.set_num_threads(1)  # tiny matrices: a thread pool on shared CI cores only adds waiting
    return torch


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-T{t}" for m, t in CASES])
def case(request):
    name, tasks = request.param
    spec = models.SPECS[name]
    pre, fts = models.make_models(spec, tasks, jax.random.key(0))
    return spec, pre, fts


@pytest.mark.parametrize("recipe", list(baselines.RECIPES))
@pytest.mark.parametrize("impl", ["numpy", "torch"])
def test_baseline_agrees_with_pact_jax(case, recipe, impl):
    spec, pre, fts = case
    rec = baselines.RECIPES[recipe]
    average = models.AVERAGE[spec.family]
    conds: dict[str, float] = {}
    if impl == "torch":
        torch = _torch_or_skip()
        got = baselines.merge_torch(
            {k: torch.from_numpy(v) for k, v in pre.items()},
            [{k: torch.from_numpy(v) for k, v in ft.items()} for ft in fts],
            rec,
            average=average,
            conds=conds,
        )
        got = {k: v.numpy() for k, v in got.items()}
    else:
        got = baselines.merge_numpy(pre, fts, rec, average=average, conds=conds)
    merge = speed._pact_jax_merge(spec, rec, "exact")
    ref = models.flatten(merge(models.nest(pre), [models.nest(f) for f in fts], key=jax.random.key(0)))
    agree = speed.agreement(pre, {k: np.asarray(v) for k, v in ref.items()}, got, conds)
    assert agree["max_rel_err"] <= speed.TOL[recipe], f"{recipe}/{impl}: {agree}"
    # Rank-deficient polar factors (PACT removes one subspace from every task) are made
    # unique by dropping null-space triplets, so those leaves must agree as well.
    assert agree["ill_posed_max_rel_err"] <= speed.TOL[recipe], f"{recipe}/{impl}: {agree}"
    assert agree["leaf"] is not None
    if rec.uses_svd:  # the matrix path is checked, not only the averaged / non-matrix leaves
        well_posed = [p for p, c in conds.items() if c >= speed.ILL_POSED]
        assert len(well_posed) >= len(conds) // 2, f"{recipe}: too few well-posed leaves {conds}"
    assert set(got) == set(pre) and all(got[k].shape == pre[k].shape for k in pre)


def test_numpy_randomized_is_close_to_exact():
    spec = models.SPECS["vit_tiny"]
    pre, fts = models.make_models(spec, 2, jax.random.key(1))
    rec = baselines.RECIPES["pact_tsv"]
    path = "params/Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
    w0 = pre[path]
    tau = np.stack([ft[path] - w0 for ft in fts])
    rng = np.random.default_rng(0)
    p = {**rec.pact, "strength": 1.0}  # full removal: the default 0.1 removes too little to test
    exact = baselines.np_pact_subspace(w0, tau, p, "exact", rng)
    approx = baselines.np_pact_subspace(w0, tau, p, "randomized", rng)
    assert np.linalg.norm(exact - approx) <= 1e-3 * np.linalg.norm(tau)
    assert np.linalg.norm(exact - tau) > 1e-2 * np.linalg.norm(tau), "PACT removed nothing: the test is vacuous"


def test_model_shapes_and_rules():
    assert abs(models.num_params(models.SPECS["vit_b32"]) / 1e6 - 87.46) < 0.01
    assert abs(models.num_params(models.SPECS["vit_l14"]) / 1e6 - 303.18) < 0.01
    t5 = models.SPECS["t5_base"]
    shapes = models.param_shapes(t5)
    assert shapes["token_embedder/embedding"] == (32128, 768)
    rules = models.rules_for(t5)
    assert rules.kind("token_embedder/embedding", (32128, 768)) == "average"
    assert rules.matrix_shape("decoder/layers_0/self_attention/out/kernel", (768, 768)) == (768, 768)
    vit = models.SPECS["vit_b32"]
    views = dict((p, (m, n)) for p, m, n in models.matrix_views(vit))
    assert views["params/embedding/kernel"] == (32 * 32 * 3, 768)
    assert views["params/Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"] == (768, 768)
    assert "params/cls" not in views and "params/Transformer/posembed_input/pos_embedding" not in views


def test_flop_model():
    assert flops.svd(10, 4) == 6 * 10 * 16 + 20 * 64
    assert flops.matmul(2, 3, 4) == 48
    spec = models.SPECS["vit_tiny"]
    assert flops.merge_flops(spec, 2, baselines.RECIPES["pact_ties"], "exact") == 0
    exact = flops.merge_flops(spec, 4, baselines.RECIPES["pact_tsv"], "exact")
    assert 0 < flops.merge_flops(spec, 4, baselines.RECIPES["pact_tsv"], "randomized") < exact


def test_quick_run_end_to_end(tmp_path):
    pytest.importorskip("matplotlib", reason="the benchmark's plots need matplotlib (the 'bench' extra)")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "benchmarks.speed", "--quick", "--baselines", "numpy", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "speed.md").read_text()
    assert "| T | vit_tiny[d=2,w=32] | 3 | pact_tsv | exact | numpy |" in report
    assert "MISMATCH" not in report and "FAILED" not in report
    for png in ("speed_scaling_T.png", "speed_scaling_width.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    if os.getloadavg()[0] <= (os.cpu_count() or 1):  # a wall-clock bound means nothing on a saturated machine
        assert seconds < 60, f"--quick took {seconds:.0f} s"


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_component_breakdown_times_every_part(svd):
    rows = speed.component_breakdown(64, 96, 2, baselines.RECIPES["pact_tsv"], svd)
    body = [r for r in rows if r.startswith("| ") and not r.startswith("| part")]
    assert len(body) == 7 and body[-1].startswith("| total")
    assert all(float(r.split("|")[2]) > 0 for r in body)
