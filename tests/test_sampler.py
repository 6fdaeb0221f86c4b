"""Section 6 (sampler): DDIM against an independent implementation written here from
docs/math.md (#conversions, #ddim-update, #timestep-grids)."""
import numpy as np
import pytest
import torch

import ddpm_mini as dm
from conftest import SMALL_UNET, TINY_UNET, randomize

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


class Toy(torch.nn.Module):
    """A deterministic stand-in network whose output depends on x and t (cheap and exact)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))
        self.in_channels = 1

    def forward(self, x, t):
        tt = t.float().reshape(-1, *([1] * (x.ndim - 1))) / 1000
        return self.w * torch.tanh(x) * (1 - tt) + 0.3 * x * tt + 0.05


def reference_ddim(model, prediction, noise, grid, eta=0.0, clip=True, z_generator=None, T=1000, beta_end=2e-2,
                   raw_eps=False):
    """x_s = alpha_s x0 + sqrt(sigma_s^2 - sigma_eta^2) eps + sigma_eta z, in float64 numpy. raw_eps: eps
    from the raw output as MONAI's older DDIM wrote it per prediction, only x0 clipped."""
    abar = np.cumprod(1 - np.linspace(1e-4, beta_end, T))
    x = noise.double().numpy()
    for t, s in grid:
        u = model(torch.from_numpy(x).float(), torch.full((x.shape[0],), t)).double().detach().numpy()
        a, sg = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
        x0 = {"noise": (x - sg * u) / a, "sample": u, "velocity": a * x - sg * u,
              "flow": (x - sg * u) / (a + sg)}[prediction]
        raw = {"noise": u, "sample": (x - a * u) / sg, "velocity": a * u + sg * x,
               "flow": (x + a * u) / (a + sg)}[prediction]
        if clip:
            x0 = np.clip(x0, -1, 1)
        eps = raw if raw_eps else (x - a * x0) / sg
        if s < 0:
            x = x0
            continue
        a_s, s_s = np.sqrt(abar[s]), np.sqrt(1 - abar[s])
        var = eta**2 * (s_s**2 / sg**2) * (1 - abar[t] / abar[s])
        x = a_s * x0 + np.sqrt(s_s**2 - var) * eps
        if eta > 0:
            x = x + np.sqrt(var) * torch.randn(x.shape, generator=z_generator).double().numpy()
    return x


