"""Sections 2-4 (constants, noise schedule, parameterizations and loss), checked against the
equations of docs/math.md (#notation, #schedule, #parameterizations, #implied-x0-weights,
#error-amplification, #conversions, #training-loss)."""
import math

import numpy as np
import pytest
import torch

import ddpm_mini as dm
from conftest import TINY_UNET, randomize

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_names_and_aliases():
    assert dm.PREDICTIONS == ("noise", "sample", "velocity", "flow")
    for alias, name in [("epsilon", "noise"), ("eps", "noise"), ("x0", "sample"), ("clean", "sample"),
                        ("v", "velocity"), ("v_prediction", "velocity"), ("FLOW", "flow"), ("Sample", "sample")]:
        assert dm.canonical_prediction(alias) == name
    with pytest.raises(ValueError, match="noise, sample, velocity, flow"):
        dm.canonical_prediction("score")
    assert dm.IMAGE_SHAPE == (192, 224, 192)
    assert dm.MEDFORJ_UNET["channels"] == (16, 32, 64, 128, 256)
    # the teaching grid: 224 mm / 48 voxels along the longest axis, phantom()'s default voxel there
    assert dm.TEACHING_SHAPE == (40, 48, 40) and all(s % 4 == 0 for s in dm.TEACHING_SHAPE)  # TEACHING_UNET halves twice
    np.testing.assert_allclose(dm._phantom_voxel_mm(dm.TEACHING_SHAPE), [224 / 48] * 3)
    np.testing.assert_array_equal(dm.LPS_AFFINE, np.diag([-1.0, -1.0, 1.0, 1.0]))


def test_schedule_numbers():
    s = dm.Schedule()
    betas = np.linspace(1e-4, 2e-2, 1000)
    abar = np.cumprod(1 - betas)
    assert s.T == 1000 and s.alpha_bar.shape == (1000,)
    np.testing.assert_allclose(s.alpha_bar.numpy(), abar, rtol=1e-12)
    assert abs(s.alpha_bar[999].item() - 4.04e-5) < 0.01e-5  # docs/math.md#schedule: abar_999 = 4.04e-5
    # noise prediction's x0 error amplification at the first step: sigma / alpha ~ 157
    # (docs/math.md#error-amplification)
    alpha, sigma = s.alpha_sigma(torch.tensor([999]))
    assert 150 < (sigma / alpha).item() < 160
    # the table of values in docs/math.md#schedule
    t = torch.tensor([0, 499, 999])
    alpha, sigma = s.alpha_sigma(t)
    np.testing.assert_allclose(s.alpha_bar[t].numpy(), [0.9999, 0.0786, 4.04e-5], rtol=2e-3)
    np.testing.assert_allclose(s.snr(t).numpy(), [9999, 0.0853, 4.04e-5], rtol=2e-3)
    np.testing.assert_allclose((sigma / alpha).numpy(), [0.0100, 3.42, 157.4], rtol=2e-3)
    assert s.snr(t).dtype == torch.float64 and s.betas.dtype == torch.float64
    # t = -1 is the clean end
    alpha, sigma = s.alpha_sigma(torch.tensor([-1, 0]))
    assert alpha[0] == 1 and sigma[0] == 0 and sigma[1] > 0
    with pytest.raises(ValueError, match="-1..999"):
        s.alpha_sigma(torch.tensor([1000]))
    with pytest.raises(ValueError, match="integers"):
        s.alpha_sigma(torch.tensor([0.5]))


