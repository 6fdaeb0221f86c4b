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

#: Allowed values of data_manifest.csv's kind column: weights (safetensors of a published
#: model), volume (one NIfTI/NRRD image), template (an atlas image, e.g. MNI152), source (a
#: dataset named for provenance, e.g. the paper's training sets: no url, not fetchable).
MANIFEST_KINDS = ("weights", "volume", "template", "source")


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

# --- Minimal preprocessing: the paper's four steps, nothing more -----------------------------


def _as_volume(x, what: str) -> tuple:
    """(array float32 (X, Y, Z), affine (4, 4) or None) from a path, nibabel image, array or tensor.

    A trailing 4th axis of size 1 is squeezed; other 4-D input and NaN/inf raise a ValueError.
    """
    import nibabel as nib
    if isinstance(x, (str, os.PathLike)):
        x = nib.load(str(x))
    if hasattr(x, "dataobj") and hasattr(x, "affine"):
        arr, affine = np.asarray(x.dataobj, dtype=np.float32), np.asarray(x.affine, dtype=np.float64)
    else:
        arr = (x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)).astype(np.float32)
        affine = None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{what} must be 3-D (X, Y, Z), or 4-D with a last axis of size 1; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} has NaN or infinite values; only finite intensities are allowed")
    return arr, affine


def _warp(volume, matrix, shape, mode="bilinear") -> torch.Tensor:
    """Resample volume (..., X, Y, Z) onto a grid of `shape` (3 sizes): output voxel i takes the
    input's value at voxel index p = M i + m, (M | m) = matrix[:3] ((4, 4) or (3, 4), indices).

    mode "bilinear" (= trilinear in 3-D) or "nearest"; 0 outside the input. Leading axes share
    the transform. Implemented with affine_grid/grid_sample (align_corners=True, where the
    normalised coordinate is u = 2 p / (n - 1) - 1 and grid axes run (Z, Y, X)).
    """
    x = torch.as_tensor(volume, dtype=torch.float32)
    lead = x.shape[:-3]
    x = x.reshape(1, -1, *x.shape[-3:])                                       # (1, C, X, Y, Z)
    m = torch.as_tensor(np.asarray(matrix, np.float64)[:3])
    n_in = torch.tensor(x.shape[-3:], dtype=torch.float64)
    half_out = (torch.tensor(shape, dtype=torch.float64) - 1).clamp_min(1) / 2
    s_in = 2 / (n_in - 1).clamp_min(1)
    a = s_in[:, None] * m[:, :3] * half_out                                   # u_in = a u_out + b
    b = s_in * (m[:, :3] @ half_out + m[:, 3]) - 1
    theta = torch.cat([a.flip(0, 1), b.flip(0)[:, None]], 1)[None].float()   # (1, 3, 4), (Z, Y, X) order
    grid = F.affine_grid(theta, [1, x.shape[1], *shape], align_corners=True)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out.reshape(*lead, *shape)


