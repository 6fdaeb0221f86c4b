"""lab: the lessons' own figures, widgets, timing panels and image checks.

The notebooks in this folder import it (`import lab`) beside `import ddpm_mini as dm`.
It is not part of the kit's API: ddpm_mini holds what users and the command line
call; what only the lessons need lives here. Everything below is built on ddpm_mini's
public functions. Where ipywidgets are unavailable (plain Python, the tests) each
widget returns a static matplotlib Figure instead.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import ddpm_mini as dm

tqdm = dm.tqdm  # progress bars: widgets in Jupyter, text on saved pages (DDPM_MINI_STATIC=1)

# --- Set-up: the shared data folder, exercises, runs to reuse ------------------------------------


def data_folder() -> pathlib.Path:
    """The folder every notebook reads and writes, created if needed: $DDPM_MINI_DATA when it is
    set, else ddpm-mini-data in the user's home folder (one per user, kept between sessions).

    Sharing it is what lets notebook 01 show notebook 00's brain and notebook 04 reuse notebook
    03's training runs. The tests point DDPM_MINI_DATA at a temporary folder of their own."""
    env = os.environ.get("DDPM_MINI_DATA")
    folder = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / "ddpm-mini-data"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the notebooks' data folder {folder} ({err.strerror}): set DDPM_MINI_DATA "
                      "to a folder you can write to, before starting Jupyter") from err
    return folder


def your_turn(number: int, solved: bool = False, **given):
    """An exercise line for the student to replace: raises NotImplementedError("your turn: ...")
    naming the values the answer may use (the keywords), until the student writes their own line.

    solved=True (instructors, and the tests: DDPM_MINI_SOLUTIONS=1 sets the notebooks' SOLUTIONS)
    returns the reference answer instead, computed from the given values by
    notebooks/solutions.py, so the self-check under the line runs green.
    """
    if solved:
        import solutions  # beside this file; instructors may leave it out of the students' copy
        if number not in solutions.ANSWERS:
            raise ValueError(f"no reference answer for exercise {number}; solutions.py has {sorted(solutions.ANSWERS)}")
        return solutions.ANSWERS[number](**given)
    names = ", ".join(given) or "the values above"
    raise NotImplementedError(
        f"your turn: exercise {number} is not done yet. Replace the line `... = lab.your_turn({number}, ...)` "
        f"with your own formula (it may use {names}) and run the cell again; the assert under it checks your "
        "answer. (Instructors: SOLUTIONS = True in the parameters cell, or DDPM_MINI_SOLUTIONS=1, runs the "
        "reference answers.)")


def reuse_or_train(run, train, device=None, seed=None):
    """(model, metadata) of the EMA model in run folder `run` (dm.load_model): an existing run
    (notebook 03 writes its runs into the shared data folder) is reused; otherwise train(run)
    trains one there first, after torch.manual_seed(seed) when seed is given. Prints which."""
    run = pathlib.Path(run)
    if dm.latest_checkpoint(run) is None:
        print(f"{run.name}: no run in {run.parent} yet (notebook 03 writes one there): training it here")
        if seed is not None:
            torch.manual_seed(seed)
        train(run)
    model, meta = dm.load_model(run, device)
    print(f"{run.name}: the run in {run.parent}, at step {meta['step']}")
    return model, meta


# --- Figure helpers ---------------------------------------------------------------------------


def _new_figure(fig, figsize):
    """fig cleared for reuse, or a new pyplot-free Figure (no GUI backend needed)."""
    if fig is None:
        from matplotlib.figure import Figure
        return Figure(figsize=figsize, layout="constrained")
    fig.clear()
    if hasattr(fig, "set_layout_engine"):  # matplotlib >= 3.6
        fig.set_layout_engine("constrained")
    return fig


def _image(x) -> np.ndarray:
    """A 2-D float32 numpy array from a tensor or array whose other axes have size 1."""
    a = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, np.float32)
    a = a.squeeze()
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D image (H, W), possibly with axes of size 1, got shape {tuple(np.shape(x))}")
    return a


def _resolve(schedule, prediction=None):
    """The schedule to use: the given one, else the prediction's default (dm.default_schedule:
    T = 1000 linear betas; the straight line for rflow)."""
    return dm.default_schedule(prediction) if schedule is None else schedule


