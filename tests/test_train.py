"""Section 9 (training, docs/methods.md#training-recipe): the loss falls for every prediction, the
EMA follows its formula (docs/math.md#ema), checkpoints record the run (docs/methods.md#run-folder)
and resume bit-identically and survive a crash mid-write, DDP on two CPU processes. The train and
demo commands: test_cli.py."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm_mini as dm
from conftest import MICRO_UNET, TINY_UNET, free_port

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
REPO = os.path.dirname(os.path.abspath(dm.__file__))


def same(a, b):
    """Bit-identical state dicts."""
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(out, steps, data=None, unet=TINY_UNET, **kwargs):
    torch.manual_seed(0)
    data = dm.PhantomDataset(shape=(16, 16, 16)) if data is None else data
    return dm.train(dm.UNet(**unet), data, "velocity", steps, batch_size=2, out=out, checkpoint_every=2,
                    progress=False, **kwargs)


# ----------------------------------------------------------------------------- learning


class Zero(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.mark.parametrize("prediction", dm.ALL_PREDICTIONS)
def test_a_short_run_lowers_the_loss(prediction):
    """Target-space MSE on a fixed held-out batch with fixed t and noise, before vs after 20 steps.
    Measured (3 seeds): after/before 0.10-0.35 and after/(loss of predicting zeros) 0.12-0.33
    for the model and its EMA alike; a run that learns nothing stays near 1. rflow's loss is L1,
    whose ratios are about the square roots of MSE ones (seed 0: after/before 0.60, EMA 0.62)."""
    held = torch.stack([torch.from_numpy(dm.phantom(1000 + i, (16, 16, 16))[0])[None] for i in range(8)])

    def heldout(model):
        with torch.no_grad():
            return dm.diffusion_loss(model.eval(), held, prediction, generator=torch.Generator().manual_seed(7)).item()
    torch.manual_seed(0)
    model = dm.UNet(**MICRO_UNET)
    before, zero = heldout(model), heldout(Zero())
    result = dm.train(model.train(), dm.PhantomDataset(shape=(16, 16, 16)), prediction, 20, batch_size=2, lr=2e-3,
                      progress=False)
    assert result.model is model and model.training and not result.ema.training
    assert len(result.history) == 20 and np.isfinite(result.history).all()
    after, ema = heldout(model), heldout(result.ema)
    limit = 0.75 if prediction == "rflow" else 0.6
    assert after / before < limit and ema / before < limit, (before, after, ema)
    assert after / zero < limit and ema / zero < limit, (zero, after, ema)
    assert result.checkpoint is None and result.history_csv is None  # out=None writes nothing


def test_ema_follows_its_formula():
    """theta_ema <- d theta_ema + (1 - d) theta, d = min(decay, (1 + k) / (10 + k)): after one step
    (k = 0, d = 0.1) the EMA is 0.1 theta_0 + 0.9 theta_1."""
    torch.manual_seed(0)
    model = dm.UNet(**MICRO_UNET)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = dm.train(model, dm.PhantomDataset(shape=(16, 16, 16)), "flow", 1, lr=1e-2, progress=False)
    for key, value in result.ema.state_dict().items():
        torch.testing.assert_close(value, 0.1 * start[key] + 0.9 * model.state_dict()[key], rtol=0, atol=1e-6)
    assert not torch.equal(result.ema.conv_in.conv.weight, start["conv_in.conv.weight"])
    # ema_warmup=False (the authors' online EMA): d = ema_decay from the first step
    torch.manual_seed(0)
    model = dm.UNet(**MICRO_UNET)
    result = dm.train(model, dm.PhantomDataset(shape=(16, 16, 16)), "flow", 1, lr=1e-2, progress=False,
                      **dm.RECIPES["medforj"]["train"])
    for key, value in result.ema.state_dict().items():
        torch.testing.assert_close(value, 0.9998 * start[key] + 0.0002 * model.state_dict()[key], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints


def loader():
    data = torch.stack([torch.from_numpy(dm.phantom(i, (16, 16, 16))[0])[None] for i in range(5)])
    return torch.utils.data.DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["phantoms", "tensor", "loader"])
def test_resume_is_bit_identical(tmp_path, kind):
    """6 steps straight vs 3 steps, stop, resume to 6: the same weights, EMA and losses. Data: endless
    phantoms; a tensor of 5 items (shuffled per epoch, resumed mid-epoch); a shuffling DataLoader."""
    data = {"phantoms": lambda: None, "tensor": lambda: torch.stack([dm.PhantomDataset(shape=(16, 16, 16))[i] for i in range(5)]),
            "loader": loader}[kind]
    straight = run(tmp_path / "a", 6, data(), keep=2)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    first = run(tmp_path / "b", 3, data())
    assert first.checkpoint.name == "step_000003"
    resumed = run(tmp_path / "b", 6, data(), resume=True)
    assert same(straight.model, resumed.model) and same(straight.ema, resumed.ema)
    assert resumed.history == straight.history and len(straight.history) == 6
    with open(tmp_path / "b" / "history.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"] and [float(r[1]) for r in rows[1:]] == straight.history
    assert not same(first.model, resumed.model)
    seconds = [float(dm.load_model(r.checkpoint)[1]["seconds"]) for r in (first, resumed)]  # over both sittings
    assert 0 < seconds[0] < seconds[1] and torch.load(resumed.checkpoint / "state.pt")["seconds"] == pytest.approx(seconds[1], abs=0.05)


def test_resume_at_another_lr_is_a_step_schedule(tmp_path):
    """resume=True with another lr: from the same state (weights, Adam moments, batch and noise) Adam's
    next update is lr times the same direction, so at a tenth of the run's rate the third step moves
    every weight by a tenth as much (up to float32 rounding of w + update: two spacings at the largest
    weight, rtol 1e-3); the checkpoints record
    lr_steps [[0, 1e-3], [2, 1e-4]] and the new lr, and a resume at the run's lr adds nothing."""
    first = run(tmp_path / "a", 2, lr=1e-3)
    start = {k: v.clone() for k, v in first.model.state_dict().items()}
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    kept, lowered = run(tmp_path / "a", 3, lr=1e-3, resume=True), run(tmp_path / "b", 3, lr=1e-4, resume=True)
    moved = 0
    for key, w in start.items():
        if w.is_floating_point():
            step_kept, step_lowered = kept.model.state_dict()[key] - w, lowered.model.state_dict()[key] - w
            ulp = w.abs().max().item() * 2 ** -23  # float32's spacing at the largest weight
            torch.testing.assert_close(step_lowered, 0.1 * step_kept, rtol=1e-3, atol=2 * ulp)
            moved += int(step_kept.abs().max() > 1e-4)
    assert moved > 10  # the third step did move the weights
    metas = [dm.load_model(r.checkpoint)[1] for r in (kept, lowered)]
    assert [json.loads(m["lr_steps"]) for m in metas] == [[[0, 1e-3]], [[0, 1e-3], [2, 1e-4]]]
    assert [m["lr"] for m in metas] == ["0.001", "0.0001"]
    assert torch.load(lowered.checkpoint / "state.pt", weights_only=True)["lr_steps"] == [[0, 1e-3], [2, 1e-4]]


