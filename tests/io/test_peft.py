"""PEFT LoRA adapters: reading, binding to a base, writing, merging on disk (pact_jax.io.peft, io.lora_merge).

The adapter folders are written here as PEFT writes them (``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` keys, ``adapter_config.json``), without peft; a slow
test checks against peft itself where it is installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import pact_jax
from pact_jax import io, lora, recipes
from pact_jax.io import lora_merge, peft, streaming
from pact_jax.io.base import CheckpointError
from pact_jax.tree import PactInputError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from np_pact_reference import np_lora_merge  # noqa: E402

D, H, V = 12, 20, 16  # hidden, mlp, vocab
LINEAR = {"model.layers.0.self_attn.q_proj": (D, D), "model.layers.0.mlp.up_proj": (H, D),
          "model.layers.0.mlp.down_proj": (D, H), "model.layers.1.self_attn.q_proj": (D, D),
          "model.layers.1.mlp.up_proj": (H, D)}  # name: (d_out, d_in)  # fmt: skip


def base_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny HF-named torch-layout model: ``{dotted key: array}``."""
    rng = np.random.default_rng(seed)
    w = {f"{m}.weight": rng.normal(size=s).astype(np.float32) for m, s in LINEAR.items()}
    w.update({f"{m}.bias": rng.normal(size=s[:1]).astype(np.float32) for m, s in LINEAR.items()})
    w["model.embed_tokens.weight"] = rng.normal(size=(V, D)).astype(np.float32)
    w["model.norm.weight"] = np.ones(D, np.float32)
    w["lm_head.weight"] = rng.normal(size=(V, D)).astype(np.float32)
    return w


def write_torch_base(path: Path, weights: dict[str, np.ndarray]) -> Path:
    save_file(weights, str(path), metadata={"format": "pt"})
    return path


