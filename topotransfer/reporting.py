"""Finished runs side by side: read run directories (``results.json``, ``history.json``) and tabulate them
(``topotransfer report``).

Errors are in % for classification and MSE for regression; the best-validation model and the final model
each come with their own depth and parameter count (a grown network's best-validation model may be
shallower than the final one).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import TopoTransferError

__all__ = ["RunNotFoundError", "RunSummary", "read_run", "report_table"]


class RunNotFoundError(TopoTransferError, FileNotFoundError):
    """A directory given to ``plot`` / ``report`` holds no run (no results.json / history.json)."""


@dataclass
class RunSummary:
    """One finished run, as in its ``results.json`` (and ``history.json`` for the best model's size)."""

    path: Path
    recipe: str  # "grow" or "adapt"
    task: str
    method: str
    seed: int | None
    regression: bool
    best_error: float | None  # test error of the best-validation model (grow); adapt has the final one only
    best_depth: int | None
    best_params: int | None
    final_error: float | None
    final_depth: int | None
    final_params: int | None
    best_epoch: int | None = None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise RunNotFoundError(f"{path} is not valid JSON ({e}): the run did not finish writing it?") from e
    if not isinstance(value, dict):
        raise RunNotFoundError(f"{path} does not hold a JSON object")
    return value


def read_history(path: str | Path) -> dict:
    """``history.json`` of run directory ``path`` (``{"epochs": [...], "events": [...]}``).

    Raises:
        RunNotFoundError: no (readable) ``history.json``.
    """
    f = Path(path) / "history.json"
    if not f.is_file():
        raise RunNotFoundError(f"{path} holds no history.json: give the output_dir of a grow or adapt run")
    hist = _read_json(f)
    hist.setdefault("epochs", [])
    hist.setdefault("events", [])
    return hist


def read_run(path: str | Path) -> RunSummary:
    """The :class:`RunSummary` of a finished run directory.

    Raises:
        RunNotFoundError: no ``results.json`` (the run is not finished, or it is not a run directory).
    """
    path = Path(path)
    f = path / "results.json"
    if not f.is_file():
        raise RunNotFoundError(f"{path} holds no results.json: the run has not finished (or it is not an output_dir)")
    res = _read_json(f)
    regression = res.get("task") == "regression"
    if "final_test_error" in res:  # grow: best-validation model and final model
        best_params = None
        best_epoch = res.get("best_epoch")
        if (path / "history.json").is_file() and best_epoch:
            epochs = {e.get("epoch"): e for e in read_history(path)["epochs"]}
            best_params = epochs.get(best_epoch, {}).get("params")
        return RunSummary(path, "grow", res.get("task", "?"), res.get("method", "?"), res.get("seed"), regression,
                          res.get("test_error"), res.get("best_depth"), best_params, res.get("final_test_error"),
                          res.get("depth"), res.get("params"), best_epoch)
    # adapt: the model evaluated is the final one
    return RunSummary(path, "adapt", res.get("task", "?"), res.get("method", "?"), res.get("seed"), regression,
                      None, None, None, res.get("test_error"), res.get("depth"), res.get("params"))


def _error(value: float | None, regression: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if regression else f"{100 * value:.2f}%"


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def report_table(paths: list[str | Path], fmt: str = "text") -> str:
    """A table of runs: method, seed, the best-validation model's test error / depth / params and the final
    model's, one row per directory (errors in % for classification, MSE for regression).

    Args:
        fmt: "text" (aligned columns), "markdown" or "csv" (raw numbers: errors as fractions / MSE).

    Raises:
        RunNotFoundError: a directory holds no finished run.
    """
    runs = [read_run(p) for p in paths]
    header = ["run", "task", "method", "seed", "best-val test error", "depth", "params", "final test error",
              "depth", "params"]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["run", "task", "method", "seed", "best_val_test_error", "best_depth", "best_params",
                         "final_test_error", "final_depth", "final_params"])
        for r in runs:
            writer.writerow([r.path, r.task, r.method, r.seed, r.best_error, r.best_depth, r.best_params,
                             r.final_error, r.final_depth, r.final_params])
        return buf.getvalue().rstrip("\n")
    rows = [[str(r.path), r.task, r.method, "-" if r.seed is None else str(r.seed), _error(r.best_error, r.regression),
             _int(r.best_depth), _int(r.best_params), _error(r.final_error, r.regression), _int(r.final_depth),
             _int(r.final_params)] for r in runs]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt_row = lambda row: "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))  # noqa: E731
    note = "errors: % for classification, MSE for regression; adapt runs report their final model only"
    return "\n".join([fmt_row(header), *map(fmt_row, rows), note])
