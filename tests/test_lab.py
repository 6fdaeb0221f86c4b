"""notebooks/lab.py: the lessons' own figures, widgets, timing panels and image checks.

Plain Python here (no IPython kernel), so every widget returns its static Figure fallback.
"""
import ast
import hashlib
import itertools
import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm_mini as dm

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))
import lab  # noqa: E402
from conftest import MICRO_UNET  # noqa: E402


def test_lab_is_the_notebooks_copy_and_uses_only_what_ddpm_mini_has():
    assert pathlib.Path(lab.__file__).resolve() == ROOT / "notebooks" / "lab.py"
    tree = ast.parse((ROOT / "notebooks" / "lab.py").read_text(encoding="utf-8"))
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "dm"}
    assert used and not [name for name in sorted(used) if not hasattr(dm, name)]


# --- Notebook 01: the parameterizations -----------------------------------------------------------


class _Oracle(torch.nn.Module):
    """Knows the clean x0 (B, C, *S): outputs the exact target of `prediction`, plus `delta`."""

    def __init__(self, x0, prediction, delta=0.0):
        super().__init__()
        self.x0, self.prediction, self.delta = x0, prediction, delta
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x_t, t):
        alpha, sigma = dm.default_schedule(self.prediction).alpha_sigma(t, x_t)
        eps = (x_t - alpha * self.x0) / sigma
        return dm.target(self.prediction, self.x0, eps, t) + self.delta


def test_x0_error_by_t_measures_the_conversion():
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ts = [0, 500, 999]
    for p in dm.ALL_PREDICTIONS:  # rflow on its own schedule, where t = 0 has no noise to recover
        assert lab.x0_error_by_t(_Oracle(x0, p), p, x0, [1, 500, 999] if p == "rflow" else ts).max() < 1e-6, p
    # a noise model off by delta everywhere: the x0 error is (sigma / alpha * delta)^2, ~157^2 delta^2 at t = 999
    delta = 1e-3
    err = lab.x0_error_by_t(_Oracle(x0, "noise", delta), "noise", x0, ts)
    amp2 = 1 / dm.x0_loss_weight("noise", torch.tensor(ts)).numpy()
    assert err == pytest.approx(amp2 * delta**2, rel=1e-3, abs=1e-9)
    assert lab.x0_error_by_t(_Oracle(x0, "noise", delta), "noise", x0, ts, clip=True)[-1] < err[-1]
    # an explicit schedule is the one used (the default one equals dm.Schedule())
    assert lab.x0_error_by_t(_Oracle(x0, "noise", delta), "noise", x0, ts, schedule=dm.Schedule()) == pytest.approx(err)


def test_plot_parameterizations_reads_the_targets():
    fig = lab.plot_parameterizations()
    a, b, w = fig.axes[:3]
    lines = {ax: {ln.get_label(): ln.get_ydata() for ln in ax.get_lines()} for ax in (a, b, w)}
    alpha, sigma = (v.numpy() for v in dm.Schedule().alpha_sigma(torch.arange(1000)))
    assert lines[a]["velocity"] == pytest.approx(-sigma) and lines[b]["velocity"] == pytest.approx(alpha)
    assert set(lines[a]["flow"]) == {-1.0} and set(lines[b]["flow"]) == {1.0}
    assert lines[w]["noise"] == pytest.approx((alpha**2 / sigma**2)[1:])        # from t = 1: rflow's w(0) is infinite
    assert set(lines[a]["rflow"]) == {1.0} and set(lines[b]["rflow"]) == {-1.0}  # u = x0 - eps
    assert lines[w]["rflow"] == pytest.approx((1000 / np.arange(1, 1000)) ** 2)   # its own schedule: sigma = t / T
    # another schedule: T sets the t axis
    short = lab.plot_parameterizations(dm.Schedule(T=100), predictions=("sample",))
    assert [len(ln.get_xdata()) for ln in short.axes[0].get_lines()] == [100]


