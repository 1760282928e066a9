"""Checkpoint layouts (pact_jax.layout): Flax kernels (in, out) and torch weights (out, in) merge alike.

The same model stored both ways (every linear map transposed, conv kernels permuted, embedding tables
as they are) must merge to the same model, stored both ways, for every method, with and without PACT
and SIFT; and each leaf must get its matrix view and input side.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from pact_jax import cli, io, layout, merges, recipes
from pact_jax.tree import LeafRules

T = 3
# Flax-layout shapes; the torch twin of each leaf is ``TO_TORCH[kind]`` of it.
# Square matrix views (12 x 12) but for the head: one compilation per kernel serves both layouts.
FLAX_SHAPES = {
    "embed/embedding": (12, 12),
    "dense1/kernel": (12, 12),
    "dense1/bias": (12,),
    "conv/kernel": (2, 2, 3, 12),  # (kh, kw, cin, cout) -> (12, 12)
    "conv/bias": (12,),
    "conv1d/kernel": (3, 4, 12),  # (k, cin, cout) -> (12, 12)
    "ln/scale": (12,),
    "ln/bias": (12,),
    "head/kernel": (12, 6),
    "head/bias": (6,),
}
# Torch order from Flax order, per leaf (the test's own statement of the two layouts).
TORCH_AXES = {
    "dense1/kernel": (1, 0),
    "conv/kernel": (3, 2, 0, 1),  # -> (cout, cin, kh, kw)
    "conv1d/kernel": (2, 1, 0),  # -> (cout, cin, k)
    "head/kernel": (1, 0),
}
# Names as each framework writes them (for auto-detection through the CLI).
TORCH_NAMES = {
    "embed/embedding": "embed/weight",
    "dense1/kernel": "dense1/weight",
    "conv/kernel": "conv/weight",
    "conv1d/kernel": "conv1d/weight",
    "ln/scale": "ln/weight",
    "head/kernel": "head/weight",
}
PACT_KW = {"pretrained_rank": 0.25, "task_rank": 1}  # K + (T-1) k well below every input dimension
SIFT_KW = {"pretrained_rank": 0.25}


def to_torch(flat: dict, names: bool = False) -> dict:
    out = {}
    for p, x in flat.items():
        x = np.asarray(x)
        out[TORCH_NAMES.get(p, p) if names else p] = x.transpose(TORCH_AXES[p]) if p in TORCH_AXES else x
    return out


def flax_models(seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    pre = {p: rng.normal(size=s).astype(np.float32) for p, s in FLAX_SHAPES.items()}
    fts = [{p: w + 0.1 * rng.normal(size=w.shape).astype(np.float32) for p, w in pre.items()} for _ in range(T)]
    return pre, fts


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def merged_delta(method, transform, pre, fts, rules) -> dict:
    recipe = {"use_pact": transform == "pact", "pact_kwargs": PACT_KW if transform == "pact" else None,
              "use_sift": transform == "sift", "sift_kwargs": SIFT_KW if transform == "sift" else None}
    merge = recipes.make_merge(method, **recipe, alpha=1.0, rules=rules)
    out = merge(io.unflatten(pre), [io.unflatten(f) for f in fts], key=jax.random.key(7))
    return {p: np.asarray(x) - pre[p] for p, x in io.flatten(out).items()}


def assert_transposes(torch_delta: dict, flax_delta: dict, names: bool = False, tol: float = 1e-5) -> None:
    want = to_torch(flax_delta, names)
    assert set(torch_delta) == set(want)
    for p, x in want.items():
        assert torch_delta[p].shape == x.shape, p
        assert rel_err(torch_delta[p], x) <= tol, (p, rel_err(torch_delta[p], x))


# --------------------------------------------------------------------------
# API: every method, with and without PACT / SIFT


def check_twins(method: str, transform: str | None) -> None:
    pre, fts = flax_models()
    pre_t, fts_t = to_torch(pre), [to_torch(f) for f in fts]
    flax_delta = merged_delta(method, transform, pre, fts, LeafRules(layout="flax"))
    torch_delta = merged_delta(method, transform, pre_t, fts_t, LeafRules(layout="torch"))
    assert any(np.abs(d).max() > 1e-3 for d in flax_delta.values()), (method, transform)
    assert_transposes(torch_delta, flax_delta)


# CI: each method, and each of none / PACT / SIFT, at least once (the side-dependent ones with PACT);
# DARE's mask has its own test below (compiling its random draws per shape is the slow part).
@pytest.mark.parametrize(("method", "transform"), [
    ("average", None), ("task_arithmetic", "pact"), ("ties", "pact"), ("tsv", "sift"), ("iso_c", "pact"),
    ("iso_cts", "pact"), ("iso_cts", "sift"), ("iso_cts", None)])  # fmt: skip
def test_both_layouts_merge_to_transposes(method, transform):
    check_twins(method, transform)


@pytest.mark.slow
@pytest.mark.parametrize("transform", [None, "pact", "sift"])
@pytest.mark.parametrize("method", recipes.METHODS)
def test_both_layouts_merge_to_transposes_for_every_method(method, transform):
    check_twins(method, transform)


def test_dare_draws_the_mask_of_the_flax_twin():
    """DARE's random mask depends on the order of a leaf's entries: a torch leaf draws it in Flax order."""
    rng = np.random.default_rng(3)
    tau = rng.normal(size=(T, 2, 2, 3, 5)).astype(np.float32)  # (T, kh, kw, cin, cout)
    key = jax.random.key(0)
    flax = merges.dare(key, {"conv": {"kernel": tau}}, 0.5)["conv"]["kernel"]
    torch = merges.dare(key, {"conv": {"kernel": tau.transpose(0, 4, 3, 1, 2)}}, 0.5,
                        rules=LeafRules(layout="torch"))["conv"]["kernel"]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(torch), np.asarray(flax).transpose(0, 4, 3, 1, 2))
    assert 0 < int((np.asarray(flax) == 0).sum()) < tau.size


@pytest.mark.parametrize(("method", "transform"), [("task_arithmetic", "pact"), ("task_arithmetic", "sift"),
                                                   ("iso_cts", None)])  # fmt: skip
def test_a_torch_model_read_as_flax_merges_differently(method, transform):
    """Without the layout, PACT / SIFT protect the output space and Iso-CTS takes its common subspace on
    the input side of a torch weight: the merge is not the Flax twin's."""
    pre, fts = flax_models()
    pre_t, fts_t = to_torch(pre), [to_torch(f) for f in fts]
    flax_delta = merged_delta(method, transform, pre, fts, LeafRules(layout="flax"))
    wrong = merged_delta(method, transform, pre_t, fts_t, LeafRules(layout="flax"))
    want = to_torch(flax_delta)
    assert max(rel_err(wrong[p], want[p]) for p in TORCH_AXES) > 1e-2


