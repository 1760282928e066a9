"""Writes colab/quickstart.ipynb and colab/your_checkpoints.ipynb (outputs stripped).

The notebooks are generated so their code lives in reviewable Python; edit
this file and run ``python colab/make_notebooks.py``. ``tests/test_notebooks.py``
executes both (with ``PACT_JAX_QUICK=1``: fewer training steps) and checks the
committed files match this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# A Colab form field (``# @param``) names the package source; nothing is invented: with the field
# empty and pact_jax not importable the cell stops with one sentence saying what to paste.
INSTALL = r'''# Install pact_jax, then print which one this notebook uses.
# Already importable (a venv made as in the README, CI): nothing is installed. Otherwise paste a
# pip requirement into PACKAGE_SOURCE (a form field on Colab):
#   * a git URL of the repository:  git+https://<host>/<owner>/pact_jax.git   (https://...git works too)
#   * a wheel uploaded to the runtime (Files pane):  /content/pact_jax-0.1.0-py3-none-any.whl
#   * "." when this notebook runs inside a clone (any folder of it): pip install -e <the clone>
PACKAGE_SOURCE = ""  # @param {type:"string"}
import importlib, importlib.util, pathlib, re, subprocess, sys, tomllib


def find_clone(start="."):
    """The directory holding pact_jax's pyproject.toml: start, a parent of it, or a child of it."""
    start = pathlib.Path(start).resolve()
    for d in [start, *start.parents, *sorted(p for p in start.iterdir() if p.is_dir())]:
        try:
            name = tomllib.loads((d / "pyproject.toml").read_text())["project"]["name"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            continue
        if re.sub(r"[-_.]+", "-", name).lower() == "pact-jax":
            return d
    return None


def pip_target(source):
    """The pip arguments installing PACKAGE_SOURCE (a clone as an editable install)."""
    source = source.strip()
    if re.match(r"(https?|ssh)://|git@", source) and source.endswith(".git"):
        source = "git+" + source
    if source.startswith("git+") or source.endswith((".whl", ".tar.gz", ".zip")) or "://" in source:
        return [source], None
    clone = find_clone(source)
    if clone is None:
        raise RuntimeError(f"PACKAGE_SOURCE = {source!r}: no clone of pact_jax (a pyproject.toml naming it) "
                           "at, above or just below that folder; paste a git URL or a wheel's path instead.")
    return ["-e", str(clone)], clone


if importlib.util.find_spec("pact_jax") is None:
    if not PACKAGE_SOURCE.strip():
        raise RuntimeError("pact_jax is not installed: paste its source into PACKAGE_SOURCE above (a git URL "
                           "such as git+https://<host>/<owner>/pact_jax.git, an uploaded wheel's path, or . "
                           "inside a clone), then run this cell again.")
    target, clone = pip_target(PACKAGE_SOURCE)
    print("installing pact_jax: pip install", *target)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *target])
    if clone is not None:
        sys.path.insert(0, str(clone))  # an editable install is seen by new processes; this kernel needs the path
    importlib.invalidate_caches()
