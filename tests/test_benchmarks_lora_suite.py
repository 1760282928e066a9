"""benchmarks.lora_suite: the LoRA pieces against NumPy, and the --tiny run end to end (the CI test)."""

from __future__ import annotations

import sys
from pathlib import Path

import json

import jax
import numpy as np
import pytest

pytest.importorskip("optax")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repository root
from benchmarks import lora_suite as ls  # noqa: E402
from benchmarks import minilm_suite as ms  # noqa: E402


def _layers(rng, d=6, mlp=10):
    dense = lambda i, o: {"kernel": rng.normal(size=(i, o)).astype(np.float32),  # noqa: E731
                          "bias": rng.normal(size=(o,)).astype(np.float32)}
    return {"layer_1": {"query": dense(d, d), "value": dense(d, d), "key": dense(d, d), "mlp_in": dense(d, mlp)}}


def test_init_is_pefts_and_adapted_kernel_is_w_plus_s_ba_transposed():
    rng = np.random.default_rng(0)
    layers = _layers(rng)
    ad = ls.init_adapter(jax.random.key(0), layers, ("query", "value"), 3)
    q = ad["layer_1"]["query"]
    assert q["a"].shape == (3, 6) and q["b"].shape == (6, 3)
    assert np.all(np.asarray(q["b"]) == 0) and np.all(np.abs(np.asarray(q["a"])) <= 1 / np.sqrt(6))
    assert not np.allclose(q["a"], ad["layer_1"]["value"]["a"])  # one fresh A per module
    ad = jax.tree_util.tree_map(lambda x: np.asarray(rng.normal(size=x.shape), np.float32), ad)
    out = ls.adapted(layers, ad, 2.0)
    for t in ("query", "value"):
        f = ad["layer_1"][t]
        want = layers["layer_1"][t]["kernel"] + 2.0 * (f["b"] @ f["a"]).T  # torch delta (out, in), Flax kernel (in, out)
        np.testing.assert_allclose(out["layer_1"][t]["kernel"], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out["layer_1"][t]["bias"], layers["layer_1"][t]["bias"])
    for t in ("key", "mlp_in"):
        np.testing.assert_array_equal(out["layer_1"][t]["kernel"], layers["layer_1"][t]["kernel"])


def test_rules_freeze_everything_but_the_adapted_kernels():
    paths = ["params/layer_1/query/kernel", "params/layer_1/value/kernel"]
    rules = ls.lora_rules(paths)
    assert rules.kind("params/layer_1/query/kernel", (6, 6)) == "matrix"
    for other in ("params/layer_1/key/kernel", "params/layer_1/query/bias", "params/layer_0/query/kernel",
                  "params/layer_1/query/kernel_x"):
        assert rules.kind(other, (6, 6)) == "freeze", other


