"""mergekit's conventions and configs: pact_jax.merges(convention='mergekit'), pact_jax.mergekit, the CLI.

The references are tests/np_mergekit_reference.py (mergekit 0.1.5's rules in
NumPy) and, for the pact_jax convention, tests/test_merges.py's. A slow test
compares with mergekit itself where its ``mergekit-pytorch`` is installed.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from np_mergekit_reference import mk_dare, mk_keep_count, mk_linear, mk_task_arithmetic, mk_ties
from safetensors.numpy import load_file, save_file

import pact_jax
from pact_jax import cli, io, merges, mergekit, recipes

SHAPES = {"w": (12, 10), "odd": (7,), "b": (10,)}  # "odd": N = 7, density 0.5 -> int 3, round 4


def stacked_tasks(seed: int, n_tasks: int = 3, shapes=SHAPES) -> dict[str, jax.Array]:
    """float32 task vectors sharing a component (signs overlap and conflict, as real ones do)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        common = rng.standard_normal(shape)
        out[name] = jnp.asarray(np.stack([0.5 * common + rng.standard_normal(shape) for _ in range(n_tasks)]),
                                jnp.float32)  # fmt: skip
    return out


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


# ==========================================================================
# 1. The mergers under convention='mergekit' against mergekit's rules


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_mergekit_convention_matches_reference(normalize):
    stacked = stacked_tasks(1)
    weights, densities = (1.0, 0.5, 2.0), (0.5, 0.3, 0.7)
    got = merges.ties(stacked, densities, weights=weights, normalize=normalize, convention="mergekit")
    for name, tau in stacked.items():
        want = mk_ties(f64(tau), weights, densities, normalize=normalize)
        np.testing.assert_allclose(f64(got[name]), want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_ties_conventions_differ_where_mergekit_says():
    # Trim count: N = 7, density 0.5 -> pact_jax keeps round(3.5) = 4, mergekit int(3.5) = 3.
    assert merges.ties_keep_count(7, 0.5) == 4 and merges.ties_keep_count(7, 0.5, "mergekit") == 3
    assert mk_keep_count(7, 0.5) == 3
    tau = jnp.asarray([[5.0, -4.0, 3.0, 2.0, -1.0, 0.5, 0.25]])
    assert int((merges.ties({"x": tau}, 0.5)["x"] != 0).sum()) == 4
    assert int((merges.ties({"x": tau}, 0.5, convention="mergekit")["x"] != 0).sum()) == 3
    # A zero sign sum: pact_jax drops the entry, mergekit counts it positive (task 0 agrees).
    tau = jnp.asarray([[1.0, 2.0], [-1.0, 1.0]])
    np.testing.assert_allclose(np.asarray(merges.ties({"x": tau}, 1.0)["x"]), [0.0, 1.5])
    np.testing.assert_allclose(np.asarray(merges.ties({"x": tau}, 1.0, convention="mergekit")["x"]), [1.0, 1.5])
    np.testing.assert_allclose(mk_ties(f64(tau), (1, 1), (1, 1)), [1.0, 1.5])
    # normalize=False: the agreeing tasks' weighted sum, not their mean.
    np.testing.assert_allclose(np.asarray(merges.ties({"x": tau}, 1.0, normalize=False)["x"]), [0.0, 3.0])


def test_ties_weights_enter_the_election_and_the_divisor():
    # Task 1 outweighs task 0 at entry 0 only when weighted: the elected sign flips.
    tau = jnp.asarray([[3.0, 1.0], [-2.0, 1.0]])
    plain = np.asarray(merges.ties({"x": tau}, 1.0)["x"])
    weighted = np.asarray(merges.ties({"x": tau}, 1.0, weights=[1.0, 2.0])["x"])
    np.testing.assert_allclose(plain, [3.0, 1.0])
    np.testing.assert_allclose(weighted, [-4.0 / 2.0, (1.0 + 2.0) / 3.0])
    np.testing.assert_allclose(weighted, mk_ties(f64(tau), (1.0, 2.0), (1, 1)))


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_and_average_weights_match_reference(normalize):
    stacked = stacked_tasks(2)
    weights = (0.7, -0.2, 1.5)
    ta = merges.task_arithmetic(stacked, weights=weights, normalize=normalize)
    avg = merges.average(stacked, weights=weights)
    for name, tau in stacked.items():
        np.testing.assert_allclose(f64(ta[name]), mk_task_arithmetic(f64(tau), weights, normalize=normalize),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        np.testing.assert_allclose(f64(avg[name]), mk_task_arithmetic(f64(tau), weights, normalize=True),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    # No weights: the old results, bit for bit.
    plain = jax.tree.map(lambda x: x.sum(0), stacked)
    chex.assert_trees_all_equal(merges.task_arithmetic(stacked, weights=None), plain)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("consensus", [True, False])
def test_dare_mergekit_convention_matches_reference_given_its_mask(rescale, consensus):
    stacked = stacked_tasks(3)
    keep = (0.6, 0.3, 1.0)  # mergekit's density per model: DARE's keep probability
    p = tuple(1.0 - d for d in keep)
    dropped = merges.dare(jax.random.key(5), stacked, p, rescale="l1" if rescale else "none")
    weights = (1.0, 0.5, 2.0)
    if consensus:
        got = merges.ties(dropped, 1.0, weights=weights, normalize=False, convention="mergekit")
    else:
        got = merges.task_arithmetic(dropped, weights=weights)
    for name, tau in stacked.items():
        masks = f64(dropped[name]) != 0  # the task vectors have no exact zeros
        assert masks[2].all()  # keep probability 1 keeps everything
        want = mk_dare(f64(tau), masks, weights, consensus=consensus, rescale=rescale)
        np.testing.assert_allclose(f64(got[name]), want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_dare_l1_rescale_restores_each_tasks_l1_norm_and_is_the_mergekit_default():
    stacked = stacked_tasks(4, shapes={"w": (40, 30)})
    out = merges.dare(jax.random.key(0), stacked, (0.5, 0.8, 0.2), convention="mergekit")
    tau, got = f64(stacked["w"]), f64(out["w"])
    np.testing.assert_allclose(np.abs(got).sum((1, 2)), np.abs(tau).sum((1, 2)), rtol=1e-5)
    kept = (got != 0).mean((1, 2))
    np.testing.assert_allclose(kept, [0.5, 0.2, 0.8], atol=0.05)  # per-task drop rates (N = 1200)
    same_key = merges.dare(jax.random.key(0), stacked, (0.5, 0.8, 0.2), rescale="l1")
    chex.assert_trees_all_equal(out, same_key)
    inverse = f64(merges.dare(jax.random.key(0), stacked, (0.5, 0.8, 0.2))["w"])  # pact_jax: 1 / (1 - p)
    np.testing.assert_allclose(inverse[0][got[0] != 0], 2.0 * tau[0][got[0] != 0], rtol=1e-6)


def test_weighted_mergekit_kernels_jit_and_bucket():
    stacked = {"a": stacked_tasks(6)["w"], "b": stacked_tasks(7)["w"], "odd": stacked_tasks(6)["odd"]}
    fn = functools.partial(merges.ties, density=(0.5, 0.3, 0.7), weights=(1.0, 0.5, 2.0), convention="mergekit")
    eager = fn(stacked)
    chex.assert_trees_all_close(jax.jit(fn)(stacked), eager, rtol=1e-6, atol=1e-7)
    for name in stacked:  # "a" and "b" share a bucket (one vmapped call): each equals its merge alone
        chex.assert_trees_all_close(fn({name: stacked[name]})[name], eager[name], rtol=1e-6, atol=1e-7)
    dare = functools.partial(merges.dare, p=(0.5, 0.1, 0.0), convention="mergekit")
    chex.assert_trees_all_close(jax.jit(dare)(jax.random.key(1), stacked), dare(jax.random.key(1), stacked),
                                rtol=1e-6, atol=1e-7)  # fmt: skip


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda st: merges.ties(st, 0.5, weights=[1.0, 2.0]), "weights has 2 entries, but there are 3"),
        (lambda st: merges.ties(st, (0.5, 0.2)), "density has 2 entries"),
        (lambda st: merges.ties(st, 0.5, weights=[1.0, float("nan"), 1.0]), "finite"),
        (lambda st: merges.ties(st, 0.5, weights="1 2 3"), "sequence of numbers"),
        (lambda st: merges.ties(st, 0.5, convention="torch"), "convention must be"),
        (lambda st: merges.ties(st, 0.5, normalize="yes"), "normalize must be"),
        (lambda st: merges.average(st, weights=[1.0, -1.0, 0.0]), "sum to 0"),
        (lambda st: merges.task_arithmetic(st, weights=[1.0, -1.0, 0.0], normalize=True), "sum to 0"),
        (lambda st: merges.dare(jax.random.key(0), st, 0.5, rescale="l2"), "rescale must be"),
    ],
)
def test_bad_weights_and_conventions_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(stacked_tasks(8, shapes={"w": (4, 3)}))


# ==========================================================================
# 2. Translation of mergekit configs


def config(method, **extra):
    cfg = {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": "b", "parameters": {"weight": 0.5, "density": 0.3}}],  # fmt: skip
    }
    cfg.update(extra)
    return cfg


def test_translate_each_method():
    ties = mergekit.translate(config("ties"))
    assert (ties.method, ties.pretrained, ties.finetuned, ties.weights, ties.alpha) == ("ties", "base", ("a", "b"),
                                                                                       (1.0, 0.5), 1.0)  # fmt: skip
    assert ties.method_kwargs == {"normalize": True, "density": (0.5, 0.3), "convention": "mergekit"}
    dt = mergekit.translate(config("dare_ties", parameters={"lambda": 0.8}))
    assert dt.method == "dare_ties" and dt.alpha == 0.8
    assert dt.method_kwargs == {"normalize": False, "p": (0.5, 0.7), "rescale": "l1", "density": 1.0,
                                "convention": "mergekit"}  # fmt: skip
    dl = mergekit.translate(config("dare_linear", parameters={"rescale": False, "normalize": True}))
    assert dl.method == "dare_task_arithmetic" and dl.method_kwargs == {"normalize": True, "p": (0.5, 0.7),
                                                                        "rescale": "none"}  # fmt: skip
    ta = mergekit.translate(config("task_arithmetic", parameters={"int8_mask": True}, dtype="bfloat16"))
    assert ta.method == "task_arithmetic" and ta.method_kwargs == {"normalize": False}
    assert ta.output_dtype == "bfloat16" and any("int8_mask" in n for n in ta.notes)
    assert any("density has no effect" in n for n in ta.notes)
    # The base listed among the models (as mergekit configs often do) is the base, not a task.
    listed = config("ties", parameters={"weight": 0.25, "density": 0.9})
    listed["models"] = [{"model": "base"}, {"model": "a"}, {"model": "b", "parameters": {"weight": 2.0}}]
    plan = mergekit.translate(listed)
    assert plan.finetuned == ("a", "b") and plan.weights == (0.25, 2.0)
    assert plan.method_kwargs["density"] == 0.9  # the top-level default for both


def test_translate_linear_is_task_arithmetic_with_weights_over_the_total():
    cfg = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                                {"model": "b", "parameters": {"weight": 3.0}}]}  # fmt: skip
    plan = mergekit.translate(cfg)  # no base_model: the first model is the base, its task vector 0
    assert (plan.method, plan.pretrained, plan.finetuned, plan.weights, plan.alpha) == (
        "task_arithmetic", "a", ("b",), (0.75,), 1.0)  # fmt: skip
    with_base = mergekit.translate({**cfg, "base_model": "base", "parameters": {"weight": 4.0}})
    assert with_base.pretrained == "base" and with_base.finetuned == ("a", "b")
    assert with_base.weights == (1.0 / 8.0, 3.0 / 8.0)  # the base is an input of weight 4 (top-level weight)
    with pytest.raises(ValueError, match="base_model.*no weight|model 'base' has no weight"):
        mergekit.translate({**cfg, "base_model": "base"})
    with pytest.raises(ValueError, match="normalize: false and weights summing to 4"):
        mergekit.translate({**cfg, "parameters": {"normalize": False}})