# --------------------------------------------------------------------------
# Matrix views, input sides, NNX suffixes


def test_matrix_views_and_input_sides():
    flax, torch = LeafRules(), LeafRules(layout="torch")
    # Flax 1-D conv (k, in, out) -> (k*in, out); 2-D conv; DenseGeneral and attention output stay as they were.
    assert flax.matrix_shape("params/Conv_0/kernel", (3, 64, 64)) == (192, 64)
    assert flax.matrix_shape("block/conv1/kernel", (3, 64, 64)) == (192, 64)
    assert flax.matrix_shape("conv/kernel", (3, 3, 4, 8)) == (36, 8)
    assert flax.matrix_shape("attn/query/kernel", (8, 2, 4)) == (8, 8)
    assert flax.matrix_shape("attn/out/kernel", (2, 4, 8)) == (8, 8)
    assert flax.input_side("dense/kernel") == "left"
    # torch: (out, in, kh, kw) -> (out, in*kh*kw), Conv1d (out, in, k) -> (out, in*k); input = columns.
    assert torch.matrix_shape("features/0/weight", (8, 4, 3, 3)) == (8, 36)
    assert torch.matrix_shape("conv/weight", (64, 32, 3)) == (64, 96)
    assert torch.matrix_shape("dense/weight", (24, 16)) == (24, 16)
    assert torch.input_side("dense/weight") == "right" and torch.output_side("dense/weight") == "left"
    # Embedding tables are (vocab, d) in both frameworks: the token (rows) is the input.
    assert torch.input_side("embeddings/word_embeddings/weight") == "left"
    assert torch.flax_axes("embeddings/word_embeddings/weight", (30, 8)) == (0, 1)
    assert torch.flax_axes("features/0/weight", (8, 4, 3, 3)) == (2, 3, 1, 0)
    w = np.zeros((8, 4, 3, 5))
    assert w.transpose(torch.flax_axes("c/weight", w.shape)).shape == (3, 5, 4, 8)


def test_nnx_variable_suffix_is_ignored_by_the_rules():
    rules = LeafRules()
    assert layout.rule_path("attn/out/kernel/value") == "attn/out/kernel"
    assert rules.matrix_shape("attn/out/kernel/value", (2, 4, 8)) == (8, 8)
    assert rules.kind("attn/query/bias/value", (2, 4)) == "other"  # a 2-D bias, not a matrix
    assert rules.kind("linear/kernel/value", (4, 5)) == "matrix"
    assert rules.matrix_shape("conv/kernel/value", (3, 8, 8)) == (24, 8)
    assert rules.matrix_shape("conv/kernel/raw_value", (3, 3, 8, 8)) == (72, 8)
    assert LeafRules(freeze=r"(^|/)head/kernel$").kind("head/kernel/value", (4, 2)) == "freeze"


