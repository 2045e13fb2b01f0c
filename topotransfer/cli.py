"""Command line: ``topotransfer {grow,adapt,derivative,validate,configs} [--config X.yaml] [key=value ...]``.

``--config`` takes a path or the name of a built-in config (``topotransfer configs`` lists them);
without it the built-in defaults are used. Heavy imports happen inside the commands so that
``topotransfer --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BUILTIN_CONFIGS = Path(__file__).parent / "configs"


def _resolve_config(name: str | None) -> Path | None:
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    builtin = BUILTIN_CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if builtin.is_file():
        return builtin
    known = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml")))
    raise SystemExit(f"error: config {name!r} is neither a file nor a built-in config ({known})")


def _load(args: argparse.Namespace, task: str):
    from .config import ConfigError, load_config

    try:
        cfg = load_config(_resolve_config(args.config), args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.task != task:
        raise SystemExit(f"error: config has task={cfg.task!r} but the command is {task!r}")
    return cfg


def _cmd_grow(args: argparse.Namespace) -> int:
    cfg = _load(args, "grow")
    from .recipes.grow import run_grow

    try:
        results = run_grow(cfg, resume=args.resume)
    except FloatingPointError as e:  # diverged: the message names the checkpoint that stays `latest`
        raise SystemExit(f"error: {e}") from None
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun only rank 0 reports
        return 0
    summary = {k: results[k] for k in ("method", "task", "test_error", "depth", "params", "insertions", "wall_time")}
    print(json.dumps(summary, indent=2))
    print(f"history, checkpoints and results in {cfg.output_dir}")
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    cfg = _load(args, "adapt")
    from .config import ConfigError
    from .errors import TopoTransferError
    from .recipes.adapt import run_adapt

    try:
        run = run_adapt(cfg, resume=args.resume)
    except (ConfigError, TopoTransferError) as e:  # user-fixable: a clear message, no traceback
        raise SystemExit(f"error: {e}") from None
    except FloatingPointError as e:  # diverged: the message names the checkpoint that stays `latest`
        raise SystemExit(f"error: {e}") from None
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch / torchrun only rank 0 reports
        return 0
    keys = ("method", "task", "val_error", "test_error", "insertions", "params", "trainable_params", "wall_time")
    print(json.dumps({k: run.results[k] for k in keys}, indent=2))
    print(f"results, adapter and merged export in {cfg.output_dir}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = _load(args, "pretrain")
    from .config import ConfigError
    from .errors import TopoTransferError
    from .recipes.pretrain import run_pretrain

    try:
        results = run_pretrain(cfg)
    except (ConfigError, TopoTransferError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(json.dumps({k: results[k] for k in ("task", "val_error", "test_error", "params", "wall_time")}, indent=2))
    print(f"backbone (save_pretrained + image processor) in {results['backbone']}: adapt it with "
          f"model.name_or_path={results['backbone']}")
    return 0


def _cmd_derivative(args: argparse.Namespace) -> int:
    cfg = _load(args, "grow")
    from .recipes.derivative import run_derivative

    run_derivative(cfg)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .config import to_dict

    cfg = _load(args, args.task)
    import yaml

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    for path in sorted(BUILTIN_CONFIGS.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        print(f"{path.stem:28s} {first.lstrip('# ')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="topotransfer",
        description="Where a network needs more depth, and how to initialise the new layer.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="YAML file or built-in config name (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-3")

    p = sub.add_parser("grow", help="grow a network from scratch (or run a growth baseline)")
    common(p)
    p.add_argument("--resume", action="store_true", help="continue from output_dir/latest if present")
    p.set_defaults(func=_cmd_grow)

    p = sub.add_parser("adapt", help="adapt a pretrained backbone to a dataset (TopoLayer insertion or a baseline)")
    common(p)
    p.add_argument("--resume", action="store_true", help="continue from output_dir/latest if present")
    p.set_defaults(func=_cmd_adapt)

    p = sub.add_parser("pretrain", help="train a small ViT from scratch and save it as a backbone for adapt")
    common(p)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("derivative", help="train the starting network briefly and print TD at every site")
    common(p)
    p.set_defaults(func=_cmd_derivative)

    p = sub.add_parser("validate", help="check a config and print it fully resolved")
    common(p)
    p.add_argument("--task", default="grow", choices=["grow", "adapt", "pretrain"])
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("configs", help="list the built-in configs")
    p.set_defaults(func=_cmd_configs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
