"""Section 11 (inverse problems): the five measurement models (linearity and adjointness where
linear, geometry, masks, the Rician likelihood) and the DPS solver (docs/methods.md#inverse-problems)."""
import math

import pytest
import torch

import ddpm_mini as dm

pytestmark = pytest.mark.usefixtures("one_thread")


def inner(a, b):
    return float((a.double() * b.double()).sum())


@pytest.mark.parametrize("name", ["slice_selection", "inpainting"])
@pytest.mark.parametrize("shape, voxel_mm", [((40, 48, 40), None), ((17, 20, 23), 2.0)])
def test_linear_tasks_are_linear_and_have_their_adjoint(name, shape, voxel_mm):
    """<A x, y> = <x, A^T y> to 1e-5 relative, and A(a x + b z) = a A(x) + b A(z), for batches (float64)."""
    task = dm.inverse_task(name, shape, voxel_mm=voxel_mm)
    g = torch.Generator().manual_seed(0)
    x, z = (torch.randn(2, 1, *shape, generator=g, dtype=torch.float64) for _ in range(2))
    ax = task.forward(x)
    y = torch.randn(ax.shape, generator=g, dtype=torch.float64)
    assert task.adjoint(y).shape == x.shape
    assert inner(ax, y) == pytest.approx(inner(x, task.adjoint(y)), rel=1e-5)
    torch.testing.assert_close(task.forward(2 * x - 3 * z), 2 * ax - 3 * task.forward(z))


def test_masked_fft_is_unitary_and_its_adjoint():
    """The k-space task's linear part M F (centred, orthonormal): <M F x, k> = <x, F^H M k> for complex k."""
    shape = (12, 14, 10)
    mask = dm.kspace_mask(shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, *shape, generator=g, dtype=torch.float64)
    k = torch.complex(*(torch.randn(2, 1, *shape, generator=g, dtype=torch.float64) for _ in range(2)))
    lhs = torch.sum(mask * dm._fft3(x) * k.conj())
    rhs = torch.sum(x * dm._ifft3(mask * k).conj())
    assert abs(complex(lhs) - complex(rhs)) < 1e-10 * abs(complex(lhs))
    torch.testing.assert_close(dm._ifft3(dm._fft3(x)).real, x)
    assert float(dm._fft3(x).abs().square().sum()) == pytest.approx(float(x.square().sum()), rel=1e-10)


def test_slice_selection_geometry():
    """192 slices of 1 mm -> 20 slices 9.5 mm apart along axis 2; each row a Gaussian of FWHM
    sqrt(7^2 - 1^2) mm sampled at 1 mm (the voxel's width taken out), summing to 1; the nearest-slice
    baseline gives back a constant image."""
    a = dm.slice_profile(192)
    assert a.shape == (20, 192) and torch.allclose(a.sum(1), torch.ones(20, dtype=torch.float64))
    row = a[10]
    above = torch.nonzero(row >= row.max() / 2).flatten()
    assert float(above[-1] - above[0] + 1) == pytest.approx(math.sqrt(48), abs=1.0)
    peaks = a.argmax(1).double()
    assert torch.allclose(peaks.diff(), torch.full((19,), 9.5, dtype=torch.float64), atol=0.51)
    task = dm.inverse_task("slice_selection", (40, 48, 40))      # 4.67 mm voxels: 19 slices
    y = task.measure(torch.full((2, 1, 40, 48, 40), 0.3))
    assert y.shape == (2, 1, 40, 48, 19) and torch.allclose(y, torch.full_like(y, 0.3))
    assert torch.allclose(task.baseline(y), torch.full((2, 1, 40, 48, 40), 0.3))
    with pytest.raises(ValueError, match="need voxels thinner than the slices"):
        dm.inverse_task("slice_selection", (8, 8, 8), voxel_mm=8.0)


def test_inpainting_mask_is_the_authors_block():
    """On 192 x 224 x 192 the hole is [64:-64, 64:-64, 64:-64]; the same fractions on other grids."""
    task = dm.inverse_task("inpainting", dm.IMAGE_SHAPE)
    kept = task.forward(torch.ones(1, 1, *dm.IMAGE_SHAPE))[0, 0]
    assert float(kept.sum()) == 192 * 224 * 192 - 64 * 96 * 64
    assert kept[64:-64, 64:-64, 64:-64].sum() == 0 and kept[63, 100, 100] == 1 and kept[100, 64, 100] == 0
    small = dm.inverse_task("inpainting", (40, 48, 40)).forward(torch.ones(1, 1, 40, 48, 40))[0, 0]
    assert float((small == 0).sum()) == 14 * 20 * 14