def test_targets_figures():
    assert len(lab.explore_targets({"img": torch.zeros(8, 8)}, t=10).axes) == 7
    assert len(lab.show_targets({"img": torch.zeros(8, 8)}, 10, "v").axes) == 4
    fig = lab.show_targets({"a": np.zeros((1, 8, 8)), "b": torch.zeros(8, 8)}, 10, "flow")
    assert len(fig.axes) == 8 and fig.axes[-1].get_title().startswith("flow target")
    with pytest.raises(ValueError, match="2-D image"):
        lab.show_targets({"img": torch.zeros(2, 8, 8)}, 10)


# --- Notebook 02: trajectories, cost, controls ---------------------------------------------------


def test_trajectory_viewers_and_figures_without_widgets():
    model = dm.UNet(spatial_dims=3, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                    num_head_channels=4, norm_num_groups=4)
    traj = lab.Trajectory()
    x = dm.sample(model, "flow", shape=(2, 1, 16, 16, 16), steps=4, callback=traj, progress=False)
    assert traj.t == [999, 666, 333, 0] and len(traj) == 4
    assert set(traj.x_t[0]) == {"axial", "coronal", "sagittal"}
    assert traj.x0_hat[-1]["axial"] == pytest.approx(dm.orthogonal_slices(x[0, 0])["axial"])  # last x0_hat = the sample
    assert len(lab.view_trajectory(traj).axes) == 8                   # no IPython here: the static figure
    assert len(lab.show_trajectory(traj, [0, 3], "coronal").axes) == 4
    with pytest.raises(ValueError, match="empty"):
        lab.show_trajectory(lab.Trajectory())
    fig = lab.sampling_panel({"flow": model}, torch.randn(1, 1, 16, 16, 16), steps=2)
    assert "s per step" in fig.texts[0].get_text()
    assert len(lab.show_images({"a": torch.zeros(3, 1, 4, 4), "b": [torch.zeros(4, 4)]}).axes) == 6


def test_trajectory_of_2d_samples():
    model = dm.UNet(spatial_dims=2, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                    num_head_channels=4, norm_num_groups=4)
    traj = lab.Trajectory(item=1)
    x = dm.sample(model, "velocity", shape=(2, 1, 16, 16), steps=3, callback=traj, progress=False)
    assert list(traj.x_t[0]) == ["image"] and traj.x_t[-1]["image"] == pytest.approx(x[1, 0].numpy())
    assert len(lab.view_trajectory(traj).axes) == 6                   # all three steps, two rows


def test_measure():
    with lab.measure("cpu") as cost:
        torch.ones(1000).sum()
    assert cost["seconds"] >= 0 and cost["memory_mb"] > 0 and "MB" in cost["memory"]
    assert lab.measure().device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# --- Notebook 03: loss curves ---------------------------------------------------------------------


def test_loss_and_curve_plots():
    fig = lab.plot_losses({"a": [1.0, 0.5, 0.25], "b": [2.0]})
    assert [ln.get_label() for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")] == \
        ["a (mean of 1)", "b (mean of 1)"]
    smooth = lab.plot_losses({"a": np.arange(1.0, 41.0)}).axes[0].get_lines()[1]
    assert smooth.get_label() == "a (mean of 2)" and smooth.get_ydata()[0] == pytest.approx(1.5)
    fig = lab.plot_curves({"a": [1, 2, 3]}, [0, 1, 2])
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [0, 1, 2] and fig.axes[0].get_yscale() == "log"


# --- Notebook 04: image-level checks -------------------------------------------------------------


def test_histograms_and_distance():
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.8, 0.4, size=(2, 16, 16, 16))
    p, edges = lab.intensity_histogram(x, bins=100)
    assert p.shape == (100,) and edges.shape == (101,) and p.sum() == pytest.approx(1.0)
    q, _ = lab.intensity_histogram(x + 0.2, bins=100)       # 10 bins of 0.02 to the right
    d = lab.histogram_distance(p, q, edges)
    assert d["wasserstein"] == pytest.approx(0.2, abs=0.003)  # rounding of values near bin edges
    assert 0 < d["js"] < 1
    assert lab.histogram_distance(p, p, edges) == {"wasserstein": 0.0, "js": 0.0}
    disjoint = lab.histogram_distance(*lab.intensity_histogram(np.full((1, 4, 4, 4), -0.9), bins=10)[:1],
                                      lab.intensity_histogram(np.full((1, 4, 4, 4), 0.9), bins=10)[0], edges[::10])
    assert disjoint["js"] == pytest.approx(1.0) and disjoint["wasserstein"] == pytest.approx(1.8)
    mask = np.zeros((16, 16, 16), bool)
    mask[:8] = True
    pm, _ = lab.intensity_histogram(x, bins=100, mask=mask)
    assert pm.sum() == pytest.approx(1.0) and not np.allclose(pm, p)
    with pytest.raises(ValueError, match="no voxels"):
        lab.intensity_histogram(x, mask=np.zeros((16, 16, 16), bool))
    # the same volumes as a list of (X, Y, Z) or as (N, 1, X, Y, Z): the same histogram
    assert lab.intensity_histogram(list(x), bins=100)[0] == pytest.approx(p)
    assert lab.intensity_histogram(torch.from_numpy(x)[:, None], bins=100)[0] == pytest.approx(p)
    with pytest.raises(ValueError, match="expected N volumes"):
        lab.intensity_histogram(np.zeros((4, 4)))


