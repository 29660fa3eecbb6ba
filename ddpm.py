"""DDPM: class-conditional denoising diffusion in pixel space, with both kinds of guidance.

Lecture: lecture-notes.md, Lec15 "Diffusion", "Training DDPM", "Sampling", "DDPM as Score
Learning", "Conditional Generation and Guidance", "Continuous-Time View". The equations, as named
in the notes (and in the papers where the notes only name the idea):

    (Lec15 forward)        q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, (1 - alpha_t) I)  -> q_step()
    (Lec15 abar)           beta_t = 1 - alpha_t,  abar_t = prod_{i<=t} alpha_i          -> make_schedule()
    (Lec15 closed form)    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                -> q_sample()
    (DDPM posterior)       q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I)            -> q_posterior()
    (Lec15 L_simple)       E || eps - eps_theta(x_t, t) ||^2, t ~ U{1..T}               -> diffusion_loss()
    (Lec15 score)          eps = -sigma_t grad log p(z_t)                               -> eps_from_score()
    (Lec15 classifier guidance)  eps~ = eps(z, c) - w sigma_t grad log p_phi(c | z_t)   -> classifier_guidance()
    (Lec15 CFG)            eps~ = (1 + w) eps(z, c) - w eps(z)                          -> cfg_combine()
    (Lec15 sampling)       x_T ~ N(0, I), then x_{t-1} ~ p_theta(x_{t-1} | x_t)          -> ddpm_sample()
    (Lec15 probability-flow ODE)  dz = [f z - g^2 score / 2] dt; DDIM with eta = 0 is a
                           first-order discretisation of it                              -> ddim_sample()

Papers: Ho et al. 2020, DDPM (arXiv:2006.11239); Song et al. 2020, DDIM (arXiv:2010.02502);
Nichol & Dhariwal 2021, improved DDPM: cosine schedule, respacing (arXiv:2102.09672); Dhariwal &
Nichol 2021, classifier guidance (arXiv:2105.05233); Ho & Salimans 2022, classifier-free guidance
(arXiv:2207.12598); Salimans & Ho 2022, v-prediction (arXiv:2202.00512); Song et al. 2021, score
SDEs and the probability-flow ODE (arXiv:2011.13456); Liu et al. 2022, straightness (arXiv:2209.03003).

Conventions. Index convention: array index i = 0..T-1 holds the lecture's step t = i + 1, so
abar[i] = abar_{i+1}, x at index i is x_{i+1}, abar_prev[i] = abar_i, abar_0 = 1 (clean data),
and the network is told the index i (as a float) as its time. Time runs from data (t = 0) to
noise (t = T); samplers run it backwards. z_t = a_t x_0 + sigma_t eps with a_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t). The network predicts eps (default), x0 or v = a_t eps - sigma_t x_0;
the samplers convert to eps. Class index num_classes is the null class ("no condition"). Images
are float (B, C, H, W) in [-1, 1]; uint8 (N, H, W, C) on disk. NFE = network evaluations per
sample (with classifier-free guidance one evaluation is one call on a doubled batch). Shape
legend: B batch, C channels, H W image size, nh heads, hs head width, K sampler steps.

Measured (cpu preset: 24 px, 800 diffusion steps of batch 32 + 500 classifier steps, 9 min 08 s
alone on 2 CPU cores): the detector finds the requested (shape, color) in 83% of classifier-free-
guided samples (w = 2, DDIM 20 steps; 88% with 20 ancestral steps) and in 47% without guidance.
Three times the training (`--max_steps 1200 --batch_size 64`, 6-8 minutes on the faster machines
of earlier sessions, about 19 on this one) reaches 98% guided and 87% without guidance. The preset
predicts v on the cosine schedule because the lecture's eps on the linear schedule reached 26% (a
GPU check at 32 px, DDIM 50 steps, w = 2) where v on cosine reached 94%. Deterministic DDIM
paths have straightness 0.11, close to (pi/2)/sqrt(2) - 1, the value for the quarter-circle arc
z_t = a_t x_0 + sigma_t eps that DDIM traces for one data point.

Commands:
    python ddpm.py                                  # cpu preset: trains, evaluates, writes out/ddpm/
    python ddpm.py --preset gpu                     # one GPU: bf16 autocast and torch.compile
    torchrun --standalone --nproc_per_node=4 ddpm.py --preset gpu    # DDP; --batch_size is global
    python ddpm.py --eval_only 1 --resume out/ddpm/ckpt.pt           # tables: w, NFE, straightness
    python ddpm.py --eval_only 1 --resume out/ddpm/ckpt.pt --eval_steps 1,2,5,10,20,50,100,250 \\
        --eval_ws 0,0.5,1,2,4,8 --eval_cls_ws 1,3,10,30              # the README's tables
    python ddpm.py --parameterization eps --schedule linear          # the lecture's L_simple on Ho et al.'s betas
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

MODEL_NAME = "ddpm"


@dataclass
class Config:
    # model
    image_size: int = 24  # height and width in pixels; a multiple of 2 ** (num_levels - 1)
    base_channels: int = 32  # U-Net width at full resolution
    num_levels: int = 3  # U-Net resolutions, each half the previous
    num_res_blocks: int = 1  # residual blocks per level on the way down (one more on the way up)
    attn_levels: int = 1  # self-attention at the lowest this many levels (and always in the middle)
    num_heads: int = 4  # attention heads
    max_mult: int = 2  # channel multiplier cap: level i has base_channels * min(2**i, max_mult)
    dropout: float = 0.0  # dropout inside the residual blocks
    cls_channels: int = 16  # width of the noise-conditioned classifier for classifier guidance
    # method
    timesteps: int = 1000  # T, steps of the forward process
    schedule: str = "cosine"  # beta schedule: cosine (s=0.008) or linear (1e-4 to 0.02 at T=1000)
    parameterization: str = "v"  # what the network predicts: v (a eps - sigma x0), eps or x0
    p_uncond: float = 0.1  # probability of replacing the label by the null class (for guidance)
    ema_decay: float = 0.999  # EMA of the weights used for sampling (warmed up over the first steps)
    cfg_w: float = 2.0  # guidance weight w of the final samples, in eps~ = (1 + w) eps(c) - w eps
    sampler: str = "ddim"  # sampler of the final samples: ddim (eta below) or ddpm (ancestral)
    sample_steps: int = 20  # sampler steps of the final samples (respaced from T)
    eta: float = 0.0  # DDIM noise: 0 deterministic (probability-flow ODE), 1 ancestral
    variance: str = "beta_tilde"  # ancestral reverse variance: beta (upper bound) or beta_tilde (posterior)
    clip_x0: float = 1.0  # clip the predicted x0 to [-c, c] while sampling (0: off)
    cls_steps: int = 500  # optimizer steps of the noise-conditioned classifier, after max_steps
    cls_lr: float = 2e-3  # peak learning rate of the classifier
    # evaluation
    eval_per_class: int = 8  # samples per class in each evaluation setting
    eval_ws: str = "0,2"  # CFG weights of the alignment/diversity table (the README's table: 0,1,2,4)
    eval_cls_ws: str = "3"  # classifier-guidance weights (on the unconditional model) in that table
    eval_steps: str = "1,2,5,20"  # sampler steps of the alignment-vs-NFE table (DDPM and DDIM)
    # data
    data: str = "shapes"  # 'shapes' (built-in world) or a path to an .npz file with images and labels
    n_train: int = 20000  # shapes images rendered for training
    n_test: int = 2000  # shapes images rendered for the test split (and the heldout split)
    # optim
    max_steps: int = 800  # optimizer steps of the diffusion model; also the length of its cosine schedule
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
    out_dir: str = "out/ddpm"  # where ckpt.pt, log.jsonl, metrics.json and the PNGs go
    log_every: int = 50  # steps between progress lines
    eval_every: int = 0  # steps between quick alignment checks (0: only at the end)
    ckpt_every: int = 400  # steps between checkpoints (one is always written at the end)
    resume: str = ""  # checkpoint to resume training from, or to evaluate with --eval_only 1
    stop_step: int = 0  # end this run at this step although the schedule spans max_steps (0: off)
    eval_only: bool = False  # with --resume: only evaluate the checkpoint and write the grids


# The accepted range of each numeric field, checked before any work (check_config). A field not
# listed is an integer >= 1 or a finite float > 0.
RANGES = {"attn_levels": ">= 0", "dropout": "[0, 1)", "timesteps": ">= 2", "p_uncond": "[0, 1)", "ema_decay": "[0, 1]",
          "cfg_w": ">= 0", "eta": ">= 0", "clip_x0": ">= 0", "cls_steps": ">= 0", "min_lr": ">= 0",
          "warmup_steps": ">= 0", "weight_decay": ">= 0", "grad_clip": ">= 0", "seed": ">= 0", "eval_every": ">= 0",
          "stop_step": ">= 0"}

# Fields that may change when a run is resumed (any other difference is an error), and that
# --eval_only takes from the command line: vit.py's, plus the sampler, the evaluation and the
# classifier's length, so that one checkpoint can be sampled and evaluated in many ways.
RUNTIME_FIELDS = ("device", "dtype", "compile", "out_dir", "log_every", "eval_every", "ckpt_every",
                  "resume", "stop_step", "eval_only", "max_steps", "cls_steps", "cfg_w", "sampler", "sample_steps",
                  "eta", "variance", "clip_x0", "eval_per_class", "eval_ws", "eval_cls_ws", "eval_steps")

# The Config defaults are the cpu preset; the others override a few fields.
PRESETS = {
    "tiny": dict(image_size=16, base_channels=8, num_levels=2, num_heads=2, cls_channels=4, n_train=128,
                 n_test=32, max_steps=6, cls_steps=2, batch_size=8, warmup_steps=2, log_every=2,
                 ckpt_every=1000, sample_steps=2, eval_per_class=2, eval_ws="0,1", eval_cls_ws="1",
                 eval_steps="1,2"),
    "cpu": dict(),
    "gpu": dict(image_size=32, base_channels=64, num_res_blocks=2, max_mult=4, cls_channels=32, n_train=100000,
                n_test=10000, max_steps=20000, cls_steps=3000, batch_size=256, lr=5e-4, min_lr=1e-5,
                warmup_steps=500, ema_decay=0.9999, log_every=100, ckpt_every=2000, eval_per_class=32,
                eval_ws="0,0.5,1,2,4,8", eval_cls_ws="1,3,10", eval_steps="1,2,5,10,20,50,100,250,1000"),
}


# ----------------------------------------------------------------------------------------------
# Building blocks: time embedding, residual block, self-attention
# ----------------------------------------------------------------------------------------------

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
# The model: U-Net and the noise-conditioned classifier
# ----------------------------------------------------------------------------------------------

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


class NoisyClassifier(nn.Module):
    """Time-conditioned classifier p_phi(c | z_t) for classifier guidance (Dhariwal & Nichol 2021).

    The encoder half of the U-Net's design: residual blocks that see the time embedding, average
    pooling between levels, global pooling and a linear head over the num_classes real classes.
    """

    def __init__(self, in_channels=3, base_channels=16, num_classes=21, num_levels=3):
        super().__init__()
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        chans = [base_channels * 2 ** i for i in range(num_levels)]
        self.blocks = nn.ModuleList(ResBlock(c_in, c_out, emb_dim) for c_in, c_out in zip([base_channels] + chans, chans))
        self.norm = nn.GroupNorm(math.gcd(8, chans[-1]), chans[-1])
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))  # (B, emb_dim)
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(F.avg_pool2d(h, 2) if i > 0 else h, emb)
        h = F.silu(self.norm(h)).mean(dim=(2, 3))  # (B, C)
        return self.head(h)  # (B, num_classes) logits


def build_model(cfg, num_classes, in_channels=3):
    return UNet(in_channels, cfg.base_channels, num_classes, cfg.num_levels, cfg.num_res_blocks, cfg.attn_levels,
                cfg.num_heads, cfg.max_mult, cfg.dropout)


def build_classifier(cfg, num_classes, in_channels=3):
    return NoisyClassifier(in_channels, cfg.cls_channels, num_classes, cfg.num_levels)


# ----------------------------------------------------------------------------------------------
# The method: forward process, parameterisations, losses, guidance, samplers
# ----------------------------------------------------------------------------------------------

def linear_betas(T, beta_start=1e-4, beta_end=0.02):
    """Ho et al.'s linear schedule; the end points scale with 1000 / T so abar_T stays near 0."""
    scale = 1000.0 / T
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64).clamp(max=0.999)