def _otsu(values, bins=256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance w0 w1 (mu0 - mu1)^2."""
    hist, edges = np.histogram(values, bins)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * mids)
    between = w0 * w1 * (s0 / np.maximum(w0, 1) - (s0[-1] - s0) / np.maximum(w1, 1)) ** 2
    return float(edges[np.argmax(between[:-1]) + 1])


def _centroid(mask) -> np.ndarray:
    """Centre of mass (3,) in voxel indices of a boolean (X, Y, Z) mask."""
    total = mask.sum()
    return np.array([(np.arange(n) * mask.sum(tuple(a for a in range(3) if a != axis))).sum() / total
                     for axis, n in enumerate(mask.shape)])


def _head_mask(arr) -> np.ndarray:
    """Foreground (head) of an image (X, Y, Z): smooth by two 3^3 box means, Otsu threshold."""
    x = torch.as_tensor(arr, dtype=torch.float32)[None, None]
    for _ in range(2):
        x = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x[0, 0].numpy()
    return x > _otsu(x)


def preprocess(image_or_path, mask=None):
    """The paper's minimal preprocessing of a T1w head: returns a nibabel Nifti1Image, uint16
    (192, 224, 192), 1 mm, LPS. It never skull-strips, bias-corrects or registers.

    image_or_path: NIfTI path or nibabel image (3-D, or 4-D with a last axis of size 1).
    mask: optional brain mask on the image's voxel grid (path, image or array, nonzero =
    brain): the crop is centred on its centre of mass.

    Steps, and why:
    1. Clip to the 0.1 and 99.9 percentiles of the input's voxels and map to [0, 1]: a few
       extreme voxels (vessels, fat, artefacts) must not squeeze the tissue range.
    2. Find the centre: the mask's centre of mass, else that of a head mask found from the
       image (two 3^3 box smoothings, Otsu threshold: foreground = head; a long neck pulls
       this a little inferior, a brain mask avoids that). The models expect the brain near
       the grid centre.
    3. Reorient to LPS, resample to 1 mm, crop/pad to IMAGE_SHAPE, in one trilinear
       resampling done in world space: the output affine is A = [diag(-1, -1, 1) | t], with t
       putting the centre at voxel (IMAGE_SHAPE - 1) / 2, then snapped to the input's voxel
       lattice (within half an input voxel), so a 1 mm input that differs from LPS only by
       axis flips/permutations is copied exactly, not blurred. Output voxel i samples the input
       at voxel inv(A_in) A (i, 1); outside the input = 0. Axes permutations, flips and
       oblique affines are all handled, and the output lines up with the input in a viewer.
       A warning is given for voxels coarser than 1.2 mm (the paper's data were curated to
       <= 1.2 mm; upsampling cannot restore the detail).
    4. Scale to uint16: u = round(65535 x clipped), 0..65535.

    Raises ValueError for 4-D data, NaN/inf, a constant image, a mask of another shape or an
    empty mask.
    """
    return _preprocess(image_or_path, mask)[0]


def _preprocess(image_or_path, mask=None) -> tuple:
    """preprocess(), also returning where the centre landed (3,) in output voxel indices."""
    import nibabel as nib
    arr, affine = _as_volume(image_or_path, "image")
    if affine is None:
        raise ValueError("preprocess needs the image's affine: pass a NIfTI path or a nibabel image, not an array")
    lo, hi = (float(v) for v in np.percentile(arr, [0.1, 99.9]))
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise ValueError(f"image is constant (every voxel is {lo}): nothing to preprocess")
    arr = np.clip((arr - lo) / (hi - lo), 0, 1)                                # step 1
    if mask is not None:                                                       # step 2
        m, _ = _as_volume(mask, "mask")
        if m.shape != arr.shape:
            raise ValueError(f"mask shape {m.shape} differs from the image's {arr.shape}; "
                             f"the mask must be on the image's voxel grid")
        if not (m != 0).any():
            raise ValueError("mask is empty (no nonzero voxel)")
        centre = _centroid(m != 0)
    else:
        centre = _centroid(_head_mask(arr))
    zooms = nib.affines.voxel_sizes(affine)
    if zooms.max() > 1.2:
        warnings.warn(f"voxel size {np.round(zooms, 3).tolist()} mm is coarser than 1.2 mm, the limit "
                      f"the paper's data were curated to; resampling to 1 mm cannot restore detail", stacklevel=3)
    centre_world = affine[:3, :3] @ centre + affine[:3, 3]
    out = LPS_AFFINE.copy()                                                    # step 3
    out[:3, 3] = centre_world - out[:3, :3] @ ((np.array(IMAGE_SHAPE) - 1) / 2)
    inv = np.linalg.inv(affine)
    out[:3, 3] = affine[:3, :3] @ np.round(inv[:3, :3] @ out[:3, 3] + inv[:3, 3]) + affine[:3, 3]
    data = _warp(arr, inv @ out, IMAGE_SHAPE).numpy()
    img = nib.Nifti1Image(np.round(data * 65535).astype(np.uint16), out)        # step 4
    img.header.set_xyzt_units("mm")
    landed = np.linalg.solve(out[:3, :3], centre_world - out[:3, 3])
    return img, landed

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
    6 mm, CSF; a brain envelope folded by r <= 1 + a f(u), where r is the ellipsoidal radius,
    u the direction from the centre and f = sum_k w_k sin(omega_k . u + phi_k) (8 terms,
    w_k ~ N(0, 1), |omega_k| ~ U(10, 20) rad, f divided by 1.5 std and clipped to [-1, 1]),
    which makes gyri and sulci (the envelope is shrunk by 1 + a so they stay inside the
    skull); white matter is the same folded surface cortex_mm further in (a thick shell, so
    cortex and WM volumes come out comparable as in real brains); lateral ventricles, thalami
    and putamina are ellipsoids on each side inside the WM. Atrophy shrinks the brain (CSF
    fills the gap) and grows the ventricles. Pose: x_head = R^T (x - t), R from rotation_deg,
    t = shift_mm, like an unregistered scan. Intensity: PHANTOM_INTENSITIES per label, times
    a smooth bias field 1 + b g(x) on the signal (image + 1) / 2, g a random quadratic
    polynomial of the position with |g| <= 1, plus Gaussian noise N(0, noise_sd^2), clipped
    to [-1, 1].

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

# --- Datasets and augmentation -----------------------------------------------------------------


def augment(volume, generator=None, *, flip=None, degrees=3.0, shift=2.0, scale=0.03) -> torch.Tensor:
    """The paper's augmentation: random left-right flip, then a small random affine.

    volume: tensor (..., D, H, W) in [-1, 1], axis -3 = L-R; one transform for all leading
    axes. flip: None flips axis -3 with p = 0.5, True/False forces it. Then output voxel i
    samples the input (trilinear) at p = c + s R (i - c) + t, c the grid centre, R a rotation
    by angles ~ U(-degrees, degrees) about each axis, s ~ U(1 - scale, 1 + scale), t ~
    U(-shift, shift) voxels per axis (voxels assumed isotropic). Outside the input is -1
    (background); the result is clipped to [-1, 1]. Draws come from `generator` (a
    torch.Generator; None = torch's global one) in a fixed order, so a seeded generator
    gives the same result. These ranges are this kit's choice of "small".
    """
    x = torch.as_tensor(volume, dtype=torch.float32)
    u = torch.rand(8, generator=generator, dtype=torch.float64).numpy()
    if (u[0] < 0.5) if flip is None else flip:
        x = x.flip(-3)
    if degrees == shift == scale == 0:
        return x.clamp(-1, 1)
    c = (np.array(x.shape[-3:]) - 1) / 2
    a = (1 + scale * (2 * u[1] - 1)) * _rotation_matrix(degrees * (2 * u[2:5] - 1))
    matrix = np.concatenate([a, (c - a @ c + shift * (2 * u[5:8] - 1))[:, None]], 1)
    return (_warp(x + 1, matrix, x.shape[-3:]) - 1).clamp(-1, 1)


def _item_seed(*keys) -> int:
    """A well-mixed 63-bit seed from non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class VolumeDataset(torch.utils.data.Dataset):
    """NIfTI volumes as (1, D, H, W) float32 tensors in [-1, 1], for training.

    files_or_folder: a folder (all *.nii and *.nii.gz in it, sorted) or a list of files. Each
    volume is reoriented to LPS by axis permutation/flips only (exact; the files should already
    be preprocess()-ed: 1 mm, 192 x 224 x 192), then optionally resized to a teaching size:
    voxel_mm (e.g. 4: 192 x 224 x 192 at 1 mm -> 48 x 56 x 48, size = round(shape x zoom /
    voxel_mm)) or size=(D, H, W); area averaging when shrinking, trilinear when growing.
    Intensities: to_model (min-max to [-1, 1]). augment=True applies augment() with a
    generator seeded from (seed, index, how many times this index was read), so every epoch
    differs yet the sequence is reproducible for a given seed.
    """

    def __init__(self, files_or_folder, size=None, voxel_mm=None, augment=False, seed=0):
        if size is not None and voxel_mm is not None:
            raise ValueError("VolumeDataset: give size or voxel_mm, not both")
        if isinstance(files_or_folder, (str, os.PathLike)) and pathlib.Path(files_or_folder).is_dir():
            files = sorted(p for p in pathlib.Path(files_or_folder).iterdir() if p.name.endswith((".nii", ".nii.gz")))
        elif isinstance(files_or_folder, (str, os.PathLike)):
            files = [pathlib.Path(files_or_folder)]
        else:
            files = [pathlib.Path(f) for f in files_or_folder]
        if not files:
            raise ValueError(f"VolumeDataset: no NIfTI files (*.nii, *.nii.gz) in {files_or_folder}")
        self.files, self.size, self.voxel_mm = files, size, voxel_mm
        self.augment, self.seed, self._reads = augment, seed, {}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i) -> torch.Tensor:
        import nibabel as nib
        from nibabel import orientations as ornt
        arr, affine = _as_volume(self.files[i], str(self.files[i]))
        to_lps = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt("LPS"))
        arr = np.ascontiguousarray(ornt.apply_orientation(arr, to_lps))
        x = torch.from_numpy(arr)[None, None]
        size = self.size
        if self.voxel_mm is not None:
            zooms = nib.affines.voxel_sizes(affine)[np.argsort(to_lps[:, 0])]       # in LPS axis order
            size = tuple(max(1, round(n * z / self.voxel_mm)) for n, z in zip(arr.shape, zooms))
        if size is not None and tuple(size) != arr.shape:
            shrink = all(s <= n for s, n in zip(size, arr.shape))
            x = F.interpolate(x, size=tuple(size), mode="area" if shrink else "trilinear",
                              **({} if shrink else {"align_corners": False}))
        x = to_model(x[0])                                                    # (1, D, H, W)
        if self.augment:
            count = self._reads[i] = self._reads.get(i, -1) + 1
            x = augment(x, torch.Generator().manual_seed(_item_seed(self.seed, i, count)))
        return x