def flax_flat(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same model in Flax names and layout: ``params/<module>/kernel (in, out)``, ``.../embedding``."""
    flat = {}
    for k, v in weights.items():
        module, _, param = k.rpartition(".")
        name = "kernel" if param == "weight" and module in LINEAR else ("embedding" if "embed" in module else param)
        flat["params/" + module.replace(".", "/") + "/" + name] = v.T if name == "kernel" else v
    return flat


def write_flax_base(path: Path, weights: dict[str, np.ndarray]) -> Path:
    io.save(path, io.unflatten(flax_flat(weights)))
    return path


def write_adapter(folder: Path, modules: dict[str, tuple[np.ndarray, np.ndarray]], *, r: int, alpha: float,
                  extra: dict[str, np.ndarray] | None = None, **config) -> Path:
    """A PEFT adapter folder as ``save_pretrained`` writes it; ``modules``: name -> (A (r, in), B (out, r))."""
    folder.mkdir(parents=True)
    tensors = {}
    for name, (a, b) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
    tensors.update(extra or {})
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
           "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
           "base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM", **config}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def random_modules(names, r, seed):
    rng = np.random.default_rng(seed)
    return {n: (rng.normal(size=(r, LINEAR[n][1])), rng.normal(size=(LINEAR[n][0], r))) for n in names}


@pytest.fixture
def two_adapters(tmp_path):
    """Two adapters of different ranks on overlapping module subsets."""
    m0 = random_modules(["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"], 4, 1)
    m1 = random_modules(["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                         "model.layers.0.mlp.down_proj"], 2, 2)  # fmt: skip
    a0 = write_adapter(tmp_path / "ad0", m0, r=4, alpha=8)
    a1 = write_adapter(tmp_path / "ad1", m1, r=2, alpha=2, use_rslora=True)
    return (a0, m0, 8 / 4), (a1, m1, 2 / np.sqrt(2))


def reference(weights, adapters, alpha, *, flax=False):
    """``{module: W0 + alpha sum_t s_t B_t A_t}`` in the stored orientation."""
    out = {}
    for module in LINEAR:
        facs = [(a, b, s) for _, mods, s in adapters for n, (a, b) in mods.items() if n == module]
        w0 = weights[f"{module}.weight"]
        out[module] = np_lora_merge(w0.T if flax else w0, facs, alpha, transposed=flax)
    return out


def test_read_adapter_scales_and_patterns(tmp_path):
    mods = random_modules(["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"], 4, 0)
    mods["model.layers.0.mlp.up_proj"] = tuple(x[:2] if i == 0 else x[:, :2] for i, x in enumerate(mods["model.layers.0.mlp.up_proj"]))
    folder = write_adapter(tmp_path / "ad", mods, r=4, alpha=16, rank_pattern={"up_proj": 2},
                           alpha_pattern={"layers\\.0\\.mlp\\.up_proj": 3})  # fmt: skip
    ad = peft.read_adapter(folder)
    assert ad.modules["model.layers.0.self_attn.q_proj"].factors.scale == 16 / 4
    assert ad.modules["model.layers.0.mlp.up_proj"].factors.scale == 3 / 2
    assert peft.pattern_value({"q_proj": 1}, "model.layers.0.self_attn.q_proj", 9) == 1
    assert peft.pattern_value({"proj": 1}, "model.layers.0.self_attn.q_proj", 9) == 9  # whole components only


@pytest.mark.parametrize("flax", [False, True], ids=["torch-safetensors", "flax-msgpack"])
def test_adapters_merge_into_their_base_like_numpy(tmp_path, two_adapters, flax):
    weights = base_weights()
    base = (write_flax_base(tmp_path / "base.msgpack", weights) if flax
            else write_torch_base(tmp_path / "base.safetensors", weights))  # fmt: skip
    out = tmp_path / ("out.msgpack" if flax else "out.safetensors")
    merge = recipes.make_merge("task_arithmetic", alpha=0.7)
    report = streaming.merge_checkpoints(base, [p for p, _, _ in two_adapters], out, merge)
    merged = io.flatten(io.load(out))
    want = reference(weights, two_adapters, 0.7, flax=flax)
    for module, w in want.items():
        key = ("params/" + module.replace(".", "/") + "/kernel") if flax else module.replace(".", "/") + "/weight"
        np.testing.assert_allclose(merged[key], w, rtol=1e-5, atol=1e-5)
    # Untouched leaves are copied bit for bit (and not merged).
    pre = flax_flat(weights) if flax else {k.replace(".", "/"): v for k, v in weights.items()}
    adapted = {m for _, mods, _ in two_adapters for m in mods}
    untouched = [k for k in pre if not any(k.endswith(m.replace(".", "/") + ("/kernel" if flax else "/weight"))
                                           for m in adapted)]  # fmt: skip
    assert len(untouched) == len(pre) - 4
    for k in untouched:
        assert np.array_equal(merged[k], pre[k]), k
    assert set(report.copied) == set(untouched)


def test_flax_base_gets_transposed_update(tmp_path, two_adapters):
    weights = base_weights()
    base = write_flax_base(tmp_path / "base.msgpack", weights)
    factors = peft.load_adapter(two_adapters[0][0], base)
    path = "params/model/layers/0/mlp/up_proj/kernel"
    assert factors.layouts[path] == "flax"
    a, b = two_adapters[0][1]["model.layers.0.mlp.up_proj"]
    np.testing.assert_allclose(lora.dense_delta(factors[path], layout="flax"), 2.0 * (b @ a).T, rtol=1e-5)


def test_budget_gives_the_same_merge(tmp_path, two_adapters):
    weights = base_weights()
    base = write_torch_base(tmp_path / "base.safetensors", weights)
    merge = recipes.make_merge("average", alpha=1.0)
    ads = [p for p, _, _ in two_adapters]
    streaming.merge_checkpoints(base, ads, tmp_path / "a.safetensors", merge)
    report = streaming.merge_checkpoints(base, ads, tmp_path / "b.safetensors", merge, budget_bytes=8 * 1024)
    assert report.num_groups > 1
    a, b = io.flatten(io.load(tmp_path / "a.safetensors")), io.flatten(io.load(tmp_path / "b.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "tsv"])
def test_factor_aware_mergers_on_disk_equal_the_dense_path(tmp_path, two_adapters, monkeypatch, method):
    base = write_torch_base(tmp_path / "base.safetensors", base_weights())
    ads = [p for p, _, _ in two_adapters]
    merge = recipes.make_merge(method, alpha=0.8)
    calls = []
    factor_fn = getattr(lora, method)
    monkeypatch.setattr(lora, method, lambda *a, **k: calls.append(1) or factor_fn(*a, **k))
    lora_merge.merge_adapters(base, ads, tmp_path / "f.safetensors", merge)
    assert len(calls) == 4  # every adapted leaf from its factors
    lora_merge.merge_adapters(base, ads, tmp_path / "d.safetensors", merge, factor_mergers=False)
    assert len(calls) == 4
    f, d = io.flatten(io.load(tmp_path / "f.safetensors")), io.flatten(io.load(tmp_path / "d.safetensors"))
    for k in f:
        np.testing.assert_allclose(f[k], d[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_pact_lora_variant_on_disk_matches_in_memory(tmp_path, two_adapters):
    """--pact with adapters: the task spaces are the A row spaces (in-memory pact(task_spaces=) result)."""
    weights = base_weights()
    base = write_torch_base(tmp_path / "base.safetensors", weights)
    rules = pact_jax.LeafRules(layout="torch")
    pact_kw = {"pretrained_rank": 0.3, "include": "q_proj"}  # one matrix shape: one compilation
    merge = recipes.make_merge("task_arithmetic", use_pact=True, alpha=1.0, rules=rules, pact_kwargs=pact_kw)
    ads = [p for p, _, _ in two_adapters]
    lora_merge.merge_adapters(base, ads, tmp_path / "out.safetensors", merge)
    got = io.flatten(io.load(tmp_path / "out.safetensors"))
    path = "model/layers/0/self_attn/q_proj/weight"
    facs = [peft.load_adapter(p, base)[path] for p in ads]
    st = lora.stack_factors([{path: f} for f in facs])[path]
    w0 = {path: weights["model.layers.0.self_attn.q_proj.weight"]}
    filtered = pact_jax.pact(w0, {path: lora.dense_delta(st)}, pretrained_rank=0.3, rules=rules,
                             task_spaces={path: lora.row_space(st.a)})[path]  # fmt: skip
    np.testing.assert_allclose(got[path], w0[path] + np.asarray(filtered).sum(0), rtol=1e-5, atol=1e-5)
    # lora_spaces=False: the top-k SVD of the dense s B A instead; with k = 1 < r a different merge
    # (with k >= r it is the same space: the row space of B A is that of A when B has full column rank).
    merge_k1 = recipes.make_merge("task_arithmetic", use_pact=True, alpha=1.0, rules=rules,
                                  pact_kwargs={**pact_kw, "task_rank": 1})  # fmt: skip
    lora_merge.merge_adapters(base, ads, tmp_path / "dense.safetensors", merge_k1, lora_spaces=False)
    dense = io.flatten(io.load(tmp_path / "dense.safetensors"))
    assert not np.allclose(dense[path], got[path], atol=1e-3)


def test_output_lora_round_trips_through_the_reader(tmp_path, two_adapters):
    weights = base_weights()
    base = write_torch_base(tmp_path / "base.safetensors", weights)
    ads = [p for p, _, _ in two_adapters]
    merge = recipes.make_merge("task_arithmetic", alpha=0.5)
    lora_merge.merge_adapters(base, ads, tmp_path / "merged_adapter", merge, output_lora=6)
    assert peft.is_adapter(tmp_path / "merged_adapter")
    cfg = json.loads((tmp_path / "merged_adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6 and cfg["peft_type"] == "LORA"
    back = peft.load_adapter(tmp_path / "merged_adapter", base)
    want = reference(weights, two_adapters, 0.5)
    for module, (d_out, d_in) in LINEAR.items():
        path = module.replace(".", "/") + "/weight"
        if module == "model.layers.1.self_attn.q_proj":
            assert path not in back  # no input adapter touches it
            continue
        delta = want[module] - weights[module + ".weight"]
        # Ranks add up to at most 6 here, so the truncation is exact.
        np.testing.assert_allclose(lora.dense_delta(back[path]), delta, rtol=1e-4, atol=1e-4)
    # The merged adapter merged alone into the base gives the merged model.
    streaming.merge_checkpoints(base, [tmp_path / "merged_adapter"], tmp_path / "full.safetensors",
                                recipes.make_merge("task_arithmetic", alpha=1.0))  # fmt: skip
    full = io.flatten(io.load(tmp_path / "full.safetensors"))
    for module, w in want.items():
        np.testing.assert_allclose(full[module.replace(".", "/") + "/weight"], w, rtol=1e-4, atol=1e-4)


def test_fan_in_fan_out_conv1d_base(tmp_path):
    """GPT-2's Conv1D stores (in, out): with fan_in_fan_out the update is transposed."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(D, 3 * D)).astype(np.float32)  # c_attn: in D, out 3D
    base = write_torch_base(tmp_path / "base.safetensors", {"transformer.h.0.attn.c_attn.weight": w0})
    a, b = rng.normal(size=(2, D)), rng.normal(size=(3 * D, 2))
    ad = write_adapter(tmp_path / "ad", {"transformer.h.0.attn.c_attn": (a, b)}, r=2, alpha=4, fan_in_fan_out=True)
    streaming.merge_checkpoints(base, [ad], tmp_path / "out.safetensors", recipes.make_merge("task_arithmetic", alpha=1.0))
    got = io.load(tmp_path / "out.safetensors")["transformer"]["h"]["0"]["attn"]["c_attn"]["weight"]
    np.testing.assert_allclose(got, np_lora_merge(w0, [(a, b, 2.0)], 1.0, transposed=True), rtol=1e-5, atol=1e-5)
    # Without the flag the (in, out) leaf does not fit an (out, in) update: the error says so.
    ad2 = write_adapter(tmp_path / "ad2", {"transformer.h.0.attn.c_attn": (a, b)}, r=2, alpha=4)
    with pytest.raises(CheckpointError, match=r"c_attn.*shape \(12, 36\), expected \(36, 12\).*fan_in_fan_out"):
        peft.load_adapter(ad2, base)


def test_fan_in_fan_out_flax_conv1d_base(tmp_path):
    """HF's FlaxConv1D (GPT-2 in Flax) stores its kernel (out, in): in a Flax base fan_in_fan_out means
    the update is NOT transposed; the base's layout (pact_jax.layout), not the leaf name, decides."""
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(3 * D, D)).astype(np.float32)  # FlaxConv1D kernel: (out 3D, in D)
    other = rng.normal(size=(D, D)).astype(np.float32)  # a Flax Dense kernel, so the base reads as Flax
    base = tmp_path / "base.msgpack"
    io.save(base, {"params": {"h_0": {"attn": {"c_attn": {"kernel": w0}}, "mlp": {"kernel": other}}}})
    a, b = rng.normal(size=(2, D)), rng.normal(size=(3 * D, 2))
    ad = write_adapter(tmp_path / "ad", {"h_0.attn.c_attn": (a, b)}, r=2, alpha=4, fan_in_fan_out=True)
    bound = peft.load_adapter(ad, base)
    assert bound.layouts == {"params/h_0/attn/c_attn/kernel": "torch"}
    streaming.merge_checkpoints(base, [ad], tmp_path / "out.msgpack", recipes.make_merge("task_arithmetic", alpha=1.0))
    got = io.load(tmp_path / "out.msgpack")["params"]["h_0"]["attn"]["c_attn"]["kernel"]
    np.testing.assert_allclose(got, np_lora_merge(w0, [(a, b, 2.0)], 1.0, transposed=False), rtol=1e-5, atol=1e-5)