def cosine_betas(T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal's cosine schedule (arXiv 2102.09672): abar(t) = f(t)/f(0), f = cos^2."""
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    # Eq (Lec15 abar): abar_t = prod_i alpha_i, so beta_t = 1 - abar_t / abar_{t-1}
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def make_schedule(betas, timesteps=None, abar=None):
    """All tables of the forward process from betas (T,), in float64.

    Index convention: array index i = 0..T-1 is the lecture's step t = i + 1, so abar[i] is
    abar_{i+1} and x at index i is x_{i+1}; abar_prev[i] = abar_{i} with abar_0 = 1 (clean data).
    timesteps[i] is the time index the network is told at entry i: i itself for the full chain,
    the original index for a respaced one. abar, when given, is taken as it is rather than
    rebuilt as the product of the alphas (respacing keeps the original abar at the kept steps).
    """
    betas = betas.to(torch.float64)
    T = betas.shape[0]
    # Eq (Lec15 forward): alpha_t = 1 - beta_t
    alphas = 1 - betas
    # Eq (Lec15 abar): abar_t = prod_{i<=t} alpha_i
    abar = torch.cumprod(alphas, dim=0) if abar is None else abar.to(torch.float64)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return {
        "betas": betas,
        "alphas": alphas,
        "abar": abar,
        "abar_prev": abar_prev,
        "a": abar.sqrt(),  # a_t in z_t = a_t x_0 + sigma_t eps
        "sigma": (1 - abar).sqrt(),
        # Eq (DDPM posterior variance): beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
        "beta_tilde": betas * (1 - abar_prev) / (1 - abar),
        # Eq (DDPM posterior mean): mu_tilde = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
        #                                     + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        "coef_x0": abar_prev.sqrt() * betas / (1 - abar),
        "coef_xt": alphas.sqrt() * (1 - abar_prev) / (1 - abar),
        "timesteps": torch.arange(T) if timesteps is None else timesteps.long(),
    }


def get_schedule(kind, T):
    """The full T-step schedule of a named kind ('linear' or 'cosine')."""
    if kind == "linear":
        return make_schedule(linear_betas(T))
    if kind == "cosine":
        return make_schedule(cosine_betas(T))
    raise ValueError(f"unknown schedule {kind!r}: use 'linear' or 'cosine'")


def spaced_timesteps(T, num_steps):
    """num_steps indices out of 0..T-1, evenly spaced and always ending at T-1 (pure noise)."""
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    return ((torch.arange(1, num_steps + 1, dtype=torch.float64) * T / num_steps).round() - 1).long()


def respace(sched, num_steps):
    """The chain restricted to a subsequence tau of the time indices, betas recomputed on it.

    beta'_i = 1 - abar[tau_i] / abar[tau_{i-1}] gives the same abar at the kept times, so the
    marginals q(x_tau | x_0) and the network's inputs are unchanged (Nichol & Dhariwal 2021). The
    kept abar are passed on as they are: their product rebuilt from the beta' would differ from
    them by round-off (up to 4e-9 relative on the cosine schedule).
    """
    tau = spaced_timesteps(len(sched["betas"]), num_steps)
    abar = sched["abar"][tau]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return make_schedule(1 - abar / abar_prev, timesteps=sched["timesteps"][tau], abar=abar)


def _at(table, t, x):
    """table[t] as a (B, 1, ..., 1) tensor in x's dtype, broadcastable against x."""
    t = torch.as_tensor(t, device=table.device)
    return table[t].to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, t, eps, sched):
    """Draw x_t ~ q(x_t | x_0) in one shot; t is the array index (B,) or a scalar."""
    # Eq (Lec15 closed form): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    return _at(sched["a"], t, x0) * x0 + _at(sched["sigma"], t, x0) * eps


