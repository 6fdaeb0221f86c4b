"""Section 12 (command line): every command end to end on tiny settings, driven through
dm.main([...]) (and, where it matters, `python ddpm_mini.py` itself): help, main()'s error
handling, sample, train and demo, fetch, preprocess, evaluate."""
import csv
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import ddpm_mini as dm
from conftest import (GRID_CENTRE, MICRO_UNET, PARC, SYNTHSEG1, SYNTHSEG2, TINY_UNET, randomize, synthetic_head,
                      synthseg_csv, write_manifest, write_phantom_folder)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture
def tiny_weights(tmp_path):
    return dm.save_weights(randomize(dm.UNet(**TINY_UNET), seed=2), tmp_path / "tiny.safetensors", prediction="flow")


# --- Help and errors ------------------------------------------------------------------------------


def test_every_command_has_help(capsys):
    out = subprocess.run([sys.executable, dm.__file__, "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("demo", "train", "sample", "fetch", "preprocess", "evaluate"):
        assert name in out
        with pytest.raises(SystemExit) as exit_:
            dm.main([name, "--help"])
        assert exit_.value.code == 0
    printed = capsys.readouterr().out
    for flag in ("--phantoms", "--resume", "--unet", "--minutes", "--list", "--mask", "--out-dir", "--synthetic"):
        assert flag in printed
    assert "<prediction>_model_seed<NNNN>.nii.gz" in printed      # sample --out-dir names its files
    assert printed.count("40 48 40") >= 2                         # TEACHING_SHAPE: train's and demo's default size
    parser = dm._build_parser()  # every option of every command says what it does
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        assert ("--threads" in sub._option_string_actions) == (name != "fetch"), name
    out = subprocess.run([sys.executable, dm.__file__, "sample", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--prediction" in out and "--spacing" in out
    with pytest.raises(SystemExit) as exit_:
        dm.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"ddpm-mini {dm.__version__}"


def test_main_reports_expected_errors_and_nothing_else(tmp_path, monkeypatch, closed_port, capsys):
    """No command: the help, exit status 2. ValueError, OSError (FileNotFoundError, ConnectionError)
    and nibabel's ImageFileError: `error: ...` on stderr, status 1 (preprocess's: test_cli_preprocess).
    Anything else is a bug and propagates; bad options are argparse's (SystemExit 2)."""
    assert dm.main([]) == 2 and "usage: ddpm_mini.py" in capsys.readouterr().err  # help on stderr: an error
    assert dm.main(["train", "--prediction", "flow", "--out", str(tmp_path / "run")]) == 1     # ValueError
    assert capsys.readouterr().err == "error: train: give --phantoms or --data DIR (one of them)\n"
    write_manifest(tmp_path / "m.csv", [dict(name="x", kind="volume", group="g", url=f"http://127.0.0.1:{closed_port}/x.bin",
                                             hash="sha256:" + "0" * 64, verified="true", license="CC0")])
    monkeypatch.setenv("DDPM_MINI_MANIFEST", str(tmp_path / "m.csv"))
    monkeypatch.setenv("DDPM_MINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPM_MINI_MIRROR", raising=False)
    assert dm.main(["fetch", "x"]) == 1                                                       # ConnectionError
    err = capsys.readouterr().err
    assert err.startswith("error: could not fetch 'x'") and "DDPM_MINI_MIRROR" in err
    assert dm.main(["evaluate", "--real", str(tmp_path / "none"), "--synthetic", f"a={tmp_path / 'none'}",
                    "--out", str(tmp_path / "o")]) == 1                                        # FileNotFoundError
    assert capsys.readouterr().err.startswith("error: ")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")
    monkeypatch.setattr(dm, "read_manifest", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        dm.main(["fetch", "--list"])
    with pytest.raises(SystemExit) as exit_:
        dm.main(["sample", "--steps", "many"])
    assert exit_.value.code == 2 and "argument --steps: 'many' is not an integer" in capsys.readouterr().err


# --- sample ---------------------------------------------------------------------------------------


def test_sample_command_writes_nifti_and_png(tmp_path, tiny_weights, capsys):
    out = tmp_path / "s.nii.gz"
    assert dm.main(["sample", "--weights", str(tiny_weights), "--steps", "3", "--seed", "0",
                    "--shape", "16", "16", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "first step:" in printed and "min per sample" in printed
    img = nib.load(out)
    assert img.shape == (16, 16, 8) and img.get_data_dtype() == np.uint16
    # a file that records no training grid is taken as the published grid's model: 1 mm voxels, centred
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S") and np.allclose(img.header.get_zooms(), 1)
    np.testing.assert_allclose(img.affine[:3, :3] @ [7.5, 7.5, 3.5] + img.affine[:3, 3], 0)
    data = np.asarray(img.dataobj)
    assert data.min() == 0 and data.max() == 65535  # min-max over the full uint16 range
    assert (tmp_path / "s.png").stat().st_size > 1000
    # same seed, same volume
    dm.main(["sample", "--weights", str(tiny_weights), "--steps", "3", "--shape", "16", "16", "8", "--out", str(tmp_path / "t.nii.gz")])
    assert np.array_equal(np.asarray(nib.load(tmp_path / "t.nii.gz").dataobj), data)


def test_sample_paper_era(tmp_path, tiny_weights, capsys):
    """--paper-era: the leading grid and the raw eps, whatever --spacing says; the same volume as the API's."""
    out = tmp_path / "p.nii.gz"
    assert dm.main(["sample", "--weights", str(tiny_weights), "--steps", "4", "--shape", "16", "16", "8",
                    "--paper-era", "--spacing", "linspace", "--out", str(out)]) == 0
    assert "4 leading steps, eta 0.0, paper-era (raw eps)" in capsys.readouterr().out
    model, _ = dm.load_model(tiny_weights)
    x = dm.sample(model, "flow", shape=(1, 1, 16, 16, 8), steps=4, spacing="leading", recompute_eps=False,
                  generator=torch.Generator().manual_seed(0), progress=False)
    assert np.array_equal(np.asarray(nib.load(out).dataobj), dm.to_uint16(dm.normalize_intensity(x[0, 0])))


def test_sample_weights_by_manifest_name(tmp_path, tiny_weights, monkeypatch, capsys):
    """--weights teaching_x: a manifest name, served from the kit's weights/ folder (no network here)."""
    kit = tmp_path / "kit"
    (kit / "weights").mkdir(parents=True)
    shutil.copy(tiny_weights, kit / "weights" / "teaching_x.safetensors")
    sha = hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    write_manifest(kit / "data_manifest.csv", [dict(name="teaching_x", kind="weights", group="teaching", hash=f"sha256:{sha}",
                                                    url="https://example.invalid/weights/teaching_x.safetensors")])
    monkeypatch.setenv("DDPM_MINI_MANIFEST", str(kit / "data_manifest.csv"))
    monkeypatch.setenv("DDPM_MINI_CACHE", str(tmp_path / "cache"))
    args = ["sample", "--steps", "2", "--shape", "16", "16", "8"]
    assert dm.main(args + ["--weights", "teaching_x", "--out", str(tmp_path / "a.nii.gz")]) == 0
    assert dm.main(args + ["--weights", str(tiny_weights), "--out", str(tmp_path / "b.nii.gz")]) == 0
    assert np.array_equal(nib.load(tmp_path / "a.nii.gz").get_fdata(), nib.load(tmp_path / "b.nii.gz").get_fdata())
    capsys.readouterr()
    assert dm.main(args + ["--weights", "teaching_y", "--out", str(tmp_path / "c.nii.gz")]) == 1
    assert capsys.readouterr().err == ("error: --weights teaching_y: no such file or folder, and no weights of that "
                                       "name in the manifest (those are: teaching_x)\n")
    assert not (tmp_path / "c.nii.gz").exists() and not (tmp_path / "cache").exists()


def test_sample_several_into_a_folder(tmp_path, tiny_weights):
    assert dm.main(["sample", "--weights", str(tiny_weights), "--steps", "2", "--n", "2", "--seed", "5",
                    "--shape", "8", "8", "8", "--out-dir", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "flow_model_seed0005.nii.gz", "flow_model_seed0005.png", "flow_model_seed0006.nii.gz", "flow_model_seed0006.png"]
    # --out-dir with a single sample uses the same naming
    assert dm.main(["sample", "--weights", str(tiny_weights), "--steps", "2", "--seed", "7", "--shape", "8", "8", "8",
                    "--out-dir", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["flow_model_seed0007.nii.gz", "flow_model_seed0007.png"]


def test_sample_command_errors(tmp_path, tiny_weights, capsys):
    assert dm.main(["sample", "--weights", str(tmp_path / "none.safetensors")]) == 1
    assert "not found" in capsys.readouterr().err
    assert dm.main(["sample", "--weights", str(tiny_weights), "--steps", "1", "--shape", "8", "8", "8"]) == 1
    assert "steps must be an integer in 2..1000" in capsys.readouterr().err
    assert dm.main(["sample", "--weights", str(tiny_weights), "--steps", "2", "--shape", "8", "8", "8",
                    "--out", str(tmp_path / "x.npy")]) != 0
    assert not (tmp_path / "x.npy").exists()
    assert dm.main(["sample", "--steps", "2"]) == 1
    assert "give --prediction (pretrained MedForj) or --weights FILE" in capsys.readouterr().err


def test_sample_uses_the_schedule_of_the_run(tmp_path, capsys):
    """A run trained with Schedule(T=500): the sample command rebuilds that schedule from the weights'
    metadata, so its grid is validated against T = 500 and the volume is the one dm.sample makes with
    that schedule (not with the default)."""
    short = dm.Schedule(T=500)
    torch.manual_seed(0)
    dm.train(dm.UNet(**MICRO_UNET), dm.PhantomDataset(shape=(8, 8, 8)), "flow", 1, out=tmp_path / "run",
             schedule=short, progress=False)
    model, meta = dm.load_model(tmp_path / "run")
    assert meta["schedule"] == short.config() and meta["shape"] == [8, 8, 8]
    assert dm.main(["sample", "--weights", str(tmp_path / "run"), "--steps", "600"]) == 1
    assert "steps must be an integer in 2..500" in capsys.readouterr().err
    assert dm.main(["sample", "--weights", str(tmp_path / "run"), "--steps", "2", "--seed", "3",
                    "--out", str(tmp_path / "s.nii.gz")]) == 0
    assert "with the flow model on cpu, dpm++2m, 2 linspace steps" in capsys.readouterr().out  # the CLI's default
    written = np.asarray(nib.load(tmp_path / "s.nii.gz").dataobj)

    def made_with(schedule):
        x = dm.sample(model, "flow", shape=(1, 1, 8, 8, 8), steps=2, schedule=schedule, method="dpm++2m",
                      generator=torch.Generator().manual_seed(3), progress=False)
        return dm.to_uint16(dm.normalize_intensity(x[0, 0]))
    assert np.array_equal(written, made_with(short))
    assert not np.array_equal(written, made_with(None))


def test_sample_defaults_to_dpm_solver_at_50_steps_and_to_ddim_for_its_options(tmp_path, capsys):
    """The CLI samples with DPM-Solver++(2M) at 50 steps unless told otherwise (chosen from README's steps
    table); --eta or --paper-era without --method mean DDIM, and --method dpm++2m with them is refused."""
    torch.manual_seed(0)
    dm.train(dm.UNet(**MICRO_UNET), dm.PhantomDataset(shape=(8, 8, 8)), "flow", 1, out=tmp_path / "run", progress=False)
    run = str(tmp_path / "run")
    assert dm.main(["sample", "--weights", run, "--out", str(tmp_path / "a.nii.gz")]) == 0
    assert "dpm++2m, 50 linspace steps" in capsys.readouterr().out
    assert dm.main(["sample", "--weights", run, "--steps", "2", "--eta", "1", "--out", str(tmp_path / "b.nii.gz")]) == 0
    assert "ddim, 2 linspace steps, eta 1.0" in capsys.readouterr().out
    assert dm.main(["sample", "--weights", run, "--steps", "2", "--paper-era", "--out", str(tmp_path / "c.nii.gz")]) == 0
    assert "ddim, 2 leading steps" in capsys.readouterr().out
    assert dm.main(["sample", "--weights", run, "--method", "dpm++2m", "--eta", "1", "--out", str(tmp_path / "d.nii.gz")]) == 1
    assert "--eta and --paper-era are DDIM's options" in capsys.readouterr().err
    assert not (tmp_path / "d.nii.gz").exists()


def test_readme_sample_command_fetches_the_pretrained_model(tmp_path, http_server, standin_weights, monkeypatch, capsys):
    """README command (a), `sample --prediction flow --seed 0 --out sample_flow.nii.gz`, on a
    small grid and 2 steps: the real manifest row, fetched from a loopback mirror holding a stand-in file."""
    root, base = http_server
    shutil.copyfile(standin_weights, root / "MedForj-weights-flow_ema.safetensors")
    monkeypatch.delenv("DDPM_MINI_MANIFEST", raising=False)
    monkeypatch.setenv("DDPM_MINI_MIRROR", base)
    monkeypatch.setenv("DDPM_MINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    dm._WARNED_UNVERIFIED.discard("medforj_flow")
    with pytest.warns(UserWarning, match="medforj_flow: no checksum is published"):
        assert dm.main(["sample", "--prediction", "flow", "--steps", "2", "--seed", "0", "--shape", "16", "16", "16",
                        "--device", "cpu", "--out", "sample_flow.nii.gz"]) == 0
    assert (tmp_path / "cache" / "medforj_flow" / "MedForj-weights-flow_ema.safetensors").exists()
    img = nib.load(tmp_path / "sample_flow.nii.gz")
    assert img.shape == (16, 16, 16) and (tmp_path / "sample_flow.png").exists()
    assert "with the flow model on cpu" in capsys.readouterr().out


def test_sample_the_pretrained_rflow_model(tmp_path, http_server, standin_weights, monkeypatch, capsys):
    """`sample --prediction rflow`: the fifth published model (stand-in weights on a loopback mirror), sampled on
    its straight-line schedule and real-t grid, unclipped: the same volume as dm.sample with load_pretrained."""
    root, base = http_server
    shutil.copyfile(standin_weights, root / "MedForj-weights-rflow_ema.safetensors")
    monkeypatch.delenv("DDPM_MINI_MANIFEST", raising=False)
    monkeypatch.setenv("DDPM_MINI_MIRROR", base)
    monkeypatch.setenv("DDPM_MINI_CACHE", str(tmp_path / "cache"))
    dm._WARNED_UNVERIFIED.add("medforj_rflow")
    out = tmp_path / "rflow.nii.gz"
    assert dm.main(["sample", "--prediction", "rflow", "--steps", "2", "--shape", "16", "16", "16", "--device", "cpu",
                    "--out", str(out)]) == 0
    assert "with the rflow model on cpu, ddim, 2 linspace steps" in capsys.readouterr().out
    x = dm.sample(dm.load_pretrained("rflow", "cpu"), "rflow", shape=(1, 1, 16, 16, 16), steps=2,
                  generator=torch.Generator().manual_seed(0), progress=False)
    assert np.array_equal(np.asarray(nib.load(out).dataobj), dm.to_uint16(dm.normalize_intensity(x[0, 0])))
    assert dm.main(["sample", "--prediction", "rflow", "--paper-era", "--shape", "16", "16", "16",
                    "--out", str(tmp_path / "no.nii.gz")]) == 1
    assert "one timestep grid" in capsys.readouterr().err and not (tmp_path / "no.nii.gz").exists()


# --- train and demo -------------------------------------------------------------------------------


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
    assert meta["schedule"] == dm.DEFAULT_SCHEDULE.config() and meta["shape"] == [16, 16, 16]

    # sample from the run folder: EMA weights, prediction and size from the metadata
    assert dm.main(["sample", "--weights", str(out), "--n", "2", "--steps", "2", "--out-dir", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "sample_model_seed0000.nii.gz", "sample_model_seed0000.png", "sample_model_seed0001.nii.gz", "sample_model_seed0001.png"]
    assert nib.load(tmp_path / "s" / "sample_model_seed0001.nii.gz").shape == (16, 16, 16)
    # under torchrun each rank makes samples i with i % WORLD_SIZE == RANK
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dm.main(["sample", "--weights", str(out / "checkpoints" / "step_000004"), "--n", "3", "--steps", "2",
                    "--out-dir", str(tmp_path / "r1")]) == 0
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == ["sample_model_seed0001.nii.gz", "sample_model_seed0001.png"]
    data = np.asarray(nib.load(tmp_path / "r1" / "sample_model_seed0001.nii.gz").dataobj)
    assert np.array_equal(data, np.asarray(nib.load(tmp_path / "s" / "sample_model_seed0001.nii.gz").dataobj))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert dm.main(["sample", "--weights", str(tmp_path / "s"), "--steps", "2"]) == 1
    assert "neither ema.safetensors nor a complete checkpoint" in capsys.readouterr().err


@pytest.fixture
def shipped_kit(tmp_path, monkeypatch):
    """A manifest with a teaching_flow row whose file (random TINY_UNET weights trained "at" 16^3, step
    7) sits in the kit's weights/ folder beside it: what a checkout ships, without the network."""
    kit = tmp_path / "kit"
    path = dm.save_weights(randomize(dm.UNet(**TINY_UNET), seed=5), kit / "weights" / "teaching_flow.safetensors",
                           prediction="flow", shape=[16, 16, 16], step=7)
    write_manifest(kit / "data_manifest.csv", [dict(name="teaching_flow", kind="weights", group="teaching",
                                                    url="https://example.invalid/weights/teaching_flow.safetensors",
                                                    hash="sha256:" + hashlib.sha256(path.read_bytes()).hexdigest())])
    monkeypatch.setenv("DDPM_MINI_MANIFEST", str(kit / "data_manifest.csv"))
    monkeypatch.setenv("DDPM_MINI_CACHE", str(tmp_path / "cache"))
    return path


def _volume_table(printed):
    table = [re.split(r"\s{2,}", line.strip()) for line in printed.splitlines() if " ± " in line or "structure" in line]
    return table[0], {cells[0]: [c.split(" ± ") for c in cells[1:]] for cells in table[1:]}


def test_cli_demo(tmp_path, shipped_kit, capsys):
    """Trains, then samples its own model and the shipped one from the same noise; a table of tissue
    volumes: the truth, then each model (mean ± sd over the samples)."""
    out = tmp_path / "demo"
    assert dm.main(["demo", "--minutes", "5", "--steps", "2", "--size", "16", "16", "16", "--n", "2",
                    "--sample-steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        f"{who}_{i}.{ext}" for who in ("shipped", "yours") for i in (0, 1) for ext in ("nii.gz", "png")]
    assert dm.latest_checkpoint(out).name == "step_000002"
    header, rows = _volume_table(printed)
    assert header == ["structure", "phantoms (8, truth)", "yours (2 steps): 2 samples", "shipped (7 steps): 2 samples"]
    truth = [dm.phantom_volumes(dm.phantom(10_000 + i, (16, 16, 16))[1]) for i in range(8)]
    expected = np.mean([v["white_matter"] for v in truth]) / 1000
    assert float(rows["white_matter"][0][0]) == pytest.approx(expected, abs=0.06)
    assert "segment_phantom" in printed and len(rows) == len(dm.PHANTOM_LABELS) - 1
    assert all(np.isfinite(float(v)) for cells in rows.values() for cell in cells for v in cell)
    # running it again continues the same run; at another size the shipped model is skipped, with a note
    assert dm.main(["demo", "--steps", "3", "--size", "16", "16", "8", "--n", "1", "--sample-steps", "2",
                    "--out", str(tmp_path / "demo8")]) == 0
    printed = capsys.readouterr().out
    assert "trained at (16, 16, 16), not (16, 16, 8): not sampled" in printed
    assert _volume_table(printed)[0] == ["structure", "phantoms (8, truth)", "yours (3 steps): 1 samples"]


def test_cli_demo_pretrained(tmp_path, shipped_kit, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert dm.main(["demo", "--pretrained", "--size", "16", "16", "16", "--n", "1", "--sample-steps", "2",
                    "--out", str(out)]) == 0
    assert _volume_table(capsys.readouterr().out)[0] == ["structure", "phantoms (8, truth)", "shipped (7 steps): 1 samples"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["shipped_0.nii.gz", "shipped_0.png"]
    assert dm.latest_checkpoint(out) is None                          # nothing trained
    assert dm.main(["demo", "--pretrained", "--out", str(tmp_path / "bad"), "--size", "16", "16", "8"]) == 1
    assert "trained at another size; drop --size" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    shipped_kit.unlink()                                               # no weights/ copy and no network
    monkeypatch.setenv("DDPM_MINI_MIRROR", str(tmp_path / "empty"))
    assert dm.main(["demo", "--pretrained", "--size", "16", "16", "16", "--out", str(tmp_path / "off")]) == 1
    assert "could not fetch 'teaching_flow'" in capsys.readouterr().err and not (tmp_path / "off").exists()


# --- fetch ----------------------------------------------------------------------------------------


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
    assert dm.main(["fetch", "paper_data"]) == 1 and "cannot be fetched" in capsys.readouterr().err


# --- preprocess -----------------------------------------------------------------------------------


def test_cli_preprocess(tmp_path, capsys):
    """A 1 mm LIA head: (192, 224, 192) uint16 LPS, and the head centre, measured on the output, reported
    near the grid centre. A 2 mm box: the coarse-voxel warning, 1 mm voxels, the box's volume. Errors
    (a missing mask or input, a file that is no image, a constant image): `error: ...`, nothing written."""
    img, landmark = synthetic_head("LIA", (1.0, 1.0, 1.0))
    nib.save(img, str(tmp_path / "in.nii.gz"))
    assert dm.main(["preprocess", str(tmp_path / "in.nii.gz"), str(tmp_path / "out" / "o.nii.gz")]) == 0
    printed = capsys.readouterr().out
    assert "(192, 224, 192)" in printed
    found = re.search(r"head centre at voxel \(([-\d.]+), ([-\d.]+), ([-\d.]+)\); grid centre \(95\.5, 111\.5, 95\.5\)",
                      printed)
    assert found, printed
    centre = np.array([float(v) for v in found.groups()])
    assert np.abs(centre - GRID_CENTRE).max() < 1.5
    out = nib.load(str(tmp_path / "out" / "o.nii.gz"))
    assert out.shape == dm.IMAGE_SHAPE and out.get_data_dtype() == np.uint16
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
    np.testing.assert_allclose(centre, dm._head_centre(np.asarray(out.dataobj, np.float32)), atol=0.051)  # of the output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["o.nii.gz"]   # no temporary left
    assert dm.main(["preprocess", str(tmp_path / "in.nii.gz"), str(tmp_path / "bad.nii.gz"),
                    "--mask", str(tmp_path / "missing.nii.gz")]) == 1
    err = capsys.readouterr().err
    assert "error" in err and not (tmp_path / "bad.nii.gz").exists()
    assert err.startswith("error: ") and "missing.nii.gz" in err

    arr = np.zeros((40, 48, 40), np.float32)
    arr[8:32, 8:40, 8:32] = 100 + np.arange(24)[:, None, None]
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "in2.nii.gz"))
    with pytest.warns(UserWarning, match="coarser than 1.2 mm"):
        assert dm.main(["preprocess", str(tmp_path / "in2.nii.gz"), str(tmp_path / "o" / "out.nii.gz")]) == 0
    assert "(192, 224, 192)" in capsys.readouterr().out
    img = nib.load(tmp_path / "o" / "out.nii.gz")
    assert img.shape == dm.IMAGE_SHAPE and img.get_data_dtype() == np.uint16
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S") and np.allclose(img.header.get_zooms(), 1)
    data = np.asarray(img.dataobj)
    box_mm3 = 48 * 64 * 48  # the 24 x 32 x 24 box of 2 mm voxels, now at 1 mm
    assert data.max() == 65535 and abs((data > 0).sum() / box_mm3 - 1) < 0.1
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["out.nii.gz"]
    assert dm.main(["preprocess", str(tmp_path / "missing.nii.gz"), str(tmp_path / "o" / "x.nii.gz")]) == 1
    assert not (tmp_path / "o" / "x.nii.gz").exists() and capsys.readouterr().err.startswith("error: ")
    (tmp_path / "notes.txt").write_text("not an image")                         # nibabel's ImageFileError
    assert dm.main(["preprocess", str(tmp_path / "notes.txt"), str(tmp_path / "o" / "y.nii.gz")]) == 1
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "o" / "y.nii.gz").exists()
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 3.0, np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz"))
    assert dm.main(["preprocess", str(tmp_path / "flat.nii.gz"), str(tmp_path / "o" / "z.nii.gz")]) == 1
    assert "constant" in capsys.readouterr().err and sorted(p.name for p in (tmp_path / "o").iterdir()) == ["out.nii.gz"]


# --- evaluate -------------------------------------------------------------------------------------


def test_cli_on_synthseg_csvs(tmp_path, capsys):
    subj = lambda tag, n: [f"/data/{tag}-{i:02d}.nii.gz" for i in range(n)]  # noqa: E731
    synthseg_csv(tmp_path / "real.csv", SYNTHSEG2, subj("real", 20), seed=1, thalamus_mm3=7000)
    synthseg_csv(tmp_path / "sample.csv", SYNTHSEG2, subj("sample", 15), seed=2, thalamus_mm3=5500)
    synthseg_csv(tmp_path / "flow.csv", SYNTHSEG1 + PARC, subj("flow", 15), seed=3, thalamus_mm3=7000)
    code = dm.main(["evaluate", "--real", str(tmp_path / "real.csv"),
                    "--synthetic", f"sample={tmp_path / 'sample.csv'}", f"flow={tmp_path / 'flow.csv'}",
                    "--out", str(tmp_path / "out"), "--structures", "thalamus", "caudate",
                    "--merge-lr", "--permutations", "999", "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "p_adjusted" in printed and "wrote" in printed
    rows = dm.read_rows_csv(tmp_path / "out" / "volumes.csv")
    assert [(r["set"], r["structure"]) for r in rows] == [("sample", "thalamus"), ("sample", "caudate"),
                                                          ("flow", "thalamus"), ("flow", "caudate")]
    assert rows[0]["p"] == 1 / 1000 and rows[0]["difference"] == pytest.approx(-3000, abs=600)
    assert rows[2]["p"] > 0.01
    assert (tmp_path / "out" / "volumes.png").stat().st_size > 10_000
    assert dm.main(["evaluate", "--real", str(tmp_path / "real.csv"), "--synthetic", "flow.csv", "--out", "x"]) == 1
    assert "NAME=CSV|DIR" in capsys.readouterr().err
    assert dm.main(["evaluate", "--real", str(tmp_path / "nope.csv"), "--synthetic", f"a={tmp_path / 'flow.csv'}",
                    "--out", str(tmp_path / "o2")]) == 1
    assert "nope.csv" in capsys.readouterr().err


def test_cli_end_to_end_on_phantom_folders(tmp_path, capsys):
    for d in ("real", "flow", "sample"):
        (tmp_path / d).mkdir()
    real = write_phantom_folder(tmp_path / "real", range(0, 6))
    write_phantom_folder(tmp_path / "flow", range(10, 16), labels=True)
    write_phantom_folder(tmp_path / "sample", range(20, 26), head_scale=1.15)  # every length x 1.15
    code = dm.main(["evaluate", "--real", str(tmp_path / "real"), "--synthetic", f"flow={tmp_path / 'flow'}",
                    f"sample={tmp_path / 'sample'}", "--out", str(tmp_path / "out"), "--merge-lr",
                    "--structures", "thalamus", "putamen", "lateral_ventricles", "--permutations", "999"])
    assert code == 0 and "thalamus" in capsys.readouterr().out
    rows = {(r["set"], r["structure"]): r for r in dm.read_rows_csv(tmp_path / "out" / "volumes.csv")}
    assert len(rows) == 6
    true_thalamus = np.mean([v["left_thalamus"] + v["right_thalamus"] for v in real])
    assert rows["flow", "thalamus"]["mean_real"] == pytest.approx(true_thalamus, rel=0.03)
    assert rows["flow", "thalamus"]["p"] > 0.01                   # same distribution
    assert rows["sample", "thalamus"]["p"] < 0.01                 # 1.15^3 = 1.52 x the volume
    assert rows["sample", "thalamus"]["difference"] > 0.3 * true_thalamus
    t = dm.load_volume_table(tmp_path / "flow")                   # label maps: used as they are
    assert t["subject"][0] == "p10_labels.nii.gz" and set(t) == {"subject", "volumes"} and len(t["subject"]) == 6
    with pytest.raises(ValueError, match="no .nii"):
        dm.load_volume_table(tmp_path / "out")


def test_cli_through_python_ddpm_mini_py(tmp_path):
    synthseg_csv(tmp_path / "real.csv", SYNTHSEG2, [f"r{i}" for i in range(8)], seed=1)
    synthseg_csv(tmp_path / "v.csv", SYNTHSEG2, [f"v{i}" for i in range(8)], seed=2)
    done = subprocess.run([sys.executable, dm.__file__, "evaluate", "--real", str(tmp_path / "real.csv"),
                           "--synthetic", f"velocity={tmp_path / 'v.csv'}", "--out", str(tmp_path / "out"),
                           "--structures", "left thalamus", "--permutations", "99"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "left thalamus" in done.stdout and (tmp_path / "out" / "volumes.csv").exists()
    # an error through the script: `error: ...` on stderr, exit status 1
    done = subprocess.run([sys.executable, dm.__file__, "evaluate", "--real", str(tmp_path / "nope.csv"),
                           "--synthetic", f"v={tmp_path / 'v.csv'}", "--out", str(tmp_path / "o2")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "nope.csv" in done.stderr


def test_cli_train_resume_keeps_the_run_schedule(tmp_path):
    """A run started through the API with another schedule continues with it under `train --resume`."""
    short = dm.Schedule(T=500)
    dm.train(dm.UNet(**dm.TEACHING_UNET), dm.PhantomDataset(shape=(16, 16, 16)), "flow", 2, out=tmp_path / "run",
             schedule=short, progress=False)
    assert dm.main(["train", "--phantoms", "--prediction", "flow", "--size", "16", "16", "16", "--batch-size", "1",
                    "--out", str(tmp_path / "run"), "--steps", "3", "--resume"]) == 0
    assert dm.latest_checkpoint(tmp_path / "run").name == "step_000003"
    assert dm.load_model(tmp_path / "run")[1]["schedule"] == short.config()


def test_cli_train_recipes(tmp_path, monkeypatch):
    """--recipe medforj: the authors' EMA (0.9998, no warm-up), no clipping, their augmentation (+-10 degrees,
    +-5 voxels, p 0.5) and a recursive search of --data, recorded in the checkpoint; the kit's by default."""
    for i in range(2):
        dm.save_nifti(dm.phantom(i, (16, 16, 16))[0], tmp_path / "data" / f"site{i}" / f"sub{i}.nii.gz")
    seen = {}
    real = dm.VolumeDataset
    monkeypatch.setattr(dm, "VolumeDataset", lambda *a, **k: seen.setdefault("data", real(*a, **k)))
    args = ["train", "--data", str(tmp_path / "data"), "--augment", "--prediction", "velocity", "--unet", "teaching",
            "--batch-size", "1", "--steps", "1"]
    assert dm.main(args + ["--recipe", "medforj", "--out", str(tmp_path / "m")]) == 0
    meta = dm.load_model(tmp_path / "m")[1]
    assert (meta["ema_decay"], meta["ema_warmup"], meta["max_grad_norm"]) == ("0.9998", "false", "null")
    assert len(seen["data"]) == 2 and seen["data"].augment == dm.RECIPES["medforj"]["data"]["augment"]
    assert seen["data"].augment == dict(degrees=10.0, shift=5.0, scale=0.0, p_affine=0.5)
    assert dm.main(args + ["--out", str(tmp_path / "k"), "--ema-decay", "0.99"]) == 1       # kit: no recursion
    seen.clear()
    dm.save_nifti(dm.phantom(5, (16, 16, 16))[0], tmp_path / "data" / "top.nii.gz")
    assert dm.main(args + ["--out", str(tmp_path / "k"), "--ema-decay", "0.99"]) == 0
    meta = dm.load_model(tmp_path / "k")[1]
    assert (meta["ema_decay"], meta["ema_warmup"], meta["max_grad_norm"]) == ("0.99", "true", "1.0")
    assert len(seen["data"]) == 1 and seen["data"].augment == dm.RECIPES["kit"]["data"]["augment"]


def test_cli_train_that_diverges_exits_with_an_error_and_keeps_the_good_checkpoint(tmp_path, capsys):
    """The issue's case: `train --lr 1e4 --checkpoint-every 1 --keep 2` used to exit 0 with NaN weights only."""
    out = tmp_path / "run"
    assert dm.main(["train", "--phantoms", "--prediction", "flow", "--size", "16", "16", "16", "--batch-size", "1",
                    "--lr", "1e4", "--steps", "20", "--checkpoint-every", "1", "--keep", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "\nerror: train: step " in err and "not finite" in err and "Traceback" not in err  # after the progress bar
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert 1 <= len(kept) <= 2 and all(torch.isfinite(v).all() for v in dm.load_model(out)[0].state_dict().values())


def test_cli_evaluate_refuses_a_set_name_given_twice(tmp_path, capsys):
    for name in ("real", "x", "y"):
        (tmp_path / f"{name}.csv").write_text("subject,cortex\na,1\nb,2\nc,3\n")
    args = ["evaluate", "--real", str(tmp_path / "real.csv"), "--out", str(tmp_path / "report"), "--synthetic"]
    assert dm.main(args + [f"a={tmp_path / 'x.csv'}", f"a={tmp_path / 'y.csv'}"]) == 1
    assert "the set name 'a' is given twice" in capsys.readouterr().err and not (tmp_path / "report").exists()


@pytest.mark.parametrize("argv,message", [
    (["sample", "--n", "0"], "argument --n: 0 is outside [1, inf)"),
    (["sample", "--n", "-3"], "argument --n: -3 is outside [1, inf)"),
    (["sample", "--steps", "two"], "argument --steps: 'two' is not an integer"),
    (["sample", "--eta", "inf"], "argument --eta: inf is outside [0, inf)"),
    (["sample", "--eta", "-0.5"], "argument --eta: -0.5 is outside [0, inf)"),
    (["sample", "--shape", "0", "0", "0"], "argument --shape: 0 is outside [2, inf)"),
    (["train", "--phantoms", "--prediction", "flow", "--ema-decay", "-1"], "argument --ema-decay: -1 is outside [0, 1)"),
    (["train", "--phantoms", "--prediction", "flow", "--ema-decay", "1"], "argument --ema-decay: 1 is outside [0, 1)"),
    (["train", "--phantoms", "--prediction", "flow", "--preview-every", "-1"], "argument --preview-every: -1 is outside [0, inf)"),
    (["train", "--phantoms", "--prediction", "flow", "--lr", "0"], "argument --lr: 0 is outside (0, inf)"),
    (["train", "--phantoms", "--prediction", "flow", "--lr", "nan"], "argument --lr: nan is outside (0, inf)"),
    (["demo", "--n", "0"], "argument --n: 0 is outside [1, inf)"),
    (["demo", "--minutes", "0"], "argument --minutes: 0 is outside (0, inf)"),
    (["evaluate", "--real", "r.csv", "--synthetic", "a=b.csv", "--out", "o", "--permutations", "0"],
     "argument --permutations: 0 is outside [1, inf)"),
])
def test_numeric_options_are_range_checked_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        dm.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_sample_refuses_out_for_several_samples_and_unusable_devices(tmp_path, tiny_weights, capsys, monkeypatch):
    """--out names one file: with --n 2 (or --out-dir) it is refused, not silently written elsewhere. A device
    torch does not know, or CUDA where there is none, is a one-line error."""
    monkeypatch.chdir(tmp_path)
    assert dm.main(["sample", "--weights", str(tiny_weights), "--n", "2", "--out", str(tmp_path / "d" / "x.nii.gz")]) == 1
    assert "--out names one file; for 2 sample(s) in a folder give --out-dir" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]
    assert dm.main(["sample", "--weights", str(tiny_weights), "--prediction", "v"]) == 1      # a flow file
    assert "--prediction velocity contradicts --weights" in capsys.readouterr().err
    assert dm.main(["sample", "--weights", str(tiny_weights), "--device", "banana"]) == 1
    assert "unknown device 'banana': use cpu, cuda, cuda:N or mps" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dm.main(["sample", "--weights", str(tiny_weights), "--device", "cuda"]) == 1
    assert "CUDA is not available here" in capsys.readouterr().err


def test_cli_train_resume_refuses_other_settings_and_keeps_the_runs(tmp_path, capsys):
    """train --resume: a setting given with another value than the run's is refused (naming both); left out, the
    run's own is used (here lr 2e-3, batch 1, seed 3 and its grid continue without being repeated). --lr is the
    exception: a new rate applies from the resumed step on, is said, recorded and kept by a later --resume."""
    out = tmp_path / "run"
    base = ["train", "--phantoms", "--prediction", "flow", "--out", str(out)]
    assert dm.main(base + ["--size", "16", "16", "16", "--batch-size", "1", "--lr", "2e-3", "--seed", "3", "--steps", "1"]) == 0
    for extra, message in ((["--batch-size", "2"], "--batch-size 2 differs from the run's 1"),
                           (["--seed", "0"], "--seed 0 differs from the run's 3"),
                           (["--size", "16", "16", "8"], "--size [16, 16, 8] differs from the run's [16, 16, 16]"),
                           (["--unet", "medforj"], "--unet medforj differs from the run's"),
                           (["--recipe", "medforj"], "ema_decay 0.9998 (--recipe medforj) differs from the run's 0.999")):
        capsys.readouterr()
        assert dm.main(base + ["--resume", "--steps", "2", *extra]) == 1, extra
        err = capsys.readouterr().err
        assert f"train --resume: {message}" in err and "step_000001" in err, err
    assert dm.latest_checkpoint(out).name == "step_000001"                # nothing was trained by the refusals
    assert dm.main(base + ["--resume", "--steps", "2", "--lr", "2e-3", "--unet", "teaching"]) == 0   # same values: fine
    meta = dm.load_model(out)[1]
    assert (meta["step"], meta["lr"], meta["batch_size"], meta["seed"], meta["shape"]) == ("2", "0.002", "1", "3", [16, 16, 16])
    capsys.readouterr()
    assert dm.main(base + ["--resume", "--steps", "3", "--lr", "5e-4", "--seed", "0"]) == 1   # refused: says no rate
    assert "learning rate" not in (said := capsys.readouterr()).out and "--seed 0 differs" in said.err
    assert dm.main(base + ["--resume", "--steps", "3", "--lr", "5e-4"]) == 0
    assert "train --resume: learning rate 0.002 until step 2, 0.0005 from there on" in capsys.readouterr().out
    assert dm.main(base + ["--resume", "--steps", "4"]) == 0                  # left out: the run's newest rate
    meta = dm.load_model(out)[1]
    assert (meta["step"], meta["lr"], json.loads(meta["lr_steps"])) == ("4", "0.0005", [[0, 0.002], [2, 0.0005]])


def test_cli_outputs_are_checked_before_any_work(tmp_path, tiny_weights, capsys):
    """A file where an output folder should be, or a folder that cannot be written, fails at once."""
    (tmp_path / "file").write_text("x")
    cases = [(["train", "--phantoms", "--prediction", "flow", "--out", str(tmp_path / "file")], "train --out"),
             (["sample", "--weights", str(tiny_weights), "--out", str(tmp_path / "file" / "s.nii.gz")],
              "sample: the output folder"),
             (["demo", "--out", str(tmp_path / "file")], "demo --out")]
    for argv, what in cases:
        assert dm.main(argv) == 1
        assert f"error: {what} {tmp_path / 'file'}" in (err := capsys.readouterr().err) and "is a file, not a folder" in err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    real_access = os.access                                               # root may write anyway: ask as a user would
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dm.os, "access", lambda p, mode: real_access(p, mode) and pathlib.Path(p) != locked)
        assert dm.main(["train", "--phantoms", "--prediction", "flow", "--out", str(locked / "run")]) == 1
    assert f"cannot write there ({locked} is not writable)" in capsys.readouterr().err and not (locked / "run").exists()


def test_cli_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    """The disk fills while step 2's checkpoint is written: `error: ...`, exit 1, no traceback; step 1's
    checkpoint is whole and loadable and nothing half-written is left."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert dm.main(["train", "--phantoms", "--prediction", "flow", "--size", "16", "16", "16", "--batch-size", "1",
                    "--steps", "3", "--checkpoint-every", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: [Errno 28] No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]
    assert dm.latest_checkpoint(out).name == "step_000001" and dm.load_model(out)[1]["step"] == "1"


def test_cli_trains_and_samples_an_rflow_model(tmp_path, capsys):
    """`train --prediction rflow` records the straight-line schedule; `sample --weights RUN` then samples with it
    (the same volume as the API's on the run's EMA weights)."""
    out = tmp_path / "run"
    assert dm.main(["train", "--phantoms", "--prediction", "rflow", "--size", "16", "16", "16", "--batch-size", "1",
                    "--steps", "2", "--out", str(out)]) == 0
    model, meta = dm.load_model(out)
    assert meta["prediction"] == "rflow" and meta["schedule"] == {"T": 1000, "kind": "rflow"}
    assert dm.main(["sample", "--weights", str(out), "--steps", "3", "--out", str(tmp_path / "r.nii.gz")]) == 0
    x = dm.sample(model, "rflow", shape=(1, 1, 16, 16, 16), steps=3, generator=torch.Generator().manual_seed(0),
                  progress=False)
    assert np.array_equal(np.asarray(nib.load(tmp_path / "r.nii.gz").dataobj), dm.to_uint16(dm.normalize_intensity(x[0, 0])))


def test_cli_train_workers_draw_the_same_phantoms(tmp_path, capsys):
    """--workers N: phantoms drawn by N processes, in the same order, so the weights after 3 steps are
    bit-identical to a run without workers; with --data it is refused, saying why."""
    base = ["train", "--phantoms", "--prediction", "flow", "--size", "16", "16", "16", "--batch-size", "2",
            "--lr", "1e-3", "--steps", "3"]
    for workers in ("0", "2"):
        assert dm.main(base + ["--workers", workers, "--out", str(tmp_path / workers)]) == 0
    a, b = (dm.load_model(tmp_path / w, "cpu")[0].state_dict() for w in ("0", "2"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)
    assert not torch.equal(a["out.2.conv.weight"], dm.UNet(**dm.TEACHING_UNET).state_dict()["out.2.conv.weight"])  # it trained
    dm.save_nifti(dm.phantom(0, (16, 16, 16))[0], tmp_path / "data" / "a.nii.gz")
    capsys.readouterr()
    args = ["train", "--data", str(tmp_path / "data"), "--prediction", "flow", "--steps", "1", "--workers", "2",
            "--out", str(tmp_path / "d")]
    assert dm.main(args) == 1
    assert "--workers works with --phantoms only" in capsys.readouterr().err
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_cli_sample_with_the_dpm_solver(tmp_path, capsys):
    """sample --weights teaching_flow --method dpm++2m: the shipped file by its manifest name, the solver named in
    the header, the same volume as the API's; --eta or --paper-era with it are refused before any work."""
    out = tmp_path / "s.nii.gz"
    assert dm.main(["sample", "--weights", "teaching_flow", "--method", "dpm++2m", "--steps", "3", "--shape", "16", "16",
                    "16", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "dpm++2m, 3 linspace steps" in printed and "16, 16, 16) (4.67 mm voxels)" in printed
    # a larger or smaller --shape is a larger or smaller view at the trained grid's voxel, 224 / 48 mm
    np.testing.assert_allclose(nib.load(out).header.get_zooms(), [224 / 48] * 3, rtol=1e-6)
    model, _ = dm.load_model(dm.fetch("teaching_flow"), "cpu")
    x = dm.sample(model, "flow", shape=(1, 1, 16, 16, 16), steps=3, method="dpm++2m",
                  generator=torch.Generator().manual_seed(0), progress=False)
    assert np.array_equal(np.asarray(nib.load(out).dataobj), dm.to_uint16(dm.normalize_intensity(x[0, 0])))
    for extra in (["--eta", "0.5"], ["--paper-era"]):
        assert dm.main(["sample", "--weights", "teaching_flow", "--method", "dpm++2m", "--out",
                        str(tmp_path / "bad.nii.gz")] + extra) == 1
        assert "is deterministic and uses the clipped x0" in capsys.readouterr().err
        assert not (tmp_path / "bad.nii.gz").exists()


def test_cli_solve(tmp_path, capsys):
    """solve --task inpainting --weights teaching_flow: reads a volume on the model's grid, simulates the
    measurement, solves it (DPS), writes the result with the input's affine and header as uint16, and with
    --save-measurement the baseline and the measured image; a volume on another grid is refused, saying
    what is needed, and nothing is written."""
    affine = np.diag([-3.0, -3.0, 3.0, 1.0])
    source = dm.save_nifti(dm.phantom(3, dm.TEACHING_SHAPE)[0], tmp_path / "p.nii.gz", affine=affine)
    out = tmp_path / "r.nii.gz"
    assert dm.main(["solve", "--task", "inpainting", "--weights", "teaching_flow", "--steps", "2", "--in", str(source),
                    "--out", str(out), "--save-measurement", "--device", "cpu"]) == 0
    assert "inpainting on" in capsys.readouterr().out
    restored = nib.load(out)
    assert restored.shape == dm.TEACHING_SHAPE and np.array_equal(restored.affine, affine)
    assert restored.get_data_dtype() == np.uint16 and restored.header.get_zooms() == (3.0, 3.0, 3.0)
    assert (tmp_path / "r_baseline.nii.gz").exists() and (tmp_path / "r_measured.nii.gz").exists()
    model, _ = dm.load_model(dm.fetch("teaching_flow"), "cpu")      # the same solve through the API
    x = dm.normalize_intensity(dm.load_nifti(source)[0])[None, None]  # the input min-maxed to [-1, 1]
    assert float(x.min()) == -1 and float(x.max()) == 1
    task = dm.inverse_task("inpainting", dm.TEACHING_SHAPE, seed=0)
    y = task.measure(x, torch.Generator().manual_seed(0))
    api = dm.solve_inverse(model, "flow", y, task, steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    assert np.array_equal(np.asarray(restored.dataobj), dm.to_uint16(dm.normalize_intensity(api[0, 0])))
    small = dm.save_nifti(dm.phantom(3, (16, 16, 16))[0], tmp_path / "small.nii.gz")
    assert dm.main(["solve", "--task", "motion", "--weights", "teaching_flow", "--steps", "2", "--in", str(small),
                    "--out", str(tmp_path / "no.nii.gz")]) == 1
    assert "the model works on (40, 48, 40): give a volume on the grid" in capsys.readouterr().err
    assert not (tmp_path / "no.nii.gz").exists()


def test_threads_option_sets_torchs_thread_count(tmp_path, capsys):
    """--threads N: torch.set_num_threads(N) before the command runs (0 or text is refused by argparse)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert dm.main(["evaluate", "--real", str(tmp_path / "none"), "--synthetic", f"a={tmp_path / 'none'}",
                        "--out", str(tmp_path / "o"), "--threads", "1"]) == 1     # the command fails, the option held
        assert torch.get_num_threads() == 1
        for bad in ("0", "two"):
            with pytest.raises(SystemExit):
                dm.main(["sample", "--threads", bad])
        err = capsys.readouterr().err
        assert "argument --threads: 0 is outside [1, inf)" in err and "argument --threads: 'two' is not an integer" in err
    finally:
        torch.set_num_threads(before)
