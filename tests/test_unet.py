"""Our U-Net against MONAI's DiffusionModelUNet (test-only reference): names, shapes, outputs."""
import pytest
import torch
import torch.nn.functional as F

import ddpm_mini as dm
from conftest import SMALL_UNET, randomize

monai_nets = pytest.importorskip("monai.networks.nets")


def pair(kwargs, seed=0):
    ref = randomize(monai_nets.DiffusionModelUNet(**kwargs), seed).eval()
    ours = dm.UNet(**kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("kwargs", [dm.MEDFORJ_UNET, SMALL_UNET], ids=["medforj", "small"])
def test_state_dict_layout_is_monais(kwargs):
    ours, ref = dm.UNet(**kwargs), monai_nets.DiffusionModelUNet(**kwargs)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)  # same names, same order
    assert all(a[k].shape == b[k].shape for k in a)
    ref.load_state_dict(a, strict=True)  # and strict in the other direction
    if kwargs is dm.MEDFORJ_UNET:  # the published files: 394 tensors, 41,245,217 parameters
        assert len(a) == 394 and sum(p.numel() for p in ours.parameters()) == 41_245_217


@pytest.mark.parametrize("kwargs,shapes", [
    (dm.MEDFORJ_UNET, [(16, 32, 48), (48, 16, 32)]),
    (SMALL_UNET, [(8, 12, 20), (16, 4, 8)]),
], ids=["medforj", "small"])
def test_output_matches_monai(kwargs, shapes):
    ours, ref = pair(kwargs)
    g = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = torch.randn(3, kwargs["in_channels"], *shape, generator=g)
        t = torch.tensor([0, 417, 999])  # a different t per item
        with torch.inference_mode():
            a, b = ref(x, t), ours(x, t)
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < 1e-4, f"{shape}: relative difference {rel:.2e}"
        # and the items really differ (t is used per item)
        assert (b[0] - b[1]).abs().max() > 1e-3


def test_two_dimensional_variant_matches_monai():
    kwargs = dict(SMALL_UNET, spatial_dims=2)
    ours, ref = pair(kwargs, seed=3)
    x, t = torch.randn(2, 2, 16, 24), torch.tensor([5, 700])
    with torch.inference_mode():
        a, b = ref(x, t), ours(x, t)
    assert ((a - b).norm() / a.norm()).item() < 1e-4


def test_fused_upsample_equals_nearest_then_conv():
    for dims, shape in [(1, (7,)), (2, (5, 6)), (3, (3, 4, 5))]:
        up = randomize(dm._Upsample(dims, 6), seed=dims, scale=0.3)
        x = torch.randn(2, 6, *shape, dtype=torch.float64)
        up = up.double()
        expected = up.postconv(F.interpolate(x, scale_factor=2, mode="nearest"))
        torch.testing.assert_close(up(x), expected, rtol=1e-12, atol=1e-12)


def test_gradients_match_with_and_without_checkpointing():
    torch.manual_seed(0)
    plain = randomize(dm.UNet(**SMALL_UNET), seed=4)
    ckpt = dm.UNet(**SMALL_UNET, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 2, 8, 8, 8), torch.tensor([3, 600])
    for m in (plain, ckpt):
        m(x, t).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_input_errors_say_what_is_allowed():
    model = dm.UNet(**SMALL_UNET)
    with pytest.raises(ValueError, match=r"5 dimensions"):
        model(torch.zeros(2, 8, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="2 input channel"):
        model(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.zeros(1, 2, 8, 10, 8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        model(torch.zeros(2, 2, 8, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="multiples of 16"):
        dm.UNet(**dm.MEDFORJ_UNET)(torch.zeros(1, 1, 24, 32, 32), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="norm_num_groups"):
        dm.UNet(channels=(8, 12), attention_levels=(False, False), norm_num_groups=8)
    with pytest.raises(ValueError, match="one entry per level"):
        dm.UNet(channels=(8, 16), attention_levels=(False,), norm_num_groups=8)
    with pytest.raises(ValueError, match="num_head_channels"):
        dm.UNet(channels=(8, 24), attention_levels=(False, True), num_head_channels=16, norm_num_groups=8)


def test_resblock_on_parts_equals_resblock_on_concatenation():
    """The up path never builds cat([h, skip]); values and gradients must not notice."""
    block = randomize(dm.ResBlock(3, 12, 8, 16, groups=4, eps=1e-6), seed=5, scale=0.2).double()
    g = torch.Generator().manual_seed(0)
    h, skip = torch.randn(2, 8, 4, 6, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, 6, 5, generator=g, dtype=torch.float64)
    h, skip = h * 3 + 1, skip * 0.5 - 2  # groups straddle the two parts (group size 3, split at 8)
    emb = torch.randn(2, 16, generator=g, dtype=torch.float64)
    expected = block(torch.cat([h, skip], 1), emb)
    with torch.inference_mode():
        torch.testing.assert_close(block(h.clone(), emb, skip.clone()), expected.detach(), rtol=1e-10, atol=1e-10)
    a, b = h.clone().requires_grad_(), skip.clone().requires_grad_()
    block(a, emb, b).sum().backward()
    c = torch.cat([h, skip], 1).requires_grad_()
    block(c, emb).sum().backward()
    torch.testing.assert_close(torch.cat([a.grad, b.grad], 1), c.grad, rtol=1e-10, atol=1e-10)


def test_folded_upsample_cache_follows_weight_changes():
    up = randomize(dm._Upsample(3, 4), seed=7).eval()
    x = torch.randn(1, 4, 3, 3, 3)
    with torch.inference_mode():
        first = up(x)
    with torch.no_grad():
        up.postconv.conv.weight.mul_(2.0)  # an optimizer step or load_state_dict changes it in place
    with torch.inference_mode():
        second = up(x)
    expected = up.postconv(F.interpolate(x, scale_factor=2, mode="nearest")).detach()
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, second)