def test_schedule_config_equality_and_default():
    """A schedule is its config: from_config rebuilds it, == compares configs (stored in weights files)."""
    assert isinstance(dm.DEFAULT_SCHEDULE, dm.Schedule) and dm.DEFAULT_SCHEDULE == dm.Schedule()
    assert dm.DEFAULT_SCHEDULE.config() == {"T": 1000, "beta_start": 1e-4, "beta_end": 2e-2, "kind": "linear"}
    assert dm._schedule(None) is dm.DEFAULT_SCHEDULE
    short = dm.Schedule(T=500, beta_start=2e-4, beta_end=0.03)
    assert dm._schedule(short) is short
    rebuilt = dm.Schedule.from_config(short.config())
    assert rebuilt == short and rebuilt is not short and torch.equal(rebuilt.alpha_bar, short.alpha_bar)
    assert dm.Schedule.from_config({"T": 500, "beta_start": 2e-4, "beta_end": 0.03}) == short  # kind optional
    assert short != dm.Schedule(T=500) and dm.Schedule(T=500) != dm.DEFAULT_SCHEDULE
    assert dm.Schedule() != short.config() and dm.Schedule() != None  # noqa: E711 (only schedules are equal)
    config = short.config()
    config["T"] = 7
    assert short.T == 500  # config() is a copy
    with pytest.raises(ValueError, match="unknown schedule kind 'cosine'.*use 'linear' or 'rflow'"):
        dm.Schedule.from_config(dict(short.config(), kind="cosine"))
    for bad in (dict(T=1), dict(beta_start=0.0), dict(beta_start=0.03, beta_end=0.02), dict(beta_end=1.0)):
        with pytest.raises(ValueError, match="T >= 2"):
            dm.Schedule(**bad)
    # another T: timesteps, grids and the loss follow it
    with pytest.raises(ValueError, match="-1..499"):
        short.alpha_sigma(torch.tensor([500]))
    assert dm.timestep_pairs(2, schedule=short) == [(499, 0), (0, -1)]


def test_add_noise_matches_formula():
    s = dm.Schedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 5, 6, generator=g), torch.randn(3, 1, 4, 5, 6, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = s.add_noise(x0, eps, t)
    for i, ti in enumerate(t):
        a = math.sqrt(s.alpha_bar[ti].item())
        torch.testing.assert_close(x_t[i], a * x0[i] + math.sqrt(1 - a * a) * eps[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction", dm.PREDICTIONS)
def test_round_trip_without_clipping(prediction):
    """target() then to_x0_eps() recovers (x0, eps) exactly (float64), at any t and rank."""
    g = torch.Generator().manual_seed(1)
    for shape in [(4, 1, 3, 4, 5), (4, 2, 6), (4, 7)]:
        x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
        eps = torch.randn(shape, generator=g, dtype=torch.float64)
        t = torch.tensor([0, 1, 500, 999])
        x_t = dm.Schedule().add_noise(x0, eps, t)
        u = dm.target(prediction, x0, eps, t)
        x0_hat, eps_hat = dm.to_x0_eps(prediction, u, x_t, t, clip=False)
        torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-9)


def test_targets_are_the_documented_formulas():
    """The targets of the table in docs/math.md#parameterizations, by hand."""
    s = dm.Schedule()
    x0, eps = torch.full((1, 3), 0.5, dtype=torch.float64), torch.full((1, 3), -2.0, dtype=torch.float64)
    t = torch.tensor([300])
    a, sg = math.sqrt(s.alpha_bar[300].item()), math.sqrt(1 - s.alpha_bar[300].item())
    expect = {"noise": -2.0, "sample": 0.5, "velocity": a * -2.0 - sg * 0.5, "flow": -2.5}
    for p, value in expect.items():
        torch.testing.assert_close(dm.target(p, x0, eps, t), torch.full((1, 3), value, dtype=torch.float64))


@pytest.mark.parametrize("prediction", dm.PREDICTIONS)
def test_clipping_keeps_the_pair_consistent(prediction):
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(5, 1, 8, generator=g, dtype=torch.float64) * 3
    u = torch.randn(5, 1, 8, generator=g, dtype=torch.float64) * 3
    t = torch.tensor([999, 700, 300, 20, 0])
    x0, eps = dm.to_x0_eps(prediction, u, x_t, t, clip=True)
    assert x0.abs().max() <= 1
    alpha, sigma = dm.Schedule().alpha_sigma(t, x_t)
    torch.testing.assert_close(alpha * x0 + sigma * eps, x_t, rtol=0, atol=1e-9)


@pytest.mark.parametrize("prediction", dm.PREDICTIONS)
def test_x0_loss_weight(prediction):
    """|u_hat - u|^2 = w(t) |x0_hat - x0|^2 for a perturbed output, with w from the table in
    docs/math.md#implied-x0-weights."""
    s = dm.Schedule()
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 10, 250, 600, 999])
    x0 = torch.rand(5, 16, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(5, 16, generator=g, dtype=torch.float64)
    x_t = s.add_noise(x0, eps, t)
    u = dm.target(prediction, x0, eps, t)
    u_hat = u + 1e-3 * torch.randn(5, 16, generator=g, dtype=torch.float64)
    x0_hat, _ = dm.to_x0_eps(prediction, u_hat, x_t, t, clip=False)
    ratio = ((u_hat - u) ** 2).sum(1) / ((x0_hat - x0) ** 2).sum(1)
    w = dm.x0_loss_weight(prediction, t)
    torch.testing.assert_close(ratio, w, rtol=1e-6, atol=0)
    snr = s.alpha_bar[t] / (1 - s.alpha_bar[t])
    expected = {"noise": snr, "sample": torch.ones(5, dtype=torch.float64), "velocity": 1 / (1 - s.alpha_bar[t]),
                "flow": (1 + snr.sqrt()) ** 2}[prediction]
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=0)


