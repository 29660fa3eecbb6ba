"""Flow matching: a velocity field that transports Gaussian noise to images along straight lines.

Lecture: lecture-notes.md, Lec15 "Flow Matching" and "Conditional Flow Matching". The equations,
as named in the notes:

    (Lec15 flow ODE)       d/dt phi_t(x) = v_t(phi_t(x)),  phi_0(x) = x      -> ode_sample()
    (Lec15 CFM path)       X_t = (1 - t) X_0 + t x_1                         -> interpolate()
    (Lec15 CFM velocity)   d/dt X_t = x_1 - X_0                              -> cfm_target()
    (Lec15 L_CFM)          E || v_theta(X_t, t) - (x_1 - X_0) ||^2           -> cfm_loss()
    (Lec15 CFG)            v~ = (1 + w) v(z, c) - w v(z), on the velocity    -> cfg_combine()
    (Lec15 claim)          "straighter trajectories, fewer steps"            -> path_straightness(),
                           measured here and in ddpm.py on the same U-Net; reflow_pairs() and
                           --reflow_steps straighten the paths further (rectified flow)

Measured with the cpu preset (24 px, 800 steps of batch 32, fp32, 8 min 23 s alone on 2 CPU
cores): the detector finds the requested (shape, color) in 91% of 144 samples at w = 2 with
Heun, 10 steps (68% at w = 0), Euler 90% at NFE 8. Three times the training (`--max_steps 1200
--batch_size 64`: about 19 minutes of training on that machine, 4.3 on an earlier one) reaches
100% at w = 2 (97% at w = 0), Euler 96% at NFE 4, and a straightness gap of 0.009 (Euler, 100
steps), where ddpm.py's DDIM on the same U-Net measures about 0.1. A 300-step reflow pass on 1024
couplings halves the gap at w = 0 (0.0034 -> 0.0017) and lifts one-step Euler from 2% to 67%.

Exact oracles that the tests integrate against: marginal_velocity() is the field that minimises
L_CFM for a finite data set (Euler with it reaches a training point), gaussian_velocity() and
gaussian_flow() the field and its closed-form flow for data N(mu, s^2 I) (solver error orders).

Papers: Lipman et al. 2022, "Flow Matching for Generative Modeling" (arXiv:2210.02747); Liu et
al. 2022, "Flow Straight and Fast: ... Rectified Flow" (arXiv:2209.03003), for reflow and the
straightness measure; Albergo & Vanden-Eijnden 2022 (arXiv:2209.15571); Esser et al. 2024, SD3
(arXiv:2403.03206), for logit-normal time sampling; Ho & Salimans 2022 (arXiv:2207.12598) for
classifier-free guidance. The U-Net is a checked copy of ddpm.py's, so the two methods differ only
in what the network regresses on and how it is integrated.

Conventions. Time runs from noise to data, as in the lecture: X_0 ~ N(0, I) at t = 0, data x_1 at
t = 1, and the network predicts the velocity x_1 - X_0. SD3 (and diffusers' FlowMatchEuler)
use the opposite direction: z_s = (1 - s) x_data + s eps with data at s = 0, noise at s = 1, and
regress on eps - x_data; the two are the same model under s = 1 - t and v_SD3 = -v (a test checks
this). The network is told time_scale * t (1000 t by default), the range of DDPM's step index, so
the copied sinusoidal time embedding sees the same inputs in both files. Images are float
(B, C, H, W) in [-1, 1]; uint8 (N, H, W, C) on disk. NFE = number of velocity evaluations; with
guidance one evaluation is one network call on a doubled batch (conditional + null class).
Shape legend: B batch, C channels, H W image size, D = C*H*W, N data points, K solver steps.

Commands:
    python flow_matching.py                         # cpu preset: trains, evaluates, writes out/flow_matching/
    python flow_matching.py --preset gpu            # one GPU: bf16 autocast and torch.compile
    torchrun --standalone --nproc_per_node=4 flow_matching.py --preset gpu   # DDP; --batch_size is global
    python flow_matching.py --eval_only 1 --resume out/flow_matching/ckpt.pt  # tables: w, NFE, straightness
    python flow_matching.py --eval_only 1 --resume out/flow_matching/ckpt.pt --eval_ws 0,0.5,1,2,4 \
        --eval_solvers euler,midpoint,heun,rk4 --eval_nfe 1,2,4,8,16      # the README's full tables
    python flow_matching.py --resume out/flow_matching/ckpt.pt --reflow_steps 300  # add a reflow pass
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import re
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

MODEL_NAME = "flow_matching"


@dataclass
class Config:
    # model (the U-Net of ddpm.py, same widths in the cpu preset)
    image_size: int = 24  # height and width in pixels; a multiple of 2 ** (num_levels - 1)
    base_channels: int = 32  # U-Net width at full resolution
    num_levels: int = 3  # U-Net resolutions, each half the previous
    num_res_blocks: int = 1  # residual blocks per level on the way down (one more on the way up)
    attn_levels: int = 1  # self-attention at the lowest this many levels (and always in the middle)
    num_heads: int = 4  # attention heads
    max_mult: int = 2  # channel multiplier cap: level i has base_channels * min(2**i, max_mult)
    dropout: float = 0.0  # dropout inside the residual blocks
    # method
    t_schedule: str = "uniform"  # training times: uniform (U(0,1)) or logit_normal (SD3)
    t_loc: float = 0.0  # logit-normal location m: t = sigmoid(m + s n)
    t_scale: float = 1.0  # logit-normal scale s
    time_scale: float = 1000.0  # the network is told time_scale * t (DDPM's step range)
    p_uncond: float = 0.1  # probability of replacing the label by the null class (for guidance)
    ema_decay: float = 0.999  # EMA of the weights used for sampling (warmed up over the first steps)
    cfg_w: float = 2.0  # guidance weight w of the final samples, in v~ = (1 + w) v(c) - w v
    solver: str = "heun"  # ODE solver of the final samples: euler, midpoint, heun or rk4
    sample_steps: int = 10  # solver steps of the final samples (NFE = steps x stages)
    reflow_steps: int = 0  # after max_steps, train this many steps on the model's own couplings (0: off)
    reflow_pairs: int = 2048  # (noise, sample) couplings generated for reflow
    # evaluation
    eval_per_class: int = 8  # samples per class in each evaluation setting
    eval_ws: str = "0,2"  # guidance weights of the alignment/diversity table (the README's: 0,0.5,1,2,4)
    eval_nfe: str = "1,2,4,8"  # NFE budgets of the NFE table (skipped where a solver's stages do not divide them)
    eval_solvers: str = "euler,heun"  # solvers of the alignment-vs-NFE table (the full table: euler,midpoint,heun,rk4)
    # data
    data: str = "shapes"  # 'shapes' (built-in world) or a path to an .npz file with images (and labels)
    n_train: int = 20000  # shapes images rendered for training
    n_test: int = 2000  # shapes images rendered for the test split (and the heldout split)
    # optim
    max_steps: int = 800  # optimizer steps of flow matching; also the length of its cosine schedule
    batch_size: int = 32  # global batch size (split across DDP ranks)
    lr: float = 2e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 50  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    # system
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA if supported, else fp32), float32, bfloat16
    compile: str = "auto"  # torch.compile: auto (on for CUDA), 1, 0
    seed: int = 0  # seed for the data, the initialisation, the noise and the training order
    # io
    out_dir: str = "out/flow_matching"  # where ckpt.pt, log.jsonl, metrics.json and the PNGs go
    log_every: int = 50  # steps between progress lines
    eval_every: int = 0  # steps between quick alignment checks (0: only at the end)
    ckpt_every: int = 400  # steps between checkpoints (one is always written at the end)
    resume: str = ""  # checkpoint to resume training from, or to evaluate with --eval_only 1
    stop_step: int = 0  # end this run at this step although the schedule spans max_steps (0: off)
    eval_only: bool = False  # with --resume: only evaluate the checkpoint and write the grids


# The accepted range of each numeric field, checked before any work (check_config). A field not
# listed is an integer >= 1 or a finite float > 0.
RANGES = {"attn_levels": ">= 0", "dropout": "[0, 1)", "t_loc": "[-10, 10]", "p_uncond": "[0, 1)", "ema_decay": "[0, 1]",
          "cfg_w": ">= 0", "reflow_steps": ">= 0", "min_lr": ">= 0", "warmup_steps": ">= 0", "weight_decay": ">= 0",
          "grad_clip": ">= 0", "seed": ">= 0", "eval_every": ">= 0", "stop_step": ">= 0"}

# Fields that may change when a run is resumed (any other difference is an error), and that
# --eval_only takes from the command line: vit.py's, plus the sampler, the evaluation and the
# reflow pass, so that one checkpoint can be sampled, evaluated and reflowed in many ways.
RUNTIME_FIELDS = ("device", "dtype", "compile", "out_dir", "log_every", "eval_every", "ckpt_every",
                  "resume", "stop_step", "eval_only", "max_steps", "cfg_w", "solver", "sample_steps",
                  "eval_per_class", "eval_ws", "eval_nfe", "eval_solvers", "reflow_steps", "reflow_pairs")

# The Config defaults are the cpu preset; the others override a few fields.
PRESETS = {
    "tiny": dict(image_size=16, base_channels=8, num_levels=2, num_heads=2, n_train=128, n_test=32,
                 max_steps=6, batch_size=8, warmup_steps=2, log_every=2, ckpt_every=1000, sample_steps=2,
                 eval_per_class=2, eval_ws="0,1", eval_nfe="1,2,4", reflow_pairs=16),
    "cpu": dict(),
    "gpu": dict(image_size=32, base_channels=64, num_res_blocks=2, max_mult=4, n_train=100000, n_test=10000,
                max_steps=20000, batch_size=256, lr=5e-4, min_lr=1e-5, warmup_steps=500, ema_decay=0.9999,
                log_every=100, ckpt_every=2000, eval_per_class=32, eval_ws="0,0.5,1,2,4,8",
                eval_solvers="euler,midpoint,heun,rk4", eval_nfe="1,2,4,8,16,32,64,128"),
}


# ----------------------------------------------------------------------------------------------
# Building blocks: time embedding, residual block, self-attention (checked copies of ddpm.py)
# ----------------------------------------------------------------------------------------------

# Copied from ddpm.timestep_embedding
def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of a float time t (B,) -> (B, dim), as in the Transformer and DDPM.

    t is a float so that any parameterisation of time can be fed: DDPM passes the integer step
    index 0..T-1, flow matching passes t in [0, 1] scaled by its own factor (e.g. 1000 t).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


# Copied from ddpm.ResBlock
class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the embedding enters as a scale and shift of the second norm."""

    def __init__(self, in_channels, out_channels, emb_dim, dropout=0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(math.gcd(8, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(math.gcd(8, out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # zero-initialised last conv: every block starts as the identity (skip path), as in ADM/DiT
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


# Copied from ddpm.SelfAttention2d
class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map (SDPA), residual."""

    def __init__(self, channels, num_heads):
        super().__init__()
        assert channels % num_heads == 0, f"channels {channels} not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(math.gcd(8, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)  # (B, 3, nh, hs, HW)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # 3 x (B, nh, HW, hs)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, hs)
        h = h.transpose(2, 3).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj(h)


# ----------------------------------------------------------------------------------------------
# The model: ddpm.py's U-Net, read as a velocity field v_theta(x, t, y)
# ----------------------------------------------------------------------------------------------

# Copied from ddpm.UNet
class UNet(nn.Module):
    """Small class-conditional U-Net: forward(x (B,C,H,W), t (B,) float, y (B,) long) -> (B,C,H,W).

    Level i works at resolution H / 2**i with base_channels * min(2**i, max_mult) channels and
    num_res_blocks residual blocks; the lowest attn_levels levels and the middle add
    self-attention. Class index num_classes is the null class used for classifier-free guidance;
    y=None means unconditional.
    """

    def __init__(self, in_channels=3, base_channels=32, num_classes=21, num_levels=3, num_res_blocks=1,
                 attn_levels=1, num_heads=4, max_mult=2, dropout=0.0):
        super().__init__()
        self.num_classes = num_classes
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # row num_classes is the learned "no condition" embedding
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        chans = [base_channels * min(2 ** i, max_mult) for i in range(num_levels)]
        use_attn = [i >= num_levels - attn_levels for i in range(num_levels)]

        # every entry of self.down is one stage whose output is kept as a skip connection
        self.down = nn.ModuleList()
        skip_chans, ch = [base_channels], base_channels
        for i in range(num_levels):
            for _ in range(num_res_blocks):
                stage = [ResBlock(ch, chans[i], emb_dim, dropout)]
                ch = chans[i]
                if use_attn[i]:
                    stage.append(SelfAttention2d(ch, num_heads))
                self.down.append(nn.ModuleList(stage))
                skip_chans.append(ch)
            if i < num_levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skip_chans.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, dropout), SelfAttention2d(ch, num_heads),
                                  ResBlock(ch, ch, emb_dim, dropout)])

        # stages that start with a ResBlock consume one skip; the others upsample
        self.up = nn.ModuleList()
        for i in reversed(range(num_levels)):
            for _ in range(num_res_blocks + 1):
                stage = [ResBlock(ch + skip_chans.pop(), chans[i], emb_dim, dropout)]
                ch = chans[i]
                if use_attn[i]:
                    stage.append(SelfAttention2d(ch, num_heads))
                self.up.append(nn.ModuleList(stage))
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))

        self.out_norm = nn.GroupNorm(math.gcd(8, ch), ch)
        self.out_conv = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @staticmethod
    def _run_stage(stage, h, emb):
        for layer in stage:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x, t, y=None):
        B = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        t = t.expand(B) if t.dim() == 0 else t
        if y is None:
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype)) + self.class_emb(y)  # (B, emb_dim)

        h = self.stem(x)
        skips = [h]
        for stage in self.down:
            h = self._run_stage(stage, h, emb)
            skips.append(h)
        h = self._run_stage(self.mid, h, emb)
        for stage in self.up:
            if isinstance(stage[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = self._run_stage(stage, h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))


def build_model(cfg, num_classes, in_channels=3):
    """The velocity network; class index num_classes is the null class used for guidance."""
    return UNet(in_channels, cfg.base_channels, num_classes, cfg.num_levels, cfg.num_res_blocks,
                cfg.attn_levels, cfg.num_heads, cfg.max_mult, cfg.dropout)


# ----------------------------------------------------------------------------------------------
# The method as pure functions: path, target, times, loss, exact fields, guidance, ODE solvers
# ----------------------------------------------------------------------------------------------

def _per_sample(t, like):
    """Broadcast a per-sample time t (B,) against a batch like (B, ...)."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))  # (B, 1, ..., 1)


def interpolate(x0, x1, t):
    """Point X_t on the straight path from noise x0 (t=0) to data x1 (t=1); t is (B,)."""
    t = _per_sample(t, x1)
    # Eq (Lec15 CFM path): X_t = (1 - t) X_0 + t x_1
    return (1 - t) * x0 + t * x1


def cfm_target(x0, x1):
    """Regression target of conditional flow matching: the path's constant velocity."""
    # Eq (Lec15 CFM velocity): d/dt X_t = x_1 - X_0
    return x1 - x0


def sample_time(n, generator, device=None, schedule="uniform", loc=0.0, scale=1.0):
    """Training times t in (0, 1): U(0, 1), or logit-normal (SD3, Esser et al. 2024)."""
    if schedule == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if schedule == "logit_normal":
        # t = sigmoid(m + s n), n ~ N(0, 1): puts more weight on the hard middle of the path
        u = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(loc + scale * u)
    raise ValueError(f"--t_schedule must be 'uniform' or 'logit_normal', got {schedule!r}")


def cfm_loss(velocity, x0, x1, t):
    """L_CFM for given noise, data and times; velocity(x_t, t) is the network with its condition bound."""
    x_t = interpolate(x0, x1, t)
    # Eq (Lec15 L_CFM): E || v_theta(X_t, t) - (x_1 - X_0) ||^2
    return (velocity(x_t, t) - cfm_target(x0, x1)).pow(2).mean()


def marginal_velocity(x, t, data, min_gap=1e-6):
    """Exact marginal velocity v_t(x) = E[x_1 - X_0 | X_t = x] when p_1 is a finite data set.

    Given X_t = x, the posterior over training points is a softmax of Gaussian log-likelihoods,
    since X_t | x_1 ~ N(t x_1, (1 - t)^2 I); the velocity of each conditional path through x is
    (x_1 - x) / (1 - t). This is the field an infinitely expressive network minimising L_CFM
    would learn; integrating it reproduces training points (memorisation).
    x: (B, ...), t: (B,), data: (N, ...) with the same trailing shape.
    """
    B, N = x.shape[0], data.shape[0]
    x_flat, data_flat = x.reshape(B, -1), data.reshape(N, -1)  # (B, D), (N, D)
    gap = (1 - t).clamp_min(min_gap)[:, None]  # (B, 1)
    sq_dist = (x_flat[:, None, :] - t[:, None, None] * data_flat[None]).pow(2).sum(-1)  # (B, N)
    # posterior p(x_1 = x_i | X_t = x) with likelihood N(x; t x_i, (1 - t)^2 I), uniform prior
    weights = torch.softmax(-sq_dist / (2 * gap**2), dim=1)  # (B, N)
    x1_mean = weights @ data_flat  # (B, D)
    # marginal field (Lipman et al. 2023, Thm 1): v_t(x) = E[x_1 - X_0 | X_t = x] = (E[x_1 | x] - x) / (1 - t)
    return ((x1_mean - x_flat) / gap).reshape(x.shape)


def gaussian_velocity(x, t, mu, s):
    """Exact marginal velocity when the data are N(mu, s^2 I) (an oracle with a closed-form flow).

    (X_0, x_1) are jointly Gaussian, X_t ~ N(t mu, sigma_t^2 I) with sigma_t^2 = (1-t)^2 + t^2 s^2,
    and E[x_1 - X_0 | X_t = x] = mu + (t s^2 - (1 - t)) (x - t mu) / sigma_t^2.
    """
    t = _per_sample(t, x)
    var_t = (1 - t) ** 2 + t**2 * s**2
    return mu + (t * s**2 - (1 - t)) * (x - t * mu) / var_t


def gaussian_flow(x0, t, mu, s):
    """Exact solution of dx/dt = gaussian_velocity from x0 at time 0: X_t = t mu + sigma_t x0."""
    t = _per_sample(t, x0)
    return t * mu + torch.sqrt((1 - t) ** 2 + t**2 * s**2) * x0


# Copied from ddpm.cfg_combine with eps->v
def cfg_combine(v_cond, v_uncond, w):
    """Classifier-free guidance in the lecture's form; w = 0 is the plain conditional model."""
    # Eq (Lec15 CFG): v~ = (1 + w) v(z, c) - w v(z)
    return (1 + w) * v_cond - w * v_uncond


# Copied from ddpm.drop_condition
def drop_condition(y, p_uncond, null_class, generator=None):
    """Replace each label by the null class with probability p_uncond (classifier-free training)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)


def guided_velocity(model, y, w, null_class, time_scale=1.0):
    """Velocity field v(x, t) of a class-conditional network with classifier-free guidance w.

    Guidance evaluates the conditional and the unconditional branch in one batched call; that
    call still counts as one function evaluation of the guided field.
    """

    def velocity(x, t):
        if w == 0:
            return model(x, t * time_scale, y)
        y_null = torch.full_like(y, null_class)
        v = model(torch.cat([x, x]), torch.cat([t, t]) * time_scale, torch.cat([y, y_null]))
        v_cond, v_uncond = v.chunk(2)
        return cfg_combine(v_cond, v_uncond, w)

    return velocity


ODE_METHODS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}  # function evaluations per step


def ode_sample(velocity, x0, num_steps, method="euler", return_trajectory=False):
    """Integrate dx/dt = v(x, t) from t=0 (noise) to t=1 (data) on a uniform grid.

    Returns (x_1, nfe, trajectory): nfe counts the calls made to `velocity`, and trajectory
    is the list of the num_steps + 1 grid states (None unless asked for). Heun and RK4 evaluate
    the field at t = 1, where the optimal velocity E[x_1 - X_0 | X_1 = x] = x - E[X_0] = x no
    longer knows which noise to remove; with few steps their last stage leaves noise behind
    (EDM, Karras et al. 2022, ends Heun with an Euler step for this reason). Midpoint never
    evaluates t = 1.
    """
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose from {sorted(ODE_METHODS)}")
    if num_steps < 1:
        raise ValueError(f"the number of ODE steps must be >= 1, got {num_steps}")
    nfe = 0

    def v(x, t):
        nonlocal nfe
        nfe += 1
        return velocity(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))

    h = 1.0 / num_steps
    x = x0
    trajectory = [x0] if return_trajectory else None
    for k in range(num_steps):
        t = k * h
        if method == "euler":
            # Eq (Lec15 flow ODE): d/dt phi_t(x) = v_t(phi_t(x)), one Euler step x <- x + h v_t(x)
            x = x + h * v(x, t)
        elif method == "midpoint":
            x = x + h * v(x + 0.5 * h * v(x, t), t + 0.5 * h)
        elif method == "heun":
            k1 = v(x, t)
            k2 = v(x + h * k1, t + h)
            x = x + 0.5 * h * (k1 + k2)
        else:
            k1 = v(x, t)
            k2 = v(x + 0.5 * h * k1, t + 0.5 * h)
            k3 = v(x + 0.5 * h * k2, t + 0.5 * h)
            k4 = v(x + h * k3, t + h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if return_trajectory:
            trajectory.append(x)
    return x, nfe, trajectory


def reflow_pairs(velocity, x0, num_steps, method="euler"):
    """Couplings (X_0, X_1 = ODE(X_0)) of a trained flow, to retrain on: rectified flow (Liu et al.)."""
    x1, _, _ = ode_sample(velocity, x0, num_steps, method)
    return x0, x1


# Copied from ddpm.path_straightness
def path_straightness(traj):
    """Mean over samples of (path length / endpoint distance) - 1 along a sampling trajectory.

    traj: (K+1, B, ...) tensor or a list of K+1 tensors (B, ...), from noise (index 0) to data
    (index K). 0 for a straight path traversed in one direction; Liu et al. 2022 (arXiv 2209.03003)
    measure the same gap between the path and the straight line joining its ends.
    """
    traj = torch.stack(list(traj)) if not torch.is_tensor(traj) else traj
    traj = traj.double().flatten(2)  # (K+1, B, D)
    length = (traj[1:] - traj[:-1]).norm(dim=-1).sum(0)  # (B,)
    chord = (traj[-1] - traj[0]).norm(dim=-1)  # (B,)
    return (length / chord - 1).mean().item()


# ----------------------------------------------------------------------------------------------
# Evaluation: alignment, diversity, the sample grids and tables
# ----------------------------------------------------------------------------------------------

# Copied from ddpm.parse_list
def parse_list(text, kind, flag):
    """'1,2,4' -> [1, 2, 4], or one clear error naming the flag."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise InputError(f"--{flag} {text!r}: expected a comma-separated list of {kind.__name__} values, e.g. 1,2,4")
    return values


# Copied from ddpm.ema_update
@torch.no_grad()
def ema_update(ema, model, decay, step):
    """ema <- d ema + (1 - d) model, d = min(decay, (1 + step) / (10 + step)) so early steps count."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)


# Copied from ddpm.flops_per_image
def flops_per_image(model, images, rt):
    """Training FLOPs per image (forward + backward), counted by torch on one image; for MFU."""
    x = images_to_tensor(images).to(rt.device)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(1, device=rt.device), torch.zeros(1, dtype=torch.long, device=rt.device)).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# Copied from ddpm.alignment
def alignment(images, labels):
    """Prompt alignment: share of samples in which the detector finds the requested (shape, color)."""
    attrs = detect_attributes(images)
    return float((attrs[:, 0] * len(COLOR_NAMES) + attrs[:, 1] == np.asarray(labels)).mean())


# Copied from ddpm.diversity
def diversity(images, labels):
    """Mean pairwise RMS distance (pixels in [0, 1]) between samples of the same class, over classes."""
    x = torch.as_tensor(images).float().div(255).flatten(1)  # (N, D)
    labels = np.asarray(labels)
    per_class = [torch.pdist(x[torch.as_tensor(labels == c)]).mean().item() / math.sqrt(x.shape[1])
                 for c in np.unique(labels) if (labels == c).sum() > 1]
    return float(np.mean(per_class)) if per_class else float("nan")


# Copied from ddpm.attribute_entropy
def attribute_entropy(images, labels):
    """Entropy (bits) of the detected (size, position) within each class, averaged over classes:
    guidance that collapses a class onto a few layouts lowers it."""
    attrs, labels = detect_attributes(images), np.asarray(labels)
    out = []
    for c in np.unique(labels):
        _, counts = np.unique(attrs[labels == c][:, 2:], axis=0, return_counts=True)
        p = counts / counts.sum()
        out.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(out))


# Copied from ddpm.labelled_rows
def labelled_rows(rows, names, scale=2):
    """Rows of uint8 images (n, H, W, C), each headed by its name, as one (h, w, 3) picture."""
    width = 4 * max(len(n) for n in names) + 4
    out = []
    for images, name in zip(rows, names):
        images = np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images
        row = image_grid(np.repeat(np.repeat(images, scale, axis=1), scale, axis=2), len(images))
        head = np.full((row.shape[0], width, 3), 40, dtype=np.uint8)
        draw_text(head, name, 2, row.shape[0] // 2 - 2)
        out.append(np.concatenate([head, row], axis=1))
    return np.concatenate(out, axis=0)


# Copied from ddpm.sampling_batch
def sampling_batch(rt):
    """Images per sampling chunk: 256 on an accelerator; 32 on a CPU, where the guided batch of 64
    runs at 5.0 ms per image against 8.0 at 512 (measured: large activations are fresh pages from
    the OS on every call, a third of the time in the kernel)."""
    return 256 if rt.device.type != "cpu" else 32


@torch.no_grad()
def sample_images(model, labels, noise, cfg, rt, w, solver, steps, trajectory=False, batch_size=None):
    """Integrate the guided flow from noise (N, C, H, W) for labels (N,): uint8 images (N, H, W, C),
    the NFE per sample, and the mean path straightness when trajectory is set (else None)."""
    model.eval()
    batch_size = batch_size or sampling_batch(rt)
    images, gaps, nfe = [], [], 0
    for lo in range(0, len(labels), batch_size):
        field = guided_velocity(model, labels[lo:lo + batch_size].to(rt.device), w, model.num_classes, cfg.time_scale)

        def velocity(x, t):
            with rt.autocast():
                return field(x, t).float()

        x1, nfe, traj = ode_sample(velocity, noise[lo:lo + batch_size].to(rt.device), steps, solver, trajectory)
        images.append(tensor_to_images(x1))
        if trajectory:
            gaps.append(path_straightness(traj) * len(x1))
    return np.concatenate(images), nfe, (sum(gaps) / len(labels) if trajectory else None)


def eval_inputs(data, cfg):
    """The labels (per_class of each trained class) and the fixed noise every evaluation starts from."""
    classes = np.unique(data["train"]["labels"])  # for shapes: the 18 seen (shape, color) pairs
    labels = torch.as_tensor(np.repeat(classes, cfg.eval_per_class))
    noise = torch.randn(len(labels), data["channels"], cfg.image_size, cfg.image_size,
                        generator=torch.Generator().manual_seed(cfg.seed + 1))
    return classes, labels, noise


def evaluate(model, data, cfg, rt, write_files=True):
    """Alignment of the final sampler; with write_files also the tables (alignment and diversity
    against w, alignment against NFE per solver, straightness) and the sample grids. Every setting
    starts from the same noise and labels, so differences come from w or the solver alone."""
    classes, labels, noise = eval_inputs(data, cfg)
    score = cfg.data == "shapes"  # the detector reads only the shapes world

    def scores(images):
        out = {"diversity": diversity(images, labels)}
        return {**out, "alignment": alignment(images, labels), "attribute_entropy": attribute_entropy(images, labels)} if score else out

    cache = {}  # settings shared by the tables (e.g. the final sampler) are integrated once

    def run(w, solver, steps, trajectory=False):
        key = (w, solver, steps)
        if key not in cache or (trajectory and cache[key][2] is None):
            cache[key] = sample_images(model, labels, noise, cfg, rt, w, solver, steps, trajectory)
        return cache[key]

    images, nfe, _ = run(cfg.cfg_w, cfg.solver, cfg.sample_steps)
    metrics = {"sampler": f"{cfg.solver} {cfg.sample_steps} steps, w={cfg.cfg_w:g}", "nfe": nfe,
               "eval_samples": len(labels), **scores(images)}
    if not write_files:
        return metrics
    names = data["class_names"]
    save_png(os.path.join(cfg.out_dir, "samples.png"),
             labelled_rows(images.reshape(len(classes), cfg.eval_per_class, *images.shape[1:]), [names[c] for c in classes]))
    first = np.arange(len(classes)) * cfg.eval_per_class  # one sample per class for the sweep grids
    real = np.concatenate([np.flatnonzero(data["test"]["labels"] == c)[:cfg.eval_per_class] for c in classes])
    metrics["cfg_sweep"] = [{"w": None, **(scores(data["test"]["images"][real]) if len(real) == len(labels) else {})}]
    rows = []
    for w in parse_list(cfg.eval_ws, float, "eval_ws"):
        images, _, _ = run(w, cfg.solver, cfg.sample_steps)
        metrics["cfg_sweep"].append({"w": w, **scores(images)})
        rows.append(images[first])
    save_png(os.path.join(cfg.out_dir, "cfg_sweep.png"),
             labelled_rows(rows, [f"w={r['w']:g}" for r in metrics["cfg_sweep"][1:]]))
    rows, metrics["nfe_sweep"] = [], []
    budgets = parse_list(cfg.eval_nfe, int, "eval_nfe")
    for solver in parse_list(cfg.eval_solvers, str, "eval_solvers"):
        for budget in [b for b in budgets if b % ODE_METHODS[solver] == 0]:
            # the finest Euler grid approximates the continuous path best: straightness is read there
            trace = solver == "euler" and budget == max(budgets)
            images, nfe, gap = run(cfg.cfg_w, solver, budget // ODE_METHODS[solver], trace)
            metrics["nfe_sweep"].append({"solver": solver, "nfe": nfe, **scores(images)})
            if trace:
                metrics["straightness"] = {"value": gap, "sampler": f"euler {nfe} steps", "w": cfg.cfg_w}
            rows.append(images[first])
    save_png(os.path.join(cfg.out_dir, "nfe_sweep.png"),
             labelled_rows(rows, [f"{r['solver']} nfe {r['nfe']}" for r in metrics["nfe_sweep"]]))
    return metrics


def format_tables(metrics):
    """The evaluation as Markdown tables (the README's format)."""
    fmt = lambda r, k: f"{r[k]:.3f}" if r and k in r else "-"  # noqa: E731
    lines = []
    if "cfg_sweep" in metrics:
        lines += ["", f"guidance ({metrics['sampler'].split(', w=')[0]}, {metrics['eval_samples']} samples)",
                  "| w | alignment | diversity | attribute entropy (bits) |", "|---|---|---|---|"]
        lines += [f"| {'real test images' if r['w'] is None else format(r['w'], 'g')} | {fmt(r, 'alignment')} | "
                  f"{fmt(r, 'diversity')} | {fmt(r, 'attribute_entropy')} |" for r in metrics["cfg_sweep"]]
    if "nfe_sweep" in metrics:
        solvers = list(dict.fromkeys(r["solver"] for r in metrics["nfe_sweep"]))
        by = {(r["solver"], r["nfe"]): r for r in metrics["nfe_sweep"]}
        lines += ["", f"alignment against NFE, w = {metrics['sampler'].split('w=')[1]}",
                  "| NFE | " + " | ".join(solvers) + " |", "|---" * (len(solvers) + 1) + "|"]
        for nfe in sorted({r["nfe"] for r in metrics["nfe_sweep"]}):
            lines.append(f"| {nfe} | " + " | ".join(fmt(by.get((s, nfe)), "alignment") for s in solvers) + " |")
    for key, name in (("straightness", "straightness"), ("straightness_before_reflow", "before reflow")):
        if key in metrics:
            s = metrics[key]
            lines.append(f"{name} (path length / endpoint distance - 1, {s['sampler']}, w = {s['w']:g}): {s['value']:.4f}")
    return "\n".join(lines)


def measure_straightness(model, data, cfg, rt):
    """Straightness of the guided flow on the evaluation inputs, Euler on the largest NFE budget."""
    _, labels, noise = eval_inputs(data, cfg)
    steps = max(parse_list(cfg.eval_nfe, int, "eval_nfe"))
    gap = sample_images(model, labels, noise, cfg, rt, cfg.cfg_w, "euler", steps, trajectory=True)[2]
    return {"value": gap, "sampler": f"euler {steps} steps", "w": cfg.cfg_w}


@torch.no_grad()
def make_reflow_pairs(teacher, data, cfg, rt):
    """Couplings (X_0, X_1 = teacher's ODE(X_0), y) for reflow, guided by cfg_w; the same on every rank."""
    classes = torch.as_tensor(np.unique(data["train"]["labels"]))
    g = torch.Generator().manual_seed(cfg.seed + 2)
    labels = classes[torch.randint(len(classes), (cfg.reflow_pairs,), generator=g)]
    noise = torch.randn(cfg.reflow_pairs, data["channels"], cfg.image_size, cfg.image_size, generator=g)
    x1 = []
    for lo in range(0, cfg.reflow_pairs, 256):
        field = guided_velocity(teacher, labels[lo:lo + 256].to(rt.device), cfg.cfg_w, teacher.num_classes, cfg.time_scale)

        def velocity(x, t):
            with rt.autocast():
                return field(x, t).float()

        x1.append(reflow_pairs(velocity, noise[lo:lo + 256].to(rt.device), cfg.sample_steps, cfg.solver)[1].cpu())
    return noise, torch.cat(x1), labels


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def validate_config(cfg, data):
    """Every check that can fail before any work is done (DESIGN.md section 6)."""
    factor = 2 ** (cfg.num_levels - 1)
    if cfg.image_size % factor:
        raise InputError(f"--image_size {cfg.image_size} is not divisible by the U-Net's downsampling factor "
                         f"2**(num_levels-1) = {factor}; pick a multiple of {factor} or fewer --num_levels")
    widths = {cfg.base_channels * min(2 ** i, cfg.max_mult) for i in range(cfg.num_levels)}
    if any(c % cfg.num_heads for c in widths):
        raise InputError(f"--num_heads {cfg.num_heads} does not divide the U-Net widths {sorted(widths)}")
    if cfg.t_schedule not in ("uniform", "logit_normal"):
        raise InputError(f"--t_schedule {cfg.t_schedule}: expected uniform or logit_normal")
    for solver in [cfg.solver] + parse_list(cfg.eval_solvers, str, "eval_solvers"):
        if solver not in ODE_METHODS:
            raise InputError(f"solver {solver!r} (--solver, --eval_solvers): expected one of {', '.join(ODE_METHODS)}")
    if cfg.sample_steps < 1 or min(parse_list(cfg.eval_nfe, int, "eval_nfe")) < 1:
        raise InputError("--sample_steps and every --eval_nfe entry must be >= 1")
    parse_list(cfg.eval_ws, float, "eval_ws")
    if cfg.reflow_steps and cfg.reflow_pairs < cfg.batch_size:
        raise InputError(f"--reflow_pairs {cfg.reflow_pairs} is smaller than --batch_size {cfg.batch_size}")
    if data is not None:
        if "labels" not in data["train"]:
            raise InputError(f"--data {cfg.data}: a class-conditional flow needs a 'labels' array")
        if cfg.batch_size > len(data["train"]["labels"]):
            raise InputError(f"--batch_size {cfg.batch_size} is larger than the {len(data['train']['labels'])} "
                             f"training images; lower it or add data")


def train(cfg):
    """Train (then reflow, if asked), or with --eval_only evaluate a checkpoint; returns the final metrics."""
    t_start = time.time()
    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(cfg.resume, MODEL_NAME)
        cfg = resume_config(cfg, ckpt["config"])
    check_config(cfg)
    validate_config(cfg, None)
    rt = setup_runtime(cfg)
    try:
        data = load_data(cfg.data, cfg.image_size, cfg.n_train, cfg.n_test, cfg.seed)
        validate_config(cfg, data)
        num_classes = len(data["class_names"])
        model = build_model(cfg, num_classes, data["channels"]).to(rt.device)
        ema = copy.deepcopy(model).requires_grad_(False)
        if cfg.eval_only:
            if ckpt is None:
                raise InputError("--eval_only 1 needs --resume path/to/ckpt.pt")
            ema.load_state_dict(ckpt["ema"])
            metrics = evaluate(ema, data, cfg, rt) if rt.master else {}
            if rt.master:
                print(format_tables(metrics), flush=True)
            return finish_run(cfg, rt, metrics, t_start)
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, rt)
        start, teacher_state, metrics = 0, None, {}
        if ckpt is not None:
            for module, key in ((model, "model"), (ema, "ema"), (optimizer, "optimizer")):
                module.load_state_dict(ckpt[key])
            start, teacher_state = ckpt["step"], ckpt.get("teacher")
            metrics.update(ckpt.get("metrics", {}))
            set_rng_state(ckpt["rng"])
        run_model = prepare_model(model, rt)
        logger = Logger(cfg.out_dir, cfg, rt, append=ckpt is not None)
        logger.print(f"flow_matching: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                     f"{len(data['train']['labels'])} training images, {num_classes} classes, device {rt.device}, "
                     f"{'bf16' if rt.amp_dtype else 'fp32'}{', compiled' if rt.compile else ''}, world size {rt.world_size}")
        train_images = torch.as_tensor(data["train"]["images"])
        train_labels = torch.as_tensor(data["train"]["labels"])
        total = cfg.max_steps + cfg.reflow_steps
        end = min(cfg.stop_step, total) if cfg.stop_step else total
        flops = flops_per_image(model, train_images[:1], rt) if peak_flops(rt.device) else None
        progress, pairs = Progress(cfg, rt, logger, start, end, total, flops), None
        share = slice(rt.rank * cfg.batch_size // rt.world_size, (rt.rank + 1) * cfg.batch_size // rt.world_size)
        for step in range(start, end):
            # steps [0, max_steps) learn the flow from data, the next reflow_steps from its own couplings
            reflow = step >= cfg.max_steps
            if reflow and pairs is None:
                # Reflow (Liu et al.): the straight paths between a flow's own (X_0, ODE(X_0)) pairs
                # do not cross, so the flow retrained on them is straighter and needs fewer steps
                with progress.paused():  # time spent on the couplings is not step time
                    teacher = copy.deepcopy(ema)
                    if teacher_state is not None:
                        teacher.load_state_dict(teacher_state)
                    teacher_state = teacher.state_dict()
                    if rt.master and "straightness_before_reflow" not in metrics:
                        metrics["straightness_before_reflow"] = measure_straightness(teacher, data, cfg, rt)
                    pairs = make_reflow_pairs(teacher, data, cfg, rt)
                logger.print(f"reflow: {cfg.reflow_pairs} couplings from the flow of step {cfg.max_steps}")
            phase_step = step - cfg.max_steps if reflow else step
            lr = cosine_lr(phase_step, cfg.reflow_steps if reflow else cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # every draw is made for the global batch, then sliced: DDP sees the single-process draws
            idx = batch_indices(phase_step, cfg.reflow_pairs if reflow else len(train_labels), cfg.batch_size, cfg.seed)
            g = torch.Generator(rt.device).manual_seed(cfg.seed * 1_000_003 + step)
            if reflow:
                x0, x1, y = pairs[0][idx[share]].to(rt.device), pairs[1][idx[share]].to(rt.device), pairs[2][idx]
            else:
                x1 = images_to_tensor(train_images[idx[share]]).to(rt.device, non_blocking=True)
                # Eq (Lec15 L_CFM): X_0 ~ N(0, I), x_1 ~ data, t ~ U(0, 1) (or logit-normal)
                x0 = torch.randn((cfg.batch_size, *x1.shape[1:]), generator=g, device=rt.device)[share]
                y = train_labels[idx]
            t = sample_time(cfg.batch_size, g, rt.device, cfg.t_schedule, cfg.t_loc, cfg.t_scale)[share]
            y = drop_condition(y.to(rt.device), cfg.p_uncond, num_classes, g)[share]
            with rt.autocast():
                loss = cfm_loss(lambda x, tt: run_model(x, tt * cfg.time_scale, y).float(), x0, x1, t)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema_update(ema, model, cfg.ema_decay, step)
            done = step + 1
            ckpt_now = progress.step(done, loss, lr, phase="reflow" if reflow else "flow matching")
            if cfg.eval_every and done % cfg.eval_every == 0 and done != end and rt.master:
                with progress.paused():
                    quick = evaluate(ema, data, cfg, rt, write_files=False)
                if "alignment" in quick:
                    logger.print(f"step {done}: alignment {quick['alignment']:.3f} ({quick['sampler']})")
                    logger.log({"step": done, "alignment": quick["alignment"]})
            if ckpt_now and rt.master:
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"),
                                {"model_name": MODEL_NAME, "model": model.state_dict(), "ema": ema.state_dict(),
                                 "optimizer": optimizer.state_dict(), "step": done, "config": asdict(cfg),
                                 "rng": rng_state(), "data_position": done, "metrics": metrics,
                                 **({"teacher": teacher_state} if reflow else {})})
        if rt.master:
            metrics.update(evaluate(ema, data, cfg, rt))
            metrics.update(steps=end, final_loss=progress.loss)
            logger.print(format_tables(metrics))
            if "alignment" in metrics:
                logger.print(f"alignment {metrics['alignment']:.3f} with {metrics['sampler']} (NFE {metrics['nfe']})")
        return finish_run(cfg, rt, metrics, t_start)
    finally:
        cleanup_runtime(rt)


# Copied from vit.main
def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[0])
    try:
        return train(cfg)
    except InputError as e:
        sys.exit(f"error: {e}")


# ==============================================================================================
# Plumbing: checked copies of vit.py, the same blocks in every model file
# in the same order (the shapes world and .npz loading, runtime, logging and checkpoints, PNG and
# font). None of it is specific to this model; a reader can stop here.
# ==============================================================================================


# ---- the shapes world and .npz loading

# Copied from vit.SHAPES
SHAPES = ("circle", "square", "triangle")
# Copied from vit.COLOR_NAMES
COLOR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
# Copied from vit.COLOR_RGB
COLOR_RGB = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                      [0, 255, 255], [255, 255, 255]], dtype=np.float32)
# Copied from vit.SIZES
SIZES = ("small", "large")
# Copied from vit.POSITIONS
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
# The (shape, color) pairs never rendered in train/test: the compositional zero-shot split.
# Copied from vit.HELDOUT_PAIRS
HELDOUT_PAIRS = (("circle", "green"), ("square", "magenta"), ("triangle", "cyan"))
# Copied from vit.SPLITS
SPLITS = ("train", "test", "heldout")
# Copied from vit.HALF_EXTENT
HALF_EXTENT = (0.25, 0.40)  # half the shape's side, as a fraction of a grid cell, small / large
# Copied from vit.JITTER
JITTER = 0.08  # uniform jitter of the centre, as a fraction of a grid cell
# How often a caption names the shape, color, size and position, each on its own (a caption that
# would name none is redrawn): 16% of captions name just the shape and color ("a red circle"),
# 16% all four, 4% only the color.
# Copied from vit.CAPTION_NAME_PROB
CAPTION_NAME_PROB = (0.8, 0.8, 0.5, 0.5)


# Copied from vit.InputError
class InputError(ValueError):
    """Bad input from the user (a flag, a data file, a checkpoint): reported as one clear line."""


# Copied from vit.shapes_class_names
def shapes_class_names():
    """Class index = shape * len(COLOR_NAMES) + color; name 'red circle'."""
    return [f"{c} {s}" for s in SHAPES for c in COLOR_NAMES]


# Copied from vit.shapes_caption
def shapes_caption(attrs, phrasing=0, named=(True, True, True, True)):
    """Plain-English caption that names the attributes (shape, color, size, position) marked in
    `named`, in one of three phrasings:
        0  "a {size} {color} {shape} at the {position}"    "a red circle", "a large shape at the top"
        1  "there is a {size} {color} {shape} in the {position}"
        2  "{size} {color} {shape} in the {position}", or without a shape "something {size} and
           {color} in the {position}"                     "something cyan in the bottom left"
    An unnamed attribute is left out; an unnamed shape reads "shape" (or "something").
    """
    shape, color, size, pos = (SHAPES[attrs[0]], COLOR_NAMES[attrs[1]], SIZES[attrs[2]], POSITIONS[attrs[3]])
    adjectives = [word for word, keep in ((size, named[2]), (color, named[1])) if keep]
    sides = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}
    where = lambda preposition: " " + sides.get(pos, f"{preposition} the {pos}") if named[3] else ""  # noqa: E731
    if phrasing % 3 == 2 and not named[0]:
        return "something" + (" " + " and ".join(adjectives) if adjectives else "") + where("in")
    noun = " ".join(adjectives + [shape if named[0] else "shape"])
    return (f"a {noun}{where('at')}", f"there is a {noun}{where('in')}", f"{noun}{where('in')}")[phrasing % 3]


# Copied from vit.shapes_attributes
def shapes_attributes(split, n, seed):
    """Attributes (n, 4) [shape, color, size, position], jitter (n, 2), phrasing (n,) and the
    attributes its caption names (n, 4) bool, of a split.

    Sample i depends only on (seed, split, i). train and test draw i.i.d. from the 18 seen
    (shape, color) pairs; heldout draws only the 3 HELDOUT_PAIRS. A caption names each attribute
    independently with CAPTION_NAME_PROB (redrawn if it would name none), in one of three
    phrasings with equal probability.
    """
    heldout = {(SHAPES.index(s), COLOR_NAMES.index(c)) for s, c in HELDOUT_PAIRS}
    all_pairs = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOR_NAMES))]
    pairs = [p for p in all_pairs if (p in heldout) == (split == "heldout")]
    attrs = np.zeros((n, 4), dtype=np.int64)
    jitter = np.zeros((n, 2), dtype=np.float64)
    phrasing = np.zeros(n, dtype=np.int64)
    named = np.zeros((n, 4), dtype=bool)
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        attrs[i, :2] = pairs[rng.integers(len(pairs))]
        attrs[i, 2] = rng.integers(len(SIZES))
        attrs[i, 3] = rng.integers(len(POSITIONS))
        jitter[i] = rng.uniform(-JITTER, JITTER, size=2)
        phrasing[i] = rng.integers(3)
        while not named[i].any():
            named[i] = rng.random(4) < CAPTION_NAME_PROB
    return attrs, jitter, phrasing, named