def q_step(x_prev, t, eps, sched):
    """One forward step x_{t-1} -> x_t (array index t), the kernel the closed form composes."""
    # Eq (Lec15 forward): q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, (1 - alpha_t) I)
    return _at(sched["alphas"], t, x_prev).sqrt() * x_prev + _at(sched["betas"], t, x_prev).sqrt() * eps


def q_posterior(x0, xt, t, sched):
    """Mean and variance of q(x_{t-1} | x_t, x_0) (x0-form)."""
    mean = _at(sched["coef_x0"], t, xt) * x0 + _at(sched["coef_xt"], t, xt) * xt
    return mean, _at(sched["beta_tilde"], t, xt)


def posterior_mean_from_eps(xt, eps, t, sched):
    """The same posterior mean written with the noise instead of x_0 (Ho et al. eq. 11)."""
    # Eq (DDPM eps-form): mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
    coef = _at(sched["betas"], t, xt) / _at(sched["sigma"], t, xt)
    return (xt - coef * eps) / _at(sched["alphas"], t, xt).sqrt()


# Parameterisations. With z = a x0 + sigma eps and a^2 + sigma^2 = 1, eps, x0, v = a eps - sigma x0
# and the score -eps / sigma are four views of one prediction; each map below is exact.

def x0_from_eps(z, eps, a, sigma):
    return (z - sigma * eps) / a


