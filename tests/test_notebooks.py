"""The Colab notebooks run top to bottom (reduced setting) and are committed without outputs.

``test_notebook_runs`` executes each notebook with nbclient in a scratch
directory, ``PACT_JAX_QUICK=1`` (fewer training steps). The install cell's
cases (already installed; its PACKAGE_SOURCE form field empty, a git URL, a
wheel, ``.`` inside a clone) are checked separately with ``pip`` replaced by a
recorder.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = ["quickstart.ipynb", "your_checkpoints.ipynb"]

sys.path.insert(0, str(COLAB))
import make_notebooks  # noqa: E402


def load(name: str) -> nbformat.NotebookNode:
    return nbformat.reads((COLAB / name).read_text(), as_version=4)


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


def _stream_text(nb: nbformat.NotebookNode) -> str:
    return "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )


def _images(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "display_data"
    )


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(tmp_path, monkeypatch, name):
    monkeypatch.setenv("PACT_JAX_QUICK", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend: figures become outputs
    # The kernel and the notebook's `!pact-jax` find this environment's executables first.
    monkeypatch.setenv("PATH", f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    nb = load(name)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    text = _stream_text(nb)
    assert f"pact_jax {importlib.import_module('pact_jax').__version__} from" in text  # the install cell's report
    assert "installing pact_jax" not in text  # already importable here: nothing installed
    if name == "quickstart.ipynb":
        for method in ("task_arithmetic", "ties", "tsv", "iso_cts"):
            assert f"{method:16s} plain" in text and "with PACT" in text, method
        assert (tmp_path / "quickstart_zoo" / "pretrained").exists()
        assert (tmp_path / "quickstart_zoo" / "results.json").exists()
        assert "reliance" in text and "protect" in text  # per-layer statistics printed under their plot
        assert _images(nb) >= 2, "expected the accuracy plot and the per-layer LBW plot"
    else:
        for out in ("merged_stream.safetensors", "merged_cli", "merged_cli_light", "merged_cli_sift",
                    "t5x/merged/checkpoint_0", "merged_mesh"):  # fmt: skip
            assert "merged 3 task(s)" in text and f"-> {out}" in text, out  # streaming; CLI: orbax, T5X, --mesh
        assert "max |sharded - unsharded|" in text
        assert "tsv + PACT (preset light, on 2 matrices)" in text and "task_arithmetic + SIFT (on 3 matrices)" in text
        assert "t5x with" in text  # the merged T5X checkpoint is detected as T5X
        for out in ("merged_api", "merged_cli", "merged_stream.safetensors", "merged_mesh", "t5x/merged/checkpoint_0"):
            assert (tmp_path / out).exists(), out


def test_quickstart_loads_the_cached_zoo_on_a_second_run(tmp_path, monkeypatch):
    """Running the notebook again reuses quickstart_zoo/ (a rebuild would refuse to overwrite it)."""
    monkeypatch.setenv("PACT_JAX_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    cells = [c for c in load("quickstart.ipynb").cells if c.cell_type == "code"]
    (zoo,) = [c for c in cells if "run_demo" in c.source]
    source = zoo.source
    for old, new in [("finetune_steps=100", "finetune_steps=5"), ("pretrain_steps=300", "pretrain_steps=15"),
                     ("probe_steps=50", "probe_steps=5")]:  # fmt: skip
        assert old in source, old
        source = source.replace(old, new)  # only the cache is tested here: a few steps suffice
    nb = nbformat.v4.new_notebook(cells=[cells[0], *(nbformat.v4.new_code_cell(source) for _ in range(2))])
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    first, second = (_stream_text(nbformat.v4.new_notebook(cells=[c])) for c in nb.cells[-2:])
    assert "loaded the cached zoo" not in first and "wrote 5 orbax checkpoints" in first
    assert "loaded the cached zoo" in second and "Merged encoders" in second


# --------------------------------------------------------------------------
# The install cell, with pip replaced by a recorder


def install_source() -> str:
    sources = {load(name).cells[1].source for name in NOTEBOOKS}
    assert len(sources) == 1, "both notebooks start with the same install cell"
    (source,) = sources
    assert "importlib.util.find_spec(\"pact_jax\")" in source and "YOUR_ORG" not in source
    return source


def run_install_cell(monkeypatch, cwd: pathlib.Path, *, installed: bool, source: str = "") -> tuple[list[list[str]], dict]:
    """Executes the install cell in ``cwd`` with its form field set to ``source``; ``installed=False``
    makes pact_jax look missing."""
    calls: list[list[str]] = []
    real_find_spec = importlib.util.find_spec
    if not installed:
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "pact_jax" else real_find_spec(name, *a)
        )
    monkeypatch.setattr(subprocess, "check_call", lambda cmd, *a, **k: calls.append(list(cmd)))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(cwd)
    field = 'PACKAGE_SOURCE = ""  # @param {type:"string"}'
    cell = install_source()
    assert field in cell  # a Colab form field, empty as committed: no invented URL
    namespace: dict = {}
    code = cell.replace(field, f"PACKAGE_SOURCE = {source!r}")
    exec(compile(code, "install-cell", "exec"), namespace)  # noqa: S102 - our own notebook
    return calls, namespace


def test_install_cell_when_already_installed(tmp_path, monkeypatch, capsys):
    calls, _ = run_install_cell(monkeypatch, tmp_path, installed=True, source="git+https://example.org/x.git")
    assert calls == []
    out = capsys.readouterr().out
    assert f"from {REPO / 'pact_jax'}" in out and "devices:" in out


def test_install_cell_without_a_source_says_what_to_paste(tmp_path, monkeypatch):
    (tmp_path / "pact_jax").mkdir()  # even beside a clone: only the form field says what to install
    _clone(tmp_path / "pact_jax" / "inner")
    with pytest.raises(RuntimeError, match=r"paste its source into PACKAGE_SOURCE") as err:
        run_install_cell(monkeypatch, tmp_path, installed=False)
    assert "\n" not in str(err.value)  # one sentence


def _clone(root: pathlib.Path) -> pathlib.Path:
    root.mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_install_cell_dot_inside_a_clone(tmp_path, monkeypatch, capsys):
    """Jupyter started in the clone's colab/ (or anywhere below it), PACKAGE_SOURCE ".": pip install -e <clone>."""
    clone = _clone(tmp_path / "pact_jax_clone")
    (clone / "colab").mkdir()
    calls, _ = run_install_cell(monkeypatch, clone / "colab", installed=False, source=".")
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(clone)]]
    assert str(clone) in sys.path  # this kernel imports the editable install without a restart
    assert f"installing pact_jax: pip install -e {clone}" in capsys.readouterr().out