def show_images(images: dict, vmin=-1.0, vmax=1.0, title=None, fig=None):
    """A grid of 2-D images: one row per entry of images {name: (N, H, W) or (N, 1, H, W) or a
    list of N (H, W)}, N columns (rows may differ in N). Grey scale vmin..vmax (None: each
    image's own range). Returns the matplotlib Figure."""
    rows = {k: [_image(x) for x in v] for k, v in images.items()}
    ncol = max(len(v) for v in rows.values())
    fig = _new_figure(fig, (1.3 * ncol + 1, 1.4 * len(rows)))
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    for r, (name, row) in enumerate(rows.items()):
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(row):
                ax.imshow(row[c], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        axes[r, 0].set_title(name, fontsize=9, loc="left")
    if title:
        fig.suptitle(title)
    return fig


#: What every figure drawn from made-up numbers says on the figure itself.
SYNTHETIC = "SYNTHETIC DATA: an illustration, not a result"


def _watermark(fig, label: str, y: float = 0.5):
    """A faint diagonal `label` across the figure, above everything drawn."""
    fig.text(0.5, y, label, transform=fig.transFigure, ha="center", va="center", rotation=25, fontsize=24,
             color="firebrick", alpha=0.22, fontweight="bold", zorder=10)


def label_figure(fig, label: str = SYNTHETIC):
    """Write `label` on the figure itself: a red title on top (before any title it has) and a
    faint diagonal watermark across the middle, so a copied or cropped figure still says it.
    Returns fig."""
    old = fig.get_suptitle() if hasattr(fig, "get_suptitle") else ""   # matplotlib >= 3.8
    fig.suptitle(f"{label}\n{old}" if old else label, color="firebrick", fontweight="bold")
    _watermark(fig, label)
    return fig


def preview_note(shape) -> str:
    """' (PREVIEW: ...)' for a title when a MedForj model samples a grid other than dm.IMAGE_SHAPE, the one it
    was trained on (the sample is then not a faithful one); '' on that grid."""
    if tuple(shape) == tuple(dm.IMAGE_SHAPE):
        return ""
    return f" (PREVIEW on a reduced {'x'.join(map(str, shape))} grid: not a faithful sample)"


def show_report(report, label=None):
    """The figure dm.comparison_report wrote (report["figure"], a PNG; or its path) as a Figure.

    With a label (e.g. SYNTHETIC) the label goes on the figure, in a banner above it and as a
    watermark, and the PNG on disk is rewritten with it (atomically), so the file says so too;
    a PNG that already carries the label is not labelled twice.
    """
    from matplotlib.figure import Figure
    from matplotlib.image import imread
    from PIL import Image  # matplotlib's own dependency
    path = pathlib.Path(report["figure"] if isinstance(report, dict) else report)
    with Image.open(path) as png:
        done = label is not None and getattr(png, "text", {}).get("Title") == label
    image, dpi = imread(path), 100
    h, w = image.shape[:2]
    banner = 0 if label is None or done else 50                            # pixels above the image
    fig = Figure(figsize=(w / dpi, (h + banner) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, h / (h + banner)))
    ax.imshow(image)
    ax.axis("off")
    if banner:
        fig.text(0.5, 1 - 0.5 * banner / (h + banner), label, ha="center", va="center", fontsize=14,
                 color="firebrick", fontweight="bold")
        _watermark(fig, label, y=0.45)
        tmp = path.with_name(f".{path.stem}.labelling.png")
        fig.savefig(tmp, dpi=dpi, metadata={"Title": label})
        os.replace(tmp, path)
    return fig


# --- Notebook 01: the parameterizations over t, measured errors ---------------------------------


def plot_parameterizations(schedule=None, predictions=dm.ALL_PREDICTIONS, fig=None):
    """What each prediction regresses, over t = 0..T-1: three panels.

    Every target is linear in (x0, eps): u = a(t) x0 + b(t) eps. Panel 1 plots a(t), panel 2
    b(t) (both read off dm.target itself with x0 = 1, eps = 0 and the reverse), panel 3 the
    weight w(t) the prediction's MSE puts on the x0 error (dm.x0_loss_weight), log scale.
    rflow is drawn on its own straight-line schedule (dashed), the others on `schedule`.
    Returns the matplotlib Figure (1 x 3).
    """
    T = _resolve(schedule).T
    t = torch.arange(T)
    one, zero = torch.ones(T, 1, dtype=torch.float64), torch.zeros(T, 1, dtype=torch.float64)
    fig = _new_figure(fig, (13, 3.6))
    axes = fig.subplots(1, 3)
    for p in predictions:
        own, style = (None, "--") if dm.canonical_prediction(p) == "rflow" else (schedule, "-")
        axes[0].plot(t, dm.target(p, one, zero, t, own)[:, 0], style, label=p)
        axes[1].plot(t, dm.target(p, zero, one, t, own)[:, 0], style, label=p)
        axes[2].semilogy(t[1:], dm.x0_loss_weight(p, t, own)[1:], style, label=p)  # rflow's w(0) is infinite
    for ax, name in zip(axes, ("a(t): weight of x0 in the target", "b(t): weight of eps in the target",
                               "w(t): implied weight on |x0_hat - x0|^2")):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("t")
    axes[0].legend()
    return fig


def show_targets(images: dict, t: int, prediction=None, seed: int = 0, schedule=None, fig=None):
    """The regression targets for clean images at one timestep t.

    images: {name: 2-D image (H, W) in [-1, 1]} (e.g. an axial slice from dm.orthogonal_slices);
    one row each with x0, eps (~ N(0, I) from seed, one draw per row), x_t = alpha_t x0 +
    sigma_t eps, then the target u of `prediction` (None: all four), each titled with the
    prediction's x0 weight w(t). Every panel has its own grey range. Returns the Figure.
    """
    noising = _resolve(schedule)
    preds = dm.PREDICTIONS if prediction is None else (dm.canonical_prediction(prediction),)
    tt = torch.tensor([int(t)])
    fig = _new_figure(fig, (2.1 * (3 + len(preds)), 2.3 * len(images)))
    axes = fig.subplots(len(images), 3 + len(preds), squeeze=False)
    g = torch.Generator().manual_seed(seed)
    for row, (name, image) in zip(axes, images.items()):
        x0 = torch.from_numpy(_image(image).copy())[None]                       # (1, H, W)
        eps = torch.randn(x0.shape, generator=g)
        panels = [(f"{name}: x0", x0), ("eps", eps), (f"x_t, t = {int(t)}", noising.add_noise(x0, eps, tt))]
        panels += [(f"{p} target\nw(t) = {float(dm.x0_loss_weight(p, tt, schedule)[0]):.3g}",
                    dm.target(p, x0, eps, tt, schedule)) for p in preds]
        for ax, (label, x) in zip(row, panels):
            ax.imshow(x[0].numpy(), cmap="gray", interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    return fig


def explore_targets(images: dict, t: int = 500, prediction=None, seed: int = 0, schedule=None):
    """show_targets with controls: a t slider (0..T-1) and a prediction selector ("all" or one).

    images as in show_targets. Returns the widget; without widgets, the static Figure for the
    given t and prediction.
    """
    widgets = dm._widgets()
    if widgets is None:
        return show_targets(images, t, prediction, seed, schedule)
    T = _resolve(schedule).T
    slider = widgets.IntSlider(value=int(t), min=0, max=T - 1, description="t", continuous_update=False)
    choice = widgets.Dropdown(options=["all", *dm.PREDICTIONS], value=prediction or "all", description="prediction")
    out = widgets.Output()

    def redraw(_=None):
        pred = None if choice.value == "all" else choice.value
        cols = 7 if pred is None else 4
        dm._redraw(out, lambda fig: show_targets(images, slider.value, pred, seed, schedule, fig=fig),
                   (2.1 * cols, 2.3 * len(images)))
    slider.observe(redraw, names="value")
    choice.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([slider, choice]), out])