def test_checkpoint_contents(tmp_path):
    previews = []
    result = run(tmp_path, 2, preview_every=2, preview_steps=2, on_preview=lambda step, x: previews.append((step, x)))
    assert [(step, x.shape) for step, x in previews] == [(2, (1, 1, 16, 16, 16))] and previews[0][1].abs().max() <= 1
    ckpt = result.checkpoint
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "model.safetensors", "state.pt"]
    model, meta = dm.load_model(ckpt / "ema.safetensors")
    assert meta["prediction"] == "velocity" and meta["step"] == "2" and meta["shape"] == [16, 16, 16]
    assert meta["unet"]["channels"] == [8, 16] and same(model, result.ema)
    assert meta["ema"] == "true" and meta["seed"] == "0" and meta["schedule"] == dm.DEFAULT_SCHEDULE.config()
    assert (meta["batch_size"], meta["lr"], meta["ema_decay"]) == ("2", "0.0001", "0.999")  # how it was trained
    assert "ema" not in dm.load_model(ckpt / "model.safetensors")[1]
    state = torch.load(ckpt / "state.pt", weights_only=True)  # plain tensors and containers only
    assert state["step"] == 2 and state["data_position"] == 4 and state["world_size"] == 1
    assert set(state["rng"][0]) == {"torch", "numpy", "python", "cuda"} and len(state["history"]) == 2
    assert state["optimizer"]["state"][0]["step"] == 2
    assert [p.name for p in result.previews] == ["step_000002.png"] and result.previews[0].stat().st_size > 1000
    assert dm.weights_file(tmp_path) == ckpt / "ema.safetensors" == dm.weights_file(ckpt)
    with pytest.raises(ValueError, match="resume=True"):  # never mixes two runs in one folder
        run(tmp_path, 4)