def eps_from_x0(z, x0, a, sigma):
    return (z - a * x0) / sigma


def v_from_eps_x0(eps, x0, a, sigma):
    # Eq (Salimans & Ho 2022, v-prediction): v = a_t eps - sigma_t x_0
    return a * eps - sigma * x0


def eps_from_v(z, v, a, sigma):
    return sigma * z + a * v


def x0_from_v(z, v, a, sigma):
    return a * z - sigma * v


def score_from_eps(eps, sigma):
    # Eq (Lec15 score): grad log p(z_t) = -eps / sigma_t
    return -eps / sigma


def eps_from_score(score, sigma):
    # Eq (Lec15 score): eps = -sigma_t grad log p(z_t)
    return -sigma * score


def prediction_to_eps_x0(pred, z, a, sigma, parameterization):
    """(eps, x0) implied by a network output in the given parameterisation."""
    if parameterization == "eps":
        return pred, x0_from_eps(z, pred, a, sigma)
    if parameterization == "x0":
        return eps_from_x0(z, pred, a, sigma), pred
    if parameterization == "v":
        return eps_from_v(z, pred, a, sigma), x0_from_v(z, pred, a, sigma)
    raise ValueError(f"unknown parameterization {parameterization!r}: use eps, x0 or v")


def training_target(eps, x0, a, sigma, parameterization):
    """What the network regresses on for a parameterisation."""
    return {"eps": eps, "x0": x0, "v": v_from_eps_x0(eps, x0, a, sigma)}[parameterization]


def drop_condition(y, p_uncond, null_class, generator=None):
    """Replace each label by the null class with probability p_uncond (classifier-free training)."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)


def diffusion_loss(model, x0, y, t, eps, sched, parameterization="eps"):
    """L_simple for clean images x0 (B, C, H, W), labels y (B,), steps t (B,) and noise eps."""
    zt = q_sample(x0, t, eps, sched)
    a, sigma = _at(sched["a"], t, x0), _at(sched["sigma"], t, x0)
    pred = model(zt, sched["timesteps"][t], y)
    # Eq (Lec15 L_simple): || eps - eps_theta(x_t, t) ||^2 (or its x0 / v analogue)
    return F.mse_loss(pred.float(), training_target(eps, x0, a, sigma, parameterization).float())


def classifier_loss(classifier, x0, y, t, eps, sched):
    """Cross-entropy of p_phi(y | x_t) on the images noised to steps t."""
    logits = classifier(q_sample(x0, t, eps, sched), sched["timesteps"][t])
    return F.cross_entropy(logits.float(), y)


def cfg_combine(eps_cond, eps_uncond, w):
    """Classifier-free guidance in the lecture's form; w = 0 is the plain conditional model."""
    # Eq (Lec15 CFG): eps~ = (1 + w) eps(z, c) - w eps(z)
    return (1 + w) * eps_cond - w * eps_uncond


def classifier_guidance(eps, grad_log_prob, sigma, w):
    """Classifier guidance: push eps along the classifier's score for the wanted class."""
    # Eq (Lec15 classifier guidance): eps~ = eps - w sigma_t grad_z log p_phi(c | z_t)
    return eps - w * sigma * grad_log_prob


