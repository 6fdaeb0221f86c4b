"""Section 8 (data): NIfTI I/O and intensities (docs/methods.md#intensity-conventions), minimal
preprocessing (docs/methods.md#preprocessing), phantoms (docs/methods.md#phantoms), datasets and
augmentation (docs/methods.md#augmentation); and the asset list data_manifest.csv, checked in the
repository alone. The preprocess command: test_cli.py."""
import csv
import pathlib
import re
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import ddpm_mini as dm
from conftest import GRID_CENTRE, HEAD_CENTRE, synthetic_head

ROOT = pathlib.Path(__file__).resolve().parents[1]
HASH = re.compile(r"^(md5:[0-9a-f]{32}|sha256:[0-9a-f]{64})$")


# --- manifest ---------------------------------------------------------------------------------

def _manifest_rows():
    with open(ROOT / "data_manifest.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == dm.MANIFEST_COLUMNS
        return list(reader)


def test_manifest_validates():
    rows = _manifest_rows()
    names = [r["name"] for r in rows]
    assert len(set(names)) == len(names)
    assert set(dm.read_manifest(ROOT / "data_manifest.csv")) == set(names)
    for r in rows:
        assert r["kind"] in dm.MANIFEST_KINDS, r["name"]
        assert r["hash"] == "" or HASH.match(r["hash"]), r["name"]
        assert r["verified"] == ("true" if r["hash"] else "false"), r["name"]
        assert r["size"] == "" or r["size"].isdigit(), r["name"]
        assert r["description"] and r["group"], r["name"]
        if r["kind"] == "source":
            assert r["url"] == r["hash"] == "" and r["group"] == "medforj_training", r["name"]
        else:
            assert r["url"].startswith("https://") and r["license"], r["name"]
    groups = {}
    for r in rows:
        groups.setdefault((r["group"], r["kind"]), []).append(r["name"])
    assert len(groups[("ds000001", "volume")]) == 16
    assert len(groups[("ds000228_adults", "volume")]) == 33
    assert len(groups[("medforj_training", "source")]) == 38
    assert sorted(groups[("medforj", "weights")]) == sorted(f"medforj_{p}" for p in dm.ALL_PREDICTIONS)
    assert "rectified flow" in next(r for r in rows if r["name"] == "medforj_rflow")["description"].lower()
    assert all(r["hash"] == "" and r["verified"] == "false" for r in rows if r["group"] == "medforj")
    # the paper's totals: 38 datasets, 42,506 subjects, 80,675 volumes; requirements spelled out
    counts = [re.search(r"([\d,]+) subjects, ([\d,]+) T1w volumes", r["description"]).groups()
              for r in rows if r["kind"] == "source"]
    assert [sum(int(c[i].replace(",", "")) for c in counts) for i in (0, 1)] == [42506, 80675]
    adni = next(r for r in rows if r["name"] == "train_adni")
    assert "acknowledgement, byline, notice" in adni["description"] and adni["license"].startswith("DUA")
    # every fetchable file has its own url and (where published) its own hash; verified rows have one
    urls = [r["url"] for r in rows if r["url"]]
    hashes = [r["hash"] for r in rows if r["hash"]]
    assert len(set(urls)) == len(urls) and len(set(hashes)) == len(hashes)
    assert all(r["hash"] for r in rows if r["verified"] == "true")
    # read_manifest gives back exactly the file's cells, keyed by name, in file order
    read = dm.read_manifest(ROOT / "data_manifest.csv")
    assert list(read) == names and all(read[r["name"]] == r for r in rows)


# --- NIfTI I/O --------------------------------------------------------------------------------

def test_nifti_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(3.0, 2.0, (12, 14, 10)).astype(np.float32)
    lia = np.array([[-1.2, 0, 0, 40], [0, 0, 1.2, -30], [0, -1.2, 0, 20], [0, 0, 0, 1]])
    path = dm.save_nifti(torch.from_numpy(vol)[None, None], tmp_path / "v.nii.gz", affine=lia)
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.uint16 and img.shape == vol.shape
    assert nib.aff2axcodes(img.affine) == ("L", "I", "A")
    np.testing.assert_allclose(img.affine, lia)
    data, affine = dm.load_nifti(path)
    assert data.dtype == np.float32 and data.min() == 0 and data.max() == 65535
    np.testing.assert_allclose(affine, lia)
    lo, hi = vol.min(), vol.max()  # min-max scaling: x = lo + u / 65535 (hi - lo)
    quantum = (hi - lo) / 65535
    assert np.abs(lo + data * quantum - vol).max() <= quantum / 2 + 1e-5
    # normalize_intensity/to_uint16 give the same quantisation as the file
    x = dm.normalize_intensity(vol)
    assert torch.is_tensor(x) and x.dtype == torch.float32 and x.shape == vol.shape
    assert x.min() == -1 and x.max() == 1
    assert dm.to_uint16(x).dtype == np.uint16
    assert np.abs(dm.to_uint16(x).astype(np.int64) - data).max() <= 1
    assert dm.to_uint16(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0])).tolist() == [0, 0, 32768, 65535, 65535]
    ramp = np.array([-1, -0.5, 0, 0.5, 1], np.float64)  # arrays of any dtype: always uint16
    assert dm.to_uint16(ramp).dtype == np.uint16 and dm.to_uint16(ramp).tolist() == [0, 16384, 32768, 49151, 65535]
    # min-max: x -> 2 (x - min) / (max - min) - 1 for arrays and tensors alike; a constant volume -> -1
    torch.testing.assert_close(dm.normalize_intensity(torch.tensor([2.0, 3.0, 6.0])), torch.tensor([-1.0, -0.5, 1.0]))
    assert dm.normalize_intensity(np.full((2, 2), 7.0)).tolist() == [[-1.0, -1.0], [-1.0, -1.0]]
    default = nib.load(str(dm.save_nifti(np.ones((4, 4, 4)), tmp_path / "c.nii")))
    assert nib.aff2axcodes(default.affine) == ("L", "P", "S") and not np.asarray(default.dataobj).any()