def test_peft_round_trip_gives_the_evaluators_task_vectors_and_row_spaces(tmp_path):
    """The adapters go through save_adapter / load_adapter; the task vectors the evaluator builds from them
    (the library's group_task_vectors) are s B A (Flax orientation) at the adapted kernels and zero
    elsewhere, PACT's spaces the row spaces of A."""
    from pact_jax import io

    rng = np.random.default_rng(1)
    layers = _layers(rng)
    pre = {"params": layers}
    io.save(tmp_path / "base", pre)
    lcfg = ls.LoraConfig(rank=2, targets=("query", "value"))
    ads = [jax.tree_util.tree_map(lambda x: np.asarray(rng.normal(size=x.shape), np.float32),
                                  ls.init_adapter(jax.random.key(t), layers, lcfg.targets, 2)) for t in range(3)]
    factors = ls.export_and_load(tmp_path / "peft", tmp_path / "base", ["a", "b", "c"], ads, lcfg)
    cfg = json.loads((tmp_path / "peft" / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and cfg["target_modules"] == ["layer_1.query", "layer_1.value"]
    rules = ls.lora_rules(["params/layer_1/query/kernel", "params/layer_1/value/kernel"])
    from pact_jax.io.base import flatten
    from pact_jax.io.lora_merge import group_task_vectors

    flat, spaces = group_task_vectors([f.bound for f in factors], flatten(pre), rules=rules)
    for t, ad in enumerate(ads):
        for mod in ("query", "value"):
            f = ad["layer_1"][mod]
            np.testing.assert_allclose(flat[f"params/layer_1/{mod}/kernel"][t], lcfg.scale * (f["b"] @ f["a"]).T,
                                       rtol=1e-5, atol=1e-5)
            v = np.asarray(spaces[f"params/layer_1/{mod}/kernel"][t])  # (d_in, r): orthonormal basis of rows of A
            np.testing.assert_allclose(v.T @ v, np.eye(2), atol=1e-5)
            np.testing.assert_allclose(v @ v.T @ f["a"].T, f["a"].T, atol=1e-5)
    assert not np.any(flat["params/layer_1/key/kernel"]) and not np.any(flat["params/layer_1/query/bias"])


def test_tiny_run_end_to_end(tmp_path):
    """The CI run: a tiny random MiniLM, stand-in texts, two ranks; PEFT folders written and merged."""
    out = tmp_path / "r.md"
    assert ls.main(["--tiny", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert list(res["ranks"]) == ["2", "4"]
    for rank, r in res["ranks"].items():
        seeds = r["per_T"]["3"]
        assert set(seeds) == {"0"}
        methods = seeds["0"]["methods"]
        assert set(methods) == set(ls.suite_config("tiny").methods)
        for m, by in methods.items():
            assert set(by) == {"none", "pact_lora"}
            assert by["none"]["energy_removed"] is None and 0.0 <= by["pact_lora"]["energy_removed"] <= 1.0 + 1e-5
            assert len(by["none"]["per_task"]) == 3
        # factor-aware mergers equal the dense recipes on the same adapters
        assert all(v < 1e-4 for a in r["factor_vs_dense_rel_diff"].values() for v in a.values())
    assert len(list((tmp_path / "cache").glob("lora-*/seed0/peft/*/adapter_config.json"))) == 6
    md = out.read_text()
    assert "# Rank 2" in md and "# Rank 4" in md and "PACT LoRA variant" in md
    # runs on other seeds (e.g. side by side) combine into one report; a seed in two runs is refused
    other = json.loads(json.dumps(res))
    for r in other["ranks"].values():
        r["per_T"]["3"] = {"1": r["per_T"]["3"]["0"]}
        r["build"] = {"1": r["build"]["0"]}
    (tmp_path / "o.json").write_text(json.dumps(other))
    assert ls.main(["--combine", str(out.with_suffix(".json")), str(tmp_path / "o.json"),
                    "--out", str(tmp_path / "c.md")]) == 0
    both = json.loads((tmp_path / "c.json").read_text())
    assert all(r["config"]["seeds"] == [0, 1] and list(r["per_T"]["3"]) == ["0", "1"] for r in both["ranks"].values())
    assert "± 0.0" in (tmp_path / "c.md").read_text()  # two (identical) seeds: a spread is shown
    with pytest.raises(ValueError, match="seeds"):
        ls.combine([res, res])


def test_config_from_args():
    args = ls.build_parser().parse_args(["--ranks", "8", "16", "--seeds", "0", "1", "--seeds-later-ranks", "0",
                                         "--targets", "query", "value", "mlp_in", "--points", "5"])
    cfg = ls.config_from_args(args)
    assert cfg.ranks == (8, 16) and cfg.seeds_for(8) == (0, 1) and cfg.seeds_for(16) == (0,)
    assert cfg.lora_for(16).rank == 16 and cfg.lora_for(16).scale == 2.0 and cfg.lora.targets[-1] == "mlp_in"
    assert cfg.suite.alpha.points == 5 and cfg.suite.zoo.tasks == ms.TASK_SETS["real"]
    with pytest.raises(ValueError):
        ls.LoraConfig(targets=("nope",))