class PhantomDataset(torch.utils.data.IterableDataset):
    """Phantom heads as (1, D, H, W) float32 tensors in [-1, 1]: item i = phantom(seed + i).

    n items, or endless when n is None (iterate it; len() then raises TypeError). Indexing
    works too (ds[i]). augment=True applies augment() with a generator seeded from
    (seed, i), so item i is always the same. An IterableDataset: DataLoader(ds, batch_size=B)
    works (items are already random, so no shuffle); with several workers each takes every
    num_workers-th index.
    """

    def __init__(self, n=None, shape=(64, 64, 64), seed=0, augment=False):
        self.n, self.shape, self.seed, self.augment = n, tuple(shape), seed, augment

    def __len__(self):
        if self.n is None:
            raise TypeError("this PhantomDataset is endless (n=None): it has no length")
        return self.n

    def __getitem__(self, i) -> torch.Tensor:
        if i < 0 or (self.n is not None and i >= self.n):
            raise IndexError(f"PhantomDataset index {i} out of range 0..{self.n}")
        x = torch.from_numpy(phantom(self.seed + i, self.shape)[0])[None]
        if self.augment:
            x = augment(x, torch.Generator().manual_seed(_item_seed(self.seed, i)))
        return x

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        i, step = (0, 1) if info is None else (info.id, info.num_workers)
        while self.n is None or i < self.n:
            yield self[i]
            i += step

# =============================================================================
# 9. Training
# =============================================================================

# =============================================================================
# 10. Evaluation
# =============================================================================

# Volume tables. A *volume table* is a plain dict, one entry per subject:
#     {"subject": [str] (N,)  names as given, e.g. "/data/sub-01_T1w.nii.gz",
#      "id":      [str] (N,)  the same without directory and .nii/.nii.gz/.mgz suffix,
#      "volumes": {structure: float64 ndarray (N,)}}  mm^3, in column order.
# Structure names are stripped and lower-cased; when tables are matched, "_" and " "
# are the same ("left_thalamus" is "left thalamus"). A *result* is a list of dict rows.


def _name_key(name: str) -> str:
    """Matching key of a structure name: lower case, '_' and runs of spaces -> one space."""
    return " ".join(str(name).strip().lower().replace("_", " ").split())


def _subject_id(name: str) -> str:
    """'/a/b/sub-01_T1w.nii.gz' -> 'sub-01_T1w' (directory and image suffix dropped)."""
    base = str(name).strip().replace("\\", "/").rsplit("/", 1)[-1]
    suffix = next((s for s in (".nii.gz", ".nii", ".mgz") if base.lower().endswith(s)), "")
    return base[: len(base) - len(suffix)]


def _volume_table(subjects, columns: dict) -> dict:
    subjects = [str(s) for s in subjects]
    cols = {str(k).strip().lower(): np.asarray(v, np.float64).reshape(-1) for k, v in columns.items()}
    bad = [k for k, v in cols.items() if v.size != len(subjects)]
    if bad:
        raise ValueError(f"column(s) {bad} do not have one value for each of the {len(subjects)} subjects")
    return {"subject": subjects, "id": [_subject_id(s) for s in subjects], "volumes": cols}


