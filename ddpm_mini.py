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

# --- Phantoms: synthetic T1-like heads with known labels -------------------------------------

#: Label map of phantom(): number -> name. 0 is background and never counted as a structure.
PHANTOM_LABELS = {0: "background", 1: "scalp", 2: "skull", 3: "csf", 4: "cortex", 5: "white_matter",
                  6: "lateral_ventricles", 7: "left_thalamus", 8: "right_thalamus",
                  9: "left_putamen", 10: "right_putamen"}

#: Mean intensity of each label in the network's range [-1, 1], before bias field and noise.
#: T1 contrast: fat-rich scalp bright; white matter > thalamus > putamen > cortex; CSF dark;
#: skull (cortical bone, almost no signal) darkest tissue; background -1.
PHANTOM_INTENSITIES = {0: -1.0, 1: 0.7, 2: -0.85, 3: -0.6, 4: 0.0, 5: 0.55,
                       6: -0.6, 7: 0.3, 8: 0.3, 9: 0.2, 10: 0.2}

#: phantom()'s random draws: name -> (numpy Generator method, a, b), i.e. normal(mean, sd),
#: uniform(low, high), beta(a, b), lognormal(mean, sd of the log). rotation_deg and shift_mm
#: are drawn once per axis. Lengths are those of a reference head, then x head_scale.
PHANTOM_DISTRIBUTIONS = {
    "head_scale": ("normal", 1.0, 0.05),        # multiplies every length
    "atrophy": ("beta", 2.0, 5.0),              # 0..1: brain lengths x (1 - 0.12 a), ventricles x (1 + 0.6 a)
    "ventricle_scale": ("lognormal", 0.0, 0.15),  # multiplies the ventricles' lengths
    "cortex_mm": ("uniform", 9.0, 12.0),        # effective cortex thickness (an unfolded shell)
    "fold_amplitude": ("uniform", 0.06, 0.12),  # gyral depth relative to the brain radius
    "rotation_deg": ("uniform", -5.0, 5.0),     # pose: rotation about each axis
    "shift_mm": ("uniform", -6.0, 6.0),         # pose: translation along each axis
    "bias_amplitude": ("uniform", 0.0, 0.2),    # multiplicative field 1 + b g(x), |g| <= 1
    "noise_sd": ("uniform", 0.01, 0.04),        # Gaussian noise sd, in [-1, 1] units
}

# Reference anatomy (mm, head frame: +x left, +y posterior, +z superior, origin at the head centre).
_HEAD_SEMI = np.array([74.0, 90.0, 78.0])            # outer scalp ellipsoid
_SCALP_MM, _SKULL_MM, _CSF_MM = 5.0, 6.0, 1.5        # layers inside it
_VENTRICLE = ((7.0, 0.0, 14.0), (5.0, 24.0, 7.0))    # (centre of the left one, semi-axes)
_THALAMUS = ((11.0, 8.0, 0.0), (8.0, 14.0, 9.0))
_PUTAMEN = ((25.0, -4.0, 2.0), (5.0, 14.0, 10.0))


