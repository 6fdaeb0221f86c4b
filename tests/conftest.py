"""Shared test helpers, defined once: U-Net configurations, servers and ports, manifests, synthetic
heads, SynthSeg CSVs and phantom folders, the repository address. Test files import the plain helpers with
`from conftest import ...`; the fixtures (http_server, closed_port, standin_weights, one_thread,
with_widgets) pytest finds by name."""
import csv
import functools
import http.server
import pathlib
import re
import socket
import threading

import nibabel as nib
import numpy as np
import pytest
import torch

import ddpm_mini as dm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def repository(root=ROOT) -> str:
    """The repository address: pyproject.toml's [project.urls] Repository, the one source of truth
    (tests/set_repo_url.py copies it into README, the notebooks and the manifest)."""
    text = (pathlib.Path(root) / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        return re.search(r'^Repository\s*=\s*"([^"]+)"', text, re.M).group(1)
    return tomllib.loads(text)["project"]["urls"]["Repository"]


# --- U-Net configurations ------------------------------------------------------------------------

#: A small U-Net that exercises every option: per-level res blocks and heads,
#: attention on two levels, several in/out channels.
SMALL_UNET = dict(spatial_dims=3, in_channels=2, out_channels=3, channels=(8, 16, 24),
                  attention_levels=(False, True, True), num_res_blocks=(1, 2, 3),
                  num_head_channels=(4, 4, 8), norm_num_groups=4)

#: The smallest useful model for sampler and CLI tests.
TINY_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16),
                 attention_levels=(False, True), num_res_blocks=1, num_head_channels=4, norm_num_groups=4)

#: No attention, two levels: the fastest U-Net that still learns 16^3 phantoms in 20 steps.
MICRO_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                  num_res_blocks=1, num_head_channels=4, norm_num_groups=4)


def randomize(model, seed=0, scale=0.05):
    """Give every parameter random values (MONAI zero-initialises some convolutions,
    which would hide wiring mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """On a busy 2-core machine two torch threads can be 50x slower than one (OpenMP spin-waits);
    the numbers are the same either way. Training and CLI modules use it for all their tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- Network: a loopback server, a closed port ---------------------------------------------------


def free_port():
    """A loopback port nothing listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def closed_port():
    """A loopback port with nothing listening (connections are refused at once)."""
    return free_port()


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/'www' on 127.0.0.1; yields (folder, base_url)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- Weights and manifests -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def standin_weights(tmp_path_factory):
    """One stand-in MedForj file (~165 MB): random weights of UNet(**MEDFORJ_UNET) as a plain
    safetensors state dict, like the published files. Made once per session."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = dm.UNet(**dm.MEDFORJ_UNET)
    path = tmp_path_factory.mktemp("standin") / "standin.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_manifest(path, rows, encoding="utf-8"):
    """Write a data_manifest.csv (every MANIFEST_COLUMNS column; missing cells empty)."""
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=dm.MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows({c: row.get(c, "") for c in dm.MANIFEST_COLUMNS} for row in rows)
    return path


# --- Synthetic heads for preprocessing -----------------------------------------------------------

#: The preprocessed grid's centre in voxel indices, (95.5, 111.5, 95.5).
GRID_CENTRE = (np.array(dm.IMAGE_SHAPE) - 1) / 2
#: synthetic_head's ellipsoid: centre and semi-axes in world (RAS) mm.
HEAD_CENTRE, HEAD_SEMI = np.array([3.0, -8.0, 10.0]), np.array([68.0, 88.0, 75.0])
_STEP = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


def synthetic_head(codes="RAS", zooms=(1.0, 1.0, 1.0), landmark=(25.0, -30.0, 30.0)):
    """A noisy ellipsoid head (brighter core) in a 150 x 190 x 166 mm box around world 0, stored
    with axis codes `codes` and voxel sizes `zooms`, plus a 24 mm cube of 1000 at `landmark`
    (world mm; > 0.1 % of the voxels, so it alone reaches the 99.9 percentile).
    Returns (nibabel image, world centre (3,) of the cube's voxels)."""
    rot = np.stack([_STEP[c] for c in codes], 1) * np.asarray(zooms, float)   # voxel step -> mm
    extent = np.array([150.0, 190.0, 166.0])[np.abs(rot).argmax(0)]
    shape = tuple(int(np.ceil(e / z)) for e, z in zip(extent, zooms))
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rot, -rot @ ((np.array(shape) - 1) / 2)
    world = np.tensordot(rot, np.indices(shape, dtype=np.float32), 1) + affine[:3, 3, None, None, None]
    r2 = (((world - HEAD_CENTRE[:, None, None, None]) / HEAD_SEMI[:, None, None, None]) ** 2).sum(0)
    data = 100.0 * (r2 <= 1) + 60.0 * (r2 <= 0.6) + np.random.default_rng(0).normal(0, 4, shape)
    cube = (np.abs(world - np.array(landmark)[:, None, None, None]) <= 12).all(0)
    data[cube] = 1000.0
    return nib.Nifti1Image(data.astype(np.float32), affine), world[:, cube].mean(1)


