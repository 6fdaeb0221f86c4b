"""ddpm-mini: a small, exact kit for 3D diffusion models of minimally preprocessed brain MRI.

It reproduces "Diffusion-Driven Generation of Minimally Preprocessed Brain MRI"
(Remedios, Carass, Prince, Dewey): 3D DDPMs trained on ~80k T1-weighted volumes,
left unregistered and not skull-stripped, with four things the U-Net can be
asked to predict: noise (eps), sample (x0), velocity (v) and flow (eps - x0).
Noise prediction failed to converge; the other three made brain-like volumes.
This module loads the published MedForj weights into its own U-Net (no MONAI
needed), samples them on a GPU or a CPU, and trains and evaluates small models.
The math it is held to: docs/math.md; method notes: docs/methods.md.

Usage:

    import ddpm_mini as dm
    model = dm.load_pretrained("flow")                    # fetches the published weights
    x = dm.sample(model, "flow", steps=64,                # (1, 1, 192, 224, 192) in [-1, 1]
                  generator=torch.Generator().manual_seed(0))
    dm.save_nifti(x[0, 0], "sample_flow.nii.gz")          # LPS, 1 mm, uint16
    dm.view(x)                                            # slices with sliders in a notebook

    small = dm.UNet(**dm.TEACHING_UNET)
    loss = dm.diffusion_loss(small, batch, "velocity")    # batch: (B, 1, D, H, W) in [-1, 1]

Command line: python ddpm_mini.py --help.

Map of the sections (1-7 are the teaching core, read them in order):
     1. imports                       7. weights: save/load, fetch (data_manifest.csv)
     2. constants                     8. data: NIfTI, preprocessing, phantoms, datasets
     3. noise schedule                9. training
     4. parameterizations and loss   10. evaluation: segmentation, regional volumes, statistics
     5. the 3-D U-Net (5b: speed-ups) 11. inverse problems (DPS)
     6. sampler                      12. viewing
                                     13. command line
"""
# === 1. Imports ======================================================================================
from __future__ import annotations

import argparse
import collections
import copy
import csv
import dataclasses
import gzip
import inspect
import itertools
import json
import logging
import math
import os
import pathlib
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
import zipfile
import zlib
from urllib.parse import urlparse

import nibabel as nib
import numpy as np
import pooch
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from nibabel import orientations as ornt
from safetensors import safe_open
from safetensors.torch import save_file
if os.environ.get("DDPM_MINI_STATIC") == "1":  # saved pages (see _widgets): text progress bars
    from tqdm.std import tqdm
else:
    from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere

__version__ = "0.1.0"

# === 2. Constants ====================================================================================

#: The four things the U-Net can be trained to predict under the variance-preserving schedule
#: (section 4, docs/math.md#parameterizations): the paper's four models.
PREDICTIONS = ("noise", "sample", "velocity", "flow")
#: ... and the fifth published model, rectified flow (x0 - eps on its own straight-line schedule,
#: RectifiedFlowSchedule; docs/math.md#rectified-flow).
ALL_PREDICTIONS = PREDICTIONS + ("rflow",)

_PREDICTION_ALIASES = {
    "noise": "noise", "epsilon": "noise", "eps": "noise",
    "sample": "sample", "x0": "sample", "clean": "sample",
    "velocity": "velocity", "v": "velocity", "v_prediction": "velocity",
    "flow": "flow", "rflow": "rflow", "rectified_flow": "rflow",
}


def canonical_prediction(name: str) -> str:
    """Map a prediction name or alias (epsilon/eps, x0/clean, v/v_prediction, rectified_flow;
    any case) to one of ALL_PREDICTIONS; a ValueError lists the valid names otherwise."""
    key = str(name).strip().lower()
    if key not in _PREDICTION_ALIASES:
        raise ValueError(
            f"unknown prediction {name!r}: use one of {', '.join(ALL_PREDICTIONS)} "
            f"(aliases: {', '.join(k for k in _PREDICTION_ALIASES if k not in ALL_PREDICTIONS)})")
    return _PREDICTION_ALIASES[key]


#: U-Net of the published MedForj models (41,245,217 parameters), for 192 x 224 x 192 volumes.
#: norm_eps 1e-5: the GroupNorm eps of the MONAI fork the weights were trained and run with
#: (MONAI core, and UNet's default, use 1e-6).
MEDFORJ_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1,
                    channels=(16, 32, 64, 128, 256), attention_levels=(False, False, False, False, True),
                    num_res_blocks=2, num_head_channels=8, norm_num_groups=8, norm_eps=1e-5)

#: U-Net for teaching on a CPU (1,802,481 parameters, 4% of MEDFORJ_UNET), for TEACHING_SHAPE
#: phantoms: three levels, one ResBlock each, attention only at the bottom (10 x 12 x 10 tokens).
TEACHING_UNET = dict(spatial_dims=3, in_channels=1, out_channels=1,
                     channels=(16, 32, 64), attention_levels=(False, False, True),
                     num_res_blocks=1, num_head_channels=16, norm_num_groups=8)

#: The published models' image grid: 1 mm voxels, LPS, (D, H, W) = (L-R, P-A, I-S).
IMAGE_SHAPE = (192, 224, 192)

#: The teaching grid (phantoms, demo, notebooks, the shipped teaching models): 224 / 48 = 4.67 mm
#: voxels over IMAGE_SHAPE's field of view, the coarsest grid segment_phantom is held to exactly
#: (docs/methods.md#phantom-segmenter); a training step costs 0.58x one at 48 x 56 x 48.
TEACHING_SHAPE = (40, 48, 40)

#: The reference generator's output affine: 1 mm, LPS (nibabel axis codes L, P, S).
LPS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])

# === 3. Noise schedule ===============================================================================


