"""Section 11 (viewing): orthogonal slices of LPS volumes (docs/methods.md#intensity-conventions),
the static figures and PNGs, and the viewer with and without widgets. Plain Python here (no
IPython kernel): view() returns its static Figure unless with_widgets (conftest.py) stands in."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm_mini as dm

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (6, 8, 10)  # (D, H, W) = (L-R, P-A, I-S)


def marked(index=(1, 2, 3)):
    """A volume of zeros with a single 1 at `index`."""
    v = np.zeros(SHAPE, np.float32)
    v[index] = 1.0
    return v


def test_orthogonal_slices_layout():
    """imshow(origin="lower") layout: superior up in coronal and sagittal, anterior up in axial, the
    subject's left on the image's right (radiological) in axial and coronal."""
    i, j, k = 1, 2, 3
    planes = dm.orthogonal_slices(marked((i, j, k)), (i, j, k))
    assert list(planes) == ["axial", "coronal", "sagittal"]
    D, H, W = SHAPE
    assert planes["axial"].shape == (H, D) and planes["coronal"].shape == (W, D) and planes["sagittal"].shape == (W, H)
    # where the marked voxel shows up: (row from the bottom, column from the left)
    assert [tuple(np.argwhere(p)[0]) for p in planes.values()] == [(H - 1 - j, i), (k, i), (k, H - 1 - j)]
    # a voxel further left is further right in axial and coronal; a more anterior one (smaller P index) higher in axial
    assert np.argwhere(dm.orthogonal_slices(marked((4, j, k)), (4, j, k))["axial"])[0][1] > i
    assert np.argwhere(dm.orthogonal_slices(marked((i, 0, k)), (i, 0, k))["axial"])[0][0] > H - 1 - j
    # ... and further right in sagittal (anterior on the right)
    assert np.argwhere(dm.orthogonal_slices(marked((i, 0, k)), (i, 0, k))["sagittal"])[0][1] > H - 1 - j
    # default index: the centre voxel; a (1, 1, D, H, W) tensor is the same volume
    v = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    centre = dm.orthogonal_slices(v, tuple(s // 2 for s in SHAPE))
    for name, plane in dm.orthogonal_slices(torch.from_numpy(v)[None, None]).items():
        np.testing.assert_array_equal(plane, centre[name])
    with pytest.raises(ValueError, match="3-D"):
        dm.orthogonal_slices(np.zeros((2, 4, 4, 4)))


def test_show_slices_and_save_slices_png(tmp_path):
    v = np.random.default_rng(1).random(SHAPE).astype(np.float32) * 2 - 1
    fig = dm.show_slices(v, title="a volume", vmin=-2, vmax=2)
    assert [ax.get_title() for ax in fig.axes] == ["axial (A up, L right)", "coronal (S up, L right)",
                                                   "sagittal (S up, A right)"]  # each panel states its layout
    assert fig._suptitle.get_text() == "a volume"
    for ax, plane in zip(fig.axes, dm.orthogonal_slices(v).values()):
        image = ax.get_images()[0]
        np.testing.assert_array_equal(image.get_array(), plane)
        assert image.get_clim() == (-2, 2) and image.origin == "lower"
    default = dm.show_slices(v, index=(0, 0, 0))  # the volume's own range by default
    assert default.axes[0].get_images()[0].get_clim() == (float(v.min()), float(v.max()))
    again = dm.show_slices(v, fig=fig)  # redraws into the figure it is given
    assert again is fig and len(fig.axes) == 3
    path = dm.save_slices_png(torch.from_numpy(v), tmp_path / "out" / "v.png", title="t")
    assert path == tmp_path / "out" / "v.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["v.png"]  # written atomically, nothing left over


def test_viewers_without_widgets():
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert len(dm.show_volumes({"a": x[0], "b": x[1, 0].numpy()}).axes) == 6
    assert len(dm.view(x[:1]).axes) == 3                                # no IPython here: the static figure


def test_widgets_inside_ipython_unless_static_figures_are_asked_for(monkeypatch):
    ipywidgets = pytest.importorskip("ipywidgets")
    import IPython
    monkeypatch.delenv("DDPM_MINI_STATIC", raising=False)
    monkeypatch.setattr(IPython, "get_ipython", lambda: object())     # as inside a kernel
    assert dm._widgets() is ipywidgets
    monkeypatch.setenv("DDPM_MINI_STATIC", "1")                         # rendered previews, HTML/PDF export
    assert dm._widgets() is None
    x = torch.zeros(1, 1, 16, 16, 16)
    assert len(dm.view(x).axes) == 3                                    # the static figure
    check = "import ddpm_mini as dm, tqdm.std; print(dm.tqdm is tqdm.std.tqdm)"  # text progress bars too
    for value, expected in (("1", "True"), ("0", "False")):
        run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                             env={**os.environ, "DDPM_MINI_STATIC": value}, cwd=ROOT)
        assert run.stdout.strip() == expected, run.stderr


def test_show_volumes_rows_and_ranges(tmp_path):
    a = np.random.default_rng(2).random(SHAPE).astype(np.float32)
    b = torch.from_numpy(a * 10 - 3)[None]
    fig = dm.show_volumes({"a": a, "b": b}, index=(1, 1, 1), title="two")
    assert [ax.get_title() for ax in fig.axes] == [f"{n}: {dm.PLANE_TITLES[p]}" for n in "ab" for p in ("axial", "coronal", "sagittal")]
    assert fig.axes[0].get_images()[0].get_clim() == (float(a.min()), float(a.max()))      # each row its own range
    assert fig.axes[3].get_images()[0].get_clim() == (float(b.min()), float(b.max()))
    np.testing.assert_array_equal(fig.axes[4].get_images()[0].get_array(), dm.orthogonal_slices(b, (1, 1, 1))["coronal"])
    # view() takes a NIfTI path too
    path = dm.save_nifti(a, tmp_path / "a.nii.gz")
    assert [ax.get_title() for ax in dm.view(path, title="file").axes] == list(dm.PLANE_TITLES.values())


def test_view_with_widgets_redraws_on_its_sliders(with_widgets):
    widgets, drawn = with_widgets
    v = np.random.default_rng(3).random(SHAPE).astype(np.float32)
    box = dm.view(torch.from_numpy(v)[None, None], title="v")
    assert isinstance(box, widgets.VBox)
    sliders = box.children[0].children
    assert [(s.description, s.value, s.max) for s in sliders] == [("L-R", 3, 5), ("P-A", 4, 7), ("I-S", 5, 9)]
    assert len(drawn) == 1 and len(drawn[-1].axes) == 3
    sliders[2].value = 7
    assert len(drawn) == 2
    np.testing.assert_array_equal(drawn[-1].axes[0].get_images()[0].get_array(), dm.orthogonal_slices(v, (3, 4, 7))["axial"])
    assert drawn[-1].axes[0].get_images()[0].get_clim() == (float(v.min()), float(v.max()))  # one range for all slices