def read_synthseg_csv(path) -> dict:
    """Read a SynthSeg `--vol` CSV (1.0 or 2.0, with or without --parc) -> volume table.

    Header `subject,<structure>,...`, one row per image, values in mm^3. All structure
    columns are kept in order (2.0: 33; 1.0: 31, without 'total intracranial' and 'csf';
    --parc adds 68 `ctx-lh-*`/`ctx-rh-*`). Also reads what write_table_csv writes.
    ValueError for a first column other than 'subject', repeated or empty structure
    names, ragged rows and non-numeric values.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows or rows[0][0].strip().lower() != "subject":
        raise ValueError(f"{path}: the first column must be 'subject' (a SynthSeg --vol CSV), "
                         f"found {rows[0][0] if rows else 'nothing'!r}")
    names = [c.strip().lower() for c in rows[0][1:]]
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"{path}: structure names must be unique and non-empty, got {names}")
    values = np.empty((len(rows) - 1, len(names)))
    for i, row in enumerate(rows[1:]):
        if len(row) != len(names) + 1:
            raise ValueError(f"{path}, data row {i + 1}: {len(row)} cells, the header has {len(names) + 1}")
        for j, cell in enumerate(row[1:]):
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise ValueError(f"{path}, data row {i + 1} ({row[0]!r}), column {names[j]!r}: {cell!r} "
                                 "is not a number (volumes in mm^3 expected)") from None
    return _volume_table([r[0].strip() for r in rows[1:]], dict(zip(names, values.T)))


def write_table_csv(table, path) -> pathlib.Path:
    """Write a volume table (subject + structure columns) or a result (list of dict rows) as CSV."""
    if isinstance(table, dict):
        body = [["subject", *table["volumes"]]]
        body += [[s, *(repr(float(v[i])) for v in table["volumes"].values())] for i, s in enumerate(table["subject"])]
    else:
        body = [list(table[0]) if table else []]
        body += [[repr(float(v)) if isinstance(v, float) else v for v in r.values()] for r in table]

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(body)
    _atomic_write(pathlib.Path(path), write)
    return pathlib.Path(path)


def read_rows_csv(path) -> list:
    """Read a result CSV (write_table_csv of rows) -> list of dicts; numbers become float."""
    def cell(s):
        try:
            return float(s)
        except ValueError:
            return s
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: cell(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _left_right(name: str) -> tuple:
    """'left thalamus' -> ('left', 'thalamus'); 'ctx-rh-insula' -> ('right', 'ctx-insula'); else (None, name)."""
    for side, tag in (("left", "ctx-lh-"), ("right", "ctx-rh-")):
        if name.startswith(tag):
            return side, "ctx-" + name[len(tag):]
        if name.startswith(side) and name[len(side): len(side) + 1] in (" ", "_", "-"):
            return side, name[len(side) + 1:]
    return None, name


def merge_left_right(table: dict) -> dict:
    """Sum left/right pairs: 'left_X' + 'right_X' -> 'X' (also 'left X', 'ctx-lh-X').

    The merged column takes the place of the pair's first; unpaired and unsided columns stay.
    """
    cols, sides = table["volumes"], {n: _left_right(n) for n in table["volumes"]}
    pairs = {}
    for name, (side, base) in sides.items():
        if side:
            pairs.setdefault(_name_key(base), {})[side] = name
    out = {}
    for name, (side, base) in sides.items():
        pair = pairs[_name_key(base)] if side else {}
        if len(pair) < 2:
            out[name] = cols[name]
        elif base not in out:
            out[base] = cols[pair["left"]] + cols[pair["right"]]
    return {**table, "volumes": out}

# --- Phantom segmentation ------------------------------------------------------------------


def _grow6(r: np.ndarray) -> np.ndarray:
    """One step of 6-connected dilation of a bool volume (X, Y, Z)."""
    g = r.copy()
    for ax in range(3):
        gv, rv = np.moveaxis(g, ax, 0), np.moveaxis(r, ax, 0)                 # views: writes reach g
        gv[1:] |= rv[:-1]
        gv[:-1] |= rv[1:]
    return g


def _flood(mask: np.ndarray, seeds: np.ndarray, rival=None) -> np.ndarray:
    """The voxels of mask 6-connected (within mask) to seeds: bool (X, Y, Z). With rival seeds,
    both fronts grow a voxel per step and each voxel goes to the first to reach it (ties: seeds)."""
    a, b = seeds & mask, (np.zeros_like(mask) if rival is None else rival & mask & ~seeds)
    while True:
        a_next = _grow6(a) & mask & ~b
        b_next = _grow6(b) & mask & ~a_next
        if np.array_equal(a_next, a) and np.array_equal(b_next, b):
            return a
        a, b = a_next, b_next


def _despeckle(labels: np.ndarray, n_labels: int, min_same=3, rounds=2) -> np.ndarray:
    """Give each voxel that shares its label with fewer than min_same of its 26 neighbours the
    neighbours' most common label: isolated noise goes, 1-voxel-thin sheets (8 neighbours) stay."""
    n = labels.shape
    offsets = [(i, j, k) for i in range(3) for j in range(3) for k in range(3) if (i, j, k) != (1, 1, 1)]
    for _ in range(rounds):
        padded = np.pad(labels.astype(np.int16) + 1, 1)                            # 0 off the grid
        nbrs = [padded[i:i + n[0], j:j + n[1], k:k + n[2]] for i, j, k in offsets]  # 26 views
        odd = sum((v == padded[1:-1, 1:-1, 1:-1]).astype(np.uint8) for v in nbrs) < min_same
        votes = np.stack([v[odd] for v in nbrs], 1)[..., None] == np.arange(1, n_labels + 1)  # (m, 26, K)
        labels = labels.copy()
        labels[odd] = votes.sum(1).argmax(1)
    return labels


def segment_phantom(image, n_iter=5) -> np.ndarray:
    """Label a phantom() image with PHANTOM_LABELS numbers: (X, Y, Z) in [-1, 1] -> uint8 (X, Y, Z).

    Uses the signal s = (image + 1) / 2, whose scale (e.g. to_model of a saved uint16
    NIfTI) the bias field absorbs. Voxels up to 4 mm: coarser, the 5-6 mm scalp and skull
    no longer close the head and the background floods in. Steps:
    1. topology: background = voxels darker than the CSF/cortex midpoint connected to the
       grid border; scalp = brighter voxels connected to the background;
    2. bias: n_iter times, give each other voxel the label of the nearest mean
       m_k = (PHANTOM_INTENSITIES[k] + 1) / 2 of r = s / B, then fit B(x), a quadratic
       polynomial of position (10 terms), by least squares s ~ m_k B(x) over scalp, CSF,
       cortex and white-matter voxels within half a gap of their mean; label by r;
    3. positions are mapped to the phantom's head frame (mm) by the head mask's centroid
       and per-axis spread (a solid ellipsoid of semi-axes a has sd a / sqrt(5)); CSF that
       a flood from the skull reaches before a flood from the CSF inside the phantom's mean
       ventricles (x 1.5) is CSF, the rest ventricles; isolated voxels are despeckled;
    4. deep gray -> thalamus / putamen, left / right: each voxel goes to the structure of
       smallest ellipsoidal radius |(p - c_k) / a_k| (a_k the phantom's semi-axes), the c_k
       started at the phantom's centres (thalamus medial-posterior, putamen lateral-anterior;
       axis 0 grows to the subject's left, axis 1 to posterior) and moved to the cluster means.
    Plain numpy: many small whole-volume steps, which thread pools only slow down.
    """
    x = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if x.ndim != 3:
        raise ValueError(f"segment_phantom needs one volume (X, Y, Z), got shape {tuple(x.shape)}")
    s = (np.clip(x.astype(np.float32), -1, 1) + 1) / 2                          # signal >= 0
    means = np.array([(PHANTOM_INTENSITIES[k] + 1) / 2 for k in range(len(PHANTOM_LABELS))])
    fit = np.array([1, 3, 4, 5])                                                 # scalp, CSF, cortex, WM
    inner = np.array(sorted((2, 3, 4, 5, 7, 9), key=lambda k: means[k]))        # skull ... WM, by mean
    cuts = (means[inner][1:] + means[inner][:-1]) / 2                            # nearest mean = bin
    classify = lambda r: inner[np.searchsorted(cuts, r)]                         # noqa: E731
    gaps = np.abs(means[:, None] - means)
    half_gap = np.where(gaps > 1e-6, gaps, np.inf).min(1) / 2                    # (K,)

    dark = s < (means[3] + means[4]) / 2                                         # 1. topology
    border = np.ones_like(dark)
    border[1:-1, 1:-1, 1:-1] = False
    background = _flood(dark, border)
    scalp = _flood(~dark | background, background) & ~background

    g = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in x.shape], indexing="ij", sparse=True)
    terms = [np.ones((1, 1, 1), np.float32), *g, *(gi * gj for i, gi in enumerate(g) for gj in g[i:])]  # 2. bias
    step = max(1, round((x.size / 2e5) ** (1 / 3)))                             # fit on <= ~2e5 voxels
    sub = lambda v: np.broadcast_to(v, x.shape)[::step, ::step, ::step].ravel()  # noqa: E731
    sub_t, sub_s = np.stack([sub(t) for t in terms]).astype(np.float64), sub(s)  # (10, n), (n,)
    beta = np.eye(10)[0]
    for _ in range(n_iter):    # (einsum, not BLAS: threaded BLAS crawls on a busy machine)
        r = sub_s / np.maximum(np.einsum("j,jn->n", beta, sub_t), 0.05)
        cls = np.where(sub(scalp), 1, classify(r))
        use = np.isin(cls, fit) & ~sub(background) & (np.abs(r - means[cls]) < half_gap[cls])
        design = means[cls[use]] * sub_t[:, use]                                 # (10, n)
        beta = np.linalg.solve(np.einsum("in,jn->ij", design, design), np.einsum("in,n->i", design, sub_s[use]))
    bias = np.maximum(sum(b * t for b, t in zip(beta.astype(np.float32), terms)), 0.05)  # B(x), (X, Y, Z)
    labels = np.where(scalp, 1, classify(s / bias)).astype(np.uint8)
    labels[background] = 0
    if background.sum() > background.size - 2:                                  # no head at all
        return labels

    head = np.argwhere(~background)                                              # 3. head frame, CSF
    centre, scale = head.mean(0), _HEAD_SEMI / 5 ** 0.5 / head.std(0)
    mm = lambda m: (np.argwhere(m) - centre) * scale                             # noqa: E731 (n, 3)
    side = np.array([[1.0, 1, 1], [-1, 1, 1]])                                   # left, mirrored right
    rho2 = lambda p, c, a: (((p[:, None] - c) / a) ** 2).sum(-1)                 # noqa: E731 (n, k)
    csf, skull = labels == 3, labels == 2
    seeds = np.zeros_like(csf)              # CSF within 1.5 x the mean ventricles: sulci never get this deep
    near = rho2(mm(csf), np.multiply(_VENTRICLE[0], side), np.array(_VENTRICLE[1])).min(1, initial=np.inf)
    seeds[tuple(np.argwhere(csf)[near <= 1.5 ** 2].T)] = True
    labels[csf & ~_flood(csf | skull, skull, rival=seeds)] = 6
    labels[labels == 9] = 7                                                      # deep gray: one class here
    labels = _despeckle(labels, len(PHANTOM_LABELS))

    gray = labels == 7                                                           # 4. deep gray
    pts = mm(gray)
    centres = np.concatenate([np.multiply(_THALAMUS[0], side), np.multiply(_PUTAMEN[0], side)])
    semi = np.array([_THALAMUS[1]] * 2 + [_PUTAMEN[1]] * 2)
    for _ in range(10):        # nearest by ellipsoidal radius |(p - c_k) / a_k|, c_k the cluster means
        near = rho2(pts, centres, semi).argmin(1)
        centres = np.stack([pts[near == k].mean(0) if (near == k).any() else centres[k] for k in range(4)])
    labels[gray] = np.array([7, 8, 9, 10], np.uint8)[near]
    return labels