class Schedule:
    """The forward (noising) process: variance preserving, linear betas (docs/math.md#notation).

        beta_t = linspace(beta_start, beta_end, T)[t],  abar_t = prod_{s<=t} (1 - beta_s)
        alpha_t = sqrt(abar_t) (signal),  sigma_t = sqrt(1 - abar_t) (noise)
        x_t = alpha_t x0 + sigma_t eps
    t = -1 stands for "before the first step": alpha = 1, sigma = 0 (the sampler's final
    landing). Tables are float64; values are cast to the data's dtype. Timesteps are integers
    (continuous = False); the sampler's grids are timestep_pairs'.
    """
    continuous = False

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2):
        if T < 2 or not 0 < beta_start < beta_end < 1:
            raise ValueError(f"Schedule needs T >= 2 and 0 < beta_start < beta_end < 1, got {T}, {beta_start}, {beta_end}")
        self.T, self.beta_start, self.beta_end = int(T), float(beta_start), float(beta_end)
        self.betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)  # (T,)
        self.alpha_bar = torch.cumprod(1.0 - self.betas, 0)                         # (T,)

    def config(self) -> dict:
        """What rebuilds this schedule: Schedule.from_config(s.config()) == s. Stored in weights files."""
        return {"T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end, "kind": "linear"}

    @classmethod
    def from_config(cls, config: dict):
        """The schedule a config() (e.g. a weights file's "schedule" metadata) describes: kind
        "linear" (this class) or "rflow" (RectifiedFlowSchedule)."""
        config = dict(config)
        kind = config.pop("kind", "linear")
        if kind not in ("linear", "rflow"):
            raise ValueError(f"unknown schedule kind {kind!r} in {config}: use 'linear' or 'rflow'")
        return cls(**config) if kind == "linear" else RectifiedFlowSchedule(**config)

    def __eq__(self, other):
        return isinstance(other, Schedule) and self.config() == other.config()

    def __hash__(self):
        return hash(tuple(sorted(self.config().items())))

    def _check_t(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"timesteps must be integers in -1..{self.T - 1}, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < -1 or int(t.max()) >= self.T):
            raise ValueError(f"timesteps must lie in -1..{self.T - 1} (-1: the clean end), got {int(t.min())}..{int(t.max())}")
        return t

    def alpha_sigma(self, t, like: torch.Tensor | None = None):
        """(alpha_t, sigma_t) for integer timesteps t (B,), reshaped to (B, 1, ..., 1) to
        broadcast against `like` (B, ...) and cast to its dtype and device."""
        t = self._check_t(t)
        abar = torch.where(t >= 0, self.alpha_bar[t.clamp(min=0).cpu()], torch.ones((), dtype=torch.float64))
        alpha, sigma = abar.sqrt(), (1.0 - abar).clamp(min=0).sqrt()
        if like is not None:
            shape = (-1,) + (1,) * (like.ndim - 1)
            alpha = alpha.reshape(shape).to(like.device, like.dtype)
            sigma = sigma.reshape(shape).to(like.device, like.dtype)
        return alpha, sigma

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2 (float64, shape of t)."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps. x0, noise: (B, ...); t: (B,) long."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def draw_t(self, n: int, generator=None) -> torch.Tensor:
        """Training timesteps: n integers uniform in 0..T-1, on the CPU."""
        draw_on = generator.device if generator is not None else "cpu"
        return torch.randint(0, self.T, (n,), generator=generator, device=draw_on).cpu()


class RectifiedFlowSchedule(Schedule):
    """The straight-line process of the authors' rflow model (docs/math.md#rectified-flow):

        alpha_t = 1 - t / T,  sigma_t = t / T,  x_t = alpha_t x0 + sigma_t eps,  t in [0, T] real
    t = 0 is the clean end (the sampler's final landing), t = T pure noise. Timesteps are
    floats (continuous = True); training draws t ~ Uniform[0, T).
    """
    continuous = True

    def __init__(self, T: int = 1000):
        if T < 2:
            raise ValueError(f"RectifiedFlowSchedule needs T >= 2, got {T}")
        self.T = int(T)

    def config(self) -> dict:
        return {"T": self.T, "kind": "rflow"}

    def _check_t(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.dtype == torch.bool or not torch.isfinite(t.double()).all():
            raise ValueError(f"rflow timesteps must be finite numbers in 0..{self.T}")
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > self.T):
            raise ValueError(f"rflow timesteps must lie in 0..{self.T}, got {float(t.min())}..{float(t.max())}")
        return t

    def alpha_sigma(self, t, like: torch.Tensor | None = None):
        """(1 - t/T, t/T) for real timesteps t (B,), shaped and cast like Schedule.alpha_sigma's."""
        sigma = self._check_t(t).double().cpu() / self.T
        alpha = 1.0 - sigma
        if like is not None:
            shape = (-1,) + (1,) * (like.ndim - 1)
            alpha = alpha.reshape(shape).to(like.device, like.dtype)
            sigma = sigma.reshape(shape).to(like.device, like.dtype)
        return alpha, sigma

    def draw_t(self, n: int, generator=None) -> torch.Tensor:
        """Training timesteps: n floats uniform in [0, T), on the CPU."""
        draw_on = generator.device if generator is not None else "cpu"
        return (torch.rand((n,), generator=generator, device=draw_on) * self.T).cpu()


#: The schedule of the published models; a schedule argument of None means this one (for rflow:
#: RFLOW_SCHEDULE).
DEFAULT_SCHEDULE = Schedule()
#: The rflow model's schedule.
RFLOW_SCHEDULE = RectifiedFlowSchedule()


def default_schedule(prediction=None) -> Schedule:
    """The schedule a prediction is trained and sampled with unless told: RFLOW_SCHEDULE for rflow,
    DEFAULT_SCHEDULE otherwise."""
    return RFLOW_SCHEDULE if prediction is not None and canonical_prediction(prediction) == "rflow" else DEFAULT_SCHEDULE


def _schedule(schedule, prediction=None) -> Schedule:
    """Resolve a public function's schedule argument once, at the edge: None gives
    default_schedule(prediction); rflow and the straight-line schedule only go together."""
    schedule = default_schedule(prediction) if schedule is None else schedule
    rflow = prediction is not None and canonical_prediction(prediction) == "rflow"
    if prediction is not None and rflow != schedule.continuous:
        wanted = "a RectifiedFlowSchedule" if rflow else "a variance-preserving Schedule"
        raise ValueError(f"the {canonical_prediction(prediction)} prediction needs {wanted}, got {schedule.config()}")
    return schedule


def _randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise drawn on the generator's own device, then moved to `device`: a seeded CPU
    generator gives the same draws for a CUDA model as for a CPU one."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_on, dtype=dtype).to(device)

# === 4. Parameterizations: targets, conversions, loss, implied weights ===============================

# What each parameterization asks the network to output (alpha, sigma from the schedule;
# docs/math.md#parameterizations derives the weights):
#
#   | prediction | target u             | x0 from output u                  | weight w(t) on |x0_hat - x0|^2 |
#   | noise      | eps                  | (x_t - sigma u) / alpha           | SNR = alpha^2 / sigma^2         |
#   | sample     | x0                   | u                                 | 1                               |
#   | velocity   | alpha eps - sigma x0 | alpha x_t - sigma u               | 1 + SNR = 1 / sigma^2           |
#   | flow       | eps - x0             | (x_t - sigma u) / (alpha + sigma) | (1 + sqrt(SNR))^2               |
#   | rflow      | x0 - eps             | (x_t + sigma u) / (alpha + sigma) | (1 + sqrt(SNR))^2               |
#
# rflow runs on RectifiedFlowSchedule (alpha + sigma = 1), is not clipped when sampling, and
# trains with an L1 loss at real t ~ U[0, T), as the authors' rectified-flow model did.
#
# The loss (target space) and the sampler (x0 space) both go through target() and
# to_x0_eps(): one formula, one place.


def target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, t, schedule=None) -> torch.Tensor:
    """The network's regression target u for x0, noise (B, ...) at timesteps t (B,)."""
    prediction = canonical_prediction(prediction)
    alpha, sigma = _schedule(schedule, prediction).alpha_sigma(t, x0)
    if prediction == "noise":
        return noise
    if prediction == "sample":
        return x0
    if prediction == "velocity":
        return alpha * noise - sigma * x0
    if prediction == "rflow":
        return x0 - noise
    return noise - x0  # flow


def to_x0_eps(prediction: str, output: torch.Tensor, x_t: torch.Tensor, t, schedule=None, clip=None,
              recompute_eps: bool = True):
    """Convert a network output u (B, ...) at x_t, t (>= 0) into (x0_hat, eps_hat).

    x0_hat follows the table above; with clip=True (None: True except for rflow, which the
    authors do not clip) it is clipped to [-1, 1] and
    eps_hat = (x_t - alpha x0_hat) / sigma is taken from the clipped x0_hat, so the pair
    stays consistent: x_t = alpha x0_hat + sigma eps_hat (docs/math.md#conversions).
    recompute_eps=False takes eps_hat from the unclipped x0 instead (the raw network output's
    eps: u for noise, alpha u + sigma x_t for velocity, (x_t + alpha u) / (alpha + sigma) for
    flow), as MONAI's older DDIMScheduler and the paper-era code did.
    """
    prediction = canonical_prediction(prediction)
    alpha, sigma = _schedule(schedule, prediction).alpha_sigma(t, x_t)
    clip = prediction != "rflow" if clip is None else clip
    if prediction == "noise":
        x0 = (x_t - sigma * output) / alpha
    elif prediction == "sample":
        x0 = output
    elif prediction == "velocity":
        x0 = alpha * x_t - sigma * output
    elif prediction == "rflow":
        x0 = (x_t + sigma * output) / (alpha + sigma)
    else:  # flow
        x0 = (x_t - sigma * output) / (alpha + sigma)
    raw_eps = None if recompute_eps else (x_t - alpha * x0) / sigma
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    return x0, (x_t - alpha * x0) / sigma if raw_eps is None else raw_eps


def x0_loss_weight(prediction: str, t, schedule=None) -> torch.Tensor:
    """w(t) such that |u_hat - u|^2 = w(t) |x0_hat - x0|^2 for this prediction: the weight its
    MSE implicitly puts on the x0 error. Returns (B,) float64."""
    prediction = canonical_prediction(prediction)
    snr = _schedule(schedule, prediction).snr(t)
    return {"noise": snr, "sample": torch.ones_like(snr), "velocity": 1.0 + snr,
            "flow": (1.0 + snr.sqrt()) ** 2, "rflow": (1.0 + snr.sqrt()) ** 2}[prediction]


def diffusion_loss(model, x0: torch.Tensor, prediction: str, schedule=None, generator=None) -> torch.Tensor:
    """The training loss: mean((model(x_t, t) - u)^2) in the prediction's own target space,
    t ~ Uniform{0..T-1} and eps ~ N(0, I) per item. x0: (B, C, *S) in [-1, 1]. rflow: mean |.|
    (L1) with real t ~ Uniform[0, T), as the authors trained it."""
    prediction = canonical_prediction(prediction)
    schedule = _schedule(schedule, prediction)
    t = schedule.draw_t(x0.shape[0], generator)  # (B,) on the CPU
    noise = _randn(x0.shape, generator, x0.device, x0.dtype)
    x_t = schedule.add_noise(x0, noise, t)  # coefficients from the CPU copy of t: no device sync
    loss = F.l1_loss if prediction == "rflow" else F.mse_loss
    return loss(model(x_t, t.to(x0.device)).float(), target(prediction, x0, noise, t, schedule).float())

# === 5. The 3D U-Net =================================================================================

# The layout reproduces the parameter names and shapes of MONAI's DiffusionModelUNet
# (spatial_dims=3, resblock_updown=False, no conditioning), so the published state dicts
# load strictly. Read the plain forward passes first; each block with a faster form
# (subsection 5b) says so in its first line, and UNet(fast=False) runs the plain ones.


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t f_k), sin(t f_k)], f_k = max_period^(-k / (dim // 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class _Conv(nn.Module):
    """A 'same' convolution held as `.conv` (state-dict keys '<name>.conv.weight', as in MONAI)."""

    def __init__(self, dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = getattr(nn, f"Conv{dims}d")(cin, cout, kernel, stride=stride, padding=kernel // 2)

    def forward(self, x):
        return self.conv(x)


class ResBlock(nn.Module):
    """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + W emb))), with a 1x1 conv on the skip when C changes.

    x: (B, Cin, *S); emb: (B, E), already through SiLU -> (B, Cout, *S). On the way up,
    forward(x, emb, skip) acts on cat([x, skip], 1).
    """
    fast = True  # section 5b: _resblock_fast, the same in less time and memory

    def __init__(self, dims: int, cin: int, cout: int, emb_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps)
        self.conv1 = _Conv(dims, cin, cout)
        self.time_emb_proj = nn.Linear(emb_channels, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps)
        self.conv2 = _Conv(dims, cout, cout)
        self.skip_connection = _Conv(dims, cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb, skip=None):
        if self.fast:
            return _resblock_fast(self, x, emb, skip)
        if skip is not None:
            x = torch.cat([x, skip], 1)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(emb).reshape(*h.shape[:2], *[1] * (h.ndim - 2))  # (B, Cout, 1, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip_connection(x) + h


class _SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (B, N, C); heads take consecutive channel slices."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.out_proj = nn.Linear(channels, channels)  # registered first, as in MONAI
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))

    def forward(self, h):
        B, N, C = h.shape
        q, k, v = (lin(h).reshape(B, N, self.heads, C // self.heads).transpose(1, 2)
                   for lin in (self.to_q, self.to_k, self.to_v))  # (B, heads, N, C/heads)
        o = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C/heads)) v
        return self.out_proj(o.transpose(1, 2).reshape(B, N, C))


class AttentionBlock(nn.Module):
    """x + attention(GroupNorm(x)) over all voxels as tokens: (B, C, *S) -> (B, C, *S)."""

    def __init__(self, channels: int, head_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps)
        self.attn = _SelfAttention(channels, channels // head_channels)

    def forward(self, x):
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        return self.attn(h).transpose(1, 2).reshape(x.shape) + x


class _Downsample(nn.Module):
    """3x3x3 convolution with stride 2: (B, C, *S) -> (B, C, *S/2)."""

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.op = _Conv(dims, channels, channels, 3, stride=2)

    def forward(self, x):
        return self.op(x)


class _Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3x3 convolution: (B, C, *S) -> (B, C, *2S)."""
    fast = True  # section 5b: _upsample_folded, the same without building the upsampled copy

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.dims = dims
        self.postconv = _Conv(dims, channels, channels, 3)

    def forward(self, x):
        if self.fast:
            return _upsample_folded(self, x)
        return self.postconv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _per_level(value, n: int, name: str) -> tuple:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n:
        raise ValueError(f"{name} must be an int or have one entry per level ({n}), got {value!r}")
    return values


class UNet(nn.Module):
    """The MedForj denoiser: a time-conditioned U-Net, by default 3-D.

    forward(x (B, in_channels, *S), t (B,)) -> (B, out_channels, *S); each spatial size must be
    a multiple of 2**(levels - 1). Levels run over `channels`; each level has `num_res_blocks`
    ResBlocks (+ self-attention where attention_levels), a stride-2 conv down; the way up
    mirrors it with one extra ResBlock per level fed by the skips. UNet(**MEDFORJ_UNET) has
    41,245,217 parameters. gradient_checkpointing=True recomputes block activations in
    backward (training). fast=False runs the plain forward passes (section 5b's reference).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1,
                 channels=(32, 64, 64, 64), attention_levels=(False, False, True, True),
                 num_res_blocks=2, num_head_channels=8, norm_num_groups: int = 32,
                 norm_eps: float = 1e-6, gradient_checkpointing: bool = False, fast: bool = True):
        super().__init__()
        channels, attention_levels = tuple(int(c) for c in channels), tuple(bool(a) for a in attention_levels)
        L = len(channels)
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if len(attention_levels) != L:
            raise ValueError(f"attention_levels needs one entry per level ({L}), got {len(attention_levels)}")
        if any(c % norm_num_groups for c in channels):
            raise ValueError(f"every entry of channels {channels} must be a multiple of norm_num_groups={norm_num_groups}")
        nrb = _per_level(num_res_blocks, L, "num_res_blocks")
        heads = _per_level(num_head_channels, L, "num_head_channels")
        for c, a, hc in zip(channels, attention_levels, heads):
            if a and c % hc:
                raise ValueError(f"channels {c} at an attention level must be a multiple of num_head_channels {hc}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.levels, self.gradient_checkpointing = L, gradient_checkpointing
        self.config = dict(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                           channels=list(channels), attention_levels=list(attention_levels),
                           num_res_blocks=list(nrb), num_head_channels=list(heads),
                           norm_num_groups=norm_num_groups, norm_eps=norm_eps)
        d, g, eps, E = spatial_dims, norm_num_groups, norm_eps, 4 * channels[0]

        def level(cins, cout, attn, hc, attention_first):  # (registration order = MONAI's key order)
            block = nn.Module()
            parts = [("resnets", lambda: nn.ModuleList(ResBlock(d, cin, cout, E, g, eps) for cin in cins))]
            if attn:
                parts.append(("attentions", lambda: nn.ModuleList(AttentionBlock(cout, hc, g, eps) for _ in cins)))
            for name, make in (reversed(parts) if attention_first else parts):
                setattr(block, name, make())
            return block

        self.conv_in = _Conv(d, in_channels, channels[0])
        self.time_embed = nn.Sequential(nn.Linear(channels[0], E), nn.SiLU(), nn.Linear(E, E))
        self.down_blocks = nn.ModuleList()
        cin = channels[0]
        for i, c in enumerate(channels):
            block = level([cin] + [c] * (nrb[i] - 1), c, attention_levels[i], heads[i], True)
            if i < L - 1:
                block.downsampler = _Downsample(d, c)
            self.down_blocks.append(block)
            cin = c
        self.middle_block = nn.Module()
        self.middle_block.resnet_1 = ResBlock(d, channels[-1], channels[-1], E, g, eps)
        self.middle_block.attention = AttentionBlock(channels[-1], heads[-1], g, eps)
        self.middle_block.resnet_2 = ResBlock(d, channels[-1], channels[-1], E, g, eps)
        self.up_blocks = nn.ModuleList()
        prev = channels[-1]
        for lev in reversed(range(L)):  # the skips of level lev: its ResBlocks, then the level below's output
            c, n = channels[lev], nrb[lev] + 1
            skip_in = [c] * (n - 1) + [channels[max(lev - 1, 0)]]
            block = level([prev + skip_in[0]] + [c + s for s in skip_in[1:]], c, attention_levels[lev], heads[lev], False)
            if lev > 0:
                block.upsampler = _Upsample(d, c)
            self.up_blocks.append(block)
            prev = c
        self.out = nn.Sequential(nn.GroupNorm(g, channels[0], eps), nn.SiLU(), _Conv(d, channels[0], out_channels))
        self.set_fast(fast)

    def set_fast(self, fast: bool = True) -> "UNet":
        """Run section 5b's fast forward passes (True, the default) or the plain ones."""
        self.fast = bool(fast)
        for m in self.modules():
            if isinstance(m, (ResBlock, _Upsample)):
                m.fast = self.fast
        return self

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = self._check_input(x, t)
        emb = F.silu(self.time_embed(timestep_embedding(t, self.config["channels"][0]).to(x.dtype)))  # (B, E)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            for j, res in enumerate(block.resnets):
                h = self._run(res, h, emb)
                if hasattr(block, "attentions"):
                    h = self._run(block.attentions[j], h)
                skips.append(h)
            if hasattr(block, "downsampler"):
                h = block.downsampler(h)
                skips.append(h)
        mid = self.middle_block
        h = self._run(mid.resnet_2, self._run(mid.attention, self._run(mid.resnet_1, h, emb)), emb)
        for block in self.up_blocks:
            for j, res in enumerate(block.resnets):
                h = self._run(res, h, emb, skips.pop())  # acts on cat([h, skip])
                if hasattr(block, "attentions"):
                    h = self._run(block.attentions[j], h)
            if hasattr(block, "upsampler"):
                h = self._run(block.upsampler, h)
        return _head_fast(self.out, h) if self.fast else self.out(h)

    def _run(self, module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _check_input(self, x: torch.Tensor, t) -> torch.Tensor:
        d, multiple = self.spatial_dims, 2 ** (self.levels - 1)
        if not torch.is_tensor(x) or x.ndim != d + 2:
            raise ValueError(f"UNet expects x of shape (B, C, {', '.join('DHW'[-d:])}), {d + 2} dimensions; "
                             f"got {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects {self.in_channels} input channel(s), got {x.shape[1]} (x shape {tuple(x.shape)})")
        if any(s % multiple for s in x.shape[2:]):
            raise ValueError(f"spatial sizes must be multiples of {multiple} (2**(levels-1) for {self.levels} levels), "
                             f"got {tuple(x.shape[2:])}; e.g. {IMAGE_SHAPE} or {tuple(multiple * 4 for _ in range(d))}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        return t

# --- 5b. Speed-ups: each equals a plain form above ------------------------------------------------
# Measured against MONAI by tests/bench_unet.py; each proven equal to its plain form (float32,
# forward and gradients) by tests/test_unet.py::test_fast_forward_equals_plain.


def _norm_act(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """Equals F.silu(norm(x)); the activation runs in place unless autograd needs its input."""
    h = norm(x)
    return F.silu(h, inplace=not h.requires_grad)


def _norm_act_parts(norm: nn.GroupNorm, parts) -> list:
    """Equals F.silu(norm(cat(parts, 1))) split back into the parts, without the concatenation.

    Group statistics from per-channel ones: for the channels c of group g, mean_g = avg_c
    mean_c and var_g = avg_c mean(x_c^2) - mean_g^2, accumulated in at least float32 (fp16
    would overflow). When no gradient is needed the parts are normalised in place.
    """
    dims = tuple(range(2, parts[0].ndim))
    dtype = torch.promote_types(parts[0].dtype, torch.float32)
    mean = torch.cat([p.mean(dims, dtype=dtype) for p in parts], 1)  # (B, C)
    msq = torch.cat([torch.linalg.vector_norm(p, dim=dims, dtype=dtype) ** 2 / math.prod(p.shape[2:]) for p in parts], 1)
    B, C, G = mean.shape[0], mean.shape[1], norm.num_groups
    group_mean = mean.reshape(B, G, -1).mean(-1)
    group_var = (msq.reshape(B, G, -1).mean(-1) - group_mean**2).clamp(min=0)
    scale = torch.rsqrt(group_var + norm.eps).repeat_interleave(C // G, 1) * norm.weight  # (B, C)
    shift = norm.bias - group_mean.repeat_interleave(C // G, 1) * scale
    out = []
    for p, s, b in zip(parts, scale.split([p.shape[1] for p in parts], 1), shift.split([p.shape[1] for p in parts], 1)):
        s, b = s.reshape(*s.shape, *[1] * len(dims)), b.reshape(*b.shape, *[1] * len(dims))
        grad = torch.is_grad_enabled() and (p.requires_grad or s.requires_grad)
        out.append(F.silu(p * s + b) if grad else F.silu(p.mul_(s).add_(b), inplace=True))
    return out


def _conv_parts(conv: nn.Module, *parts) -> torch.Tensor:
    """Equals conv(cat(parts, 1)) for a 'same' convolution, without the concatenation:
    conv(cat([a, b]), W) = conv(a, W[:, :Ca]) + conv(b, W[:, Ca:]). A 1x1x1 convolution runs
    as a matrix product over the flattened voxels, which CPU backends do about 3x faster."""
    w, b = conv.weight, conv.bias
    pointwise = all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
    if len(parts) == 1 and not pointwise:
        return conv(parts[0])
    weights = list(w.split([x.shape[1] for x in parts], 1))
    weights = [wx.contiguous() for wx in weights]  # oneDNN wants contiguous slices
    if pointwise:  # per item: (Cout, Cx) @ (Cx, N), accumulated over the parts
        items = []
        for i in range(parts[0].shape[0]):
            acc = torch.addmm(b[:, None], weights[0].flatten(1), parts[0][i].reshape(parts[0].shape[1], -1))
            for x, wx in zip(parts[1:], weights[1:]):  # out of place: autocast casts addmm, not addmm_
                acc = torch.addmm(acc, wx.flatten(1), x[i].reshape(x.shape[1], -1))
            items.append(acc)
        out = items[0][None] if len(items) == 1 else torch.stack(items)
        return out.reshape(out.shape[0], -1, *parts[0].shape[2:])
    out = conv._conv_forward(parts[0], weights[0], b)
    for x, wx in zip(parts[1:], weights[1:]):
        out = out.add_(conv._conv_forward(x, wx, None))
    return out


def _resblock_fast(block: ResBlock, x, emb, skip=None):
    """Equals ResBlock's plain forward. Saves the concatenated copy on the way up (two full
    copies at the finest level), normalises and activates in place where no gradient needs
    it; x and skip are consumed."""
    skip_conv = block.skip_connection.conv if isinstance(block.skip_connection, _Conv) else None
    if skip is None:
        h = block.conv1(_norm_act(block.norm1, x))
        residual = None
    else:  # the residual first: the parts are normalised in place next
        residual = _conv_parts(skip_conv, x, skip)
        h = _conv_parts(block.conv1.conv, *_norm_act_parts(block.norm1, [x, skip]))
    h += block.time_emb_proj(emb).reshape(*h.shape[:2], *[1] * (h.ndim - 2))
    h = block.conv2(_norm_act(block.norm2, h))
    if residual is None:
        residual = x if skip_conv is None else _conv_parts(skip_conv, x)
    return h.add_(residual)


_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],   # parity 0: taps on coarse j-1, j
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # parity 1: taps on coarse j, j+1


def _fold_upsample_kernel(w: torch.Tensor, dims: int) -> torch.Tensor:
    """(C, C, 3, ..., 3) -> (2**dims * C, C, 2, ..., 2): the coarse-grid kernels of every parity."""
    fold = _FOLD.to(w.device, w.dtype)
    kernels = []
    with torch.autocast(w.device.type, enabled=False):  # sums of taps, in the weight's own precision
        for parity in itertools.product((0, 1), repeat=dims):
            k = w
            for axis, p in enumerate(parity):  # contract this axis' 3 taps into 2
                k = torch.tensordot(k, fold[p], dims=([2 + axis], [1])).movedim(-1, 2 + axis)
            kernels.append(k)
    return torch.cat(kernels, 0)


def _upsample_folded(up: _Upsample, x: torch.Tensor) -> torch.Tensor:
    """Equals _Upsample's plain forward, computed on the coarse grid.

    Along one axis, fine voxel 2j + p sees coarse voxels j-1+p and j+p, so the three fine taps
    (w_-1, w_0, w_+1) fold into two coarse ones: (w_-1, w_0 + w_+1) for p = 0, (w_-1 + w_0, w_+1)
    for p = 1. One 2x2x2 convolution with 2**dims * C outputs (one group per parity) on the
    input padded by 1 gives every parity; parity p starts at offset p. 8 instead of 27
    multiply-adds per output voxel. The folded kernel is cached while no gradient is needed,
    keyed by the weight's version counter (optimizer steps and load_state_dict invalidate it).
    """
    w, d = up.postconv.conv.weight, up.dims
    if torch.is_grad_enabled() and w.requires_grad:
        kernel = _fold_upsample_kernel(w, d)
    else:
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if getattr(up, "_folded", (None,))[0] != key:
            with torch.no_grad():
                up._folded = (key, _fold_upsample_kernel(w, d))
        kernel = up._folded[1]
    B, C, S = x.shape[0], x.shape[1], x.shape[2:]
    y = getattr(F, f"conv{d}d")(F.pad(x, (1, 1) * d), kernel, up.postconv.conv.bias.repeat(2**d))
    y = y.reshape(B, 2**d, C, *(s + 1 for s in S))          # (B, parity, C, *(S + 1))
    out = y.new_empty(B, C, *itertools.chain.from_iterable((s, 2) for s in S))  # (B, C, S0, 2, S1, 2, ...)
    for i, parity in enumerate(itertools.product((0, 1), repeat=d)):
        fine = (slice(None), slice(None)) + tuple(itertools.chain.from_iterable((slice(None), p) for p in parity))
        coarse = (slice(None), i, slice(None)) + tuple(slice(p, p + s) for p, s in zip(parity, S))
        out[fine] = y[coarse]
    return out.reshape(B, C, *(2 * s for s in S))


def _head_fast(out: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """Equals out(h) for UNet.out = (GroupNorm, SiLU, conv), with the SiLU in place when it may."""
    return out[2](_norm_act(out[0], h))

# === 6. Sampler ======================================================================================

SPACINGS = ("linspace", "leading")


def timestep_pairs(steps: int, spacing: str = "linspace", schedule=None) -> list:
    """The DDIM timestep grid as [(t, t_prev), ...], descending; the last t_prev is -1
    (docs/math.md#timestep-grids).

    "linspace" (the reference generator's): round(linspace(0, T-1, steps)); each step
        lands on the next listed timestep. Needs steps >= 2 (one step would start at t = 0).
    "leading" (MONAI's older DDIM, the paper-era code): arange(steps) * (T // steps);
        t_prev = t - T // steps, below 0 meaning -1.
    A RectifiedFlowSchedule (rflow) has one grid of real timesteps, t_i = (1 - i / steps) T for
    i = 0..steps-1, each step landing on the next and the last on t = 0 (the clean end).
    """
    schedule = _schedule(schedule)
    T = schedule.T
    if schedule.continuous:
        if spacing != "linspace":
            raise ValueError(f"the rflow schedule has one timestep grid; spacing {spacing!r} is for the VP schedule")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1 for the rflow grid, got {steps!r}")
        ts = [T * (1 - i / steps) for i in range(steps + 1)]
        return list(zip(ts[:-1], ts[1:]))
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: use one of {', '.join(SPACINGS)}")
    lowest = 2 if spacing == "linspace" else 1
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not lowest <= steps <= T:
        raise ValueError(f"steps must be an integer in {lowest}..{T} for the {spacing!r} grid, got {steps!r}")
    if spacing == "linspace":
        ts = [int(v) for v in np.round(np.linspace(0, T - 1, steps))[::-1]]
        return list(zip(ts, ts[1:] + [-1]))
    stride = T // steps
    return [(t, t - stride if t - stride >= 0 else -1) for t in range(stride * (steps - 1), -1, -stride)]


def ddim_step(x0_hat, eps_hat, t_prev: int, eta: float = 0.0, t: int | None = None, schedule=None, generator=None):
    """One DDIM update from t to s = t_prev given (x0_hat, eps_hat), each (B, ...) (docs/math.md#ddim-update).

    eta = 0: x_s = alpha_s x0_hat + sigma_s eps_hat (s = -1, or rflow's s = 0, returns x0_hat).
    eta > 0: sigma_eta^2 = eta^2 (sigma_s^2 / sigma_t^2) (sigma_t^2 - (alpha_t sigma_s / alpha_s)^2),
             x_s = alpha_s x0_hat + sqrt(sigma_s^2 - sigma_eta^2) eps_hat + sigma_eta z
    (for the VP schedule sigma_t^2 - (alpha_t sigma_s / alpha_s)^2 = 1 - alpha_t^2 / alpha_s^2).
    """
    schedule = _schedule(schedule)
    if t_prev < 0 or (schedule.continuous and t_prev == 0):
        return x0_hat
    dtype = torch.float64 if schedule.continuous else torch.long
    s = torch.full((x0_hat.shape[0],), t_prev, dtype=dtype)
    a_s, s_s = schedule.alpha_sigma(s, x0_hat)
    if eta == 0:
        return a_s * x0_hat + s_s * eps_hat
    a_t, s_t = schedule.alpha_sigma(torch.full_like(s, t), x0_hat)
    var = eta**2 * (s_s**2 / s_t**2) * (s_t**2 - (a_t * s_s / a_s) ** 2)
    z = _randn(x0_hat.shape, generator, x0_hat.device, x0_hat.dtype)
    return a_s * x0_hat + (s_s**2 - var).clamp(min=0).sqrt() * eps_hat + var.sqrt() * z


def dpm_solver_2m_step(x_t, x0_hat, t, t_prev, previous=None, schedule=None) -> tuple:
    """One DPM-Solver++(2M) step from t to s = t_prev (docs/math.md#dpm-solver-2m): x_t and x0_hat
    (B, C, *S) -> (x_s (B, C, *S), state); state, (x0_hat, h), goes to the next step as `previous`.

    With lambda = log(alpha / sigma) and h = lambda_s - lambda_t, the step integrates the
    probability-flow ODE exactly for an x0 prediction D that is constant in lambda:
        x_s = (sigma_s / sigma_t) x_t + (alpha_s - alpha_t sigma_s / sigma_t) D
    First order (the first step, or after an infinite h such as rflow's first step from
    sigma = 1): D = x0_hat, which is DDIM with eta 0. Second order: with r = h_prev / h,
    D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_prev, the previous step's x0 estimate extrapolated in
    lambda. The step to the clean end (t_prev = -1, or rflow's 0; lambda = inf) returns x0_hat.
    """
    schedule = _schedule(schedule)
    if t_prev < 0 or (schedule.continuous and t_prev == 0):
        return x0_hat, None
    dtype = torch.float64 if schedule.continuous else torch.long
    (a_t, a_s), (s_t, s_s) = schedule.alpha_sigma(torch.tensor([t, t_prev], dtype=dtype))
    a_t, a_s, s_t, s_s = (float(v) for v in (a_t, a_s, s_t, s_s))
    h = math.log(a_s / s_s) - (math.log(a_t / s_t) if a_t > 0 else -math.inf)
    d = x0_hat
    if previous is not None and math.isfinite(h) and math.isfinite(previous[1]):
        half_over_r = 0.5 * h / previous[1]
        d = (1 + half_over_r) * x0_hat - half_over_r * previous[0]
    return (s_s / s_t) * x_t + (a_s - a_t * s_s / s_t) * d, (x0_hat, h)


#: The sampler's update rules: "ddim" (DDIM, the authors' sampler) and "dpm++2m" (DPM-Solver++(2M)).
METHODS = ("ddim", "dpm++2m")

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def _autocast(device: torch.device, dtype):
    """The precision context: float32 on CPU; on CUDA autocast to float16 by default (or
    "bfloat16"; "float32" turns autocast off). GroupNorm runs in float32 under autocast and
    SDPA accumulates its softmax in float32, so both stay safe."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use float16, bfloat16 or float32")
        dtype = _DTYPES[dtype]
    if device.type != "cuda":
        if dtype not in (None, torch.float32):
            raise ValueError(f"reduced precision ({dtype}) is for CUDA; on {device.type} the sampler runs in float32")
        return torch.autocast(device.type, enabled=False)
    dtype = torch.float16 if dtype is None else dtype
    return torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)


def sample(model, prediction: str, shape=None, noise=None, steps: int = 64, eta: float = 0.0,
           spacing: str = "linspace", clip=None, schedule=None, generator=None,
           progress: bool = True, callback=None, dtype=None, recompute_eps: bool = True,
           method: str = "ddim") -> torch.Tensor:
    """Generate volumes with DDIM from pure noise: returns float32 (B, C, *S) on the model's device.

    shape: (B, C, *S), default (1, model.in_channels, *IMAGE_SHAPE); or give `noise` (B, C, *S)
    itself (same noise -> same output). generator: a torch.Generator for the starting noise and,
    with eta > 0, the per-step noise (drawn on the generator's device, so a CPU generator gives
    the same draws for a CUDA model). Each step: u = model(x_t, t); (x0_hat, eps_hat) =
    to_x0_eps(...) (clipped x0 when clip=True, so the result lies in [-1, 1]; None: clipped except
    for rflow, as the authors sample); x_{t_prev} =
    ddim_step(...). callback(i, t, x_t, x0_hat) is called after every step (x_t: the new state).
    dtype: None (float16 autocast on CUDA, float32 on CPU), "bfloat16" or "float32".
    The defaults are the authors' current sampler; spacing="leading" with recompute_eps=False is
    the paper-era one (MONAI's older DDIMScheduler; docs/math.md#samplers).
    method="dpm++2m": DPM-Solver++(2M) instead of the DDIM update, on the same grid and with the
    same (clipped) x0 estimates: second order, so fewer steps reach DDIM's quality
    (docs/math.md#dpm-solver-2m); deterministic (eta 0) and with eps recomputed.
    """
    prediction = canonical_prediction(prediction)
    schedule = _schedule(schedule, prediction)
    if not 0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}: use one of {', '.join(METHODS)}")
    if method != "ddim" and (eta != 0 or not recompute_eps):
        raise ValueError(f"method {method!r} is a deterministic solver on the clipped x0: eta must be 0 and "
                         f"recompute_eps True (eta and the paper-era eps are DDIM's options)")
    pairs = timestep_pairs(steps, spacing, schedule)
    device = next(model.parameters()).device
    if noise is None:
        noise = _randn(shape if shape is not None else (1, getattr(model, "in_channels", 1), *IMAGE_SHAPE),
                       generator, device)
    elif shape is not None and tuple(shape) != tuple(noise.shape):
        raise ValueError(f"shape {tuple(shape)} disagrees with noise.shape {tuple(noise.shape)}: give one of them")
    x = noise.to(device=device, dtype=torch.float32)
    state = None  # dpm++2m: the previous step's (x0_hat, h)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device, dtype):
            for i, (t, t_prev) in enumerate(tqdm(pairs, desc=f"sampling ({prediction})", disable=not progress)):
                tt = torch.full((x.shape[0],), t, dtype=torch.float32 if schedule.continuous else torch.long)  # on the CPU
                x0_hat, eps_hat = to_x0_eps(prediction, model(x, tt.to(device)).float(), x, tt, schedule, clip,
                                            recompute_eps)
                if method == "ddim":
                    x = ddim_step(x0_hat, eps_hat, t_prev, eta, t, schedule, generator)
                else:
                    x, state = dpm_solver_2m_step(x, x0_hat, t, t_prev, state, schedule)
                if callback is not None:
                    callback(i, t, x, x0_hat)
    finally:
        model.train(was_training)
    return x.float()

# === 7. Weights: save/load, fetch (Pooch + data_manifest.csv) ========================================


def _atomic_write(path, write) -> pathlib.Path:
    """Call write(tmp) on a fresh temporary file beside path (mkstemp: an unpredictable name,
    created exclusively), then rename it over path. A crash or an exception leaves the
    previous file (or none) in place, never a partial one. The file gets the permissions an
    ordinary open() would give it (0666 less the umask), not mkstemp's owner-only 0600."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)  # keep .nii.gz etc. so writers pick the right format
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(pathlib.Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_weights(model: nn.Module, path, schedule=None, dtype=None, **metadata) -> pathlib.Path:
    """Write model's state dict as .safetensors with metadata, atomically.

    Metadata: "format" = "ddpm-mini", "unet" = the model's config, "schedule" = the schedule it
    was trained with (default DEFAULT_SCHEDULE), plus every keyword (e.g. prediction="flow");
    values other than strings are JSON-encoded. load_model reads them back. dtype (e.g.
    torch.float16: half the file) stores the floating-point tensors in that type; loading casts
    them back to the model's.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"save_weights: dtype must be a floating torch dtype such as torch.float16, got {dtype!r}")
    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_weights writes .safetensors files, got {path.name!r}")
    if "prediction" in metadata:
        metadata["prediction"] = canonical_prediction(metadata["prediction"])
    meta = {"format": "ddpm-mini", "version": __version__, **({"unet": model.config} if hasattr(model, "config") else {}),
            "schedule": _schedule(schedule, metadata.get("prediction")).config(), **metadata}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    state = {k: v.detach().cpu().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    return _atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def _read_state_dict(path) -> tuple:
    """(state_dict, metadata) from .safetensors or a torch file (weights_only: no pickled code runs)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # safetensors' own error type for empty, truncated or foreign files
            raise ValueError(f"{path} is not a readable .safetensors file (empty, cut short, or another format "
                             f"renamed?): {err}") from None
    if path.suffix not in (".pt", ".pth", ".ckpt", ".bin"):
        raise ValueError(f"unsupported weights file {path.name!r}: use .safetensors, .pt, .pth, .ckpt or .bin")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for anything but plain tensors/containers
        raise ValueError(f"refused to load {path}: it is not a plain tensor checkpoint (torch.load with "
                         f"weights_only=True failed, so it may contain code). Convert it to .safetensors. ({err})") from None
    metadata = {}
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                metadata = {k: v for k, v in obj.items() if isinstance(v, (str, int, float))}
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict (a dict of tensors, optionally under 'model' or 'state_dict')")
    return obj, metadata


_PREFIXES = ("module.", "model.", "_orig_mod.")  # DataParallel/DDP, Lightning-style wrappers, torch.compile


def load_weights(model: nn.Module, path) -> dict:
    """Load a weights file into model strictly and return its metadata (a dict of strings).

    Accepts .safetensors and .pt/.pth (torch.load(weights_only=True) only), plain or under a
    "model"/"state_dict" key, with `module.`, `model.`, `_orig_mod.` prefixes stripped. Any
    missing key, unexpected key or shape mismatch raises a ValueError that names them.
    """
    state, metadata = _read_state_dict(path)
    _load_state(model, state, pathlib.Path(path).name)
    return metadata


def _load_state(model: nn.Module, state: dict, source: str) -> None:
    clean = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        clean[key] = value
    expected = model.state_dict()
    problems = {"missing keys": [k for k in expected if k not in clean],
                "unexpected keys": [k for k in clean if k not in expected],
                "shape mismatches": [f"{k}: file {tuple(clean[k].shape)} vs model {tuple(v.shape)}"
                                     for k, v in expected.items() if k in clean and clean[k].shape != v.shape]}
    if any(problems.values()):
        listed = [f"{name}: {', '.join(items[:8])}" + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
                  for name, items in problems.items() if items]
        raise ValueError(f"{source} does not fit this {type(model).__name__} (strict load): " + "; ".join(listed))
    model.load_state_dict(clean, strict=True)


def load_model(path, device=None) -> tuple:
    """Build a UNet from a weights file's metadata and load it strictly: returns (model in eval
    mode, metadata with "unet" and "schedule" decoded). path: a weights file, or a training run
    or checkpoint folder (its EMA weights, see weights_file). Files without a "unet" entry (such
    as the published MedForj files) get MEDFORJ_UNET; without a "schedule", that of
    default_schedule(the file's prediction, if it names one)."""
    path = weights_file(path)
    state, metadata = _read_state_dict(path)
    try:
        meta = {k: (json.loads(v) if k in ("unet", "schedule", "shape") and isinstance(v, str) else v)
                for k, v in metadata.items()}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: its unet/schedule/shape metadata is not valid JSON ({err})") from None
    meta.setdefault("schedule", default_schedule(meta.get("prediction")).config())
    _check_unet_config(meta.get("unet", MEDFORJ_UNET), state, path)
    model = UNet(**meta.get("unet", MEDFORJ_UNET))
    _load_state(model, state, path.name)
    return model.to(_device(device)).eval(), meta


def _check_unet_config(config, state: dict, path) -> None:
    """Refuse a "unet" entry that is not UNet keywords, or that describes more parameters than the
    file holds (an absurd config would otherwise allocate gigabytes before failing)."""
    allowed = set(inspect.signature(UNet).parameters) - {"gradient_checkpointing", "fast"}
    if not isinstance(config, dict) or set(config) - allowed:
        unknown = sorted(set(config) - allowed) if isinstance(config, dict) else config
        raise ValueError(f"{path}: its 'unet' metadata must be UNet keywords ({', '.join(sorted(allowed))}); got {unknown!r}")
    try:
        with torch.device("meta"):
            wanted = sum(p.numel() for p in UNet(**config).parameters())
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: its 'unet' metadata {config} does not describe a U-Net ({err})") from None
    held = sum(v.numel() for v in state.values())
    if wanted > held:
        raise ValueError(f"{path}: its 'unet' metadata describes {wanted:,} parameters, the file holds {held:,}")


def weights_file(path) -> pathlib.Path:
    """The weights to sample with: a file as given; in a checkpoint or training output folder,
    the EMA weights (ema.safetensors, of the newest complete checkpoint for an output folder)."""
    path = pathlib.Path(path)
    if not path.is_dir():
        return path
    if (path / "ema.safetensors").exists():
        return path / "ema.safetensors"
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path} holds neither ema.safetensors nor a complete checkpoint "
                                "(checkpoints/step_NNNNNN/ema.safetensors)")
    return ckpt / "ema.safetensors"


def _device(device=None) -> torch.device:
    """The device to run on: as given, else CUDA when available, else the CPU. Under torchrun
    (WORLD_SIZE > 1) a CUDA device without an index becomes this process's GPU (LOCAL_RANK)."""
    try:
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here (torch "
                         f"{torch.__version__}, torch.cuda.is_available() is False); use --device cpu")
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# --- 7b. Assets: data_manifest.csv, the cache, fetch (Pooch) -------------------------------------

#: data_manifest.csv's columns, and the allowed values of its kind column: weights (safetensors
#: of a model), volume (one NIfTI/NRRD image), template (an atlas image, e.g. MNI152), source (a
#: dataset named for provenance, e.g. the paper's training sets: no url, not fetchable).
MANIFEST_COLUMNS = ("name", "kind", "group", "url", "hash", "verified", "size", "license", "citation", "description")
MANIFEST_KINDS = ("weights", "volume", "template", "source")


def manifest_path() -> pathlib.Path:
    """The manifest in use: $DDPM_MINI_MANIFEST, else data_manifest.csv beside this module (a
    checkout), else the copy an installed wheel puts in <data root>/share/ddpm-mini/, where the
    data root is the one holding lib/pythonX.Y/site-packages/ddpm_mini.py (venv, --user, /usr/local)."""
    env = os.environ.get("DDPM_MINI_MANIFEST")
    if env:
        return pathlib.Path(env)
    here = pathlib.Path(__file__).resolve()
    roots = [here.parents[3] if len(here.parents) > 3 else here.parent, pathlib.Path(sys.prefix),
             pathlib.Path(sysconfig.get_path("data"))]
    candidates = [here.with_name("data_manifest.csv")] + [r / "share" / "ddpm-mini" / "data_manifest.csv" for r in roots]
    return next((c for c in candidates if c.exists()), candidates[0])


#: What a manifest row's hash may be: empty (unpublished) or algorithm:hexdigest.
_HASH_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64}


def _check_row(path, row: dict) -> None:
    """Refuse manifest cells that could write outside the cache or that are not a hash or size."""
    name, digest, size = row["name"], row.get("hash", ""), row.get("size", "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"manifest {path}: the name {name!r} is not allowed (letters, digits, '.', '_', '-'; "
                         "it names a folder in the cache)")
    algorithm, _, hexdigest = digest.partition(":")
    if digest and not (algorithm in _HASH_LENGTHS and re.fullmatch(f"[0-9a-fA-F]{{{_HASH_LENGTHS[algorithm]}}}", hexdigest)):
        raise ValueError(f"manifest {path}: {name}: the hash {digest!r} is not algorithm:hexdigest "
                         f"({', '.join(f'{a} with {n} hex digits' for a, n in _HASH_LENGTHS.items())})")
    if size and not size.isdigit():
        raise ValueError(f"manifest {path}: {name}: the size {size!r} is not a number of bytes")


def read_manifest(path=None) -> dict:
    """Read the asset manifest: {name: row}, each row a dict of MANIFEST_COLUMNS (strings). Names,
    hashes and sizes are checked here, so a bad cell is blamed on the manifest, not a download."""
    path = pathlib.Path(path) if path is not None else manifest_path()
    if not path.exists():
        raise FileNotFoundError(f"asset manifest not found at {path} (set DDPM_MINI_MANIFEST to a data_manifest.csv)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("name", "url", "hash") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"manifest {path} lacks the column(s) {missing}; it needs {MANIFEST_COLUMNS}")
        rows = {}
        for row in reader:
            row = {k: (v or "").strip() for k, v in row.items() if k is not None}
            if row["name"] in rows:
                raise ValueError(f"manifest {path}: the name {row['name']!r} appears twice")
            _check_row(path, row)
            rows[row["name"]] = row
    return rows


def cache_dir() -> pathlib.Path:
    """Where fetched assets live: $DDPM_MINI_CACHE, else Pooch's per-user cache for "ddpm-mini"."""
    env = os.environ.get("DDPM_MINI_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path(pooch.os_cache("ddpm-mini"))


def _source(row: dict) -> tuple:
    """(url, file name) for a manifest row, honouring $DDPM_MINI_MIRROR (a base URL or a folder
    that holds the same file names)."""
    fname = pathlib.PurePosixPath(urlparse(row["url"]).path).name
    mirror = os.environ.get("DDPM_MINI_MIRROR", "").strip()
    if not mirror:
        return row["url"], fname
    if "://" in mirror:
        return mirror.rstrip("/") + "/" + fname, fname
    return str(pathlib.Path(mirror).expanduser() / fname), fname


def _copy_local(url, output_file, pooch_obj):
    """A Pooch downloader for a mirror folder: copies the file (Pooch then checks the hash)."""
    if not os.path.exists(url):
        raise FileNotFoundError(f"{url} is not in the mirror folder")
    with open(url, "rb") as src:
        if hasattr(output_file, "write"):
            shutil.copyfileobj(src, output_file)
        else:
            with open(output_file, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _bundled(name: str, row: dict):
    """The copy of an asset shipped with the kit (weights/<file name> beside the manifest: the
    repository in a checkout, <data root>/share/ddpm-mini/ when installed), checked against the
    manifest hash; None when there is none."""
    fname = pathlib.PurePosixPath(urlparse(row["url"]).path).name
    path = manifest_path().resolve().parent / "weights" / fname
    if not path.is_file():
        return None
    if row.get("hash"):
        algorithm, _, expected = row["hash"].rpartition(":")
        if pooch.file_hash(str(path), alg=algorithm or "sha256") != expected.lower():
            raise ValueError(f"{name}: the bundled file {path} does not match the manifest hash {row['hash']} "
                             "(edited or partly checked out? restore it with git, or reinstall the kit)")
    return path


_WARNED_UNVERIFIED = set()


def fetch(name: str, progress: bool = True) -> pathlib.Path:
    """Download one manifest asset (once; later calls use the cache) and return its path. Assets
    shipped with the kit (the teaching models) come from its weights/ folder when it is there
    (a checkout, an installed copy) and are downloaded from their url otherwise (e.g. on Colab).

    The file's hash is checked when the manifest has one: a wrong file raises a ValueError and
    leaves nothing in the cache. Rows without a published hash are marked unverified and
    warned about once. An unreachable source raises a ConnectionError naming the asset and the
    DDPM_MINI_MIRROR variable.
    """
    rows = read_manifest()
    if name not in rows:
        fetchable = sorted(k for k, r in rows.items() if r.get("url"))
        raise ValueError(f"unknown asset {name!r}; the manifest ({manifest_path()}) has: {', '.join(fetchable)}")
    row = rows[name]
    if not row.get("url") or row.get("kind") == "source":
        raise ValueError(f"{name!r} is listed for reference only and cannot be fetched: {row.get('description', '')}")
    bundled = _bundled(name, row)
    if bundled is not None:
        return bundled
    url, fname = _source(row)
    known_hash = row.get("hash") or None
    if known_hash is None and name not in _WARNED_UNVERIFIED:
        _WARNED_UNVERIFIED.add(name)
        warnings.warn(f"{name}: no checksum is published for this file, so its download is not verified; its sha256 "
                      "is recorded at the first download and checked at every later use (trust on first use)", stacklevel=2)
    local = "://" not in url
    downloader = _copy_local if local else pooch.HTTPDownloader(progressbar=progress, timeout=60)
    for stale in (cache_dir() / name).glob("tmp*"):  # Pooch's temporary of a download that was killed
        if stale.is_file() and time.time() - stale.stat().st_mtime > 600:
            stale.unlink()
    hint = _NoHashHint()  # Pooch's developer hint ("use this value as known_hash") after unhashed downloads
    pooch.get_logger().addFilter(hint)
    try:
        path = pooch.retrieve(url, known_hash, fname=fname, path=cache_dir() / name,
                              downloader=downloader, progressbar=False if local else None)
    except ValueError as err:  # Pooch's hash mismatch: it has already removed the download
        raise ValueError(f"{name}: the file from {url} does not match the manifest hash {known_hash}; "
                         f"nothing was kept ({err})") from None
    except Exception as err:
        raise ConnectionError(f"could not fetch {name!r} from {url}: {type(err).__name__}: {err}. Offline? Put "
                              f"{fname} in a folder (or on a server) and set DDPM_MINI_MIRROR to it.") from None
    finally:
        pooch.get_logger().removeFilter(hint)
    path = pathlib.Path(path)
    if row.get("size") and path.stat().st_size != int(row["size"]):
        got = path.stat().st_size
        path.unlink()
        raise ValueError(f"{name}: the file from {url} has {got} bytes, the manifest says {row['size']} "
                         "(a download cut short?); nothing was kept")
    if known_hash is None:
        _trust_on_first_use(name, path)
    return path


class _NoHashHint(logging.Filter):
    def filter(self, record) -> bool:
        return "known_hash" not in record.getMessage()


def _trust_on_first_use(name: str, path: pathlib.Path) -> None:
    """For files without a published hash: record the sha256 of the first download beside it
    (<file>.sha256) and refuse the file if it later differs."""
    record = path.with_name(path.name + ".sha256")
    digest = pooch.file_hash(str(path), alg="sha256")
    if not record.exists():
        _atomic_write(record, lambda tmp: tmp.write_text(digest + "\n"))
    elif record.read_text().strip() != digest:
        raise ValueError(f"{name}: the cached file {path} is not the one first downloaded (sha256 then "
                         f"{record.read_text().strip()}, now {digest}); delete {path.parent} to download it again")


def fetch_group(group: str, progress: bool = True) -> list:
    """Fetch every fetchable asset of a manifest group, with one overall progress bar; returns paths."""
    rows = [r for r in read_manifest().values() if r.get("group") == group and r.get("url") and r.get("kind") != "source"]
    if not rows:
        groups = sorted({r.get("group", "") for r in read_manifest().values() if r.get("url")} - {""})
        raise ValueError(f"no fetchable assets in group {group!r}; groups: {', '.join(groups)}")
    return [fetch(r["name"], progress=False) for r in tqdm(rows, desc=f"fetching {group}", disable=not progress)]


def load_pretrained(prediction: str, device=None) -> UNet:
    """The published MedForj model for a prediction type: UNet(**MEDFORJ_UNET), fetched, loaded
    strictly, in eval mode on `device` (default: CUDA when available)."""
    model, _ = load_model(fetch(f"medforj_{canonical_prediction(prediction)}"), device)
    return model

# === 8. Data: NIfTI I/O, minimal preprocessing, phantoms, datasets ===================================


def _as_volume(x, what: str) -> tuple:
    """(array float32 (X, Y, Z), affine (4, 4) or None) from a path, nibabel image, array or tensor.
    Leading axes of size 1 and a trailing 4th axis of size 1 are squeezed; other shapes and
    NaN/inf raise a ValueError."""
    if isinstance(x, (str, os.PathLike)):
        return load_nifti(x)
    if hasattr(x, "dataobj") and hasattr(x, "affine"):
        arr, affine = np.asarray(x.dataobj, dtype=np.float32), np.asarray(x.affine, dtype=np.float64)
    else:
        arr, affine = (x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)).astype(np.float32), None
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{what} must be 3-D (X, Y, Z), or 4-D with a last axis of size 1; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} has NaN or infinite values; only finite intensities are allowed")
    return arr, affine


def load_nifti(path) -> tuple:
    """Read a NIfTI file: returns (array float32 (X, Y, Z), affine (4, 4) float64). A truncated or
    corrupt file is a ValueError naming it."""
    try:
        return _as_volume(nib.load(str(path)), str(path))
    except (EOFError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError) as err:
        raise ValueError(f"{path}: cannot read this NIfTI file (truncated or corrupt: {err})") from None


def normalize_intensity(array) -> torch.Tensor:
    """Min-max a volume (any range) to the network's [-1, 1]: x -> 2 (x - min) / (max - min) - 1.
    array or tensor -> float32 tensor of the same shape (docs/methods.md#intensity-conventions)."""
    x = (array if torch.is_tensor(array) else torch.as_tensor(np.asarray(array, dtype=np.float32))).float()
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo).clamp_min(1e-12) * 2 - 1


def to_uint16(x) -> np.ndarray:
    """Network values in [-1, 1] (clipped first) -> uint16 0..65535: u = round((x + 1) / 2 * 65535)."""
    x = x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, np.float32)
    return np.round((np.clip(x, -1, 1) + 1) / 2 * 65535).astype(np.uint16)


def grid_affine(shape, voxel_mm=None) -> np.ndarray:
    """The affine of a generated volume (sample, phantom): LPS, isotropic voxels of voxel_mm
    (default 224 / max(shape): the longest axis spans IMAGE_SHAPE's 224 mm, as phantom() draws),
    and the grid centre, voxel (shape - 1) / 2, at world (0, 0, 0): the head centre, as in a
    preprocessed scan (docs/methods.md#file-geometry). 1 mm on IMAGE_SHAPE, 4.67 mm on TEACHING_SHAPE."""
    affine = LPS_AFFINE @ np.diag([*_phantom_voxel_mm(shape, voxel_mm), 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, float) - 1) / 2)
    return affine


def save_nifti(volume, path, affine=None, header=None, voxel_mm=None) -> pathlib.Path:
    """Write a volume (X, Y, Z), or (1, X, Y, Z) / (1, 1, X, Y, Z), as uint16 NIfTI, atomically.
    Intensities are min-max scaled over the volume to 0..65535 (the reference generator's
    convention: a constant volume is written as zeros); affine defaults to grid_affine(shape,
    voxel_mm). qform and sform both hold the affine, with header's codes when it has them (e.g. an
    input's, for a result on its grid), else code 2 (aligned: the kit's head-centred frame).
    header: a NIfTI header to copy, written as uint16 with scale 1, offset 0."""
    arr, _ = _as_volume(volume, "save_nifti's volume")
    affine = grid_affine(arr.shape, voxel_mm) if affine is None else np.asarray(affine, np.float64)
    codes = [int(header[k]) for k in ("qform_code", "sform_code")] if header is not None else [0, 0]
    img = nib.Nifti1Image(to_uint16(normalize_intensity(arr)), affine, None if header is None else header.copy())
    img.set_qform(affine, codes[0] or max(codes) or 2)
    img.set_sform(affine, codes[1] or max(codes) or 2)
    img.set_data_dtype(np.uint16)
    img.header.set_slope_inter(1, 0)
    img.header.set_xyzt_units("mm")
    return _atomic_write(path, lambda tmp: nib.save(img, str(tmp)))

# --- Minimal preprocessing: the paper's four steps, nothing more (docs/methods.md#preprocessing) ---


def _warp(volume, matrix, shape, mode="bilinear") -> torch.Tensor:
    """Resample volume (..., X, Y, Z) onto a grid of `shape`: output voxel i takes the input's value
    at voxel index M i + m, (M | m) = matrix[:3]; trilinear ("bilinear") or "nearest", 0 outside.
    affine_grid/grid_sample with align_corners=True: u = 2 p / (n - 1) - 1, grid axes (Z, Y, X)."""
    x = torch.as_tensor(volume, dtype=torch.float32)
    lead = x.shape[:-3]
    x = x.reshape(1, -1, *x.shape[-3:])                                       # (1, C, X, Y, Z)
    m = torch.as_tensor(np.asarray(matrix, np.float64)[:3])
    half_out = (torch.tensor(shape, dtype=torch.float64) - 1).clamp_min(1) / 2
    s_in = 2 / (torch.tensor(x.shape[-3:], dtype=torch.float64) - 1).clamp_min(1)
    a = s_in[:, None] * m[:, :3] * half_out                                   # u_in = a u_out + b
    b = s_in * (m[:, :3] @ half_out + m[:, 3]) - 1
    theta = torch.cat([a.flip(0, 1), b.flip(0)[:, None]], 1)[None].float()   # (1, 3, 4), (Z, Y, X) order
    grid = F.affine_grid(theta, [1, x.shape[1], *shape], align_corners=True)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=True).reshape(*lead, *shape)


def _head_centre(arr) -> np.ndarray:
    """Centre of mass (3,) in voxel indices of the head: two 3^3 box smoothings, then Otsu's
    threshold (the cut maximising the between-class variance w0 w1 (mu0 - mu1)^2)."""
    x = torch.as_tensor(arr, dtype=torch.float32)[None, None]
    for _ in range(2):
        x = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x[0, 0].numpy()
    hist, edges = np.histogram(x, 256)
    w0 = np.cumsum(hist).astype(np.float64)
    w1, s0 = w0[-1] - w0, np.cumsum(hist * (edges[:-1] + edges[1:]) / 2)
    between = w0 * w1 * (s0 / np.maximum(w0, 1) - (s0[-1] - s0) / np.maximum(w1, 1)) ** 2
    return _centroid(x > edges[np.argmax(between[:-1]) + 1])


def _centroid(mask) -> np.ndarray:
    """Centre of mass (3,) in voxel indices of a boolean (X, Y, Z) mask."""
    return np.array([(np.arange(n) * mask.sum(tuple(a for a in range(3) if a != axis))).sum() / mask.sum()
                     for axis, n in enumerate(mask.shape)])


def preprocess(image_or_path, mask=None) -> nib.Nifti1Image:
    """The paper's minimal preprocessing of a T1w head: a uint16 (192, 224, 192), 1 mm, LPS
    Nifti1Image; no skull stripping, bias correction or registration (docs/methods.md#preprocessing).

    image_or_path: NIfTI path or nibabel image. mask: optional brain mask on the image's grid
    (nonzero = brain) to centre the crop on instead of the head. Steps: 1. clip to the 0.1/99.9
    percentiles, map to [0, 1]; 2. find the centre; 3. reorient, resample to 1 mm and crop/pad in
    one trilinear resampling, snapped to the input's lattice (a 1 mm input is copied exactly);
    4. scale to uint16. Warns for voxels coarser than 1.2 mm.
    """
    arr, affine = _as_volume(image_or_path, "image")
    if affine is None:
        raise ValueError("preprocess needs the image's affine: pass a NIfTI path or a nibabel image, not an array")
    lo, hi = (float(v) for v in np.percentile(arr, [0.1, 99.9]))
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise ValueError(f"image is constant (every voxel is {lo}): nothing to preprocess")
    arr = np.clip((arr - lo) / (hi - lo), 0, 1)                                # step 1
    if mask is not None:                                                       # step 2
        m = _as_volume(mask, "mask")[0] != 0
        if m.shape != arr.shape or not m.any():
            raise ValueError(f"mask shape {m.shape} must equal the image's {arr.shape} (its voxel grid) and the "
                             f"mask must not be empty ({int(m.sum())} nonzero voxels)")
    centre = _centroid(m) if mask is not None else _head_centre(arr)
    zooms = nib.affines.voxel_sizes(affine)
    if zooms.max() > 1.2:
        warnings.warn(f"voxel size {np.round(zooms, 3).tolist()} mm is coarser than 1.2 mm, the limit "
                      f"the paper's data were curated to; resampling to 1 mm cannot restore detail", stacklevel=2)
    centre_world = affine[:3, :3] @ centre + affine[:3, 3]
    out = LPS_AFFINE.copy()                                                    # step 3
    out[:3, 3] = centre_world - out[:3, :3] @ ((np.array(IMAGE_SHAPE) - 1) / 2)
    inv = np.linalg.inv(affine)
    out[:3, 3] = affine[:3, :3] @ np.round(inv[:3, :3] @ out[:3, 3] + inv[:3, 3]) + affine[:3, 3]
    img = nib.Nifti1Image(np.round(_warp(arr, inv @ out, IMAGE_SHAPE).numpy() * 65535).astype(np.uint16), out)
    source = nib.load(str(image_or_path)) if isinstance(image_or_path, (str, os.PathLike)) else image_or_path
    codes = [int(source.header.get(k, 0)) for k in ("sform_code", "qform_code")]  # the input's world (1: scanner)
    img.set_qform(out, next((c for c in codes if c), 1))
    img.set_sform(out, next((c for c in codes if c), 1))
    img.header.set_xyzt_units("mm")
    return img

# --- Phantoms: synthetic T1-like heads with known labels -------------------------------------

#: Label map of phantom(): number -> name. 0 is background and never counted as a structure.
PHANTOM_LABELS = {0: "background", 1: "scalp", 2: "skull", 3: "csf", 4: "cortex", 5: "white_matter",
                  6: "lateral_ventricles", 7: "left_thalamus", 8: "right_thalamus",
                  9: "left_putamen", 10: "right_putamen"}

#: Mean intensity of each label in the network's range [-1, 1], before bias field and noise.
#: T1 contrast: fat-rich scalp bright; white matter > thalamus > putamen > cortex; CSF dark;
#: skull (cortical bone, almost no signal) darkest tissue; background -1.
PHANTOM_INTENSITIES = {0: -1.0, 1: 0.7, 2: -0.85, 3: -0.6, 4: 0.0, 5: 0.55,
                       6: -0.6, 7: 0.3, 8: 0.3, 9: 0.2, 10: 0.2}

#: phantom()'s random draws: name -> (numpy Generator method, a, b), i.e. normal(mean, sd),
#: uniform(low, high), beta(a, b), lognormal(mean, sd of the log). rotation_deg and shift_mm
#: are drawn once per axis. Lengths are those of a reference head, then x head_scale.
PHANTOM_DISTRIBUTIONS = {
    "head_scale": ("normal", 1.0, 0.05),        # multiplies every length
    "atrophy": ("beta", 2.0, 5.0),              # 0..1: brain lengths x (1 - 0.12 a), ventricles x (1 + 0.6 a)
    "ventricle_scale": ("lognormal", 0.0, 0.15),  # multiplies the ventricles' lengths
    "cortex_mm": ("uniform", 9.0, 12.0),        # effective cortex thickness (an unfolded shell)
    "fold_amplitude": ("uniform", 0.06, 0.12),  # gyral depth relative to the brain radius
    "rotation_deg": ("uniform", -5.0, 5.0),     # pose: rotation about each axis
    "shift_mm": ("uniform", -6.0, 6.0),         # pose: translation along each axis
    "bias_amplitude": ("uniform", 0.0, 0.2),    # multiplicative field 1 + b g(x), |g| <= 1
    "noise_sd": ("uniform", 0.01, 0.04),        # Gaussian noise sd, in [-1, 1] units
}

#: The values a fixed phantom parameter may take (wider than the draws, narrow enough that the
#: nested structures stay inside each other and inside the grid's field of view).
_PHANTOM_RANGES = {"head_scale": (0.8, 1.2), "atrophy": (0.0, 1.0), "ventricle_scale": (0.5, 2.0),
                   "cortex_mm": (5.0, 15.0), "fold_amplitude": (0.0, 0.2), "rotation_deg": (-15.0, 15.0),
                   "shift_mm": (-15.0, 15.0), "bias_amplitude": (0.0, 0.5), "noise_sd": (0.0, 0.2)}

# Reference anatomy (mm, head frame: +x left, +y posterior, +z superior, origin at the head centre).
_HEAD_SEMI = np.array([74.0, 90.0, 78.0])            # outer scalp ellipsoid
_SCALP_MM, _SKULL_MM, _CSF_MM = 5.0, 6.0, 1.5        # layers inside it
_VENTRICLE = ((7.0, 0.0, 14.0), (5.0, 24.0, 7.0))    # (centre of the left one, semi-axes)
_THALAMUS = ((11.0, 8.0, 0.0), (8.0, 14.0, 9.0))
_PUTAMEN = ((25.0, -4.0, 2.0), (5.0, 14.0, 10.0))


def _rotation_matrix(degrees) -> np.ndarray:
    """(3, 3) rotation R = Rz Ry Rx for angles (about axes 0, 1, 2) in degrees."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _phantom_voxel_mm(shape, voxel_mm=None) -> np.ndarray:
    """Per-axis voxel size: voxel_mm (scalar or 3) or, by default, 224 / max(shape) mm."""
    return np.broadcast_to(np.asarray(224.0 / max(shape) if voxel_mm is None else voxel_mm, float), (3,))


def phantom(seed, shape=(64, 64, 64), voxel_mm=None, **params) -> tuple:
    """A synthetic T1-weighted head with its label map: returns (image, labels).

    image: float32 numpy (D, H, W) in [-1, 1]; labels: uint8 (D, H, W), PHANTOM_LABELS numbers.
    Axes as the model's (LPS: index grows to the left, posterior, superior). voxel_mm defaults
    to 224 / max(shape), IMAGE_SHAPE's field of view: 4.67 mm at TEACHING_SHAPE. The anatomy
    (docs/methods.md#phantoms): scalp, skull, CSF, a folded cortex over white matter,
    ventricles, thalami, putamina; atrophy, pose, bias field, noise. Draws come from numpy's
    Generator seeded with seed (PHANTOM_DISTRIBUTIONS); keyword params fix any draw and leave
    the others unchanged: phantom(3, atrophy=0) and phantom(3, atrophy=1) differ only by atrophy.
    """
    unknown = sorted(set(params) - set(PHANTOM_DISTRIBUTIONS))
    if unknown:
        raise ValueError(f"phantom: unknown parameter(s) {unknown}; allowed: {', '.join(PHANTOM_DISTRIBUTIONS)}")
    for key, value in params.items():
        lo, hi = _PHANTOM_RANGES[key]
        v = np.asarray(value, dtype=float)
        if v.shape not in ((), (3,) if key in ("rotation_deg", "shift_mm") else ()) or not ((lo <= v) & (v <= hi)).all():
            raise ValueError(f"phantom: {key}={value!r} is outside what the anatomy allows, [{lo:g}, {hi:g}]"
                             + (" (one number or three)" if key in ("rotation_deg", "shift_mm") else ""))
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"phantom: shape must be 3 sizes >= 2, got {shape}")
    rng = np.random.default_rng(seed)
    p = {k: getattr(rng, fn)(a, b, 3 if k in ("rotation_deg", "shift_mm") else None)
         for k, (fn, a, b) in PHANTOM_DISTRIBUTIONS.items()}
    omega = rng.normal(size=(8, 3))
    omega *= rng.uniform(10.0, 20.0, (8, 1)) / np.linalg.norm(omega, axis=1, keepdims=True)
    fold_phase, fold_w, bias_c = rng.uniform(0, 2 * np.pi, 8), rng.normal(size=8), rng.normal(size=9)
    noise = rng.standard_normal(shape, dtype=np.float32)
    p.update({k: np.broadcast_to(np.asarray(v, float), np.shape(p[k])) for k, v in params.items()})

    # world position of each voxel (mm, grid centre = 0), then the head frame
    f32 = lambda v: np.asarray(v, np.float32).reshape(-1, 1, 1, 1)            # noqa: E731 (3,) -> (3, 1, 1, 1)
    vox = _phantom_voxel_mm(shape, voxel_mm)
    x = np.stack(np.meshgrid(*[((np.arange(n) - (n - 1) / 2) * v).astype(np.float32)
                               for n, v in zip(shape, vox)], indexing="ij"))  # (3, D, H, W) mm
    rot = _rotation_matrix(p["rotation_deg"]) / p["head_scale"]
    h = np.einsum("ji,j...->i...", rot.astype(np.float32), x - f32(p["shift_mm"]))  # R^T (x - t) / scale

    def rho2(centre, semi):  # squared ellipsoidal radius: <= 1 inside
        return (((h - f32(centre)) / f32(semi)) ** 2).sum(0)

    a = p["atrophy"]
    brain = (_HEAD_SEMI - _SCALP_MM - _SKULL_MM - _CSF_MM) / (1 + p["fold_amplitude"]) * (1 - 0.12 * a)
    u = h / np.sqrt((h ** 2).sum(0)).clip(1e-6)                              # direction from centre
    f = sum(w * np.sin(np.einsum("i,i...->...", om.astype(np.float32), u) + ph)
            for w, om, ph in zip(fold_w.astype(np.float32), omega, fold_phase.astype(np.float32)))
    fold = (1 + np.float32(p["fold_amplitude"]) * np.clip(f / (1.5 * f.std()), -1, 1)) ** 2
    labels = np.zeros(shape, np.uint8)
    for k, inside in ((1, rho2(0, _HEAD_SEMI) <= 1),
                      (2, rho2(0, _HEAD_SEMI - _SCALP_MM) <= 1),
                      (3, rho2(0, _HEAD_SEMI - _SCALP_MM - _SKULL_MM) <= 1),
                      (4, rho2(0, brain) <= fold),
                      (5, rho2(0, brain - p["cortex_mm"]) <= fold)):
        labels[inside] = k
    vent_semi = np.array(_VENTRICLE[1]) * p["ventricle_scale"] * (1 + 0.6 * a)
    mirror = np.array([-1.0, 1.0, 1.0])                                      # left (+x) -> right
    for k, (centre, semi) in ((6, (_VENTRICLE[0], vent_semi)), (7, _THALAMUS), (9, _PUTAMEN)):
        labels[rho2(centre, semi) <= 1] = k
        labels[rho2(np.multiply(centre, mirror), semi) <= 1] = k if k == 6 else k + 1

    # intensities, bias field on the signal (image + 1) / 2, noise
    means = np.array([PHANTOM_INTENSITIES[k] for k in range(len(PHANTOM_LABELS))], np.float32)
    g = x / (np.abs(x).reshape(3, -1).max(1).reshape(3, 1, 1, 1) + 1e-6)   # (3, D, H, W) in [-1, 1]
    terms = np.concatenate([g, g ** 2, g[[0, 0, 1]] * g[[1, 2, 2]]])         # (9, D, H, W)
    g = np.einsum("k,k...->...", (bias_c / np.abs(bias_c).sum()).astype(np.float32), terms)  # |g| <= 1
    signal = (means[labels] + 1) / 2 * (1 + np.float32(p["bias_amplitude"]) * g)
    image = np.clip(2 * signal - 1 + np.float32(p["noise_sd"]) * noise, -1, 1).astype(np.float32)
    return image, labels


def phantom_volumes(labels, voxel_mm=None) -> dict:
    """Volume of each phantom structure in mm^3: {name: count x voxel volume}, background excluded.

    labels: integer array (D, H, W) with PHANTOM_LABELS numbers; voxel_mm as in phantom()
    (None: the phantom default for this shape, 224 / max(shape)).
    """
    labels = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    counts = np.bincount(labels.astype(np.int64).ravel(), minlength=len(PHANTOM_LABELS))
    voxel = float(np.prod(_phantom_voxel_mm(labels.shape, voxel_mm)))
    return {name: float(counts[k]) * voxel for k, name in PHANTOM_LABELS.items() if k}

# --- Datasets and augmentation -----------------------------------------------------------------


def augment(volume, generator=None, *, flip=None, degrees=3.0, shift=2.0, scale=0.03, p_affine=1.0) -> torch.Tensor:
    """The paper's augmentation: random left-right flip (p = 0.5; flip=True/False forces it), then
    a small random affine: output voxel i samples the input at c + s R (i - c) + t, R a rotation
    by U(-degrees, degrees) about each axis, s ~ U(1 -+ scale), t ~ U(-+ shift) voxels; -1
    outside (docs/methods.md#augmentation), applied with probability p_affine (the kit: always;
    the authors' recipe: 0.5). volume: (..., D, H, W) in [-1, 1], one transform for all leading
    axes. Draws come from `generator` in a fixed order (seeded: reproducible)."""
    if not 0 <= p_affine <= 1:
        raise ValueError(f"augment: p_affine is a probability in [0, 1], got {p_affine}")
    x = torch.as_tensor(volume, dtype=torch.float32)
    u = torch.rand(9, generator=generator, dtype=torch.float64).numpy()
    if (u[0] < 0.5) if flip is None else flip:
        x = x.flip(-3)
    if degrees == shift == scale == 0 or u[8] >= p_affine:
        return x.clamp(-1, 1)
    c = (np.array(x.shape[-3:]) - 1) / 2
    a = (1 + scale * (2 * u[1] - 1)) * _rotation_matrix(degrees * (2 * u[2:5] - 1))
    matrix = np.concatenate([a, (c - a @ c + shift * (2 * u[5:8] - 1))[:, None]], 1)
    return (_warp(x + 1, matrix, x.shape[-3:]) - 1).clamp(-1, 1)


def _item_seed(*keys) -> int:
    """A well-mixed 63-bit seed from non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class VolumeDataset(torch.utils.data.Dataset):
    """NIfTI volumes (a folder's *.nii/*.nii.gz, sorted, also in subfolders with recursive=True,
    or a list of files) as (1, D, H, W) float32 tensors in [-1, 1] for training: reoriented to LPS
    by permutations and flips only (the files should be preprocess()-ed), optionally resized by
    voxel_mm (4: 192 x 224 x 192 -> 48 x 56 x 48) or size (area averaging down, trilinear up),
    normalize_intensity'd (per-volume min-max). augment=True (or a dict of augment() keywords):
    augment() seeded by (seed, index, times read): every epoch differs, reproducibly."""

    def __init__(self, files_or_folder, size=None, voxel_mm=None, augment=False, seed=0, recursive=False):
        if size is not None and voxel_mm is not None:
            raise ValueError("VolumeDataset: give size or voxel_mm, not both")
        if isinstance(files_or_folder, (str, os.PathLike)) and pathlib.Path(files_or_folder).is_dir():
            found = pathlib.Path(files_or_folder).rglob("*") if recursive else pathlib.Path(files_or_folder).iterdir()
            files = sorted(p for p in found if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
        elif isinstance(files_or_folder, (str, os.PathLike)):
            files = [pathlib.Path(files_or_folder)]
        else:
            files = [pathlib.Path(f) for f in files_or_folder]
        if not files:
            raise ValueError(f"VolumeDataset: no NIfTI files (*.nii, *.nii.gz) in {files_or_folder}")
        self.files, self.size, self.voxel_mm = files, size, voxel_mm
        self.augment, self.seed, self._reads = augment, seed, {}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i) -> torch.Tensor:
        arr, affine = _as_volume(self.files[i], str(self.files[i]))
        to_lps = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt("LPS"))
        arr = np.ascontiguousarray(ornt.apply_orientation(arr, to_lps))
        x = torch.from_numpy(arr)[None, None]
        size = self.size
        if self.voxel_mm is not None:
            zooms = nib.affines.voxel_sizes(affine)[np.argsort(to_lps[:, 0])]       # in LPS axis order
            size = tuple(max(1, round(n * z / self.voxel_mm)) for n, z in zip(arr.shape, zooms))
        if size is not None and tuple(size) != arr.shape:
            shrink = all(s <= n for s, n in zip(size, arr.shape))
            x = F.interpolate(x, size=tuple(size), mode="area" if shrink else "trilinear",
                              **({} if shrink else {"align_corners": False}))
        x = normalize_intensity(x[0])                                                    # (1, D, H, W)
        if self.augment:
            count = self._reads[i] = self._reads.get(i, -1) + 1
            x = augment(x, torch.Generator().manual_seed(_item_seed(self.seed, i, count)),
                        **(self.augment if isinstance(self.augment, dict) else {}))
        return x


class PhantomDataset(torch.utils.data.IterableDataset):
    """Phantom heads as (1, D, H, W) float32 tensors in [-1, 1]: item i = phantom(seed + i); n items,
    or endless when n is None (no len()). Indexable; augment=True seeds augment() by (seed, i).
    As an IterableDataset in a DataLoader each of several workers takes every num_workers-th item."""

    def __init__(self, n=None, shape=(64, 64, 64), seed=0, augment=False):
        self.n, self.shape, self.seed, self.augment = n, tuple(shape), seed, augment

    def __len__(self):
        if self.n is None:
            raise TypeError("this PhantomDataset is endless (n=None): it has no length")
        return self.n

    def __getitem__(self, i) -> torch.Tensor:
        if i < 0 or (self.n is not None and i >= self.n):
            raise IndexError(f"PhantomDataset index {i} out of range 0..{self.n}")
        x = torch.from_numpy(phantom(self.seed + i, self.shape)[0])[None]
        if self.augment:
            x = augment(x, torch.Generator().manual_seed(_item_seed(self.seed, i)))
        return x

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        i, step = (0, 1) if info is None else (info.id, info.num_workers)
        while self.n is None or i < self.n:
            yield self[i]
            i += step


# === 9. Training =====================================================================================

# The recipe and the run folder are described in docs/methods.md#training-recipe. A run's folder (out):
#   checkpoints/step_000500/   model.safetensors, ema.safetensors (save_weights: prediction, U-Net,
#                              schedule, step, shape, seed), state.pt (optimizer, step, data position,
#                              RNG states, loss history; torch.load(weights_only=True) reads it)
#   checkpoints/step_000500.tmp/   a checkpoint being written: renamed when complete, else ignored
#   history.csv                step, loss: one row per step
#   previews/step_000500.png   the EMA model's sample at that step (preview_every)


#: Named training recipes (docs/methods.md#recipes): train() keywords, the autocast dtype on CUDA
#: (a CPU trains in float32), and the VolumeDataset options for real data. "kit": ddpm-mini's defaults. "medforj": the authors' training code:
#: online EMA at rate 2e-4 per step without warm-up, no gradient clipping, bfloat16 autocast
#: without a GradScaler, RandFlip(p 0.5) + RandAffine(+-10 degrees, +-5 voxels, p 0.5), a
#: recursive search for *.nii*, per-volume min-max scaling (normalize_intensity, as the kit's).
RECIPES = {
    "kit": {"train": dict(ema_decay=0.999, ema_warmup=True, max_grad_norm=1.0), "cuda_dtype": None,
            "data": dict(augment=dict(degrees=3.0, shift=2.0, scale=0.03, p_affine=1.0), recursive=False)},
    "medforj": {"train": dict(ema_decay=0.9998, ema_warmup=False, max_grad_norm=None), "cuda_dtype": "bfloat16",
                "data": dict(augment=dict(degrees=10.0, shift=5.0, scale=0.0, p_affine=0.5), recursive=True)},
}


@dataclasses.dataclass
class TrainResult:
    """What train() returns. model: trained, in train mode; ema: its EMA copy in eval mode (sample
    with this one); history[k]: the loss of step k + 1; checkpoint, history_csv, previews: files written."""
    model: nn.Module
    ema: nn.Module
    history: list
    checkpoint: pathlib.Path | None = None
    history_csv: pathlib.Path | None = None
    previews: list = dataclasses.field(default_factory=list)


def train(model, data, prediction: str, steps: int, *, batch_size: int = 1, lr: float = 1e-4,
          ema_decay: float = 0.999, max_grad_norm: float | None = 1.0, out=None, checkpoint_every: int = 500,
          keep: int = 3, resume: bool = False, seed: int = 0, preview_every: int = 0, preview_steps: int = 32,
          on_preview=None, max_minutes: float | None = None, schedule=None, device=None, dtype=None,
          progress: bool = True, ema_warmup: bool = True) -> TrainResult:
    """Train `model` to predict `prediction` for `steps` steps (the paper's recipe) and keep an EMA copy
    (docs/methods.md#training-recipe).

    data: a Dataset or tensor of (C, *S) items (shuffled each epoch), an endless indexable dataset
    (PhantomDataset(n=None)) or any re-iterable of items or (B, C, *S) batches; values in [-1, 1].
    Step k: diffusion_loss with a generator seeded by (seed, rank, k); Adam (lr) after clipping the
    gradient norm to max_grad_norm (None: off; a non-finite loss or gradient stops the run with a
    ValueError before the update); EMA theta_e <- d theta_e + (1 - d) theta with d = min(ema_decay,
    (1 + k) / (10 + k)) (ema_warmup=False: d = ema_decay). CUDA autocasts (dtype None: bfloat16 where
    supported, else float16 with a GradScaler); a CPU runs float32. out: checkpoints every checkpoint_every
    steps and at the end (the newest `keep`), history.csv, previews every preview_every steps
    (also passed to on_preview(step, x)); None writes nothing. resume=True continues the newest
    checkpoint in out, bit-identical on a CPU; an lr other than the run's applies from the resumed step
    on (a step decay, e.g. 1e-3 then 1e-4 to finish a run), recorded as lr_steps [[step, lr], ...] in
    every later checkpoint. max_minutes stops early, with a checkpoint. Under
    torchrun: DistributedDataParallel, own data and noise per rank, rank 0 writes.
    """
    prediction, device = canonical_prediction(prediction), _device(device)
    schedule = _schedule(schedule, prediction)
    if steps < 1 or batch_size < 1 or keep < 1 or checkpoint_every < 1:
        raise ValueError(f"train: steps, batch_size, keep and checkpoint_every must be >= 1, got "
                         f"{steps}, {batch_size}, {keep}, {checkpoint_every}")
    out = pathlib.Path(out) if out is not None else None
    ckpt = _checkpoint_to_resume(out, resume)
    amp = _autocast(device, _training_dtype(device, dtype))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and amp.fast_dtype == torch.float16)
    model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    net, rank, world, own_group = _distribute(model, ema, device, fresh=ckpt is None)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step, position, history, seconds, lr_steps = _restore(ckpt, model, ema, optimizer, scaler, prediction, schedule,
                                                          rank, world)
    if not lr_steps or lr_steps[-1][1] != lr:  # a new run, or resumed at another rate: a step schedule
        lr_steps = lr_steps + [[step, lr]]
    for group in optimizer.param_groups:  # (the restored optimizer state carries the run's old rate)
        group["lr"] = lr
    batches = _batches(_elements(data, seed, rank, world, position), batch_size, getattr(model, "spatial_dims", 3))
    writes = out is not None and rank == 0
    result = TrainResult(model, ema, history, ckpt if writes else None, out / "history.csv" if writes else None)
    ema_pairs = list(zip(ema.state_dict().values(), model.state_dict().values()))  # (EMA tensor, its source)
    recorded = dict(prediction=prediction, schedule=schedule, seed=seed, batch_size=batch_size * world, lr=lr,
                    lr_steps=lr_steps, ema_decay=ema_decay, ema_warmup=ema_warmup,
                    max_grad_norm=max_grad_norm)  # in every checkpoint
    capped = f", up to {max_minutes:g} min" if max_minutes is not None else ""  # a time cap: no step total to count to
    bar = tqdm(total=None if capped else steps, initial=step, desc=f"training ({prediction}{capped})",
               disable=not progress or rank != 0)
    started = time.perf_counter()
    while step < steps:
        x0, used = next(batches)
        position += used
        x0 = x0.to(device, torch.float32, non_blocking=True)
        generator = torch.Generator().manual_seed(_item_seed(seed, rank, step))
        with amp:
            loss = diffusion_loss(net, x0, prediction, schedule, generator)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # (a float16 GradScaler's overflow steps are skipped, not errors)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
        if not scaler.is_enabled() and not bool(torch.isfinite(grad_norm) & torch.isfinite(loss.detach())):
            bar.close()
            raise ValueError(_diverged(step, loss, grad_norm, x0, lr, result.checkpoint))
        scaler.step(optimizer)
        scaler.update()
        _ema_update(ema_pairs, min(ema_decay, (1 + step) / (10 + step)) if ema_warmup else ema_decay)
        step += 1
        timed_out = max_minutes is not None and time.perf_counter() - started > 60 * max_minutes
        loss, stop = _agree(loss.detach().float(), timed_out, world)
        history.append(loss)
        bar.update()
        bar.set_postfix(loss=f"{np.mean(history[-20:]):.4f}")
        stop = stop and step < steps
        if out is not None and (step % checkpoint_every == 0 or step == steps or stop):
            spent = seconds + time.perf_counter() - started
            _write_checkpoint(result, out if writes else None, step, model, ema, optimizer, scaler, keep, world,
                              {"data_position": position, "seed": seed, "seconds": spent, "lr_steps": lr_steps},
                              dict(recorded, shape=list(x0.shape[2:]), seconds=round(spent, 1)))
        if preview_every and step % preview_every == 0 and rank == 0 and (writes or on_preview is not None):
            _preview(result, out if writes else None, prediction, tuple(x0.shape[1:]), step, preview_steps,
                     schedule, seed, on_preview)
        if stop:
            break
    bar.close()
    if own_group:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _write_checkpoint(result: TrainResult, out, step: int, model, ema, optimizer, scaler, keep: int, world: int,
                      state: dict, metadata: dict) -> None:
    """Checkpoint `step`: every rank gathers its RNG state, rank 0 (out not None) writes the weights,
    `state` plus step, optimizer, scaler, loss history and RNG states, and history.csv; all wait."""
    state = dict(state, step=step, world_size=world, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 history=torch.tensor(result.history, dtype=torch.float64), rng=_gather_rng_states(world))
    if out is not None:
        result.checkpoint = _save_checkpoint(out, step, model, ema, state, keep, **metadata)
        _write_history(result.history_csv, result.history)
    _barrier(world)


def _diverged(step: int, loss, grad_norm, x0, lr: float, checkpoint) -> str:
    """The message when a step's loss or gradient is not finite (train stops before the update)."""
    cause = "the batch holds non-finite values" if not bool(torch.isfinite(x0).all()) else f"lr {lr:g} may be too high"
    return (f"train: step {step + 1}: loss {float(loss.detach()):.4g}, gradient norm {float(grad_norm):.4g}: not finite "
            f"({cause}); stopped before updating the weights. The last checkpoint, "
            f"{checkpoint or 'none written in this run'}, is finite and kept")


def latest_checkpoint(out) -> pathlib.Path | None:
    """The newest complete checkpoint folder out/checkpoints/step_NNNNNN, or None.
    Folders still named step_NNNNNN.tmp (a write that never finished) do not count, nor do
    folders whose files cannot be read (a damaged disk, a truncated copy): a warning names them
    and the previous checkpoint is used."""
    folders = sorted((p for p in (pathlib.Path(out) / "checkpoints").glob("step_*")
                      if p.is_dir() and p.name[5:].isdigit() and (p / "state.pt").exists()),
                     key=lambda p: int(p.name[5:]), reverse=True)
    for folder in folders:
        problem = _unreadable_checkpoint(folder)
        if problem is None:
            return folder
        warnings.warn(f"{folder} cannot be used ({problem}); trying the checkpoint before it", stacklevel=2)
    return None


def _unreadable_checkpoint(folder: pathlib.Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when its three files open: the
    safetensors headers parse and fit their files, and state.pt's zip directory reads (a cut-short
    file fails both; no tensor is loaded here)."""
    try:
        for name in ("model.safetensors", "ema.safetensors"):
            with safe_open(str(folder / name), framework="pt", device="cpu") as f:
                list(f.keys())
        with zipfile.ZipFile(folder / "state.pt") as z:
            z.namelist()
    except Exception as err:  # truncated files, another format, missing files
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return None


def _checkpoint_to_resume(out, resume: bool) -> pathlib.Path | None:
    """The checkpoint a run continues from (None: a fresh run); refuses to mix two runs in one folder."""
    if resume and out is None:
        raise ValueError("train: resume=True needs out, the folder of the run to continue")
    ckpt = latest_checkpoint(out) if out is not None else None
    if ckpt is not None and not resume:
        raise ValueError(f"train: {out} already holds a run (newest checkpoint {ckpt.name}); pass resume=True "
                         "(CLI: --resume) to continue it, or choose another folder")
    return ckpt


def _training_dtype(device: torch.device, dtype):
    """Training's autocast default on CUDA: bfloat16 where supported, else float16."""
    if dtype is None and device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return dtype


def _distribute(model, ema, device, fresh: bool) -> tuple:
    """(network to call, rank, world size, whether this call made the process group): under
    torchrun, join the group (nccl on CUDA, gloo on CPU) and wrap model in DistributedDataParallel."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return model, 0, 1, False
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if fresh:
        ema.load_state_dict(model.state_dict())  # rank 0's initial weights, as DDP just broadcast them
    return net, dist.get_rank(), world, own_group


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _agree(loss: torch.Tensor, stop: bool, world: int) -> tuple:
    """(mean loss over the ranks as a float, rank 0's stop decision for all)."""
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
        flag = torch.tensor(float(stop), device=loss.device)
        dist.broadcast(flag, 0)  # rank 0's clock decides for all
        stop = bool(flag)
    return loss.item(), stop


@torch.no_grad()
def _ema_update(pairs: list, decay: float) -> None:
    """theta_ema <- decay theta_ema + (1 - decay) theta for each (EMA tensor, model tensor) pair
    (buffers that are not floats are copied)."""
    for e, p in pairs:
        if e.is_floating_point():
            e.lerp_(p, 1 - decay)
        else:
            e.copy_(p)


def _restore(ckpt, model, ema, optimizer, scaler, prediction: str, schedule: Schedule, rank: int, world: int) -> tuple:
    """Load a checkpoint's weights, optimizer, scaler and RNG states; returns (step, data position,
    loss history, training seconds so far, [[step, lr], ...] the learning rate from each step on),
    (0, 0, [], 0.0, []) for a fresh run."""
    if ckpt is None:
        return 0, 0, [], 0.0, []
    meta = load_weights(model, ckpt / "model.safetensors")
    if meta.get("prediction") != prediction:
        raise ValueError(f"train: {ckpt} was trained for {meta.get('prediction')!r}, not {prediction!r}")
    if json.loads(meta.get("schedule", "null")) not in (None, schedule.config()):
        raise ValueError(f"train: {ckpt} was trained with the schedule {meta['schedule']}, not {schedule.config()}; "
                         "resume with that schedule (the CLI reads it from the run)")
    load_weights(ema, ckpt / "ema.safetensors")
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if len(state["rng"]) == world:
        _set_rng_states(state["rng"][rank])
    else:
        warnings.warn(f"train: {ckpt} comes from {len(state['rng'])} process(es), this run has {world}; "
                      "the global RNG states are not restored", stacklevel=3)
    lr_steps = state.get("lr_steps") or [[0, optimizer.param_groups[0]["lr"]]]  # (older checkpoints: one rate)
    return state["step"], state["data_position"], state["history"].tolist(), float(state.get("seconds", 0.0)), lr_steps


def _preview(result: TrainResult, out, prediction: str, shape: tuple, step: int, steps: int, schedule, seed: int,
             on_preview) -> None:
    """Sample the EMA model from fixed noise; write previews/step_N.png (out given) and call on_preview."""
    x = sample(result.ema, prediction, shape=(1, *shape), steps=steps, schedule=schedule,
               generator=torch.Generator().manual_seed(seed), progress=False)
    if out is not None:
        result.previews.append(save_slices_png(x[0, 0], out / "previews" / f"step_{step:06d}.png",
                                               title=f"{prediction}, EMA, step {step}"))
    if on_preview is not None:
        on_preview(step, x)

def _elements(data, seed: int, rank: int, world: int, start: int):
    """This rank's endless stream of data elements, from its element number `start` on.

    Indexable with a length (Dataset, tensor, list): a new permutation every epoch from
    (seed, rank, epoch). Indexable without one (PhantomDataset(n=None)): items rank, rank + world, ...
    Anything else (DataLoader, IterableDataset): its elements in order, re-iterated when it ends;
    rank r keeps elements r, r + world, ... Resuming at `start` is exact; only the last kind
    has to read the skipped elements again.
    """
    indexable = hasattr(data, "__getitem__") and not isinstance(data, torch.utils.data.DataLoader)
    try:
        n = len(data) if indexable else None
    except TypeError:
        n = None
    if indexable and n == 0:
        raise ValueError("train: the dataset is empty")
    k = start
    while indexable and n is None:
        yield data[rank + k * world]
        k += 1
    while indexable:
        epoch, i = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_item_seed(seed, rank, epoch)))
        yield from (data[j] for j in order[i:].tolist())
        k = (epoch + 1) * n
    index, skip = 0, start
    while True:
        passed = index
        for element in data:
            index += 1
            if (index - 1) % world == rank:
                if skip:
                    skip -= 1
                else:
                    yield element
        if index == passed:
            raise ValueError("train: the data ran out; give a Dataset, a DataLoader or another re-iterable, "
                             "not a one-shot iterator")


def _batches(elements, batch_size: int, dims: int):
    """Group elements into (B, C, *S) batches; yields (batch, number of elements it took).
    An element is a tensor (C, *S) (stacked batch_size at a time) or (B, C, *S) (used as it is),
    or a tuple/list whose first entry is one."""
    items = []
    for element in elements:
        x = torch.as_tensor(element[0] if isinstance(element, (tuple, list)) else element)
        if x.ndim == dims + 2:
            yield x, 1
        elif x.ndim == dims + 1:
            if items and x.shape != items[0].shape:
                raise ValueError(f"train: data items of different shapes, {tuple(items[0].shape)} and "
                                 f"{tuple(x.shape)}, cannot share a batch; resize them to one size (CLI: --size)")
            items.append(x)
            if len(items) == batch_size:
                yield torch.stack(items), batch_size
                items = []
        else:
            raise ValueError(f"train: data elements must be (C, *S) or (B, C, *S) tensors with {dims} "
                             f"spatial axes, got shape {tuple(x.shape)}")


def _rng_states() -> dict:
    """The global RNG states (torch CPU and CUDA, numpy, python) as plain tensors and tuples."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate()}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])


def _gather_rng_states(world: int) -> list:
    """Every rank's global RNG states (rank order), for state.pt."""
    if world == 1:
        return [_rng_states()]
    states = [None] * world
    dist.all_gather_object(states, _rng_states())
    return states


def _save_checkpoint(out: pathlib.Path, step: int, model, ema, state: dict, keep: int, **metadata) -> pathlib.Path:
    """Write out/checkpoints/step_NNNNNN via a .tmp folder renamed when complete; keep the newest `keep`.
    .tmp folders that a killed run left unfinished are removed first."""
    final = out / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    for unfinished in final.parent.glob("step_*.tmp"):
        shutil.rmtree(unfinished, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_weights(model, tmp / "model.safetensors", step=step, **metadata)
        save_weights(ema, tmp / "ema.safetensors", step=step, ema=True, **metadata)
        _atomic_write(tmp / "state.pt", lambda p: torch.save(state, p))
        if final.exists():  # a damaged checkpoint of this step that resume skipped (the one before it is kept)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = sorted((p for p in final.parent.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for old in done[:-keep]:
        shutil.rmtree(old)
    return final


def _write_history(path: pathlib.Path, history: list) -> pathlib.Path:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([("step", "loss")] + [(k + 1, repr(v)) for k, v in enumerate(history)])
    _atomic_write(path, write)
    return path



# === 10. Evaluation ==================================================================================

# Volume tables. A *volume table* is a plain dict, one entry per subject:
#     {"subject": [str] (N,)  names as given, e.g. "/data/sub-01_T1w.nii.gz",
#      "volumes": {structure: float64 ndarray (N,)}}  mm^3, in column order.
# Structure names are stripped and lower-cased; when tables are matched, "_" and " "
# are the same ("left_thalamus" is "left thalamus"). A *result* is a list of dict rows.


def _name_key(name: str) -> str:
    """Matching key of a structure name: lower case, '_' and runs of spaces -> one space."""
    return " ".join(str(name).strip().lower().replace("_", " ").split())


def _volume_table(subjects, columns: dict, source="a volume table") -> dict:
    subjects = [str(s) for s in subjects]
    cols = {str(k).strip().lower(): np.asarray(v, np.float64).reshape(-1) for k, v in columns.items()}
    bad = [k for k, v in cols.items() if v.size != len(subjects)]
    if bad:
        raise ValueError(f"{source}: column(s) {bad} do not have one value for each of the {len(subjects)} subjects")
    return _check_table({"subject": subjects, "volumes": cols}, source)


def _check_table(table: dict, source="a volume table") -> dict:
    """Refuse what would make statistics look meaningful when they are not: volumes that are not
    finite or are negative (named by column and subject), and subjects listed twice."""
    subjects = table["subject"]
    twice = sorted(s for s, n in collections.Counter(subjects).items() if n > 1)
    if twice:
        raise ValueError(f"{source}: subject(s) {twice} appear more than once; each subject may be counted once")
    for name, v in table["volumes"].items():
        bad = np.flatnonzero(~np.isfinite(v) | (v < 0))
        if bad.size:
            raise ValueError(f"{source}: column {name!r}, subject {subjects[bad[0]]!r}: volume {v[bad[0]]} "
                             f"(volumes must be finite and >= 0, in mm^3; {bad.size} such value(s) in this column)")
    return table


def read_synthseg_csv(path) -> dict:
    """Read a SynthSeg `--vol` CSV (1.0 or 2.0, with or without --parc) -> volume table.

    Header `subject,<structure>,...`, one row per image, values in mm^3. All structure
    columns are kept in order (2.0: 33; 1.0: 31, without 'total intracranial' and 'csf';
    --parc adds 68 `ctx-lh-*`/`ctx-rh-*`). Also reads what write_table_csv writes.
    ValueError for a first column other than 'subject', repeated or empty structure
    names, ragged rows and non-numeric values.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows or rows[0][0].strip().lower() != "subject":
        raise ValueError(f"{path}: the first column must be 'subject' (a SynthSeg --vol CSV), "
                         f"found {rows[0][0] if rows else 'nothing'!r}")
    names = [c.strip().lower() for c in rows[0][1:]]
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"{path}: structure names must be unique and non-empty, got {names}")
    values = np.empty((len(rows) - 1, len(names)))
    for i, row in enumerate(rows[1:]):
        if len(row) != len(names) + 1:
            raise ValueError(f"{path}, data row {i + 1}: {len(row)} cells, the header has {len(names) + 1}")
        for j, cell in enumerate(row[1:]):
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise ValueError(f"{path}, data row {i + 1} ({row[0]!r}), column {names[j]!r}: {cell!r} "
                                 "is not a number (volumes in mm^3 expected)") from None
    return _volume_table([r[0].strip() for r in rows[1:]], dict(zip(names, values.T)), str(path))


def _cell(value):
    """A CSV cell that a spreadsheet will not run: text starting with =, +, -, @ (or a tab or CR)
    gets a leading apostrophe; numbers (-1234.5 included) are written as they are."""
    if not isinstance(value, str) or value[:1] not in ("=", "+", "-", "@", "\t", "\r"):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def write_table_csv(table, path) -> pathlib.Path:
    """Write a volume table (subject + structure columns) or a result (list of dict rows) as CSV.
    Text cells that a spreadsheet would read as a formula are prefixed with an apostrophe."""
    if isinstance(table, dict):
        body = [["subject", *table["volumes"]]]
        body += [[s, *(repr(float(v[i])) for v in table["volumes"].values())] for i, s in enumerate(table["subject"])]
    else:
        body = [list(table[0]) if table else []]
        body += [[repr(float(v)) if isinstance(v, float) else v for v in r.values()] for r in table]

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([[_cell(c) for c in row] for row in body])
    _atomic_write(pathlib.Path(path), write)
    return pathlib.Path(path)


def read_rows_csv(path) -> list:
    """Read a result CSV (write_table_csv of rows) -> list of dicts; numbers become float."""
    def cell(s):
        try:
            return float(s)
        except ValueError:
            return s
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: cell(v) for k, v in r.items()} for r in csv.DictReader(f)]


def format_table(rows, columns=None, width: int = 0) -> str:
    """A list of dict rows (e.g. compare_volumes' result) as a text table with a header line: the
    given columns (default: all of the first row's), right-aligned, floats to 4 significant
    digits, each column at least `width` wide. Returns the string (print it)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])

    def cell(v):
        return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)
    widths = [max(width, len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r.get(c, "")).rjust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def _left_right(name: str) -> tuple:
    """'left thalamus' -> ('left', 'thalamus'); 'ctx-rh-insula' -> ('right', 'ctx-insula'); else (None, name)."""
    for side, tag in (("left", "ctx-lh-"), ("right", "ctx-rh-")):
        if name.startswith(tag):
            return side, "ctx-" + name[len(tag):]
        if name.startswith(side) and name[len(side): len(side) + 1] in (" ", "_", "-"):
            return side, name[len(side) + 1:]
    return None, name


def merge_left_right(table: dict) -> dict:
    """Sum left/right pairs: 'left_X' + 'right_X' -> 'X' (also 'left X', 'ctx-lh-X').

    The merged column takes the place of the pair's first; unpaired and unsided columns stay.
    """
    cols, sides = table["volumes"], {n: _left_right(n) for n in table["volumes"]}
    pairs = {}
    for name, (side, base) in sides.items():
        if side:
            pairs.setdefault(_name_key(base), {})[side] = name
    out = {}
    for name, (side, base) in sides.items():
        pair = pairs[_name_key(base)] if side else {}
        if len(pair) < 2:
            out[name] = cols[name]
        elif base not in out:
            out[base] = cols[pair["left"]] + cols[pair["right"]]
    return {**table, "volumes": out}

# --- Phantom segmentation ------------------------------------------------------------------


def _grow6(r: np.ndarray) -> np.ndarray:
    """One step of 6-connected dilation of a bool volume (X, Y, Z)."""
    g = r.copy()
    for ax in range(3):
        gv, rv = np.moveaxis(g, ax, 0), np.moveaxis(r, ax, 0)                 # views: writes reach g
        gv[1:] |= rv[:-1]
        gv[:-1] |= rv[1:]
    return g


def _flood(mask: np.ndarray, seeds: np.ndarray, rival=None) -> np.ndarray:
    """The voxels of mask 6-connected (within mask) to seeds: bool (X, Y, Z). With rival seeds,
    both fronts grow a voxel per step and each voxel goes to the first to reach it (ties: seeds)."""
    a, b = seeds & mask, (np.zeros_like(mask) if rival is None else rival & mask & ~seeds)
    while True:
        a_next = _grow6(a) & mask & ~b
        b_next = _grow6(b) & mask & ~a_next
        if np.array_equal(a_next, a) and np.array_equal(b_next, b):
            return a
        a, b = a_next, b_next


def _despeckle(labels: np.ndarray, n_labels: int, min_same=3, rounds=2) -> np.ndarray:
    """Give each voxel that shares its label with fewer than min_same of its 26 neighbours the
    neighbours' most common label: isolated noise goes, 1-voxel-thin sheets (8 neighbours) stay."""
    n = labels.shape
    offsets = [(i, j, k) for i in range(3) for j in range(3) for k in range(3) if (i, j, k) != (1, 1, 1)]
    for _ in range(rounds):
        padded = np.pad(labels.astype(np.int16) + 1, 1)                            # 0 off the grid
        nbrs = [padded[i:i + n[0], j:j + n[1], k:k + n[2]] for i, j, k in offsets]  # 26 views
        odd = sum((v == padded[1:-1, 1:-1, 1:-1]).astype(np.uint8) for v in nbrs) < min_same
        votes = np.stack([v[odd] for v in nbrs], 1)[..., None] == np.arange(1, n_labels + 1)  # (m, 26, K)
        labels = labels.copy()
        labels[odd] = votes.sum(1).argmax(1)
    return labels


def segment_phantom(image, n_iter=5) -> np.ndarray:
    """Label a phantom() image with PHANTOM_LABELS numbers: (X, Y, Z) in [-1, 1] -> uint8 (X, Y, Z).

    Voxels up to about 5 mm (40x48x40 and finer are exact on phantoms). Steps
    (docs/methods.md#phantom-segmenter): topology (background outside the head's closed hull,
    scalp within 5 mm of it: generated heads with holes keep their tissues), a quadratic bias field
    fitted with nearest-mean labels, ventricles told from outer CSF by two floods, deep grey
    split into thalamus / putamen, left / right by the phantom's ellipsoids.
    Plain numpy: many small whole-volume steps, which thread pools only slow down.
    """
    x = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if x.ndim != 3:
        raise ValueError(f"segment_phantom needs one volume (X, Y, Z), got shape {tuple(x.shape)}")
    s = (np.clip(x.astype(np.float32), -1, 1) + 1) / 2                          # signal >= 0
    means = np.array([(PHANTOM_INTENSITIES[k] + 1) / 2 for k in range(len(PHANTOM_LABELS))])
    fit = np.array([1, 3, 4, 5])                                                 # scalp, CSF, cortex, WM
    inner = np.array(sorted((2, 3, 4, 5, 7, 9), key=lambda k: means[k]))        # skull ... WM, by mean
    cuts = (means[inner][1:] + means[inner][:-1]) / 2                            # nearest mean = bin
    classify = lambda r: inner[np.searchsorted(cuts, r)]                         # noqa: E731
    gaps = np.abs(means[:, None] - means)
    half_gap = np.where(gaps > 1e-6, gaps, np.inf).min(1) / 2                    # (K,)

    dark = s < (means[3] + means[4]) / 2                                         # 1. topology
    border = np.ones_like(dark)
    border[1:-1, 1:-1, 1:-1] = False
    per_mm = max(x.shape) / 224                                                  # voxels per mm (phantom grid)
    r = math.ceil(9 * per_mm)                   # the head's hull: bright voxels closed over 9 mm (padded,
    hull = np.pad(~dark, r)                     # so a head near the edge keeps its outline), so that gaps
    for grow in [True] * r + [False] * r:       # in a generated scalp do not let the background in
        hull = _grow6(hull) if grow else ~_grow6(~hull)
    background = _flood(dark & ~hull[r:-r, r:-r, r:-r], border)
    shell = background.copy()                   # the scalp lies within its thickness of the background
    for _ in range(math.ceil(3**0.5 * _SCALP_MM * per_mm) + 1):                  # (6-steps: up to sqrt 3 x
        shell = _grow6(shell)                   # as many), so a skull with gaps cannot lead it inwards
    scalp = _flood((~dark | background) & shell, background) & ~background

    g = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in x.shape], indexing="ij", sparse=True)
    terms = [np.ones((1, 1, 1), np.float32), *g, *(gi * gj for i, gi in enumerate(g) for gj in g[i:])]  # 2. bias
    step = max(1, round((x.size / 2e5) ** (1 / 3)))                             # fit on <= ~2e5 voxels
    sub = lambda v: np.broadcast_to(v, x.shape)[::step, ::step, ::step].ravel()  # noqa: E731
    sub_t, sub_s = np.stack([sub(t) for t in terms]).astype(np.float64), sub(s)  # (10, n), (n,)
    beta = np.eye(10)[0]
    for _ in range(n_iter):    # (einsum, not BLAS: threaded BLAS crawls on a busy machine)
        r = sub_s / np.maximum(np.einsum("j,jn->n", beta, sub_t), 0.05)
        cls = np.where(sub(scalp), 1, classify(r))
        use = np.isin(cls, fit) & ~sub(background) & (np.abs(r - means[cls]) < half_gap[cls])
        if use.sum() < 10 * len(terms):  # too few tissue voxels to fit B (e.g. a constant volume): keep B
            break
        design = means[cls[use]] * sub_t[:, use]                                 # (10, n)
        beta = np.linalg.solve(np.einsum("in,jn->ij", design, design), np.einsum("in,n->i", design, sub_s[use]))
    bias = np.maximum(sum(b * t for b, t in zip(beta.astype(np.float32), terms)), 0.05)  # B(x), (X, Y, Z)
    labels = np.where(scalp, 1, classify(s / bias)).astype(np.uint8)
    labels[background] = 0
    if background.sum() > background.size - 2:                                  # no head at all
        return labels

    head = np.argwhere(~background)                                              # 3. head frame, CSF
    centre, scale = head.mean(0), _HEAD_SEMI / 5 ** 0.5 / head.std(0)
    mm = lambda m: (np.argwhere(m) - centre) * scale                             # noqa: E731 (n, 3)
    side = np.array([[1.0, 1, 1], [-1, 1, 1]])                                   # left, mirrored right
    rho2 = lambda p, c, a: (((p[:, None] - c) / a) ** 2).sum(-1)                 # noqa: E731 (n, k)
    csf, skull = labels == 3, labels == 2
    seeds = np.zeros_like(csf)              # CSF within 1.5 x the mean ventricles: sulci never get this deep
    near = rho2(mm(csf), np.multiply(_VENTRICLE[0], side), np.array(_VENTRICLE[1])).min(1, initial=np.inf)
    seeds[tuple(np.argwhere(csf)[near <= 1.5 ** 2].T)] = True
    labels[csf & ~_flood(csf | skull, skull, rival=seeds)] = 6
    labels[labels == 9] = 7                                                      # deep gray: one class here
    labels = _despeckle(labels, len(PHANTOM_LABELS))

    gray = labels == 7                                                           # 4. deep gray
    pts = mm(gray)
    centres = np.concatenate([np.multiply(_THALAMUS[0], side), np.multiply(_PUTAMEN[0], side)])
    semi = np.array([_THALAMUS[1]] * 2 + [_PUTAMEN[1]] * 2)
    for _ in range(10):        # nearest by ellipsoidal radius |(p - c_k) / a_k|, c_k the cluster means
        near = rho2(pts, centres, semi).argmin(1)
        centres = np.stack([pts[near == k].mean(0) if (near == k).any() else centres[k] for k in range(4)])
    labels[gray] = np.array([7, 8, 9, 10], np.uint8)[near]
    return labels


def dice(a, b, labels=None) -> dict:
    """Dice overlap per structure of two label maps of one shape: {name: 2 |A n B| / (|A| + |B|)}.

    labels: {number: name}, default PHANTOM_LABELS; background (0) left out; NaN where
    the structure is in neither map.
    """
    a, b = (np.asarray(v.cpu() if torch.is_tensor(v) else v).astype(np.int64) for v in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"dice needs label maps of one shape, got {a.shape} and {b.shape}")
    out = {}
    for k, name in (PHANTOM_LABELS if labels is None else labels).items():
        if k != 0:
            size = np.sum(a == k) + np.sum(b == k)
            out[name] = float(2 * np.sum((a == k) & (b == k)) / size) if size else math.nan
    return out


def regional_volumes(maps, voxel_mm=None, merge_lr=False, **segment_kw) -> dict:
    """phantom_volumes of each map -> volume table (mm^3 per PHANTOM_LABELS structure).

    maps: integer label maps (X, Y, Z), or float images in [-1, 1], which are segmented with
    segment_phantom(image, **segment_kw) first; a sequence, an (N, X, Y, Z) array or tensor,
    or a dict {subject: map}. voxel_mm: None (the phantom default 224 / max(shape)), a float,
    (3,), or (N, 3), one row per map. V_s = #{voxels labelled s} * prod(voxel_mm).
    """
    subjects, maps = (list(maps), list(maps.values())) if isinstance(maps, dict) else (None, list(maps))
    subjects = subjects or [f"subject_{i:03d}" for i in range(len(maps))]
    vox = voxel_mm if np.ndim(voxel_mm) == 2 else [voxel_mm] * len(maps)
    rows = []
    for name, m, v in zip(subjects, maps, vox):
        m = m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m)
        m = segment_phantom(m, **segment_kw) if np.issubdtype(m.dtype, np.floating) else m
        if m.min() < 0 or m.max() >= len(PHANTOM_LABELS):
            raise ValueError(f"label map {name!r} has values outside 0..{len(PHANTOM_LABELS) - 1} (PHANTOM_LABELS)")
        rows.append(phantom_volumes(m, voxel_mm=v))
    table = _volume_table(subjects, {k: [r[k] for r in rows] for k in rows[0]} if rows else {})
    return merge_left_right(table) if merge_lr else table

# --- Statistics: permutation tests, effect sizes, Wasserstein, multiple testing ------------


def wasserstein1(a, b) -> float:
    """Exact 1-D Wasserstein-1 distance between two samples (sizes may differ).

    W1 = integral |F_a(x) - F_b(x)| dx over the empirical CDFs, evaluated on the
    merged sorted values x_(1) <= ... (the CDFs are constant between them):
    W1 = sum_k |F_a(x_k) - F_b(x_k)| (x_(k+1) - x_(k)).
    """
    a, b = (np.sort(np.ravel(v).astype(np.float64)) for v in (a, b))
    if a.size == 0 or b.size == 0:
        raise ValueError("wasserstein1 needs two non-empty samples")
    x = np.sort(np.concatenate([a, b]))
    fa, fb = (np.searchsorted(v, x[:-1], side="right") / v.size for v in (a, b))
    return float(np.sum(np.abs(fa - fb) * np.diff(x)))


def cohens_d(a, b, hedges=False) -> float:
    """Effect size d = (mean_a - mean_b) / s_pooled, s_pooled^2 = ((n_a-1) s_a^2 + (n_b-1) s_b^2) / (n_a+n_b-2).

    hedges=True multiplies by Hedges' small-sample factor 1 - 3 / (4 (n_a + n_b) - 9).
    """
    a, b = (np.ravel(v).astype(np.float64) for v in (a, b))
    na, nb, diff = a.size, b.size, a.mean() - b.mean()
    if na < 2 or nb < 2:
        raise ValueError(f"an effect size needs at least 2 values per group, got {na} and {nb}")
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    d = diff / pooled if pooled > 0 else (math.copysign(math.inf, diff) if diff else 0.0)
    return d * (1 - 3 / (4 * (na + nb) - 9)) if hedges else d


def permutation_test(a, b, n_permutations=10000, seed=0, batch=2000) -> np.ndarray:
    """Two-sided permutation test of the difference of means, one p per row.

    a: (n_a,) or (S, n_a); b: (n_b,) or (S, n_b) -> p (S,) (float if 1-D).
    Each permutation relabels the pooled n_a + n_b subjects (the same relabelling
    for all S rows); with D = mean_a - mean_b,
    p = (1 + #{k : |D_k| >= |D_obs|}) / (1 + n_permutations).
    Seeded (numpy default_rng(seed)); done as (batch, N) 0/1 masks times the data.
    """
    flat = np.ndim(a) == 1
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b) or 0 in a.shape + b.shape or n_permutations < 1:
        raise ValueError(f"permutation_test needs (S, n_a) and (S, n_b) with n >= 1 and n_permutations >= 1, "
                         f"got {a.shape}, {b.shape} and {n_permutations}")
    x, na, nb = np.concatenate([a, b], axis=1), a.shape[1], b.shape[1]   # (S, N)
    total = x.sum(axis=1)
    observed = np.abs(a.mean(axis=1) - b.mean(axis=1))       # (S,)
    tol = 1e-9 * np.abs(x).max(axis=1)                       # ties up to rounding count as ties
    rng = np.random.default_rng(seed)
    base = np.r_[np.ones(na), np.zeros(nb)]
    hits = np.zeros(x.shape[0])
    for start in range(0, n_permutations, batch):
        masks = rng.permuted(np.tile(base, (min(batch, n_permutations - start), 1)), axis=1)  # (B, N)
        sum_a = masks @ x.T                                  # (B, S)
        diff = sum_a / na - (total - sum_a) / nb
        hits += (np.abs(diff) >= observed - tol).sum(axis=0)
    p = (1 + hits) / (1 + n_permutations)
    return float(p[0]) if flat else p


def adjust_pvalues(p, method="holm") -> np.ndarray:
    """Adjust m p-values for multiple testing; the result has p's shape and order.

    holm:      p~_(i) = max_{j<=i} min(1, (m - j + 1) p_(j))      (family-wise error)
    fdr / bh:  p~_(i) = min_{j>=i} min(1, m p_(j) / j)            (Benjamini-Hochberg)
    none:      p unchanged.  p_(1) <= ... <= p_(m) are the sorted values.
    """
    p = np.asarray(p, dtype=np.float64)
    method = str(method).lower()
    flat, m = p.ravel(), p.size
    order = np.argsort(flat, kind="stable")
    rank = np.arange(1, m + 1)
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - rank + 1) * flat[order]))
    elif method in ("fdr", "bh"):
        adj = np.minimum.accumulate(np.minimum(1.0, m * flat[order] / rank)[::-1])[::-1]
    elif method == "none":
        adj = flat[order]
    else:
        raise ValueError(f"unknown correction {method!r}: use 'holm', 'fdr' (alias 'bh') or 'none'")
    out = np.empty(m)
    out[order] = adj
    return out.reshape(p.shape)