def _rotation_matrix(degrees) -> np.ndarray:
    """(3, 3) rotation R = Rz Ry Rx for angles (about axes 0, 1, 2) in degrees."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _phantom_voxel_mm(shape, voxel_mm=None) -> np.ndarray:
    """Per-axis voxel size: voxel_mm (scalar or 3) or, by default, 224 / max(shape) mm."""
    return np.broadcast_to(np.asarray(224.0 / max(shape) if voxel_mm is None else voxel_mm, float), (3,))


def phantom(seed, shape=(64, 64, 64), voxel_mm=None, **params) -> tuple:
    """A synthetic T1-weighted head with its label map: returns (image, labels).

    image: float32 numpy (D, H, W) in [-1, 1]; labels: uint8 (D, H, W), PHANTOM_LABELS numbers.
    Axes as the model's: (D, H, W) = (L-R, P-A, I-S) in LPS orientation (index grows to the
    left, posterior, superior). voxel_mm (scalar or per axis) defaults to 224 / max(shape),
    so the grid's longest side spans 224 mm like IMAGE_SHAPE's: 3.5 mm at 64^3, 4 mm at
    48x56x48 (exactly IMAGE_SHAPE's 192x224x192 mm field of view).

    Anatomy (nested ellipsoids in a head frame, all lengths x head_scale): scalp 5 mm, skull
    6 mm, CSF; a brain envelope folded by r <= 1 + a f(u), where u is the direction from the
    centre and f = sum_k w_k sin(omega_k . u + phi_k) (8 terms, w_k ~ N(0, 1), |omega_k| ~
    U(10, 20) rad, f divided by 1.5 std and clipped to [-1, 1]) makes gyri and sulci; white matter is the same folded surface
    cortex_mm further in (a thick, unfolded-scale shell, so cortex and WM volumes come out
    comparable as in real brains); lateral ventricles, thalami and putamina are ellipsoids
    on each side inside the WM. Atrophy shrinks the brain (CSF fills the gap) and grows the
    ventricles. Pose: x_head = R^T (x - t), R from rotation_deg, t = shift_mm, like an
    unregistered scan. Intensity: PHANTOM_INTENSITIES per label, times a smooth bias field
    1 + b g(x) on the signal (image + 1) / 2, with g a random quadratic polynomial of the
    position scaled to max |g| = 1, plus Gaussian noise N(0, noise_sd^2), clipped to [-1, 1].

    Every random draw comes from numpy's Generator seeded with seed, distributions in
    PHANTOM_DISTRIBUTIONS. Keyword params fix any of those draws (e.g. atrophy=0.9,
    rotation_deg=0), leaving all other draws unchanged: phantom(3, atrophy=0) and
    phantom(3, atrophy=1) differ only by atrophy.
    """
    unknown = sorted(set(params) - set(PHANTOM_DISTRIBUTIONS))
    if unknown:
        raise ValueError(f"phantom: unknown parameter(s) {unknown}; allowed: {', '.join(PHANTOM_DISTRIBUTIONS)}")
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"phantom: shape must be 3 sizes >= 2, got {shape}")
    rng = np.random.default_rng(seed)
    p = {k: getattr(rng, fn)(a, b, 3 if k in ("rotation_deg", "shift_mm") else None)
         for k, (fn, a, b) in PHANTOM_DISTRIBUTIONS.items()}
    omega = rng.normal(size=(8, 3))
    omega *= rng.uniform(10.0, 20.0, (8, 1)) / np.linalg.norm(omega, axis=1, keepdims=True)
    fold_phase, fold_w, bias_c = rng.uniform(0, 2 * np.pi, 8), rng.normal(size=8), rng.normal(size=9)
    noise = rng.standard_normal(shape, dtype=np.float32)
    p.update({k: np.broadcast_to(np.asarray(v, float), np.shape(p[k])) for k, v in params.items()})

    # world position of each voxel (mm, grid centre = 0), then the head frame
    f32 = lambda v: np.asarray(v, np.float32).reshape(-1, 1, 1, 1)            # noqa: E731 (3,) -> (3, 1, 1, 1)
    vox = _phantom_voxel_mm(shape, voxel_mm)
    x = np.stack(np.meshgrid(*[((np.arange(n) - (n - 1) / 2) * v).astype(np.float32)
                               for n, v in zip(shape, vox)], indexing="ij"))  # (3, D, H, W) mm
    rot = _rotation_matrix(p["rotation_deg"]) / p["head_scale"]
    h = np.einsum("ji,j...->i...", rot.astype(np.float32), x - f32(p["shift_mm"]))  # R^T (x - t) / scale

    def rho2(centre, semi):  # squared ellipsoidal radius: <= 1 inside
        return (((h - f32(centre)) / f32(semi)) ** 2).sum(0)

    a = p["atrophy"]
    brain = (_HEAD_SEMI - _SCALP_MM - _SKULL_MM - _CSF_MM) / (1 + p["fold_amplitude"]) * (1 - 0.12 * a)
    u = h / np.sqrt((h ** 2).sum(0)).clip(1e-6)                              # direction from centre
    f = sum(w * np.sin(np.einsum("i,i...->...", om.astype(np.float32), u) + ph)
            for w, om, ph in zip(fold_w.astype(np.float32), omega, fold_phase.astype(np.float32)))
    fold = (1 + np.float32(p["fold_amplitude"]) * np.clip(f / (1.5 * f.std()), -1, 1)) ** 2
    labels = np.zeros(shape, np.uint8)
    for k, inside in ((1, rho2(0, _HEAD_SEMI) <= 1),
                      (2, rho2(0, _HEAD_SEMI - _SCALP_MM) <= 1),
                      (3, rho2(0, _HEAD_SEMI - _SCALP_MM - _SKULL_MM) <= 1),
                      (4, rho2(0, brain) <= fold),
                      (5, rho2(0, brain - p["cortex_mm"]) <= fold)):
        labels[inside] = k
    vent_semi = np.array(_VENTRICLE[1]) * p["ventricle_scale"] * (1 + 0.6 * a)
    mirror = np.array([-1.0, 1.0, 1.0])                                      # left (+x) -> right
    for k, (centre, semi) in ((6, (_VENTRICLE[0], vent_semi)), (7, _THALAMUS), (9, _PUTAMEN)):
        labels[rho2(centre, semi) <= 1] = k
        labels[rho2(np.multiply(centre, mirror), semi) <= 1] = k if k == 6 else k + 1

    # intensities, bias field on the signal (image + 1) / 2, noise
    means = np.array([PHANTOM_INTENSITIES[k] for k in range(len(PHANTOM_LABELS))], np.float32)
    g = x / (np.abs(x).reshape(3, -1).max(1).reshape(3, 1, 1, 1) + 1e-6)   # (3, D, H, W) in [-1, 1]
    terms = np.concatenate([g, g ** 2, g[[0, 0, 1]] * g[[1, 2, 2]]])         # (9, D, H, W)
    g = np.einsum("k,k...->...", (bias_c / np.abs(bias_c).sum()).astype(np.float32), terms)  # |g| <= 1
    signal = (means[labels] + 1) / 2 * (1 + np.float32(p["bias_amplitude"]) * g)
    image = np.clip(2 * signal - 1 + np.float32(p["noise_sd"]) * noise, -1, 1).astype(np.float32)
    return image, labels


def phantom_volumes(labels, voxel_mm=None) -> dict:
    """Volume of each phantom structure in mm^3: {name: count x voxel volume}, background excluded.

    labels: integer array (D, H, W) with PHANTOM_LABELS numbers; voxel_mm as in phantom()
    (None: the phantom default for this shape, 224 / max(shape)).
    """
    labels = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    counts = np.bincount(labels.astype(np.int64).ravel(), minlength=len(PHANTOM_LABELS))
    voxel = float(np.prod(_phantom_voxel_mm(labels.shape, voxel_mm)))
    return {name: float(counts[k]) * voxel for k, name in PHANTOM_LABELS.items() if k}

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