def test_kspace_mask_density_centre_and_seed():
    shape = (192, 224, 192)
    mask = dm.kspace_mask(shape)[..., 0].bool()
    assert mask.shape == (192, 224) and int(mask.sum()) == round(192 * 224 / 12)      # 12x, exactly
    assert mask[96 - 7:96 + 8, 112 - 9:112 + 9].all()                                 # 8 % centre: 15 x 18
    inner_half = mask[48:144, 56:168].float().mean()
    outer = (mask.sum() - mask[48:144, 56:168].sum()) / (192 * 224 - 96 * 112)
    assert inner_half > 3 * outer
    assert torch.equal(dm.kspace_mask(shape, seed=0), dm.kspace_mask(shape, seed=0))
    assert not torch.equal(dm.kspace_mask(shape, seed=0), dm.kspace_mask(shape, seed=1))
    task = dm.inverse_task("kspace_accel", (24, 28, 24))
    x = torch.rand(1, 1, 24, 28, 24) * 2 - 1
    y = task.measure(x)
    assert y.shape == x.shape and 0.05 < float((y - x).abs().mean()) < 0.5                # aliased, not lost


def test_rician_noise_and_likelihood():
    """With zero signal the Rician magnitude is Rayleigh (mean sigma sqrt(pi/2) on the [0, 1] scale);
    the negative log-likelihood of a constant signal is lowest near the truth."""
    task = dm.inverse_task("rician_denoising", (16, 16, 16), sigma=0.1)
    y = task.measure(torch.full((1, 1, 16, 16, 16), -1.0), torch.Generator().manual_seed(0))
    assert float((y + 1).mean() / 2) == pytest.approx(0.1 * math.sqrt(math.pi / 2), rel=0.05)
    truth = torch.full((1, 1, 16, 16, 16), -0.4)                                        # 0.3 on [0, 1]
    y = task.measure(truth, torch.Generator().manual_seed(1))
    levels = torch.linspace(-0.6, -0.2, 41)
    nll = torch.stack([task.loss(torch.full_like(truth, v), y) for v in levels])
    assert abs(float(levels[nll.argmin()]) - (-0.4)) <= 0.02
    assert float(y.mean()) > -0.4                                                       # the plain mean is biased up
    assert torch.isfinite(task.loss(torch.ones_like(truth), torch.ones_like(truth) * 3))


