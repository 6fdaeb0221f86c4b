"""Training: the loss falls for every prediction; checkpoints resume bit-identically and survive a
crash mid-write; DDP on two CPU processes; every command of the command line end to end."""
import csv
import hashlib
import os
import socket
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import ddpm_mini as dm
from conftest import TINY_UNET

#: No attention, two levels: the fastest U-Net that still learns 16^3 phantoms in 20 steps.
MICRO_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                  num_res_blocks=1, num_head_channels=4, norm_num_groups=4)
REPO = os.path.dirname(os.path.abspath(dm.__file__))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On a busy 2-core machine two torch threads can be 50x slower than one (OpenMP spin-waits);
    the numbers are the same either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize("prediction", dm.PREDICTIONS)
def test_a_short_run_lowers_the_loss(prediction):
    """Target-space MSE on a fixed held-out batch with fixed t and noise, before vs after 20 steps.
    Measured (3 seeds): after/before 0.10-0.35 and after/(loss of predicting zeros) 0.12-0.33
    for the model and its EMA alike; a run that learns nothing stays near 1."""
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
    assert after / before < 0.6 and ema / before < 0.6, (before, after, ema)
    assert after / zero < 0.6 and ema / zero < 0.6, (zero, after, ema)
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


def test_checkpoint_contents(tmp_path):
    previews = []
    result = run(tmp_path, 2, preview_every=2, preview_steps=2, on_preview=lambda step, x: previews.append((step, x)))
    assert [(step, x.shape) for step, x in previews] == [(2, (1, 1, 16, 16, 16))] and previews[0][1].abs().max() <= 1
    ckpt = result.checkpoint
    assert sorted(p.name for p in ckpt.iterdir()) == ["ema.safetensors", "model.safetensors", "state.pt"]
    model, meta = dm.load_model(ckpt / "ema.safetensors")
    assert meta["prediction"] == "velocity" and meta["step"] == "2" and meta["shape"] == "[16, 16, 16]"
    assert meta["unet"]["channels"] == [8, 16] and same(model, result.ema)
    state = torch.load(ckpt / "state.pt", weights_only=True)  # plain tensors and containers only
    assert state["step"] == 2 and state["data_position"] == 4 and state["world_size"] == 1
    assert set(state["rng"][0]) == {"torch", "numpy", "python", "cuda"} and len(state["history"]) == 2
    assert state["optimizer"]["state"][0]["step"] == 2
    assert [p.name for p in result.previews] == ["step_000002.png"] and result.previews[0].stat().st_size > 1000
    assert dm.weights_file(tmp_path) == ckpt / "ema.safetensors" == dm.weights_file(ckpt)
    with pytest.raises(ValueError, match="resume=True"):  # never mixes two runs in one folder
        run(tmp_path, 4)


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# ----------------------------------------------------------------------------- command line