@pytest.mark.parametrize(
    "cfg,match",
    [
        (config("slerp"), "merge_method 'slerp' is not supported"),
        (config("della"), "merge_method 'della' is not supported"),
        (config("ties", slices=[]), "key 'slices' is not supported"),
        (config("ties", tokenizer_source="union"), "key 'tokenizer_source' is not supported"),
        (config("ties", output="x"), "unknown key 'output'"),
        (config("ties", parameters={"epsilon": 0.1}), "'epsilon' is not a parameter of mergekit's ties"),
        (config("ties", parameters={"density": [0.2, 0.8]}), "gradients and filtered values"),
        (config("ties", parameters={"normalize": 1}), "normalize must be true or false"),
        (config("ties", parameters={"rescale": True}), "rescale: true with ties"),
        (config("ties", dtype="int8"), "dtype: 'int8' is not one of"),
        (config("ties", base_model=None), "merge_method ties needs base_model"),
        (config("linear", parameters={"lambda": 2.0}), "'lambda' is not a parameter of mergekit's linear"),
        ({"models": [{"model": "a"}]}, "merge_method: is missing"),
        ({**config("ties"), "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "c"}]},
         "model 'c' has no weight"),  # fmt: skip
        ({**config("ties"), "models": [{"model": "a", "parameters": {"weight": 1, "normalize": True}}]},
         "'normalize' is a parameter of the whole merge"),  # fmt: skip
        ({**config("ties"), "models": [{"model": "a", "weight": 1}]}, r"key\(s\) \['weight'\] not supported"),
        ({**config("ties"), "models": [{"model": "a", "parameters": {"weight": 1}}] * 2}, "listed twice"),
        ({**config("ties"), "models": [{"model": "a", "parameters": {"weight": 1, "density": 0}}]}, "keeps nothing"),
    ],
)
def test_translate_refuses_what_it_cannot_honour_by_name(cfg, match):
    with pytest.raises(ValueError, match=match):
        mergekit.translate(cfg, where="cfg.yml")


def test_detection():
    assert mergekit.is_mergekit_config({"merge_method": "ties"}) and mergekit.is_mergekit_config({"models": []})
    assert not mergekit.is_mergekit_config({"method": "ties", "finetuned": ["a"]})


# ==========================================================================
# 3. Whole models: the plan's merge against mergekit's numbers


def model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layer.0.weight": rng.standard_normal((12, 10)).astype(np.float32),
            "layer.0.bias": rng.standard_normal(12).astype(np.float32),
            "norm.weight": rng.standard_normal(7).astype(np.float32)}  # fmt: skip