def dice(a, b, labels=None) -> dict:
    """Dice overlap per structure of two label maps of one shape: {name: 2 |A n B| / (|A| + |B|)}.

    labels: {number: name}, default PHANTOM_LABELS; background (0) left out; NaN where
    the structure is in neither map.
    """
    a, b = (np.asarray(v.cpu() if torch.is_tensor(v) else v).astype(np.int64) for v in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"dice needs label maps of one shape, got {a.shape} and {b.shape}")
    out = {}
    for k, name in (PHANTOM_LABELS if labels is None else labels).items():
        if k != 0:
            size = np.sum(a == k) + np.sum(b == k)
            out[name] = float(2 * np.sum((a == k) & (b == k)) / size) if size else math.nan
    return out


def regional_volumes(maps, voxel_mm=None, merge_lr=False, **segment_kw) -> dict:
    """phantom_volumes of each map -> volume table (mm^3 per PHANTOM_LABELS structure).

    maps: integer label maps (X, Y, Z), or float images in [-1, 1], which are segmented with
    segment_phantom(image, **segment_kw) first; a sequence, an (N, X, Y, Z) array or tensor,
    or a dict {subject: map}. voxel_mm: None (the phantom default 224 / max(shape)), a float,
    (3,), or (N, 3), one row per map. V_s = #{voxels labelled s} * prod(voxel_mm).
    """
    subjects, maps = (list(maps), list(maps.values())) if isinstance(maps, dict) else (None, list(maps))
    subjects = subjects or [f"subject_{i:03d}" for i in range(len(maps))]
    vox = voxel_mm if np.ndim(voxel_mm) == 2 else [voxel_mm] * len(maps)
    rows = []
    for name, m, v in zip(subjects, maps, vox):
        m = m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m)
        m = segment_phantom(m, **segment_kw) if np.issubdtype(m.dtype, np.floating) else m
        if m.min() < 0 or m.max() >= len(PHANTOM_LABELS):
            raise ValueError(f"label map {name!r} has values outside 0..{len(PHANTOM_LABELS) - 1} (PHANTOM_LABELS)")
        rows.append(phantom_volumes(m, voxel_mm=v))
    table = _volume_table(subjects, {k: [r[k] for r in rows] for k in rows[0]} if rows else {})
    return merge_left_right(table) if merge_lr else table

# --- Statistics: permutation tests, effect sizes, Wasserstein, multiple testing ------------


def wasserstein1(a, b) -> float:
    """Exact 1-D Wasserstein-1 distance between two samples (sizes may differ).

    W1 = integral |F_a(x) - F_b(x)| dx over the empirical CDFs, evaluated on the
    merged sorted values x_(1) <= ... (the CDFs are constant between them):
    W1 = sum_k |F_a(x_k) - F_b(x_k)| (x_(k+1) - x_(k)).
    """
    a, b = (np.sort(np.ravel(v).astype(np.float64)) for v in (a, b))
    if a.size == 0 or b.size == 0:
        raise ValueError("wasserstein1 needs two non-empty samples")
    x = np.sort(np.concatenate([a, b]))
    fa, fb = (np.searchsorted(v, x[:-1], side="right") / v.size for v in (a, b))
    return float(np.sum(np.abs(fa - fb) * np.diff(x)))


def cohens_d(a, b, hedges=False) -> float:
    """Effect size d = (mean_a - mean_b) / s_pooled, s_pooled^2 = ((n_a-1) s_a^2 + (n_b-1) s_b^2) / (n_a+n_b-2).

    hedges=True multiplies by Hedges' small-sample factor 1 - 3 / (4 (n_a + n_b) - 9).
    """
    a, b = (np.ravel(v).astype(np.float64) for v in (a, b))
    na, nb, diff = a.size, b.size, a.mean() - b.mean()
    if na < 2 or nb < 2:
        raise ValueError(f"an effect size needs at least 2 values per group, got {na} and {nb}")
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    d = diff / pooled if pooled > 0 else (math.copysign(math.inf, diff) if diff else 0.0)
    return d * (1 - 3 / (4 * (na + nb) - 9)) if hedges else d