def test_row_axes_entries_win_over_the_default_view():
    rules = LeafRules(row_axes=layout.parse_row_axes(["mix/kernel$=2"]) + LeafRules().row_axes)
    assert rules.matrix_shape("mix/kernel", (4, 3, 5)) == (12, 5)
    assert rules.matrix_shape("attn/out/kernel", (2, 4, 8)) == (8, 8)  # the default entry still applies
    assert layout.parse_row_axes({"a$": 2, "b": "1"}) == (("a$", 2), ("b", 1))
    assert layout.parse_row_axes([["a", 3]]) == (("a", 3),)
    for bad in (["a"], ["a=0"], ["a=x"], {"(": 1}, "a=1", [["a", True]]):
        with pytest.raises(ValueError, match="row_axes"):
            layout.parse_row_axes(bad)


def test_bad_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        LeafRules(layout="pt")
    with pytest.raises(ValueError, match="auto"):
        layout.check_layout("jax", allow_auto=True)


# --------------------------------------------------------------------------
# Detection


def write_safetensors(path, flat: dict, metadata: dict | None = None) -> None:
    save_file({k.replace("/", "."): np.ascontiguousarray(v) for k, v in flat.items()}, str(path), metadata=metadata)


def test_detect_layout(tmp_path):
    pre, _ = flax_models()
    torch_flat = to_torch(pre, names=True)
    write_safetensors(tmp_path / "pt.safetensors", torch_flat, {"format": "pt"})
    with io.open_reader(tmp_path / "pt.safetensors") as reader:
        assert reader.header_metadata() == {"format": "pt"}
    write_safetensors(tmp_path / "names.safetensors", torch_flat)  # no metadata: the .weight names decide
    write_safetensors(tmp_path / "flax.safetensors", pre)
    write_safetensors(tmp_path / "flax_meta.safetensors", pre, {"format": "flax"})
    # A Flax-named file that says "pt" is torch: the header is the source's own statement.
    write_safetensors(tmp_path / "pt_kernels.safetensors", pre, {"format": "pt"})
    # pact_jax's earlier outputs were stamped "flax" whatever the input: the names decide.
    write_safetensors(tmp_path / "ours.safetensors", torch_flat, {"format": "flax", "producer": "pact_jax"})
    want = {"pt": "torch", "names": "torch", "flax": "flax", "flax_meta": "flax", "pt_kernels": "torch",
            "ours": "torch"}  # fmt: skip
    for name, expected in want.items():
        with io.open_reader(tmp_path / f"{name}.safetensors") as reader:
            if name in ("names", "flax"):
                assert reader.header_metadata() == {}
            assert layout.detect_layout(reader) == expected, name
        assert layout.detect_layout(str(tmp_path / f"{name}.safetensors")) == expected, name
    assert layout.detect_layout(io.unflatten(pre)) == "flax"
    assert layout.detect_layout(io.unflatten(torch_flat)) == "torch"
    mixed = {"params": {"dense": {"kernel": np.zeros((2, 3))}, "ln": {"weight": np.zeros(3)}}}
    assert layout.detect_layout(mixed) == "flax"  # a 1-D LayerNorm "weight" is no evidence
    io.save(tmp_path / "torch.msgpack", io.unflatten(torch_flat))
    assert layout.detect_layout(str(tmp_path / "torch.msgpack")) == "torch"


# --------------------------------------------------------------------------
# CLI


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_pair(tmp_path) -> tuple[dict, list[dict]]:
    """The model as a torch safetensors file set ({"format": "pt"}, .weight names) and as a Flax one."""
    pre, fts = flax_models(1)
    for name, flat in [("pre", pre), *((f"ft{i}", f) for i, f in enumerate(fts))]:
        write_safetensors(tmp_path / f"flax_{name}.safetensors", flat)
        write_safetensors(tmp_path / f"torch_{name}.safetensors", to_torch(flat, names=True), {"format": "pt"})
    return pre, fts


def cli_merge(capsys, tmp_path, kind, out, *extra):
    args = ["merge", "--pretrained", tmp_path / f"{kind}_pre.safetensors",
            "--finetuned", *(tmp_path / f"{kind}_ft{i}.safetensors" for i in range(T)),
            "--output", out, "--no-progress", "--method", "iso_cts", "--pact", "--alpha", "1",
            *(a for k, v in PACT_KW.items() for a in ("--pact-arg", f"{k}={v}")), *extra]  # fmt: skip
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    return stdout, {k.replace(".", "/"): v for k, v in load_file(str(out)).items()}