def test_an_rflow_run_records_the_straight_line_schedule(tmp_path):
    """prediction='rflow' trains on RFLOW_SCHEDULE (L1 loss, real t) without being told, records it, and
    resumes exactly; sampling the run then uses it (load_model decodes it)."""
    def rflow_run(out, steps, **kw):
        torch.manual_seed(0)
        return dm.train(dm.UNet(**TINY_UNET), dm.PhantomDataset(shape=(16, 16, 16)), "rflow", steps, batch_size=2,
                        out=out, checkpoint_every=2, progress=False, **kw)
    first = rflow_run(tmp_path / "r", 2)
    model, meta = dm.load_model(tmp_path / "r")
    assert meta["prediction"] == "rflow" and meta["schedule"] == {"T": 1000, "kind": "rflow"}
    assert dm.Schedule.from_config(meta["schedule"]) is not dm.RFLOW_SCHEDULE == dm.Schedule.from_config(meta["schedule"])
    resumed, straight = rflow_run(tmp_path / "r", 4, resume=True), rflow_run(tmp_path / "s", 4)
    assert same(resumed.model, straight.model) and resumed.history == straight.history and len(first.history) == 2
    with pytest.raises(ValueError, match="rflow prediction needs a RectifiedFlowSchedule"):
        rflow_run(tmp_path / "vp", 2, schedule=dm.DEFAULT_SCHEDULE)


def test_a_run_records_its_schedule(tmp_path):
    """train(schedule=S) trains with S (t drawn from 0..S.T-1: other losses than the default's) and
    records S in every checkpoint's weights, which load_model decodes (the sample command uses it:
    test_cli.py::test_sample_uses_the_schedule_of_the_run)."""
    short = dm.Schedule(T=500, beta_end=0.03)
    result = run(tmp_path / "short", 4, schedule=short, keep=5)
    default = run(tmp_path / "default", 4)
    assert result.history != default.history
    checkpoints = sorted((tmp_path / "short" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step_000002", "step_000004"]
    for ckpt in checkpoints:
        for name in ("model.safetensors", "ema.safetensors"):
            meta = dm.load_model(ckpt / name)[1]
            assert meta["schedule"] == short.config() and dm.Schedule.from_config(meta["schedule"]) == short
    assert dm.load_model(tmp_path / "short")[1]["schedule"] == short.config()  # the run folder: newest EMA
    assert dm.load_model(tmp_path / "default")[1]["schedule"] == dm.DEFAULT_SCHEDULE.config()
    # resuming with the same schedule continues the run exactly
    resumed = run(tmp_path / "short", 6, schedule=short, resume=True)
    straight = run(tmp_path / "straight", 6, schedule=short)
    assert same(resumed.model, straight.model) and resumed.history == straight.history
    # resuming with another schedule (here: the default, by leaving it out) is refused
    with pytest.raises(ValueError, match="trained with the schedule"):
        run(tmp_path / "short", 8, resume=True)
    assert dm.latest_checkpoint(tmp_path / "short").name == "step_000006"


def test_a_crash_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
    real = dm.save_weights
    calls = []

    def dies_on_the_fourth_file(*args, **kwargs):  # step 2: model, ema; step 4: model, then the EMA fails
        calls.append(args[1])
        if len(calls) == 4:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)
    monkeypatch.setattr(dm, "save_weights", dies_on_the_fourth_file)
    with pytest.raises(OSError, match="simulated"):
        run(tmp_path / "run", 4)
    monkeypatch.setattr(dm, "save_weights", real)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_000002"]  # the half-written step_000004.tmp is gone
    assert dm.latest_checkpoint(tmp_path / "run") == folder / "step_000002"
    dm.load_model(folder / "step_000002" / "ema.safetensors")
    assert torch.load(folder / "step_000002" / "state.pt", weights_only=True)["step"] == 2
    # a process killed mid-write leaves its .tmp folder: never counted, removed on resume
    (folder / "step_000003.tmp").mkdir()
    (folder / "step_000003.tmp" / "model.safetensors").write_bytes(b"partial")
    assert dm.latest_checkpoint(tmp_path / "run") == folder / "step_000002"
    resumed = run(tmp_path / "run", 4, resume=True)
    straight = run(tmp_path / "straight", 4)
    assert same(resumed.model, straight.model) and same(resumed.ema, straight.ema)
    assert sorted(p.name for p in folder.iterdir()) == ["step_000002", "step_000004"]


def test_resume_checks_the_prediction_and_the_process_count(tmp_path):
    """A checkpoint trained for another prediction is refused; one written by another number of
    processes resumes with a warning, its global RNG states left alone."""
    run(tmp_path / "run", 2)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="trained for 'velocity', not 'flow'"):
        dm.train(dm.UNet(**TINY_UNET), dm.PhantomDataset(shape=(16, 16, 16)), "flow", 4, batch_size=2,
                 out=tmp_path / "run", resume=True, progress=False)
    state_file = tmp_path / "run" / "checkpoints" / "step_000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["rng"] = state["rng"] * 2  # as if two processes had written it
    torch.save(state, state_file)
    model, ema = dm.UNet(**TINY_UNET), dm.UNet(**TINY_UNET)
    optimizer, scaler = torch.optim.Adam(model.parameters()), torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="comes from 2 process"):
        resumed = dm._restore(state_file.parent, model, ema, optimizer, scaler, "velocity", dm.DEFAULT_SCHEDULE, 0, 1)
    assert torch.equal(torch.get_rng_state(), before)
    assert resumed[:2] == (2, 4) and len(resumed[2]) == 2 and resumed[3] > 0  # step, position, losses, seconds
    assert dm._restore(None, *[None] * 4, "velocity", dm.DEFAULT_SCHEDULE, 0, 1) == (0, 0, [], 0.0, [])  # a fresh run