# --- SynthSeg --vol CSVs, built from the structure list (no real subjects) ------------------------

SYNTHSEG2 = [
    "total intracranial", "left cerebral white matter", "left cerebral cortex", "left lateral ventricle",
    "left inferior lateral ventricle", "left cerebellum white matter", "left cerebellum cortex",
    "left thalamus", "left caudate", "left putamen", "left pallidum", "3rd ventricle", "4th ventricle",
    "brain-stem", "left hippocampus", "left amygdala", "csf", "left accumbens area", "left ventral DC",
    "right cerebral white matter", "right cerebral cortex", "right lateral ventricle",
    "right inferior lateral ventricle", "right cerebellum white matter", "right cerebellum cortex",
    "right thalamus", "right caudate", "right putamen", "right pallidum", "right hippocampus",
    "right amygdala", "right accumbens area", "right ventral DC",
]
SYNTHSEG1 = [s for s in SYNTHSEG2 if s not in ("total intracranial", "csf")]
DK = ("bankssts caudalanteriorcingulate caudalmiddlefrontal cuneus entorhinal fusiform inferiorparietal "
      "inferiortemporal isthmuscingulate lateraloccipital lateralorbitofrontal lingual medialorbitofrontal "
      "middletemporal parahippocampal paracentral parsopercularis parsorbitalis parstriangularis pericalcarine "
      "postcentral posteriorcingulate precentral precuneus rostralanteriorcingulate rostralmiddlefrontal "
      "superiorfrontal superiorparietal superiortemporal supramarginal frontalpole temporalpole "
      "transversetemporal insula").split()
PARC = [f"ctx-lh-{p}" for p in DK] + [f"ctx-rh-{p}" for p in DK]


def synthseg_csv(path, structures, subjects, seed=0, thalamus_mm3=7000.0):
    """Write a SynthSeg-style CSV with made-up volumes; returns the (subjects, S) value array."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(500, 5000, size=(len(subjects), len(structures))).round(3)
    for j, s in enumerate(structures):
        if s.endswith("thalamus"):
            values[:, j] = rng.normal(thalamus_mm3, 500, len(subjects)).round(3)
    lines = [",".join(["subject", *structures])]
    lines += [",".join([subj, *map(str, row)]) for subj, row in zip(subjects, values)]
    path.write_text("\n".join(lines) + "\n")
    return values


# --- Phantom folders ---------------------------------------------------------------------------


def phantom_affine(shape):
    """LPS affine with phantom()'s default voxel size for this grid (dm.grid_affine, save_nifti's default)."""
    return dm.grid_affine(shape)


def write_phantom_folder(folder, seeds, labels=False, shape=dm.TEACHING_SHAPE, **params):
    """Phantom images (as save_nifti writes them: uint16) or *_labels.nii.gz label maps (each with
    its image beside it, which load_volume_table must ignore), 4 mm voxels. Returns the true
    phantom_volumes of each."""
    truth = []
    for s in seeds:
        image, lab = dm.phantom(s, shape=shape, **params)
        truth.append(dm.phantom_volumes(lab))
        if labels:
            nib.save(nib.Nifti1Image(lab, phantom_affine(shape)), str(folder / f"p{s:02d}_labels.nii.gz"))
        dm.save_nifti(image, folder / f"p{s:02d}.nii.gz", affine=phantom_affine(shape))
    return truth


# --- Widgets outside a kernel ------------------------------------------------------------------


@pytest.fixture
def with_widgets(monkeypatch):
    """dm._widgets() returns ipywidgets as in a notebook; dm._redraw draws into a plain Figure and keeps it."""
    widgets = pytest.importorskip("ipywidgets")
    from matplotlib.figure import Figure
    drawn = []

    def redraw(out, draw, figsize):
        fig = Figure(figsize=figsize)
        draw(fig)
        drawn.append(fig)
    monkeypatch.setattr(dm, "_widgets", lambda: widgets)
    monkeypatch.setattr(dm, "_redraw", redraw)
    return widgets, drawn


def append_rows(path, fields, rows) -> None:
    """Benchmarks: append dict rows to a CSV (path: pathlib.Path or None), with a header when it is new."""
    if path is None:
        return
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