def test_ssim_and_diversity():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(4, 24, 24, 24, generator=g) * 2 - 1
    assert lab.diversity(noise) < 0.1
    assert abs(lab.diversity(noise)) < 0.02                # measured 0.004
    same = noise[:1].repeat(3, 1, 1, 1)
    assert lab.diversity(same) == pytest.approx(1.0, abs=1e-5)
    smooth = torch.linspace(-1, 1, 24).view(24, 1, 1).expand(24, 24, 24)
    collapsed = (smooth + 0.05 * noise).clamp(-1, 1)      # one mode plus a little noise
    assert 0.8 < lab.diversity(collapsed) < 0.99          # measured 0.95
    assert lab.diversity(noise, max_pairs=2) == pytest.approx(lab.diversity(noise), abs=0.05)
    with pytest.raises(ValueError, match="at least 2"):
        lab.diversity(noise[:1])
    assert lab.ssim3d(noise, noise) == pytest.approx(torch.ones(4), abs=1e-5)
    with pytest.raises(ValueError, match="7-voxel window"):
        lab.ssim3d(noise[:, :6], noise[:, :6])


# --- The widgets, built outside a kernel (the with_widgets fixture: conftest.py) -----------------


def test_widgets_redraw_on_their_controls(with_widgets):
    widgets, drawn = with_widgets
    box = lab.explore_targets({"img": torch.zeros(8, 8)}, t=10)
    assert isinstance(box, widgets.VBox) and len(drawn[-1].axes) == 7
    slider, choice = box.children[0].children
    assert (slider.value, slider.max) == (10, 999)
    choice.value = "velocity"
    assert len(drawn[-1].axes) == 4 and drawn[-1].axes[-1].get_title().startswith("velocity target")

    model = dm.UNet(spatial_dims=3, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                    num_head_channels=4, norm_num_groups=4)
    traj = lab.Trajectory()
    dm.sample(model, "flow", shape=(1, 1, 16, 16, 16), steps=3, callback=traj, progress=False)
    step, plane = lab.view_trajectory(traj).children[0].children
    assert step.value == 3 and drawn[-1].axes[0].get_title() == "step 3/3: the sample"
    step.value = 1
    assert drawn[-1].axes[0].get_title() == "step 1/3: x at t = 500"
    plane.value = "sagittal"
    assert len(drawn[-1].axes) == 2
    with pytest.raises(ValueError, match="empty"):
        lab.view_trajectory(lab.Trajectory())

    panel = lab.sampling_panel({"flow": model}, torch.randn(1, 1, 16, 16, 16), steps=2)
    assert "flow: 2 linspace steps, eta 0" in drawn[-1].texts[0].get_text()
    (_, n), (eta, grid, button) = (row.children for row in panel.children[:2])
    n.value, grid.value = 3, "leading"
    button.click()
    assert "flow: 3 leading steps" in drawn[-1].texts[0].get_text() and not button.disabled


# --- Notebooks 03 and 04: phantom scores and the comparison paragraph -----------------------------


