"""The course notebooks: stored clean, thin, and every one runs headless in smoke mode.

Each notebook runs in a fresh kernel (nbclient) with DDPM_MINI_SMOKE=1: CPU, tiny sizes,
no network. Where a notebook fetches the pretrained weights, a loopback HTTP mirror serves
stand-in files (random weights of UNet(**MEDFORJ_UNET), saved like the published ones), so
the real fetch path (manifest, Pooch, cache, strict load) runs.
"""
import ast
import os
import pathlib
import shutil
import time

import numpy as np
import pytest
import torch

import ddpm_mini as dm

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["00_quickstart", "01_parameterizations", "02_sampling", "03_training", "04_evaluation"]
CELL_TIMEOUT = 300          # seconds per cell (nbclient)
FETCHES = {"00_quickstart", "02_sampling"}   # notebooks that download the MedForj weights
STANDIN_NAMES = [f"MedForj-weights-{tag}_ema.safetensors" for tag in ("clean", "velocity", "flow", "noise")]
MAX_FUNCTION_LINES = 6      # "no function in a notebook longer than a few lines"


def _read(name):
    import nbformat
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _code(cell) -> str:
    """Cell source with IPython line magics (%...) blanked, so ast can parse it."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in cell.source.splitlines())


# --- The stored notebooks -----------------------------------------------------------------------


def test_the_five_notebooks_exist():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs_and_valid(name):
    import nbformat
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a code cell has stored outputs"
            assert cell.execution_count is None, f"{name}: a code cell has an execution count"
        assert "attachments" not in cell or not cell.attachments


@pytest.mark.parametrize("name", NAMES)
def test_setup_and_parameters_cells(name):
    """First code cell: the marked REPO_URL, Colab install, device. A cell tagged "parameters"
    reads SMOKE from DDPM_MINI_SMOKE. A setup cell seeds and picks the data folder."""
    code = [c for c in _read(name).cells if c.cell_type == "code"]
    first = code[0].source
    assert 'REPO_URL = "https://github.com/REPLACE-ME/ddpm-mini"' in first
    assert '"google.colab" in sys.modules' in first and 'f"git+{REPO_URL}"' in first
    assert "DEVICE =" in first
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[1], f"{name}: the second code cell must be the tagged parameters cell"
    assert 'os.environ.get("DDPM_MINI_SMOKE") == "1"' in tagged[0].source
    assert any("torch.manual_seed(SEED)" in c.source and "DDPM_MINI_DATA" in c.source for c in code[:3])
    # the README's placeholder address appears nowhere else
    assert sum(c.source.count("REPLACE-ME") for c in _read(name).cells) == 1


@pytest.mark.parametrize("name", NAMES)
def test_thin_cells(name):
    """Functions defined in a notebook stay a few lines long; prose and code alternate."""
    nb = _read(name)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        tree = ast.parse(_code(cell))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                lines = node.end_lineno - node.lineno + 1
                assert lines <= MAX_FUNCTION_LINES, f"{name}: a {lines}-line function belongs in ddpm_mini"
            assert not isinstance(node, ast.ClassDef), f"{name}: a class belongs in ddpm_mini"
        assert len(cell.source.splitlines()) <= 16, f"{name}: a long code cell:\n{cell.source}"
    kinds = [c.cell_type for c in nb.cells]
    assert kinds.count("markdown") >= kinds.count("code") // 2 + 1, f"{name}: too little prose"


def test_exercises_run_green_as_shipped():
    """01's exercises: each STUDENT line is followed by an assert in the same cell."""
    cells = [c.source for c in _read("01_parameterizations").cells if "# STUDENT: replace this line" in c.source]
    assert 3 <= len(cells) <= 4
    for src in cells:
        after = src.split("# STUDENT: replace this line", 1)[1]
        assert "assert " in after


# --- Section 11's helpers that the notebooks call (plain Python: the static fallbacks) ------------


class _Oracle(torch.nn.Module):
    """Knows the clean x0 (B, C, *S): outputs the exact target of `prediction`, plus `delta`."""

    def __init__(self, x0, prediction, delta=0.0):
        super().__init__()
        self.x0, self.prediction, self.delta = x0, prediction, delta
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x_t, t):
        alpha, sigma = dm.Schedule().alpha_sigma(t, x_t)
        eps = (x_t - alpha * self.x0) / sigma
        return dm.target(self.prediction, self.x0, eps, t) + self.delta


def test_x0_error_by_t_measures_the_conversion():
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ts = [0, 500, 999]
    for p in dm.PREDICTIONS:
        assert dm.x0_error_by_t(_Oracle(x0, p), p, x0, ts).max() < 1e-6, p
    # a noise model off by delta everywhere: the x0 error is (sigma / alpha * delta)^2, ~157^2 delta^2 at t = 999
    delta = 1e-3
    err = dm.x0_error_by_t(_Oracle(x0, "noise", delta), "noise", x0, ts)
    amp2 = 1 / dm.x0_loss_weight("noise", torch.tensor(ts)).numpy()
    assert err == pytest.approx(amp2 * delta**2, rel=1e-3, abs=1e-9)
    assert dm.x0_error_by_t(_Oracle(x0, "noise", delta), "noise", x0, ts, clip=True)[-1] < err[-1]


def test_plot_parameterizations_reads_the_targets():
    fig = dm.plot_parameterizations()
    a, b, w = fig.axes[:3]
    lines = {ax: {ln.get_label(): ln.get_ydata() for ln in ax.get_lines()} for ax in (a, b, w)}
    alpha, sigma = (v.numpy() for v in dm.Schedule().alpha_sigma(torch.arange(1000)))
    assert lines[a]["velocity"] == pytest.approx(-sigma) and lines[b]["velocity"] == pytest.approx(alpha)
    assert set(lines[a]["flow"]) == {-1.0} and set(lines[b]["flow"]) == {1.0}
    assert lines[w]["noise"] == pytest.approx(alpha**2 / sigma**2)