# Copied from vit.shape_coverage
def shape_coverage(shape, cx, cy, h, image_size, supersample=4):
    """Share of each pixel a shape covers, (n, S, S) float32: shape index, centre (cx, cy) and
    half extent h in pixels, each (n,). Triangles point up, their base 2h wide."""
    S, ss = image_size, supersample
    fine = (np.arange(S * ss) + 0.5) / ss  # sub-pixel centres in pixel units
    out = np.zeros((len(shape), S, S), dtype=np.float32)
    for kind in range(len(SHAPES)):  # each row's own shape only
        rows = np.flatnonzero(shape == kind)
        for lo in range(0, len(rows), 256):
            r = rows[lo:lo + 256]
            h_ = h[r, None, None]
            dy = fine[None, :, None] - cy[r, None, None]  # (n, S*ss, 1)
            dx = fine[None, None, :] - cx[r, None, None]  # (n, 1, S*ss)
            if kind == 0:
                inside = dx ** 2 + dy ** 2 <= h_ ** 2
            elif kind == 1:
                inside = (np.abs(dx) <= h_) & (np.abs(dy) <= h_)
            else:
                inside = (np.abs(dy) <= h_) & (np.abs(dx) <= (dy + h_) / 2)
            out[r] = inside.reshape(len(r), S, ss, S, ss).sum(axis=(2, 4), dtype=np.float32) / ss ** 2
    return out