def _at_least_fp32(x):
    """Upcast bf16/fp16 network outputs (autocast) to fp32; leave fp64 alone."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def classifier_log_prob_grad(classifier, z, t, y):
    """grad_z log p_phi(y | z_t) by autograd, one value per sample."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        log_prob = F.log_softmax(_at_least_fp32(classifier(z, t)), dim=-1)
        selected = log_prob.gather(1, y[:, None]).sum()
        return torch.autograd.grad(selected, z)[0]


def make_eps_fn(model, y, parameterization="eps", cfg_w=0.0, classifier=None, cls_w=0.0, unconditional=False):
    """eps_fn(z, t, a, sigma) for the samplers: the network at time index t, guided as asked.

    With cfg_w != 0 the conditional and unconditional passes share one batch of size 2B. The
    guidance combination is affine with weights summing to 1, so applying it to eps or to the raw
    x0 / v outputs gives the same result. unconditional: the network sees only the null class and
    the labels y steer through the classifier alone.
    """
    null = torch.full_like(y, model.num_classes)

    def eps_fn(z, t, a, sigma):
        t_vec = torch.full((z.shape[0],), float(t), device=z.device)
        if cfg_w != 0 and not unconditional:
            pred = _at_least_fp32(model(torch.cat([z, z]), torch.cat([t_vec, t_vec]), torch.cat([y, null])))
            eps, _ = prediction_to_eps_x0(pred, torch.cat([z, z]), a, sigma, parameterization)
            eps = cfg_combine(*eps.chunk(2), cfg_w)
        else:
            pred = _at_least_fp32(model(z, t_vec, null if unconditional else y))
            eps, _ = prediction_to_eps_x0(pred, z, a, sigma, parameterization)
        if classifier is not None and cls_w != 0:
            eps = classifier_guidance(eps, classifier_log_prob_grad(classifier, z, t_vec, y), sigma, cls_w)
        return eps

    return eps_fn


def ddpm_sample(eps_fn, sched, x_T, variance="beta_tilde", clip_x0=None, generator=None, return_traj=False):
    """Ancestral sampling x_T -> x_0 through p_theta(x_{t-1} | x_t) = N(mu_theta, var I).

    sched may be respaced (fewer steps, betas recomputed); variance is 'beta' (upper bound of
    the reverse variance, Ho et al.) or 'beta_tilde' (the posterior variance, lower bound).
    Returns x_0, or (x_0, [x_T, ..., x_0]) with return_traj. NFE = len(sched['betas']).
    """
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"unknown variance {variance!r}: use 'beta' or 'beta_tilde'")
    var_table = sched["betas" if variance == "beta" else "beta_tilde"]
    z, traj = x_T, [x_T]
    for i in reversed(range(len(sched["betas"]))):
        a, sigma = float(sched["a"][i]), float(sched["sigma"][i])
        eps = eps_fn(z, int(sched["timesteps"][i]), a, sigma)
        x0 = x0_from_eps(z, eps, a, sigma)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        # Eq (DDPM posterior mean): mu_theta = mu_tilde(x_t, x0_hat(x_t, eps_theta))
        mean, _ = q_posterior(x0, z, i, sched)
        if i > 0:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            # Eq (Lec15 sampling): x_{t-1} = mu_theta + sqrt(var_t) n, n ~ N(0, I)
            z = mean + float(var_table[i]) ** 0.5 * noise
        else:
            z = mean
        traj.append(z)
    return (z, traj) if return_traj else z


def ddim_sample(eps_fn, sched, x_T, eta=0.0, clip_x0=None, generator=None, return_traj=False):
    """DDIM (Song et al., arXiv 2010.02502) on a possibly respaced schedule.

    eta = 1 gives ancestral sampling with the beta_tilde variance; eta = 0 is deterministic and is
    a first-order discretisation of the probability-flow ODE dz = [f z - g^2 score / 2] dt, which
    is why its trajectories can be measured for straightness like a flow's.
    """
    z, traj = x_T, [x_T]
    for i in reversed(range(len(sched["betas"]))):
        a, sigma = float(sched["a"][i]), float(sched["sigma"][i])
        eps = eps_fn(z, int(sched["timesteps"][i]), a, sigma)
        x0 = x0_from_eps(z, eps, a, sigma)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = eps_from_x0(z, x0, a, sigma)
        abar_prev = float(sched["abar_prev"][i])
        # Eq (DDIM eq. 16): sigma_i(eta) = eta sqrt(beta_tilde_i)
        s = eta * float(sched["beta_tilde"][i]) ** 0.5
        # Eq (DDIM eq. 12): x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - s^2) eps + s n
        # Eq (Lec15 probability-flow ODE): dz = [f(t) z - g(t)^2 grad log p_t(z) / 2] dt; with s = 0
        # this step is its Euler step in (z / a_t, sigma_t / a_t), where the ODE reads d(z/a) = eps d(sigma/a)
        z = abar_prev ** 0.5 * x0 + max(1 - abar_prev - s * s, 0.0) ** 0.5 * eps
        if s > 0:
            z = z + s * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        traj.append(z)
    return (z, traj) if return_traj else z


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

def parse_list(text, kind, flag):
    """'1,2,4' -> [1, 2, 4], or one clear error naming the flag."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise InputError(f"--{flag} {text!r}: expected a comma-separated list of {kind.__name__} values, e.g. 1,2,4")
    return values


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """ema <- d ema + (1 - d) model, d = min(decay, (1 + step) / (10 + step)) so early steps count."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)