def permutation_test(a, b, n_permutations=10000, seed=0, batch=2000) -> np.ndarray:
    """Two-sided permutation test of the difference of means, one p per row.

    a: (n_a,) or (S, n_a); b: (n_b,) or (S, n_b) -> p (S,) (float if 1-D).
    Each permutation relabels the pooled n_a + n_b subjects (the same relabelling
    for all S rows); with D = mean_a - mean_b,
    p = (1 + #{k : |D_k| >= |D_obs|}) / (1 + n_permutations).
    Seeded (numpy default_rng(seed)); done as (batch, N) 0/1 masks times the data.
    """
    flat = np.ndim(a) == 1
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b) or 0 in a.shape + b.shape or n_permutations < 1:
        raise ValueError(f"permutation_test needs (S, n_a) and (S, n_b) with n >= 1 and n_permutations >= 1, "
                         f"got {a.shape}, {b.shape} and {n_permutations}")
    x, na, nb = np.concatenate([a, b], axis=1), a.shape[1], b.shape[1]   # (S, N)
    total = x.sum(axis=1)
    observed = np.abs(a.mean(axis=1) - b.mean(axis=1))       # (S,)
    tol = 1e-9 * np.abs(x).max(axis=1)                       # ties up to rounding count as ties
    rng = np.random.default_rng(seed)
    base = np.r_[np.ones(na), np.zeros(nb)]
    hits = np.zeros(x.shape[0])
    for start in range(0, n_permutations, batch):
        masks = rng.permuted(np.tile(base, (min(batch, n_permutations - start), 1)), axis=1)  # (B, N)
        sum_a = masks @ x.T                                  # (B, S)
        diff = sum_a / na - (total - sum_a) / nb
        hits += (np.abs(diff) >= observed - tol).sum(axis=0)
    p = (1 + hits) / (1 + n_permutations)
    return float(p[0]) if flat else p


def adjust_pvalues(p, method="holm") -> np.ndarray:
    """Adjust m p-values for multiple testing; the result has p's shape and order.

    holm:      p~_(i) = max_{j<=i} min(1, (m - j + 1) p_(j))      (family-wise error)
    fdr / bh:  p~_(i) = min_{j>=i} min(1, m p_(j) / j)            (Benjamini-Hochberg)
    none:      p unchanged.  p_(1) <= ... <= p_(m) are the sorted values.
    """
    p = np.asarray(p, dtype=np.float64)
    method = str(method).lower()
    flat, m = p.ravel(), p.size
    order = np.argsort(flat, kind="stable")
    rank = np.arange(1, m + 1)
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - rank + 1) * flat[order]))
    elif method in ("fdr", "bh"):
        adj = np.minimum.accumulate(np.minimum(1.0, m * flat[order] / rank)[::-1])[::-1]
    elif method == "none":
        adj = flat[order]
    else:
        raise ValueError(f"unknown correction {method!r}: use 'holm', 'fdr' (alias 'bh') or 'none'")
    out = np.empty(m)
    out[order] = adj
    return out.reshape(p.shape)


def _matched_structures(tables, structures=None) -> list:
    """[(name in each table, ...)] for the requested structures, or for all shared ones (first table's order)."""
    keyed = [{_name_key(n): n for n in t["volumes"]} for t in tables]
    wanted = [_name_key(s) for s in structures] if structures else [k for k in keyed[0] if all(k in t for t in keyed)]
    missing = [k for k in wanted if not all(k in t for t in keyed)]
    if missing or not wanted:
        shared = [k for k in keyed[0] if all(k in t for t in keyed)]
        raise ValueError(f"structure(s) {missing or structures} not in every table; shared structures: {shared}")
    return [tuple(t[k] for t in keyed) for k in wanted]


def compare_volumes(a, b, structures=None, n_permutations=10000, seed=0, correction="holm",
                    merge_lr=False, names=("a", "b")) -> list:
    """Compare two volume tables structure by structure -> list of rows (dicts).

    Row keys: structure, n_<a>, mean_<a>, sd_<a>, n_<b>, mean_<b>, sd_<b>,
    difference (mean_a - mean_b), p (two-sided permutation test of the means,
    the same seeded relabellings for every structure), p_adjusted (correction
    across the structures: 'holm' or 'fdr'), cohen_d, hedges_g, wasserstein
    (exact W1 between the two samples, mm^3); <a>, <b> from names.
    structures: names to test (default: all shared); merge_lr sums left/right first.
    """
    if merge_lr:
        a, b = merge_left_right(a), merge_left_right(b)
    pairs = _matched_structures([a, b], structures)
    xa = np.stack([a["volumes"][na] for na, _ in pairs])     # (S, n_a)
    xb = np.stack([b["volumes"][nb] for _, nb in pairs])     # (S, n_b)
    if xa.shape[1] < 2 or xb.shape[1] < 2:
        raise ValueError(f"compare_volumes needs at least 2 subjects per table, got {xa.shape[1]} and {xb.shape[1]}")
    p = permutation_test(xa, xb, n_permutations, seed)
    p_adj = adjust_pvalues(p, correction)
    ka, kb = names
    rows = []
    for s, (name, _) in enumerate(pairs):
        va, vb = xa[s], xb[s]
        rows.append({"structure": name,
                     f"n_{ka}": va.size, f"mean_{ka}": va.mean(), f"sd_{ka}": va.std(ddof=1),
                     f"n_{kb}": vb.size, f"mean_{kb}": vb.mean(), f"sd_{kb}": vb.std(ddof=1),
                     "difference": va.mean() - vb.mean(), "p": p[s], "p_adjusted": p_adj[s],
                     "cohen_d": cohens_d(va, vb), "hedges_g": cohens_d(va, vb, hedges=True),
                     "wasserstein": wasserstein1(va, vb)})
    return rows

# --- Image-level checks: intensity histograms, diversity (3-D SSIM) -----------------------