def test_phantom_score_separates_phantoms_from_blur_and_noise():
    """The benchmark's criterion at the teaching grid: an unseen real phantom is recognisable, the
    blurred mean head (tDice ~0.36) and clipped noise are not; a phantom scores tDice 1 against
    itself (a reference) and W1 0 against its own intensities."""
    shape = dm.TEACHING_SHAPE
    score = lab.PhantomScore(shape, n=4)
    real = dm.phantom(30_000, shape)[0]
    blur = np.mean([dm.phantom(20_000 + i, shape)[0] for i in range(4)], 0)
    noise = np.random.default_rng(0).standard_normal(shape).clip(-1, 1).astype(np.float32)
    assert score.recognisable(real) and not score.recognisable(blur) and not score.recognisable(noise)
    assert score.tdice(dm.phantom(20_001, shape)[0]) == pytest.approx(1.0)
    assert 0.45 < score.tdice(real) < 0.8 and score.tdice(blur) < 0.42 and score.tdice(noise) < 0.15
    assert score.w1(noise) > 0.5 and score.w1(real) < 0.12
    rows = score.table({"real": np.stack([real, real]), "noise": torch.from_numpy(noise)[None, None]})
    assert [(r["model"], r["n"], r["recognisable"]) for r in rows] == [("real", 2, "2 of 2"), ("noise", 1, "0 of 1")]
    assert float(rows[0]["tDice"]) == pytest.approx(score.tdice(real), abs=0.005)


def _rows(set_name, ds, p_adj, sd=10.0):
    return [{"set": set_name, "structure": f"s{i}", "cohen_d": d, "wasserstein": abs(d) * sd, "sd_real": sd,
             "p_adjusted": p} for i, (d, p) in enumerate(zip(ds, p_adj))]


def test_comparison_summary_ranks_sets_by_distance_to_the_truth():
    rows = (_rows("segmented", [0.1, -0.1, 0.0], [1, 1, 1]) + _rows("flow", [0.2, -0.3, 0.1], [1, 0.5, 1])
            + _rows("sample", [1.5, -1.2, 0.9], [0.001, 0.01, 0.2]) + _rows("noise", [3.0, 2.0, -2.5], [0.001] * 3))
    text = lab.comparison_summary(rows)
    assert text.startswith("Closest to the truth: flow (W1 0.20 truth-SDs, mean |d| 0.20, 0 of 3 structures "
                           "different at adjusted p < 0.05).")
    assert "Farthest: noise (W1 2.50 truth-SDs, mean |d| 2.50, 3 of 3 structures" in text
    assert "Order, closest first: flow, sample, noise." in text
    assert "'segmented') gives W1 0.07" in text
    assert "Noise prediction (noise) ranks 3 of 3: it lags every other parameterization." in text
    better_noise = _rows("flow", [1.0, 1.0, 1.0], [1] * 3) + _rows("noise", [0.5, 0.5, 0.5], [1] * 3)
    assert "Noise prediction (noise) ranks 1 of 2: it does not lag" in lab.comparison_summary(better_noise)
    # a set whose volumes scatter widely has a small |d| and a large W1: W1 ranks it (notebook 04's
    # shipped noise model: |d| put it closest while its volumes were the farthest from the truth)
    scattered = _rows("flow", [0.5] * 3, [1] * 3) + [dict(r, wasserstein=40.0) for r in _rows("noise", [0.1] * 3, [1] * 3)]
    text = lab.comparison_summary(scattered)
    assert text.startswith("Closest to the truth: flow") and "Order, closest first: flow, noise." in text
    assert "Noise prediction (noise) ranks 2 of 2: it lags" in text
    with pytest.raises(ValueError, match="no set besides the baseline"):
        lab.comparison_summary(_rows("segmented", [0.1], [1]))


# --- The shipped teaching models (docs/methods.md#teaching-models) --------------------------------

#: Shipped models whose samples must be recognisable phantoms (lab.PhantomScore's criterion; a model needs 3
#: of 4, and these draw 4 of 4 here, 16 of 16 over 16 samples with tissue Dice 0.46-0.59: README).
#: Noise prediction is shipped and reported, not held to it (it does not learn the phantoms: see
#: docs/methods.md#teaching-models for its scores).
RECOGNISABLE = ("flow", "sample", "velocity")