def flops_per_image(model, images, rt):
    """Training FLOPs per image (forward + backward), counted by torch on one image; for MFU."""
    x = images_to_tensor(images).to(rt.device)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(1, device=rt.device), torch.zeros(1, dtype=torch.long, device=rt.device)).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def alignment(images, labels):
    """Prompt alignment: share of samples in which the detector finds the requested (shape, color)."""
    attrs = detect_attributes(images)
    return float((attrs[:, 0] * len(COLOR_NAMES) + attrs[:, 1] == np.asarray(labels)).mean())


def diversity(images, labels):
    """Mean pairwise RMS distance (pixels in [0, 1]) between samples of the same class, over classes."""
    x = torch.as_tensor(images).float().div(255).flatten(1)  # (N, D)
    labels = np.asarray(labels)
    per_class = [torch.pdist(x[torch.as_tensor(labels == c)]).mean().item() / math.sqrt(x.shape[1])
                 for c in np.unique(labels) if (labels == c).sum() > 1]
    return float(np.mean(per_class)) if per_class else float("nan")


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


def sampling_batch(rt):
    """Images per sampling chunk: 256 on an accelerator; 32 on a CPU, where the guided batch of 64
    runs at 5.0 ms per image against 8.0 at 512 (measured: large activations are fresh pages from
    the OS on every call, a third of the time in the kernel)."""
    return 256 if rt.device.type != "cpu" else 32


@torch.no_grad()
def sample_images(model, labels, noise, cfg, rt, sampler, steps, w, classifier=None, cls_w=0.0,
                  unconditional=False, eta=0.0, batch_size=None):
    """Generate uint8 images (N, H, W, C) for labels (N,) from noise (N, C, H, W) with a sampler on
    the schedule respaced to `steps`; also the mean path straightness of deterministic DDIM."""
    model.eval()
    batch_size = batch_size or sampling_batch(rt)
    sched = respace(get_schedule(cfg.schedule, cfg.timesteps), steps)
    trace = sampler == "ddim" and eta == 0
    images, gaps = [], []
    for lo in range(0, len(labels), batch_size):
        y = labels[lo:lo + batch_size].to(rt.device)
        guided = make_eps_fn(model, y, cfg.parameterization, w, classifier, cls_w, unconditional)

        def eps_fn(z, t, a, sigma):
            with rt.autocast():
                return guided(z, t, a, sigma)

        x_T, g = noise[lo:lo + batch_size].to(rt.device), torch.Generator(rt.device).manual_seed(cfg.seed + lo)
        if sampler == "ddim":
            out = ddim_sample(eps_fn, sched, x_T, eta, cfg.clip_x0 or None, g, trace)
        else:
            out = ddpm_sample(eps_fn, sched, x_T, cfg.variance, cfg.clip_x0 or None, g)
        x, traj = out if trace else (out, None)
        images.append(tensor_to_images(x))
        if trace:
            gaps.append(path_straightness(traj) * len(x))
    return np.concatenate(images), (sum(gaps) / len(labels) if trace else None)


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


def evaluate(model, classifier, data, cfg, rt, write_files=True):
    """Alignment of the final sampler; with write_files also the tables (alignment and diversity
    against the guidance weight, alignment against NFE for DDPM and DDIM, DDIM straightness) and
    the sample grids. Every setting starts from the same noise and labels."""
    classes = np.unique(data["train"]["labels"])  # for shapes: the 18 seen (shape, color) pairs
    labels = torch.as_tensor(np.repeat(classes, cfg.eval_per_class))
    noise = torch.randn(len(labels), data["channels"], cfg.image_size, cfg.image_size,
                        generator=torch.Generator().manual_seed(cfg.seed + 1))
    score = cfg.data == "shapes"  # the detector reads only the shapes world

    def scores(images):
        out = {"diversity": diversity(images, labels)}
        return {**out, "alignment": alignment(images, labels), "attribute_entropy": attribute_entropy(images, labels)} if score else out

    cache = {}  # settings shared by the tables (e.g. the final sampler) are sampled once

    def run(sampler, steps, w, cls_w=0.0, unconditional=False, eta=cfg.eta):
        key = (sampler, steps, w, cls_w, unconditional, eta if sampler == "ddim" else None)
        if key not in cache:
            cache[key] = sample_images(model, labels, noise, cfg, rt, sampler, steps, w, classifier, cls_w, unconditional, eta)
        return cache[key]

    images, _ = run(cfg.sampler, cfg.sample_steps, cfg.cfg_w)
    metrics = {"sampler": f"{cfg.sampler} {cfg.sample_steps} steps, w={cfg.cfg_w:g}", "nfe": cfg.sample_steps,
               "eval_samples": len(labels), **scores(images)}
    if not write_files:
        return metrics
    names = data["class_names"]
    save_png(os.path.join(cfg.out_dir, "samples.png"),
             labelled_rows(images.reshape(len(classes), cfg.eval_per_class, *images.shape[1:]), [names[c] for c in classes]))
    first = np.arange(len(classes)) * cfg.eval_per_class  # one sample per class for the sweep grids
    real = np.concatenate([np.flatnonzero(data["test"]["labels"] == c)[:cfg.eval_per_class] for c in classes])
    metrics["guidance_sweep"] = [{"guidance": "real test images", "w": None,
                                  **(scores(data["test"]["images"][real]) if len(real) == len(labels) else {})}]
    rows, row_names = [], []
    settings = ([("cfg", w, w, 0.0) for w in parse_list(cfg.eval_ws, float, "eval_ws")]
                + [("classifier, unconditional model", w, 0.0, w) for w in parse_list(cfg.eval_cls_ws, float, "eval_cls_ws")])
    for kind, w, cfg_w, cls_w in settings:
        images, _ = run(cfg.sampler, cfg.sample_steps, cfg_w, cls_w, unconditional=kind != "cfg")
        metrics["guidance_sweep"].append({"guidance": kind, "w": w, **scores(images)})
        rows.append(images[first])
        row_names.append(f"{'cfg' if kind == 'cfg' else 'clf'} w={w:g}")
    save_png(os.path.join(cfg.out_dir, "guidance_sweep.png"), labelled_rows(rows, row_names))
    rows, row_names, metrics["nfe_sweep"] = [], [], []
    for sampler in ("ddpm", "ddim"):
        for steps in parse_list(cfg.eval_steps, int, "eval_steps"):
            images, gap = run(sampler, steps, cfg.cfg_w, eta=0.0)
            metrics["nfe_sweep"].append({"sampler": sampler, "steps": steps, "nfe": steps, **scores(images),
                                         **({"straightness": gap} if gap is not None else {})})
            rows.append(images[first])
            row_names.append(f"{sampler} nfe {steps}")
    save_png(os.path.join(cfg.out_dir, "nfe_sweep.png"), labelled_rows(rows, row_names))
    finest = max((r for r in metrics["nfe_sweep"] if r["sampler"] == "ddim"), key=lambda r: r["steps"])
    metrics["straightness"] = {"value": finest["straightness"], "sampler": f"ddim eta=0 {finest['steps']} steps", "w": cfg.cfg_w}
    return metrics


