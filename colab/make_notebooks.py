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

INSTALL = '''\
# Install pact_jax (skipped when it is already importable, e.g. in CI).
# On Colab: set REPO_URL to your clone of the pact_jax repository.
import importlib.util, subprocess, sys
REPO_URL = "https://github.com/YOUR_ORG/pact_jax"
if importlib.util.find_spec("pact_jax") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"])
import jax, pact_jax
print("pact_jax", pact_jax.__version__, "| jax", jax.__version__, "| devices:", jax.devices())'''

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
        "## 1. Build the zoo and merge\n\n"
        "`pact_jax.demo.run_demo` pre-trains, fine-tunes, merges every method with and without PACT "
        "(alpha chosen on a validation split, accuracy on a test split) and writes the models as orbax "
        "checkpoints under `save_dir`."
    ),
    new_code_cell(
        "import os\n"
        "from pact_jax import demo\n\n"
        "QUICK = os.environ.get('PACT_JAX_QUICK') == '1'   # CI runs a reduced setting\n"
        "cfg = demo.DemoConfig(\n"
        "    methods=('task_arithmetic', 'ties', 'tsv', 'iso_cts'),\n"
        "    finetune_steps=100 if QUICK else 1000,\n"
        "    pretrain_steps=300 if QUICK else 1500,\n"
        "    probe_steps=50 if QUICK else 200,\n"
        "    save_dir='quickstart_zoo',\n"
        ")\n"
        "results = demo.run_demo(cfg, log=print)\n"
        "print(demo.format_report(results))"
    ),
    new_markdown_cell("## 2. Plot: normalized accuracy (merged / individual fine-tuned), with and without PACT"),
    new_code_cell(
        "import matplotlib.pyplot as plt\n"
        "import numpy as np\n\n"
        "names = list(results['methods'])\n"
        "plain = [100 * results['methods'][m]['plain']['normalized'] for m in names]\n"
        "pact = [100 * results['methods'][m]['pact']['normalized'] for m in names]\n"
        "x = np.arange(len(names))\n"
        "fig, ax = plt.subplots(figsize=(7, 3.5))\n"
        "ax.bar(x - 0.2, plain, 0.4, label='plain')\n"
        "ax.bar(x + 0.2, pact, 0.4, label='+ PACT')\n"
        "ax.axhline(100 * results['pretrained']['normalized'], color='gray', ls='--', label='pre-trained')\n"
        "ax.set_xticks(x, names); ax.set_ylabel('normalized accuracy (%)'); ax.legend(); plt.show()"
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
        "`pact_jax.lbw_statistics` reports, per matrix, how many pre-trained directions each task leaves "
        "anchored (LBW dimensions) and how much of each task vector PACT removes."
    ),
    new_code_cell(
        "stacked = pact_jax.task_vectors(pre, fts)\n"
        "stats = pact_jax.lbw_statistics(pre, stacked)\n"
        "layers = list(stats)\n"
        "lbw = np.array([stats[p]['left']['lbw_dims'] for p in layers])           # (layers, T)\n"
        "removed = np.array([stats[p]['energy_removed'] for p in layers])          # (layers, T)\n"
        "fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))\n"
        "for t in range(lbw.shape[1]):\n"
        "    axes[0].plot(lbw[:, t], 'o-', label=f'task {t}')\n"
        "    axes[1].plot(100 * removed[:, t], 'o-', label=f'task {t}')\n"
        "axes[0].set_title('LBW directions per layer'); axes[1].set_title('energy removed from tau_t (%)')\n"
        "for a in axes: a.set_xticks(range(len(layers)), [p.rsplit('/', 2)[-2] for p in layers], rotation=30)\n"
        "axes[1].legend(); plt.tight_layout(); plt.show()\n"
        "for p in layers:\n"
        "    print(p, 'pre-trained dims', int(stats[p]['left']['pretrained_dims']), 'LBW dims', stats[p]['left']['lbw_dims'])"
    ),
]

YOUR_CHECKPOINTS = [
    new_markdown_cell(
        "# Merge your own checkpoints\n\n"
        "With the Python API and with the `pact-jax` command line; orbax (default), Flax msgpack, "
        "safetensors and T5X checkpoints; streaming under a memory budget; sharded over all devices "
        "of a TPU/GPU runtime. The first cells write small stand-in checkpoints; replace the paths with yours."
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
    new_markdown_cell("## 1. Python API, whole model in memory"),
    new_code_cell(
        "from pact_jax import recipes\n\n"
        "params_pre = io.load(PRE)\n"
        "params_fts = [io.load(p) for p in FTS]\n"
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
        "The same merges from a shell (`!` runs one in a notebook). T5X checkpoint directories "
        "(`checkpoint_<step>/`, legacy msgpack+tensorstore or orbax-based) are detected the same way: "
        "pass them as `--pretrained` / `--finetuned` and the merged params are written back in the "
        "pre-trained checkpoint's layout."
    ),
    new_code_cell(
        "!pact-jax merge --pretrained ckpts/pretrained --finetuned ckpts/task0 ckpts/task1 ckpts/task2 "
        "--method tsv --pact --output merged_cli --overwrite --no-progress\n"
        "!pact-jax inspect ckpts/task0 --pretrained ckpts/pretrained --finetuned ckpts/task1 ckpts/task2"
    ),
    new_markdown_cell(
        "## 4. Sharded over every device (TPU / multi-GPU runtime)\n\n"
        "`pact_jax.sharding.shard_merge` runs the merge as one `jax.jit` program over a device mesh: "
        "parameters split across devices, each device doing the SVDs of its layers. On a single-device "
        "runtime the mesh has one device and the result is the same."
    ),
    new_code_cell(
        "from pact_jax import sharding\n\n"
        "mesh = sharding.make_mesh()\n"
        "print('mesh:', dict(mesh.shape), 'on', jax.devices()[0].platform)\n"
        "smerge = sharding.shard_merge(recipes.make_merge('tsv', use_pact=True), mesh)\n"
        "sharded = smerge(params_pre, params_fts)\n"
        "ref = recipes.make_merge('tsv', use_pact=True)(params_pre, params_fts)\n"
        "print('max |sharded - unsharded|:', max(float(np.abs(np.asarray(a) - np.asarray(b)).max())\n"
        "      for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(ref))))"
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
