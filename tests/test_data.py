"""Section 8 (data): manifest, NIfTI I/O, preprocessing, phantoms, datasets, CLI."""
import numpy as np
import pytest
import torch

import ddpm_mini as dm


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


def test_phantom_other_grid_and_voxel_size():
    img, lab = dm.phantom(3, shape=(48, 56, 48))
    assert img.shape == (48, 56, 48)
    coarse = dm.phantom_volumes(lab)  # default 224 / 56 = 4 mm
    fine = dm.phantom_volumes(dm.phantom(3, shape=(96, 112, 96))[1])  # 2 mm
    for name in ("white_matter", "cortex", "skull"):
        assert coarse[name] == pytest.approx(fine[name], rel=0.1), name