def format_tables(metrics):
    """The evaluation as Markdown tables (the README's format)."""
    fmt = lambda r, k: f"{r[k]:.3f}" if k in r else "-"  # noqa: E731
    lines = []
    if "guidance_sweep" in metrics:
        lines += ["", f"guidance ({metrics['sampler'].split(', w=')[0]}, {metrics['eval_samples']} samples)",
                  "| guidance | w | alignment | diversity | attribute entropy (bits) |", "|---|---|---|---|---|"]
        lines += [f"| {r['guidance']} | {'-' if r['w'] is None else format(r['w'], 'g')} | {fmt(r, 'alignment')} | "
                  f"{fmt(r, 'diversity')} | {fmt(r, 'attribute_entropy')} |" for r in metrics["guidance_sweep"]]
    if "nfe_sweep" in metrics:
        lines += ["", f"alignment against NFE, cfg w = {metrics['sampler'].split('w=')[1]}",
                  "| NFE | DDPM ancestral | DDIM (eta=0) | DDIM straightness |", "|---|---|---|---|"]
        by = {(r["sampler"], r["steps"]): r for r in metrics["nfe_sweep"]}
        for steps in dict.fromkeys(r["steps"] for r in metrics["nfe_sweep"]):
            ddpm_row, ddim_row = by[("ddpm", steps)], by[("ddim", steps)]
            lines.append(f"| {steps} | {fmt(ddpm_row, 'alignment')} | {fmt(ddim_row, 'alignment')} | {fmt(ddim_row, 'straightness')} |")
    if "straightness" in metrics:
        s = metrics["straightness"]
        lines += ["", f"straightness (path length / endpoint distance - 1, {s['sampler']}, w = {s['w']:g}): {s['value']:.4f}"]
    return "\n".join(lines)


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
    choices = {"schedule": ("linear", "cosine"), "parameterization": ("eps", "x0", "v"),
               "sampler": ("ddim", "ddpm"), "variance": ("beta", "beta_tilde")}
    for flag, allowed in choices.items():
        if getattr(cfg, flag) not in allowed:
            raise InputError(f"--{flag} {getattr(cfg, flag)}: expected one of {', '.join(allowed)}")
    steps = [cfg.sample_steps] + parse_list(cfg.eval_steps, int, "eval_steps")
    if cfg.timesteps < 2 or not all(1 <= s <= cfg.timesteps for s in steps):
        raise InputError(f"--sample_steps and every --eval_steps entry must be in [1, --timesteps {cfg.timesteps}]")
    parse_list(cfg.eval_ws, float, "eval_ws")
    parse_list(cfg.eval_cls_ws, float, "eval_cls_ws")
    if data is not None:
        if "labels" not in data["train"]:
            raise InputError(f"--data {cfg.data}: a class-conditional diffusion model needs a 'labels' array")
        if cfg.batch_size > len(data["train"]["labels"]):
            raise InputError(f"--batch_size {cfg.batch_size} is larger than the {len(data['train']['labels'])} "
                             f"training images; lower it or add data")