def x0_error_by_t(model, prediction: str, x0, timesteps, seed: int = 0, clip: bool = False, schedule=None) -> np.ndarray:
    """Measured x0 error of a trained model at each timestep: float64 numpy (K,).

    x0: held-out clean data (B, C, *S) in [-1, 1]; timesteps: K integers in 0..T-1. For each
    t: x_t = alpha_t x0 + sigma_t eps (eps drawn once from seed, shared by every t), u =
    model(x_t, t), x0_hat = dm.to_x0_eps(prediction, u, x_t, t, clip=clip)[0], and the entry is
    mean((x0_hat - x0)^2). clip=False (default) shows the raw conversion; the sampler clips.
    """
    noising = _resolve(schedule, prediction)
    device = next(model.parameters()).device
    x0 = torch.as_tensor(x0, dtype=torch.float32).cpu()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    errors = []
    with torch.inference_mode():
        for t in timesteps:
            tt = torch.full((x0.shape[0],), int(t), dtype=torch.long)
            x_t = noising.add_noise(x0, eps, tt)
            u = model(x_t.to(device), tt.to(device)).float().cpu()
            x0_hat, _ = dm.to_x0_eps(prediction, u, x_t, tt, schedule, clip)
            errors.append(float(((x0_hat - x0) ** 2).mean()))
    return np.array(errors, dtype=np.float64)


