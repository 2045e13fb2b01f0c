"""Shared by the reproduce_* benchmark scripts (not imported by the package): run one adapt config, or read a
finished run of the same config back, with a lock so several ``--reuse`` workers can share one work dir."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from topotransfer.config import RunConfig, to_dict
from topotransfer.training.run import existing_run


def run_or_reuse(cfg: RunConfig, out: Path, reuse: bool, report_only: bool, run: Callable[[RunConfig], Any]) -> dict | None:
    """The results of ``run(cfg)`` (``run_adapt``, writing to ``out``). With ``reuse``, a finished run of the same
    config in ``out`` is read back instead of rerun; with ``report_only`` an unfinished one is skipped (``None``),
    and so is, with ``reuse``, a run another process has claimed."""
    if reuse and (out / "results.json").is_file() and (out / "config.yaml").is_file():
        if yaml.safe_load((out / "config.yaml").read_text()) == to_dict(cfg):
            return json.loads((out / "results.json").read_text())
        if not report_only:  # another config there: not this run; it is run again (and replaces that one)
            print(f"--reuse: {out} holds a run of another config; running it again", file=sys.stderr)
    if report_only:
        return None  # not finished (or another config): left out of the report
    if not reuse:
        _clear(out)
        return run(cfg).results
    # Several benchmark processes may share a work dir (--reuse): a lock file claims the run, a process that
    # finds it claimed skips it (its report then lacks that run; --report-only at the end collects them all).
    lock = out.parent / f"{out.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        _clear(out)
        return run(cfg).results
    finally:
        lock.unlink(missing_ok=True)


def _clear(out: Path) -> None:
    """Remove an earlier (unfinished, or other-config) run from the benchmark's own run directory ``out``: the
    benchmark reruns it there (a recipe refuses a directory holding another run)."""
    for name in existing_run(out):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def wall_text(results: dict, args: argparse.Namespace, wall: float) -> str:
    """The wall time line: this command's, or (``--report-only``) the sum over the runs read back."""
    if not getattr(args, "report_only", False):
        return f"total wall time {wall / 60:.1f} min"
    runs = [r for bm in results.values() for rs in bm.values() for r in rs]
    return (f"report written with --report-only from {len(runs)} finished runs; sum of their wall times "
            f"{sum(r['wall_time'] for r in runs) / 60:.1f} min")
