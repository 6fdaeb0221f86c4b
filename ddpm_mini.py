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

# A *volume table* is a plain dict, one row per subject:
#     {"subject": [str] (N,)   the names as given (e.g. "/data/sub-01_T1w.nii.gz"),
#      "id":      [str] (N,)   the same without directory and .nii/.nii.gz/.mgz,
#      "volumes": {structure: float64 ndarray (N,)}}   mm^3, in column order.
# Structure names are stripped and lower-cased; when two tables are matched,
# "_" and " " count as the same ("left_thalamus" is "left thalamus"). A *result*
# is a list of dict rows (one per structure). write_table_csv writes either;
# read_synthseg_csv reads volume tables back, read_rows_csv results.


def _name_key(name: str) -> str:
    """Matching key of a structure name: lower case, '_' and runs of spaces -> one space."""
    return " ".join(str(name).strip().lower().replace("_", " ").split())


def _subject_id(name: str) -> str:
    """'/a/b/sub-01_T1w.nii.gz' -> 'sub-01_T1w' (directory and image suffix dropped)."""
    base = str(name).strip().replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".nii", ".mgz"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _volume_table(subjects, columns: dict) -> dict:
    subjects = [str(s) for s in subjects]
    cols = {str(k).strip().lower(): np.asarray(v, dtype=np.float64).reshape(-1) for k, v in columns.items()}
    for k, v in cols.items():
        if v.size != len(subjects):
            raise ValueError(f"column {k!r} has {v.size} values for {len(subjects)} subjects")
    return {"subject": subjects, "id": [_subject_id(s) for s in subjects], "volumes": cols}


def read_synthseg_csv(path) -> dict:
    """Read a SynthSeg `--vol` CSV (1.0 or 2.0, with or without --parc) -> volume table.

    Header `subject,<structure>,...`, one row per image, values in mm^3. Any
    structure columns are kept, in order (2.0: 33, 1.0: 31 without 'total
    intracranial' and 'csf'; --parc adds 68 `ctx-lh-*`/`ctx-rh-*`). Also reads
    tables written by write_table_csv. ValueError on a header without a leading
    'subject' column, a repeated structure, a ragged row or a non-numeric value.
    """
    path = pathlib.Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows or rows[0][0].strip().lower() != "subject":
        first = rows[0][0] if rows else "nothing"
        raise ValueError(f"{path}: the first column must be 'subject' (SynthSeg --vol CSV), found {first!r}")
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
                raise ValueError(f"{path}, data row {i + 1} ({row[0]!r}), column {names[j]!r}: "
                                 f"{cell!r} is not a number (volumes in mm^3 expected)") from None
    return _volume_table([r[0].strip() for r in rows[1:]], dict(zip(names, values.T)))


def write_table_csv(table, path) -> pathlib.Path:
    """Write a volume table (subject + structure columns) or a result (list of dict rows) as CSV."""
    if isinstance(table, dict):
        header = ["subject", *table["volumes"]]
        body = [[s, *(repr(float(v[i])) for v in table["volumes"].values())] for i, s in enumerate(table["subject"])]
    else:
        header = list(table[0]) if table else []
        body = [[repr(float(v)) if isinstance(v, (float, np.floating)) else v for v in r.values()] for r in table]

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *body])
    _atomic_write(pathlib.Path(path), write)
    return pathlib.Path(path)