def _matched_structures(tables, structures=None) -> list:
    """[(name in each table, ...)] for the requested structures, or for all shared ones (first table's order)."""
    keyed = [{_name_key(n): n for n in t["volumes"]} for t in tables]
    wanted = [_name_key(s) for s in structures] if structures else [k for k in keyed[0] if all(k in t for t in keyed)]
    missing = [k for k in wanted if not all(k in t for t in keyed)]
    if missing or not wanted:
        shared = [k for k in keyed[0] if all(k in t for t in keyed)]
        raise ValueError(f"structure(s) {missing or structures} not in every table; shared structures: {shared}")
    return [tuple(t[k] for t in keyed) for k in wanted]


def compare_volumes(a, b, structures=None, n_permutations=10000, seed=0, correction="holm",
                    merge_lr=False, names=("a", "b")) -> list:
    """Compare two volume tables structure by structure -> list of rows (dicts).

    Row keys: structure, n_<a>, mean_<a>, sd_<a>, n_<b>, mean_<b>, sd_<b>,
    difference (mean_a - mean_b), p (two-sided permutation test of the means,
    the same seeded relabellings for every structure), p_adjusted (correction
    across the structures: 'holm' or 'fdr'), cohen_d, hedges_g, wasserstein
    (exact W1 between the two samples, mm^3); <a>, <b> from names.
    structures: names to test (default: all shared); merge_lr sums left/right first. Volumes that
    are not finite or are negative, and subjects listed twice, are a ValueError.
    """
    a, b = _check_table(a, f"table {names[0]!r}"), _check_table(b, f"table {names[1]!r}")
    if merge_lr:
        a, b = merge_left_right(a), merge_left_right(b)
    pairs = _matched_structures([a, b], structures)
    xa = np.stack([a["volumes"][na] for na, _ in pairs])     # (S, n_a)
    xb = np.stack([b["volumes"][nb] for _, nb in pairs])     # (S, n_b)
    if xa.shape[1] < 2 or xb.shape[1] < 2:
        raise ValueError(f"compare_volumes needs at least 2 subjects per table, got {xa.shape[1]} and {xb.shape[1]}")
    p = permutation_test(xa, xb, n_permutations, seed)
    p_adj = adjust_pvalues(p, correction)
    ka, kb = names
    rows = []
    for s, (name, _) in enumerate(pairs):
        va, vb = xa[s], xb[s]
        rows.append({"structure": name,
                     f"n_{ka}": va.size, f"mean_{ka}": va.mean(), f"sd_{ka}": va.std(ddof=1),
                     f"n_{kb}": vb.size, f"mean_{kb}": vb.mean(), f"sd_{kb}": vb.std(ddof=1),
                     "difference": va.mean() - vb.mean(), "p": p[s], "p_adjusted": p_adj[s],
                     "cohen_d": cohens_d(va, vb), "hedges_g": cohens_d(va, vb, hedges=True),
                     "wasserstein": wasserstein1(va, vb)})
    return rows

