"""The ``pact-jax`` command line: ``merge`` and ``inspect``.

    pact-jax merge --pretrained PRE --finetuned FT1 FT2 ... --method tsv --pact --output OUT
    pact-jax merge ... --method tsv --pact-preset light [--pact-layer-ratio 0.5 --pact-exclude head]
    pact-jax merge ... --method task_arithmetic --sift [--sift-arg pretrained_rank=0.5]
    pact-jax merge config.yaml [OUT] [--flags that override it]
    pact-jax merge mergekit.yml OUT_DIR         # a mergekit config, mergekit's numbers (docs/mergekit.md)
    pact-jax merge --pretrained BASE --finetuned ADAPTER1 ADAPTER2 ... [--output-lora RANK]  (PEFT LoRA folders)
    pact-jax merge ... --distributed [--coordinator-address H:P --num-processes N --process-id I]
    pact-jax inspect CKPT [--pretrained PRE] [--finetuned FT ...]

Exit codes: 0 success, 2 usage error (bad flags or config), 1 failure (a
message names the file and leaf). An output is written to a temporary
directory next to it and renamed into place when complete; an existing
output is never replaced without ``--overwrite``, and an input never.

``--distributed`` runs one merge over several processes (hosts): every
process runs the same command, :func:`pact_jax.sharding.initialize` joins
them (``jax.distributed``), the groups are merged over a global device mesh
(``--mesh``, default ``auto``) and written by all processes together (orbax
output) or gathered to process 0 (other formats); process 0 publishes the
output and prints the summary.

This module holds the parser, :func:`main` and the console script
(:func:`entry_point`); the rest lives one idea per module:
:mod:`pact_jax.cli_config` (YAML / mergekit config, flags on top, checks),
:mod:`pact_jax.cli_merge` (``merge``), :mod:`pact_jax.cli_inspect`
(``inspect``) and :mod:`pact_jax.cli_faults` (signals, one-line failures).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import yaml

# The parts of the command, one module each; imported here so that ``cli.run_merge``, ``cli.merge_settings``
# and ``cli.run_inspect`` are the names main() calls (a test may replace them on this module).
from pact_jax.cli_config import _OUTPUT_DTYPES, _RULE_KEYS, UsageError, merge_settings
from pact_jax.cli_faults import (
    Terminated,
    _message,
    _quiet_unraisable,
    _raise_interrupted,
    _raise_terminated,
    _RelayedThreadError,
)
from pact_jax.cli_inspect import run_inspect
from pact_jax.cli_merge import run_merge

USAGE_ERROR = 2
FAILURE = 1
INTERRUPTED = 130  # 128 + SIGINT, as shells report it
TERMINATED = 143  # 128 + SIGTERM


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def _add_pact_scope(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "PACT / SIFT scope",
        "Which matrices PACT's subspace perspective and SIFT filter (DESIGN §1a); every other leaf passes "
        "through them unchanged. Resolved over the pre-trained checkpoint's leaves before merging, so "
        "--pact-layer-ratio selects the same matrices with or without --budget-mib.",
    )
    g.add_argument("--pact-only-2d", action=argparse.BooleanOptionalAction, default=None,
                   help="only exactly-2-D weights, as the PACT authors (default: every matrix of the leaf rules)")
    g.add_argument("--pact-include", action="append", default=None, metavar="REGEX",
                   help="only matrices whose path matches one of these (repeatable)")
    g.add_argument("--pact-exclude", action="append", default=None, metavar="REGEX",
                   help="leave matrices whose path matches one of these alone (repeatable; default "
                        "text_projection; --pact-exclude '' excludes nothing)")
    g.add_argument("--pact-layer-ratio", type=float, metavar="F",
                   help="only the first fraction F in (0, 1] of those matrices in model order (natural sort "
                        "of paths; default 1)")  # fmt: skip


def _add_state_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "orbax steps and train states",
        "CheckpointManager roots as inputs and outputs; train states (params + optimizer state + step), of which "
        "only the params are merged. See docs/orbax.md.",
    )
    g.add_argument("--step", type=int, metavar="N",
                   help="read step N of inputs that are orbax CheckpointManager roots (default: each root's latest)")
    g.add_argument("--output-step", type=int, metavar="N",
                   help="--output is a CheckpointManager root (new or existing): write the merged model as its step "
                        "N, as CheckpointManager(root).save(N, ...) would; other steps are not touched, an existing "
                        "step N needs --overwrite")
    g.add_argument("--params-path", metavar="PATH",
                   help="the subtree that is the model, e.g. params or state/params (default: a train state's "
                        "top-level params, detected beside an opt_state; '' merges every leaf)")
    g.add_argument("--other-leaves", choices=("copy", "drop"),
                   help="the leaves outside --params-path (optimizer state, step): copy them from the pre-trained "
                        "checkpoint into the output (default), or drop them (the output holds the params alone)")


def _parser() -> argparse.ArgumentParser:
    from pact_jax import io, recipes

    presets = list(recipes.pact_presets())

    ap = argparse.ArgumentParser(prog="pact-jax", description="Merge fine-tuned JAX/Flax checkpoints, with PACT.")
    ap.add_argument("--traceback", action="store_true", help="print the full traceback on failure")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "merge",
        help="merge checkpoints into one",
        description="Merge fine-tuned checkpoints of one pre-trained model. Flags override the YAML config.",
    )
    m.add_argument("config", nargs="?",
                   help="YAML file whose keys mirror the flags (see README), or a mergekit config (models:, "
                        "base_model:, merge_method:; docs/mergekit.md)")  # fmt: skip
    m.add_argument("out", nargs="?", metavar="OUT", help="output, as in mergekit-yaml CONFIG OUT (same as --output)")
    m.add_argument("--pretrained", help="pre-trained checkpoint")
    m.add_argument("--finetuned", nargs="+", help="fine-tuned checkpoints, one per task")
    m.add_argument("--method", choices=recipes.ALL_METHODS, metavar="METHOD",
                   help=f"merging method, one of: {', '.join(recipes.ALL_METHODS)}")
    m.add_argument("--pact", action=argparse.BooleanOptionalAction, default=None, help="PACT pre-processing (default: off)")
    m.add_argument("--pact-preset", choices=presets,
                   help="PACT with a named set of hyperparameters (pact_jax.pact.PRESETS; implies --pact; "
                        "--pact-arg overrides single ones; 'paper' is the default set)")  # fmt: skip
    m.add_argument("--sift", action=argparse.BooleanOptionalAction, default=None,
                   help="SIFT pre-processing instead of PACT: remove each task vector's component in the "
                        "pre-trained top subspace (the PACT authors' ablation baseline; default: off)")  # fmt: skip
    m.add_argument("--alpha", type=float, help="scaling of the merged delta (default per method)")
    m.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="per-model weights, one per --finetuned checkpoint (average, task_arithmetic, ties, "
                        "dare_ties, dare_task_arithmetic; docs/mergekit.md)")  # fmt: skip
    m.add_argument(
        "--svd", choices=("exact", "randomized"),
        help="SVD of PACT's top-k / top-r factors and of TSV-M's per-task truncation (default exact; "
        "randomized uses --seed)",
    )
    m.add_argument("--seed", type=int, help="seed of the PRNG key for DARE / randomized SVD (default 0)")
    m.add_argument("--output", help="where to write the merged checkpoint")
    m.add_argument("--format", choices=io.FORMATS, help="input format (default: detected)")
    m.add_argument("--output-format", choices=io.FORMATS, help="output format (default: the pre-trained one's)")
    m.add_argument("--output-lora", type=int, metavar="RANK",
                   help="with PEFT adapter folders as --finetuned: write a merged PEFT adapter of this rank "
                        "(truncated SVD of each module's merged update) instead of the full model (docs/lora.md)")
    m.add_argument("--output-dtype", choices=_OUTPUT_DTYPES,
                   help="dtype of the output's float leaves (default: the pre-trained one's)")  # fmt: skip
    m.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output")
    _add_state_flags(m)
    m.add_argument("--budget-mib", type=float, help="memory budget of one group of leaves (default: whole model)")
    m.add_argument("--method-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="merger hyperparameter, e.g. density=0.2 (repeatable)")  # fmt: skip
    m.add_argument("--pact-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="PACT hyperparameter, e.g. task_rank=5 (repeatable)")  # fmt: skip
    m.add_argument("--sift-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="SIFT hyperparameter, e.g. pretrained_rank=0.5 (repeatable)")  # fmt: skip
    _add_pact_scope(m)
    for rule in _RULE_KEYS:
        m.add_argument(f"--{rule.replace('_', '-')}", dest=f"rule_{rule}", metavar="REGEX",
                       help=f"leaf rule: paths matching REGEX are '{rule}' (see LeafRules)")  # fmt: skip
    m.add_argument("--layout", choices=("auto", "flax", "torch"),
                   help="how the checkpoints store a linear map: flax kernels (in, out) or torch / Hugging Face "
                        "weights (out, in); auto (default) reads a safetensors header's format, else the leaf "
                        "names (.../weight: torch). See docs/layouts.md")  # fmt: skip
    m.add_argument("--row-axes", action="append", default=None, metavar="REGEX=K",
                   help="matrix view of the leaves whose path matches REGEX: the first K axes are the rows "
                        "(repeatable; before the default entries; YAML rules: {row_axes: {REGEX: K}})")  # fmt: skip
    m.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default on)")
    m.add_argument("--mesh", metavar="auto|TxL",
                   help="run each group's merge sharded over a device mesh: 'auto' (all devices on the layers "
                        "axis) or TASKSxLAYERS, e.g. 2x4 (default: one device)")  # fmt: skip
    m.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                   help="multi-process run: join the other processes with jax.distributed.initialize (run the "
                        "same command on every host); implies --mesh auto unless --mesh is given")  # fmt: skip
    m.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="with --distributed: process 0's address (default: detected on Cloud TPU, Slurm, Open MPI)")
    m.add_argument("--num-processes", type=int, metavar="N", help="with --distributed: number of processes")
    m.add_argument("--process-id", type=int, metavar="I", help="with --distributed: this process's id, 0..N-1")

    i = sub.add_parser(
        "inspect",
        help="show a checkpoint's tree, and task-vector / PACT statistics",
        description="List a checkpoint's leaves (path, shape, dtype, how the merge treats each); with --pretrained "
        "also the task vectors' norms and PACT's per-matrix statistics (core K, task, reliance and protect "
        "dimensions, energy removed).",
    )
    i.add_argument("checkpoint", help="checkpoint to inspect (fine-tuned, if --pretrained is given)")
    i.add_argument("--finetuned", nargs="*", default=[], help="more fine-tuned checkpoints (tasks) for PACT statistics")
    i.add_argument("--pretrained", help="pre-trained checkpoint: adds task-vector norms and PACT's LBW statistics")
    i.add_argument("--format", choices=io.FORMATS, help="input format (default: detected)")
    i.add_argument("--step", type=int, metavar="N",
                   help="CHECKPOINT is an orbax CheckpointManager root: inspect its step N (default: the latest)")
    i.add_argument("--pact-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="PACT hyperparameter for the statistics (repeatable)")  # fmt: skip
    i.add_argument("--pact-preset", choices=presets, help="PACT preset for the subspace statistics")
    i.add_argument("--layout", choices=("auto", "flax", "torch"), default="auto",
                   help="flax kernels (in, out) or torch weights (out, in), for PACT's input space (default: "
                        "detected, docs/layouts.md)")  # fmt: skip
    _add_pact_scope(i)
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pact_jax")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "(not installed)"


# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse: 2 on usage errors, 0 for --help
        return int(e.code or 0)
    start = time.perf_counter()
    relayed = None if args.traceback else _RelayedThreadError()
    if relayed is not None:
        logging.getLogger("absl").addFilter(relayed)
    try:
        if args.command == "merge":
            return run_merge(merge_settings(args))
        return run_inspect(args)
    except UsageError as e:
        print(f"pact-jax {args.command}: usage error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # `pact-jax inspect ... | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except KeyboardInterrupt as e:  # the writers' with-blocks removed what this run had staged
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        written = getattr(e, "written", None)
        done = f"{written} was written (complete) before that" if written else "nothing was written"
        print(f"pact-jax {args.command}: {what} after {time.perf_counter() - start:.0f} s; {done}.",
              file=sys.stderr)  # fmt: skip
        return TERMINATED if isinstance(e, Terminated) else INTERRUPTED
    except Exception as e:  # noqa: BLE001 - every failure becomes a message and exit code 1
        if args.traceback:
            traceback.print_exc()
        print(f"pact-jax {args.command}: error: {_message(e)}", file=sys.stderr)
        return FAILURE
    finally:
        if relayed is not None:
            logging.getLogger("absl").removeFilter(relayed)


def entry_point() -> None:  # console script
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored in a background job: kept so
        signal.signal(signal.SIGINT, _raise_interrupted)
    sys.unraisablehook = _quiet_unraisable
    code = main()
    # Done, or cleaned up: a signal now would only turn the exit status into -2 / -15.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code in (INTERRUPTED, TERMINATED):
        # Interpreter teardown with JAX / TensorStore threads stopped mid-work segfaulted in about half
        # of the Ctrl-C runs (rc -11 after the message): the run has cleaned up, so skip the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