def test_motion():
    """No move gives the image back (magnitude of its own k-space); a move corrupts; gradients flow."""
    shape = (20, 24, 20)
    x = torch.from_numpy(dm.phantom(0, shape)[0])[None, None].float()
    still = dm.inverse_task("motion", shape, degrees=0.0, shift_mm=0.0)
    torch.testing.assert_close(still.forward(x), x.clamp(-1, 1), atol=1e-5, rtol=0)
    moved = dm.inverse_task("motion", shape)
    assert float((moved.forward(x) - x).abs().mean()) > 0.01
    x.requires_grad_(True)
    moved.loss(x, moved.forward(x.detach()) + 0.1).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_every_task_shapes_batches_and_gradients():
    shape = (20, 24, 20)
    x = (torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    for name in dm.INVERSE_TASKS:
        task = dm.inverse_task(name, shape, voxel_mm=2.0)
        y = task.measure(x.detach(), torch.Generator().manual_seed(2))
        assert y.shape[:2] == (2, 1) and task.baseline(y).shape == x.shape
        loss = task.loss(x, y + 0.05)
        grad, = torch.autograd.grad(loss, x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="unknown inverse task 'deblur': use one of slice_selection"):
        dm.inverse_task("deblur", shape)


class Gaussian(torch.nn.Module):
    """The ideal network for data x0 ~ N(mu, s^2) per voxel, as `prediction`'s target."""

    def __init__(self, prediction, mu=0.2, s=0.5):
        super().__init__()
        self.prediction, self.mu, self.s, self.w = prediction, mu, s, torch.nn.Parameter(torch.ones(()))
        self.schedule = dm.default_schedule(prediction)

    def forward(self, x, t):
        a, sg = self.schedule.alpha_sigma(t.cpu(), x)
        x0 = self.w * (self.mu + a * self.s**2 * (x - a * self.mu) / (a**2 * self.s**2 + sg**2))
        eps = (x - a * x0) / sg
        return {"noise": eps, "sample": x0, "velocity": a * eps - sg * x0, "flow": eps - x0, "rflow": x0 - eps}[self.prediction]


def test_dps_without_guidance_is_ddim_with_eta_one():
    """zeta = 0 (and sample prediction under the authors' guidance, whose x0 does not depend on x_t)
    is exactly dm.sample with eta = 1 from the same generator."""
    shape = (12, 12, 12)
    task = dm.inverse_task("inpainting", shape)
    y = task.measure(torch.zeros(1, 1, *shape))
    for prediction, zeta in (("flow", 0.0), ("velocity", 0.0), ("sample", None), ("rflow", 0.0)):
        model = Gaussian(prediction)
        ours = dm.solve_inverse(model, prediction, y, task, steps=6, zeta=zeta, generator=torch.Generator().manual_seed(3),
                                progress=False)
        ref = dm.sample(model, prediction, shape=(1, 1, *shape), steps=6, eta=1.0, generator=torch.Generator().manual_seed(3),
                        progress=False)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    through = dm.solve_inverse(Gaussian("sample"), "sample", y, task, steps=6, guidance="network",
                               generator=torch.Generator().manual_seed(3), progress=False)
    assert (through - ref).abs().max() > 1e-3  # through the network, sample prediction is guided


def test_dps_first_step_moves_against_the_loss_gradient():
    """The first step of DPS minus the unguided one is -zeta times d loss(x0_hat(x_t)) / d x_t, checked by
    central finite differences of the loss through the conversion (flow: x0 = (x_t - sigma u) / (alpha + sigma))."""
    shape = (8, 8, 8)
    task = dm.inverse_task("inpainting", shape)
    y = task.measure(torch.full((1, 1, *shape), 0.5))
    model = Gaussian("flow")
    noise = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    first = {}
    for zeta in (0.0, 2.0):
        dm.solve_inverse(model, "flow", y, task, steps=4, zeta=zeta, eta=0.0, noise=noise, progress=False,
                         callback=lambda i, t, x, x0: first.setdefault(zeta, x) if i == 0 else None)
    step = (first[2.0] - first[0.0]) / -2.0
    t = torch.full((1,), 999)
    u = model(noise, t).detach()

    def loss_at(x):  # float64: the differences are small
        x0, _ = dm.to_x0_eps("flow", u.double(), x.double(), t)
        return float(task.loss(x0, y.double()))
    for idx in [(0, 0, 0, 0, 0), (0, 0, 4, 4, 4), (0, 0, 7, 2, 5)]:
        h = torch.zeros_like(noise)
        h[idx] = 1e-3
        fd = (loss_at(noise + h) - loss_at(noise - h)) / 2e-3
        assert float(step[idx]) == pytest.approx(fd, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("prediction", ["noise", "velocity", "flow", "rflow"])
def test_dps_fits_the_measurement_on_gaussian_data(prediction):
    """With the ideal network for Gaussian data (16^3, 256 steps), DPS on inpainting moves the kept
    voxels towards the measured ones: with the default zeta (the authors', scaled to the grid) the
    mean error is below 0.7x the unguided sample's (measured 0.33 / 0.54 for flow, 0.007-0.06 for the
    others), with zeta = 3 below 0.05 (measured 0.013-0.019); the hole stays a plausible draw (its
    mean within 0.1 of mu)."""
    shape = (16, 16, 16)
    task = dm.inverse_task("inpainting", shape)
    truth = 0.2 + 0.5 * torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(5))
    y = task.measure(truth)
    kept = task.forward(torch.ones_like(truth)).bool()
    model = Gaussian(prediction)
    run = lambda zeta: dm.solve_inverse(model, prediction, y, task, steps=256, zeta=zeta,  # noqa: E731
                                        generator=torch.Generator().manual_seed(0), progress=False)
    err = lambda x: float((x - truth)[kept].abs().mean())  # noqa: E731
    default, free, strong = run(None), run(0.0), run(3.0)
    assert err(default) < 0.7 * err(free) and err(strong) < 0.05, (err(default), err(free), err(strong))
    assert abs(float(default[~kept].mean()) - 0.2) < 0.1


def test_solve_inverse_refuses_bad_input():
    task = dm.inverse_task("slice_selection", (16, 16, 16), voxel_mm=1.0)
    model = Gaussian("flow")
    with pytest.raises(ValueError, match="is not a measurement of task slice_selection"):
        dm.solve_inverse(model, "flow", torch.zeros(1, 1, 16, 16, 16), task, progress=False)
    y = task.measure(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="guidance must be 'conversion'"):
        dm.solve_inverse(model, "flow", y, task, guidance="both", progress=False)
    with pytest.raises(ValueError, match="noise .* must have the restored image's shape"):
        dm.solve_inverse(model, "flow", y, task, noise=torch.zeros(1, 1, 8, 8, 8), progress=False)