def test_x0_loss_weight_values_and_flow_divisor():
    """The values table of docs/math.md#implied-x0-weights, and flow's divisor alpha + sigma in
    [1, sqrt(2)] (docs/math.md#error-amplification)."""
    t = torch.tensor([0, 499, 999])
    table = {"noise": [9999, 0.0853, 4.04e-5], "sample": [1, 1, 1], "velocity": [10000, 1.085, 1.00004],
             "flow": [10200, 1.669, 1.0127]}
    for prediction, values in table.items():
        w = dm.x0_loss_weight(prediction, t)
        assert w.dtype == torch.float64 and w.shape == (3,)
        np.testing.assert_allclose(w.numpy(), values, rtol=2e-3, err_msg=prediction)
    alpha, sigma = dm.Schedule().alpha_sigma(torch.arange(-1, 1000))
    divisor = alpha + sigma
    assert divisor.min() >= 1 - 1e-12 and divisor.max() <= 2**0.5 + 1e-12 and divisor.max() > 1.41


@pytest.mark.parametrize("T", [1000, 500])
@pytest.mark.parametrize("prediction", dm.PREDICTIONS)
def test_diffusion_loss_is_the_target_space_mse(prediction, T):
    """docs/math.md#training-loss, with the default schedule and with another one (T = 500)."""
    model = randomize(dm.UNet(**TINY_UNET))
    schedule = dm.Schedule(T=T)
    x0 = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    loss = dm.diffusion_loss(model, x0, prediction, schedule=None if T == 1000 else schedule,
                             generator=torch.Generator().manual_seed(5))
    # redraw t and eps in the same order from the same seed and compute the MSE by hand
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, T, (2,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = schedule.add_noise(x0, eps, t)
    expected = ((model(x_t, t) - dm.target(prediction, x0, eps, t, schedule)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# --- rflow: the rectified-flow model, from its equations (docs/math.md#rectified-flow) ------------


def test_rectified_flow_schedule():
    """alpha = 1 - t/T, sigma = t/T for real t in [0, T]; training draws t ~ U[0, T); its config round-trips;
    rflow and the straight line go together, the VP predictions and the VP schedule likewise."""
    s = dm.RFLOW_SCHEDULE
    t = torch.tensor([0.0, 250.5, 999.9, 1000.0])
    alpha, sigma = s.alpha_sigma(t)
    np.testing.assert_allclose(alpha.numpy(), 1 - t.double().numpy() / 1000, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), t.double().numpy() / 1000, rtol=0, atol=1e-12)
    x0, eps = torch.randn(4, 1, 3, 3, 3), torch.randn(4, 1, 3, 3, 3)
    w = (t / 1000).reshape(-1, 1, 1, 1, 1)
    assert torch.allclose(s.add_noise(x0, eps, t), (1 - w) * x0 + w * eps, atol=1e-6)
    assert s.config() == {"T": 1000, "kind": "rflow"} and dm.Schedule.from_config(s.config()) == s != dm.DEFAULT_SCHEDULE
    for bad in (-0.5, 1000.5, float("nan")):
        with pytest.raises(ValueError, match="rflow timesteps must"):
            s.alpha_sigma(torch.tensor([bad]))
    draws = s.draw_t(20_000, torch.Generator().manual_seed(0))
    assert draws.dtype == torch.float32 and 0 <= draws.min() and draws.max() < 1000 and abs(draws.mean() - 500) < 6
    assert len(torch.unique(draws)) > 19_000                                   # real, not integer, timesteps
    assert dm.DEFAULT_SCHEDULE.draw_t(5, torch.Generator().manual_seed(0)).dtype == torch.long
    assert dm.default_schedule("rectified_flow") is s and dm.default_schedule("v") is dm.DEFAULT_SCHEDULE
    with pytest.raises(ValueError, match="the rflow prediction needs a RectifiedFlowSchedule"):
        dm.target("rflow", x0, eps, torch.tensor([5] * 4), dm.DEFAULT_SCHEDULE)
    with pytest.raises(ValueError, match="the flow prediction needs a variance-preserving Schedule"):
        dm.target("flow", x0, eps, t, s)


def test_rflow_target_conversion_and_weight():
    """u = x0 - eps; x0_hat = (x_t + sigma u) / (alpha + sigma) exactly, not clipped by default (the authors'
    rflow is not); eps back from it; the x0-error weight is 1 / sigma^2 = (1 + sqrt(SNR))^2."""
    g = torch.Generator().manual_seed(3)
    x0, eps = 1.5 * torch.randn(3, 1, 4, 4, 4, generator=g), torch.randn(3, 1, 4, 4, 4, generator=g)
    t = torch.tensor([10.0, 500.0, 990.0])
    w = (t / 1000).reshape(-1, 1, 1, 1, 1)
    x_t = (1 - w) * x0 + w * eps
    u = dm.target("rflow", x0, eps, t)
    assert torch.allclose(u, x0 - eps)
    x0_hat, eps_hat = dm.to_x0_eps("rflow", u, x_t, t)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-4)
    assert x0_hat.abs().max() > 1                                               # no clip unless asked
    assert dm.to_x0_eps("rflow", u, x_t, t, clip=True)[0].abs().max() == 1
    delta = 0.01 * torch.randn(u.shape, generator=g)                            # an output error ...
    err = dm.to_x0_eps("rflow", u + delta, x_t, t)[0] - x0_hat                  # ... and the x0 error it makes
    ratio = (delta ** 2).flatten(1).sum(1) / (err ** 2).flatten(1).sum(1)
    np.testing.assert_allclose(ratio.numpy(), dm.x0_loss_weight("rflow", t).numpy(), rtol=1e-3)
    np.testing.assert_allclose(dm.x0_loss_weight("rflow", t).numpy(), (1000 / t.double()).numpy() ** 2, rtol=1e-9)


class _Recorder(torch.nn.Module):
    """out = 0.5 x + t / 1000, remembering the timesteps it was given."""

    def __init__(self):
        super().__init__()
        self.p, self.seen = torch.nn.Parameter(torch.tensor(0.5)), []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return self.p * x + (t.float() / 1000).reshape(-1, *([1] * (x.ndim - 1)))


def test_rflow_loss_is_l1_at_real_timesteps():
    """diffusion_loss('rflow') = mean |model(x_t, t) - (x0 - eps)| with t ~ U[0, T) real, drawn before eps
    from the same generator; the model receives those real t."""
    x0 = torch.rand(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = _Recorder()
    loss = dm.diffusion_loss(model, x0, "rflow", generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.rand(2, generator=g) * 1000
    eps = torch.randn(x0.shape, generator=g)
    w = (t.double() / 1000).float().reshape(-1, 1, 1, 1, 1)
    x_t = (1 - w) * x0 + w * eps
    expected = (0.5 * x_t + (t / 1000).reshape(-1, 1, 1, 1, 1) - (x0 - eps)).abs().mean()
    assert torch.allclose(model.seen[0], t) and model.seen[0].dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    mse = dm.diffusion_loss(model, x0, "flow", generator=torch.Generator().manual_seed(7))
    assert model.seen[1].dtype == torch.long and mse.item() != pytest.approx(loss.item(), rel=1e-2)