def test_saved_volumes_carry_the_voxel_size_of_their_grid(tmp_path):
    """save_nifti's default affine: 1 mm LPS on IMAGE_SHAPE, 224 / 48 = 4.67 mm on TEACHING_SHAPE (the voxel
    phantom() draws), the grid centre at world 0 (head-centred, as a preprocessed scan), qform = sform with
    code 2 (aligned); so a teaching-grid sample read back by load_volume_table (the evaluate command) gets
    volumes on the phantoms' scale, not 1 mm voxels' (100x too small), and opens in a viewer at its size."""
    centre = lambda affine, shape: affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]  # noqa: E731
    np.testing.assert_array_equal(dm.grid_affine(dm.IMAGE_SHAPE)[:3, :3], dm.LPS_AFFINE[:3, :3])
    np.testing.assert_allclose(dm.grid_affine(dm.IMAGE_SHAPE)[:3, 3], [95.5, 111.5, -95.5])
    v = 224 / 48
    np.testing.assert_allclose(dm.grid_affine(dm.TEACHING_SHAPE), [[-v, 0, 0, 19.5 * v], [0, -v, 0, 23.5 * v],
                                                                   [0, 0, v, -19.5 * v], [0, 0, 0, 1]])
    np.testing.assert_allclose(dm.grid_affine((10, 12, 10), voxel_mm=2.0)[:3, :3], np.diag([-2.0, -2, 2]))
    for shape in (dm.IMAGE_SHAPE, dm.TEACHING_SHAPE, (10, 12, 10)):
        np.testing.assert_allclose(centre(dm.grid_affine(shape), shape), 0, atol=1e-9)
    image, labels = dm.phantom(7, dm.TEACHING_SHAPE)
    img = nib.load(str(dm.save_nifti(image, tmp_path / "p.nii.gz")))
    np.testing.assert_allclose(img.header.get_zooms(), [224 / 48] * 3, rtol=1e-6)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_allclose(centre(img.affine, dm.TEACHING_SHAPE), 0, atol=1e-4)
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 2
    np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-4)
    coarse = nib.load(str(dm.save_nifti(image[:16, :16, :16], tmp_path / "other" / "c.nii.gz", voxel_mm=224 / 48)))
    np.testing.assert_allclose(coarse.header.get_zooms(), [224 / 48] * 3, rtol=1e-6)  # the trained grid's voxel
    read = dm.load_volume_table(tmp_path)
    for name in ("white_matter", "cortex", "lateral_ventricles"):
        truth = dm.phantom_volumes(labels)[name]
        assert read["volumes"][name][0] == pytest.approx(truth, rel=0.05), name   # the segmenter is exact here