@pytest.fixture(scope="module")
def models():
    base = model(0)
    rng = np.random.default_rng(1)
    shared = {k: rng.standard_normal(v.shape) for k, v in base.items()}
    tasks = [{k: (v + 0.1 * (0.5 * shared[k] + rng.standard_normal(v.shape))).astype(np.float32)
              for k, v in base.items()} for _ in range(3)]  # fmt: skip
    return base, tasks


def reference(method: str, base, tasks, weights, densities, params, masks=None):
    """mergekit's merged model, tensor by tensor (np_mergekit_reference)."""
    out = {}
    lam = params.get("lambda", 1.0)
    for name, b in base.items():
        deltas = np.stack([f64(t[name]) - f64(b) for t in tasks])
        if method == "ties":
            mixed = mk_ties(deltas, weights, densities, normalize=params.get("normalize", True), lam=lam)
        elif method == "task_arithmetic":
            mixed = mk_task_arithmetic(deltas, weights, normalize=params.get("normalize", False), lam=lam)
        elif method in ("dare_ties", "dare_linear"):
            mixed = mk_dare(deltas, masks[name], weights, consensus=method == "dare_ties", lam=lam,
                            normalize=params.get("normalize", False), rescale=params.get("rescale", True))
        out[name] = f64(b) + mixed
    return out