# --- Report and loading -------------------------------------------------------------------


def comparison_report(real, synthetic: dict, out_dir, structures=None, merge_lr=False, n_permutations=10000,
                      seed=0, correction="holm", voxel_mm=None, name="volumes") -> dict:
    """Compare real against each synthetic set; write <name>.csv and <name>.png in out_dir.

    real: a volume table, or volumes/label maps for regional_volumes(voxel_mm=...);
    synthetic: {set name: the same}. Each set gets compare_volumes(set, real)
    (difference = synthetic - real; p adjusted across structures within the set).
    The figure has one panel per structure, as the paper's: violins (kernel density) with the
    subjects as dots and the mean as a bar, real first, then each set, titled with the adjusted
    p-values.
    Returns {"csv": path, "figure": path, "table": rows (with a "set" key)}.
    """
    as_table = lambda v: v if isinstance(v, dict) and "volumes" in v else regional_volumes(v, voxel_mm)  # noqa: E731
    real = merge_left_right(as_table(real)) if merge_lr else as_table(real)
    sets = {k: merge_left_right(as_table(v)) if merge_lr else as_table(v) for k, v in synthetic.items()}
    if not sets:
        raise ValueError("comparison_report needs at least one synthetic set")
    matched = _matched_structures([real, *sets.values()], structures)
    rows = []
    for set_name, table in sets.items():
        cmp = compare_volumes(table, real, [m[0] for m in matched], n_permutations, seed, correction,
                              names=("synthetic", "real"))
        rows += [{"set": set_name, **r} for r in cmp]
    out_dir = pathlib.Path(out_dir)
    csv_path = write_table_csv(rows, out_dir / f"{name}.csv")

    ncol = min(4, len(matched))
    nrow = -(-len(matched) // ncol)
    fig = Figure(figsize=(3.2 * ncol, 3.2 * nrow), layout="constrained")
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)
    for s, names in enumerate(matched):
        ax = fig.add_subplot(nrow, ncol, s + 1)
        data = [real["volumes"][names[0]]] + [t["volumes"][n] for t, n in zip(sets.values(), names[1:])]
        ax.violinplot(data, showextrema=False, showmeans=True)
        for g, d in enumerate(data):
            ax.scatter(g + 1 + rng.uniform(-0.15, 0.15, d.size), d, s=6, alpha=0.5)
        ax.set_xticks(range(1, len(data) + 1), ["real", *sets], rotation=30)
        p = ", ".join(f"{r['p_adjusted']:.2g}" for r in rows if _name_key(r["structure"]) == _name_key(names[0]))
        ax.set_title(f"{names[0]}\np_adj: {p}", fontsize=9)
        ax.set_ylabel("mm$^3$")
    fig_path = out_dir / f"{name}.png"
    _atomic_write(fig_path, lambda tmp: fig.savefig(tmp, dpi=100))
    return {"csv": csv_path, "figure": fig_path, "table": rows}


