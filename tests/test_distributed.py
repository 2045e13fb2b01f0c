"""Two CPU processes (gloo) give the one-process results: statistics are sums over the ranks' shards.

``accelerate.debug_launcher`` forks 2 ranks of this process; each rank writes what it computed to a
file and the parent compares. The growth-run tests launch the real CLI under ``accelerate launch``.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from topotransfer import ResidualCNN, ResidualMLP, topological_derivative

pytestmark = pytest.mark.distributed

SOLVERS = ("dense", "matrix_free")


def _problem(family: str):
    """A float64 model and 7 probe batches of uneven sizes (so the two shards differ in size too).

    Family "mlp1" has a single batch: rank 1's shard is empty and contributes zeros.
    """
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if family.startswith("mlp"):
        model, x = ResidualMLP(3, 6, 2, 4).double(), torch.randn(60, 3, generator=gen, dtype=torch.float64)
    else:
        model, x = ResidualCNN(1, 3, 1, 4).double(), torch.randn(60, 1, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (60,), generator=gen)
    cuts = [0, 5, 17, 20, 31, 40, 52, 60]
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    if family == "mlp1":
        batches = [(x, y)]
    return model, batches, nn.CrossEntropyLoss(reduction="sum")


def _summary(results) -> list[dict]:
    return [
        {"site": r.site, "score": r.score, "eigenvalues": r.eigenvalues.cpu(), "weight": r.weight.cpu(),
         "bias": None if r.bias is None else r.bias.cpu(), "k": r.k, "num_samples": r.num_samples,
         "solver": r.solver}
        for r in results
    ]


def _derivative_rank(out_dir: str) -> None:
    """Body of each rank: the derivative on this rank's shard, statistics summed over the ranks."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # The ranks are forked from pytest, which may already hold a 1-process accelerate state.
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, "debug_launcher did not start 2 synchronised ranks"
    out = {}
    for family in ("mlp", "cnn", "mlp1"):
        model, batches, loss_fn = _problem(family)
        shard = batches[acc.process_index :: acc.num_processes]
        for solver in SOLVERS:
            res = topological_derivative(model, shard, loss_fn, accelerator=acc, solver=solver, tol=1e-12)
            out[family, solver] = _summary(res)
    torch.save(out, Path(out_dir) / f"rank{acc.process_index}.pt")
    acc.wait_for_everyone()  # before the process group goes away (gloo aborts if the group goes away with a peer still in a collective)


