"""Flax NNX: ``nnx.State`` checkpoints saved the way the Flax docs show, merged by the CLI, restored into the model.

An NNX state names every leaf after its variable (``attn/out/kernel/value``); the leaf rules must see
through the suffix, or 2-D attention biases become matrices, the attention output kernel
``(heads, head_dim, d)`` is viewed as ``(heads, head_dim * d)`` and a 1-D conv as ``(k, in * out)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from pact_jax import cli, io, recipes
from pact_jax.tree import DEFAULT_RULES

T = 2
METHOD = "iso_cts"
PACT_KW = {"pretrained_rank": 0.25, "task_rank": 1}


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.conv1d = nnx.Conv(8, 8, kernel_size=(3,), rngs=rngs)  # kernel (3, 8, 8)
        self.conv2d = nnx.Conv(2, 8, kernel_size=(2, 2), rngs=rngs)  # kernel (2, 2, 2, 8)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.linear = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, tokens, image):  # tokens (B, L) int, image (B, H, W, 2)
        h = self.conv1d(self.embed(tokens))
        h = self.norm(self.attn(h) + self.conv2d(image).mean((1, 2))[:, None])
        return self.linear(h.mean(1))


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """Pre-trained and T fine-tuned states, each saved as ``StandardCheckpointer().save(dir, state)``,
    and their pure dicts (``nnx.to_pure_dict``)."""
    tmp_path = tmp_path_factory.mktemp("nnx")
    model = Model(nnx.Rngs(0))
    _, pre = nnx.split(model)
    rng = np.random.default_rng(0)
    states = [pre] + [jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype), pre)
                      for _ in range(T)]  # fmt: skip
    checkpointer = ocp.StandardCheckpointer()
    dirs = []
    for i, state in enumerate(states):
        dirs.append(tmp_path / ("pre" if i == 0 else f"ft{i}") / "state")
        checkpointer.save(dirs[-1], state)
    checkpointer.wait_until_finished()
    return dirs, [nnx.to_pure_dict(s) for s in states]


def test_nnx_state_paths_and_views(states):
    dirs, _ = states
    with io.open_reader(dirs[0]) as reader:
        shapes = {p: s.shape for p, s in reader.metadata().items()}
    # What flax 0.12 writes: every leaf path ends in the variable's "value".
    assert all(p.endswith("/value") for p in shapes), sorted(shapes)
    rules = DEFAULT_RULES
    assert rules.matrix_shape("attn/out/kernel/value", shapes["attn/out/kernel/value"]) == (8, 8)
    assert rules.matrix_shape("attn/query/kernel/value", shapes["attn/query/kernel/value"]) == (8, 8)
    assert rules.kind("attn/query/bias/value", shapes["attn/query/bias/value"]) == "other"
    assert rules.matrix_shape("conv1d/kernel/value", shapes["conv1d/kernel/value"]) == (24, 8)
    assert rules.matrix_shape("conv2d/kernel/value", shapes["conv2d/kernel/value"]) == (8, 8)
    assert rules.kind("linear/bias/value", (4,)) == "other"
    assert rules.kind("embed/embedding/value", (10, 8)) == "matrix"


def test_cli_merge_of_nnx_states_restores_into_the_model(tmp_path, capsys, states):
    """Iso-CTS (matrix views and input / output sides) after PACT, through the CLI, orbax in and out."""
    dirs, pure = states
    out = tmp_path / "merged"
    flags = [a for k, v in PACT_KW.items() for a in ("--pact-arg", f"{k}={v}")]
    code = cli.main(["merge", "--pretrained", str(dirs[0]), "--finetuned", *map(str, dirs[1:]), "--output", str(out),
                     "--method", METHOD, "--alpha", "1", "--no-progress", "--pact", *flags])  # fmt: skip
    assert code == 0, capsys.readouterr().err

    # Restore as the Flax docs do: the abstract state as target, then nnx.update.
    model = Model(nnx.Rngs(1))
    abstract = nnx.state(nnx.eval_shape(lambda: Model(nnx.Rngs(0))))
    restored = ocp.StandardCheckpointer().restore(out, abstract)
    nnx.update(model, restored)
    got = io.flatten(nnx.to_pure_dict(nnx.state(model)))

    # The same merge through the API on the pure dicts (paths without '/value').
    merge = recipes.make_merge(METHOD, use_pact=True, pact_kwargs=PACT_KW, alpha=1.0)
    want = io.flatten(merge(pure[0], pure[1:]))
    assert set(got) == set(want)
    for p, x in want.items():
        np.testing.assert_allclose(np.asarray(got[p]), np.asarray(x), rtol=1e-5, atol=1e-6, err_msg=p)
    # The merged model runs.
    y = model(jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 4, 4, 2)))
    assert y.shape == (1, 4) and bool(jnp.isfinite(y).all())
