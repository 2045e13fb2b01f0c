"""The growth loop: inserts where TD is largest, records history, resumes exactly, runs every baseline."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from topotransfer.config import load_config
from topotransfer.errors import NoCheckpointError, RunExistsError
from topotransfer.growth import PlateauDetector
from topotransfer.recipes.grow import run_grow

TINY = [
    "data.name=regression", "data.num_train=160", "data.num_val=64", "data.num_test=128",
    "model.width=8", "model.depth=1", "train.epochs=12", "train.batch_size=32", "train.lr=0.01",
    "growth.epochs_per_stage=4", "growth.max_insertions=2", "probe.batch_size=80", "progress=false",
    "train.checkpoint_every=3",
]


def _cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"output_dir={tmp_path}", *extra])


def test_topo_growth_inserts_at_argmax_and_records_history(tmp_path):
    res = run_grow(_cfg(tmp_path))
    events = res["events"]
    assert res["insertions"] == 2 and res["depth"] == 3 and len(events) == 2
    for ev in events:
        assert ev["site"] == max(ev["scores"], key=ev["scores"].get)  # inserted where TD is largest
        assert ev["scores"][ev["site"]] > 0 and ev["k"] >= 1
        assert ev["eps_tried"][0] == [0.0, ev["loss_before"]] or ev["eps_tried"][0] == (0.0, ev["loss_before"])
        if ev["epsilon"] > 0 and ev["loss_after"] == ev["loss_after"]:
            assert ev["loss_after"] <= ev["loss_before"]
    hist = json.loads((tmp_path / "history.json").read_text())
    assert len(hist["epochs"]) == 12 and len(hist["events"]) == 2
    assert [e["depth"] for e in hist["epochs"]][:4] == [1, 1, 1, 1]
    assert hist["epochs"][-1]["depth"] == 3
    assert json.loads((tmp_path / "results.json").read_text())["test_error"] == res["test_error"]


def test_resume_after_a_growth_event_gives_identical_results(tmp_path):
    full = run_grow(_cfg(tmp_path / "full"))
    part = run_grow(_cfg(tmp_path / "part"), stop_after_epoch=6)  # killed between events 1 and 2
    assert part == {"stopped_at_epoch": 6}
    resumed = run_grow(_cfg(tmp_path / "part"), resume=True)
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_error"] == full["test_error"]
    assert [e["site"] for e in resumed["events"]] == [e["site"] for e in full["events"]]


@pytest.mark.parametrize("method", ["random_site", "random_init", "net2deeper", "forward_thinking", "fixed"])
def test_baselines_run(tmp_path, method):
    res = run_grow(_cfg(tmp_path, f"growth.method={method}", "train.epochs=9"))
    assert res["depth"] == 3 if method == "fixed" else res["insertions"] == 2
    assert res["test_error"] == res["test_error"]  # not NaN


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocked = tmp_path / "ro"
    blocked.mkdir()
    os.chmod(blocked, 0o500)
    if os.access(blocked, os.W_OK):  # running as root: permissions do not apply, use a file as "dir"
        blocked = tmp_path / "file"
        blocked.write_text("x")
    with pytest.raises(OSError, match="not writable"):
        run_grow(_cfg(blocked / "run"))


def test_plateau_detector():
    d = PlateauDetector(patience=2, min_delta=0.1)
    assert [d.update(v) for v in (1.0, 0.95, 0.94, 0.5, 0.49, 0.48)] == [False, False, True, False, False, True]


@pytest.mark.parametrize("extra", [["probe.rule=rowwise"], ["probe.rule=rowwise", "probe.whiten=true"]])
def test_rowwise_rule_in_the_growth_loop(tmp_path, extra):
    """The row-wise rule keeps the site choice (argmax TD) and activates more than one row per event."""
    res = run_grow(_cfg(tmp_path, *extra))
    assert res["insertions"] == 2
    for ev in res["events"]:
        assert ev["site"] == max(ev["scores"], key=ev["scores"].get)
        assert ev["k"] >= 1 and ev["quadratic"] > 0
    assert any(ev["k"] > 1 for ev in res["events"])


def test_realized_site_selection_line_searches_every_site(tmp_path):
    """growth.site_selection=realized: every site with TD > 0 is line-searched with its own eigen direction; the
    layer goes where the held-out loss ends lowest, and that site's search is the one the event records."""
    import copy

    from torch import nn

    from topotransfer.growth import grow_once
    from topotransfer.insertion import line_search_epsilon
    from topotransfer.models.residual_mlp import ResidualMLP

    torch.manual_seed(0)
    model = ResidualMLP(2, 6, 2, 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 2, generator=g)
    y = torch.sin(2 * x[:, :1]) * x[:, 1:]
    probe, heldout = [(x[:80], y[:80])], [(x[80:], y[80:])]
    loss_fn = nn.MSELoss(reduction="sum")
    before = copy.deepcopy(model)
    ev = grow_once(model, "topo", probe, heldout, loss_fn, event=0, epoch=0, site_selection="realized")
    assert set(ev.realized) == {s for s, v in ev.scores.items() if v > 0} and len(ev.realized) > 1
    assert ev.site == min(ev.realized, key=ev.realized.get)
    assert ev.loss_after == pytest.approx(ev.realized[ev.site], rel=1e-12) and ev.loss_after < ev.loss_before
    # each candidate's recorded loss is the best of its own +/- line search along the TD direction
    from topotransfer import topological_derivative

    for r in topological_derivative(before, probe, loss_fn):
        if r.site in ev.realized:
            best = min(line_search_epsilon(before, r.site, heldout, loss_fn, s * r.weight, s * r.bias).loss
                       for s in (1, -1))
            assert ev.realized[r.site] == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError, match="site_selection"):
        load_config(None, ["growth.site_selection=best"])