def test_derivative_on_two_shards_equals_one_process_on_all_data(tmp_path):
    from accelerate import debug_launcher

    debug_launcher(_derivative_rank, args=(str(tmp_path),), num_processes=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for (family, solver), got in ranks[0].items():
        model, batches, loss_fn = _problem(family)
        ref = _summary(topological_derivative(model, batches, loss_fn, solver=solver, tol=1e-12))
        other = ranks[1][family, solver]
        assert [g["site"] for g in got] == [r["site"] for r in ref]
        for g, o, r in zip(got, other, ref, strict=True):
            assert g["solver"] == solver and g["num_samples"] == r["num_samples"]
            assert g["score"] == pytest.approx(r["score"], rel=1e-8)
            torch.testing.assert_close(g["eigenvalues"], r["eigenvalues"], rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(g["weight"], r["weight"], rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(g["bias"], r["bias"], rtol=1e-8, atol=1e-10)
            assert g["k"] == r["k"]
            # Both ranks solved the same summed statistics: identical bits, not just close.
            assert torch.equal(g["weight"], o["weight"]) and torch.equal(g["eigenvalues"], o["eigenvalues"])
            assert (g["bias"] is None and o["bias"] is None) or torch.equal(g["bias"], o["bias"])


# ---------------------------------------------------------------- a 2-process growth run (real launcher)

TINY = [
    "data.name=regression", "data.num_train=160", "data.num_val=64", "data.num_test=128",
    "model.width=8", "model.depth=1", "train.epochs=12", "train.batch_size=32", "train.lr=0.01",
    "growth.epochs_per_stage=4", "growth.max_insertions=2", "probe.batch_size=40", "progress=false",
    "train.checkpoint_every=3",
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL an ``accelerate launch`` / ``torchrun`` process *and its ranks*, and wait until all are gone.

    The launcher's process group is not enough: torch elastic starts every rank with ``start_new_session=True``
    (its own session and group), so ``os.killpg(launcher)`` leaves the ranks running as orphans. They then
    finish the "killed" run, writing ``last``, ``latest``, ``history.json`` into the output directory while
    the resumed run reads it: its ranks can load different checkpoints (or one being replaced), one rank
    fails, and it exits with the gloo process group still alive, which gloo reports as "terminate called
    without an active exception".
    """
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:  # ranks first would let the launcher report them: kill all at once, launcher included
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"processes survived SIGKILL: {alive}"
    proc.wait(timeout=30)


ACCELERATE_CONFIGS = Path(__file__).parents[1] / "topotransfer" / "configs" / "accelerate"


def _launch_cmd(args: list[str], config_file: str | None = None) -> list[str]:
    """``accelerate launch --multi_gpu --num_processes 2 ... -m topotransfer.cli ARGS`` on CPU (gloo), or
    the same through ``--config_file configs/accelerate/<config_file>.yaml`` (docs/distributed.md)."""
    if config_file is None:
        how = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no"]
    else:
        how = ["--config_file", str(ACCELERATE_CONFIGS / f"{config_file}.yaml")]
    return [sys.executable, "-m", "accelerate.commands.launch", *how, "--main_process_port", str(_free_port()),
            "-m", "topotransfer.cli", *args]


def launch_two_processes(
    args: list[str], config_file: str | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(_launch_cmd(args, config_file), capture_output=True, text=True, env=LAUNCH_ENV,
                          timeout=timeout)


@pytest.mark.parametrize("path", sorted(ACCELERATE_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type in ("MULTI_GPU", "FSDP") and cfg.num_processes >= 2
    if cfg.distributed_type == "FSDP":
        assert str(cfg.fsdp_config["fsdp_version"]) == "2", "topotransfer supports FSDP2 only"
    assert path.read_text().startswith("#"), "first lines document the launch command"


@pytest.fixture(scope="module")
def ddp_growth_run(tmp_path_factory):
    """The TINY grow run on 2 DDP processes: (output dir, completed process, wall seconds)."""
    out = tmp_path_factory.mktemp("ddp_grow")
    t = time.perf_counter()
    run = launch_two_processes(["grow", *TINY, f"output_dir={out}"])
    return out, run, time.perf_counter() - t


def test_two_process_growth_run(ddp_growth_run):
    from topotransfer.config import load_config
    from topotransfer.models.build import build_model
    from topotransfer.recipes.grow import load_checkpoint_manifest
    from topotransfer.training.checkpoint import latest_checkpoint, load_checkpoint, replay_insertions
    from topotransfer.training.distributed import param_digest

    tmp_path, run, wall = ddp_growth_run
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count('"test_error"') == 1, "only rank 0 prints the summary"
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_processes"] == 2 and res["insertions"] == 2, res
    for ev in res["events"]:
        sums = ev["param_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1], f"ranks differ after event {ev['event']}: {sums}"
        assert ev["site"] == max(ev["scores"], key=ev["scores"].get)
    # The checkpoint loads into a rebuilt model (strict key check) and gives finite predictions.
    ckpt = latest_checkpoint(tmp_path)
    manifest = load_checkpoint_manifest(ckpt)
    cfg = load_config(None, TINY)
    net = build_model(cfg.model, tuple(manifest["input_shape"]), manifest["num_outputs"], depth=manifest["base_depth"])
    load_checkpoint(ckpt, replay_insertions(net, manifest["insertions"]))
    assert torch.isfinite(net(torch.randn(5, *manifest["input_shape"]))).all()
    assert len(param_digest(net)) == 15
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["epochs"]) == 12 and history["epochs"][-1]["depth"] == 3
    assert res["distributed"] == {"type": "MULTI_CPU", "sharded": False}
    print(f"2-process grow run: {wall:.1f} s wall")


def test_fsdp_growth_run_shards_and_matches_ddp(ddp_growth_run, tmp_path):
    """configs/accelerate/fsdp.yaml on 2 CPU processes: the model really is FSDP2-sharded, every growth
    event gathers the full weights, grows the identical layer on both ranks and re-shards; the run
    takes the DDP run's decisions and ends with its weights (up to the order of the gradient sums)."""
    ddp_out, ddp, _ = ddp_growth_run
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run = launch_two_processes(["grow", *TINY, f"output_dir={tmp_path}"], "fsdp")
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    ref = json.loads((ddp_out / "results.json").read_text())
    assert res["distributed"] == {"type": "FSDP", "sharded": True}
    assert res["num_processes"] == 2 and res["insertions"] == ref["insertions"] == 2
    for ev, ev_ref in zip(res["events"], ref["events"], strict=True):
        assert ev["site"] == ev_ref["site"] and ev["epsilon"] == ev_ref["epsilon"]
        sums = ev["param_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1], f"FSDP ranks differ after event {ev['event']}: {sums}"
    h, h_ref = (json.loads((d / "history.json").read_text())["epochs"] for d in (tmp_path, ddp_out))
    assert [e["depth"] for e in h] == [e["depth"] for e in h_ref]
    torch.testing.assert_close([e["val_loss"] for e in h], [e["val_loss"] for e in h_ref], rtol=1e-5, atol=1e-7)
    # the checkpoint holds full (gathered) tensors under the plain module's names
    a = load_file(str(tmp_path / "last" / "model.safetensors"))
    b = load_file(str(ddp_out / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_two_process_nan_stops_every_rank(tmp_path):
    """lr = 1e30 blows the weights up at once: both ranks raise at the same step (no rank left waiting)."""
    run = launch_two_processes(["grow", *TINY, "train.lr=1e30", f"output_dir={tmp_path}"], timeout=120)
    assert run.returncode != 0
    assert run.stderr.count("Training loss is nan (summed over 2 processes)") == 2, run.stderr[-3000:]
    assert not (tmp_path / "results.json").exists()


KILL_RUN = [
    "data.name=regression", "data.num_train=1200", "data.num_val=100", "data.num_test=100", "model.width=8",
    "model.depth=1", "train.epochs=9", "train.batch_size=16", "train.lr=0.003", "growth.epochs_per_stage=3",
    "growth.max_insertions=2", "probe.batch_size=300", "probe.batches=2", "progress=false",
    "train.checkpoint_every=100", "train.checkpoint_every_steps=5", "train.lr_schedule=cosine",
]


def _latest_state(out: Path) -> dict | None:
    try:
        return json.loads((out / (out / "latest").read_text().strip() / "state.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced right now
        return None


def test_two_process_run_killed_after_a_growth_event_resumes_exactly(tmp_path):
    """SIGKILL the launcher and its ranks after event 1, once the latest checkpoint is a mid-epoch one
    (every 5 steps: both ranks' RNG states gathered, the epoch's batches trained so far skipped on resume);
    --resume on 2 processes ends with the weights of an uninterrupted 2-process run."""
    t = time.perf_counter()
    full = launch_two_processes(["grow", *KILL_RUN, f"output_dir={tmp_path / 'full'}"])
    wall = time.perf_counter() - t
    assert full.returncode == 0, full.stderr[-3000:]

    args = ["grow", *KILL_RUN, f"output_dir={tmp_path / 'killed'}"]
    proc = subprocess.Popen(_launch_cmd(args, "cpu_2proc"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=LAUNCH_ENV)
    history = tmp_path / "killed" / "history.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            st = _latest_state(tmp_path / "killed")
            if history.is_file() and st is not None and st["events"] and st["epoch_progress"]:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        kill_launch(proc)  # the launcher and both ranks (they run in sessions of their own)
    assert not (tmp_path / "killed" / "results.json").exists()
    st = _latest_state(tmp_path / "killed")
    assert st["epoch_progress"] is not None and st["epoch"] < 9, "the kill did not land after a mid-epoch checkpoint"
    time.sleep(0.5)
    assert _latest_state(tmp_path / "killed") == st, "a process of the killed run is still writing checkpoints"

    resumed = launch_two_processes(args + ["--resume"], "cpu_2proc")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "killed"))
    assert ra["test_error"] == rb["test_error"]
    assert [e["param_checksums"] for e in ra["events"]] == [e["param_checksums"] for e in rb["events"]]
    print(f"2-process run of KILL_RUN: {wall:.1f} s wall")


def test_two_process_derivative_recipe_prints_the_one_process_scores(tmp_path):
    """``topotransfer derivative`` under 2 processes: each rank probes its shard, the statistics are summed,
    rank 0 alone prints, and the scores are those of one process on all the probe batches."""
    from topotransfer.config import load_config
    from topotransfer.recipes.derivative import run_derivative

    args = ["data.name=regression", "data.num_train=120", "data.num_val=40", "data.num_test=40", "model.width=6",
            "model.depth=2", "train.epochs=1", "probe.batch_size=40", "probe.batches=3", "probe.solver=dense",
            "progress=false"]
    # one warm-up step on the same 120 shuffled examples: 2 x 60 per process, or 120 in one process
    run = launch_two_processes(["derivative", *args, "train.batch_size=60", f"output_dir={tmp_path / 'two'}"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("TD (lambda_max)") == 1, "only rank 0 prints the table"
    # columns: site, TD (lambda_max), quadratic (the default probe.score), k, solver
    printed = {line.split()[0]: (float(line.split()[1]), float(line.split()[2])) for line in run.stdout.splitlines()
               if line.startswith(("input_layer", "layers."))}
    ref = run_derivative(load_config(None, [*args, "train.batch_size=120", f"output_dir={tmp_path / 'one'}"]))
    assert list(printed) == [r.site for r in ref]
    for r in ref:
        assert printed[r.site][0] == pytest.approx(r.lambda_max, rel=1e-5), r.site
        assert printed[r.site][1] == pytest.approx(r.quadratic, rel=1e-5), r.site


def test_ctrl_c_of_a_launched_run_stops_every_rank_and_names_the_resume_command(tmp_path):
    """Ctrl-C reaches the launcher only (the ranks run in sessions of their own); it passes the signal on, every
    rank stops, and rank 0 alone prints the checkpoint and the arguments that continue the run."""
    import signal

    import psutil

    out = tmp_path / "run"
    args = ["grow", *KILL_RUN, "train.epochs=40", f"output_dir={out}"]
    proc = subprocess.Popen(_launch_cmd(args, "cpu_2proc"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=LAUNCH_ENV)
    deadline = time.monotonic() + 120
    while not (out / "latest").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    ranks = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, f"ranks left running: {alive}"
    hints = [line for line in err.splitlines() if line.startswith("interrupted;")]
    assert len(hints) == 1, err[-3000:]
    assert str(out / "last") in hints[0] and hints[0].endswith(f"-m topotransfer.cli {' '.join(args)} --resume")