import jax, pact_jax
print(f"pact_jax {pact_jax.__version__} from {pathlib.Path(pact_jax.__file__).parent}")
print(f"jax {jax.__version__}, devices: {jax.devices()}")'''

QUICKSTART = [
    new_markdown_cell(
        "# pact_jax quickstart\n\n"
        "Build a small model zoo in this notebook (a tiny Flax encoder pre-trained on synthetic data and "
        "fine-tuned on four tasks; nothing is downloaded), merge the fine-tuned encoders with Task "
        "Arithmetic, TIES, TSV-M and Iso-CTS, each **with and without PACT**, evaluate, plot, and look at "
        "PACT's per-layer Load-Bearing-Wall statistics. Runs on a free CPU or GPU runtime in a few minutes."
    ),
    new_code_cell(INSTALL),
    new_markdown_cell(
        "## 1. Build the zoo (or load the cached one), merge, evaluate\n\n"
        "`pact_jax.demo.run_demo` pre-trains, fine-tunes, merges every method with and without PACT "
        "(alpha chosen on a validation split, accuracy on a test split) and writes the models as orbax "
        "checkpoints under `save_dir`. The results are cached next to them, so running the notebook again "
        "loads the zoo instead of rebuilding it (delete `quickstart_zoo/` to rebuild)."
    ),
    new_code_cell(
        "import dataclasses, json, os, pathlib, shutil\n"
        "from pact_jax import demo\n\n"
        "QUICK = os.environ.get('PACT_JAX_QUICK') == '1'   # CI runs a reduced setting\n"
        "cfg = demo.DemoConfig(\n"
        "    methods=('task_arithmetic', 'ties', 'tsv', 'iso_cts'),\n"
        "    finetune_steps=100 if QUICK else 1000,\n"
        "    pretrain_steps=300 if QUICK else 1500,\n"
        "    probe_steps=50 if QUICK else 200,\n"
        "    save_dir='quickstart_zoo',\n"
        ")\n"
        "cache = pathlib.Path(cfg.save_dir) / 'results.json'\n"
        "results = json.loads(cache.read_text()) if cache.exists() else None\n"
        "if results is not None and results['config'] == json.loads(json.dumps(dataclasses.asdict(cfg))):\n"
        "    print('loaded the cached zoo and its results from', cache)\n"
        "else:                                               # build it (again, if the settings changed)\n"
        "    shutil.rmtree(cfg.save_dir, ignore_errors=True)\n"
        "    results = demo.run_demo(cfg, log=print)\n"
        "    cache.write_text(json.dumps(results, default=float))\n"
        "print(demo.format_report(results))"
    ),
    new_markdown_cell("## 2. Plot: accuracy of each merge, with and without PACT"),
    new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n\n"
        "names = list(results['methods'])\n"
        "x = np.arange(len(names))\n"
        "fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))\n"
        "for ax, key, label in [(axes[0], 'mean', 'mean test accuracy (%)'),\n"
        "                       (axes[1], 'normalized', 'normalized accuracy (% of fine-tuned)')]:\n"
        "    ax.bar(x - 0.2, [100 * results['methods'][m]['plain'][key] for m in names], 0.4, label='plain')\n"
        "    ax.bar(x + 0.2, [100 * results['methods'][m]['pact'][key] for m in names], 0.4, label='+ PACT')\n"
        "    ax.axhline(100 * results['pretrained'][key], color='gray', ls='--', label='pre-trained')\n"
        "    ax.axhline(100 * results['finetuned'][key], color='black', ls=':', label='individual fine-tuned')\n"
        "    ax.set_xticks(x, names); ax.set_ylabel(label)\n"
        "axes[1].legend(loc='lower right'); plt.tight_layout(); plt.show()\n"
        "for m in names:\n"
        "    r = results['methods'][m]\n"
        "    print(f\"{m:16s} plain {100 * r['plain']['mean']:5.1f}%  with PACT {100 * r['pact']['mean']:5.1f}%\")"
    ),
    new_markdown_cell(
        "## 3. The same with the Python API, from the checkpoints on disk\n\n"
        "Load with `pact_jax.io`, build a merge with `pact_jax.recipes.make_merge` (or compose your own "
        "with `pact_jax.chain`), and sweep `alpha` cheaply from one `merge.delta`."
    ),
    new_code_cell(
        "from pact_jax import io, recipes\n\n"
        "pre = io.load('quickstart_zoo/pretrained')\n"
        "fts = [io.load(f'quickstart_zoo/task{t}') for t in range(cfg.num_tasks)]\n"
        "merge = recipes.make_merge('tsv', use_pact=True)\n"
        "delta = merge.delta(pre, fts)                      # PACT + TSV-M, before alpha\n"
        "for alpha in (0.5, 1.0, 1.5):\n"
        "    merged = pact_jax.apply_delta(pre, delta, alpha)\n"
        "    print(alpha, {p: float(np.linalg.norm(np.asarray(v) - np.asarray(io.flatten(pre)[p])))\n"
        "                  for p, v in io.flatten(merged).items() if p.endswith('kernel')})"
    ),
    new_markdown_cell(
        "## 4. PACT's Load-Bearing Walls, per layer\n\n"
        "`pact_jax.lbw_statistics` reports, per matrix and on the input side (the left singular vectors of a "
        "Flax kernel `(d_in, d_out)`): the dimension `K` of the pre-trained core, and per task the dimensions "
        "of its explicit space (its own top directions), of its implicit reliance space (the core without "
        "them: its Load-Bearing Walls) and of its protect space (the other tasks' reliance spaces, removed "
        "from its task vector), and how much of each task vector PACT removes. `pact_jax.PACT_PRESETS` "
        "holds other settings, e.g. `'light'`, which removes far less."
    ),
    new_code_cell(
        "stacked = pact_jax.task_vectors(pre, fts)\n"
        "stats = pact_jax.lbw_statistics(pre, stacked)                          # the defaults: preset 'paper'\n"
        "light = pact_jax.lbw_statistics(pre, stacked, **pact_jax.pact_preset('light'))\n"
        "layers = list(stats)\n"
        "reliance = np.array([stats[p]['left']['reliance_dims'] for p in layers])  # (layers, T)\n"
        "protect = np.array([stats[p]['left']['protect_dims'] for p in layers])    # (layers, T)\n"
        "removed = np.array([stats[p]['energy_removed'] for p in layers])          # (layers, T)\n"
        "removed_light = np.array([light[p]['energy_removed'] for p in layers])\n"
        "fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))\n"
        "for t in range(reliance.shape[1]):\n"
        "    axes[0].plot(reliance[:, t], 'o-', label=f'task {t} reliance')\n"
        "    axes[0].plot(protect[:, t], 'x--', label=f'task {t} protect')\n"
        "    axes[1].plot(100 * removed[:, t], 'o-', label=f'task {t} paper')\n"
        "    axes[1].plot(100 * removed_light[:, t], 'x--', label=f'task {t} light')\n"
        "axes[0].set_title('reliance / protect dims per layer'); axes[1].set_title('energy removed from tau_t (%)')\n"
        "for a in axes: a.set_xticks(range(len(layers)), [p.rsplit('/', 2)[-2] for p in layers], rotation=30)\n"
        "axes[1].legend(fontsize=7); plt.tight_layout(); plt.show()\n"
        "for p in layers:\n"
        "    s = stats[p]['left']\n"
        "    print(p, 'K', int(s['pretrained_dims']), 'task', s['task_dims'], 'reliance', s['reliance_dims'],\n"
        "          'protect', s['protect_dims'])"
    ),
]

YOUR_CHECKPOINTS = [
    new_markdown_cell(
        "# Merge your own checkpoints\n\n"
        "With the Python API and with the `pact-jax` command line; orbax (default), Flax msgpack, "
        "safetensors and T5X checkpoints; streaming under a memory budget; sharded over all devices "
        "of a TPU/GPU runtime (on Colab: *Runtime > Change runtime type > TPU*). The cells write small "
        "stand-in checkpoints first; replace their paths with yours."
    ),
    new_code_cell(INSTALL),
    new_markdown_cell("## 0. Stand-in checkpoints (replace with your own paths)"),
    new_code_cell(
        "import os\n"
        "import flax.linen as nn, numpy as np\n"
        "from pact_jax import io\n\n"
        "class Net(nn.Module):\n"
        "    @nn.compact\n"
        "    def __call__(self, x):\n"
        "        x = nn.relu(nn.Dense(128, name='dense_0')(x))\n"
        "        x = nn.DenseGeneral((4, 32), name='query')(x)              # attention-style kernel (128, 4, 32)\n"
        "        return nn.Dense(10, name='head')(x.reshape(x.shape[0], -1))\n\n"
        "pre = Net().init(jax.random.key(0), np.ones((1, 64)))\n"
        "def finetune(t):  # stand-in for a fine-tuned model: a small random update per task\n"
        "    key = jax.random.key(t + 1)\n"
        "    return jax.tree.map(lambda w: w + 0.02 * jax.random.normal(key, w.shape), pre)\n\n"
        "PRE, FTS = 'ckpts/pretrained', [f'ckpts/task{t}' for t in range(3)]\n"
        "if not os.path.exists(PRE):\n"
        "    io.save(PRE, pre)                                        # orbax (default)\n"
        "    for t, path in enumerate(FTS):\n"
        "        io.save(path, finetune(t))\n"
        "    io.save('ckpts/task0.msgpack', io.load(FTS[0]))            # the same model as Flax msgpack\n"
        "    io.save('ckpts/task0.safetensors', io.load(FTS[0]))        # ... and as safetensors\n"
        "print({p: io.detect_format(p) for p in [PRE, 'ckpts/task0.msgpack', 'ckpts/task0.safetensors']})"
    ),
    new_markdown_cell(
        "## 1. Python API, whole model in memory\n\n"
        "`io.load` detects the format (orbax, Flax msgpack, safetensors, T5X); here task 0 comes from the "
        "Flax msgpack file."
    ),
    new_code_cell(
        "from pact_jax import recipes\n\n"
        "params_pre = io.load(PRE)\n"
        "params_fts = [io.load('ckpts/task0.msgpack')] + [io.load(p) for p in FTS[1:]]\n"
        "merge = recipes.make_merge('iso_cts', use_pact=True, alpha=1.0)   # PACT + Iso-CTS\n"
        "merged = merge(params_pre, params_fts)\n"
        "io.save('merged_api', merged, overwrite=True)\n"
        "print(jax.tree.map(lambda x: (x.shape, str(x.dtype)), io.load('merged_api')))"
    ),
    new_markdown_cell(
        "## 2. Streaming: never more than a budget of memory\n\n"
        "`merge_checkpoints` reads, merges and writes groups of same-shape leaves; the result equals the "
        "in-memory merge. Mixed input formats are fine."
    ),
    new_code_cell(
        "from pact_jax.io import streaming\n\n"
        "report = streaming.merge_checkpoints(\n"
        "    PRE, ['ckpts/task0.safetensors', FTS[1], FTS[2]], 'merged_stream.safetensors',\n"
        "    recipes.make_merge('ties', use_pact=True), budget_bytes=2**20, overwrite=True)\n"
        "print(report.summary())"
    ),
    new_markdown_cell(
        "## 3. The command line\n\n"
        "The same merges from a shell (`!` runs one in a notebook); `pact-jax merge --help` lists every flag."
    ),
    new_code_cell(
        "!pact-jax merge --pretrained ckpts/pretrained --finetuned ckpts/task0 ckpts/task1 ckpts/task2 "
        "--method tsv --pact --output merged_cli --overwrite --no-progress\n"
        "# a PACT preset on the first half of the matrices (model order), and SIFT instead of PACT\n"
        "!pact-jax merge --pretrained ckpts/pretrained --finetuned ckpts/task0 ckpts/task1 ckpts/task2 "
        "--method tsv --pact-preset light --pact-layer-ratio 0.5 --output merged_cli_light --overwrite --no-progress\n"
        "!pact-jax merge --pretrained ckpts/pretrained --finetuned ckpts/task0 ckpts/task1 ckpts/task2 "
        "--method task_arithmetic --sift --output merged_cli_sift --overwrite --no-progress\n"
        "!pact-jax inspect ckpts/task0 --pretrained ckpts/pretrained --finetuned ckpts/task1 ckpts/task2"
    ),
    new_markdown_cell(
        "## 4. T5X checkpoints\n\n"
        "T5X step directories (`<model_dir>/checkpoint_<step>/`, legacy msgpack + TensorStore or "
        "orbax-based) are detected like the other formats: pass them as `--pretrained` / `--finetuned` "
        "(or to `io.load`). The `target` parameters are merged, and the output is written in the "
        "pre-trained checkpoint's layout, its optimizer state and step copied. The stand-ins below are "
        "written as t5x's orbax `CheckpointManager` does; point the paths at your own `checkpoint_<step>`."
    ),
    new_code_cell(
        "import orbax.checkpoint as ocp\n\n"
        "def write_t5x(model_dir, params):  # a stand-in T5X checkpoint_0: item 'state' = {target, state}\n"
        "    state = {'target': params['params'],\n"
        "             'state': {'step': np.int32(0), 'param_states': jax.tree.map(np.zeros_like, params['params'])}}\n"
        "    options = ocp.CheckpointManagerOptions(step_prefix='checkpoint', create=True)\n"
        "    with ocp.CheckpointManager(os.path.abspath(model_dir), item_names=('state',), options=options) as m:\n"
        "        m.save(0, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))\n"
        "    return f'{model_dir}/checkpoint_0'\n\n"
        "T5X_PRE = 't5x/pretrained/checkpoint_0'\n"
        "T5X_FTS = [f't5x/task{t}/checkpoint_0' for t in range(3)]\n"
        "if not os.path.exists(T5X_PRE):\n"
        "    write_t5x('t5x/pretrained', params_pre)\n"
        "    for t, path in enumerate(FTS):\n"
        "        write_t5x(f't5x/task{t}', io.load(path))\n"
        "print(io.detect_format(T5X_PRE), sorted(io.flatten(io.load(T5X_PRE))))"
    ),
    new_code_cell(
        "!pact-jax merge --pretrained {T5X_PRE} --finetuned {' '.join(T5X_FTS)} --method ties --pact "
        "--output t5x/merged/checkpoint_0 --overwrite --no-progress\n"
        "print(io.detect_format('t5x/merged/checkpoint_0'), 'with', len(io.flatten(io.load('t5x/merged/checkpoint_0'))), 'leaves')"
    ),
    new_markdown_cell(
        "## 5. Sharded over every device (TPU / multi-GPU runtime)\n\n"
        "`pact_jax.sharding.shard_merge` runs the merge as one `jax.jit` program over a device mesh: "
        "parameters split across devices, each device doing the SVDs of its layers. On a single-device "
        "runtime the mesh has one device and the result is the same. From the command line: `--mesh auto` "
        "(all devices) or `--mesh TxL`."
    ),
    new_code_cell(
        "from pact_jax import sharding\n\n"
        "mesh = sharding.make_mesh()\n"
        "print('mesh:', dict(mesh.shape), 'on', jax.devices()[0].platform)\n"
        "smerge = sharding.shard_merge(recipes.make_merge('tsv', use_pact=True), mesh)\n"
        "sharded = smerge(params_pre, params_fts)\n"
        "ref = recipes.make_merge('tsv', use_pact=True)(params_pre, params_fts)\n"
        "print('max |sharded - unsharded|:', max(float(np.abs(np.asarray(a) - np.asarray(b)).max())\n"
        "      for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(ref))))\n"
        "# the CLI: each group of leaves merged over a mesh of all devices\n"
        "!pact-jax merge --pretrained {PRE} --finetuned {' '.join(FTS)} --method tsv --pact --mesh auto "
        "--output merged_mesh --overwrite --no-progress"
    ),
]


def notebooks() -> dict[str, nbformat.NotebookNode]:
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}, "colab": {"provenance": []}}  # fmt: skip
    return {
        "quickstart.ipynb": new_notebook(cells=QUICKSTART, metadata=meta),
        "your_checkpoints.ipynb": new_notebook(cells=YOUR_CHECKPOINTS, metadata=meta),
    }


def render(nb: nbformat.NotebookNode) -> str:
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"  # stable ids: the files only change when the code does
    return nbformat.writes(nb)


if __name__ == "__main__":
    for name, nb in notebooks().items():
        (HERE / name).write_text(render(nb))
        print("wrote", HERE / name, file=sys.stderr)