# ---------------------------------------------------------------------------------------------- baselines (issue 11)
def test_random_site_draws_differ_between_settings_and_repeat_within_one():
    from topotransfer.growth import random_site_generator

    def draws(setting):
        return [int(torch.randint(5, (1,), generator=random_site_generator(s, e, setting))) for s in range(8)
                for e in range(3)]

    assert draws("a") == draws("a")  # a resumed run draws the same sites
    assert draws("a") != draws("b")  # another setting (task, shots) draws independently


def test_random_direction_is_scaled_like_the_eigen_direction():
    from topotransfer.growth import scale_matched_random_direction

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 3, dtype=torch.float64) * 3, torch.randn(4, dtype=torch.float64)
    rw, rb = scale_matched_random_direction(w, b, g)
    theta, rtheta = torch.cat([w, b[:, None]], 1), torch.cat([rw, rb[:, None]], 1)
    assert torch.allclose(rtheta.norm(), theta.norm()) and not torch.allclose(rtheta, theta)
    # whitened rule: same mean-square pre-activation (1/N) sum_n ||Theta zh_n||^2 = tr(Theta M Theta^T)
    z = torch.cat([torch.randn(50, 3, dtype=torch.float64) * torch.tensor([5.0, 1.0, 0.1]),
                   torch.ones(50, 1, dtype=torch.float64)], 1)
    m = z.T @ z / 50
    rw, rb = scale_matched_random_direction(w, b, g, m)
    rtheta = torch.cat([rw, rb[:, None]], 1)
    assert torch.allclose((rtheta @ z.T).square().sum() / 50, (theta @ z.T).square().sum() / 50)
    assert scale_matched_random_direction(w, None, g)[1] is None