def _as_batch(volumes) -> torch.Tensor:
    """A sequence of volumes or an (N, ...) array/tensor -> float32 tensor (N, X, Y, Z)."""
    as_t = lambda v: torch.as_tensor(v if torch.is_tensor(v) else np.asarray(v)).float()  # noqa: E731
    x = as_t(volumes) if torch.is_tensor(volumes) or isinstance(volumes, np.ndarray) else torch.stack(
        [as_t(v) for v in volumes])
    x = x[:, 0] if x.ndim == 5 and x.shape[1] == 1 else x                  # (N, 1, X, Y, Z) -> (N, X, Y, Z)
    if x.ndim != 4:
        raise ValueError(f"expected N volumes (N, X, Y, Z) or (N, 1, X, Y, Z), got shape {tuple(x.shape)}")
    return x


def intensity_histogram(volumes, bins=128, range=(-1.0, 1.0), mask=None) -> tuple:
    """Pooled intensity histogram of N volumes -> (p (bins,) summing to 1, edges (bins + 1,)).

    volumes: (N, X, Y, Z) or a sequence of (X, Y, Z); mask: bool, broadcastable
    to volumes (e.g. one (X, Y, Z) brain mask), selects the voxels counted.
    Values outside range are counted in the end bins.
    """
    x = _as_batch(volumes).numpy()
    if mask is not None:
        x = x[np.broadcast_to(np.asarray(mask, dtype=bool), x.shape)]
    if x.size == 0:
        raise ValueError("intensity_histogram: no voxels selected (empty input or mask)")
    counts, edges = np.histogram(np.clip(x, *range), bins=bins, range=range)
    return counts / counts.sum(), edges


def histogram_distance(p, q, edges) -> dict:
    """Distances between two histograms on the same edges -> {"wasserstein": W1, "js": JS}.

    W1 places each bin's mass at its centre: W1 = sum_k |P_k - Q_k| (c_(k+1) - c_k)
    with P, Q the cumulative sums (intensity units; a shift by whole bins is exact).
    JS = (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2, in bits (0 = same, 1 = disjoint).
    """
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    p, q = p / p.sum(), q / q.sum()
    centres = (np.asarray(edges[1:], np.float64) + np.asarray(edges[:-1], np.float64)) / 2
    w1 = float(np.sum(np.abs(np.cumsum(p) - np.cumsum(q))[:-1] * np.diff(centres)))
    m = (p + q) / 2
    kl = lambda u: float(np.sum(u[u > 0] * np.log2(u[u > 0] / m[u > 0])))
    return {"wasserstein": w1, "js": (kl(p) + kl(q)) / 2}


def _gaussian_blur3d(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' (no padding): (B, 1, X, Y, Z) -> (B, 1, X-2r, Y-2r, Z-2r)."""
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    for axis in range(3):
        x = F.conv3d(x, g.view([1, 1] + [g.numel() if i == axis else 1 for i in range(3)]))
    return x


def ssim3d(x, y, sigma=1.5, radius=3, data_range=2.0) -> torch.Tensor:
    """Mean 3-D SSIM of pairs of volumes: (N, X, Y, Z) and (N, X, Y, Z) -> (N,).

    Local Gaussian statistics (sigma, window 2 radius + 1, valid region only):
    SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = data_range (2 for [-1, 1]).
    """
    x, y = _as_batch(x)[:, None], _as_batch(y)[:, None]                       # (N, 1, X, Y, Z)
    if x.shape != y.shape or min(x.shape[2:]) <= 2 * radius:
        raise ValueError(f"ssim3d needs equal shapes larger than the {2 * radius + 1}-voxel window, "
                         f"got {tuple(x.shape[2:])} and {tuple(y.shape[2:])}")
    blur = lambda v: _gaussian_blur3d(v, sigma, radius)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3, 4)).float()