def load_volume_table(source) -> dict:
    """A volume table from a SynthSeg --vol CSV, or from a folder of NIfTI volumes.

    A folder whose files end in _labels.nii.gz holds label maps (used as they are);
    otherwise each .nii/.nii.gz is a phantom image: rescaled to [-1, 1] with normalize_intensity
    (saved files are uint16) and segmented with segment_phantom.
    Voxel sizes come from each file's affine; subjects are the file names.
    """
    source = pathlib.Path(source)
    if source.is_file():
        return read_synthseg_csv(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: expected a SynthSeg volume CSV or a folder of NIfTI files")
    files = sorted(f for f in source.iterdir() if f.name.endswith((".nii", ".nii.gz")))
    label_files = [f for f in files if f.name.endswith("_labels.nii.gz")]
    if not files:
        raise ValueError(f"{source}: no .nii/.nii.gz files")
    maps, vox = {}, []
    for f in label_files or files:
        array, affine = load_nifti(f)
        if label_files and (array.min() < 0 or array.max() > len(PHANTOM_LABELS) - 1 or (array != np.rint(array)).any()):
            raise ValueError(f"{f}: label values must be integers in 0..{len(PHANTOM_LABELS) - 1} (PHANTOM_LABELS), "
                             f"found {float(array.min()):g}..{float(array.max()):g}")
        maps[f.name] = np.rint(array).astype(np.uint8) if label_files else normalize_intensity(array).numpy()
        vox.append(np.linalg.norm(affine[:3, :3], axis=0))
    return regional_volumes(maps, voxel_mm=np.stack(vox))


# === 11. Inverse problems: the model as a prior (DPS) ================================================
#
# Restore a scan from a measurement y = A(x): sample with DDIM (eta = 1) and, at every step, step
# against the gradient of a data loss at the step's x0 estimate (docs/methods.md#inverse-problems).

#: The authors' five tasks (their inverse_solve.py), in the kit's names.
INVERSE_TASKS = ("slice_selection", "inpainting", "rician_denoising", "kspace_accel", "motion")

_SPATIAL = (-3, -2, -1)


def slice_profile(n: int, voxel_mm: float = 1.0, thickness_mm: float = 7.0, separation_mm: float = 9.5):
    """(m, n) float64 matrix taking n voxels (voxel_mm apart) to m = floor(n voxel_mm / separation_mm)
    thick slices, centred: row i is a Gaussian of FWHM thickness_mm at slice centre i (the voxel's own
    width taken out of its variance), divided by its sum (a weighted mean: flat stays flat)."""
    sd = lambda fwhm: fwhm / (2 * math.sqrt(2 * math.log(2)))  # noqa: E731
    var = sd(thickness_mm) ** 2 - sd(voxel_mm) ** 2
    m = int(n * voxel_mm / separation_mm)
    if var <= 0 or m < 1:
        raise ValueError(f"slice selection: {n} voxels of {voxel_mm:g} mm cannot make slices {thickness_mm:g} mm "
                         f"thick, {separation_mm:g} mm apart (need voxels thinner than the slices, and room for one)")
    p = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * voxel_mm
    q = (torch.arange(m, dtype=torch.float64) - (m - 1) / 2) * separation_mm
    a = torch.exp(-0.5 * (q[:, None] - p[None, :]) ** 2 / var)
    return a / a.sum(1, keepdim=True)


def _along(x: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """Apply matrix (m, n) along spatial axis (0, 1, 2 = D, H, W) of x (..., D, H, W)."""
    dim = x.ndim - 3 + axis
    return (x.movedim(dim, -1) @ matrix.T.to(x.device, x.dtype)).movedim(-1, dim)


def _fft3(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 3-D FFT (the DC term at index n // 2 of each axis); unitary."""
    return torch.fft.fftshift(torch.fft.fftn(x, dim=_SPATIAL, norm="ortho"), dim=_SPATIAL)


def _ifft3(k: torch.Tensor) -> torch.Tensor:
    """The inverse, and the adjoint, of _fft3."""
    return torch.fft.ifftn(torch.fft.ifftshift(k, dim=_SPATIAL), dim=_SPATIAL, norm="ortho")


def kspace_mask(shape, acceleration: float = 12.0, center_fraction: float = 0.08, power: float = 4.0,
                seed: int = 0) -> torch.Tensor:
    """Variable-density Cartesian mask (D, H, 1) over the two phase-encode axes (W, the readout, is
    always read): a centre block of round(D f) x round(H f) lines, then lines drawn without replacement
    with weight (1 - r / r_max)^power (r: distance from the centre, per half-axis) until
    round(D H / acceleration) are sampled; torch.Generator().manual_seed(seed): same seed, same mask."""
    d, h = shape[0], shape[1]
    kd, kh = ((torch.arange(n) - n // 2) / (n / 2) for n in (d, h))
    r = torch.sqrt(kd[:, None] ** 2 + kh[None, :] ** 2)
    mask = torch.zeros(d, h, dtype=torch.bool)
    cd, ch = max(1, round(d * center_fraction)), max(1, round(h * center_fraction))
    mask[d // 2 - cd // 2:d // 2 - cd // 2 + cd, h // 2 - ch // 2:h // 2 - ch // 2 + ch] = True
    extra = round(d * h / acceleration) - int(mask.sum())
    if extra > 0:
        weight = (1 - r / r.max()).clamp(min=0)[~mask] ** power + 1e-8
        pick = torch.multinomial(weight, extra, generator=torch.Generator().manual_seed(seed))
        free = torch.nonzero(~mask)[pick]
        mask[free[:, 0], free[:, 1]] = True
    return mask.float()[:, :, None]


def _rigid_grid(shape, degrees, translation_mm, voxel_mm, batch: int, like: torch.Tensor) -> torch.Tensor:
    """grid_sample grid (B, D, H, W, 3) that moves the object by p -> R p + t (R = Rz Ry Rx on (D, H, W)
    positions in mm about the centre): the moved image at p reads the original at R^T (p - t)."""
    def turn(a, b, deg):
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        m = torch.eye(3, dtype=torch.float64)
        m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
        return m
    rt = (turn(1, 2, degrees[2]) @ turn(0, 2, degrees[1]) @ turn(0, 1, degrees[0])).T
    half = torch.diag(torch.tensor([max(n - 1, 1) / 2 for n in shape], dtype=torch.float64)
                      * torch.as_tensor(voxel_mm, dtype=torch.float64).expand(3))  # index units -> mm
    lin = torch.linalg.solve(half, rt @ half)
    off = -torch.linalg.solve(half, rt @ torch.tensor(translation_mm, dtype=torch.float64))
    theta = torch.cat([lin.flip(0, 1), off.flip(0)[:, None]], 1)                  # (x, y, z) order
    return F.affine_grid(theta.to(like.device, like.dtype).expand(batch, 3, 4), (batch, 1, *shape), align_corners=True)


@dataclasses.dataclass
class InverseTask:
    """A measurement model for x (B, 1, D, H, W) in [-1, 1] (docs/methods.md#inverse-problems).

    measure(x, generator): y as the scanner would give it (Rician noise drawn for rician_denoising);
    forward(x): the noiseless model A(x) that DPS differentiates; loss(x0, y): the data term, per
    sample summed (the unsquared norm |A(x0) - y|, or the Rician negative log-likelihood); baseline(y):
    the plain reconstruction DPS is compared with; adjoint(y): A^T for the linear tasks, else None;
    zeta: the guidance weight for flow, sample and rflow, zeta_noise_velocity for noise and velocity
    prediction: the authors' (20 and 500; Rician 5e-4 for all) on IMAGE_SHAPE, scaled by
    sqrt(voxels / voxels of IMAGE_SHAPE) on other grids for the norm losses."""
    name: str
    shape: tuple
    forward: object
    measure: object
    loss: object
    baseline: object
    adjoint: object = None
    zeta: float = 20.0
    zeta_noise_velocity: float = 500.0


def inverse_task(name: str, shape, voxel_mm: float | None = None, seed: int = 0, sigma: float = 0.1,
                 axis: int = 2, degrees: float = 6.0, shift_mm: float = 6.0, when: float = 0.45) -> InverseTask:
    """The task `name` (INVERSE_TASKS) on a grid `shape` (D, H, W) of voxel_mm (default 224 / max(shape),
    1 mm on IMAGE_SHAPE), with the authors' settings scaled to it:

    slice_selection   slices 7 mm thick (FWHM), 9.5 mm apart along `axis`; baseline: nearest slice.
    inpainting        a central block zeroed (192 x 224 x 192: [64:-64, 64:-64, 64:-64], the same
                      fractions elsewhere); baseline: the masked image.
    rician_denoising  y = |u + sigma n1 + i sigma n2| on u = (x + 1) / 2 (sigma in [0, 1] units);
                      loss: Rician NLL; baseline: y.
    kspace_accel      y = |F^-1 M F u| with kspace_mask(12x, 8 % centre, power 4, seed); baseline: y
                      (the zero-filled reconstruction).
    motion            a rigid move, `degrees` about and `shift_mm` along each axis: the first `when`
                      (45 %) of the k-space lines along the first axis (centred order) come from the
                      moved head, the rest, which hold the centre, from the still one; y = |F^-1 k|;
                      baseline: y.
    Magnitude tasks map back with 2 u - 1.
    """
    if name not in INVERSE_TASKS:
        raise ValueError(f"unknown inverse task {name!r}: use one of {', '.join(INVERSE_TASKS)}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"inverse_task: shape must be (D, H, W), got {shape}")
    voxel_mm = 224 / max(shape) if voxel_mm is None else float(voxel_mm)
    norm = lambda r: r.flatten(1).norm(dim=1).sum()  # noqa: E731  (per sample |.|, summed over the batch)
    # |r|'s gradient has norm 1 whatever the grid, spread over all voxels: scaling the authors' zeta by
    # sqrt(voxels / voxels of IMAGE_SHAPE) keeps each voxel's pull what it is on the published grid
    scale = math.sqrt(math.prod(shape) / math.prod(IMAGE_SHAPE))
    zetas = dict(zeta=20.0 * scale, zeta_noise_velocity=500.0 * scale)
    unit = lambda x: ((x + 1) / 2).clamp(0, 1)       # noqa: E731
    if name == "slice_selection":
        a = slice_profile(shape[axis], voxel_mm)
        nearest = torch.zeros(a.shape[1], a.shape[0], dtype=torch.float64)
        nearest[torch.arange(a.shape[1]), a.argmax(0)] = 1                          # each voxel's nearest slice
        forward = lambda x: _along(x, axis, a)  # noqa: E731
        return InverseTask(name, shape, forward, lambda x, generator=None: forward(x), lambda x0, y: norm(forward(x0) - y),
                           lambda y: _along(y, axis, nearest), adjoint=lambda y: _along(y, axis, a.T), **zetas)
    if name == "inpainting":
        keep = torch.ones(shape)
        keep[tuple(slice(round(n * f), n - round(n * f)) for n, f in zip(shape, (1 / 3, 2 / 7, 1 / 3)))] = 0
        forward = lambda x: keep.to(x.device, x.dtype) * x  # noqa: E731
        return InverseTask(name, shape, forward, lambda x, generator=None: forward(x), lambda x0, y: norm(forward(x0) - y),
                           lambda y: y, adjoint=forward, **zetas)
    if name == "rician_denoising":
        def measure(x, generator=None):
            n1, n2 = (_randn(x.shape, generator, x.device, x.dtype) for _ in range(2))
            return 2 * torch.sqrt((unit(x) + sigma * n1) ** 2 + (sigma * n2) ** 2 + 1e-12) - 1

        def nll(x0, y):  # -log p(y | x0) up to terms free of x0; log I0(z) = log i0e(z) + z for z >= 0
            a, b = unit(x0), (y + 1) / 2
            z = a * b / sigma**2
            return (a**2 / (2 * sigma**2) - torch.log(torch.special.i0e(z)) - z).sum()
        return InverseTask(name, shape, lambda x: x, measure, nll, lambda y: y.clamp(-1, 1), zeta=5e-4, zeta_noise_velocity=5e-4)
    if name == "kspace_accel":
        mask = kspace_mask(shape, seed=seed)
        forward = lambda x: 2 * _ifft3(mask.to(x.device) * _fft3(unit(x))).abs() - 1  # noqa: E731
        return InverseTask(name, shape, forward, lambda x, generator=None: forward(x), lambda x0, y: norm(forward(x0) - y),
                           lambda y: y, **zetas)

    def moved(x):  # motion
        u = unit(x)
        grid = _rigid_grid(shape, (degrees,) * 3, (shift_mm,) * 3, voxel_mm, x.shape[0], u)
        low = u.amin(dim=_SPATIAL, keepdim=True)                                   # outside: background
        shifted = F.grid_sample(u - low, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + low
        before = (torch.arange(shape[0], device=x.device) < int(shape[0] * when))[:, None, None]
        return 2 * _ifft3(torch.where(before, _fft3(shifted), _fft3(u))).abs() - 1
    return InverseTask(name, shape, moved, lambda x, generator=None: moved(x), lambda x0, y: norm(moved(x0) - y), lambda y: y,
                       **zetas)


def solve_inverse(model, prediction: str, y: torch.Tensor, task: InverseTask, steps: int = 256,
                  zeta: float | None = None, eta: float = 1.0, guidance: str = "conversion", noise=None,
                  schedule=None, generator=None, progress: bool = True, callback=None, dtype=None,
                  checkpointing: bool = True) -> torch.Tensor:
    """Restore x from y = task.measure(x) with DPS: DDIM (eta, default 1) on the linspace grid, each step
    then moved by - zeta * grad_{x_t} task.loss(x0_hat(x_t), y); the last step returns
    x0_hat - zeta * grad. Returns float32 (B, 1, *task.shape) on the model's device. y: (B, 1, ...),
    task.measure of images on task.shape, which must be the model's grid.

    guidance="conversion" (the authors'): the network runs without gradients, so the gradient reaches
    x_t only through the conversion to x0 (1 / (alpha + sigma) for flow, alpha for velocity, 1 / alpha for
    noise, none for sample prediction, whose x0 is the output itself: no guidance at all).
    guidance="network": the gradient also goes through the U-Net (DPS as Chung et al. wrote it), about
    3x the cost of a step; checkpointing=True recomputes the U-Net's activations in backward to save memory.
    zeta: default task.zeta (task.zeta_noise_velocity for noise and velocity prediction). callback(i, t,
    x_t, x0_hat) after every step, as in sample.
    """
    prediction = canonical_prediction(prediction)
    schedule = _schedule(schedule, prediction)
    if guidance not in ("conversion", "network"):
        raise ValueError(f"guidance must be 'conversion' (the authors') or 'network', got {guidance!r}")
    if not 0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    zeta = (task.zeta_noise_velocity if prediction in ("noise", "velocity") else task.zeta) if zeta is None else zeta
    pairs = timestep_pairs(steps, "linspace", schedule)
    device = next(model.parameters()).device
    y = torch.as_tensor(y).to(device, torch.float32)
    shape = (y.shape[0], 1, *task.shape)
    if y.ndim != 5 or tuple(y.shape[2:]) != tuple(task.forward(torch.zeros(1, 1, *task.shape)).shape[2:]):
        raise ValueError(f"y {tuple(y.shape)} is not a measurement of task {task.name} on the grid {task.shape} "
                         "(B, 1, ...): make it with task.measure(x)")
    x = _randn(shape, generator, device) if noise is None else noise.to(device, torch.float32)
    if tuple(x.shape) != shape:
        raise ValueError(f"noise {tuple(x.shape)} must have the restored image's shape {shape}")
    was_training, was_checkpointing = model.training, getattr(model, "gradient_checkpointing", None)
    model.eval()
    if was_checkpointing is not None and guidance == "network":
        model.gradient_checkpointing = checkpointing
    try:
        for i, (t, t_prev) in enumerate(tqdm(pairs, desc=f"DPS {task.name} ({prediction})", disable=not progress)):
            tt = torch.full((x.shape[0],), t, dtype=torch.float32 if schedule.continuous else torch.long)
            x_t = x.detach().requires_grad_(True)
            with torch.set_grad_enabled(guidance == "network"), _autocast(device, dtype):
                output = model(x_t, tt.to(device)).float()
            x0_hat, eps_hat = to_x0_eps(prediction, output, x_t, tt, schedule)
            loss = task.loss(x0_hat, y)  # sample prediction under conversion guidance: free of x_t
            grad = torch.autograd.grad(loss, x_t, allow_unused=True)[0] if loss.requires_grad else None
            grad = torch.zeros_like(x) if grad is None else grad
            x0_hat, eps_hat = x0_hat.detach(), eps_hat.detach()
            x = ddim_step(x0_hat, eps_hat, t_prev, eta, t, schedule, generator) - zeta * grad
            if callback is not None:
                callback(i, t, x, x0_hat)
    finally:
        model.train(was_training)
        if was_checkpointing is not None:
            model.gradient_checkpointing = was_checkpointing
    return x.detach().float()

# === 12. Viewing (matplotlib, widgets) ===============================================================

def orthogonal_slices(volume, index=None) -> dict:
    """The three planes through voxel `index` (default: the centre) of an LPS volume (L, P, S axes).

    Returns {"axial", "coronal", "sagittal": 2-D arrays} laid out for imshow(origin="lower"):
    superior up in coronal and sagittal, anterior up in axial; the subject's left on
    the image's right (radiological convention) in axial and coronal; anterior on the right in
    sagittal. Every figure states it in its panel titles (PLANE_TITLES).
    """
    v, _ = _as_volume(volume, "volume")
    i, j, k = index if index is not None else tuple(s // 2 for s in v.shape)
    return {"axial": v[:, ::-1, k].T, "coronal": v[:, j, :].T, "sagittal": v[i, :, :].T[:, ::-1]}


#: Panel titles with each plane's display convention (orthogonal_slices' layout).
PLANE_TITLES = {"axial": "axial (A up, L right)", "coronal": "coronal (S up, L right)",
                "sagittal": "sagittal (S up, A right)"}


def show_slices(volume, index=None, title=None, fig=None, vmin=None, vmax=None):
    """Draw the three orthogonal slices side by side; returns the matplotlib Figure."""
    fig = fig if fig is not None else Figure(figsize=(10, 3.6))
    v, _ = _as_volume(volume, "volume")
    vmin = float(v.min()) if vmin is None else vmin
    vmax = float(v.max()) if vmax is None else vmax
    fig.clear()
    axes = fig.subplots(1, 3)
    for ax, (name, plane) in zip(axes, orthogonal_slices(v, index).items()):
        ax.imshow(plane, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(PLANE_TITLES[name], fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_slices_png(volume, path, title=None, dpi=100) -> pathlib.Path:
    """Write a PNG of the three orthogonal slices through the centre (atomically)."""
    fig = show_slices(volume, title=title)
    path = pathlib.Path(path)
    _atomic_write(path, lambda tmp: fig.savefig(str(tmp), dpi=dpi, format="png"))
    return path


# --- Widgets: ipywidgets in a notebook, a static Figure elsewhere --------------------------------


def _widgets():
    """The ipywidgets module when running inside IPython with ipywidgets installed, else None, as
    also when DDPM_MINI_STATIC=1 asks for static figures (a notebook saved with its outputs, e.g.
    tests/render_previews.py, or one exported to HTML or PDF, keeps figures, not widgets).
    (Imported here, not at the top: the kit runs without IPython.)"""
    if os.environ.get("DDPM_MINI_STATIC") == "1":
        return None
    try:
        import ipywidgets
        from IPython import get_ipython
    except ImportError:
        return None
    return ipywidgets if get_ipython() is not None else None


def _redraw(out, draw, figsize) -> None:
    """Replace the contents of an ipywidgets Output with a new pyplot figure drawn by draw(fig).
    (pyplot is imported here: importing it picks a GUI backend, which only a notebook wants.)"""
    import matplotlib.pyplot as plt
    with out:
        out.clear_output(wait=True)
        fig = plt.figure(figsize=figsize)
        draw(fig)
        plt.show()
        plt.close(fig)  # inline backends close it in show(); others (e.g. Agg) would keep it


def view(volume, title=None):
    """Interactive viewer: one slider per plane over the three orthogonal slices (ipywidgets).

    volume: (D, H, W) array or tensor, a (1, 1, D, H, W) sample, a NIfTI path or nibabel image.
    Returns the widget, which a notebook shows as a cell's last value (or pass it to
    IPython's display()). Where widgets are unavailable (plain Python, no ipywidgets) it
    returns a static matplotlib Figure of the planes through the centre instead.
    """
    v, _ = _as_volume(volume, "volume")
    widgets = _widgets()
    if widgets is None:
        return show_slices(v, title=title)
    sliders = [widgets.IntSlider(value=s // 2, min=0, max=s - 1, description=name, continuous_update=False)
               for s, name in zip(v.shape, ("L-R", "P-A", "I-S"))]
    out = widgets.Output()
    lo, hi = float(v.min()), float(v.max())

    def redraw(_=None):
        _redraw(out, lambda fig: show_slices(v, tuple(s.value for s in sliders), title=title, fig=fig,
                                             vmin=lo, vmax=hi), (10, 3.6))
    for s in sliders:
        s.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(sliders), out])


def show_volumes(volumes: dict, index=None, title=None, fig=None):
    """A grid of orthogonal slices: one row per entry of volumes {name: volume}, the axial,
    coronal and sagittal planes through `index` (default: the centre) in the columns.

    Each volume: (D, H, W), (1, D, H, W) or (1, 1, D, H, W), array or tensor; each row uses
    its own grey range. Returns the matplotlib Figure (rows x 3).
    """
    fig = fig if fig is not None else Figure(figsize=(9, 3 * len(volumes)))
    fig.clear()
    fig.set_layout_engine("constrained")
    axes = fig.subplots(len(volumes), 3, squeeze=False)
    for row, (name, volume) in zip(axes, volumes.items()):
        v, _ = _as_volume(volume, f"volume {name!r}")
        for ax, (plane, image) in zip(row, orthogonal_slices(v, index).items()):
            ax.imshow(image, cmap="gray", origin="lower", vmin=float(v.min()), vmax=float(v.max()),
                      interpolation="nearest")
            ax.set_title(f"{name}: {PLANE_TITLES[plane]}", fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    return fig


# === 13. Command line ================================================================================


def _number(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: a finite `kind` (int or float) in the range lo..hi (ends excluded when
    *_open); anything else is refused at parse time, naming the option and the range."""
    bounds = ("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo:g}") + ", " + \
        ("inf" if hi is None else f"{hi:g}") + (")" if hi_open or hi is None else "]")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) or \
                (hi is not None and (value >= hi if hi_open else value > hi)):
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return value
    parse.__name__ = f"{'integer' if kind is int else 'number'} in {bounds}"
    return parse


_COUNT, _SIZE = _number(int, 1), _number(int, 2)          # at least one; a volume side (>= 2 voxels)


def _writable_folder(folder, what: str) -> pathlib.Path:
    """Make sure `folder` is (or can become) a folder this process can write into, before any long
    work: a file in its place, or a folder without write permission, is a one-line error."""
    folder = pathlib.Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())  # nothing is created here
    if not existing.is_dir():
        raise ValueError(f"{what} {folder} is a file, not a folder" if existing == folder else
                         f"{what} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(f"{what} {folder}: cannot write there ({existing} is not writable)")
    return folder


def _cli_method(method, prediction: str, eta: float = 0.0, paper_era: bool = False) -> str:
    """`sample`'s update rule when --method is not given: DPM-Solver++(2M) (README's steps table, measured
    on the VP teaching models); DDIM for DDIM's own options (--eta, --paper-era) and for rflow, whose DDIM
    step is the authors' Euler step (rflow is not in the table)."""
    return method or ("ddim" if eta or paper_era or prediction == "rflow" else "dpm++2m")


def _cmd_sample(args) -> int:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))  # torchrun: sample i on rank i % world
    device = _device(args.device)
    if args.method not in (None, "ddim") and (args.eta or args.paper_era):
        raise ValueError(f"sample: --method {args.method} is deterministic and uses the clipped x0: --eta and "
                         "--paper-era are DDIM's options (use --method ddim)")
    model, meta, prediction, schedule = _model_for(args, device, "sample")
    args.method = _cli_method(args.method, prediction, args.eta, args.paper_era)
    shape = tuple(args.shape or meta.get("shape") or IMAGE_SHAPE)
    voxel_mm = 224 / max(meta.get("shape") or IMAGE_SHAPE)  # the trained grid's voxel: a larger --shape is a larger view
    if args.paper_era:
        args.spacing = "leading"
    steps = timestep_pairs(args.steps, args.spacing, schedule)  # validate before any work
    if args.out and (args.out_dir or args.n > 1):
        raise ValueError(f"sample: --out names one file; for {args.n} sample(s) in a folder give --out-dir, not --out")
    outputs = ([pathlib.Path(args.out or "sample.nii.gz")] if args.n == 1 and not args.out_dir else
               [pathlib.Path(args.out_dir or ".") / f"{prediction}_model_seed{args.seed + i:04d}.nii.gz"
                for i in range(args.n)])
    for path in outputs:
        if not path.name.endswith((".nii", ".nii.gz")):
            raise ValueError(f"sample: the output must be a .nii or .nii.gz file, got {path}")
        _writable_folder(path.parent, "sample: the output folder")
    print(f"sampling {len(outputs)} x {shape} ({voxel_mm:.3g} mm voxels) with the {prediction} model on {device}, "
          f"{args.method}, {len(steps)} {args.spacing} steps" + (f", eta {args.eta}" if args.method == "ddim" else "")
          + (", paper-era (raw eps)" if args.paper_era else ""))
    for i, path in enumerate(outputs):
        if i % world != rank:
            continue
        start = time.perf_counter()

        def eta_after_first(step, t, x_t, x0_hat):
            if step == 0 and i == rank:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - start
                print(f"first step: {first:.1f} s, so about {first * len(steps) / 60:.1f} min per sample", flush=True)
        x = sample(model, prediction, shape=(1, model.in_channels, *shape), steps=args.steps, eta=args.eta,
                   spacing=args.spacing, schedule=schedule, generator=torch.Generator().manual_seed(args.seed + i),
                   recompute_eps=not args.paper_era, method=args.method,
                   callback=eta_after_first, dtype=args.dtype)
        save_nifti(x[0, 0], path, voxel_mm=voxel_mm)
        png = save_slices_png(x[0, 0], path.with_name(path.name.split(".nii")[0] + ".png"),
                              title=f"{prediction}, seed {args.seed + i}")
        print(f"wrote {path} and {png} ({time.perf_counter() - start:.1f} s)")
    return 0


def _model_for(args, device, command: str) -> tuple:
    """(model, metadata, prediction, schedule) for --weights (a file, run folder or manifest name) or
    --prediction (the pretrained MedForj model)."""
    if args.weights:
        model, meta = load_model(_weights_source(args.weights), device)
        prediction = canonical_prediction(args.prediction or meta.get("prediction") or "")
        if meta.get("prediction") and prediction != meta["prediction"]:
            raise ValueError(f"{command}: --prediction {prediction} contradicts --weights {args.weights}, trained for "
                             f"{meta['prediction']}; leave --prediction out (the file says what it predicts)")
    else:
        if not args.prediction:
            raise ValueError(f"{command}: give --prediction (pretrained MedForj) or --weights FILE")
        prediction, meta = canonical_prediction(args.prediction), {"schedule": default_schedule(args.prediction).config()}
        model = load_pretrained(prediction, device)
    # a file that names its prediction names its schedule too; the published files name neither
    schedule = Schedule.from_config(meta["schedule"]) if meta.get("prediction") else default_schedule(prediction)
    return model, meta, prediction, schedule


def _cmd_solve(args) -> int:
    device = _device(args.device)
    model, meta, prediction, _ = _model_for(args, device, "solve")
    grid = tuple(meta.get("shape") or IMAGE_SHAPE)
    volume, _ = load_nifti(args.input)                                  # a clear error if unreadable
    image = nib.load(str(args.input))
    if volume.shape != grid:
        raise ValueError(f"solve: {args.input} is {volume.shape}; the model works on {grid}: "
                         + ("run `python ddpm_mini.py preprocess IN OUT` first (LPS, 1 mm, 192 x 224 x 192)"
                            if grid == IMAGE_SHAPE else "give a volume on the grid the model was trained at"))
    out = pathlib.Path(args.out)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"solve: --out must be a .nii or .nii.gz file, got {out}")
    _writable_folder(out.parent, "solve: the output folder")
    x = normalize_intensity(volume)[None, None]                         # min-max to [-1, 1], as the authors
    task = inverse_task(args.task, grid, seed=args.seed)
    y = task.measure(x, torch.Generator().manual_seed(args.seed))
    print(f"solve: {args.task} on {args.input} with the {prediction} model on {device}, {args.steps} DPS steps "
          f"(zeta {args.zeta if args.zeta is not None else 'default'}, guidance {args.guidance})", flush=True)
    restored = solve_inverse(model, prediction, y.to(device), task, steps=args.steps, zeta=args.zeta,
                             guidance=args.guidance, generator=torch.Generator().manual_seed(args.seed),
                             dtype=args.dtype)
    save_nifti(restored[0, 0], out, affine=image.affine, header=image.header)
    stem = out.name.split(".nii")[0]
    if args.save_measurement:
        for name, vol in (("baseline", task.baseline(y)[0, 0]),) + ((("measured", y[0, 0]),) if y.shape == x.shape else ()):
            print(f"wrote {save_nifti(vol, out.with_name(f'{stem}_{name}.nii.gz'), affine=image.affine, header=image.header)}")
    print(f"wrote {out}")
    return 0


def _solve_parser(sub):
    p = _subcommand(sub, "solve", "restore a scan from a simulated measurement with the model as prior (DPS, the "
                       "authors' five tasks): reads IN, simulates the task's measurement, solves, writes the result "
                       "with IN's affine and header")
    p.add_argument("--task", required=True, choices=INVERSE_TASKS, help="the measurement to simulate and invert")
    p.add_argument("--in", dest="input", required=True, help="a NIfTI volume on the model's grid (preprocess first)")
    p.add_argument("--out", required=True, help="output .nii.gz")
    p.add_argument("--prediction", help=f"pretrained MedForj model to fetch ({', '.join(ALL_PREDICTIONS)})")
    p.add_argument("--weights", help="a weights file, run folder or manifest name (e.g. teaching_flow) instead")
    p.add_argument("--steps", type=_COUNT, default=256, help="DPS steps, one network call each (default 256, the authors')")
    p.add_argument("--zeta", type=_number(float, 0), help="guidance weight (default: the authors', scaled to the grid)")
    p.add_argument("--guidance", choices=("conversion", "network"), default="conversion",
                   help="conversion (default, the authors': gradient through the x0 conversion only) or network "
                        "(through the U-Net too: about 3x the time)")
    p.add_argument("--seed", type=_number(int, 0), default=0, help="seed of the measurement and the sampler")
    p.add_argument("--save-measurement", action="store_true",
                   help="also write <out>_baseline.nii.gz (and <out>_measured.nii.gz for image-shaped measurements)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="CUDA precision (default float16)")


def _weights_source(value: str):
    """--weights: a weights file or run folder, else a manifest name of kind weights (fetched)."""
    path = pathlib.Path(value)
    if path.exists() or path.suffix or len(path.parts) > 1:  # a path: load_model says what is missing
        return value
    names = [n for n, r in read_manifest().items() if r.get("kind") == "weights" and r.get("url")]
    if value in names:
        return fetch(value)
    raise FileNotFoundError(f"--weights {value}: no such file or folder, and no weights of that name in the "
                            f"manifest (those are: {', '.join(names)})")


_CLI_STEPS = 50  # sample's default step count, with _cli_method's dpm++2m (README's steps table)


def _sample_parser(sub):
    p = _subcommand(sub, "sample", "generate volumes with DPM-Solver++(2M) or DDIM (NIfTI, LPS, uint16, 1 mm on the published grid and coarser voxels over "
                       "the same field of view on a smaller --shape, + a PNG of three slices); "
                       "under torchrun, sample i is made by rank (i mod WORLD_SIZE)")
    p.add_argument("--prediction", help=f"pretrained MedForj model to fetch ({', '.join(ALL_PREDICTIONS)}; aliases accepted),"
                   " or the prediction of --weights if its metadata lacks it")
    p.add_argument("--weights", help="a .safetensors/.pt file instead of the pretrained model (ddpm-mini metadata gives its "
                   "U-Net, schedule and training size), a train output or checkpoint folder (its EMA weights), or "
                   "a manifest name such as teaching_flow")
    p.add_argument("--steps", type=_COUNT, default=_CLI_STEPS, help=f"sampling steps, one network call each "
                   f"(default {_CLI_STEPS})")
    p.add_argument("--method", choices=METHODS,
                   help="update rule: dpm++2m (default: DPM-Solver++(2M), second order, docs/math.md#dpm-solver-2m; at "
                        "50 steps it came closest to 1000-step DDIM in README's steps table) or ddim (the authors'; "
                        "the default for rflow models and when --eta or --paper-era is given)")
    p.add_argument("--eta", type=_number(float, 0), default=0.0, help="DDIM eta >= 0: 0 deterministic (default)")
    p.add_argument("--spacing", choices=SPACINGS, default="linspace",
                   help="timestep grid (default linspace, the authors' current sampler)")
    p.add_argument("--paper-era", action="store_true",
                   help="the paper-era sampler: the leading grid and eps from the raw network output (MONAI's "
                        "older DDIMScheduler); overrides --spacing")
    p.add_argument("--seed", type=_number(int, 0), default=0, help="seed of the first sample; sample i uses seed + i")
    p.add_argument("--n", type=_COUNT, default=1, help="number of samples (default 1)")
    p.add_argument("--out", help="output file for a single sample (default sample.nii.gz)")
    p.add_argument("--out-dir", help="folder for <prediction>_model_seed<NNNN>.nii.gz (+ .png) files")
    p.add_argument("--shape", type=_SIZE, nargs=3, metavar=("D", "H", "W"),
                   help=f"volume size (default: the size --weights was trained at, else {IMAGE_SHAPE}, the published grid)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                   help="CUDA precision (default float16 autocast; CPU always float32)")


def _resume_options(args, ckpt, recipe: dict) -> dict:
    """train --resume: the run's own settings fill the options left out; an option given with
    another value than the run's (recorded in its checkpoint) is refused, naming both, except --lr:
    a new learning rate applies from the resumed step on (train's lr_steps records it)."""
    meta = load_model(ckpt, "cpu")[1]
    unets = {"teaching": TEACHING_UNET, "medforj": MEDFORJ_UNET}
    run = {"unet": meta["unet"], "size": meta.get("shape"), "seed": int(meta.get("seed", 0)),
           "batch_size": int(meta["batch_size"]) if "batch_size" in meta else None,
           "lr": float(meta["lr"]) if "lr" in meta else None}
    given = {"unet": args.unet, "size": list(args.size) if args.size else None, "seed": args.seed,
             "batch_size": args.batch_size, "lr": args.lr}
    def config(name):  # the full config UNet records, built without allocating weights
        with torch.device("meta"):
            return UNet(**unets[name]).config
    same = {"unet": lambda a, b: config(a) == b}
    for key, value in given.items():
        if key == "lr":
            continue
        if value is not None and run[key] is not None and not same.get(key, lambda a, b: a == b)(value, run[key]):
            option = "--" + key.replace("_", "-")
            raise ValueError(f"train --resume: {option} {value} differs from the run's {run[key]} (recorded in {ckpt}); "
                             f"leave {option} out to continue with the run's, or train into a new --out")
    for key in ("ema_decay", "ema_warmup", "max_grad_norm"):
        wanted = args.ema_decay if key == "ema_decay" and args.ema_decay is not None else recipe["train"][key]
        if key in meta and json.loads(meta[key]) != wanted:
            raise ValueError(f"train --resume: {key} {wanted} (--recipe {args.recipe}) differs from the run's "
                             f"{json.loads(meta[key])} (recorded in {ckpt}); resume with the recipe the run started with")
    if given["lr"] is not None and run["lr"] is not None and given["lr"] != run["lr"]:  # said once nothing is refused
        print(f"train --resume: learning rate {run['lr']:g} until step {meta['step']}, {given['lr']:g} from there on")
    return {k: run[k] if given[k] is None and run[k] is not None else given[k] for k in given} | {"meta": meta}


def _cmd_train(args) -> int:
    out = pathlib.Path(args.out)
    if args.phantoms == bool(args.data):
        raise ValueError("train: give --phantoms or --data DIR (one of them)")
    _writable_folder(out, "train --out")
    recipe = RECIPES[args.recipe]
    ckpt = latest_checkpoint(out) if args.resume else None
    if ckpt:
        resumed = _resume_options(args, ckpt, recipe)
        meta = resumed.pop("meta")
        args.size, args.seed, args.batch_size, args.lr = resumed["size"], resumed["seed"], resumed["batch_size"], resumed["lr"]
    else:
        meta = {"unet": {"teaching": TEACHING_UNET, "medforj": MEDFORJ_UNET}[args.unet or "teaching"],
                "schedule": default_schedule(args.prediction).config()}
    args.unet, args.seed = args.unet or "teaching", 0 if args.seed is None else args.seed
    args.batch_size, args.lr = args.batch_size or 2, args.lr or 1e-4
    if args.phantoms:
        data = PhantomDataset(shape=tuple(args.size or TEACHING_SHAPE), seed=args.seed)
    else:
        data = VolumeDataset(args.data, size=args.size, seed=args.seed, recursive=recipe["data"]["recursive"],
                             augment=recipe["data"]["augment"] if args.augment else False)
    if args.workers:  # the same items in the same order, drawn by worker processes (a GPU outruns one CPU)
        if not args.phantoms:
            raise ValueError("train: --workers works with --phantoms only; --data volumes are read in the main process")
        data = torch.utils.data.DataLoader(data, batch_size=None, num_workers=args.workers, prefetch_factor=4,
                                           persistent_workers=True)
    torch.manual_seed(args.seed)  # the U-Net's initial weights
    model = UNet(**meta["unet"], gradient_checkpointing=args.gradient_checkpointing)
    print(f"training a {'resumed' if ckpt else args.unet} U-Net ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters) for {args.prediction} into {out}" + (f", from {ckpt.name}" if ckpt else ""))
    dtype = args.dtype or (recipe["cuda_dtype"] if _device(args.device).type == "cuda" else None)
    options = dict(recipe["train"], dtype=dtype, **({"ema_decay": args.ema_decay} if args.ema_decay is not None else {}))
    result = train(model, data, args.prediction, args.steps, batch_size=args.batch_size, lr=args.lr, out=out,
                   checkpoint_every=args.checkpoint_every, keep=args.keep, resume=args.resume, seed=args.seed,
                   preview_every=args.preview_every, max_minutes=args.minutes,
                   schedule=Schedule.from_config(meta["schedule"]), device=args.device, **options)
    if result.history:
        print(f"step {len(result.history)}: loss (mean of the last 20 steps) {np.mean(result.history[-20:]):.4f}")
    print(f"checkpoint {result.checkpoint}; losses in {result.history_csv}; "
          f"sample with: python ddpm_mini.py sample --weights {out} --n 4 --out-dir {out / 'samples'}")
    return 0


def _train_parser(sub):
    p = _subcommand(sub, "train", "train a U-Net on phantoms or a folder of NIfTI volumes")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--phantoms", action="store_true", help="endless synthetic phantoms (phantom(seed + i))")
    source.add_argument("--data", metavar="DIR", help="a folder of preprocessed NIfTI volumes (see preprocess)")
    p.add_argument("--prediction", required=True, help=f"what the U-Net predicts: {', '.join(ALL_PREDICTIONS)}")
    p.add_argument("--size", type=_SIZE, nargs=3, metavar=("D", "H", "W"),
                   help=f"volume size (phantoms default {' '.join(map(str, TEACHING_SHAPE))}; --data default: the files' own)")
    p.add_argument("--augment", action="store_true",
                   help="with --data: random flip and affine (augment), as the recipe sets them")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="kit",
                   help="kit (default: EMA 0.999 with warm-up, gradient clipping at 1, +-3 degrees / +-2 voxels / "
                        "+-3%% scale) or medforj (the authors': EMA 0.9998 without warm-up, no clipping, bfloat16, "
                        "+-10 degrees / +-5 voxels with p 0.5, --data searched recursively); see docs/methods.md#recipes")
    p.add_argument("--unet", choices=("teaching", "medforj"),
                   help="TEACHING_UNET (default; CPU-sized) or MEDFORJ_UNET (the paper's; needs a GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--workers", type=_number(int, 0, 64), default=0,
                   help="with --phantoms: processes drawing phantoms (same items, same order; default 0: the main "
                        "process). On a GPU one phantom per 15 ms limits the step rate: try 3. --resume with workers "
                        "draws the phantoms already used again to skip them")
    p.add_argument("--steps", type=_COUNT, default=5000, help="total optimizer steps (default 5000)")
    p.add_argument("--minutes", type=_number(float, 0, lo_open=True), help="stop (with a checkpoint) after this much training time")
    p.add_argument("--batch-size", type=_COUNT, help="volumes per step and process (default 2; --resume: the run's)")
    p.add_argument("--lr", type=_number(float, 0, lo_open=True), help="Adam learning rate (default 1e-4, the paper's; --resume: the run's, or a new one from the "
                   "resumed step on, e.g. 1e-4 to finish a run started at 1e-3)")
    p.add_argument("--ema-decay", type=_number(float, 0, 1, hi_open=True), help="EMA decay in [0, 1) (default: the recipe's, 0.999 or 0.9998)")
    p.add_argument("--out", default="run", help="output folder (default ./run)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--checkpoint-every", type=_COUNT, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--keep", type=_COUNT, default=3, help="checkpoints kept (default 3)")
    p.add_argument("--preview-every", type=_number(int, 0), default=0, help="write previews/step_N.png every N steps (0: never)")
    p.add_argument("--seed", type=_number(int, 0), help="seed of the initial weights, data order and noise (default 0; --resume: the run's)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="CUDA autocast (default: the recipe's; kit: bfloat16 where supported, else float16); CPU is float32")


def _cmd_fetch(args) -> int:
    if args.list:
        size = lambda r: f"{int(r['size']) / 1e6:.1f} MB" if r.get("size", "").isdigit() else "?"  # noqa: E731
        print(format_table([{"name": r["name"], "kind": r.get("kind", ""), "group": r.get("group", ""), "size": size(r),
                             "verified": r.get("verified", ""), "licence": r.get("license", "")}
                            for r in read_manifest().values()]))
    elif args.group and not args.name:
        for path in fetch_group(args.group):
            print(path)
    elif args.name and not args.group:
        print(fetch(args.name))
    else:
        raise ValueError("fetch: give one of NAME, --group G or --list")
    return 0


def _fetch_parser(sub):
    p = _subcommand(sub, "fetch", "download assets listed in data_manifest.csv into the cache ($DDPM_MINI_CACHE) "
                       "and print their paths; $DDPM_MINI_MIRROR: a folder or URL holding the same files")
    p.add_argument("name", nargs="?", help="asset name (see --list)")
    p.add_argument("--group", help="fetch every asset of this manifest group (e.g. medforj)")
    p.add_argument("--list", action="store_true", help="list the assets: name, kind, group, size, verified, licence")


def _cmd_demo(args) -> int:
    out, size, prediction = pathlib.Path(args.out), tuple(args.size), canonical_prediction(args.prediction)
    _writable_folder(out, "demo --out")
    models, shipped = {}, f"teaching_{prediction}"
    if not args.pretrained:
        print(f"demo: training TEACHING_UNET ({prediction}) on {size} phantoms for up to {args.minutes} min "
              f"on {_device()} into {out} (run it again to train further)")
        torch.manual_seed(args.seed)
        result = train(UNet(**TEACHING_UNET), PhantomDataset(shape=size, seed=args.seed), prediction, args.steps,
                       batch_size=args.batch_size, lr=args.lr, out=out, checkpoint_every=args.steps, resume=True,
                       seed=args.seed, max_minutes=args.minutes)
        models[f"yours ({len(result.history)} steps)"] = result.ema
    try:
        model, meta = load_model(fetch(shipped), _device())
    except (OSError, ValueError) as err:  # offline without the kit's weights/ folder, say
        if args.pretrained:
            raise
        print(f"(the shipped {shipped} model is not available: {err})")
    else:
        if tuple(meta["shape"]) == size:
            models[f"shipped ({meta['step']} steps)"] = model
        else:
            print(f"(the shipped {shipped} model was trained at {tuple(meta['shape'])}, not {size}: not sampled)")
    if not models:
        raise ValueError(f"demo --pretrained: {shipped} was trained at another size; drop --size")
    truth = [phantom_volumes(phantom(10_000 + i, size)[1]) for i in range(8)]
    columns = {"phantoms (8, truth)": truth}
    for label, model in models.items():
        tag = label.split()[0]
        print(f"sampling {args.n} volumes from {label} ({args.sample_steps} DDIM steps)")
        x = sample(model, prediction, shape=(args.n, 1, *size), steps=args.sample_steps,
                   generator=torch.Generator().manual_seed(args.seed), progress=False).cpu()
        columns[f"{label}: {args.n} samples"] = volumes = []
        for i, v in enumerate(x[:, 0]):
            path = save_nifti(v, out / "samples" / f"{tag}_{i}.nii.gz")
            save_slices_png(v, path.with_name(f"{tag}_{i}.png"), title=f"{label}, sample {i} ({prediction})")
            volumes.append(phantom_volumes(segment_phantom(v.numpy())))
    print(f"wrote the samples (NIfTI + PNG) to {out / 'samples'}; tissue volumes (mL) by segment_phantom:")
    rows = []
    for name in list(PHANTOM_LABELS.values())[1:]:
        row = {"structure": name}
        for column, vs in columns.items():
            v = np.array([t[name] for t in vs]) / 1000
            row[column] = f"{v.mean():.1f} ± {v.std():.1f}"
        rows.append(row)
    print(format_table(rows))
    if not args.pretrained:
        print(f"your model has trained {len(result.history)} steps in {out}: README's lab table says how many steps "
              f"each parameterization needs before its samples are recognisable; run demo again to train further")
    return 0


def _demo_parser(sub):
    p = _subcommand(sub, "demo", "train a small model on phantoms for a few minutes (a CPU will do), then sample it and "
                    "the shipped teaching model from the same noise and compare tissue volumes with the truth")
    p.add_argument("--minutes", type=_number(float, 0, lo_open=True), default=4.0, help="training time budget (default 4)")
    p.add_argument("--pretrained", action="store_true",
                   help="no training: sample the shipped teaching model only")
    p.add_argument("--prediction", default="flow", help="noise, sample, velocity or flow (default flow)")
    p.add_argument("--n", type=_COUNT, default=4, help="samples per model (default 4)")
    p.add_argument("--out", default="demo", help="output folder (default ./demo)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    advanced = p.add_argument_group("advanced (tests, tuning)")
    advanced.add_argument("--size", type=_SIZE, nargs=3, default=TEACHING_SHAPE, metavar=("D", "H", "W"),
                          help=f"phantom size (default {' '.join(map(str, TEACHING_SHAPE))}, the shipped models'; "
                               "multiples of 4)")
    advanced.add_argument("--steps", type=_COUNT, default=100_000, help="training steps cap, over all runs (default 100000)")
    advanced.add_argument("--batch-size", type=_COUNT, default=2, help="volumes per step (default 2)")
    advanced.add_argument("--lr", type=_number(float, 0, lo_open=True), default=1e-3, help="Adam learning rate (default 1e-3, the teaching recipe)")
    advanced.add_argument("--sample-steps", type=_COUNT, default=20, help="DDIM steps per sample (default 20)")


def _cmd_preprocess(args) -> int:
    _writable_folder(pathlib.Path(args.output).parent, "preprocess: the output folder")
    img = preprocess(args.input, args.mask)
    _atomic_write(pathlib.Path(args.output), lambda tmp: nib.save(img, str(tmp)))
    centre = _head_centre(np.asarray(img.dataobj, np.float32))
    print(f"wrote {args.output}: shape {img.shape}, 1 mm, axes {''.join(nib.aff2axcodes(img.affine))}, uint16")
    print(f"head centre at voxel ({', '.join(f'{v:.1f}' for v in centre)}); grid centre "
          f"({', '.join(f'{v:.1f}' for v in (np.array(IMAGE_SHAPE) - 1) / 2)})")
    return 0


def _preprocess_parser(sub):
    p = _subcommand(sub, "preprocess", "the paper's minimal preprocessing of a T1w NIfTI: LPS, 1 mm, "
                       "192x224x192, uint16; no skull stripping or bias correction (docs/methods.md)")
    p.add_argument("input", metavar="IN", help="input NIfTI (.nii or .nii.gz), 3-D")
    p.add_argument("output", metavar="OUT", help="output NIfTI path (written atomically)")
    p.add_argument("--mask", metavar="M", default=None,
                   help="optional brain mask on IN's voxel grid: centre the crop on its centre of mass")


def _cmd_evaluate(args) -> int:
    synthetic = {}
    for spec in args.synthetic:
        name, sep, path = spec.partition("=")
        if not (sep and name and path):
            raise ValueError(f"--synthetic takes NAME=CSV|DIR, got {spec!r}")
        if name in synthetic:
            raise ValueError(f"--synthetic: the set name {name!r} is given twice; each set needs its own name")
        synthetic[name] = load_volume_table(path)
    report = comparison_report(load_volume_table(args.real), synthetic, args.out, structures=args.structures,
                               merge_lr=args.merge_lr, n_permutations=args.permutations, seed=args.seed,
                               correction=args.correction)
    print(format_table(report["table"], ("set", "structure", "mean_real", "mean_synthetic", "difference", "p",
                                         "p_adjusted", "cohen_d", "wasserstein")))
    print(f"wrote {report['csv']} and {report['figure']}")
    return 0


def _evaluate_parser(sub):
    p = _subcommand(sub, "evaluate", "compare regional volumes of real and synthetic sets (permutation tests)")
    p.add_argument("--real", required=True, metavar="CSV|DIR", help="a SynthSeg --vol CSV, a folder of phantom "
                   "NIfTI images (segmented with segment_phantom) or of *_labels.nii.gz label maps")
    p.add_argument("--synthetic", required=True, nargs="+", metavar="NAME=CSV|DIR", help="one or more sets, as --real")
    p.add_argument("--out", required=True, metavar="DIR", help="writes volumes.csv and volumes.png here")
    p.add_argument("--structures", nargs="+", default=None, help="default: all structures the sets share")
    p.add_argument("--merge-lr", action="store_true", help="sum left and right structures first")
    p.add_argument("--permutations", type=_COUNT, default=10000, help="relabellings per test (default 10000)")
    p.add_argument("--seed", type=_number(int, 0), default=0, help="seed of the relabellings (default 0)")
    p.add_argument("--correction", choices=("holm", "fdr"), default="holm",
                   help="multiple-testing correction across structures: holm (default, family-wise) or fdr "
                        "(Benjamini-Hochberg)")


_COMMANDS = [("demo", _demo_parser, _cmd_demo), ("train", _train_parser, _cmd_train),
             ("sample", _sample_parser, _cmd_sample), ("fetch", _fetch_parser, _cmd_fetch),
             ("preprocess", _preprocess_parser, _cmd_preprocess), ("evaluate", _evaluate_parser, _cmd_evaluate),
             ("solve", _solve_parser, _cmd_solve)]


def _subcommand(sub, name: str, text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=text, description=text)
    if name != "fetch":
        p.add_argument("--threads", type=_COUNT, help="CPU threads for torch (default: torch's, one per core); on a "
                       "shared machine or lab server use 1-2: busy cores make more threads slower (README)")
    return p


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm_mini.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"ddpm-mini {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add, run in _COMMANDS:
        add(sub)
        sub.choices[name].set_defaults(run=run)
    return parser


def main(argv=None) -> int:
    """The command line: `python ddpm_mini.py COMMAND ...` (see --help). Expected failures (bad
    files or options, unreachable downloads) print `error: ...` and return 1."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.run(args) or 0
    except (ValueError, OSError, nib.filebasedimages.ImageFileError) as err:  # FileNotFound, Connection: OSErrors
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