# Copied from vit.render_shapes
def render_shapes(attrs, jitter, image_size):
    """Anti-aliased renders (n, S, S, 3) uint8 of one shape each on a black background."""
    cell = image_size / 3.0
    cy = (attrs[:, 3] // 3 + 0.5 + jitter[:, 0]) * cell
    cx = (attrs[:, 3] % 3 + 0.5 + jitter[:, 1]) * cell
    h = np.array(HALF_EXTENT)[attrs[:, 2]] * cell
    coverage = shape_coverage(attrs[:, 0], cx, cy, h, image_size)
    return np.round(coverage[..., None] * COLOR_RGB[attrs[:, 1]][:, None, None, :]).astype(np.uint8)


# Copied from vit.detect_attributes
def detect_attributes(images):
    """Analytic detector: uint8 (n, S, S, 3) -> attributes (n, 4), all -1 where no shape is found.

    Coverage m = max channel / 255 (every palette color has a channel at 255). Color: the palette
    entry nearest to the coverage-weighted mean color. Shape and size: the best of the six
    (shape, size) templates, each rendered at the centre implied by the observed centroid, by
    L1 distance to m. Position: the grid cell of that centre. No learning involved.
    """
    x = images.astype(np.float32)
    n, S = x.shape[0], x.shape[1]
    cell = S / 3.0
    m = x.max(axis=3) / 255.0  # (n, S, S)
    m_fg = np.where(m > 0.2, m, 0.0)  # faint pixels (noise in generated samples) are background
    area = m_fg.sum(axis=(1, 2))
    safe = np.maximum(area, 1e-6)
    mean_rgb = (x * (m_fg > 0)[..., None]).sum(axis=(1, 2)) / safe[:, None]  # (n, 3)
    color = ((mean_rgb[:, None, :] - COLOR_RGB[None]) ** 2).sum(-1).argmin(axis=1)
    coords = np.arange(S) + 0.5
    cy = (m_fg.sum(axis=2) * coords).sum(axis=1) / safe
    cx = (m_fg.sum(axis=1) * coords).sum(axis=1) / safe
    errors, centres = [], []
    for shape in range(len(SHAPES)):
        for size in range(len(SIZES)):
            h = np.full(n, HALF_EXTENT[size] * cell)
            cy_shape = cy - h / 3 if shape == 2 else cy  # a triangle's centroid lies h/3 below its centre
            template = shape_coverage(np.full(n, shape), cx, cy_shape, h, S, supersample=2)
            errors.append(np.abs(template - m_fg).sum(axis=(1, 2)))
            centres.append(cy_shape)
    best = np.argmin(np.stack(errors), axis=0)  # (n,) index of shape * len(SIZES) + size
    shape, size = best // len(SIZES), best % len(SIZES)
    centre_y = np.stack(centres)[best, np.arange(n)]
    position = np.clip(centre_y // cell, 0, 2) * 3 + np.clip(cx // cell, 0, 2)
    attrs = np.stack([shape, color, size, position], axis=1).astype(np.int64)
    attrs[area < 0.5] = -1
    return attrs


# Copied from vit.shapes_split
def shapes_split(split, n, image_size, seed):
    """One split of the shapes world as a dict: images, labels, attributes, captions, and
    caption_attributes (n, 4), the attributes each caption names, -1 where it leaves one out."""
    attrs, jitter, phrasing, named = shapes_attributes(split, n, seed)
    return {"images": render_shapes(attrs, jitter, image_size),
            "labels": attrs[:, 0] * len(COLOR_NAMES) + attrs[:, 1],
            "attributes": attrs,
            "captions": [shapes_caption(a, p, m) for a, p, m in zip(attrs, phrasing, named)],
            "caption_attributes": np.where(named, attrs, -1)}


# Copied from vit.load_npz
def load_npz(path):
    """Real data: images (N, H, W, C) uint8, optional labels (N,), captions (N,), class_names."""
    if not os.path.isfile(path):
        raise InputError(f"--data {path}: no such file; pass an .npz with an 'images' array or 'shapes'")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise InputError(f"--data {path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    images = arrays.get("images")
    if images is None:
        raise InputError(f"--data {path}: missing key 'images' (found {sorted(arrays)})")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise InputError(f"--data {path}: 'images' must be uint8 (N, H, W, C) with C in (1, 3), "
                         f"got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise InputError(f"--data {path}: 'images' is empty")
    out = {"images": images}
    if "labels" in arrays:
        labels = arrays["labels"]
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise InputError(f"--data {path}: 'labels' must be non-negative integers of shape "
                             f"({len(images)},), got {labels.dtype} {labels.shape}")
        out["labels"] = labels.astype(np.int64)
        names = arrays.get("class_names")
        num_classes = int(labels.max()) + 1 if names is None else len(names)
        if labels.max() >= num_classes:
            raise InputError(f"--data {path}: a label is >= len(class_names) = {num_classes}")
        out["class_names"] = [str(s) for s in names] if names is not None else [str(i) for i in range(num_classes)]
    if "captions" in arrays:
        if arrays["captions"].shape != (len(images),):
            raise InputError(f"--data {path}: 'captions' must have shape ({len(images)},)")
        out["captions"] = [str(s) for s in arrays["captions"]]
    return out


# Copied from vit.load_data
def load_data(data, image_size, n_train, n_test, seed):
    """{'train', 'test', 'heldout' (shapes only): split dicts, 'class_names', 'channels'}."""
    if data == "shapes":
        splits = {"train": shapes_split("train", n_train, image_size, seed),
                  "test": shapes_split("test", n_test, image_size, seed),
                  "heldout": shapes_split("heldout", n_test, image_size, seed)}
        return {**splits, "class_names": shapes_class_names(), "channels": 3}
    arrays = load_npz(data)
    images = arrays["images"]
    if images.shape[1:3] != (image_size, image_size):
        raise InputError(f"--data {data}: images are {images.shape[1]}x{images.shape[2]}, but "
                         f"--image_size is {image_size}; pass --image_size {images.shape[1]} (square images only)")
    if len(images) < 2:
        raise InputError(f"--data {data}: need at least 2 images to make a train and a test split")
    # A fixed 90/10 split, the same for every seed, so that test numbers are comparable.
    order = np.random.default_rng(0).permutation(len(images))
    n_te = max(1, len(images) // 10)
    out = {"class_names": arrays.get("class_names"), "channels": images.shape[3]}
    for name, idx in (("test", order[:n_te]), ("train", order[n_te:])):
        out[name] = {k: ([v[i] for i in idx] if isinstance(v, list) else v[idx])
                     for k, v in arrays.items() if k != "class_names"}
    return out


# Copied from vit.images_to_tensor
def images_to_tensor(images):
    """uint8 (N, H, W, C) array or tensor -> float (N, C, H, W) in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# Copied from vit.tensor_to_images
def tensor_to_images(x):
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) numpy array (values clipped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# Copied from vit.batch_indices
def batch_indices(step, n, batch_size, seed, rank=0, world_size=1):
    """This rank's slice of the global batch at `step`: a fresh permutation each epoch.

    A pure function of (step, seed), so that resuming at step s sees the same data as an
    uninterrupted run, and the ranks' slices together are exactly the single-process batch.
    """
    steps_per_epoch = n // batch_size
    epoch, i = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    batch = perm[i * batch_size:(i + 1) * batch_size]
    per_rank = batch_size // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]


# ---- runtime: flags, device and precision, DDP, optimizer and schedule


# Copied from vit.config_help
def config_help(config_cls):
    """Each Config field's trailing comment, read from the source: the comment is the --help."""
    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.M)}


# Copied from vit.parse_config
def parse_config(config_cls, presets, argv=None, description=None):
    """`--preset NAME` picks the base (Config defaults are 'cpu'); `--field value` overrides it."""
    helps = config_help(config_cls)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=list(presets), default="cpu",
                        help="base configuration; flags override it (default: cpu)")

    def boolean(s):
        if s.lower() not in ("0", "1", "true", "false"):
            raise argparse.ArgumentTypeError(f"expected 0/1/true/false, got {s!r}")
        return s.lower() in ("1", "true")

    for f in fields(config_cls):
        kind = boolean if isinstance(f.default, bool) else type(f.default)
        parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                            help=f"{helps.get(f.name, '')} (default: {f.default})")
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset")
    return config_cls(**{**presets[preset], **args})


# Copied from vit.in_range
def in_range(value, spec):
    """Is a number inside a range written as '>= 1', '> 0', '[0, 1)' or '[0, 1]'? (finite only)"""
    if not math.isfinite(value):
        return False
    if spec[0] in "[(":
        low, high = (float(s) for s in spec[1:-1].split(","))
        above = low <= value if spec[0] == "[" else low < value
        return above and (value <= high if spec[-1] == "]" else value < high)
    op, bound = spec.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


# Copied from vit.check_config
def check_config(cfg):
    """The checks every file makes before any work: each numeric field inside its RANGES entry
    (an integer >= 1 or a finite float > 0 where none is listed), a global batch that divides over
    the processes, and an output directory that can be created and written."""
    for f in fields(cfg):
        if f.type not in ("int", "float"):
            continue
        value, spec = getattr(cfg, f.name), RANGES.get(f.name, ">= 1" if f.type == "int" else "> 0")
        if not in_range(value, spec):
            kind = "an integer" if f.type == "int" else "a finite number"
            raise InputError(f"--{f.name} {value}: expected {kind} {spec if spec[0] in '<>' else 'in ' + spec}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world_size:
        raise InputError(f"--batch_size {cfg.batch_size} is global and must divide evenly over {world_size} processes")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        writable = os.access(cfg.out_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise InputError(f"--out_dir {cfg.out_dir}: cannot create or write this directory; pass another --out_dir")


# Copied from vit.Runtime
@dataclass
class Runtime:
    """Where and how this process runs: device, autocast dtype, DDP rank."""
    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain fp32
    compile: bool
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


# Copied from vit.setup_runtime
def setup_runtime(cfg):
    """Device (auto: cuda > mps > cpu), precision, TF32, seeding and, under torchrun, DDP."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.device == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {cfg.device}: CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and (device.index is None or world_size > 1):
        device = torch.device("cuda", local_rank)  # set_device needs an index; one GPU per rank
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise InputError(f"--dtype {cfg.dtype}: expected auto, float32 or bfloat16")
    if cfg.compile not in ("auto", "0", "1"):
        raise InputError(f"--compile {cfg.compile}: expected auto, 0 or 1")
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # The same seed on every rank: identical initial weights; DDP also broadcasts rank 0's.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    compile_on = cfg.compile == "1" or (cfg.compile == "auto" and device.type == "cuda")
    return Runtime(device, torch.bfloat16 if bf16 else None, compile_on, rank, local_rank, world_size)


# Copied from vit.cleanup_runtime
def cleanup_runtime(rt):
    if rt.world_size > 1 and dist.is_initialized():
        dist.barrier()  # rank 0 may still be evaluating; tearing gloo down under it aborts
        # A gloo worker thread frees each finished collective after it completes, and freeing a
        # tensor that Python let go of needs the GIL; the group's destructor (run when the DDP
        # wrapper dies, after this) joins those threads while holding the GIL. Sleeping releases
        # it so the workers finish first (a two-rank test run hung there once, torch 2.13).
        time.sleep(0.1)
        dist.destroy_process_group()


# Copied from vit.prepare_model
def prepare_model(model, rt):
    """Move to the device, then compile and wrap in DDP as the runtime says; returns the model to call."""
    model.to(rt.device)
    run_model = torch.compile(model) if rt.compile else model
    if rt.world_size > 1:
        run_model = nn.parallel.DistributedDataParallel(run_model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    return run_model


# Copied from vit.make_optimizer
def make_optimizer(model, lr, weight_decay, rt, betas=(0.9, 0.999)):
    """AdamW with decay on matrices only (not norms, biases, embeddings); fused on CUDA."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "embed" not in n and "token" not in n]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=rt.device.type == "cuda")


# Copied from vit.cosine_lr
def cosine_lr(step, max_steps, lr, min_lr, warmup_steps):
    """Linear warm-up to lr, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ---- logging and checkpoints


# Copied from vit.peak_flops
def peak_flops(device):
    """Dense bf16 peak FLOP/s of known GPUs, for MFU; None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40": 181e12, "4090": 165e12, "A6000": 155e12, "3090": 71e12}
    return next((v for k, v in table.items() if k in name), None)


# Copied from vit.format_progress
def format_progress(step, total, loss, lr, ms_per_step, items_per_s, eta_s, mfu=None, unit="img"):
    """One fixed-width progress line."""
    eta = f"{int(eta_s // 3600):d}:{int(eta_s % 3600 // 60):02d}:{int(eta_s % 60):02d}"
    line = (f"step {step:>7d}/{total:<7d} | loss {loss:9.4f} | lr {lr:.2e} | {ms_per_step:8.1f} ms/step"
            f" | {items_per_s:9.1f} {unit}/s | eta {eta}")
    return line + (f" | mfu {100 * mfu:5.1f}%" if mfu is not None else "")


# Copied from vit.Logger
class Logger:
    """Rank-0 printing and a log.jsonl whose first line records the config and the versions."""

    def __init__(self, out_dir, cfg, rt, append=False):
        self.enabled = rt.master
        self.path = os.path.join(out_dir, "log.jsonl")
        if self.enabled:
            os.makedirs(out_dir, exist_ok=True)
            if not append:
                open(self.path, "w").close()
            self.log({"event": "start", "config": asdict(cfg), "argv": sys.argv, "python": sys.version.split()[0],
                      "torch": torch.__version__, "numpy": np.__version__, "device": str(rt.device),
                      "world_size": rt.world_size})

    def print(self, *args):
        if self.enabled:
            print(*args, flush=True)

    def log(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# Copied from vit.Progress
class Progress:
    """The bookkeeping after each optimizer step. At log and checkpoint steps, the only places that
    wait for the device, the loss is averaged over ranks, checked to be finite and kept in
    `self.loss`; at log steps one progress line is printed and logged, tensors in `extra` read
    then. Time spent inside `paused()` (an evaluation) is kept out of ms/step."""

    def __init__(self, cfg, rt, logger, start, end, total, flops_per_item=None, unit="img"):
        self.cfg, self.rt, self.logger = cfg, rt, logger
        self.end, self.total, self.unit = end, total, unit
        self.flops_per_item, self.peak = flops_per_item, peak_flops(rt.device)
        self.loss, self.t_log, self.step_log = None, time.time(), start

    def step(self, done, loss, lr, **extra):
        """Account for optimizer step `done` (1-based); True when a checkpoint is due."""
        log_now = done % self.cfg.log_every == 0 or done == self.end
        ckpt_now = done % self.cfg.ckpt_every == 0 or done == self.end
        if log_now or ckpt_now:
            loss_sum = loss.detach().float()
            if self.rt.world_size > 1:
                dist.all_reduce(loss_sum)
            self.loss = loss_sum.item() / self.rt.world_size
            check_finite(self.loss, done, self.cfg.out_dir)
        if log_now:
            dt = (time.time() - self.t_log) / (done - self.step_log)
            self.t_log, self.step_log = time.time(), done
            per_s = self.cfg.batch_size / dt
            known = self.peak and self.flops_per_item
            mfu = self.flops_per_item * per_s / (self.peak * self.rt.world_size) if known else None
            self.logger.print(format_progress(done, self.total, self.loss, lr, 1000 * dt, per_s, (self.end - done) * dt,
                                              mfu, self.unit))
            extra = {k: v.item() if torch.is_tensor(v) else v for k, v in extra.items()}
            self.logger.log({"step": done, "loss": self.loss, "lr": lr, "ms_per_step": 1000 * dt, **extra})
        return ckpt_now

    @contextlib.contextmanager
    def paused(self):
        t = time.time()
        try:
            yield
        finally:
            self.t_log += time.time() - t


# Copied from vit.finish_run
def finish_run(cfg, rt, metrics, t_start):
    """Rank 0 adds the wall time and writes metrics.json; every rank returns the metrics."""
    if rt.master:
        metrics["wall_time_s"] = time.time() - t_start
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


# Copied from vit.check_finite
def check_finite(loss_value, step, out_dir):
    """Stop on a non-finite loss, leaving the last checkpoint (written only at finite steps) intact."""
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"non-finite loss ({loss_value}) at step {step}; the last good checkpoint "
                                 f"is {os.path.join(out_dir, 'ckpt.pt')} if one was written; lower --lr")


# Copied from vit.rng_state
def rng_state():
    """Every RNG this process uses, as plain data (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


# Copied from vit.set_rng_state
def set_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Copied from vit.save_checkpoint
def save_checkpoint(path, state):
    """Atomic: write a temporary file, then rename it over the old checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


# Copied from vit.load_checkpoint
def load_checkpoint(path, model_name):
    """Load with weights_only=True and check that it is a checkpoint of this model."""
    if not os.path.isfile(path):
        raise InputError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"--resume {path}: cannot read the checkpoint, it is corrupt or truncated "
                         f"({type(e).__name__}); use another checkpoint or start without --resume") from None
    if not isinstance(ckpt, dict) or "model_name" not in ckpt:
        raise InputError(f"--resume {path}: not a checkpoint written by this project")
    if ckpt["model_name"] != model_name:
        raise InputError(f"--resume {path}: this is a checkpoint of {ckpt['model_name']!r}, not of {model_name!r}")
    return ckpt


# Copied from vit.resume_config
def resume_config(cfg, saved):
    """The config to run with when resuming: the checkpoint's, for evaluation (only runtime fields
    taken from the command line); for training, the command line's, which must match the checkpoint."""
    if cfg.eval_only:
        known = {f.name for f in fields(cfg)}
        base = type(cfg)(**{k: v for k, v in saved.items() if k in known})
        return dataclasses.replace(base, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS if hasattr(cfg, k)})
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in asdict(cfg).items()
              if k not in RUNTIME_FIELDS and saved.get(k) != v]
    if differ:
        raise InputError(f"--resume {cfg.resume}: the checkpoint was trained with another config ("
                         + "; ".join(differ) + "); pass the same flags as the original run")
    return cfg