def test_cli_train_resume_and_sample(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ["train", "--phantoms", "--prediction", "sample", "--size", "16", "16", "16", "--batch-size", "1",
            "--out", str(out), "--checkpoint-every", "2"]
    assert dm.main(base + ["--steps", "3"]) == 0
    assert "sample with: python ddpm_mini.py sample --weights" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    assert dm.main(base + ["--steps", "3"]) == 1 and "--resume" in capsys.readouterr().err
    assert dm.main(base + ["--steps", "4", "--resume"]) == 0
    assert "from step_000003" in capsys.readouterr().out
    with open(out / "history.csv") as f:
        assert [r[0] for r in csv.reader(f)] == ["step", "1", "2", "3", "4"]
    _, meta = dm.load_model(out / "checkpoints" / "step_000004" / "ema.safetensors")
    assert meta["unet"]["channels"] == list(dm.TEACHING_UNET["channels"])

    # sample from the run folder: EMA weights, prediction and size from the metadata
    assert dm.main(["sample", "--weights", str(out), "--n", "2", "--steps", "2", "--out-dir", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "sample_sample_0000.nii.gz", "sample_sample_0000.png", "sample_sample_0001.nii.gz", "sample_sample_0001.png"]
    assert nib.load(tmp_path / "s" / "sample_sample_0001.nii.gz").shape == (16, 16, 16)
    # under torchrun each rank makes samples i with i % WORLD_SIZE == RANK
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dm.main(["sample", "--weights", str(out / "checkpoints" / "step_000004"), "--n", "3", "--steps", "2",
                    "--out-dir", str(tmp_path / "r1")]) == 0
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == ["sample_sample_0001.nii.gz", "sample_sample_0001.png"]
    data = np.asarray(nib.load(tmp_path / "r1" / "sample_sample_0001.nii.gz").dataobj)
    assert np.array_equal(data, np.asarray(nib.load(tmp_path / "s" / "sample_sample_0001.nii.gz").dataobj))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert dm.main(["sample", "--weights", str(tmp_path / "s"), "--steps", "2"]) == 1
    assert "neither ema.safetensors nor a complete checkpoint" in capsys.readouterr().err


def write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=dm.MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows({c: row.get(c, "") for c in dm.MANIFEST_COLUMNS} for row in rows)


def test_cli_fetch(tmp_path, http_server, monkeypatch, capsys):
    root, base = http_server
    (root / "v.nii.gz").write_bytes(b"volume" * 500)
    sha = hashlib.sha256((root / "v.nii.gz").read_bytes()).hexdigest()
    write_manifest(tmp_path / "m.csv", [
        dict(name="vol", kind="volume", group="g", url=f"{base}/v.nii.gz", hash=f"sha256:{sha}", verified="true",
             size="3000", license="CC0"),
        dict(name="paper_data", kind="source", group="", verified="false", license="DUA required")])
    monkeypatch.setenv("DDPM_MINI_MANIFEST", str(tmp_path / "m.csv"))
    monkeypatch.setenv("DDPM_MINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPM_MINI_MIRROR", raising=False)
    assert dm.main(["fetch", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "kind", "group", "size", "verified", "licence"]
    assert lines[1].split() == ["vol", "volume", "g", "0.0", "MB", "true", "CC0"]
    assert lines[2].split()[:2] == ["paper_data", "source"] and lines[2].endswith("DUA required")
    assert dm.main(["fetch", "vol"]) == 0
    path = tmp_path / "cache" / "vol" / "v.nii.gz"
    assert capsys.readouterr().out.strip() == str(path) and path.read_bytes() == (root / "v.nii.gz").read_bytes()
    assert dm.main(["fetch", "--group", "g"]) == 0 and capsys.readouterr().out.strip() == str(path)
    assert dm.main(["fetch"]) == 1 and "NAME, --group G or --list" in capsys.readouterr().err
    assert dm.main(["fetch", "nope"]) == 1 and "unknown asset 'nope'" in capsys.readouterr().err


def test_cli_preprocess(tmp_path, capsys):
    arr = np.zeros((40, 48, 40), np.float32)
    arr[8:32, 8:40, 8:32] = 100 + np.arange(24)[:, None, None]
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "in.nii.gz"))
    with pytest.warns(UserWarning, match="coarser than 1.2 mm"):
        assert dm.main(["preprocess", str(tmp_path / "in.nii.gz"), str(tmp_path / "o" / "out.nii.gz")]) == 0
    assert "(192, 224, 192)" in capsys.readouterr().out
    img = nib.load(tmp_path / "o" / "out.nii.gz")
    assert img.shape == dm.IMAGE_SHAPE and img.get_data_dtype() == np.uint16
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S") and np.allclose(img.header.get_zooms(), 1)
    out = np.asarray(img.dataobj)
    box_mm3 = 48 * 64 * 48  # the 24 x 32 x 24 box of 2 mm voxels, now at 1 mm
    assert out.max() == 65535 and abs((out > 0).sum() / box_mm3 - 1) < 0.1
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["out.nii.gz"]
    assert dm.main(["preprocess", str(tmp_path / "missing.nii.gz"), str(tmp_path / "o" / "x.nii.gz")]) == 1
    assert not (tmp_path / "o" / "x.nii.gz").exists()


def test_cli_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert dm.main(["demo", "--minutes", "5", "--steps", "2", "--size", "16", "16", "16", "--n", "2",
                    "--sample-steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["demo_0.nii.gz", "demo_0.png", "demo_1.nii.gz", "demo_1.png"]
    assert dm.latest_checkpoint(out).name == "step_000002"
    rows = {line[:36].strip(): line[36:].split() for line in printed.splitlines() if " ± " in line}
    truth = [dm.phantom_volumes(dm.phantom(10_000 + i, (16, 16, 16))[1]) for i in range(8)]
    expected = np.mean([v["white_matter"] for v in truth]) / 1000
    assert float(rows["white_matter"][0]) == pytest.approx(expected, abs=0.06)
    assert "segment_phantom" in printed and len(rows) == len(dm.PHANTOM_LABELS) - 1
    assert all(np.isfinite(float(v[3])) for v in rows.values())  # the samples' means
    # running it again continues the same run
    assert dm.main(["demo", "--steps", "3", "--size", "16", "16", "16", "--n", "1", "--sample-steps", "2",
                    "--out", str(out)]) == 0
    assert dm.latest_checkpoint(out).name == "step_000003"


def test_every_command_has_help(capsys):
    out = subprocess.run([sys.executable, dm.__file__, "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("demo", "train", "sample", "fetch", "preprocess"):
        assert name in out
        with pytest.raises(SystemExit) as exit_:
            dm.main([name, "--help"])
        assert exit_.value.code == 0
    printed = capsys.readouterr().out
    for flag in ("--phantoms", "--resume", "--unet", "--minutes", "--list", "--mask", "--out-dir"):
        assert flag in printed