def test_random_init_uses_topos_site_and_an_equally_large_direction(tmp_path):
    """random_init goes where topo goes (same site rule) and its layer has the eigen direction's norm."""
    from topotransfer.data import load_task
    from topotransfer.growth import grow_once
    from topotransfer.models.build import build_model
    from topotransfer.recipes.grow import _batches

    cfg = _cfg(tmp_path)
    task = load_task("regression", seed=0, num_train=160, num_val=64, num_test=128)
    torch.manual_seed(0)
    events = {}
    for method in ("topo", "random_init"):
        model = build_model(cfg.model, task.input_shape, task.num_outputs).double()
        model.load_state_dict(build_model(cfg.model, task.input_shape, task.num_outputs).double().state_dict()
                              if method == "topo" else events["state"])
        if method == "topo":
            events["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        loss = torch.nn.MSELoss(reduction="sum")
        batches = [(x.double(), y.double()) for x, y in _batches(task.train, 80)]
        val = [(x.double(), y.double()) for x, y in _batches(task.val, 64)]
        events[method] = grow_once(model, method, batches, val, loss, event=0, epoch=0, seed=0, probe_cfg=cfg.probe,
                                   site_selection="realized")
    topo, rnd = events["topo"], events["random_init"]
    assert rnd.site == topo.site and rnd.scores == topo.scores
    # init_norm = eps * ||direction||_F: the random direction is exactly as large as the eigen one
    assert abs(rnd.init_norm / rnd.epsilon - topo.init_norm / topo.epsilon) < 1e-9 * topo.init_norm / topo.epsilon
    assert rnd.eps_fallback == (not any(l < rnd.loss_before for e, l in rnd.eps_tried if e > 0))


def test_forced_site_inserts_there_and_records_every_sites_scores(tmp_path):
    from topotransfer.data import load_task
    from topotransfer.growth import grow_once
    from topotransfer.models.build import build_model
    from topotransfer.recipes.grow import _batches

    cfg = _cfg(tmp_path)
    task = load_task("regression", seed=0, num_train=160, num_val=64, num_test=128)
    model = build_model(cfg.model, task.input_shape, task.num_outputs)
    data = [tuple(b) for b in _batches(task.train, 80)]
    loss = torch.nn.MSELoss(reduction="sum")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not a site"):
        grow_once(model, "topo", data, data, loss, event=0, epoch=0, site="nowhere")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed
    rec = grow_once(model, "topo", data, data, loss, event=0, epoch=0, site="input_layer", probe_cfg=cfg.probe)
    assert rec.site == "input_layer" and rec.forced_site and set(rec.scores) == {"input_layer", "layers.0"}
    assert set(rec.quadratics) == set(rec.scores) and rec.depth == 2

# ------------------------------------------------------------------------------- runs never destroy runs
def _files(directory) -> dict:
    """Every file under ``directory`` with its bytes (a run's exact state on disk)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_finished_run_is_refused_byte_for_byte_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    run_grow(_cfg(out, "train.epochs=5"))
    finished = _files(out)
    assert {"results.json", "history.json", "latest", "config.yaml"} <= set(finished)
    missing = f"data.name=imagefolder:{tmp_path / 'no_images'}"  # a valid config whose data set-up fails
    for extra in ([], ["growth.method=random_site", "seed=1"], [missing]):
        with pytest.raises(RunExistsError) as refused:
            run_grow(_cfg(out, *extra))
        message = str(refused.value)
        assert "\n" not in message and "--overwrite" in message and "--resume" in message and str(out) in message
        assert _files(out) == finished
    # --overwrite with a config that fails in set-up: still nothing touched (the old run is removed only
    # once the new one's data and model are set up)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        run_grow(_cfg(out, missing), overwrite=True)
    assert _files(out) == finished

    replaced = run_grow(_cfg(out, "train.epochs=5", "seed=1"), overwrite=True)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["seed"] == replaced["seed"] == 1 and on_disk["test_error"] == replaced["test_error"]
    assert "seed: 1" in (out / "config.yaml").read_text()


def test_resume_without_a_checkpoint_is_an_error_and_writes_nothing(tmp_path):
    out = tmp_path / "empty"
    with pytest.raises(NoCheckpointError) as nothing:
        run_grow(_cfg(out), resume=True)
    assert "nothing to resume" in str(nothing.value) and "--resume" in str(nothing.value)
    assert "\n" not in str(nothing.value)
    assert list(out.iterdir()) == []


def test_a_run_that_fails_in_set_up_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        run_grow(_cfg(out, f"data.name=imagefolder:{tmp_path / 'no_images'}"))
    assert list(out.iterdir()) == []  # not even config.yaml


# ------------------------------------------------------------------------------- progress people can read
EVENT_LINE = re.compile(
    r"event (\d+) @ epoch (\d+): (\S+) \| quadratic ((?:\S+=\S+ ?)+) \| eps (\S+) \| held-out loss (\S+) -> (\S+) "
    r"\| depth (\d+), ([\d,]+) params"
)


def test_event_lines_epoch_bar_and_summary_on_screen(tmp_path, capsys):
    res = run_grow(_cfg(tmp_path, "progress=true"))
    err = capsys.readouterr().err
    lines = EVENT_LINE.findall(err)
    assert len(lines) == len(res["events"]) == 2
    for (num, epoch, site, scores, eps, before, after, depth, params), ev in zip(lines, res["events"], strict=True):
        assert (int(num), int(epoch), site) == (ev["event"] + 1, ev["epoch"], ev["site"])
        assert [s.split("=")[0] for s in scores.split()] == list(ev["scores"])  # every site's score, one row
        assert float(eps) == pytest.approx(ev["epsilon"], rel=1e-2)
        assert float(before) == pytest.approx(ev["loss_before"], rel=1e-3)
        assert float(after) == pytest.approx(ev["loss_after"], rel=1e-3)
        assert (int(depth), int(params.replace(",", ""))) == (ev["depth"], ev["params"])
    assert re.search(r"grow\[topo\].*loss \S+, val MSE \S+", err), "the epoch bar shows no loss / validation error"
    best = re.search(r"best validation model \(epoch (\d+)\): test MSE (\S+) \| depth (\d+), ([\d,]+) params", err)
    final = re.search(r"final model \(epoch 12\): test MSE (\S+) \| depth (\d+), ([\d,]+) params", err)
    assert best and final, err[-2000:]
    assert int(best.group(1)) == res["best_epoch"] and float(best.group(2)) == pytest.approx(res["test_error"], rel=1e-3)
    assert (int(best.group(3)), int(best.group(4).replace(",", ""))) == (res["best_depth"], res["best_params"])
    assert float(final.group(1)) == pytest.approx(res["final_test_error"], rel=1e-3)
    assert (int(final.group(2)), int(final.group(3).replace(",", ""))) == (res["depth"], res["params"]) == (3, res["events"][-1]["params"])


def test_results_record_wall_time_per_phase(tmp_path):
    res = run_grow(_cfg(tmp_path))
    times = json.loads((tmp_path / "results.json").read_text())["phase_times"]
    assert set(times) == {"training", "evaluation", "saving", "derivative", "line_search"}
    assert all(t > 0 for t in times.values())
    assert sum(times.values()) <= res["wall_time"]  # phases do not overlap (nested blocks are not counted twice)
    assert times["derivative"] == pytest.approx(sum(e["seconds"]["derivative"] for e in res["events"]))
    cpu = json.loads((tmp_path / "results.json").read_text())["phase_cpu_times"]  # CPU seconds, the same phases
    assert set(cpu) == set(times) and all(t > 0 for t in cpu.values())
    assert cpu["derivative"] == pytest.approx(sum(e["cpu_seconds"]["derivative"] for e in res["events"]))


def test_init_mix_interpolates_between_the_eigen_and_the_random_init_direction(tmp_path):
    """growth.init_mix = m inserts sqrt(1 - m^2) theta + m R: m = 1 is exactly random_init's layer (same R,
    drawn from the event's generator), m = 0.6 is 0.8 theta + 0.6 R (each layer divided by its own sign * eps)."""
    from topotransfer.data import load_task
    from topotransfer.growth import grow_once
    from topotransfer.models.build import build_model
    from topotransfer.recipes.grow import _batches

    cfg = _cfg(tmp_path, "probe.rule=rowwise", "probe.whiten=true")
    task = load_task("regression", seed=0, num_train=160, num_val=64, num_test=128)
    torch.manual_seed(0)
    base = build_model(cfg.model, task.input_shape, task.num_outputs).double().state_dict()
    loss = torch.nn.MSELoss(reduction="sum")
    batches = [(x.double(), y.double()) for x, y in _batches(task.train, 80)]
    val = [(x.double(), y.double()) for x, y in _batches(task.val, 64)]

    def insert(method, mix):
        model = build_model(cfg.model, task.input_shape, task.num_outputs).double()
        model.load_state_dict(base)
        rec = grow_once(model, method, batches, val, loss, event=0, epoch=0, seed=0, probe_cfg=cfg.probe,
                        site="layers.0", init_mix=mix)
        new = {k: v for k, v in model.state_dict().items() if k not in base or v.shape != base[k].shape
               or not torch.equal(v, base[k])}
        return rec, new

    rnd, rnd_layer = insert("random_init", 0.0)
    mixed1, mixed1_layer = insert("topo", 1.0)
    assert mixed1.epsilon == rnd.epsilon and mixed1.sign == rnd.sign
    assert rnd_layer.keys() == mixed1_layer.keys() and rnd_layer
    assert all(torch.equal(rnd_layer[k], mixed1_layer[k]) for k in rnd_layer)

    eig, eig_layer = insert("topo", 0.0)
    mix, mix_layer = insert("topo", 0.6)
    assert eig_layer.keys() == mix_layer.keys() == rnd_layer.keys()
    for k in eig_layer:
        def unit(layer, rec):
            return layer[k] / (rec.sign * rec.epsilon)
        expected = 0.8 * unit(eig_layer, eig) + 0.6 * unit(rnd_layer, rnd)
        # the new layer stores float32 (family.new_layer), whatever the model: agreement to float32 rounding
        assert torch.allclose(unit(mix_layer, mix), expected, rtol=1e-6, atol=1e-6), k


def test_init_mix_outside_unit_interval_is_a_one_line_config_error(tmp_path):
    from topotransfer.config import ConfigError

    with pytest.raises(ConfigError, match=r"growth.init_mix must be in \[0, 1\], got 1.5"):
        _cfg(tmp_path, "growth.init_mix=1.5")