# ---- PNG and font


# Copied from vit.save_png
def save_png(path, image):
    """Write a uint8 (H, W, 3) or (H, W) array as a PNG with the standard library only."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    h, w = image.shape[:2]
    color_type = 2 if image.ndim == 3 else 0
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))  # filter type 0 per row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


# Copied from vit.image_grid
def image_grid(images, ncols, pad=2, pad_value=40):
    """uint8 (N, H, W, C) -> one (rows*(H+pad)+pad, ncols*(W+pad)+pad, C) picture."""
    n, h, w, c = images.shape
    nrows = (n + ncols - 1) // ncols
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    return grid


# A 3x5 bitmap font: five rows per glyph, each an octal digit of three pixels (4 = left).
# Copied from vit.FONT
FONT = dict(zip("abcdefghijklmnopqrstuvwxyz0123456789 .:-/%=<>?,()+'_", (
    "25755 65656 34443 65556 74647 74644 34553 55755 72227 11152 55655 44447 57755 65555 25552 65644 "
    "25563 65655 34216 72222 55557 55552 55775 55255 55222 71247 75557 26227 61247 61216 55711 74616 "
    "34652 71222 25252 25316 00000 00002 02020 00700 11244 51245 07070 12421 42124 61202 00024 12221 "
    "42224 02720 22000 00007").split()))


# Copied from vit.draw_text
def draw_text(canvas, text, x, y, color=(255, 255, 255), scale=1):
    """Draw text (case-insensitive) with the 3x5 font at (x, y) into a uint8 (H, W, 3) array; 4*scale px a char."""
    for i, ch in enumerate(text.lower()):
        glyph = FONT.get(ch, FONT["?"])
        for r, digit in enumerate(glyph):
            for c in range(3):
                if int(digit) & (4 >> c):
                    y0, x0 = y + r * scale, x + (4 * i + c) * scale
                    canvas[y0:y0 + scale, x0:x0 + scale] = color
    return canvas


if __name__ == "__main__":
    main()
