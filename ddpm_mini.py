"""ddpm-mini: placeholder docstring (written with the core)."""
from __future__ import annotations

# =============================================================================
# 2. Constants
# =============================================================================

import csv
import json
import math
import os
import pathlib
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__version__ = "0.1.0"

#: The four things the U-Net can be trained to predict (see section 4).
PREDICTIONS = ("noise", "sample", "velocity", "flow")

_PREDICTION_ALIASES = {
    "noise": "noise", "epsilon": "noise", "eps": "noise",
    "sample": "sample", "x0": "sample", "clean": "sample",
    "velocity": "velocity", "v": "velocity", "v_prediction": "velocity",
    "flow": "flow",
}


def canonical_prediction(name: str) -> str:
    """Map a prediction name or alias to one of PREDICTIONS.

    Aliases: epsilon/eps -> noise, x0/clean -> sample, v/v_prediction -> velocity.
    Case-insensitive; a ValueError lists the valid names otherwise.
    """
    key = str(name).strip().lower()
    if key not in _PREDICTION_ALIASES:
        raise ValueError(
            f"unknown prediction {name!r}: use one of {', '.join(PREDICTIONS)} "
            f"(aliases: {', '.join(k for k in _PREDICTION_ALIASES if k not in PREDICTIONS)})")
    return _PREDICTION_ALIASES[key]


#: U-Net arguments of the published MedForj models (41,245,217 parameters).
MEDFORJ_UNET = dict(
    spatial_dims=3, in_channels=1, out_channels=1,
    channels=(16, 32, 64, 128, 256),
    attention_levels=(False, False, False, False, True),
    num_res_blocks=2, num_head_channels=8, norm_num_groups=8,
)

#: The published models' image grid: 1 mm voxels, LPS, (D, H, W) = (L-R, P-A, I-S).
IMAGE_SHAPE = (192, 224, 192)

#: The reference generator's output affine: 1 mm, LPS (nibabel axis codes L, P, S).
LPS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])

# =============================================================================
# 3. Noise schedule
# =============================================================================

# =============================================================================
# 4. Parameterizations: targets, conversions, loss, implied weights
# =============================================================================

# =============================================================================
# 5. The 3D U-Net
# =============================================================================

# =============================================================================
# 6. Sampler
# =============================================================================

# =============================================================================
# 7. Weights: load/save, fetch (Pooch + data_manifest.csv)
# =============================================================================


def _atomic_write(path: pathlib.Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside path, then rename it over path.

    A crash or an exception leaves the previous file (or none) in place, never a
    partial one.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)  # keep .nii.gz etc. so writers pick the right format
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


MANIFEST_COLUMNS = ("name", "kind", "group", "url", "hash", "verified", "size", "license", "citation", "description")


def manifest_path() -> pathlib.Path:
    """The manifest in use: $DDPM_MINI_MANIFEST, else data_manifest.csv beside this module,
    else the copy a non-editable install puts in <sys.prefix>/share/ddpm-mini/."""
    env = os.environ.get("DDPM_MINI_MANIFEST")
    if env:
        return pathlib.Path(env)
    here = pathlib.Path(__file__).resolve().with_name("data_manifest.csv")
    if here.exists():
        return here
    return pathlib.Path(sys.prefix) / "share" / "ddpm-mini" / "data_manifest.csv"


def read_manifest(path=None) -> dict:
    """Read the asset manifest: {name: row}, each row a dict of MANIFEST_COLUMNS (strings)."""
    path = pathlib.Path(path) if path is not None else manifest_path()
    if not path.exists():
        raise FileNotFoundError(f"asset manifest not found at {path} (set DDPM_MINI_MANIFEST to a data_manifest.csv)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("name", "url", "hash") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"manifest {path} lacks the column(s) {missing}; it needs {MANIFEST_COLUMNS}")
        rows = {}
        for row in reader:
            row = {k: (v or "").strip() for k, v in row.items() if k is not None}
            if row["name"] in rows:
                raise ValueError(f"manifest {path}: the name {row['name']!r} appears twice")
            rows[row["name"]] = row
    return rows

# =============================================================================
# 8. Data: NIfTI I/O, minimal preprocessing, phantoms, datasets
# =============================================================================


def load_nifti(path) -> tuple:
    """Read a NIfTI file: returns (array float32 (X, Y, Z), affine (4, 4) float64)."""
    import nibabel as nib
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def save_nifti(volume, path, affine=None):
    """Write a 3-D volume as uint16 NIfTI and return the path.

    volume: array or tensor (X, Y, Z), or (1, X, Y, Z) / (1, 1, X, Y, Z).
    Intensities are min-max scaled over this volume to the full uint16 range
    0..65535 (the reference generator's convention), so absolute values are not
    kept: a constant volume is written as zeros. affine defaults to LPS_AFFINE
    (1 mm, LPS). Written to a temporary name, then renamed: never half-written.
    """
    import nibabel as nib
    arr = volume.detach().float().cpu().numpy() if torch.is_tensor(volume) else np.asarray(volume, np.float32)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"save_nifti needs a 3-D volume (X, Y, Z), got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError("save_nifti: the volume has NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) * 65535.0 if hi > lo else np.zeros_like(arr)
    img = nib.Nifti1Image(np.round(scaled).astype(np.uint16), LPS_AFFINE if affine is None else np.asarray(affine))
    img.header.set_xyzt_units("mm")
    path = pathlib.Path(path)
    _atomic_write(path, lambda tmp: nib.save(img, str(tmp)))
    return path


def to_model(array) -> torch.Tensor:
    """Scale an intensity volume (any range) to the network's [-1, 1]: min-max over the volume.

    array (X, Y, Z) -> float32 tensor (X, Y, Z); x -> 2 (x - min) / (max - min) - 1.
    """
    x = torch.as_tensor(np.asarray(array, dtype=np.float32) if not torch.is_tensor(array) else array).float()
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(1e-12) * 2 - 1


def from_model(x, dtype=np.uint16) -> np.ndarray:
    """Map network values in [-1, 1] back to 0..65535 (uint16): u = round((x + 1) / 2 * 65535).

    Values outside [-1, 1] are clipped first. Returns a numpy array of the same shape.
    """
    x = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, np.float32)
    return np.round((np.clip(x, -1, 1) + 1) / 2 * 65535).astype(dtype)

# =============================================================================
# 9. Training
# =============================================================================

# =============================================================================
# 10. Evaluation
# =============================================================================

# =============================================================================
# 11. Viewing (matplotlib, widgets)
# =============================================================================

# =============================================================================
# 12. Command line
# =============================================================================