@pytest.mark.parametrize("prediction", dm.PREDICTIONS)
def test_shipped_teaching_model_draws_what_its_row_promises(prediction, one_thread):
    """dm.fetch serves teaching_<p> from the checkout (no network: the cache is empty and no server
    runs), load_model reads its prediction, grid and schedule, and 4 samples (20 DDIM steps, seed 0)
    are recognisable phantoms where RECOGNISABLE says so (W1 <= 0.12, tissue Dice >= 0.45), each with
    tissue Dice 0.50 or more."""
    path = dm.fetch(f"teaching_{prediction}")
    assert path == ROOT / "weights" / f"teaching_{prediction}.safetensors"
    model, meta = dm.load_model(path, "cpu")
    assert meta["prediction"] == prediction and tuple(meta["shape"]) == dm.TEACHING_SHAPE
    teaching = dm.UNet(**dm.TEACHING_UNET).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in teaching.items()}
    assert next(model.parameters()).dtype == torch.float32  # stored as float16, run as float32
    x = dm.sample(model, prediction, shape=(4, 1, *dm.TEACHING_SHAPE), steps=20,
                  generator=torch.Generator().manual_seed(0), progress=False)[:, 0].numpy()
    score = lab.PhantomScore(dm.TEACHING_SHAPE)
    ok = sum(score.recognisable(v) for v in x)
    if prediction in RECOGNISABLE:
        dice = [round(score.tdice(v), 3) for v in x]
        assert ok == 4, dice
        # the lab issue's bar, tissue Dice 0.50, at the scorer's two decimals (sample's weakest is 0.500)
        assert min(dice) >= 0.495, dice
    else:
        assert ok == 0  # the row says: not recognisable; if this changes, update docs and this test


def test_continue_teaching_model_starts_from_the_shipped_weights(tmp_path):
    """tests/continue_teaching_model.py: a new run from teaching_sample's weights with a fresh Adam and
    the EMA at the shipped weights from step 1 (decay 0.999, no warm-up); --resume continues it (with
    --lr, at a new rate from there on), a second start into the same folder or a resume naming another
    source is refused; init.json keeps the source's training record."""
    script, out = ROOT / "tests" / "continue_teaching_model.py", tmp_path / "run"

    def run(*extra):
        return subprocess.run([sys.executable, str(script), "teaching_sample", "--out", str(out), "--threads", "1",
                               "--checkpoint-every", "1", *extra], capture_output=True, text=True)
    assert run("--steps", "1").returncode == 0
    assert run("--steps", "2", "--resume").returncode == 0
    refused = run("--steps", "2")
    assert refused.returncode != 0 and "--resume continues it" in refused.stderr
    shipped, source = dm.load_model(dm.fetch("teaching_sample"), "cpu")
    ema, meta = dm.load_model(out, "cpu")
    raw, _ = dm.load_model(out / "checkpoints" / "step_000002" / "model.safetensors", "cpu")
    assert meta["step"] == "2" and meta["ema_warmup"] == "false" and meta["seed"] == "1"
    moved = lambda m: max(float((a - b).abs().max()) for a, b in zip(m.state_dict().values(),
                                                                     shipped.state_dict().values()))
    assert moved(raw) > 5e-4           # Adam's first steps move weights by about lr = 1e-3 each
    assert moved(ema) < 1e-5           # 0.999-EMA: 0.1% of that (with a warm-up it would follow raw)
    start = json.loads((out / "init.json").read_text())
    assert start["source"]["step"] == source["step"] and start["sha256"] == hashlib.sha256(
        dm.fetch("teaching_sample").read_bytes()).hexdigest()
    # --resume reads the run folder (the source may be re-shipped meanwhile); --lr is a step schedule
    assert run("--steps", "3", "--resume", "--lr", "1e-4").returncode == 0
    _, meta = dm.load_model(out, "cpu")
    assert meta["step"] == "3" and json.loads(meta["lr_steps"]) == [[0, 0.001], [2, 0.0001]]
    other = subprocess.run([sys.executable, str(script), "teaching_flow", "--out", str(out), "--steps", "4", "--resume"],
                           capture_output=True, text=True)
    assert other.returncode != 0 and "was started from teaching_sample, not teaching_flow" in other.stderr