def read_rows_csv(path) -> list:
    """Read a result CSV (write_table_csv of a list of rows): numbers become float, the rest str."""
    def num(s):
        try:
            return float(s)
        except ValueError:
            return s
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: num(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _left_right(name: str):
    """'left thalamus' -> ('left', 'thalamus'); 'ctx-rh-insula' -> ('right', 'ctx-insula'); else (None, name)."""
    for side in ("left", "right"):
        if name[: len(side)] == side and name[len(side): len(side) + 1] in (" ", "_", "-"):
            return side, name[len(side) + 1:]
    for tag, side in (("ctx-lh-", "left"), ("ctx-rh-", "right")):
        if name.startswith(tag):
            return side, "ctx-" + name[len(tag):]
    return None, name


def merge_left_right(table: dict) -> dict:
    """Sum left/right pairs: 'left_X' + 'right_X' -> 'X' ('left X', 'ctx-lh-X' likewise).

    The merged column takes the place of the first of the pair; a structure
    without its partner, and one without a side, is kept as it is.
    """
    cols = table["volumes"]
    sides = {name: _left_right(name) for name in cols}
    pairs = {}
    for name, (side, base) in sides.items():
        if side:
            pairs.setdefault(_name_key(base), {})[side] = name
    out = {}
    for name, (side, base) in sides.items():
        pair = pairs.get(_name_key(base), {}) if side else {}
        if len(pair) == 2:
            if base not in out:
                out[base] = cols[pair["left"]] + cols[pair["right"]]
        else:
            out[name] = cols[name]
    return {"subject": list(table["subject"]), "id": list(table["id"]), "volumes": out}


def regional_volumes(maps, voxel_mm=1.0, labels=None, merge_lr=False, **segment_kw) -> dict:
    """Volume (mm^3) of each labelled structure in each map -> volume table.

    maps: integer label maps (X, Y, Z), or float images in [-1, 1] which are
    segmented with segment_phantom(image, **segment_kw) first; as a sequence,
    an (N, X, Y, Z) array/tensor, or a dict {subject: map}. voxel_mm: a float,
    (3,), or one of those per map. labels: {int: name}, default PHANTOM_LABELS;
    label 0 (background) is not reported. V_s = #{voxels == s} * prod(voxel_mm).
    """
    labels = PHANTOM_LABELS if labels is None else labels
    if isinstance(maps, dict):
        subjects, maps = list(maps), list(maps.values())
    else:
        maps = list(maps)
        subjects = [f"subject_{i:03d}" for i in range(len(maps))]
    vox = np.asarray(voxel_mm, dtype=np.float64)
    try:
        vox = np.broadcast_to(vox if vox.ndim == 2 else vox.reshape(1, -1), (len(maps), 3))
    except ValueError:
        raise ValueError(f"voxel_mm must be a float, (3,) or ({len(maps)}, 3); got shape {vox.shape}") from None
    keys = [k for k in sorted(labels) if k != 0]
    counts = np.zeros((len(maps), max(labels) + 1))
    for i, m in enumerate(maps):
        m = m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m)
        if np.issubdtype(m.dtype, np.floating):
            m = segment_phantom(m, **segment_kw)
        found = np.bincount(m.astype(np.int64).ravel())
        stray = [k for k in np.flatnonzero(found) if k not in labels]
        if stray:
            raise ValueError(f"label map {subjects[i]!r} has values {stray} outside the labels {sorted(labels)}")
        counts[i, : found.size] = found
    cols = {labels[k]: counts[:, k] * vox.prod(axis=1) for k in keys}
    table = _volume_table(subjects, cols)
    return merge_left_right(table) if merge_lr else table


def wasserstein1(a, b) -> float:
    """Exact 1-D Wasserstein-1 distance between two samples (sizes may differ).

    W1 = integral |F_a(x) - F_b(x)| dx over the empirical CDFs, evaluated on the
    merged sorted values x_(1) <= ... (the CDFs are constant between them):
    W1 = sum_k |F_a(x_k) - F_b(x_k)| (x_(k+1) - x_(k)).
    """
    a, b = np.sort(np.ravel(a).astype(np.float64)), np.sort(np.ravel(b).astype(np.float64))
    if a.size == 0 or b.size == 0:
        raise ValueError("wasserstein1 needs two non-empty samples")
    x = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(a, x[:-1], side="right") / a.size
    fb = np.searchsorted(b, x[:-1], side="right") / b.size
    return float(np.sum(np.abs(fa - fb) * np.diff(x)))


def cohens_d(a, b, hedges=False) -> float:
    """Effect size d = (mean_a - mean_b) / s_pooled, s_pooled^2 = ((n_a-1) s_a^2 + (n_b-1) s_b^2) / (n_a+n_b-2).

    hedges=True multiplies by Hedges' small-sample factor 1 - 3 / (4 (n_a + n_b) - 9).
    """
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    na, nb = a.size, b.size
    if na < 2 or nb < 2:
        raise ValueError(f"an effect size needs at least 2 values per group, got {na} and {nb}")
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    diff = a.mean() - b.mean()
    d = diff / pooled if pooled > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return d * (1 - 3 / (4 * (na + nb) - 9)) if hedges else d


