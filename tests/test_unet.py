"""Section 5 (the 3-D U-Net): MONAI's parameter names and shapes, outputs against MONAI's
DiffusionModelUNet (test-only reference), the plain forward passes against section 5b's fast ones."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ddpm_mini as dm
from conftest import SMALL_UNET, TINY_UNET, randomize

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def relative(a, b):
    """|a - b| / |b| (Frobenius norms), as a float."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- Against MONAI -------------------------------------------------------------------------------


def monai_nets():
    return pytest.importorskip("monai.networks.nets")


def pair(kwargs, seed=0, fast=True):
    ref = randomize(monai_nets().DiffusionModelUNet(**kwargs), seed).eval()
    ours = dm.UNet(**kwargs, fast=fast).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("kwargs", [dm.MEDFORJ_UNET, SMALL_UNET], ids=["medforj", "small"])
def test_state_dict_layout_is_monais(kwargs):
    ours, ref = dm.UNet(**kwargs), monai_nets().DiffusionModelUNet(**kwargs)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)  # same names, same order
    assert all(a[k].shape == b[k].shape for k in a)
    ref.load_state_dict(a, strict=True)  # and strict in the other direction
    assert list(dm.UNet(**kwargs, fast=False).state_dict()) == list(a)  # the plain model has the same layout
    if kwargs is dm.MEDFORJ_UNET:  # the published files: 394 tensors, 41,245,217 parameters
        assert len(a) == 394 and sum(p.numel() for p in ours.parameters()) == 41_245_217


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("kwargs,shapes", [
    (dm.MEDFORJ_UNET, [(16, 32, 48), (48, 16, 32)]),
    (SMALL_UNET, [(8, 12, 20), (16, 4, 8)]),
], ids=["medforj", "small"])
def test_output_matches_monai(kwargs, shapes, fast):
    ours, ref = pair(kwargs, fast=fast)
    assert ours.fast == fast
    g = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = torch.randn(3, kwargs["in_channels"], *shape, generator=g)
        t = torch.tensor([0, 417, 999])  # a different t per item
        with torch.inference_mode():
            a, b = ref(x, t), ours(x, t)
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < 1e-5, f"{shape}: relative difference {rel:.2e}"
        # and the items really differ (t is used per item)
        assert (b[0] - b[1]).abs().max() > 1e-3


def test_medforj_unet_has_the_forks_groupnorm_eps():
    """The published weights ran with GroupNorm eps 1e-5 (the MONAI fork's default), not MONAI core's
    1e-6: every norm of UNet(**MEDFORJ_UNET) uses it, and on the same weights 1e-6 gives another
    output (1.4e-3 relative on these random weights at 16^3, where the coarsest level is 1 voxel),
    above the 1e-5 the MONAI comparison allows."""
    ours, ref = pair(dm.MEDFORJ_UNET, seed=4)
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 61 and {m.eps for m in norms} == {1e-5}
    assert {m.eps for m in ref.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-5}
    core = dm.UNet(**dict(dm.MEDFORJ_UNET, norm_eps=1e-6)).eval()
    core.load_state_dict(ours.state_dict())
    x, t = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.inference_mode():
        a, b = ours(x, t), core(x, t)
    assert 1e-4 < ((a - b).norm() / a.norm()).item() < 1e-2
    assert dm.UNet(**dm.TEACHING_UNET).config["norm_eps"] == 1e-6   # the kit's own models keep MONAI core's


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_two_dimensional_variant_matches_monai(fast):
    kwargs = dict(SMALL_UNET, spatial_dims=2)
    ours, ref = pair(kwargs, seed=3, fast=fast)
    x, t = torch.randn(2, 2, 16, 24), torch.tensor([5, 700])
    with torch.inference_mode():
        a, b = ref(x, t), ours(x, t)
    assert ((a - b).norm() / a.norm()).item() < 1e-4


