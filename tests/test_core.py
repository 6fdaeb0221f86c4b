"""Names, schedule, parameterizations and the loss, checked against the GUIDE's equations."""
import math

import numpy as np
import pytest
import torch

import ddpm_mini as dm
from conftest import TINY_UNET, randomize


def test_names_and_aliases():
    assert dm.PREDICTIONS == ("noise", "sample", "velocity", "flow")
    for alias, name in [("epsilon", "noise"), ("eps", "noise"), ("x0", "sample"), ("clean", "sample"),
                        ("v", "velocity"), ("v_prediction", "velocity"), ("FLOW", "flow"), ("Sample", "sample")]:
        assert dm.canonical_prediction(alias) == name
    with pytest.raises(ValueError, match="noise, sample, velocity, flow"):
        dm.canonical_prediction("score")
    assert dm.IMAGE_SHAPE == (192, 224, 192)
    assert dm.MEDFORJ_UNET["channels"] == (16, 32, 64, 128, 256)


def test_schedule_numbers():
    s = dm.Schedule()
    betas = np.linspace(1e-4, 2e-2, 1000)
    abar = np.cumprod(1 - betas)
    assert s.T == 1000 and s.alpha_bar.shape == (1000,)
    np.testing.assert_allclose(s.alpha_bar.numpy(), abar, rtol=1e-12)
    assert abs(s.alpha_bar[999].item() - 4.04e-5) < 0.01e-5  # GUIDE: abar_999 = 4.0e-5
    # noise prediction's x0 error amplification at the first step: sigma / alpha ~ 157
    alpha, sigma = s.alpha_sigma(torch.tensor([999]))
    assert 150 < (sigma / alpha).item() < 160
    # t = -1 is the clean end
    alpha, sigma = s.alpha_sigma(torch.tensor([-1, 0]))
    assert alpha[0] == 1 and sigma[0] == 0 and sigma[1] > 0
    with pytest.raises(ValueError, match="-1..999"):
        s.alpha_sigma(torch.tensor([1000]))
    with pytest.raises(ValueError, match="integers"):
        s.alpha_sigma(torch.tensor([0.5]))


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


def test_targets_are_the_guide_formulas():
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
    """|u_hat - u|^2 = w(t) |x0_hat - x0|^2 for a perturbed output, with w from the GUIDE table."""
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


@pytest.mark.parametrize("prediction", dm.PREDICTIONS)
def test_diffusion_loss_is_the_target_space_mse(prediction):
    model = randomize(dm.UNet(**TINY_UNET))
    x0 = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    loss = dm.diffusion_loss(model, x0, prediction, generator=torch.Generator().manual_seed(5))
    # redraw t and eps in the same order from the same seed and compute the MSE by hand
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (2,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = dm.Schedule().add_noise(x0, eps, t)
    expected = ((model(x_t, t) - dm.target(prediction, x0, eps, t)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