def test_modules_to_save_and_lora_bias(tmp_path):
    weights = base_weights()
    base = write_torch_base(tmp_path / "base.safetensors", weights)
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, D)), rng.normal(size=(D, 2))
    head = rng.normal(size=(V, D)).astype(np.float32)
    lbias = rng.normal(size=(D,)).astype(np.float32)
    ad = write_adapter(tmp_path / "ad", {"model.layers.0.self_attn.q_proj": (a, b)}, r=2, alpha=2,
                       extra={"base_model.model.lm_head.weight": head,
                              "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": lbias},
                       modules_to_save=["lm_head"], lora_bias=True)  # fmt: skip
    streaming.merge_checkpoints(base, [ad], tmp_path / "out.safetensors", recipes.make_merge("task_arithmetic", alpha=1.0))
    got = io.flatten(io.load(tmp_path / "out.safetensors"))
    np.testing.assert_allclose(got["lm_head/weight"], head, rtol=1e-5, atol=1e-6)  # saved - base, added back
    np.testing.assert_allclose(got["model/layers/0/self_attn/q_proj/bias"],
                               weights["model.layers.0.self_attn.q_proj.bias"] + lbias, rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(CheckpointError, match="LoRA factors only"):
        lora_merge.merge_adapters(base, [ad], tmp_path / "o", recipes.make_merge("task_arithmetic"), output_lora=2)


@pytest.mark.parametrize("flax", [False, True])
def test_embedding_lora(tmp_path, flax):
    """PEFT's embedding LoRA: lora_embedding_A (r, num), lora_embedding_B (dim, r), update s (B A)^T (num, dim)."""
    weights = base_weights()
    base = (write_flax_base(tmp_path / "base.msgpack", weights) if flax
            else write_torch_base(tmp_path / "base.safetensors", weights))  # fmt: skip
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, V)).astype(np.float32), rng.normal(size=(D, 3)).astype(np.float32)
    ad = write_adapter(tmp_path / "ad", {}, r=3, alpha=6,
                       extra={"base_model.model.model.embed_tokens.lora_embedding_A": a,
                              "base_model.model.model.embed_tokens.lora_embedding_B": b})  # fmt: skip
    out = tmp_path / ("out.msgpack" if flax else "out.safetensors")
    streaming.merge_checkpoints(base, [ad], out, recipes.make_merge("task_arithmetic", alpha=1.0))
    got = io.flatten(io.load(out))["params/model/embed_tokens/embedding" if flax else "model/embed_tokens/weight"]
    np.testing.assert_allclose(got, weights["model.embed_tokens.weight"] + 2.0 * (b @ a).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, match", [
    ({"peft_type": "LOHA"}, "PEFT type 'LOHA' is not supported"),
    ({"peft_type": "IA3"}, "PEFT type 'IA3'"),
    ({"use_dora": True}, "DoRA"),
    ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
])  # fmt: skip
def test_unsupported_peft_types_are_named(tmp_path, config, match):
    ad = write_adapter(tmp_path / "ad", random_modules(["model.layers.0.self_attn.q_proj"], 2, 0), r=2, alpha=2, **config)
    with pytest.raises(CheckpointError, match=match):
        peft.read_adapter(ad)


