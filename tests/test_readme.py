"""The README's command-line examples run as written (in a scratch directory)."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

from pact_jax import io

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def cli_block() -> str:
    (block,) = [b for b in code_blocks("bash") if "pact-jax merge --pretrained" in b]
    return block


def yaml_block() -> str:
    (block,) = [b for b in code_blocks("yaml") if "pact-jax merge merge.yaml" in b]
    return block


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """Runs the README's CLI block in a scratch directory: ``(directory, completed process)``."""
    if shutil.which("pact-jax") is None:
        pytest.fail("pact-jax is not installed: pip install -e .")
    scratch = tmp_path_factory.mktemp("readme")
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", cli_block()], cwd=scratch, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    return scratch, res


def test_cli_example_runs_as_pasted(cli_run):
    scratch, res = cli_run
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tsv + PACT, alpha 1.0" in res.stdout and "merged 4 task(s)" in res.stdout
    assert "LBW" in res.stdout  # inspect's statistics
    merged = io.load(scratch / "merged_tsv_pact")
    assert set(io.flatten(merged)) == set(io.flatten(io.load(scratch / "demo_ckpts" / "pretrained")))


def test_yaml_example_runs(cli_run):
    scratch, res = cli_run
    assert res.returncode == 0, res.stderr[-3000:]  # the YAML names the checkpoints the CLI block wrote
    (scratch / "merge.yaml").write_text(yaml_block())
    res = subprocess.run(["pact-jax", "merge", "merge.yaml", "--no-progress"], cwd=scratch, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dare_ties + PACT" in res.stdout
    assert io.detect_format(scratch / "merged_dare_ties.safetensors") == "safetensors"


def test_python_blocks_run():
    blocks = code_blocks("python")
    assert blocks, "README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    params, pretrained = namespace["params"], namespace["pretrained"]
    import jax

    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(pretrained)