# --- The plain forward passes, and the model's checks -----------------------------------------------


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
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3"):
        dm.UNet(spatial_dims=4)
    with pytest.raises(ValueError, match="num_res_blocks must be an int or have one entry per level"):
        dm.UNet(channels=(8, 16), attention_levels=(False, False), num_res_blocks=(1, 1, 1), norm_num_groups=8)
    # a scalar t is broadcast over the batch
    small = randomize(dm.UNet(**TINY_UNET), seed=1).eval()
    x = torch.randn(2, 1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(small(x, 7), small(x, torch.tensor([7, 7])))


def test_timestep_embedding():
    """[cos(t f_k), sin(t f_k)], f_k = 10000^(-k / (dim // 2)); an odd dim gets a zero column."""
    t = torch.tensor([0, 3, 999])
    emb = dm.timestep_embedding(t, 8)
    f = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    args = t[:, None].double() * f
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    torch.testing.assert_close(emb, torch.cat([torch.cos(args), torch.sin(args)], 1).float(), rtol=0, atol=2e-4)
    odd = dm.timestep_embedding(t, 9)
    assert odd.shape == (3, 9) and torch.equal(odd[:, :8], emb) and not odd[:, 8].any()


# --- 5b: each speed-up equals its plain form -------------------------------------------------------


def _spy(monkeypatch, *names):
    """Count the calls of section 5b's functions (looked up by name at call time, so patchable)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(dm, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(dm, name, counted)
    return calls


FAST_PATHS = ("_resblock_fast", "_upsample_folded", "_head_fast")


@pytest.mark.parametrize("kwargs,shape", [
    (SMALL_UNET, (8, 12, 16)),
    (TINY_UNET, (6, 10, 8)),
    (dict(SMALL_UNET, spatial_dims=2), (12, 20)),
    (dict(TINY_UNET, spatial_dims=1), (14,)),
], ids=["small-3d", "tiny-3d", "small-2d", "tiny-1d"])
def test_fast_forward_equals_plain(kwargs, shape, monkeypatch):
    """UNet(fast=True), the default, against the same weights with set_fast(False), in float32:
    forward outputs under no_grad and with autograd (relative 1e-5), gradients of a scalar loss
    with respect to every parameter and the input (relative 1e-4). The fast forms must really
    run (counted calls, the folded kernels cached under no_grad) and leave the input untouched."""
    # weights large enough that attention's gradients are more than rounding noise
    fast = randomize(dm.UNet(**kwargs), seed=11, scale=0.3)
    plain = copy.deepcopy(fast).set_fast(False)
    assert fast.fast and not plain.fast
    modules = lambda m: [b for b in m.modules() if isinstance(b, (dm.ResBlock, dm._Upsample))]  # noqa: E731
    assert all(b.fast for b in modules(fast)) and not any(b.fast for b in modules(plain))
    ups = [b for b in fast.modules() if isinstance(b, dm._Upsample)]
    assert ups and not any(hasattr(u, "_folded") for u in ups)

    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, kwargs["in_channels"], *shape, generator=g)
    x_before = x.clone()
    t = torch.tensor([3, 800])
    calls = _spy(monkeypatch, *FAST_PATHS)

    with torch.no_grad():
        a = fast(x, t)
        n_fast = dict(calls)
        b = plain(x, t)
    assert all(n_fast[name] > 0 for name in FAST_PATHS), n_fast
    assert calls == n_fast, "the plain model ran a fast form"
    assert n_fast["_upsample_folded"] == len(ups) and n_fast["_head_fast"] == 1
    assert all(hasattr(u, "_folded") for u in ups)  # the folded kernels were built and cached
    assert not any(hasattr(u, "_folded") for u in plain.modules() if isinstance(u, dm._Upsample))
    assert torch.equal(x, x_before)  # in place only on the model's own intermediates
    assert a.shape == (2, kwargs["out_channels"], *shape)
    assert relative(a, b) < 1e-5, relative(a, b)

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = fast(xa, t), plain(xb, t)
    assert calls["_resblock_fast"] == 2 * n_fast["_resblock_fast"]  # the fast forms run under autograd too
    assert calls["_upsample_folded"] == 2 * len(ups) and calls["_head_fast"] == 2
    assert relative(a, b) < 1e-5, relative(a, b)
    weight = torch.randn(a.shape, generator=g)
    (a * weight).sum().backward()
    (b * weight).sum().backward()
    assert relative(xa.grad, xb.grad) < 1e-4
    scale = torch.cat([q.grad.flatten() for q in plain.parameters()]).norm()
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        assert p.grad is not None and q.grad is not None, name
        if name.endswith("to_k.bias"):  # exactly 0 in theory: softmax ignores a shift shared by all keys
            assert max(p.grad.norm(), q.grad.norm()) < 1e-6 * scale, name
        else:
            assert relative(p.grad, q.grad) < 1e-4, (name, relative(p.grad, q.grad))


def test_set_fast_switches_every_block_and_returns_the_model():
    model = dm.UNet(**TINY_UNET, fast=False)
    blocks = [m for m in model.modules() if isinstance(m, (dm.ResBlock, dm._Upsample))]
    assert not model.fast and blocks and not any(b.fast for b in blocks)
    assert model.set_fast() is model and model.fast and all(b.fast for b in blocks)
    assert model.set_fast(False) is model and not any(b.fast for b in blocks)


@pytest.mark.parametrize("kernel", [3, 1])
def test_conv_parts_equals_conv_of_the_concatenation(kernel):
    """_conv_parts(conv, *parts) == conv(cat(parts, 1)): values and gradients, 1x1x1 (a matrix
    product per item) and 3x3x3, one to three parts, batch 1 and 2; 2-D too."""
    g = torch.Generator().manual_seed(kernel)
    for dims, split, batch in [(3, [5], 2), (3, [3, 4], 2), (3, [2, 3, 1], 1), (2, [4, 2], 2)]:
        conv = getattr(torch.nn, f"Conv{dims}d")(sum(split), 6, kernel, padding=kernel // 2).double()
        randomize(conv, seed=dims, scale=0.3)
        parts = [torch.randn(batch, c, *(5, 4, 6)[:dims], generator=g, dtype=torch.float64) for c in split]
        expected = conv(torch.cat(parts, 1))
        with torch.no_grad():
            torch.testing.assert_close(dm._conv_parts(conv, *parts), expected.detach(), rtol=1e-10, atol=1e-10)
        leaves = [p.clone().requires_grad_() for p in parts]
        dm._conv_parts(conv, *leaves).square().sum().backward()
        got = [conv.weight.grad.clone(), conv.bias.grad.clone(), *[p.grad for p in leaves]]
        conv.zero_grad()
        joint = torch.cat(parts, 1).requires_grad_()
        conv(joint).square().sum().backward()
        want = [conv.weight.grad, conv.bias.grad, *joint.grad.split(split, 1)]
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


def test_norm_act_and_norm_act_parts():
    """_norm_act(norm, x) == silu(norm(x)); _norm_act_parts(norm, parts) == silu(norm(cat(parts))) split
    back, groups straddling the parts; in place (the parts consumed) only without autograd."""
    norm = randomize(torch.nn.GroupNorm(4, 12, 1e-6), seed=2, scale=0.5).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 4, 5, 3, generator=g, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(dm._norm_act(norm, x), F.silu(norm(x)), rtol=1e-12, atol=1e-12)
    h, skip = x[:, :8].clone(), x[:, 8:].clone() * 0.1 - 2  # group size 3: the split at 8 cuts a group
    expected = F.silu(norm(torch.cat([h, skip], 1))).split([8, 4], 1)
    with torch.no_grad():
        got = dm._norm_act_parts(norm, [h.clone(), skip.clone()])
    for u, v in zip(got, expected):
        torch.testing.assert_close(u, v.detach(), rtol=1e-10, atol=1e-10)
    a, b = h.clone().requires_grad_(), skip.clone().requires_grad_()
    out = dm._norm_act_parts(norm, [a, b])
    torch.cat(out, 1).square().sum().backward()
    assert torch.equal(a.detach(), h) and torch.equal(b.detach(), skip)  # autograd: nothing in place
    c = torch.cat([h, skip], 1).requires_grad_()
    F.silu(norm(c)).square().sum().backward()
    torch.testing.assert_close(torch.cat([a.grad, b.grad], 1), c.grad, rtol=1e-9, atol=1e-10)
    # float16 parts whose squares overflow float16 (300^2 > 65504): statistics in float32 stay finite
    big = [torch.randn(1, 8, 4, 4, 4, generator=g) * 30 + 300, torch.randn(1, 4, 4, 4, 4, generator=g) * 30 + 300]
    ref = F.silu(norm.float()(torch.cat(big, 1))).split([8, 4], 1)
    with torch.no_grad():
        low = dm._norm_act_parts(norm.half(), [p.half() for p in big])
    for u, v in zip(low, ref):
        assert torch.isfinite(u).all() and (u.float() - v).abs().max() < 0.02


def test_resblock_fast_equals_plain():
    """_resblock_fast against ResBlock's plain forward: with and without a skip input, with a 1x1
    skip convolution and with the identity, in float64."""
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(2, 16, generator=g, dtype=torch.float64)
    for cin, cout, skip_channels in [(8, 8, 0), (8, 12, 0), (8, 8, 4), (4, 8, 8)]:
        block = randomize(dm.ResBlock(3, cin + skip_channels, cout, 16, groups=4, eps=1e-6), seed=cin + cout,
                          scale=0.2).double()
        x = torch.randn(2, cin, 4, 6, 5, generator=g, dtype=torch.float64)
        skip = torch.randn(2, skip_channels, 4, 6, 5, generator=g, dtype=torch.float64) if skip_channels else None
        block.fast = False
        expected = block(x, emb, skip)
        with torch.no_grad():
            got = dm._resblock_fast(block, x.clone(), emb, None if skip is None else skip.clone())
        torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10)
        block.fast = True
        torch.testing.assert_close(block(x, emb, skip), expected, rtol=1e-10, atol=1e-10)


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


def test_fold_upsample_kernel_by_hand():
    """Along one axis the three fine taps (w_-1, w_0, w_+1) fold into (w_-1, w_0 + w_+1) for parity 0
    and (w_-1 + w_0, w_+1) for parity 1; in 2-D the parities come in itertools.product order."""
    w = torch.randn(3, 2, 3, dtype=torch.float64)
    k = dm._fold_upsample_kernel(w, 1)
    assert k.shape == (6, 2, 2)
    torch.testing.assert_close(k[:3], torch.stack([w[..., 0], w[..., 1] + w[..., 2]], -1))
    torch.testing.assert_close(k[3:], torch.stack([w[..., 0] + w[..., 1], w[..., 2]], -1))
    w2 = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    k2 = dm._fold_upsample_kernel(w2, 2)
    assert k2.shape == (8, 2, 2, 2)
    fold = torch.tensor([[[1.0, 0, 0], [0, 1, 1]], [[1.0, 1, 0], [0, 0, 1]]], dtype=torch.float64)  # parity 0, 1
    for i, (p, q) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        torch.testing.assert_close(k2[2 * i:2 * i + 2], torch.einsum("oiab,ja,kb->oijk", w2, fold[p], fold[q]))
    assert dm._fold_upsample_kernel(torch.randn(4, 4, 3, 3, 3), 3).shape == (32, 4, 2, 2, 2)


def test_fused_upsample_equals_nearest_then_conv():
    for dims, shape in [(1, (7,)), (2, (5, 6)), (3, (3, 4, 5))]:
        up = randomize(dm._Upsample(dims, 6), seed=dims, scale=0.3)
        x = torch.randn(2, 6, *shape, dtype=torch.float64)
        up = up.double()
        expected = up.postconv(F.interpolate(x, scale_factor=2, mode="nearest"))
        torch.testing.assert_close(up(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dm._upsample_folded(up, x), expected, rtol=1e-12, atol=1e-12)
        up.fast = False  # the plain form
        torch.testing.assert_close(up(x), expected, rtol=0, atol=0)
        # gradients through the folded kernel reach the 3x3x3 weight
        up.zero_grad()
        dm._upsample_folded(up, x).square().sum().backward()
        folded_grad = up.postconv.conv.weight.grad.clone()
        up.zero_grad()
        up.postconv(F.interpolate(x, scale_factor=2, mode="nearest")).square().sum().backward()
        torch.testing.assert_close(folded_grad, up.postconv.conv.weight.grad, rtol=1e-10, atol=1e-10)


def test_folded_upsample_cache_follows_weight_changes():
    up = randomize(dm._Upsample(3, 4), seed=7).eval()
    x = torch.randn(1, 4, 3, 3, 3)
    w = up.postconv.conv.weight
    with torch.enable_grad():
        up(x)
    assert not hasattr(up, "_folded")  # a gradient is needed: folded afresh each call, nothing cached
    with torch.inference_mode():
        first = up(x)
    key, kernel = up._folded
    assert key == (w._version, w.data_ptr(), w.dtype, w.device)
    torch.testing.assert_close(kernel, dm._fold_upsample_kernel(w.detach(), 3), rtol=0, atol=0)
    with torch.no_grad():
        up.postconv.conv.weight.mul_(2.0)  # an optimizer step or load_state_dict changes it in place
    assert up._folded[0][0] != w._version
    with torch.inference_mode():
        second = up(x)
    assert up._folded[0][0] == w._version and up._folded[1] is not kernel
    expected = up.postconv(F.interpolate(x, scale_factor=2, mode="nearest")).detach()
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, second)
    cached = up._folded[1]
    with torch.no_grad():
        up(x)
    assert up._folded[1] is cached  # unchanged weight: the cached kernel is reused


def test_head_fast_equals_the_plain_head():
    model = randomize(dm.UNet(**TINY_UNET), seed=8, scale=0.2).double()
    h = torch.randn(2, 8, 4, 4, 4, dtype=torch.float64)
    expected = model.out(h)
    torch.testing.assert_close(dm._head_fast(model.out, h), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(dm._head_fast(model.out, h.clone()), expected.detach(), rtol=1e-12, atol=1e-12)