def test_base_that_does_not_fit_is_named(tmp_path):
    weights = base_weights()
    base = write_torch_base(tmp_path / "base.safetensors", weights)
    rng = np.random.default_rng(0)

    def adapter(name, module, r, d_in, d_out):
        return write_adapter(tmp_path / name, {module: (rng.normal(size=(r, d_in)), rng.normal(size=(d_out, r)))},
                             r=2, alpha=2)  # fmt: skip

    ad = adapter("missing", "model.layers.7.self_attn.q_proj", 2, D, D)
    with pytest.raises(CheckpointError, match=r"missing/adapter_model.safetensors: module "
                                              r"'model.layers.7.self_attn.q_proj'.*base checkpoint"):  # fmt: skip
        peft.load_adapter(ad, base)
    ad = adapter("shape", "model.layers.0.mlp.up_proj", 2, D + 1, H)
    with pytest.raises(CheckpointError, match=r"shape/adapter_model.safetensors: module 'model.layers.0.mlp.up_proj'"
                                              r".*'model/layers/0/mlp/up_proj/weight'.*\(20, 12\), expected \(20, 13\)"):
        peft.load_adapter(ad, base)
    ad = adapter("rank", "model.layers.0.mlp.up_proj", 3, D, H)
    with pytest.raises(CheckpointError, match="rank 3.*r = 2"):
        peft.read_adapter(ad)


