import pytest

pytest.importorskip("matplotlib")

from topotransfer.plots import plot_learning_curves, plot_method_comparison, plot_site_scores  # noqa: E402

HIST = {
    "epochs": [{"epoch": i + 1, "val_loss": 1.0 / (i + 1)} for i in range(6)],
    "events": [
        {"event": 0, "epoch": 2, "site": "layers.0", "scores": {"input_layer": 1.0, "layers.0": 3.0}},
        {"event": 1, "epoch": 4, "site": None, "scores": {"input_layer": -1.0, "layers.0": -2.0, "layers.1": -0.5}},
    ],
}


def test_plots_write_png(tmp_path):
    for path in (
        plot_learning_curves({"topo": HIST, "fixed": {"epochs": HIST["epochs"]}}, tmp_path / "a" / "curves.png"),
        plot_site_scores(HIST["events"], tmp_path / "scores.png"),
        plot_site_scores([{k: v for k, v in e.items() if k != "epoch"} for e in HIST["events"]], tmp_path / "s2.png"),
        plot_site_scores([{**HIST["events"][0], "loss_before": 2.0, "realized": {"input_layer": 1.5, "layers.0": 1.8}},
                          HIST["events"][1]], tmp_path / "s3.png"),  # site_selection=realized: a second row
        plot_method_comparison({"10": {"topo": [30.0, 32.0], "lora": [35.0]}, "50": {"topo": [20.0], "lora": []}},
                               tmp_path / "bars.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