# --- preprocess -------------------------------------------------------------------------------

def _world(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


@pytest.mark.parametrize("codes, zooms", [("RAS", (1, 1, 1)), ("LIA", (1, 1, 1)), ("PSR", (1, 1, 1)),
                                          ("LPS", (0.8, 0.8, 0.8)), ("ASL", (1.0, 1.5, 1.2))])
def test_preprocess_orientations_and_voxel_sizes(codes, zooms):
    img, landmark = synthetic_head(codes, zooms)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dm.preprocess(img)
    assert len([w for w in caught if "1.2 mm" in str(w.message)]) == (max(zooms) > 1.2)
    data = np.asarray(out.dataobj)
    assert data.shape == dm.IMAGE_SHAPE and data.dtype == np.uint16
    assert data.min() == 0 and data.max() == 65535
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
    np.testing.assert_allclose(out.affine[:3, :3], np.diag([-1.0, -1.0, 1.0]))
    np.testing.assert_allclose(out.header.get_zooms(), (1, 1, 1))
    assert int(out.header["qform_code"]) == int(out.header["sform_code"]) == int(img.header["sform_code"]) > 0
    # the landmark lands at the voxel the output affine says (world-space consistency)
    found = np.argwhere(data > 40000).mean(0)
    assert np.abs(_world(out.affine, found) - landmark).max() < 0.5
    # the head (foreground) is centred on the grid, and its centre is where the input's was
    head = np.argwhere(data > 3000).mean(0)
    assert np.abs(head - GRID_CENTRE).max() < 2
    assert np.abs(dm._head_centre(data) - GRID_CENTRE).max() < 1.5  # what the preprocess command reports
    assert np.abs(_world(out.affine, head) - HEAD_CENTRE).max() < 2
    if zooms == (1, 1, 1):  # a 1 mm input is copied voxel for voxel, not interpolated
        src = np.asarray(img.dataobj)
        m = np.linalg.inv(img.affine) @ out.affine
        np.testing.assert_allclose(m[:3, :3], np.round(m[:3, :3]), atol=1e-9)
        np.testing.assert_allclose(m[:3, 3], np.round(m[:3, 3]), atol=1e-6)
        lo, hi = np.percentile(src, [0.1, 99.9])
        ijk = np.random.default_rng(1).integers(0, dm.IMAGE_SHAPE, (500, 3))
        pqr = np.round(ijk @ m[:3, :3].T + m[:3, 3]).astype(int)
        inside = ((pqr >= 0) & (pqr < src.shape)).all(1)
        assert inside.sum() > 200
        expect = np.round(np.clip((src[tuple(pqr[inside].T)] - lo) / (hi - lo), 0, 1) * 65535)
        assert np.abs(data[tuple(ijk[inside].T)] - expect).max() <= 1


def test_preprocess_keeps_the_inputs_world_and_says_so(tmp_path):
    """The output's qform and sform carry the input's world (its sform code, else its qform code, else
    1: scanner), so the preprocessed scan overlays the original in a viewer."""
    img, _ = synthetic_head("RAS")
    for qcode, scode, want in ((1, 0, 1), (0, 0, 1), (1, 4, 4)):
        src = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
        src.set_qform(img.affine, qcode)
        src.set_sform(img.affine, scode)
        out = dm.preprocess(src)
        assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (want, want), (qcode, scode)
        np.testing.assert_allclose(out.get_qform(), out.affine, atol=1e-4)


def test_saved_geometry_reads_the_same_in_itk(tmp_path):
    """SimpleITK (ITK-SNAP's and Slicer's reader) sees save_nifti's geometry as nibabel does: spacing =
    zooms, origin = the affine's translation in ITK's LPS world (x, y negated), axes along +L, +P, +S."""
    sitk = pytest.importorskip("SimpleITK")
    for shape, voxel in ((dm.TEACHING_SHAPE, None), ((16, 20, 16), 2.5)):
        path = dm.save_nifti(dm.phantom(1, shape)[0], tmp_path / f"g{shape[0]}.nii.gz", voxel_mm=voxel)
        affine, image = nib.load(str(path)).affine, sitk.ReadImage(str(path))
        np.testing.assert_allclose(image.GetSpacing(), nib.load(str(path)).header.get_zooms(), rtol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), affine[:3, 3] * [-1, -1, 1], atol=1e-3)
        np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), np.eye(3), atol=1e-6)
        centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in shape])
        np.testing.assert_allclose(centre, 0, atol=1e-3)  # head-centred: the grid centre at world 0