def test_psnr():
    """10 log10(4 / MSE) per volume, averaged; a mask scores only its voxels."""
    truth = torch.zeros(2, 1, 4, 4, 4)
    x = truth.clone()
    x[0] += 0.1                                           # MSE 0.01 -> 26.02 dB
    x[1, 0, 0] += 0.2                                     # MSE 0.04 on a quarter of the voxels
    assert lab.psnr(x[:1], truth[:1]) == pytest.approx(10 * np.log10(400), abs=1e-6)
    where = torch.zeros_like(x, dtype=torch.bool)
    where[:, 0, 0] = True
    assert lab.psnr(x[1:], truth[1:], where=where[1:]) == pytest.approx(10 * np.log10(100), abs=1e-6)
    assert lab.psnr(x, truth) == pytest.approx((10 * np.log10(400) + 10 * np.log10(4 / 0.01)) / 2, abs=1e-6)


# --- Set-up: the shared data folder, exercises, runs to reuse -----------------------------------------


def test_data_folder_is_shared_and_per_user(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_MINI_DATA", str(tmp_path / "given" / "data"))
    assert lab.data_folder() == tmp_path / "given" / "data" and (tmp_path / "given" / "data").is_dir()
    monkeypatch.delenv("DDPM_MINI_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert lab.data_folder() == tmp_path / "home" / "ddpm-mini-data" == lab.data_folder()   # the same every time
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DDPM_MINI_DATA", str(tmp_path / "file" / "data"))
    with pytest.raises(OSError, match="set DDPM_MINI_DATA to a folder you can write to"):
        lab.data_folder()


def test_your_turn_waits_for_the_student_and_solutions_answer():
    x = torch.tensor([2.0])
    with pytest.raises(NotImplementedError, match=r"^your turn: exercise 1 .*\(it may use alpha, sigma, x_t, u\)"):
        lab.your_turn(1, False, alpha=x, sigma=x, x_t=x, u=x)
    alpha, sigma = torch.tensor([0.6]), torch.tensor([0.8])
    x0, eps = torch.randn(3), torch.randn(3)
    x_t, u = alpha * x0 + sigma * eps, alpha * eps - sigma * x0
    assert torch.allclose(lab.your_turn(1, True, alpha=alpha, sigma=sigma, x_t=x_t, u=u), x0, atol=1e-6)
    with pytest.raises(ValueError, match="no reference answer for exercise 99"):
        lab.your_turn(99, True)


def test_reuse_or_train_trains_once_then_reuses(tmp_path, one_thread, capsys):
    run, calls = tmp_path / "runs" / "flow", []

    def train(out):
        calls.append(out)
        dm.train(dm.UNet(**MICRO_UNET), dm.PhantomDataset(shape=(16, 16, 16)), "flow", 1, out=out, progress=False)
    model, meta = lab.reuse_or_train(run, train, seed=0)
    assert calls == [run] and int(meta["step"]) == 1 and "training it here" in capsys.readouterr().out
    again, meta2 = lab.reuse_or_train(run, lambda out: pytest.fail("a finished run must be reused"))
    assert int(meta2["step"]) == 1 and "training" not in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# --- Figures from made-up numbers say so on the figure ------------------------------------------------


def _texts(fig) -> list:
    return [t.get_text() for t in fig.texts] + ([fig._suptitle.get_text()] if fig._suptitle else [])


def test_label_figure_writes_the_label_on_the_figure():
    fig = lab.show_images({"a": [np.zeros((4, 4))]}, title="made-up")
    lab.label_figure(fig)
    texts = _texts(fig)
    assert sum(lab.SYNTHETIC in t for t in texts) >= 2 and any("made-up" in t for t in texts)   # banner + watermark
    assert "SYNTHETIC DATA" in lab.SYNTHETIC
    assert lab.preview_note(dm.IMAGE_SHAPE) == "" and "PREVIEW" in lab.preview_note((96, 112, 96))


def test_show_report_labels_the_figure_and_its_png(tmp_path):
    rng = np.random.default_rng(0)
    table = lambda scale: {"subject": [f"s{i}" for i in range(6)],  # noqa: E731
                           "volumes": {"cortex": rng.normal(500 * scale, 20, 6), "csf": rng.normal(100, 5, 6)}}
    report = dm.comparison_report(table(1.0), {"sample": table(0.92)}, tmp_path, n_permutations=50)
    from PIL import Image
    plain = report["figure"].read_bytes()
    with Image.open(report["figure"]) as png:
        width, height = png.size
    assert _texts(lab.show_report(report)) == [] and report["figure"].read_bytes() == plain   # no label: untouched
    fig = lab.show_report(report, label=lab.SYNTHETIC)
    assert sum(t == lab.SYNTHETIC for t in _texts(fig)) == 2                                   # banner + watermark
    with Image.open(report["figure"]) as png:                     # the file says so too, above the same figure
        assert png.text.get("Title") == lab.SYNTHETIC and png.size == (width, height + 50)
    labelled = report["figure"].read_bytes()
    assert labelled != plain
    assert _texts(lab.show_report(report, label=lab.SYNTHETIC)) == [] and report["figure"].read_bytes() == labelled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volumes.csv", "volumes.png"]


# --- What the regional-volume test can detect at its sample size ------------------------------------


@pytest.mark.parametrize("n_a, n_b", [(4, 4), (3, 5), (2, 8), (5, 2)])
def test_smallest_p_is_what_exact_enumeration_gives(n_a, n_b):
    """Every a above every b (the most extreme data): enumerate all C(n_a + n_b, n_a) splits and count
    those with |D| >= |D_obs|; lab.smallest_p must give that count / C, Holm's m times it (as
    dm.adjust_pvalues computes it) and dm.permutation_test's random-split estimate of it."""
    rng = np.random.default_rng(n_a * 10 + n_b)
    a, b = 100 + rng.random(n_a), rng.random(n_b)
    x, observed = np.r_[a, b], abs(a.mean() - b.mean())
    splits = list(itertools.combinations(range(n_a + n_b), n_a))
    hits = sum(abs(x[list(c)].mean() - np.delete(x, list(c)).mean()) >= observed - 1e-9 for c in splits)
    s = lab.smallest_p(n_a, n_b, n_tests=10)
    assert s["splits"] == len(splits) == math.comb(n_a + n_b, n_a)
    assert s["exact"] == s["p"] == pytest.approx(hits / len(splits))
    assert s["holm"] == pytest.approx(min(1.0, 10 * hits / len(splits)))
    assert dm.adjust_pvalues(np.full(10, s["p"]), "holm").min() == pytest.approx(s["holm"])
    n = 20_000
    expected = lab.smallest_p(n_a, n_b, 10, n)["p"]
    sd = math.sqrt(n * s["exact"] * (1 - s["exact"])) / (1 + n)
    assert abs(dm.permutation_test(a, b, n, seed=1) - expected) < 5 * sd


def test_detection_limits_say_when_nothing_can_be_significant():
    # the case: 4 samples against 4, Holm over 10 structures: every adjusted p >= 0.287
    assert round(lab.smallest_p(4, 4, 10, 10_000)["holm"], 3) == 0.287
    text = lab.detection_limits(4, 4, 10, 10_000)
    assert "NO structure can be significant" in text and "0.29" in text
    text = lab.detection_limits(32, 32, 6, 10_000)
    assert "can be significant" in text and "NO structure" not in text and "0.87 standard deviations" in text
    rows = [{"set": s, "structure": k, "n_synthetic": n, "n_real": 8} for s, n in (("a", 2), ("b", 8))
            for k in ("x", "y", "z")]
    lines = lab.detection_limits_of(rows, 200).splitlines()
    assert len(lines) == 2 and lines[0].startswith("a: 2 samples against 8, 3 structures") and lines[1].startswith("b: 8")
    with pytest.raises(ValueError, match="n_a, n_b, n_tests >= 1"):
        lab.smallest_p(0, 4)