def permutation_test(a, b, n_permutations=10000, seed=0, batch=2000) -> np.ndarray:
    """Two-sided permutation test of the difference of means, one p per row.

    a: (n_a,) or (S, n_a); b: (n_b,) or (S, n_b) -> p (S,) (float if 1-D).
    Each permutation relabels the pooled n_a + n_b subjects (the same relabelling
    for all S rows); with D = mean_a - mean_b,
    p = (1 + #{k : |D_k| >= |D_obs|}) / (1 + n_permutations).
    Seeded (numpy default_rng(seed)); done as (batch, N) 0/1 masks times the data.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    flat = a.ndim == 1
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape[0] != b.shape[0] or a.shape[1] < 1 or b.shape[1] < 1 or a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"permutation_test needs (S, n_a) and (S, n_b) with n >= 1, got {a.shape} and {b.shape}")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    x = np.concatenate([a, b], axis=1)                       # (S, N)
    na, nb = a.shape[1], b.shape[1]
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


def _as_batch(volumes) -> torch.Tensor:
    """A sequence of volumes or an (N, ...) array/tensor -> float32 tensor (N, X, Y, Z)."""
    if torch.is_tensor(volumes) or isinstance(volumes, np.ndarray):
        x = torch.as_tensor(volumes).float()
    else:
        x = torch.stack([torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).float() for v in volumes])
    while x.ndim > 4 and x.shape[1] == 1:
        x = x[:, 0]                                            # (N, 1, X, Y, Z) -> (N, X, Y, Z)
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
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = g.numel()
        x = F.conv3d(x, g.view(shape))
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


def comparison_report(real, synthetic: dict, out_dir, structures=None, merge_lr=False, n_permutations=10000,
                      seed=0, correction="holm", voxel_mm=1.0, name="volumes") -> dict:
    """Compare real against each synthetic set; write <name>.csv and <name>.png in out_dir.

    real: a volume table, or volumes/label maps for regional_volumes(voxel_mm=...);
    synthetic: {set name: the same}. Each set gets compare_volumes(set, real)
    (difference = synthetic - real; p adjusted across structures within the set).
    The figure has one panel per structure: box plots with the subjects as dots,
    real first, then each set, titled with the adjusted p-values.
    Returns {"csv": path, "figure": path, "table": rows (with a "set" key)}.
    """
    as_table = lambda v: v if isinstance(v, dict) and "volumes" in v else regional_volumes(v, voxel_mm=voxel_mm)
    real = merge_left_right(as_table(real)) if merge_lr else as_table(real)
    sets = {k: merge_left_right(as_table(v)) if merge_lr else as_table(v) for k, v in synthetic.items()}
    if not sets:
        raise ValueError("comparison_report needs at least one synthetic set")
    matched = _matched_structures([real, *sets.values()], structures)
    rows = []
    for k, (set_name, table) in enumerate(sets.items()):
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
        p = ", ".join(f"{r['p_adjusted']:.2g}" for r in rows if r["structure"] == names[1])
        ax.set_title(f"{names[0]}\np_adj: {p}", fontsize=9)
        ax.set_ylabel("mm$^3$")
    fig_path = out_dir / f"{name}.png"
    _atomic_write(fig_path, lambda tmp: fig.savefig(tmp, dpi=100))
    return {"csv": csv_path, "figure": fig_path, "table": rows}


def load_volume_table(source, **segment_kw) -> dict:
    """A volume table from a SynthSeg --vol CSV, or from a folder of NIfTI volumes.

    A folder whose files end in _labels.nii.gz holds label maps (used as they are);
    otherwise each .nii/.nii.gz is an image: rescaled to [-1, 1] with to_model
    (saved files are uint16) and segmented with segment_phantom(**segment_kw).
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
    return regional_volumes(maps, voxel_mm=np.stack(vox), **segment_kw)

# =============================================================================
# 11. Viewing (matplotlib, widgets)
# =============================================================================

# =============================================================================
# 12. Command line
# =============================================================================


# --- evaluate subcommand (section 10); the main parser calls these two ----------


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
    """Run `evaluate`: load every set, comparison_report, print the table; returns the exit code."""
    synthetic = {}
    for spec in args.synthetic:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"evaluate: --synthetic takes NAME=CSV|DIR, got {spec!r}")
        synthetic[name] = load_volume_table(path)
    report = comparison_report(load_volume_table(args.real), synthetic, args.out, structures=args.structures,
                               merge_lr=args.merge_lr, n_permutations=args.permutations, seed=args.seed,
                               correction=args.correction)
    cols = ("set", "structure", "mean_real", "mean_synthetic", "difference", "p", "p_adjusted",
            "cohen_d", "wasserstein")
    print("  ".join(f"{c:>14}" for c in cols))
    for r in report["table"]:
        print("  ".join(f"{r[c]:>14.6g}" if isinstance(r[c], float) else f"{str(r[c]):>14}" for c in cols))
    print(f"wrote {report['csv']} and {report['figure']}")
    return 0