def test_mixing_adapters_and_checkpoints_is_refused(tmp_path, two_adapters):
    base = write_torch_base(tmp_path / "base.safetensors", base_weights())
    with pytest.raises(PactInputError, match="mix PEFT adapter folders"):
        streaming.merge_checkpoints(base, [two_adapters[0][0], base], tmp_path / "o.safetensors",
                                    recipes.make_merge("task_arithmetic"))  # fmt: skip
    with pytest.raises(PactInputError, match="does not support output_dtype"):
        streaming.merge_checkpoints(base, [two_adapters[0][0]], tmp_path / "o.safetensors",
                                    recipes.make_merge("task_arithmetic"), output_dtype="bfloat16")  # fmt: skip


def test_prefix_differences_are_matched_by_suffix(tmp_path):
    """An adapter trained on XForCausalLM (``model.`` prefix) binds to a base saved without it, and a Flax
    ``params/`` root is skipped."""
    weights = {k.removeprefix("model."): v for k, v in base_weights().items()}
    base = write_torch_base(tmp_path / "base.safetensors", weights)
    ad = write_adapter(tmp_path / "ad", random_modules(["model.layers.0.mlp.up_proj"], 2, 0), r=2, alpha=2)
    assert list(peft.load_adapter(ad, base)) == ["layers/0/mlp/up_proj/weight"]