def diversity(volumes, max_pairs=None, seed=0, **ssim_kw) -> float:
    """Mean pairwise 3-D SSIM over N volumes (N >= 2): near 1 means mode collapse.

    Identical volumes give 1; independent noise gives ~0. Uses all N (N - 1) / 2
    pairs, or max_pairs of them drawn without replacement (seeded).
    """
    x = _as_batch(volumes)
    i, j = np.triu_indices(x.shape[0], k=1)
    if i.size == 0:
        raise ValueError(f"diversity needs at least 2 volumes, got {x.shape[0]}")
    if max_pairs is not None and max_pairs < i.size:
        pick = np.random.default_rng(seed).choice(i.size, size=max_pairs, replace=False)
        i, j = i[pick], j[pick]
    step = max(1, int(2e7 // x[0].numel()))                  # pairs per batch: bounded memory
    scores = [ssim3d(x[i[k:k + step]], x[j[k:k + step]], **ssim_kw) for k in range(0, i.size, step)]
    return float(torch.cat(scores).mean())

# --- Report and loading -------------------------------------------------------------------


def comparison_report(real, synthetic: dict, out_dir, structures=None, merge_lr=False, n_permutations=10000,
                      seed=0, correction="holm", voxel_mm=None, name="volumes") -> dict:
    """Compare real against each synthetic set; write <name>.csv and <name>.png in out_dir.

    real: a volume table, or volumes/label maps for regional_volumes(voxel_mm=...);
    synthetic: {set name: the same}. Each set gets compare_volumes(set, real)
    (difference = synthetic - real; p adjusted across structures within the set).
    The figure has one panel per structure: box plots with the subjects as dots,
    real first, then each set, titled with the adjusted p-values.
    Returns {"csv": path, "figure": path, "table": rows (with a "set" key)}.
    """
    as_table = lambda v: v if isinstance(v, dict) and "volumes" in v else regional_volumes(v, voxel_mm)  # noqa: E731
    real = merge_left_right(as_table(real)) if merge_lr else as_table(real)
    sets = {k: merge_left_right(as_table(v)) if merge_lr else as_table(v) for k, v in synthetic.items()}
    if not sets:
        raise ValueError("comparison_report needs at least one synthetic set")
    matched = _matched_structures([real, *sets.values()], structures)
    rows = []
    for set_name, table in sets.items():
        cmp = compare_volumes(table, real, [m[0] for m in matched], n_permutations, seed, correction,
                              names=("synthetic", "real"))
        rows += [{"set": set_name, **r} for r in cmp]
    out_dir = pathlib.Path(out_dir)
    csv_path = write_table_csv(rows, out_dir / f"{name}.csv")

    from matplotlib.figure import Figure                      # no pyplot: no GUI backend needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    ncol = min(4, len(matched))
    nrow = -(-len(matched) // ncol)
    fig = Figure(figsize=(3.2 * ncol, 3.2 * nrow), layout="constrained")
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)
    for s, names in enumerate(matched):
        ax = fig.add_subplot(nrow, ncol, s + 1)
        data = [real["volumes"][names[0]]] + [t["volumes"][n] for t, n in zip(sets.values(), names[1:])]
        ax.boxplot(data, showfliers=False)
        for g, d in enumerate(data):
            ax.scatter(g + 1 + rng.uniform(-0.15, 0.15, d.size), d, s=6, alpha=0.5)
        ax.set_xticks(range(1, len(data) + 1), ["real", *sets], rotation=30)
        p = ", ".join(f"{r['p_adjusted']:.2g}" for r in rows if _name_key(r["structure"]) == _name_key(names[0]))
        ax.set_title(f"{names[0]}\np_adj: {p}", fontsize=9)
        ax.set_ylabel("mm$^3$")
    fig_path = out_dir / f"{name}.png"
    _atomic_write(fig_path, lambda tmp: fig.savefig(tmp, dpi=100))
    return {"csv": csv_path, "figure": fig_path, "table": rows}


def load_volume_table(source) -> dict:
    """A volume table from a SynthSeg --vol CSV, or from a folder of NIfTI volumes.

    A folder whose files end in _labels.nii.gz holds label maps (used as they are);
    otherwise each .nii/.nii.gz is a phantom image: rescaled to [-1, 1] with to_model
    (saved files are uint16) and segmented with segment_phantom.
    Voxel sizes come from each file's affine; subjects are the file names.
    """
    source = pathlib.Path(source)
    if source.is_file():
        return read_synthseg_csv(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: expected a SynthSeg volume CSV or a folder of NIfTI files")
    files = sorted(f for f in source.iterdir() if f.name.endswith((".nii", ".nii.gz")))
    label_files = [f for f in files if f.name.endswith("_labels.nii.gz")]
    if not files:
        raise ValueError(f"{source}: no .nii/.nii.gz files")
    maps, vox = {}, []
    for f in label_files or files:
        array, affine = load_nifti(f)
        maps[f.name] = np.rint(array).astype(np.uint8) if label_files else to_model(array).numpy()
        vox.append(np.linalg.norm(affine[:3, :3], axis=0))
    return regional_volumes(maps, voxel_mm=np.stack(vox))

# =============================================================================
# 11. Viewing (matplotlib, widgets)
# =============================================================================

# =============================================================================
# 12. Command line
# =============================================================================

# --- preprocess subcommand (section 8's; the lead wires these two into main's parser) --------


def _preprocess_parser(subparsers):
    """Add `preprocess IN OUT [--mask M]` to an argparse subparsers object; returns the parser."""
    p = subparsers.add_parser(
        "preprocess", help="minimal preprocessing of a T1w NIfTI: LPS, 1 mm, 192x224x192, uint16",
        description="The paper's minimal preprocessing (see ddpm_mini.preprocess): clip to the 0.1/99.9 "
                    "percentiles, reorient to LPS, resample to 1 mm, crop/pad to 192x224x192 around the head "
                    "(or the mask's) centre, scale to uint16. No skull stripping, no bias correction.")
    p.add_argument("input", metavar="IN", help="input NIfTI (.nii or .nii.gz), 3-D")
    p.add_argument("output", metavar="OUT", help="output NIfTI path (written atomically)")
    p.add_argument("--mask", metavar="M", default=None,
                   help="optional brain mask on IN's voxel grid: centre the crop on its centre of mass")
    p.set_defaults(func=_cmd_preprocess)
    return p


def _cmd_preprocess(args) -> int:
    """Run preprocess(args.input, args.mask), write args.output; 0 on success, 1 on bad input."""
    import nibabel as nib
    try:
        img, landed = _preprocess(args.input, getattr(args, "mask", None))
    except (ValueError, OSError, nib.filebasedimages.ImageFileError) as err:  # bad or unreadable input
        print(f"preprocess: error: {err}", file=sys.stderr)
        return 1
    _atomic_write(pathlib.Path(args.output), lambda tmp: nib.save(img, str(tmp)))
    grid_centre = (np.array(IMAGE_SHAPE) - 1) / 2
    print(f"wrote {args.output}: shape {img.shape}, 1 mm, axes {''.join(nib.aff2axcodes(img.affine))}, uint16")
    print(f"{'mask' if getattr(args, 'mask', None) else 'head'} centre at voxel "
          f"({', '.join(f'{v:.1f}' for v in landed)}); grid centre ({', '.join(f'{v:.1f}' for v in grid_centre)})")
    return 0

# --- end of the preprocess subcommand block ------------------------------------------------------


# --- evaluate subcommand (section 10's; the lead wires these two into main's parser) ----------


def _evaluate_parser(subparsers):
    """Add `evaluate`: compare real and synthetic regional volumes (SynthSeg CSVs or NIfTI folders)."""
    p = subparsers.add_parser(
        "evaluate", help="compare regional volumes of real and synthetic sets (permutation tests)",
        description="A CSV is read as a SynthSeg --vol CSV; a folder of NIfTI phantom images is segmented "
                    "with segment_phantom, a folder of *_labels.nii.gz label maps is used as it is. "
                    "Writes volumes.csv and volumes.png to --out and prints the table.")
    p.add_argument("--real", required=True, metavar="CSV|DIR")
    p.add_argument("--synthetic", required=True, nargs="+", metavar="NAME=CSV|DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--structures", nargs="+", default=None, help="default: all structures the sets share")
    p.add_argument("--merge-lr", action="store_true", help="sum left and right structures first")
    p.add_argument("--permutations", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--correction", choices=("holm", "fdr"), default="holm")
    p.set_defaults(func=_cmd_evaluate)
    return p


def _cmd_evaluate(args) -> int:
    """Run `evaluate`: load each set, comparison_report, print the table; 0 on success, 1 on bad input."""
    try:
        synthetic = {}
        for spec in args.synthetic:
            name, sep, path = spec.partition("=")
            if not (sep and name and path):
                raise ValueError(f"--synthetic takes NAME=CSV|DIR, got {spec!r}")
            synthetic[name] = load_volume_table(path)
        report = comparison_report(load_volume_table(args.real), synthetic, args.out, structures=args.structures,
                                   merge_lr=args.merge_lr, n_permutations=args.permutations, seed=args.seed,
                                   correction=args.correction)
    except (ValueError, OSError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    cols = ("set", "structure", "mean_real", "mean_synthetic", "difference", "p", "p_adjusted",
            "cohen_d", "wasserstein")
    print("  ".join(f"{c:>14}" for c in cols))
    for r in report["table"]:
        print("  ".join(f"{r[c]:>14.6g}" if isinstance(r[c], float) else f"{str(r[c]):>14}" for c in cols))
    print(f"wrote {report['csv']} and {report['figure']}")
    return 0

# --- end of the evaluate subcommand block --------------------------------------------------------