def plan_for(method, weights, densities, params=None, base="base"):
    cfg = {"merge_method": method, "base_model": base, "parameters": params or {},
           "models": [{"model": f"t{i}", "parameters": {"weight": w, "density": d}}
                      for i, (w, d) in enumerate(zip(weights, densities))]}  # fmt: skip
    return mergekit.translate(cfg)


def as_flat(tree) -> dict[str, np.ndarray]:
    return {k: f64(v) for k, v in tree.items()}


@pytest.mark.parametrize(
    "method,params",
    [("ties", {}), ("ties", {"normalize": False, "lambda": 0.7}), ("task_arithmetic", {"lambda": 0.5}),
     ("task_arithmetic", {"normalize": True}), ("dare_ties", {}), ("dare_linear", {"rescale": False})],
)  # fmt: skip
def test_plan_merge_matches_mergekit_reference(models, method, params):
    base, tasks = models
    weights, densities = (1.0, 0.6, 1.4), (0.5, 0.3, 0.8)
    plan = plan_for(method, weights, densities, params)
    key = jax.random.key(3)
    got = as_flat(plan.make_merge()(base, tasks, key=key))
    masks = None
    if method.startswith("dare"):  # the chain's DARE step draws with the first of split(key, 2)
        tau = pact_jax.task_vectors(base, tasks)
        dropped = merges.dare(jax.random.split(key, 2)[0], tau, plan.method_kwargs["p"],
                              rescale=plan.method_kwargs["rescale"])  # fmt: skip
        masks = {k: f64(v) != 0 for k, v in dropped.items()}
    want = reference(method, base, tasks, weights, densities, params, masks)
    for name in base:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_plan_linear_matches_mergekit_reference(models):
    base, tasks = models
    cfg = {"merge_method": "linear", "models": [{"model": f"t{i}", "parameters": {"weight": w}}
                                                for i, w in enumerate((1.0, 2.0, 0.5))]}  # fmt: skip
    plan = mergekit.translate(cfg)
    got = as_flat(plan.make_merge()(tasks[0], tasks[1:]))
    for name in base:
        want = mk_linear([f64(t[name]) for t in tasks], (1.0, 2.0, 0.5))
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


