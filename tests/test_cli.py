"""The command line, end to end on tiny settings."""
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import ddpm_mini as dm
from conftest import TINY_UNET, randomize


@pytest.fixture
def tiny_weights(tmp_path):
    return dm.save_weights(randomize(dm.UNet(**TINY_UNET), seed=2), tmp_path / "tiny.safetensors", prediction="flow")


def test_sample_command_writes_nifti_and_png(tmp_path, tiny_weights, capsys):
    out = tmp_path / "s.nii.gz"
    assert dm.main(["sample", "--weights", str(tiny_weights), "--steps", "3", "--seed", "0",
                    "--shape", "16", "16", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "first step:" in printed and "min per sample" in printed
    img = nib.load(out)
    assert img.shape == (16, 16, 8) and img.get_data_dtype() == np.uint16
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S") and np.allclose(img.header.get_zooms(), 1)
    data = np.asarray(img.dataobj)
    assert data.min() == 0 and data.max() == 65535  # min-max over the full uint16 range
    assert (tmp_path / "s.png").stat().st_size > 1000
    # same seed, same volume
    dm.main(["sample", "--weights", str(tiny_weights), "--steps", "3", "--shape", "16", "16", "8", "--out", str(tmp_path / "t.nii.gz")])
    assert np.array_equal(np.asarray(nib.load(tmp_path / "t.nii.gz").dataobj), data)


def test_sample_several_into_a_folder(tmp_path, tiny_weights):
    assert dm.main(["sample", "--weights", str(tiny_weights), "--steps", "2", "--n", "2", "--seed", "5",
                    "--shape", "8", "8", "8", "--out-dir", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "sample_flow_0005.nii.gz", "sample_flow_0005.png", "sample_flow_0006.nii.gz", "sample_flow_0006.png"]


def test_sample_command_errors(tmp_path, tiny_weights, capsys):
    assert dm.main(["sample", "--weights", str(tmp_path / "none.safetensors")]) == 1
    assert "not found" in capsys.readouterr().err
    assert dm.main(["sample", "--weights", str(tiny_weights), "--steps", "1", "--shape", "8", "8", "8"]) == 1
    assert "steps must be an integer in 2..1000" in capsys.readouterr().err
    assert dm.main(["sample", "--weights", str(tiny_weights), "--steps", "2", "--shape", "8", "8", "8",
                    "--out", str(tmp_path / "x.npy")]) != 0
    assert not (tmp_path / "x.npy").exists()


def test_script_help_lists_commands():
    out = subprocess.run([sys.executable, dm.__file__, "--help"], capture_output=True, text=True, check=True).stdout
    assert "sample" in out
    out = subprocess.run([sys.executable, dm.__file__, "sample", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--prediction" in out and "--spacing" in out


def test_readme_sample_command_fetches_the_pretrained_model(tmp_path, http_server, standin_weights, monkeypatch, capsys):
    """README command (a), `sample --prediction flow --steps 64 --seed 0 --out sample_flow.nii.gz`, on a
    small grid and 2 steps: the real manifest row, fetched from a loopback mirror holding a stand-in file."""
    import shutil
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
