"""The Colab notebooks run top to bottom (reduced setting) and are committed without outputs."""

from __future__ import annotations

import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = ["quickstart.ipynb", "your_checkpoints.ipynb"]

sys.path.insert(0, str(COLAB))
import make_notebooks  # noqa: E402


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_generated_and_stripped(name):
    text = (COLAB / name).read_text()
    assert text == make_notebooks.render(make_notebooks.notebooks()[name]), (
        f"colab/{name} is stale: run python colab/make_notebooks.py"
    )
    nb = nbformat.reads(text, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(tmp_path, monkeypatch, name):
    monkeypatch.setenv("PACT_JAX_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel and the notebook's `!pact-jax` find this environment's executables first.
    monkeypatch.setenv("PATH", f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    nb = nbformat.reads((COLAB / name).read_text(), as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )
    if name == "quickstart.ipynb":
        assert "with PACT" in text and (tmp_path / "quickstart_zoo" / "pretrained").exists()
    else:
        assert "merged 3 task(s)" in text and "max |sharded - unsharded|" in text
        assert (tmp_path / "merged_cli").exists() and (tmp_path / "merged_stream.safetensors").exists()