def test_install_cell_dot_next_to_a_git_clone(tmp_path, monkeypatch):
    """Colab after `!git clone <url>`: the clone is a child of the working directory."""
    (tmp_path / "sample_data").mkdir()
    clone = _clone(tmp_path / "pact_jax")
    calls, _ = run_install_cell(monkeypatch, tmp_path, installed=False, source=".")
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(clone)]]


def test_install_cell_dot_without_a_clone(tmp_path, monkeypatch):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    with pytest.raises(RuntimeError, match=r"no clone of pact_jax"):
        run_install_cell(monkeypatch, tmp_path, installed=False, source=".")


@pytest.mark.parametrize(
    "source, pip_args",
    [
        ("git+https://example.org/owner/pact_jax.git", ["git+https://example.org/owner/pact_jax.git"]),
        ("https://example.org/owner/pact_jax.git", ["git+https://example.org/owner/pact_jax.git"]),
        ("  /content/pact_jax-0.1.0-py3-none-any.whl ", ["/content/pact_jax-0.1.0-py3-none-any.whl"]),
    ],
)
def test_install_cell_installs_the_pasted_requirement(tmp_path, monkeypatch, source, pip_args):
    calls, _ = run_install_cell(monkeypatch, tmp_path, installed=False, source=source)
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", *pip_args]]
