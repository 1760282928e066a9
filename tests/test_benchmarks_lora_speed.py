"""benchmarks.lora_speed: the routes agree where they must, and --quick writes its report (CI smoke test)."""

from __future__ import annotations

import sys
from pathlib import Path

import dataclasses
import json

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root
from benchmarks import lora_speed as lsp  # noqa: E402

# K + (T - 1) r = 25 + 4 < 32 input dimensions: PACT does not remove everything.
TINY = dataclasses.replace(lsp.QUICK, layer=(("q_proj", (24, 32)), ("v_proj", (24, 32)), ("down_proj", (32, 40))),
                           tasks=3, rank=2, dense_svd="exact")


def test_groups_count_each_shape_once_unless_every_matrix():
    assert [(n, s) for n, s in TINY.groups()] == [(["q_proj", "v_proj"], (24, 32)), (["down_proj"], (32, 40))]
    assert len(dataclasses.replace(TINY, every_matrix=True).groups()) == 3
    assert [c for _, c in lsp.SpeedConfig().groups()] == [(4096, 4096), (11008, 4096), (4096, 11008)]


def test_routes_agree_with_a_numpy_reference():
    pre, f = lsp.make_inputs(TINY, (24, 32), 0)
    fac = f["m/weight"]
    a, b, s = (np.asarray(x, np.float64) for x in fac)
    want_ta = np.einsum("t,tor,tri->oi", s, b, a)  # sum_t s_t B_t A_t, torch (d_out, d_in)
    for route in ("dense TA", "factor TA"):
        np.testing.assert_allclose(lsp.route_fn(route, TINY)(pre, f), want_ta, rtol=1e-5, atol=1e-7)
    dense_tsv = np.asarray(lsp.route_fn("dense TSV-M", TINY)(pre, f))
    np.testing.assert_allclose(lsp.route_fn("factor TSV-M", TINY)(pre, f), dense_tsv, rtol=1e-4,
                               atol=1e-5 * np.abs(dense_tsv).max())
    # PACT's LoRA variant filters each s B A on the input side only: the merged delta stays in the span of the
    # B's columns, and it differs from dense PACT (another explicit space), which is what the report says.
    variant = np.asarray(lsp.route_fn("PACT LoRA variant + TA", TINY)(pre, f))
    q, _ = np.linalg.qr(np.concatenate(list(b), axis=1))
    np.testing.assert_allclose(q @ (q.T @ variant), variant, atol=1e-6)
    assert 0.05 * np.linalg.norm(want_ta) < np.linalg.norm(variant - want_ta) < np.linalg.norm(want_ta)
    assert np.linalg.norm(variant) > 0.05 * np.linalg.norm(want_ta)


def test_quick_main_writes_report(tmp_path):
    out = tmp_path / "speed.md"
    routes = ["factor TA", "dense TA", "factor TSV-M", "dense TSV-M"]  # PACT's routes: the test above (compiles)
    assert lsp.main(["--quick", "--out", str(out), "--tasks", "2", "--rank", "2", "--routes", *routes,
                     "--matrices", "q_proj", "v_proj", "down_proj"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert list(res["totals"]) == routes and res["complete"]
    assert [r["names"] for r in res["per_shape"]] == [["q_proj", "v_proj"], ["down_proj"]]
    for row in res["per_shape"]:
        assert row["dense_stack_bytes"] == 4 * 2 * row["shape"][0] * row["shape"][1]
        assert row["routes"]["factor TA"]["rel_diff_vs_dense"] < 1e-5
        assert row["routes"]["factor TSV-M"]["rel_diff_vs_dense"] < 1e-3
    md = out.read_text()
    assert "factor TA" in md and "faster" in md and "MiB" in md