def reference_grid(steps, spacing, T=1000):
    """The grids of docs/math.md#timestep-grids, written out again."""
    if spacing == "linspace":
        ts = [int(v) for v in np.round(np.linspace(0, T - 1, steps))[::-1]]
        return [(t, ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)]
    ts = list((np.arange(steps) * (T // steps))[::-1])
    return [(int(t), int(t - T // steps) if t - T // steps >= 0 else -1) for t in ts]


@pytest.mark.parametrize("spacing", dm.SPACINGS)
@pytest.mark.parametrize("steps", [2, 3, 10, 64, 999])
def test_grids(spacing, steps):
    pairs = dm.timestep_pairs(steps, spacing)
    assert pairs == reference_grid(steps, spacing)
    ts = [t for t, _ in pairs]
    assert len(ts) == steps and ts == sorted(ts, reverse=True) and len(set(ts)) == steps
    assert pairs[-1][1] == -1 and all(0 <= t < 1000 for t in ts)
    if spacing == "linspace":  # each step lands on the next listed timestep
        assert ts[0] == 999 and ts[-1] == 0 and all(p[1] == q[0] for p, q in zip(pairs, pairs[1:]))


def test_grid_values_and_errors():
    assert dm.timestep_pairs(4, "leading") == [(750, 500), (500, 250), (250, 0), (0, -1)]
    assert dm.timestep_pairs(4) == [(999, 666), (666, 333), (333, 0), (0, -1)]
    # docs/math.md#timestep-grids: numpy rounds halves to even (n = 7), and the n = 64 grids
    assert [t for t, _ in dm.timestep_pairs(7)] == [999, 832, 666, 500, 333, 166, 0]
    assert dm.timestep_pairs(64)[:2] == [(999, 983), (983, 967)] and dm.timestep_pairs(64)[-2:] == [(16, 0), (0, -1)]
    assert dm.timestep_pairs(64, "leading")[0] == (945, 930) and dm.timestep_pairs(64, "leading")[-1] == (0, -1)
    for bad in (0, 1, 1001, 2.5, True):
        with pytest.raises(ValueError, match="steps must be an integer"):
            dm.timestep_pairs(bad)
    assert dm.timestep_pairs(1, "leading") == [(0, -1)]
    with pytest.raises(ValueError, match="linspace, leading"):
        dm.timestep_pairs(10, "trailing")


@pytest.mark.parametrize("prediction", dm.PREDICTIONS)
@pytest.mark.parametrize("spacing,steps", [("linspace", 2), ("linspace", 17), ("leading", 5), ("leading", 64)])
@pytest.mark.parametrize("clip", [True, False])
def test_sampler_matches_reference_ddim(prediction, spacing, steps, clip):
    model = Toy()
    noise = torch.randn(2, 1, 4, 5, 6, generator=torch.Generator().manual_seed(7))
    ours = dm.sample(model, prediction, noise=noise, steps=steps, spacing=spacing, clip=clip, progress=False)
    ref = reference_ddim(model, prediction, noise, reference_grid(steps, spacing), clip=clip)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=2e-5)
    if clip:
        assert ours.abs().max() <= 1


@pytest.mark.parametrize("prediction", dm.PREDICTIONS)
@pytest.mark.parametrize("spacing", dm.SPACINGS)
def test_paper_era_sampler_takes_eps_from_the_raw_output(prediction, spacing):
    """recompute_eps=False: eps from the unclipped output (the per-prediction formulas of MONAI's older
    DDIM), x0 clipped; it differs from the default where the clip bites (the Toy's x0 leaves [-1, 1])."""
    model = Toy()
    with torch.no_grad():
        model.w.fill_(3.0)                                   # outputs up to 3: x0 often outside [-1, 1]
    noise = torch.randn(2, 1, 4, 5, 6, generator=torch.Generator().manual_seed(9))
    ours = dm.sample(model, prediction, noise=noise, steps=10, spacing=spacing, recompute_eps=False, progress=False)
    ref = reference_ddim(model, prediction, noise, reference_grid(10, spacing), raw_eps=True)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=2e-5)
    u, x_t, t = torch.full((1, 1, 2, 2, 2), 3.0), torch.full((1, 1, 2, 2, 2), 0.5), torch.tensor([500])
    x0, eps = dm.to_x0_eps(prediction, u, x_t, t)                        # the clip bites for every prediction here
    x0_raw_eps, raw_eps = dm.to_x0_eps(prediction, u, x_t, t, recompute_eps=False)
    assert torch.equal(x0, x0_raw_eps) and x0.abs().max() == 1 and (eps - raw_eps).abs().min() > 0.1
    unclipped = dm.sample(model, prediction, noise=noise, steps=10, spacing=spacing, clip=False, progress=False)
    assert torch.allclose(dm.sample(model, prediction, noise=noise, steps=10, spacing=spacing, clip=False,
                                    recompute_eps=False, progress=False), unclipped, atol=1e-5)  # same without a clip


@pytest.mark.parametrize("prediction,monai_name", [("noise", "epsilon"), ("sample", "sample"), ("velocity", "v_prediction")])
@pytest.mark.parametrize("steps", [10, 64])
def test_paper_era_sampler_matches_monai_ddim_step(prediction, monai_name, steps):
    """The paper-era mode against MONAI's DDIMScheduler.step (which keeps the raw eps and steps to t - T // n)
    run on the leading grid, with a small random U-Net: equal to 5e-5. MONAI keeps its schedule and does
    the update in float32, the kit computes the schedule in float64; x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
    multiplies float32 rounding (6e-8 relative) by up to 1 / sqrt(abar_999) = 158, so after 64 steps single
    voxels differ by about 1.5e-5 (seen with MONAI 1.6.1). The default mode (eps recomputed from the clipped
    x0) differs from it by 4e-3 (velocity) to 1.9 (noise) here."""
    schedulers = pytest.importorskip("monai.networks.schedulers")
    model = randomize(dm.UNet(**TINY_UNET), seed=6).eval()
    noise = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    ddim = schedulers.DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=2e-2,
                                    clip_sample=True, prediction_type=monai_name)
    ddim.set_timesteps(steps)
    ddim.timesteps = torch.arange(steps).flip(0) * (1000 // steps)   # the leading grid of the paper-era MONAI
    x = noise.clone()
    with torch.inference_mode():
        for t in ddim.timesteps:
            x, _ = ddim.step(model(x, torch.full((1,), int(t))), int(t), x)
    ours = dm.sample(model, prediction, noise=noise, steps=steps, spacing="leading", recompute_eps=False, progress=False)
    assert [t for t, _ in dm.timestep_pairs(steps, "leading")] == ddim.timesteps.tolist()
    np.testing.assert_allclose(ours.numpy(), x.numpy(), rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("prediction", dm.PREDICTIONS)
def test_sampler_follows_the_schedule_it_is_given(prediction):
    """Another schedule (T = 500, beta_end = 0.03): its grid and its alpha, sigma, deterministic and
    stochastic; the default schedule gives a different result."""
    model, short = Toy(), dm.Schedule(T=500, beta_end=0.03)
    noise = torch.randn(2, 1, 4, 5, 6, generator=torch.Generator().manual_seed(8))
    assert dm.timestep_pairs(6, schedule=short) == reference_grid(6, "linspace", T=500)
    assert dm.timestep_pairs(6, "leading", schedule=short) == reference_grid(6, "leading", T=500)
    for spacing in dm.SPACINGS:
        ours = dm.sample(model, prediction, noise=noise, steps=6, spacing=spacing, schedule=short, progress=False)
        ref = reference_ddim(model, prediction, noise, reference_grid(6, spacing, T=500), T=500, beta_end=0.03)
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=2e-5)
        default = dm.sample(model, prediction, noise=noise, steps=6, spacing=spacing, progress=False)
        assert not torch.allclose(ours, default)
    g = torch.Generator().manual_seed(11)
    ours = dm.sample(model, prediction, shape=(2, 1, 3, 4, 5), steps=4, eta=0.5, schedule=short, generator=g,
                     progress=False)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(2, 1, 3, 4, 5, generator=g)
    ref = reference_ddim(model, prediction, noise, reference_grid(4, "linspace", T=500), eta=0.5, z_generator=g,
                         T=500, beta_end=0.03)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match=r"2\.\.500"):
        dm.sample(model, prediction, noise=noise, steps=501, schedule=short, progress=False)


@pytest.mark.parametrize("prediction", ["velocity", "noise"])
def test_stochastic_sampler_matches_reference(prediction):
    model = Toy()
    g = torch.Generator().manual_seed(11)
    ours = dm.sample(model, prediction, shape=(2, 1, 3, 4, 5), steps=8, eta=0.8, generator=g, progress=False)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(2, 1, 3, 4, 5, generator=g)  # the same order of draws: start noise, then z per step
    ref = reference_ddim(model, prediction, noise, reference_grid(8, "linspace"), eta=0.8, z_generator=g)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=2e-5)


def test_determinism_batches_and_callback():
    model = randomize(dm.UNet(**TINY_UNET), seed=1)
    seen = []
    a = dm.sample(model, "flow", shape=(2, 1, 8, 8, 8), steps=4, generator=torch.Generator().manual_seed(0),
                  progress=False, callback=lambda i, t, x, x0: seen.append((i, t, tuple(x.shape), float(x0.abs().max()))))
    b = dm.sample(model, "flow", shape=(2, 1, 8, 8, 8), steps=4, generator=torch.Generator().manual_seed(0), progress=False)
    c = dm.sample(model, "flow", shape=(2, 1, 8, 8, 8), steps=4, generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert [s[:2] for s in seen] == [(0, 999), (1, 666), (2, 333), (3, 0)]
    assert all(s[2] == (2, 1, 8, 8, 8) and s[3] <= 1 for s in seen)
    # items of a batch are independent: sampling item 0 alone gives the same result
    noise = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    alone = dm.sample(model, "flow", noise=noise[:1], steps=4, progress=False)
    torch.testing.assert_close(alone[0], a[0], rtol=1e-5, atol=1e-5)
    assert model.training  # the sampler restores the mode it found


def test_sampler_bad_inputs():
    model = Toy()
    with pytest.raises(ValueError, match="unknown prediction"):
        dm.sample(model, "score", shape=(1, 1, 2, 2, 2), progress=False)
    for eta in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            dm.sample(model, "flow", shape=(1, 1, 2, 2, 2), eta=eta, progress=False)
    with pytest.raises(ValueError, match="disagrees"):
        dm.sample(model, "flow", shape=(1, 1, 2, 2, 2), noise=torch.zeros(1, 1, 3, 3, 3), progress=False)
    with pytest.raises(ValueError, match="for CUDA"):
        dm.sample(model, "flow", shape=(1, 1, 2, 2, 2), dtype="float16", progress=False)
    with pytest.raises(ValueError, match="unknown dtype"):
        dm.sample(model, "flow", shape=(1, 1, 2, 2, 2), dtype="int8", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_on_cuda_tracks_float32(dtype):
    model = randomize(dm.UNet(**dm.MEDFORJ_UNET), seed=2, scale=0.02).cuda()
    noise = torch.randn(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = dm.sample(model, "flow", noise=noise, steps=8, dtype="float32", progress=False)
    low = dm.sample(model, "flow", noise=noise, steps=8, dtype=dtype, progress=False)
    assert torch.isfinite(low).all() and low.dtype == torch.float32
    assert ((low - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_unet_under_autocast_tracks_float32(grad):
    """Autocast (what CUDA sampling and training run under) on the CPU in bfloat16: the same code
    paths (split 1x1 convs on the way up, the folded up-sampler; in place without autograd, out of
    place with it) must accept mixed dtypes. bfloat16 keeps 8 significant bits (2^-8 = 0.4% per
    rounding); 2% allows a few roundings to add up. Forward only: the CPU's bfloat16 conv3d
    weight-gradient kernel itself sometimes returns non-finite values (a plain nn.Conv3d shows it)."""
    model = randomize(dm.UNet(**SMALL_UNET), seed=5)
    x, t = torch.randn(2, 2, 8, 12, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 800])
    with torch.no_grad():
        ref = model(x, t)
    with torch.autocast("cpu", torch.bfloat16), torch.set_grad_enabled(grad):
        low = model(x, t)
    assert low.dtype == torch.bfloat16 and low.requires_grad == grad
    rel = ((low.float() - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.02, rel  # reduced precision did run, and tracks float32


# --- rflow -----------------------------------------------------------------------------------------


def reference_rflow(model, noise, steps, eta=0.0, z_generator=None, T=1000):
    """The authors' rflow sampler from its equations, float64 numpy: t_i = (1 - i/N) T, i = 0..N-1, each step
    to the next, the last to t = 0 (x0_hat); alpha = 1 - t/T, sigma = t/T; x0 = (x_t + sigma u) / (alpha + sigma)
    unclipped; eps = (x_t - alpha x0) / sigma; eta > 0: sigma_eta^2 = eta^2 (s_s^2 / s_t^2)(s_t^2 - (a_t s_s / a_s)^2)."""
    x = noise.double().numpy()
    ts = [T * (1 - i / steps) for i in range(steps)] + [0.0]
    for t, s in zip(ts[:-1], ts[1:]):
        u = model(torch.from_numpy(x).float(), torch.full((x.shape[0],), t, dtype=torch.float32)).double().detach().numpy()
        a, sg = 1 - t / T, t / T
        x0 = (x + sg * u) / (a + sg)
        eps = (x - a * x0) / sg
        if s == 0:
            x = x0
            continue
        a_s, s_s = 1 - s / T, s / T
        var = eta**2 * (s_s**2 / sg**2) * (sg**2 - (a * s_s / a_s) ** 2)
        x = a_s * x0 + np.sqrt(max(s_s**2 - var, 0)) * eps
        if eta > 0:
            x = x + np.sqrt(var) * torch.randn(x.shape, generator=z_generator).double().numpy()
    return x


@pytest.mark.parametrize("steps", [1, 5, 64])
def test_rflow_sampler_matches_reference(steps):
    model = Toy()
    with torch.no_grad():
        model.w.fill_(3.0)
    noise = torch.randn(2, 1, 4, 5, 6, generator=torch.Generator().manual_seed(4))
    ours = dm.sample(model, "rflow", noise=noise, steps=steps, progress=False)
    np.testing.assert_allclose(ours.numpy(), reference_rflow(model, noise, steps), rtol=1e-4, atol=2e-5)
    assert ours.abs().max() > 1                                                # the authors do not clip rflow
    assert dm.sample(model, "rflow", noise=noise, steps=steps, clip=True, progress=False).abs().max() <= 1


def test_rflow_grid_timesteps_and_errors():
    assert dm.timestep_pairs(4, schedule=dm.RFLOW_SCHEDULE) == [(1000.0, 750.0), (750.0, 500.0), (500.0, 250.0), (250.0, 0.0)]
    assert dm.timestep_pairs(1, schedule=dm.RFLOW_SCHEDULE) == [(1000.0, 0.0)]
    model = _Seen()
    dm.sample(model, "rflow", shape=(1, 1, 2, 2, 2), steps=3, progress=False)
    assert [t.dtype for t in model.seen] == [torch.float32] * 3                   # real timesteps reach the model
    assert [round(float(t[0]), 3) for t in model.seen] == [1000.0, 666.667, 333.333]
    with pytest.raises(ValueError, match="one timestep grid"):
        dm.sample(model, "rflow", shape=(1, 1, 2, 2, 2), steps=3, spacing="leading", progress=False)
    with pytest.raises(ValueError, match="rflow prediction needs a RectifiedFlowSchedule"):
        dm.sample(model, "rflow", shape=(1, 1, 2, 2, 2), steps=3, schedule=dm.DEFAULT_SCHEDULE, progress=False)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        dm.timestep_pairs(0, schedule=dm.RFLOW_SCHEDULE)


def test_stochastic_rflow_sampler_matches_reference():
    model = Toy()
    g = torch.Generator().manual_seed(12)
    ours = dm.sample(model, "rflow", shape=(2, 1, 3, 4, 5), steps=6, eta=0.7, generator=g, progress=False)
    g = torch.Generator().manual_seed(12)
    noise = torch.randn(2, 1, 3, 4, 5, generator=g)
    np.testing.assert_allclose(ours.numpy(), reference_rflow(model, noise, 6, eta=0.7, z_generator=g), rtol=1e-4, atol=2e-5)


class _Seen(Toy):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return super().forward(x, t)


# --- DPM-Solver++(2M) (docs/math.md#dpm-solver-2m) -------------------------------------------------


def reference_dpm_solver_2m(model, prediction, noise, grid, clip=True, T=1000):
    """DPM-Solver++(2M) as Lu et al. (2022) write it (their Algorithm 2, data prediction), in float64
    numpy: lambda = log(alpha / sigma), h_i = lambda_{t_i} - lambda_{t_(i-1)}, r_i = h_(i-1) / h_i,
    D_i = (1 + 1/(2 r_i)) x0_(i-1) - 1/(2 r_i) x0_(i-2) (D_1 = x0_0), and
    x_{t_i} = (sigma_{t_i} / sigma_{t_(i-1)}) x_{t_(i-1)} - alpha_{t_i} (exp(-h_i) - 1) D_i;
    the step to the clean end returns x0. rflow (alpha = 1 - t/T, sigma = t/T): its first step,
    from lambda = -inf, has exp(-h) = 0 and no previous x0, so it is the first-order update."""
    if prediction == "rflow":
        coef = lambda t: (1 - t / T, t / T)  # noqa: E731
    else:
        abar = np.cumprod(1 - np.linspace(1e-4, 2e-2, T))
        coef = lambda t: (np.sqrt(abar[t]), np.sqrt(1 - abar[t]))  # noqa: E731
    lam = lambda t: np.log(coef(t)[0] / coef(t)[1]) if coef(t)[0] > 0 else -np.inf  # noqa: E731
    x, x0_prev, h_prev = noise.double().numpy(), None, None
    for t, s in grid:
        tt = torch.full((x.shape[0],), t, dtype=torch.float32 if prediction == "rflow" else torch.long)
        u = model(torch.from_numpy(x).float(), tt).double().detach().numpy()
        a, sg = coef(t)
        x0 = {"noise": lambda: (x - sg * u) / a, "sample": lambda: u, "velocity": lambda: a * x - sg * u,
              "flow": lambda: (x - sg * u) / (a + sg), "rflow": lambda: (x + sg * u) / (a + sg)}[prediction]()
        if clip:
            x0 = np.clip(x0, -1, 1)
        if s < 0 or (prediction == "rflow" and s == 0):
            return x0
        a_s, s_s = coef(s)
        h = lam(s) - lam(t)
        if x0_prev is None or not np.isfinite(h_prev):
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = (s_s / sg) * x + (-a_s * np.expm1(-h)) * d if np.isfinite(h) else s_s / sg * x + a_s * d
        x0_prev, h_prev = x0, h
    return x


@pytest.mark.parametrize("prediction", dm.ALL_PREDICTIONS)
@pytest.mark.parametrize("spacing,steps", [("linspace", 2), ("linspace", 3), ("linspace", 17), ("leading", 10)])
def test_dpm_solver_matches_its_reference(prediction, spacing, steps):
    """Every parameterization through the same x0 converters, clipped as DDIM clips (rflow: not),
    on both VP grids (rflow: its own grid)."""
    if prediction == "rflow" and spacing == "leading":
        pytest.skip("rflow has one grid")
    model = Toy()
    noise = torch.randn(2, 1, 4, 5, 6, generator=torch.Generator().manual_seed(3))
    ours = dm.sample(model, prediction, noise=noise, steps=steps, spacing=spacing, method="dpm++2m", progress=False)
    grid = dm.timestep_pairs(steps, spacing, dm.default_schedule(prediction))
    ref = reference_dpm_solver_2m(model, prediction, noise, grid, clip=prediction != "rflow")
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-4, atol=2e-5)
    ddim = dm.sample(model, prediction, noise=noise, steps=steps, spacing=spacing, progress=False)
    # no second-order step (VP: 2 steps; rflow: its second step follows h = inf, so 1/(2r) = 0): DDIM
    if steps == 2 or prediction == "rflow" and steps <= 3:
        np.testing.assert_allclose(ours.numpy(), ddim.numpy(), atol=1e-6)
    else:
        assert (ours - ddim).abs().max() > 1e-3  # the second-order correction acts


class GaussianDenoiser(torch.nn.Module):
    """The exact network for data x0 ~ N(mu, s^2) per voxel: E[x0 | x_t] = mu + alpha s^2 (x_t - alpha mu)
    / (alpha^2 s^2 + sigma^2), returned as `prediction`'s target (eps = (x_t - alpha x0) / sigma)."""

    def __init__(self, prediction, mu=0.2, s=0.5):
        super().__init__()
        self.prediction, self.mu, self.s, self.w = prediction, mu, s, torch.nn.Parameter(torch.zeros(()))
        self.schedule = dm.default_schedule(prediction)

    def forward(self, x, t):
        a, sg = self.schedule.alpha_sigma(t.cpu(), x.double())
        x = x.double()
        x0 = self.mu + a * self.s**2 * (x - a * self.mu) / (a**2 * self.s**2 + sg**2)
        eps = (x - a * x0) / sg
        out = {"noise": eps, "sample": x0, "velocity": a * eps - sg * x0, "flow": eps - x0, "rflow": x0 - eps}
        return out[self.prediction].float()


def ode_error(prediction, method, steps, mu=0.2, s=0.5):
    """Max |error| of the sampler against the exact probability-flow ODE solution for Gaussian data,
    on which (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) stays constant: at t = 0 (the VP
    grid's last point: its last step only returns x0_hat) or at the clean end (rflow)."""
    schedule = dm.default_schedule(prediction)
    noise = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t_start = dm.timestep_pairs(steps, schedule=schedule)[0][0]
    a_T, s_T = (float(v) for v in schedule.alpha_sigma(torch.tensor([t_start])))
    z = (noise.double() - a_T * mu) / np.sqrt(a_T**2 * s**2 + s_T**2)
    seen = {}
    x = dm.sample(GaussianDenoiser(prediction, mu, s), prediction, noise=noise, steps=steps, method=method, clip=False,
                  callback=lambda i, t, x_t, x0: seen.update({i: x_t.clone()}), progress=False).double()
    if prediction == "rflow":
        return float((x - (mu + s * z)).abs().max())
    a0, s0 = (float(v) for v in schedule.alpha_sigma(torch.tensor([0])))
    return float((seen[steps - 2].double() - (a0 * mu + np.sqrt(a0**2 * s**2 + s0**2) * z)).abs().max())


@pytest.mark.parametrize("prediction", ["noise", "flow", "rflow"])
def test_dpm_solver_converges_at_second_order(prediction):
    """Halving the step size divides DPM-Solver++(2M)'s error by about 4 (second order) and DDIM's by
    about 2 (first order), on Gaussian data where the ideal denoiser and the exact ODE solution are
    known in closed form. Measured orders (log2 of successive error ratios, 40 -> 320 steps): VP
    1.9-2.1, rflow 1.6-1.8 (its first two steps are first order: they start at lambda = -inf),
    DDIM 0.99. From 80 steps on the solver's error is the smaller (at 320: 7-30x)."""
    counts = [40, 80, 160, 320]
    dpm = [ode_error(prediction, "dpm++2m", n) for n in counts]
    ddim = [ode_error(prediction, "ddim", n) for n in counts]
    dpm_order = np.log2(np.array(dpm[:-1]) / np.array(dpm[1:]))
    ddim_order = np.log2(np.array(ddim[:-1]) / np.array(ddim[1:]))
    assert all(dpm_order[1:] > (1.6 if prediction == "rflow" else 1.85)), (dpm, dpm_order)
    assert all(0.9 < o < 1.1 for o in ddim_order), (ddim, ddim_order)
    assert all(d < e for d, e in zip(dpm[1:], ddim[1:])) and dpm[-1] < ddim[-1] / 4, (dpm, ddim)


def test_dpm_solver_options_and_errors(capsys):
    model = Toy()
    with pytest.raises(ValueError, match="unknown sampling method 'euler': use one of ddim, dpm"):
        dm.sample(model, "flow", shape=(1, 1, 2, 2, 2), steps=3, method="euler", progress=False)
    with pytest.raises(ValueError, match="eta must be 0"):
        dm.sample(model, "flow", shape=(1, 1, 2, 2, 2), steps=3, method="dpm++2m", eta=0.5, progress=False)
    with pytest.raises(ValueError, match="recompute_eps True"):
        dm.sample(model, "flow", shape=(1, 1, 2, 2, 2), steps=3, method="dpm++2m", recompute_eps=False, progress=False)
