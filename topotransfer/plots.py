"""Plots people would rather look at than read: learning curves with growth events, TD per site.

matplotlib is optional (``pip install topotransfer[plots]``); it is imported only when plotting,
with the non-interactive Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_learning_curves", "plot_method_comparison", "plot_runs", "plot_site_scores"]


def _plt():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Plotting needs matplotlib: pip install 'topotransfer[plots]'", name="matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(runs: dict[str, dict], path: str | Path, title: str = "", log: bool = True) -> Path:
    """Validation loss per epoch for several runs, growth events marked with vertical ticks.

    Args:
        runs: label -> history dict as written to ``history.json`` (``{"epochs": [...], "events": [...]}``).
        path: output PNG.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, hist) in enumerate(runs.items()):
        color = f"C{i % 10}"
        ep = [e["epoch"] for e in hist["epochs"]]
        ax.plot(ep, [e["val_loss"] for e in hist["epochs"]], color=color, label=label, lw=1.3)
        for ev in hist.get("events", []):
            if ev.get("site") is not None:
                ax.axvline(ev["epoch"], color=color, ls=":", lw=0.9, alpha=0.8)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss")
    ax.set_title(title or "learning curves (dotted: growth events)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_site_scores(events: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Topological derivative per site at each growth event (one bar group per event); when the events were
    chosen by ``site_selection=realized``, a second row shows each site's line-searched held-out decrease.

    Args:
        events: growth events as in ``history.json`` (``scores``: site -> score of kind ``score_kind``, TD or
            theta^T Q_t theta; ``site``: chosen site,
            optionally ``realized``: site -> held-out loss after its line search, and ``loss_before``).
        path: output PNG.
    """
    plt = _plt()
    events = [e for e in events if e.get("scores")]
    n = max(1, len(events))
    realized = any(e.get("realized") for e in events)
    rows = 2 if realized else 1
    fig, axes = plt.subplots(rows, n, figsize=(3.2 * n, 3.2 * rows), squeeze=False)
    for col, ev in enumerate(events):
        names = list(ev["scores"])
        colors = ["C3" if s == ev.get("site") else "C0" for s in names]
        panels = [[ev["scores"][s] for s in names]]
        if realized:
            before = ev.get("loss_before", float("nan"))
            got = ev.get("realized") or {}
            # relative drop of the held-out loss at the site's line-searched eps (0 for sites not searched)
            panels.append([100.0 * (before - got[s]) / before if s in got and before else 0.0 for s in names])
        for row, vals in enumerate(panels):
            ax = axes[row][col]
            ax.bar(range(len(vals)), vals, color=colors)
            ax.set_xticks(range(len(vals)), [str(i) for i in range(len(vals))])
            ax.set_xlabel("site (depth order)")
        when = f" (epoch {ev['epoch']})" if "epoch" in ev else ""
        axes[0][col].set_title(f"event {ev['event']}{when}", fontsize=9)
    kinds = {e.get("score_kind") or "lambda_max" for e in events}  # what ``scores`` holds (older runs: TD)
    axes[0][0].set_ylabel("TD = lambda_max(Q_t)" if kinds == {"lambda_max"} else
                          "theta^T Q_t theta" if kinds == {"quadratic"} else "site score")
    if realized:
        axes[1][0].set_ylabel("held-out loss drop [%]")
    fig.suptitle(title or "topological derivative per site (red: chosen)", fontsize=10)
    return _save(fig, path)


def plot_method_comparison(
    results: dict[str, dict[str, Sequence[float]]],
    path: str | Path,
    title: str = "",
    ylabel: str = "test error [%]",
    highlight: str | None = "topo",
) -> Path:
    """Grouped bars: one group per setting (e.g. labels per class), one bar per method, mean +- std over seeds.

    Args:
        results: setting -> method -> values over seeds (already in the unit of ``ylabel``).
        path: output PNG.
        highlight: method whose bars get a black edge (the method being argued for).
    """
    plt = _plt()
    settings = list(results)
    methods: list[str] = []
    for by_method in results.values():
        methods += [m for m in by_method if m not in methods and len(by_method[m])]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(settings) * max(1, len(methods)) * 0.45, 3.8))
    for j, method in enumerate(methods):
        xs, means, stds = [], [], []
        for i, setting in enumerate(settings):
            vals = list(results[setting].get(method, []))
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
            xs.append(i - 0.4 + width * (j + 0.5))
            means.append(mean)
            stds.append(std)
        edge = "black" if method == highlight else "none"
        ax.bar(xs, means, width, yerr=stds, capsize=2, color=f"C{j % 10}", edgecolor=edge, linewidth=1.2,
               label=method)
    ax.set_xticks(range(len(settings)), [str(s) for s in settings])
    ax.set_ylabel(ylabel)
    ax.set_title(title or "mean +- std over seeds")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short unique labels: the directory name, with its parent's when names repeat (``grow_digits/topo-seed0``)."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names) and len(paths) > 1:
        return names
    return [f"{p.parent.name}/{p.name}" if p.parent.name else p.name for p in paths]


def plot_runs(paths: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """The plots of ``topotransfer plot``: learning curves of every run with its growth / insertion events
    (``learning_curves.png``), and per run with events the TD of every site at each event
    (``site_scores-<run>.png``).

    Args:
        paths: run directories (each with ``history.json``).
        out: directory of the PNGs (default: the run's directory for one run, ``./plots`` for several).

    Returns:
        The PNG paths written.

    Raises:
        ImportError: matplotlib is not installed (the message gives the pip command).
        RunNotFoundError: a directory without ``history.json``.
    """
    from .reporting import read_history

    _plt()  # refuse before reading anything when matplotlib is missing
    dirs = [Path(p) for p in paths]
    histories = {label: read_history(d) for label, d in zip(_labels(dirs), dirs, strict=True)}
    target = Path(out) if out is not None else (dirs[0] if len(dirs) == 1 else Path("plots"))
    written = [plot_learning_curves(histories, target / "learning_curves.png")]
    for label, hist in histories.items():
        if any(e.get("scores") for e in hist["events"]):
            name = label.replace("/", "_")
            written.append(plot_site_scores(hist["events"], target / f"site_scores-{name}.png", title=f"{label}: "
                                            "topological derivative per site (red: chosen)"))
    return written