def test_training_helpers():
    """The pieces train() is made of, one process on a CPU: the EMA update (non-float buffers copied),
    the loss agreement, the dtype default, the checkpoint to resume."""
    ema, model = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        ema.weight.fill_(1.0)
    model.num_batches_tracked += 7
    dm._ema_update(list(zip(ema.state_dict().values(), model.state_dict().values())), 0.75)
    assert torch.equal(ema.weight, torch.full((3,), 1.25)) and int(ema.num_batches_tracked) == 7
    assert dm._agree(torch.tensor(0.5), True, 1) == (0.5, True) and dm._agree(torch.tensor(2.0), False, 1) == (2.0, False)
    assert dm._training_dtype(torch.device("cpu"), None) is None
    assert dm._training_dtype(torch.device("cpu"), "float32") == "float32"
    assert dm._checkpoint_to_resume(None, False) is None
    net = torch.nn.Linear(1, 1)
    assert dm._distribute(net, net, torch.device("cpu"), fresh=True) == (net, 0, 1, False)  # no torchrun: as it is
    states = dm._gather_rng_states(1)
    assert len(states) == 1 and set(states[0]) == {"torch", "numpy", "python", "cuda"}


def test_bad_arguments(tmp_path):
    model = dm.UNet(**MICRO_UNET)
    with pytest.raises(ValueError, match="steps, batch_size"):
        dm.train(model, dm.PhantomDataset(shape=(16, 16, 16)), "flow", 0)
    with pytest.raises(ValueError, match="resume=True needs out"):
        dm.train(model, dm.PhantomDataset(shape=(16, 16, 16)), "flow", 1, resume=True)
    with pytest.raises(ValueError, match=r"\(C, \*S\) or \(B, C, \*S\)"):
        dm.train(model, [torch.zeros(16, 16, 16)], "flow", 1, progress=False)
    with pytest.raises(ValueError, match="ran out"):
        dm.train(model, iter([torch.zeros(1, 16, 16, 16)]), "flow", 2, progress=False)
    with pytest.raises(ValueError, match="unknown prediction"):
        dm.train(model, dm.PhantomDataset(shape=(16, 16, 16)), "score", 1)


# ----------------------------------------------------------------------------- DDP


DDP_SCRIPT = """
import os, pathlib, sys
import torch
sys.path.insert(0, {repo!r})
import ddpm_mini as dm

rank, out = int(os.environ["RANK"]), pathlib.Path(sys.argv[1])
writes, items, real = [], [], dm._atomic_write
dm._atomic_write = lambda path, write: (writes.append(str(path)), real(path, write))[1]

class Logged(torch.utils.data.Dataset):
    def __len__(self):
        return 6
    def __getitem__(self, i):
        items.append(i)
        return torch.from_numpy(dm.phantom(i, (16, 16, 16))[0])[None]

torch.manual_seed(rank)  # different initial weights: DDP must start every rank from rank 0's
result = dm.train(dm.UNet(**{unet!r}), Logged(), "flow", 4, batch_size=2, out=out / "run", checkpoint_every=2,
                  progress=False)
torch.save(dict(model=result.model.state_dict(), ema=result.ema.state_dict(), history=result.history,
                writes=writes, items=items), out / f"rank{{rank}}.pt")
"""