def test_trajectory_viewers_and_figures_without_widgets():
    model = dm.UNet(spatial_dims=3, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                    num_head_channels=4, norm_num_groups=4)
    traj = dm.Trajectory()
    x = dm.sample(model, "flow", shape=(2, 1, 16, 16, 16), steps=4, callback=traj, progress=False)
    assert traj.t == [999, 666, 333, 0] and len(traj) == 4
    assert set(traj.x_t[0]) == {"axial", "coronal", "sagittal"}
    assert traj.x0_hat[-1]["axial"] == pytest.approx(dm.orthogonal_slices(x[0, 0])["axial"])  # last x0_hat = the sample
    assert len(dm.view_trajectory(traj).axes) == 8                    # no IPython here: the static figure
    assert len(dm.show_trajectory(traj, [0, 3], "coronal").axes) == 4
    with pytest.raises(ValueError, match="empty"):
        dm.show_trajectory(dm.Trajectory())
    fig = dm.sampling_panel({"flow": model}, torch.randn(1, 1, 16, 16, 16), steps=2)
    assert "s per step" in fig.texts[0].get_text()
    assert len(dm.show_volumes({"a": x[0], "b": x[1, 0].numpy()}).axes) == 6
    assert len(dm.show_images({"a": torch.zeros(3, 1, 4, 4), "b": [torch.zeros(4, 4)]}).axes) == 6
    assert len(dm.explore_targets({"img": torch.zeros(8, 8)}, t=10).axes) == 7
    assert len(dm.show_targets({"img": torch.zeros(8, 8)}, 10, "v").axes) == 4
    assert len(dm.view(x[:1]).axes) == 3
    dm.plot_losses({"a": [1.0, 0.5, 0.25], "b": [2.0]})
    dm.plot_curves({"a": [1, 2, 3]}, [0, 1, 2])


def test_measure_and_format_rows():
    with dm.measure("cpu") as cost:
        torch.ones(1000).sum()
    assert cost["seconds"] >= 0 and cost["memory_mb"] > 0 and "MB" in cost["memory"]
    text = dm.format_rows([{"set": "flow", "p": 0.012345, "n": 3}, {"set": "sample", "p": 1.0, "n": 12}], ("set", "p"))
    lines = text.splitlines()
    assert len(lines) == 3 and lines[1].split() == ["flow", "0.01235"] and len({len(ln) for ln in lines}) == 1
    assert dm.format_rows([]) == "(no rows)"


def test_segment_phantom_survives_constant_volumes():
    """04 segments samples of barely trained models, which can be constant: no LinAlgError."""
    for value in (-1.0, 0.0, 1.0):
        labels = dm.segment_phantom(np.full((48, 56, 48), value, np.float32))
        assert labels.shape == (48, 56, 48) and len(np.unique(labels)) == 1
    table = dm.regional_volumes([np.full((48, 56, 48), 1.0, np.float32), np.full((48, 56, 48), -1.0, np.float32)])
    assert table["volumes"]["white_matter"][1] == 0


# --- Running them headless ------------------------------------------------------------------------


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@pytest.fixture
def smoke_env(request, tmp_path, monkeypatch):
    """The kernel's environment for a smoke run; serves stand-in weights where the notebook fetches."""
    manifest = tmp_path / "data_manifest.csv"
    shutil.copyfile(ROOT / "data_manifest.csv", manifest)
    env = {
        "DDPM_MINI_SMOKE": "1",
        "DDPM_MINI_MANIFEST": str(manifest),
        "DDPM_MINI_CACHE": str(tmp_path / "cache"),
        "DDPM_MINI_DATA": str(tmp_path / "data"),
        "MPLBACKEND": "Agg",
        "CUDA_VISIBLE_DEVICES": "",              # smoke mode is a CPU run
        # one thread unless told otherwise: on a small shared CI box, OpenMP threads that wait
        # for a busy core slow torch down many times over
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        # a closed loopback port: any fetch a notebook makes without a mirror fails at once
        "DDPM_MINI_MIRROR": "http://127.0.0.1:9",
    }
    if request.node.callspec.params["name"] in FETCHES:
        root, base = request.getfixturevalue("http_server")
        for fname in STANDIN_NAMES:
            _link_or_copy(request.getfixturevalue("standin_weights"), root / fname)
        env["DDPM_MINI_MIRROR"] = base
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_smoke_mode(name, smoke_env, tmp_path):
    from nbclient import NotebookClient
    nb = _read(name)
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    print(f"{name}: {seconds:.1f} s in smoke mode")  # pytest -s shows it; --durations=0 too
    import nbformat
    nbformat.write(nb, str(tmp_path / f"{name}.executed.ipynb"))  # for a look after a failure

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "from " + str(ROOT) in text or str(ROOT / "ddpm_mini.py") in text, "the kernel imported another ddpm_mini"
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before, "a notebook wrote into notebooks/"
    data = pathlib.Path(smoke_env["DDPM_MINI_DATA"])
    if name in FETCHES:
        assert list(pathlib.Path(smoke_env["DDPM_MINI_CACHE"]).glob("medforj_*/*.safetensors"))
    if name in ("00_quickstart", "02_sampling"):
        assert list(data.glob("*.nii.gz")), f"{name} saved no NIfTI"
