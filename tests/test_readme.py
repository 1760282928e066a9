"""Every fenced code block of README.md is executed (or, for the long benchmarks, parsed) here.

``test_every_readme_block_is_tested`` fails when a block is added that no test
below claims. The blocks run from the README's own text, parsed here, never
from a copy:

* the setup commands at the top: both run as written in a copy of the
  repository, creating a fresh venv there. So that nothing is downloaded
  again, the fresh venv sees this environment's installed dependencies through
  ``PYTHONPATH`` (pip then counts them as installed; only ``pip install -e .``
  itself builds and installs pact_jax, fetching its build backend setuptools
  from the package index if pip has no copy). The demo runs in full (about a
  minute). The test command's ``pytest`` only collects the suite
  (``PYTEST_ADDOPTS=--collect-only``): running the whole suite inside one of
  its tests would be recursive.
* the CLI and YAML examples and the Python block: executed in full.
* the benchmark commands: each is parsed (``--help``); ``benchmarks.speed``
  also runs its ``--dry-run`` (the default grid's plan), ``benchmarks.scaling``
  and ``benchmarks.streaming`` run with tiny sizes appended. The quality
  benchmark and its zoo are run end to end (``--quick``) by
  tests/test_benchmarks_quality.py, the speed benchmark by
  tests/test_benchmarks_speed.py; none runs its full default here.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import tomllib

import pytest

from pact_jax import io

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = pathlib.Path(sys.executable).parent


def fenced_blocks() -> list[tuple[str, str]]:
    """Every fenced block of the README as ``(language, text)``."""
    blocks = re.findall(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", README.read_text(), flags=re.DOTALL | re.MULTILINE)
    assert blocks, "README.md has no code block"
    return blocks


def code_blocks(lang: str) -> list[str]:
    return [text for lang_, text in fenced_blocks() if lang_ == lang]


def commands(block: str) -> list[str]:
    """The shell commands of a block: non-empty lines without comments, continuations joined."""
    block = re.sub(r"\\\n", " ", block)
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def is_setup_block(lang: str, text: str) -> bool:
    return lang == "bash" and "python -m pact_jax.demo" in text and "pytest" in text


def is_cli_block(lang: str, text: str) -> bool:
    return lang == "bash" and "pact-jax merge --pretrained" in text


def is_yaml_block(lang: str, text: str) -> bool:
    return lang == "yaml" and "pact-jax merge merge.yaml" in text


def is_python_block(lang: str, text: str) -> bool:
    return lang == "python"


def is_benchmark_block(lang: str, text: str) -> bool:
    return lang in ("text", "bash") and bool(commands(text)) and all(
        c.startswith("python -m benchmarks.") for c in commands(text)
    )


CLAIMS = {
    "setup (test_setup_*)": is_setup_block,
    "CLI (test_cli_example_runs_as_pasted)": is_cli_block,
    "YAML (test_yaml_example_runs)": is_yaml_block,
    "python (test_python_blocks_run)": is_python_block,
    "benchmarks (test_benchmark_*)": is_benchmark_block,
}


def test_every_readme_block_is_tested():
    for lang, text in fenced_blocks():
        claims = [name for name, claim in CLAIMS.items() if claim(lang, text)]
        assert len(claims) == 1, f"README block ```{lang} claimed by {claims or 'no test'}:\n{text}"
    for name, claim in CLAIMS.items():
        assert any(claim(*block) for block in fenced_blocks()), f"no README block for {name}"


def env(**extra: str) -> dict[str, str]:
    """This environment's executables first, without the test session's XLA flags (8 virtual devices)."""
    e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_ADDOPTS")}
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return {**e, **extra}


def run(cmd: str, cwd: pathlib.Path, timeout: int = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=cwd, env=env(**extra), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


# --------------------------------------------------------------------------
# The two setup commands at the top, in a fresh venv in a copy of the repository


def setup_commands() -> tuple[str, str]:
    (block,) = [text for lang, text in fenced_blocks() if is_setup_block(lang, text)]
    demo, tests = commands(block)
    assert "pact_jax.demo" in demo and tests.endswith("pytest"), (demo, tests)
    return demo, tests


def _ignore(directory: str, names: list[str]) -> set[str]:
    skip = {".venv", ".git", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints"}
    return {n for n in names if n in skip or n.endswith(".egg-info")}


def _site_packages() -> list[pathlib.Path]:
    return [pathlib.Path(p) for p in dict.fromkeys(site.getsitepackages()) if pathlib.Path(p).is_dir()]


@pytest.fixture(scope="module")
def fresh_copy(tmp_path_factory):
    """``(repository copy, extra environment)``: the fresh venv finds installed dependencies on PYTHONPATH.

    The dependency directory links every distribution of this environment
    except pact_jax itself and the installer's own packages (pip, setuptools),
    which the fresh venv brings or fetches.
    """
    base = tmp_path_factory.mktemp("fresh")
    copy = base / "repo"
    shutil.copytree(REPO, copy, ignore=_ignore, symlinks=True)
    deps = base / "deps"
    deps.mkdir()
    own = ("pact_jax", "__editable__", "pip", "setuptools", "_distutils_hack", "pkg_resources", "wheel", "__pycache__")
    for sp in _site_packages():
        for entry in sp.iterdir():
            if entry.name.startswith(own) or entry.suffix == ".pth" or (deps / entry.name).exists():
                continue
            (deps / entry.name).symlink_to(entry)
    return copy, {"PYTHONPATH": str(deps), "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _fresh_venv_runs_the_copy(copy: pathlib.Path, extra: dict[str, str]):
    """The copy's .venv has pact_jax installed (editable, from the copy) and its ``pact-jax`` script."""
    venv_bin = copy / ".venv" / "bin"
    elsewhere = copy.parent / "elsewhere"  # not the copy: imports come from the installed package
    elsewhere.mkdir(exist_ok=True)
    res = subprocess.run([str(venv_bin / "python"), "-c", "import pact_jax; print(pact_jax.__file__)"],
                         cwd=elsewhere, env=env(**extra), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() != "None", (res.stdout, res.stderr[-3000:])
    assert pathlib.Path(res.stdout.strip()).resolve().is_relative_to(copy.resolve()), res.stdout
    res = subprocess.run([str(venv_bin / "pact-jax"), "merge", "--help"], env=env(**extra), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0 and "--pretrained" in res.stdout, res.stderr[-3000:]


def test_setup_demo_command_runs_as_written(fresh_copy):
    """``python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python -m pact_jax.demo``."""
    copy, extra = fresh_copy
    demo, _ = setup_commands()
    res = run(demo, copy, timeout=1200, **extra)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "Merged encoders" in res.stdout, res.stdout[-3000:]
    for method in ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts"):
        assert re.search(rf"(?m)^{method}\s+\d", res.stdout), method
    _fresh_venv_runs_the_copy(copy, extra)


def test_setup_test_command_installs_and_collects(fresh_copy):
    """The test command as written; its ``pytest`` only collects (``PYTEST_ADDOPTS``), see the module doc."""
    copy, extra = fresh_copy
    _, tests = setup_commands()
    assert tests in (REPO / ".ci" / "run").read_text(), "README says CI runs exactly this command (.ci/run)"
    res = run(tests, copy, timeout=1200, PYTEST_ADDOPTS="--collect-only -q", **extra)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert re.search(r"\d+(/\d+)? tests? (collected|selected)", res.stdout), res.stdout[-3000:]
    assert "tests/test_readme.py::" in res.stdout and "tests/test_notebooks.py::" in res.stdout
    _fresh_venv_runs_the_copy(copy, extra)


# --------------------------------------------------------------------------
# Command line and YAML


def cli_block() -> str:
    (block,) = [text for lang, text in fenced_blocks() if is_cli_block(lang, text)]
    return block


def yaml_block() -> str:
    (block,) = [text for lang, text in fenced_blocks() if is_yaml_block(lang, text)]
    return block


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """Runs the README's CLI block in a scratch directory: ``(directory, completed process)``."""
    if shutil.which("pact-jax", path=env()["PATH"]) is None:
        pytest.fail("pact-jax is not installed: pip install -e .")
    scratch = tmp_path_factory.mktemp("readme")
    return scratch, run(cli_block(), scratch)


def test_cli_example_runs_as_pasted(cli_run):
    scratch, res = cli_run
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(r"tsv \+ PACT( \(on \d+ matri(x|ces)\))?, alpha 1\.0", res.stdout), res.stdout[-3000:]
    assert "merged 4 task(s)" in res.stdout
    assert "reliance" in res.stdout and "protect" in res.stdout  # inspect's PACT statistics
    merged = io.load(scratch / "merged_tsv_pact")
    assert set(io.flatten(merged)) == set(io.flatten(io.load(scratch / "demo_ckpts" / "pretrained")))


def test_yaml_example_runs(cli_run):
    scratch, res = cli_run
    assert res.returncode == 0, res.stderr[-3000:]  # the YAML names the checkpoints the CLI block wrote
    first_line = yaml_block().splitlines()[0]
    name, cmd = re.fullmatch(r"# (\S+) — run with: (.+)", first_line).groups()
    (scratch / name).write_text(yaml_block())
    res = run(f"{cmd} --no-progress", scratch)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dare_ties + PACT" in res.stdout
    assert io.detect_format(scratch / "merged_dare_ties.safetensors") == "safetensors"


# --------------------------------------------------------------------------
# Python


def test_python_blocks_run():
    blocks = code_blocks("python")
    assert blocks, "README has no python example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    params, pretrained = namespace["params"], namespace["pretrained"]
    import jax

    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(pretrained)


def test_python_api_example_is_about_ten_lines():
    (block,) = [b for b in code_blocks("python") if "pact_jax.chain" in b]
    assert len(commands(block)) <= 12, "the README promises a Python API example in ten lines"


# --------------------------------------------------------------------------
# Benchmarks: parsed, and the cheap ones run with tiny sizes


def benchmark_commands() -> dict[str, str]:
    """``{module: command}`` for every ``python -m benchmarks.X`` in the README's benchmark block."""
    (block,) = [text for lang, text in fenced_blocks() if is_benchmark_block(lang, text)]
    found = {m: f"python -m benchmarks.{m}" for m in re.findall(r"python -m benchmarks\.(\w+)", block)}
    for cmd in commands(block):
        found[cmd.split()[2].removeprefix("benchmarks.")] = cmd
    return found


def test_benchmark_commands_parse():
    cmds = benchmark_commands()
    assert {"streaming", "quality", "speed", "scaling"} <= set(cmds), cmds
    for module, cmd in cmds.items():
        res = run(f"{cmd} --help", REPO, timeout=300)
        assert res.returncode == 0 and "usage:" in res.stdout, (module, res.stderr[-3000:])


def test_benchmark_torch_pin_matches_the_bench_extra():
    (block,) = [text for lang, text in fenced_blocks() if is_benchmark_block(lang, text)]
    pins = re.findall(r"pip install (torch==[\w.+]+)", block)
    with open(REPO / "pyproject.toml", "rb") as f:
        bench = tomllib.load(f)["project"]["optional-dependencies"]["bench"]
    assert pins and all(p in bench for p in pins), (pins, bench)


def test_benchmark_speed_dry_run():
    res = run(f"{benchmark_commands()['speed']} --dry-run", REPO, timeout=300)
    assert res.returncode == 0 and "ESTIMATE" in res.stdout, res.stderr[-3000:]


def test_benchmark_scaling_tiny():
    cmd = f"{benchmark_commands()['scaling']} --tasks 2 --layers 2 --width 32 --repeats 1 --devices 1 2"
    res = run(cmd, REPO, timeout=300)
    assert res.returncode == 0 and "shard_merge, 2 devices" in res.stdout, res.stderr[-3000:]


def test_benchmark_streaming_tiny(tmp_path):
    cmd = f"{benchmark_commands()['streaming']} --tasks 2 --layers 2 --width 64 --budget-mib 1 --root {tmp_path}"
    res = run(cmd, REPO, timeout=300)
    assert res.returncode == 0 and "| streamed |" in res.stdout, res.stderr[-3000:]