def test_cli_detects_adapters(tmp_path, two_adapters, capsys):
    from pact_jax import cli

    weights = base_weights()
    base = str(write_torch_base(tmp_path / "base.safetensors", weights))
    ads = [str(p) for p, _, _ in two_adapters]
    out = tmp_path / "out.safetensors"
    assert cli.main(["merge", "--pretrained", base, "--finetuned", *ads, "--method", "task_arithmetic",
                     "--alpha", "0.7", "--output", str(out)]) == 0  # fmt: skip
    merged = io.flatten(io.load(out))
    for module, w in reference(weights, two_adapters, 0.7).items():
        np.testing.assert_allclose(merged[module.replace(".", "/") + "/weight"], w, rtol=1e-5, atol=1e-5)
    assert "leaves no adapter touches, copied from the base" in capsys.readouterr().out
    # YAML: output_lora; the merged adapter reads back.
    (tmp_path / "c.yaml").write_text(f"pretrained: {base}\nfinetuned: {ads}\nmethod: task_arithmetic\n"
                                     f"alpha: 0.7\noutput: {tmp_path / 'ad_out'}\noutput_lora: 6\n")  # fmt: skip
    assert cli.main(["merge", str(tmp_path / "c.yaml")]) == 0
    back = peft.load_adapter(tmp_path / "ad_out", base)
    np.testing.assert_allclose(np.asarray(lora.dense_delta(back["model/layers/0/mlp/up_proj/weight"])),
                               merged["model/layers/0/mlp/up_proj/weight"] - weights["model.layers.0.mlp.up_proj.weight"],
                               atol=1e-4)  # fmt: skip
    capsys.readouterr()
    for argv, message in [
        (["--finetuned", ads[0], base], "mix PEFT adapter folders"),
        (["--finetuned", base, "--output-lora", "4"], "--output-lora (output_lora) needs PEFT adapter folders"),
        (["--finetuned", *ads, "--pact-arg", "lora_spaces=false"], "PACT is off"),
        (["--finetuned", *ads, "--pact", "--pact-arg", "lora_spaces=3"], "true or false"),
    ]:
        code = cli.main(["merge", "--pretrained", base, "--method", "tsv", "--output", str(tmp_path / "x"), *argv])
        assert code == 2 and message in capsys.readouterr().err


def test_save_adapter_writes_what_read_adapter_reads(tmp_path):
    rng = np.random.default_rng(0)
    f = {"model.layers.0.mlp.up_proj": lora.LoraFactors(rng.normal(size=(3, D)), rng.normal(size=(H, 3)), 0.5),
         "model.layers.0.self_attn.q_proj": lora.LoraFactors(rng.normal(size=(2, D)), rng.normal(size=(D, 2)), 1.0)}
    peft.save_adapter(tmp_path / "ad", f)
    back = peft.read_adapter(tmp_path / "ad")
    for name, x in f.items():
        np.testing.assert_allclose(lora.dense_delta(back.modules[name].factors), lora.dense_delta(x), rtol=1e-5)
    with pytest.raises(CheckpointError, match="already exists"):
        peft.save_adapter(tmp_path / "ad", f)