def test_cli_auto_detects_a_torch_safetensors_checkpoint(tmp_path, capsys):
    pre, _ = write_pair(tmp_path)
    out_t, torch_out = cli_merge(capsys, tmp_path, "torch", tmp_path / "t.safetensors")
    out_f, flax_out = cli_merge(capsys, tmp_path, "flax", tmp_path / "f.safetensors")
    assert "torch layout (detected)" in out_t and "layout" not in out_f
    pre_t = to_torch(pre, names=True)
    flax_delta = {p: flax_out[p] - pre[p] for p in pre}
    assert_transposes({p: torch_out[p] - pre_t[p] for p in pre_t}, flax_delta, names=True)
    # --layout flax on the torch files: PACT / Iso-CTS on the wrong sides, another merge.
    _, wrong = cli_merge(capsys, tmp_path, "torch", tmp_path / "w.safetensors", "--layout", "flax")
    want = to_torch(flax_delta, names=True)
    assert rel_err(wrong["dense1/weight"] - pre_t["dense1/weight"], want["dense1/weight"]) > 1e-2
    # ... and --layout torch says what auto found.
    _, forced = cli_merge(capsys, tmp_path, "torch", tmp_path / "forced.safetensors", "--layout", "torch")
    for p in torch_out:
        np.testing.assert_array_equal(forced[p], torch_out[p])


def row_axes_model(tmp_path):
    rng = np.random.default_rng(2)
    pre = {"mix/kernel": rng.normal(size=(4, 3, 5)).astype(np.float32),
           "dense/kernel": rng.normal(size=(5, 6)).astype(np.float32)}  # fmt: skip
    fts = [{p: w + 0.1 * rng.normal(size=w.shape).astype(np.float32) for p, w in pre.items()} for _ in range(2)]
    for name, flat in [("pre", pre), ("ft0", fts[0]), ("ft1", fts[1])]:
        io.save(tmp_path / f"{name}.msgpack", io.unflatten(flat))
    return pre, fts


def test_cli_and_yaml_row_axes(tmp_path, capsys):
    pre, fts = row_axes_model(tmp_path)
    rules = LeafRules(row_axes=(("mix/kernel$", 2), *LeafRules().row_axes))
    want = recipes.make_merge("iso_c", rules=rules)(io.unflatten(pre), [io.unflatten(f) for f in fts])
    default = recipes.make_merge("iso_c")(io.unflatten(pre), [io.unflatten(f) for f in fts])
    assert rel_err(default["mix"]["kernel"], want["mix"]["kernel"]) > 1e-2  # the view matters
    base = ["merge", "--pretrained", tmp_path / "pre.msgpack", "--finetuned", tmp_path / "ft0.msgpack",
            tmp_path / "ft1.msgpack", "--method", "iso_c", "--no-progress"]  # fmt: skip
    code, _, err = run(capsys, *base, "--output", tmp_path / "cli.msgpack", "--row-axes", "mix/kernel$=2")
    assert code == 0, err
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"pretrained": "pre.msgpack", "finetuned": ["ft0.msgpack", "ft1.msgpack"],
                                      "method": "iso_c", "output": "yaml.msgpack", "layout": "flax",
                                      "rules": {"row_axes": {"mix/kernel$": 2}}}))  # fmt: skip
    code, _, err = run(capsys, "merge", config, "--no-progress")
    assert code == 0, err
    for name in ("cli", "yaml"):
        got = io.load(tmp_path / f"{name}.msgpack")
        for p, x in io.flatten(want).items():
            np.testing.assert_allclose(io.flatten(got)[p], np.asarray(x), rtol=1e-5, atol=1e-6, err_msg=(name, p))
    # Bad values: a usage error naming the flag.
    code, _, err = run(capsys, *base, "--output", tmp_path / "bad.msgpack", "--row-axes", "mix/kernel$=0")
    assert code == 2 and "--row-axes" in err
    config.write_text(yaml.safe_dump({"pretrained": "pre.msgpack", "finetuned": ["ft0.msgpack"],
                                      "method": "iso_c", "output": "bad.msgpack", "layout": "pt"}))  # fmt: skip
    code, _, err = run(capsys, "merge", config, "--no-progress")
    assert code == 2 and "layout" in err
    code, _, err = run(capsys, *base, "--output", tmp_path / "typo.msgpack", "--row-axes", "nothing$=2")
    assert code == 0 and "matches no leaf" in err


def test_inspect_reports_the_layout(tmp_path, capsys):
    write_pair(tmp_path)
    code, out, err = run(capsys, "inspect", tmp_path / "torch_ft0.safetensors", "--pretrained",
                         tmp_path / "torch_pre.safetensors", "--json")  # fmt: skip
    assert code == 0, err
    stats = json.loads(out)
    assert stats["layout"] == "torch"
    # PACT's statistics are on the input side: the columns of a torch weight.
    assert set(stats["tasks"]["layers"]["dense1/weight"]["subspace"]) >= {"right"}