# ==========================================================================
# 4. The command line: pact-jax merge CONFIG OUT


def write_models(tmp_path, base, tasks) -> list[str]:
    paths = []
    for name, params in [("base", base)] + [(f"t{i}", t) for i, t in enumerate(tasks)]:
        path = tmp_path / f"{name}.safetensors"
        save_file(params, str(path), metadata={"format": "pt"})
        paths.append(str(path))
    return paths


def test_cli_merges_a_mergekit_config_into_the_positional_output(tmp_path, capsys, models):
    base, tasks = models
    paths = write_models(tmp_path, base, tasks)
    cfg = {"merge_method": "ties", "base_model": paths[0], "dtype": "float32",
           "parameters": {"normalize": False, "lambda": 0.9, "int8_mask": True},
           "models": [{"model": paths[0]}] + [{"model": p, "parameters": {"weight": w, "density": 0.4}}
                                                for p, w in zip(paths[1:], (1.0, 0.6, 1.4))]}  # fmt: skip
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "merged.safetensors"
    code = cli.main(["merge", str(tmp_path / "ties.yml"), str(out), "--no-progress"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert "mergekit ties as ties" in printed and "alpha 0.9" in printed and "note: int8_mask" in err
    got = load_file(str(out))
    want = reference("ties", base, tasks, (1.0, 0.6, 1.4), (0.4,) * 3, cfg["parameters"])
    for name in base:
        np.testing.assert_allclose(f64(got[name]), want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # --weights overrides the config's per-model weights; out_dtype writes bfloat16.
    cfg["out_dtype"] = "bfloat16"
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(cfg))
    code = cli.main(["merge", str(tmp_path / "ties.yml"), str(tmp_path / "bf16.safetensors"), "--no-progress",
                     "--weights", "1", "1", "1"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    got = io.flatten(io.load(tmp_path / "bf16.safetensors"))
    want = reference("ties", base, tasks, (1.0, 1.0, 1.0), (0.4,) * 3, cfg["parameters"])
    for name in base:
        leaf = got[name.replace(".", "/")] if name.replace(".", "/") in got else got[name]
        assert leaf.dtype == jnp.bfloat16
        np.testing.assert_allclose(f64(leaf), want[name], rtol=1e-2, atol=1e-2, err_msg=name)


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "a"}]},
         "merge_method 'slerp' is not supported"),  # fmt: skip
        ({"merge_method": "ties", "models": [{"model": "a"}], "slices": []}, "key 'slices' is not supported"),
    ],
)
def test_cli_refuses_an_unsupported_mergekit_config_with_exit_2(tmp_path, capsys, cfg, message):
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    code = cli.main(["merge", str(tmp_path / "c.yml"), str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_weights_with_our_own_flags_equal_the_api(tmp_path, capsys, models):
    base, tasks = models
    paths = write_models(tmp_path, base, tasks)
    out = tmp_path / "out.safetensors"
    code = cli.main(["merge", "--pretrained", paths[0], "--finetuned", *paths[1:], "--output", str(out),
                     "--method", "ties", "--weights", "1", "0.5", "2", "--method-arg", "density=0.4",
                     "--method-arg", "normalize=false", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    want = recipes.make_merge("ties", method_kwargs={"density": 0.4, "weights": (1.0, 0.5, 2.0), "normalize": False})
    want = as_flat(io.flatten(want(base, tasks)))
    got = load_file(str(out))
    for name in base:
        np.testing.assert_allclose(f64(got[name]), want[name], rtol=1e-6, atol=1e-6)
    code = cli.main(["merge", "--pretrained", paths[0], "--finetuned", *paths[1:], "--output", str(out),
                     "--method", "tsv", "--weights", "1", "1", "1"])  # fmt: skip
    assert code == 2 and "tsv takes no per-model weights" in capsys.readouterr().err
    code = cli.main(["merge", "--pretrained", paths[0], "--finetuned", *paths[1:], "--output", str(out),
                     "--method", "ties", "--weights", "1", "1"])  # fmt: skip
    assert code == 2 and "2 numbers for 3 fine-tuned" in capsys.readouterr().err


# ==========================================================================
# 5. Against mergekit itself (slow; needs mergekit's mergekit-pytorch, e.g. MERGEKIT_PYTORCH=/path/to/it)


MERGEKIT = os.environ.get("MERGEKIT_PYTORCH") or shutil.which("mergekit-pytorch")


@pytest.mark.slow
@pytest.mark.skipif(MERGEKIT is None, reason="mergekit-pytorch (mergekit 0.1.5) is not installed")
@pytest.mark.parametrize(
    "method,params",
    [("linear", {}), ("task_arithmetic", {"lambda": 0.8}), ("ties", {}), ("ties", {"normalize": False}),
     ("dare_ties", {"density_one": True}), ("dare_linear", {"density_one": True})],
)  # fmt: skip
def test_against_mergekit_itself(tmp_path, capsys, models, method, params):
    """Random float32 models, mergekit-pytorch CONFIG OUT vs pact-jax merge CONFIG OUT: the max difference.
    DARE draws its own masks in each, so the DARE methods run at density 1 (no drop)."""
    base, tasks = models
    paths = write_models(tmp_path, base, tasks)
    params = dict(params)
    density = 1.0 if params.pop("density_one", False) else 0.4
    cfg = {"merge_method": method, "parameters": params,
           "models": [{"model": p, "parameters": {"weight": w, "density": density}}
                      for p, w in zip(paths[1:], (1.0, 0.6, 1.4))]}  # fmt: skip
    if method == "linear":
        cfg["models"] = [{"model": paths[0], "parameters": {"weight": 0.5}}] + [
            {"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in cfg["models"]]
    cfg["base_model"] = paths[0]
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    subprocess.run([MERGEKIT, str(tmp_path / "c.yml"), str(tmp_path / "mk")], check=True, capture_output=True)
    assert cli.main(["merge", str(tmp_path / "c.yml"), str(tmp_path / "ours.safetensors"), "--no-progress"]) == 0
    mk = {}
    for f in (tmp_path / "mk").glob("*.safetensors"):
        mk.update(load_file(str(f)))
    ours = load_file(str(tmp_path / "ours.safetensors"))
    worst = 0.0
    for name in base:
        update = np.abs(f64(mk[name]) - f64(base[name])).max()
        diff = np.abs(f64(ours[name]) - f64(mk[name])).max()
        worst = max(worst, diff / max(update, 1e-12))
    print(f"{method} {params}: max |ours - mergekit| / max |update| = {worst:.2e}")
    assert worst < 1e-5