# --------------------------------------------------------------------------
# Against PEFT itself (slow; skipped without torch / transformers / peft)


def _peft_model_pair(tmp_path, arch):
    """A tiny transformers model saved as the base, and two adapters PEFT trains-free writes on it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft_lib = pytest.importorskip("peft")
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=32)  # fmt: skip
        make, targets, fan = transformers.LlamaForCausalLM, [["q_proj", "up_proj"], ["q_proj", "down_proj"]], False
    else:
        config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16)
        make, targets, fan = transformers.GPT2LMHeadModel, [["c_attn"], ["c_attn", "c_fc"]], True
    model = make(config).eval()
    model.save_pretrained(tmp_path / "base")
    adapters = []
    for i, (target, r, rs) in enumerate(zip(targets, (4, 2), (False, True))):
        cfg = peft_lib.LoraConfig(r=r, lora_alpha=8, target_modules=target, use_rslora=rs, fan_in_fan_out=fan,
                                  init_lora_weights=False)  # random B, so the update is not zero  # fmt: skip
        wrapped = peft_lib.get_peft_model(make(config).eval(), cfg)
        wrapped.load_state_dict(model.state_dict(), strict=False)
        wrapped.save_pretrained(tmp_path / f"ad{i}")
        adapters.append(tmp_path / f"ad{i}")
    return make, config, tmp_path / "base", adapters


def _peft_merged(make, config, base, adapters):
    """PEFT's own merge: each adapter loaded and merge_and_unload-ed in turn (W0 + sum_t s_t B_t A_t)."""
    import peft as peft_lib

    model = make.from_pretrained(base).eval()
    for ad in adapters:
        model = peft_lib.PeftModel.from_pretrained(model, ad).merge_and_unload()
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_equals_peft_merge_and_unload(tmp_path, arch):
    make, config, base, adapters = _peft_model_pair(tmp_path, arch)
    want = _peft_merged(make, config, base, adapters)
    out = tmp_path / "merged"
    streaming.merge_checkpoints(base, adapters, out, recipes.make_merge("task_arithmetic", alpha=1.0))
    got = io.flatten(io.load(out))
    pre = io.flatten(io.load(base))
    compared = [k for k in want if k.replace(".", "/") in got]
    assert set(want) - set(compared) <= {"lm_head.weight"}  # GPT-2 ties it to wte (not saved)
    changed = [k for k in compared if not np.allclose(pre[k.replace(".", "/")], want[k])]
    assert len(changed) == (6 if arch == "llama" else 4), changed  # every adapted module
    for k in compared:
        np.testing.assert_allclose(got[k.replace(".", "/")], want[k], rtol=1e-5, atol=1e-5, err_msg=k)
    # The merged adapter (rank 6 >= 4 + 2: exact), loaded by PEFT onto the base, is the same model.
    merge = recipes.make_merge("task_arithmetic", alpha=1.0)
    lora_merge.merge_adapters(base, adapters, tmp_path / "merged_adapter", merge, output_lora=6)
    again = _peft_merged(make, config, base, [tmp_path / "merged_adapter"])
    for k, v in want.items():
        np.testing.assert_allclose(again[k], v, rtol=1e-4, atol=1e-4, err_msg=k)


@pytest.mark.slow
def test_pickled_adapter_bin_is_read_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    mods = random_modules(["model.layers.0.mlp.up_proj"], 2, 0)
    folder = write_adapter(tmp_path / "ad", mods, r=2, alpha=4)
    (folder / "adapter_model.safetensors").unlink()
    a, b = mods["model.layers.0.mlp.up_proj"]
    torch.save({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.tensor(a, dtype=torch.bfloat16),
                "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.tensor(b, dtype=torch.bfloat16)},
               folder / "adapter_model.bin")  # fmt: skip
    f = peft.read_adapter(folder).modules["model.layers.0.mlp.up_proj"].factors
    np.testing.assert_allclose(lora.dense_delta(f), 2.0 * b @ a, rtol=2e-2, atol=5e-2)