def test_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(repo=REPO, unet=MICRO_UNET))
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("model", "ema"):
        assert r0[key].keys() == r1[key].keys() and all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key])
    assert r0["history"] == r1["history"] and len(r0["history"]) == 4  # the mean loss over both ranks
    assert r0["items"] != r1["items"] and len(r0["items"]) == len(r1["items"]) == 8  # own data per rank
    assert r1["writes"] == [] and any("step_000004" in w for w in r0["writes"])  # only rank 0 writes
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_000004" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    saved, _ = dm.load_model(tmp_path / "run" / "checkpoints" / "step_000004" / "model.safetensors")
    assert all(torch.equal(v, r0["model"][k]) for k, v in saved.state_dict().items())


def test_a_diverging_run_stops_before_the_bad_update_and_keeps_its_checkpoints(tmp_path):
    """A non-finite loss or gradient (here: a NaN voxel in the batch at step 3, or lr 1e4) stops train with a
    ValueError naming the step and the cause, before the weights change; the finite checkpoints stay."""
    batches = [torch.stack([torch.from_numpy(dm.phantom(2 * i + j, (16, 16, 16))[0])[None] for j in range(2)])
               for i in range(6)]
    batches[2][1, 0, 3, 3, 3] = float("nan")                   # the third batch: step 3

    class InOrder:                                             # a re-iterable of batches, read in order
        def __iter__(self):
            return iter(batches)
    torch.manual_seed(0)
    model = dm.UNet(**TINY_UNET)
    with pytest.raises(ValueError, match=r"train: step 3: loss nan, gradient norm nan: not finite \(the batch holds "
                                         r"non-finite values\); stopped before updating the weights\. The last "
                                         r"checkpoint, .*step_000002, is finite and kept"):
        dm.train(model, InOrder(), "flow", 6, batch_size=2, out=tmp_path / "nan", checkpoint_every=2, keep=1,
                 progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    kept = dm.latest_checkpoint(tmp_path / "nan")
    assert kept.name == "step_000002" and all(torch.isfinite(v).all() for v in dm.load_model(kept)[0].state_dict().values())
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"not finite \(lr 10000 may be too high\).*none written in this run"):
        dm.train(dm.UNet(**TINY_UNET), dm.PhantomDataset(shape=(16, 16, 16)), "flow", 30, batch_size=2, lr=1e4,
                 max_grad_norm=None, progress=False)


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path):
    """A cut-short state.pt in the newest checkpoint: resume warns, continues from the one before, and ends
    where a straight run ends (exact resume is kept)."""
    straight = run(tmp_path / "a", 6)
    run(tmp_path / "b", 4, keep=3)
    state = tmp_path / "b" / "checkpoints" / "step_000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"step_000004 cannot be used .*trying the checkpoint before it"):
        assert dm.latest_checkpoint(tmp_path / "b").name == "step_000002"
    with pytest.warns(UserWarning, match="step_000004 cannot be used"):
        resumed = run(tmp_path / "b", 6, resume=True)
    assert same(straight.model, resumed.model) and resumed.history == straight.history


def test_items_of_different_shapes_are_refused_by_name():
    items = [torch.zeros(1, 16, 16, 16), torch.zeros(1, 16, 16, 8)]
    with pytest.raises(ValueError, match=r"data items of different shapes, \(1, 16, 16, (16|8)\) and \(1, 16, 16, (8|16)\)"):
        dm.train(dm.UNet(**TINY_UNET), items, "flow", 1, batch_size=2, progress=False)


def test_a_time_capped_run_shows_no_step_total(capsys):
    """max_minutes: the bar counts steps and time against the budget, not against a step cap it will not
    reach (the demo's 100,000-step cap read `8/100000 [04:14<884:30:52]`); without it: steps of total."""
    data = dm.PhantomDataset(shape=(16, 16, 16))
    dm.train(dm.UNet(**MICRO_UNET), data, "flow", 2, max_minutes=30)
    capped = capsys.readouterr().err
    assert "training (flow, up to 30 min)" in capped and "2it [" in capped and "/2 [" not in capped
    dm.train(dm.UNet(**MICRO_UNET), data, "flow", 2)
    assert "2/2 [" in capsys.readouterr().err