def plot_curves(curves: dict, x=None, xlabel="t", ylabel="", title=None, logy=True, fig=None):
    """Line plot of named curves {name: (K,) values} against x (K,) (default 0..K-1), log y by
    default; e.g. x0_error_by_t per prediction. Returns the Figure."""
    fig = _new_figure(fig, (6, 3.8))
    ax = fig.subplots()
    for name, y in curves.items():
        y = np.asarray(y, dtype=np.float64)
        ax.plot(np.arange(len(y)) if x is None else np.asarray(x), y, marker="o", ms=3, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend()
    return fig


# --- Notebook 02: trajectories, cost, controls ---------------------------------------------------


def _planes(x) -> dict:
    """{plane: 2-D float32 array}: the three centre planes of a 3-D volume, or {"image": x} in 2-D."""
    x = x.detach().float().cpu() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x, np.float32))
    if x.ndim == 2:
        return {"image": x.numpy().copy()}
    return {k: np.ascontiguousarray(v) for k, v in dm.orthogonal_slices(x).items()}


class Trajectory:
    """A dm.sample() callback that records the denoising path of one item.

    traj = Trajectory(); dm.sample(model, prediction, ..., callback=traj); view_trajectory(traj).
    After every step it keeps t, and the centre planes (3-D: axial, coronal, sagittal; 2-D:
    the image) of x_t (the new state after the step) and of x0_hat (the model's clean estimate
    at that step), on the CPU: a few MB for 64 steps at 192 x 224 x 192.
    Attributes: t (list of int), x_t, x0_hat (lists of {plane: 2-D array}).
    """

    def __init__(self, item: int = 0):
        self.item, self.t, self.x_t, self.x0_hat = item, [], [], []

    def __call__(self, i, t, x_t, x0_hat):
        self.t.append(int(t))
        self.x_t.append(_planes(x_t[self.item, 0]))
        self.x0_hat.append(_planes(x0_hat[self.item, 0]))

    def __len__(self):
        return len(self.t)


def _check_recorded(trajectory: Trajectory) -> int:
    n = len(trajectory)
    if n == 0:
        raise ValueError("the trajectory is empty: pass it to dm.sample(..., callback=trajectory) first")
    return n


def show_trajectory(trajectory: Trajectory, steps=None, plane=None, fig=None):
    """Columns of a recorded trajectory, one per step index k (0-based; default: 6 evenly
    spaced, first and last included): on top the state x after step k (at the next timestep
    t_prev; the sample after the last step), below the model's x0_hat at step k's t. One plane
    (default the first recorded: axial in 3-D); grey range [-1, 1]. Returns the Figure (2 x K)."""
    n = _check_recorded(trajectory)
    steps = sorted({int(round(s)) for s in np.linspace(0, n - 1, min(n, 6))}) if steps is None else list(steps)
    plane = plane or next(iter(trajectory.x_t[0]))
    fig = _new_figure(fig, (2 * len(steps) + 0.5, 4.4))
    axes = fig.subplots(2, len(steps), squeeze=False)
    for c, k in enumerate(steps):
        t, t_prev = trajectory.t[k], trajectory.t[k + 1] if k + 1 < n else -1
        titles = (f"step {k + 1}/{n}: x at t = {t_prev}" if t_prev >= 0 else f"step {n}/{n}: the sample",
                  f"x0_hat at t = {t}")
        for r, (title, record) in enumerate(zip(titles, (trajectory.x_t, trajectory.x0_hat))):
            ax = axes[r, c]
            ax.imshow(record[k][plane], cmap="gray", origin="lower" if plane != "image" else "upper",
                      vmin=-1, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return fig


def view_trajectory(trajectory: Trajectory, plane=None):
    """A step slider (and a plane selector in 3-D) over a recorded Trajectory, showing x_t and
    x0_hat at that step. Returns the widget; without widgets, show_trajectory's Figure."""
    widgets = dm._widgets()
    if widgets is None:
        return show_trajectory(trajectory, plane=plane)
    n = _check_recorded(trajectory)
    planes = list(trajectory.x_t[0])
    step = widgets.IntSlider(value=n, min=1, max=n, description="step", continuous_update=False)
    which = widgets.Dropdown(options=planes, value=plane or planes[0], description="plane")
    out = widgets.Output()

    def redraw(_=None):
        dm._redraw(out, lambda fig: show_trajectory(trajectory, [step.value - 1], which.value, fig=fig), (4.5, 4.6))
    step.observe(redraw, names="value")
    which.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([step, which] if len(planes) > 1 else [step]), out])