def train(cfg):
    """Train the diffusion model, then the noise-conditioned classifier; or with --eval_only
    evaluate a checkpoint. Returns the final metrics."""
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
        classifier = build_classifier(cfg, num_classes, data["channels"]).to(rt.device)
        ema = copy.deepcopy(model).requires_grad_(False)
        if cfg.eval_only:
            if ckpt is None:
                raise InputError("--eval_only 1 needs --resume path/to/ckpt.pt")
            ema.load_state_dict(ckpt["ema"])
            classifier.load_state_dict(ckpt["classifier"])
            metrics = evaluate(ema, classifier.eval(), data, cfg, rt) if rt.master else {}
            if rt.master:
                print(format_tables(metrics), flush=True)
            return finish_run(cfg, rt, metrics, t_start)
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, rt)
        cls_optimizer = make_optimizer(classifier, cfg.cls_lr, cfg.weight_decay, rt)
        start = 0
        if ckpt is not None:
            for module, key in ((model, "model"), (ema, "ema"), (optimizer, "optimizer"),
                                (classifier, "classifier"), (cls_optimizer, "cls_optimizer")):
                module.load_state_dict(ckpt[key])
            start = ckpt["step"]
            set_rng_state(ckpt["rng"])
        run_model, run_classifier = prepare_model(model, rt), prepare_model(classifier, rt)
        logger = Logger(cfg.out_dir, cfg, rt, append=ckpt is not None)
        logger.print(f"ddpm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
                     f"(+{sum(p.numel() for p in classifier.parameters()) / 1e6:.2f}M classifier), "
                     f"{len(data['train']['labels'])} training images, {num_classes} classes, device {rt.device}, "
                     f"{'bf16' if rt.amp_dtype else 'fp32'}{', compiled' if rt.compile else ''}, world size {rt.world_size}")
        train_images = torch.as_tensor(data["train"]["images"])
        train_labels = torch.as_tensor(data["train"]["labels"])
        # fp32 tables on the device: indexing them by t needs no transfer or sync
        sched = {k: v.to(rt.device, torch.float32 if v.is_floating_point() else v.dtype)
                 for k, v in get_schedule(cfg.schedule, cfg.timesteps).items()}
        total = cfg.max_steps + cfg.cls_steps
        end = min(cfg.stop_step, total) if cfg.stop_step else total
        flops = flops_per_image(model, train_images[:1], rt) if peak_flops(rt.device) else None
        metrics, progress = {}, Progress(cfg, rt, logger, start, end, total, flops)
        for step in range(start, end):
            # steps [0, max_steps) train the diffusion model, the next cls_steps the classifier
            diffusion = step < cfg.max_steps
            phase_step = step if diffusion else step - cfg.max_steps
            if phase_step == 0:
                logger.print("training the " + ("diffusion model" if diffusion else "noise-conditioned classifier"))
                progress.flops_per_item = flops if diffusion else None  # MFU of the diffusion model only
            net, opt = (model, optimizer) if diffusion else (classifier, cls_optimizer)
            lr = cosine_lr(phase_step, cfg.max_steps if diffusion else cfg.cls_steps, cfg.lr if diffusion else cfg.cls_lr,
                           cfg.min_lr, cfg.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            share = slice(rt.rank * cfg.batch_size // rt.world_size, (rt.rank + 1) * cfg.batch_size // rt.world_size)
            idx = batch_indices(phase_step, len(train_labels), cfg.batch_size, cfg.seed + (not diffusion))  # global batch
            x0 = images_to_tensor(train_images[idx[share]]).to(rt.device, non_blocking=True)
            y = train_labels[idx].to(rt.device, non_blocking=True)
            # noise, steps and dropout are drawn for the global batch: DDP sees the single-process ones
            g = torch.Generator(rt.device).manual_seed(cfg.seed * 1_000_003 + step)
            # Eq (Lec15 L_simple): t ~ Uniform{1..T}, eps ~ N(0, I)
            t = torch.randint(0, cfg.timesteps, (cfg.batch_size,), generator=g, device=rt.device)[share]
            eps = torch.randn((cfg.batch_size, *x0.shape[1:]), generator=g, device=rt.device)[share]
            with rt.autocast():
                if diffusion:
                    y = drop_condition(y, cfg.p_uncond, num_classes, g)[share]
                    loss = diffusion_loss(run_model, x0, y, t, eps, sched, cfg.parameterization)
                else:
                    loss = classifier_loss(run_classifier, x0, y[share], t, eps, sched)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if diffusion:
                ema_update(ema, model, cfg.ema_decay, step)
            done = step + 1
            ckpt_now = progress.step(done, loss, lr, phase="diffusion" if diffusion else "classifier")
            if cfg.eval_every and done % cfg.eval_every == 0 and done != end and rt.master and diffusion:
                with progress.paused():
                    quick = evaluate(ema, classifier, data, cfg, rt, write_files=False)
                if "alignment" in quick:
                    logger.print(f"step {done}: alignment {quick['alignment']:.3f} ({quick['sampler']})")
                    logger.log({"step": done, "alignment": quick["alignment"]})
            if ckpt_now and rt.master:
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"),
                                {"model_name": MODEL_NAME, "model": model.state_dict(), "ema": ema.state_dict(),
                                 "optimizer": optimizer.state_dict(), "classifier": classifier.state_dict(),
                                 "cls_optimizer": cls_optimizer.state_dict(), "step": done, "config": asdict(cfg),
                                 "rng": rng_state(), "data_position": done})
        if rt.master:
            metrics.update(evaluate(ema, classifier.eval(), data, cfg, rt))
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