def test_warp_index_convention():
    vol = torch.from_numpy(np.random.default_rng(2).normal(size=(5, 6, 7)).astype(np.float32))
    # output voxel (i, j, k) reads input voxel (k - 1, 5 - j, i): a permutation, a flip, a shift
    m = np.array([[0, 0, 1, -1], [0, -1, 0, 5], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    for mode in ("bilinear", "nearest"):
        out = dm._warp(vol[None], m, (7, 6, 8), mode=mode)[0]
        for i, j, k in np.ndindex(7, 6, 8):
            p, q, r = k - 1, 5 - j, i
            want = vol[p, q, r] if 0 <= p < 5 and 0 <= r < 7 else 0.0
            assert abs(out[i, j, k] - want) < 1e-5, (mode, i, j, k)
    half = np.eye(4)
    half[0, 3] = 0.5  # half a voxel along axis 0: trilinear gives the mean of the two neighbours
    out = dm._warp(vol, half, (4, 6, 7))
    torch.testing.assert_close(out, (vol[:-1] + vol[1:]) / 2, atol=1e-5, rtol=0)


def test_preprocess_mask_centres_the_crop_and_accepts_paths(tmp_path):
    img, _ = synthetic_head("LIA")
    world = np.tensordot(img.affine[:3, :3], np.indices(img.shape, dtype=np.float32), 1) \
        + img.affine[:3, 3, None, None, None]
    centre = np.array([-20.0, 10.0, 25.0])
    mask = (((world - centre[:, None, None, None]) / 30.0) ** 2).sum(0) <= 1
    nib.save(img, str(tmp_path / "head.nii.gz"))
    out = dm.preprocess(tmp_path / "head.nii.gz", mask=mask.astype(np.uint8))
    landed = np.linalg.solve(out.affine[:3, :3], centre - out.affine[:3, 3])
    assert np.abs(landed - GRID_CENTRE).max() <= 0.75  # within the snap to the input lattice


def test_preprocess_rejects_bad_input():
    img, _ = synthetic_head("RAS", (4, 4, 4))
    data, affine = np.asarray(img.dataobj), img.affine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = dm.preprocess(nib.Nifti1Image(data[..., None], affine))  # trailing singleton: fine
    assert out.shape == dm.IMAGE_SHAPE
    with pytest.raises(ValueError, match="3-D"):
        dm.preprocess(nib.Nifti1Image(np.stack([data, data], -1), affine))
    with pytest.raises(ValueError, match="constant"):
        dm.preprocess(nib.Nifti1Image(np.full((20, 20, 20), 7.0, np.float32), np.eye(4)))
    bad = data.copy()
    bad[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        dm.preprocess(nib.Nifti1Image(bad, affine))
    with pytest.raises(ValueError, match="mask shape"):
        dm.preprocess(img, mask=np.ones((5, 5, 5)))
    with pytest.raises(ValueError, match="empty"):
        dm.preprocess(img, mask=np.zeros(data.shape))
    with pytest.raises(ValueError, match="affine"):
        dm.preprocess(data)


# --- phantoms ---------------------------------------------------------------------------------
def test_phantom_is_deterministic_per_seed_and_varies_across_seeds():
    a_img, a_lab = dm.phantom(7)
    b_img, b_lab = dm.phantom(7)
    assert a_img.shape == a_lab.shape == (64, 64, 64)
    assert a_img.dtype == np.float32 and a_lab.dtype == np.uint8
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    vols = [dm.phantom_volumes(dm.phantom(s)[1]) for s in range(4)]
    for name in ("white_matter", "cortex", "csf", "lateral_ventricles"):
        values = [v[name] for v in vols]
        assert len(set(values)) == 4, (name, values)  # every seed a different anatomy


def test_phantom_labels_volumes_and_contrast():
    img, lab = dm.phantom(0)
    assert set(np.unique(lab)) == set(dm.PHANTOM_LABELS)  # every structure present
    assert img.min() >= -1 and img.max() <= 1
    vox = 224 / 64
    vols = dm.phantom_volumes(lab)
    assert set(vols) == {n for k, n in dm.PHANTOM_LABELS.items() if k}
    for k, name in dm.PHANTOM_LABELS.items():
        if k:
            assert vols[name] == pytest.approx((lab == k).sum() * vox ** 3)
    assert dm.phantom_volumes(lab, voxel_mm=1.0)["cortex"] == (lab == 4).sum()
    # plausible relative sizes: WM and cortex the largest brain structures, deep gray small
    brain = ("cortex", "white_matter", "lateral_ventricles", "left_thalamus", "right_thalamus",
             "left_putamen", "right_putamen")
    assert sorted(brain, key=vols.get)[-2:] in (["cortex", "white_matter"], ["white_matter", "cortex"])
    for name in brain[3:]:
        assert 1_000 < vols[name] < 15_000 and vols[name] / vox ** 3 >= 20, (name, vols[name])
    assert 300_000 < vols["cortex"] + vols["white_matter"] < 1_600_000
    # T1 contrast of the tissue means (noise and bias included)
    mean = {n: img[lab == k].mean() for k, n in dm.PHANTOM_LABELS.items()}
    assert mean["white_matter"] > mean["left_thalamus"] > mean["left_putamen"] > mean["cortex"] > mean["csf"]
    assert mean["csf"] > mean["skull"] and mean["scalp"] > mean["cortex"] and mean["background"] < -0.95
    for k, n in dm.PHANTOM_LABELS.items():
        assert abs(mean[n] - dm.PHANTOM_INTENSITIES[k]) < 0.1, n


def test_phantom_sides_atrophy_and_pose():
    _, lab = dm.phantom(1, rotation_deg=0, shift_mm=0)
    left, right = np.argwhere(lab == 7).mean(0), np.argwhere(lab == 8).mean(0)
    assert left[0] > 31.5 > right[0]  # LPS: index along axis 0 grows to the left
    assert abs(left[0] - 31.5 - (31.5 - right[0])) < 0.5  # mirror images without pose
    young = dm.phantom_volumes(dm.phantom(2, atrophy=0.0)[1])
    old = dm.phantom_volumes(dm.phantom(2, atrophy=1.0)[1])
    assert old["lateral_ventricles"] > 2 * young["lateral_ventricles"]
    assert old["csf"] > young["csf"] and old["white_matter"] < young["white_matter"]
    assert old["skull"] == young["skull"]  # only atrophy changed
    with pytest.raises(ValueError, match="allowed"):
        dm.phantom(0, atrophy_level=1)


def test_phantom_cortex_is_folded():
    def sulci(labels):  # voxels a 7 mm morphological closing adds to the brain: 0 for a convex brain
        brain = torch.from_numpy((labels >= 4).astype(np.float32))[None, None]
        closed = -torch.nn.functional.max_pool3d(-torch.nn.functional.max_pool3d(brain, 5, 1, 2), 5, 1, 2)
        return float((closed - brain).sum() / brain.sum())
    assert sulci(dm.phantom(0, fold_amplitude=0)[1]) == 0
    assert sulci(dm.phantom(0)[1]) > 0.01 and sulci(dm.phantom(0, fold_amplitude=0.12)[1]) > 0.03


def test_phantom_other_grid_and_voxel_size():
    img, lab = dm.phantom(3, shape=(48, 56, 48))
    assert img.shape == (48, 56, 48)
    coarse = dm.phantom_volumes(lab)  # default 224 / 56 = 4 mm
    fine = dm.phantom_volumes(dm.phantom(3, shape=(96, 112, 96))[1])  # 2 mm
    for name in ("white_matter", "cortex", "skull"):
        assert coarse[name] == pytest.approx(fine[name], rel=0.1), name


# --- datasets and augmentation ----------------------------------------------------------------

def test_augment_shape_range_flip_and_determinism():
    x = torch.from_numpy(dm.phantom(0, shape=(32, 40, 32))[0])[None]            # (1, D, H, W)
    assert torch.equal(dm.augment(x, flip=True, degrees=0, shift=0, scale=0), x.flip(-3))
    assert torch.equal(dm.augment(x, flip=False, degrees=0, shift=0, scale=0), x)
    flips = [torch.equal(dm.augment(x, torch.Generator().manual_seed(s), degrees=0, shift=0, scale=0),
                         x.flip(-3)) for s in range(40)]
    assert 8 < sum(flips) < 32
    y = dm.augment(x, torch.Generator().manual_seed(5))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1
    assert torch.equal(y, dm.augment(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(y, dm.augment(x, torch.Generator().manual_seed(6)))
    assert 0 < (y - x).abs().mean() < 0.3 and abs(y.mean() - x.mean()) < 0.05  # small, not scrambled
    batch = dm.augment(torch.stack([x, x]), torch.Generator().manual_seed(5))   # leading axes share it
    assert torch.equal(batch[0], batch[1]) and torch.allclose(batch[0], y, atol=1e-6)


def test_augment_applies_its_affine_with_probability_p_affine():
    """p_affine = 1 (the kit) always warps, 0 never (flip only), 0.5 (the authors' recipe) about half the
    time, from the draw after the kit's eight (so p_affine = 1 gives the same volumes as before it existed)."""
    x = torch.from_numpy(dm.phantom(0, shape=(16, 20, 16))[0])[None]
    def warped(seed, p):
        y = dm.augment(x, torch.Generator().manual_seed(seed), degrees=10, shift=5, scale=0, p_affine=p)
        return not (torch.equal(y, x) or torch.equal(y, x.flip(-3)))
    assert all(warped(s, 1.0) for s in range(20)) and not any(warped(s, 0.0) for s in range(20))
    assert 60 < sum(warped(s, 0.5) for s in range(200)) < 140
    u = torch.rand(9, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert warped(7, 0.5) == bool(u[8] < 0.5)
    with pytest.raises(ValueError, match="p_affine is a probability"):
        dm.augment(x, p_affine=1.5)


def test_volume_dataset_recursive_search_and_augment_options(tmp_path):
    """recursive=True finds *.nii* in subfolders too (the authors' rglob); augment= a dict passes augment()'s
    keywords (here: no affine, so only flips)."""
    vol = dm.phantom(1, shape=(16, 16, 16))[0]
    dm.save_nifti(vol, tmp_path / "top.nii.gz")
    dm.save_nifti(vol, tmp_path / "site" / "sub-01" / "anat.nii.gz")
    assert [f.name for f in dm.VolumeDataset(tmp_path).files] == ["top.nii.gz"]
    assert [f.relative_to(tmp_path).as_posix() for f in dm.VolumeDataset(tmp_path, recursive=True).files] == [
        "site/sub-01/anat.nii.gz", "top.nii.gz"]
    ds = dm.VolumeDataset(tmp_path, augment=dict(degrees=0, shift=0, scale=0), seed=1)
    plain = dm.VolumeDataset(tmp_path)[0]
    reads = [ds[0] for _ in range(8)]                                           # each read draws anew
    assert all(torch.equal(x, plain) or torch.equal(x, plain.flip(-3)) for x in reads)
    assert 0 < sum(torch.equal(x, plain) for x in reads) < 8


def test_volume_dataset(tmp_path):
    folder = tmp_path / "vols"
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    vol = dm.phantom(0, shape=(96, 112, 96))[0]                                 # 2 mm voxels
    dm.save_nifti(vol, folder / "a.nii.gz", affine=lps)
    dm.save_nifti(vol[::-1, ::-1].copy(), folder / "b.nii", affine=ras)         # same head, RAS
    (folder / "notes.txt").write_text("not an image")
    ds = dm.VolumeDataset(folder, voxel_mm=4)
    assert len(ds) == 2 and [f.name for f in ds.files] == ["a.nii.gz", "b.nii"]
    a, b = ds[0], ds[1]
    assert a.shape == (1, 48, 56, 48) and a.dtype == torch.float32
    assert a.min() == -1 and a.max() == 1
    assert torch.equal(a, b)                                                    # reoriented to LPS
    ref = dm.normalize_intensity(torch.nn.functional.avg_pool3d(torch.from_numpy(vol)[None, None], 2)[0])
    assert (a - ref).abs().max() < 2 / 65535 * 2 + 1e-5                           # area pooling
    assert dm.VolumeDataset([folder / "b.nii"], size=(32, 40, 24))[0].shape == (1, 32, 40, 24)
    # anisotropic voxels (4, 2, 1) mm in LPS order, stored with axes P, S, L
    psl = np.array([[0, 0, -4.0, 0], [-2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    small = np.random.default_rng(0).random((20, 30, 40)).astype(np.float32)    # LPS (L-R, P-A, I-S)
    dm.save_nifti(small.transpose(1, 2, 0), tmp_path / "psl.nii.gz", affine=psl)
    assert dm.VolumeDataset(tmp_path / "psl.nii.gz", voxel_mm=4)[0].shape == (1, 20, 15, 10)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch.shape == (2, 1, 48, 56, 48)
    aug1, aug2 = (dm.VolumeDataset(folder, voxel_mm=4, augment=True, seed=3) for _ in range(2))
    first = aug1[0]
    assert torch.equal(first, aug2[0])                                          # same seed, same draws
    assert not torch.equal(first, aug1[0])                                      # the next epoch differs
    assert first.min() >= -1 and first.max() <= 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no NIfTI"):
        dm.VolumeDataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="not both"):
        dm.VolumeDataset(folder, size=(8, 8, 8), voxel_mm=4)


def test_phantom_dataset():
    ds = dm.PhantomDataset(n=3, shape=(32, 32, 32), seed=10)
    assert len(ds) == 3
    np.testing.assert_array_equal(ds[2][0].numpy(), dm.phantom(12, shape=(32, 32, 32))[0])
    batches = list(torch.utils.data.DataLoader(ds, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 1, 32, 32, 32), (1, 1, 32, 32, 32)]
    assert torch.equal(batches[1][0], ds[2])
    with pytest.raises(IndexError):
        ds[3]
    endless = dm.PhantomDataset(shape=(32, 32, 32), augment=True)
    with pytest.raises(TypeError):
        len(endless)
    items = iter(torch.utils.data.DataLoader(endless, batch_size=2))
    b0, b1 = next(items), next(items)
    assert b1.shape == (2, 1, 32, 32, 32) and b1.dtype == torch.float32
    assert b0.min() >= -1 and b1.max() <= 1 and not torch.equal(b0, b1)
    assert torch.equal(b1[1], dm.PhantomDataset(shape=(32, 32, 32), augment=True)[3])  # deterministic


def test_a_truncated_nifti_is_a_clear_error(tmp_path, capsys):
    path = dm.save_nifti(dm.phantom(0, (16, 16, 16))[0], tmp_path / "full.nii.gz")
    data = path.read_bytes()
    for cut in (200, len(data) // 2):                           # inside the header; inside the voxels
        (tmp_path / "cut.nii.gz").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut\.nii\.gz: cannot read this NIfTI file \(truncated or corrupt"):
            dm.load_nifti(tmp_path / "cut.nii.gz")
    assert dm.main(["preprocess", str(tmp_path / "cut.nii.gz"), str(tmp_path / "out.nii.gz")]) == 1
    assert "cannot read this NIfTI file" in capsys.readouterr().err and not (tmp_path / "out.nii.gz").exists()


def test_fixed_phantom_parameters_are_range_checked():
    dm.phantom(0, (16, 16, 16), rotation_deg=[1.0, -2.0, 3.0], atrophy=1.0, noise_sd=0.0)      # allowed
    for params, message in ((dict(atrophy=5), r"atrophy=5 is outside what the anatomy allows, \[0, 1\]"),
                            (dict(head_scale=-1), r"head_scale=-1 is outside .* \[0\.8, 1\.2\]"),
                            (dict(rotation_deg=[0, 0]), r"rotation_deg=\[0, 0\] .*\(one number or three\)"),
                            (dict(noise_sd=float("nan")), "noise_sd=nan is outside")):
        with pytest.raises(ValueError, match=message):
            dm.phantom(0, (16, 16, 16), **params)