class measure:
    """Time a block and record its memory: `with measure(device) as cost: ...`.

    device: a torch.device or name; None picks CUDA when available, else the CPU.
    On exit cost (a dict) holds seconds (wall clock; CUDA synchronised first), memory_mb and
    memory (a sentence saying what was measured): on CUDA the peak allocated by torch during
    the block (torch.cuda.max_memory_allocated, reset on entry); on CPU the process's peak
    resident set size so far (resource.getrusage; it cannot be reset, so it includes whatever
    the process held before, e.g. loaded models).
    """

    def __init__(self, device=None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.cost = {}

    def __enter__(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()
        return self.cost

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.cost["seconds"] = time.perf_counter() - self._start
        if self.device.type == "cuda":
            mb, what = torch.cuda.max_memory_allocated(self.device) / 2**20, "GPU memory, peak allocated by torch"
        else:
            try:
                import resource
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
            except ImportError:  # Windows
                mb = float("nan")
            what = "CPU memory, peak resident size of this process so far"
        self.cost.update(memory_mb=mb, memory=f"{mb:,.0f} MB {what}")
        return False


def sampling_panel(models: dict, noise, steps: int = 64, eta: float = 0.0, spacing: str = "linspace",
                   prediction=None):
    """Controls for dm.sample(): prediction, steps, eta, timestep grid (ipywidgets) and a Sample
    button; shows the result's three planes titled with its seconds per step.

    models: {prediction: model}; noise: (1, C, *S), the same start for every run (so runs
    differ only by the controls). It samples once with the given values when created. Returns
    the widget; without widgets, the Figure of that one sample.
    """
    def run(pred, n, e, grid, fig=None):
        grid = "linspace" if dm.canonical_prediction(pred) == "rflow" else grid  # rflow has one grid
        with measure(next(models[pred].parameters()).device) as cost:
            x = dm.sample(models[pred], pred, noise=noise, steps=n, eta=e, spacing=grid, progress=False)
        return dm.show_slices(x[0, 0], title=f"{pred}: {n} {grid} steps, eta {e:g}: "
                                             f"{cost['seconds'] / n:.2f} s per step", fig=fig, vmin=-1, vmax=1)
    prediction = prediction or next(iter(models))
    widgets = dm._widgets()
    if widgets is None:
        return run(prediction, steps, eta, spacing)
    choice = widgets.Dropdown(options=list(models), value=prediction, description="prediction")
    n = widgets.IntSlider(value=steps, min=2, max=max(250, steps), description="steps", continuous_update=False)
    e = widgets.FloatSlider(value=eta, min=0.0, max=1.0, step=0.1, description="eta", continuous_update=False)
    grid = widgets.Dropdown(options=list(dm.SPACINGS), value=spacing, description="t grid")
    button = widgets.Button(description="Sample", button_style="primary")
    out = widgets.Output()

    def redraw(_=None):
        button.disabled = True
        try:
            dm._redraw(out, lambda fig: run(choice.value, n.value, e.value, grid.value, fig), (10, 3.8))
        finally:
            button.disabled = False
    button.on_click(redraw)
    redraw()
    return widgets.VBox([widgets.HBox([choice, n]), widgets.HBox([e, grid, button]), out])


# --- Notebook 03: loss curves ------------------------------------------------------------------


def plot_losses(histories: dict, window: int | None = None, fig=None):
    """Training loss curves {name: [loss per step]}: the raw losses faint, a moving average
    (window steps, default max(1, steps // 20)) solid, log y. Each prediction's loss lives in
    its own target space, so compare shapes, not heights. Returns the Figure."""
    fig = _new_figure(fig, (7, 4))
    ax = fig.subplots()
    for name, h in histories.items():
        h = np.asarray(h, dtype=np.float64)
        w = max(1, min(len(h), window or len(h) // 20))
        steps = np.arange(1, len(h) + 1)
        line, = ax.plot(steps, h, alpha=0.25, lw=0.8)
        smooth = np.convolve(h, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, color=line.get_color(), label=f"{name} (mean of {w})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (own target space)")
    ax.legend()
    return fig


def plot_long_runs(runs: dict, mark: int | None = None, fig=None):
    """The loss histories the shipped teaching models carry ({name: load_model metadata}, with
    "history": the mean loss of every "history_every" steps), log y, and a dashed line at step
    `mark` (where the student's runs stopped). Returns the Figure."""
    fig = _new_figure(fig, (7, 4))
    ax, every = fig.subplots(), 1
    for name, meta in runs.items():
        h = np.asarray(json.loads(meta["history"]) if isinstance(meta["history"], str) else meta["history"], float)
        every = int(meta.get("history_every", 1))
        ax.plot(every * np.arange(1, len(h) + 1), h, label=f"{name} ({every * len(h)} steps)")
    if mark:
        ax.axvline(mark, ls="--", color="k", lw=1, label=f"your runs: {mark} steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (own target space, mean of {every})")
    ax.legend()
    return fig


# --- Notebook 04: image-level checks (intensity histograms, diversity by 3-D SSIM) ---------------


def _as_batch(volumes) -> torch.Tensor:
    """A sequence of volumes or an (N, ...) array/tensor -> float32 tensor (N, X, Y, Z)."""
    def as_tensor(v):
        return torch.as_tensor(v if torch.is_tensor(v) else np.asarray(v)).float()
    whole = torch.is_tensor(volumes) or isinstance(volumes, np.ndarray)
    x = as_tensor(volumes) if whole else torch.stack([as_tensor(v) for v in volumes])
    if x.ndim == 5 and x.shape[1] == 1:                                     # (N, 1, X, Y, Z) -> (N, X, Y, Z)
        x = x[:, 0]
    if x.ndim != 4:
        raise ValueError(f"expected N volumes (N, X, Y, Z) or (N, 1, X, Y, Z), got shape {tuple(x.shape)}")
    return x


def psnr(x, truth, where=None, data_range: float = 2.0) -> float:
    """Mean PSNR in dB over a batch: 10 log10(data_range^2 / MSE) per volume (2 for [-1, 1]), then
    averaged; `where` (a bool mask of x's shape) scores only those voxels."""
    x, truth = _as_batch(x).double(), _as_batch(truth).double()
    where = torch.ones_like(x, dtype=torch.bool) if where is None else _as_batch(where).bool()
    mse = torch.stack([((a - b)[w] ** 2).mean() for a, b, w in zip(x, truth, where)])
    return float((10 * torch.log10(data_range**2 / mse.clamp(min=1e-12))).mean())


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

    def kl(u):
        keep = u > 0
        return float(np.sum(u[keep] * np.log2(u[keep] / m[keep])))
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

    def blur(v):
        return _gaussian_blur3d(v, sigma, radius)
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


# --- Notebook 04: what the regional-volume test can detect at its sample size ----------------------


def smallest_p(n_a: int, n_b: int, n_tests: int = 1, n_permutations=None) -> dict:
    """The smallest p-values dm.permutation_test, and Holm's correction over n_tests structures
    (dm.adjust_pvalues), can give with n_a against n_b subjects, whatever the data.

    The test is two-sided on the difference of means over the C = C(n_a + n_b, n_a) ways to split
    the pooled subjects. At the most extreme split (every a above every b) only that split, and
    when n_a == n_b also its mirror (the groups swapped give -D), reach |D_obs|: the exact test's
    smallest p is k / C, k = 2 if n_a == n_b else 1. dm.permutation_test draws n_permutations
    splits at random and returns (1 + hits) / (1 + n_permutations); at that split it expects
    n_permutations k / C hits, so its smallest p is about (1 + n_permutations k / C) /
    (1 + n_permutations), never below 1 / (1 + n_permutations). Holm multiplies the smallest p of
    the family by the family's size: the smallest adjusted p is min(1, n_tests p).
    Returns {"splits": C, "exact": k / C, "p": the test's smallest p (exact when n_permutations
    is None), "holm": the smallest Holm-adjusted p}.
    """
    if min(n_a, n_b) < 1 or n_tests < 1 or (n_permutations is not None and n_permutations < 1):
        raise ValueError(f"smallest_p needs n_a, n_b, n_tests >= 1 and n_permutations None or >= 1, "
                         f"got {n_a}, {n_b}, {n_tests}, {n_permutations}")
    splits = math.comb(n_a + n_b, n_a)
    exact = (2 if n_a == n_b else 1) / splits
    p = exact if n_permutations is None else (1 + n_permutations * exact) / (1 + n_permutations)
    return {"splits": splits, "exact": exact, "p": p, "holm": min(1.0, n_tests * p)}


def detection_limits(n_a: int, n_b: int, n_tests: int, n_permutations=None, alpha: float = 0.05) -> str:
    """In words, what the permutation test with Holm over n_tests structures can and cannot detect
    with n_a against n_b subjects: its smallest possible adjusted p (smallest_p), and so whether
    anything at all can reach adjusted p < alpha; if something can, the difference it finds 4 times
    in 5 (80 % power at level alpha / n_tests, Holm's first step), in standard deviations, from the
    normal approximation d = (z(1 - alpha / (2 n_tests)) + z(0.8)) sqrt(1 / n_a + 1 / n_b)."""
    from statistics import NormalDist
    s = smallest_p(n_a, n_b, n_tests, n_permutations)
    count = f"{s['splits']:,}" if s["splits"] < 1e6 else f"{float(s['splits']):.1e}"
    how = (f"{n_permutations:,} random splits of the C({n_a + n_b}, {n_a}) = {count}" if n_permutations
           else f"all C({n_a + n_b}, {n_a}) = {count} splits")
    text = (f"{n_a} samples against {n_b}, {n_tests} structures, {how}: the smallest p the test can give is "
            f"{'about ' if n_permutations else ''}{s['p']:.2g}, and after Holm over the {n_tests} structures "
            f"{s['holm']:.2g}.")
    if s["holm"] >= alpha:
        return text + (f" That is not below {alpha:g}: NO structure can be significant at this sample size, "
                       "however different the sets are. Read the effect sizes (Cohen's d) and W1 instead, "
                       "or draw more samples.")
    z = NormalDist().inv_cdf
    d = (z(1 - alpha / (2 * n_tests)) + z(0.8)) * math.sqrt(1 / n_a + 1 / n_b)
    return text + (f" So differences can be significant at adjusted p < {alpha:g}: one of about {d:.2g} standard "
                   "deviations is found 4 times in 5 (normal approximation); smaller ones are mostly missed.")


def detection_limits_of(rows, n_permutations=None, alpha: float = 0.05) -> str:
    """detection_limits for each size in a dm.comparison_report table (its n_synthetic, n_real
    and the number of structures per set): one line per distinct size, naming its sets."""
    sets = {}
    for r in rows:
        sets.setdefault(r["set"], []).append(r)
    sizes = {}
    for name, rs in sets.items():
        sizes.setdefault((int(rs[0]["n_synthetic"]), int(rs[0]["n_real"]), len(rs)), []).append(name)
    if not sizes:
        raise ValueError("detection_limits_of: the table has no rows")
    return "\n".join(f"{', '.join(names)}: {detection_limits(*size, n_permutations, alpha)}"
                     for size, names in sorted(sizes.items()))


# --- Notebooks 03 and 04: is a sample a recognisable phantom? how close is a set to the truth? ----

#: Quantile levels at which PhantomScore.w1 compares intensity distributions.
LEVELS = np.linspace(0.0005, 0.9995, 1000)
#: The tissue labels tDice scores: scalp, skull, CSF (+ ventricles: same mean), cortex, white matter.
TISSUES = (1, 2, 3, 4, 5)


def nearest_tissue(x) -> np.ndarray:
    """Label each voxel by the nearest PHANTOM_INTENSITIES mean (shared means: the lowest label)."""
    means = np.array([dm.PHANTOM_INTENSITIES[k] for k in sorted(dm.PHANTOM_INTENSITIES)], np.float32)
    return np.abs(np.asarray(x, np.float32)[..., None] - means).argmin(-1)


class PhantomScore:
    """Segmentation-free scores of phantom-like volumes against n reference phantoms (seeds 20000..)
    at a grid (the criterion of tests/bench_lab.py and tests/bench_train.py):
      w1     Wasserstein-1 distance of the voxel intensities to the references' pooled (1000 quantiles);
      tdice  mean Dice over scalp, skull, CSF, cortex, WM, voxels labelled by nearest tissue mean,
             against the best-matching reference;
    recognisable: w1 <= 0.12 and tdice >= 0.45. Real phantoms score tDice 0.50-0.71, the blurred
    mean head 0.36, noise 0.09 (docs/methods.md#teaching-recipe has the baselines per grid)."""

    def __init__(self, shape, n=16):
        images = [dm.phantom(20_000 + i, tuple(shape))[0] for i in range(n)]
        self.shape = tuple(shape)
        self.quantiles = np.quantile(np.concatenate([x.ravel() for x in images]), LEVELS)
        self.labels = [nearest_tissue(x) for x in images]

    def w1(self, x) -> float:
        return float(np.abs(np.quantile(np.asarray(x).ravel(), LEVELS) - self.quantiles).mean())

    def tdice(self, x) -> float:
        s = nearest_tissue(x)

        def dice(r):
            return np.mean([2 * ((s == c) & (r == c)).sum() / max((s == c).sum() + (r == c).sum(), 1) for c in TISSUES])
        return float(max(dice(r) for r in self.labels))

    def recognisable(self, x) -> bool:
        return self.w1(x) <= 0.12 and self.tdice(x) >= 0.45

    def table(self, sets: dict) -> list:
        """{name: volumes (N, X, Y, Z) or (N, 1, X, Y, Z)} -> rows: name, n, mean W1, mean tDice,
        recognisable ("k of N"), for dm.format_table."""
        rows = []
        for name, volumes in sets.items():
            x = _as_batch(volumes).numpy()
            w1s, dices = [self.w1(v) for v in x], [self.tdice(v) for v in x]
            ok = sum(w <= 0.12 and d >= 0.45 for w, d in zip(w1s, dices))
            rows.append({"model": name, "n": len(x), "W1": f"{np.mean(w1s):.3f}", "tDice": f"{np.mean(dices):.2f}",
                         "recognisable": f"{ok} of {len(x)}"})
        return rows


def comparison_summary(rows, baseline="segmented", alpha=0.05) -> str:
    """One paragraph, from dm.comparison_report's table rows, on which set is closest to the truth.

    Per set: mean W1 in units of the truth's SD over the structures, mean |Cohen's d|, and how
    many structures differ at adjusted p < alpha. Sets are ranked by mean W1 (smaller is closer):
    W1 compares whole distributions, while |d| shrinks when a model's volumes scatter widely (a
    model far from the truth with a huge spread can have a small d). The baseline set (real
    phantoms put through the segmenter) is the floor. Every set whose name contains "noise" gets
    a sentence on whether noise prediction lags the others."""
    stats = {}
    for r in rows:
        s = stats.setdefault(r["set"], {"d": [], "w": [], "hits": 0})
        s["d"].append(abs(r["cohen_d"]))
        s["w"].append(r["wasserstein"] / max(r["sd_real"], 1e-12))
        s["hits"] += r["p_adjusted"] < alpha
    models = sorted((k for k in stats if k != baseline), key=lambda k: np.mean(stats[k]["w"]))
    if not models:
        raise ValueError(f"comparison_summary: no set besides the baseline {baseline!r}")
    n = len(stats[models[0]]["d"])

    def describe(k):
        s = stats[k]
        return (f"W1 {np.mean(s['w']):.2f} truth-SDs, mean |d| {np.mean(s['d']):.2f}, "
                f"{s['hits']} of {n} structures different at adjusted p < {alpha:g}")
    text = [f"Closest to the truth: {models[0]} ({describe(models[0])})."]
    if len(models) > 1:
        text.append(f"Farthest: {models[-1]} ({describe(models[-1])}).")
        text.append("Order, closest first: " + ", ".join(models) + ".")
    if baseline in stats:
        text.append(f"The segmenter alone (real phantoms, '{baseline}') gives {describe(baseline)}: "
                    "differences of that size are the instrument's, not a model's.")
    for k in (m for m in models if "noise" in m):
        rank = models.index(k) + 1
        others = [np.mean(stats[m]["w"]) for m in models if "noise" not in m]
        lags = bool(others) and np.mean(stats[k]["w"]) > max(others)
        text.append(f"Noise prediction ({k}) ranks {rank} of {len(models)}: "
                    + ("it lags every other parameterization." if lags else "it does not lag all the others here."))
    return " ".join(text)
