"""SD3-mini: text-to-image by rectified flow on an autoencoder's latents, with an MM-DiT and two text encoders.

Lecture: lecture-notes.md, Lec15 "Case Study: Stable Diffusion 3" (flow matching, latent space,
CLIP + T5 features) and "Important Extensions" (latent diffusion, DiT, ODE solvers, fewer steps).
The equations, as named in the notes and in the SD3 paper (arXiv:2403.03206):

    (Lec15 latent diffusion)   z = (E(x) - shift) * scale; x = D(z / scale + shift)
                               -> LatentAutoencoder (vqvae.py's blocks), latent_stats(), to_latent()
    (SD3 Eq. 3, RF path)       z_t = (1 - t) x_0 + t eps, noise at t = 1        -> rf_path()
    (SD3 RF target, L_RF)      E || v_theta(z_t, t, c) - (eps - x_0) ||^2       -> rf_target(), rf_loss()
    (SD3 Eq. 19, logit-normal) logit t ~ N(m, s^2)                              -> sample_time()
    (SD3 Eq. 23, time shift)   t' = s t / (1 + (s - 1) t), logit t' = logit t + log s -> shift_time()
    (Lec15 flow ODE)           dz/dt = v(z, t) from t = 1 to 0 on the shifted grid, Euler or Heun,
                               NFE counted                                      -> sigma_schedule(), sample_flow()
    (Lec15 CFG)                v~ = (1 + w) v(z, c) - w v(z, ""), each encoder dropped for ""
                               independently with p in training (SD3: 0.464)    -> cfg_combine(), drop_text()
    (MM-DiT)                   each stream its own weights, one joint attention over [text; image],
                               adaLN-Zero from time + pooled text, RMS QK-norm  -> MMDiTBlock, MMDiT
    (Lec11 CLIP, stage 1b)     L_CLIP between latents and captions pretrains the CLIP text tower,
                               then frozen                                      -> LatentCLIP, clip_loss_local()

Papers: Esser et al. 2024, SD3 (arXiv:2403.03206); Rombach et al. 2022, latent diffusion
(arXiv:2112.10752); Peebles & Xie 2023, DiT / adaLN-Zero (arXiv:2212.09748); Liu et al. 2022,
rectified flow (arXiv:2209.03003); Radford et al. 2021, CLIP (arXiv:2103.00020); Raffel et al.
2020, T5 (arXiv:1910.10683); Ho & Salimans 2022, CFG (arXiv:2207.12598); Karras et al. 2022,
EDM's Heun sampler (arXiv:2206.00364).

The pieces. Stage 1 trains vqvae.py's Gaussian autoencoder (checked copies of its encoder,
decoder and bottleneck) on an L2 + small-KL objective, unless --ae_init loads one from a vqvae.py
(--bottleneck gaussian) or sd3_mini.py checkpoint; it is frozen from then on. The latent shift and
scale (SD3's shift_factor, scaling_factor) are the mean and 1/std of all training latents,
measured when stage 1 ends. The text side is SD3's with bytes: clip.py's causal TextEncoder
(checked copy) gives its penultimate-block states and its pooled vector. SD3's CLIP is
pretrained and frozen, and so is this one: stage 1b trains it with clip.py's contrastive loss
against a small image tower on the latents (LatentCLIP; dropped afterwards), then the flow
freezes it; --clip_init loads a clip.py text tower instead (every key checked, frozen), and
--clip_steps 0 trains the tower with the MM-DiT, unfrozen. A bidirectional byte Transformer in
T5's role (no pretrained one exists here, so it trains with the MM-DiT) gives its states. The two
token sequences, zero-padded to one width, are concatenated;
every text_patch bytes become one context token by one linear map (bytes are 4-5x finer than
CLIP's and T5's subwords), and padding is masked out of the joint attention (SD3 attends to it),
so a batch is cut to its longest caption. The pooled vector joins the time embedding in adaLN.

Conventions. SD3's time: data at t = 0, noise at t = 1 (diffusers calls t sigma), velocity
eps - x_0, sampling runs from t = 1 down to 0. flow_matching.py has the lecture's direction
(noise at 0, data at 1, velocity x_1 - X_0): the same model under t_lecture = 1 - t and
v_lecture = -v (a test checks it). The logit-normal is over SD3's t (m > 0 favours noise). Heun
is EDM's: a second stage on every step but the last, which ends at t = 0 where the velocity is
undefined, so N Heun steps cost 2N - 1 NFE. With guidance one NFE is one network call on a doubled
batch. Images are float (B, C, H, W) in [-1, 1]; uint8 (N, H, W, C) on disk. Text is [BOS] bytes
[EOS] [PAD]... Shape legend: B batch, C channels the flow sees, H W its size, P patch, N image
tokens, T text bytes, D width, nh heads, hd head width, E pooled width.

Measured (cpu preset, 2-core CPU alone, the README's two commands: 4 min 16 s + 9 min 11 s):
autoencoder 33.0 dB PSNR on the test split (the detector reads 97.4% of its reconstructions);
stage 1b's text tower names the (shape, color) of 99.9% of the test latents zero-shot; the flow
(width 96, 7000 steps of batch 32, 69 ms/step) gives what prompts on seen pairs ask for in 81.6%
of samples naming shape and color ("a red circle") and 88.2% of samples naming all four
attributes (Euler 28 steps, w = 3, shift 3; 576 samples each; seed 1: 83.0% and 89.9%); color,
size and position are right in 99-100%, what is left is shape. Trained with the flow instead of
in stage 1b, the text tower learned only the colors (README, with the probes behind each choice).

Commands:
    python sd3_mini.py --stop_step 3500             # stages 1 and 1b (autoencoder, text tower) into out/sd3_mini/
    python sd3_mini.py --resume out/sd3_mini/ckpt.pt                     # stage 2, the flow, and the evaluation
    python sd3_mini.py                              # the same schedule in one command
    python sd3_mini.py --preset gpu                 # one GPU: bf16 autocast and torch.compile
    torchrun --standalone --nproc_per_node=4 sd3_mini.py --preset gpu    # DDP; --batch_size is global
    python sd3_mini.py --eval_only 1 --resume out/sd3_mini/ckpt.pt --cfg_w 1 --solver heun   # re-sample
    python sd3_mini.py --clip_init out/clip/ckpt.pt                      # frozen CLIP text tower of clip.py
    # the flow again on the same frozen stages 1 and 1b, with the timestep shift off:
    python sd3_mini.py --ae_init out/sd3_mini/ckpt.pt --clip_init out/sd3_mini/ckpt.pt --shift 1 --out_dir out/sd3_shift1
    python sd3_mini.py --space pixel --patch_size 8 --clip_init out/sd3_mini/ckpt.pt --out_dir out/sd3_pixel  # pixels
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
import textwrap
import time
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

MODEL_NAME = "sd3_mini"


@dataclass
class Config:
    # model: the MM-DiT
    image_size: int = 32  # height and width in pixels; a multiple of downsample * patch_size
    space: str = "latent"  # where the flow runs: latent (SD3: the autoencoder's latents) or pixel (same MM-DiT on pixels)
    patch_size: int = 2  # P: side of a square patch of the latent grid (of the image with --space pixel)
    pos_embed: str = "sincos"  # image-token positions: sincos (DiT, SD3: fixed 2-D sin-cos) or learned (a table from 0.02 noise)
    dim: int = 96  # D: token width of both streams
    depth: int = 4  # MM-DiT blocks
    num_heads: int = 4  # attention heads of the joint attention
    mlp_ratio: float = 2.0  # hidden width of every MLP as a multiple of its block's width
    # text encoders
    context_length: int = 56  # L: byte tokens per caption with BOS and EOS, for both encoders; a longer caption is an error
    text_patch: int = 8  # bytes per context token of the MM-DiT: each encoder's states cut into patches, one linear map (1: SD3's token per token)
    clip_dim: int = 64  # width of the CLIP text tower (taken from the checkpoint with --clip_init)
    clip_depth: int = 2  # blocks of the CLIP text tower
    clip_heads: int = 2  # attention heads of the CLIP text tower
    clip_embed_dim: int = 64  # E: width of CLIP's pooled (projected) text vector
    t5_dim: int = 64  # width of the bidirectional byte encoder in T5's role
    t5_depth: int = 2  # blocks of the T5-role encoder
    t5_heads: int = 2  # attention heads of the T5-role encoder
    clip_init: str = ""  # a clip.py (or this file's) checkpoint whose CLIP text tower to load and freeze ('': stage 1b)
    clip_steps: int = 2000  # stage 1b: CLIP's loss trains the text tower against a latent tower, then it is frozen (0: trains with the flow)
    clip_batch_size: int = 128  # global batch of stage 1b (contrastive: every other caption of the batch is a negative)
    clip_lr: float = 2e-3  # peak learning rate of stage 1b
    # autoencoder (vqvae.py's Gaussian autoencoder; stage 1)
    downsample: int = 4  # f, a power of 2: the latent grid is image_size / f on a side
    ae_channels: int = 8  # encoder/decoder width at full resolution
    ae_max_mult: int = 4  # width cap: level i has ae_channels * min(2**i, ae_max_mult) channels
    ae_res_blocks: int = 1  # residual blocks per resolution level
    latent_channels: int = 4  # C: channels of the latent grid
    kl_weight: float = 1e-3  # weight of KL(q(z|x) || N(0, I)) per subpixel next to the reconstruction error
    ae_steps: int = 1500  # optimizer steps of the autoencoder before the flow (skipped with --ae_init or --space pixel)
    ae_batch_size: int = 64  # global batch of the autoencoder (stage 1)
    ae_lr: float = 5e-3  # peak learning rate of the autoencoder
    ae_init: str = ""  # a vqvae.py (gaussian) or sd3_mini.py checkpoint whose autoencoder to load instead of stage 1
    # method
    t_schedule: str = "logit_normal"  # training times: logit_normal (SD3, m and s below) or uniform
    t_loc: float = 0.0  # logit-normal location m (over SD3's t: m > 0 favours noisier times)
    t_scale: float = 1.0  # logit-normal scale s
    shift: float = 3.0  # timestep shift s of training and sampling times, t' = s t / (1 + (s - 1) t); 1: off
    p_drop: float = 0.3  # probability of replacing each encoder's output by its output for "" (SD3: 0.464; both at once: 9 in 100)
    ema_decay: float = 0.999  # EMA of the flow model's weights used for sampling (warmed up over the first steps)
    cfg_w: float = 3.0  # guidance weight w of the final samples, in v~ = (1 + w) v(c) - w v("")
    solver: str = "euler"  # ODE solver of the final samples: euler or heun
    sample_steps: int = 28  # solver steps of the final samples (SD3's default); NFE = steps (euler), 2 steps - 1 (heun)
    # evaluation
    eval_per_prompt: int = 32  # samples per (shape, color) pair in each prompt set (32: 576 per seen set)
    eval_nfe: str = "1,2,4,8,16,28"  # NFE budgets of the alignment-vs-NFE table, e.g. 1,2,4,8,16,28 ('' : no table)
    eval_solvers: str = "euler"  # solvers of the NFE table, e.g. euler,heun
    # data
    data: str = "shapes"  # 'shapes' (built-in world) or a path to an .npz file with images and captions
    n_train: int = 20000  # shapes image-caption pairs rendered for training
    n_test: int = 2000  # shapes pairs rendered for the test split (and the heldout split)
    # optim
    max_steps: int = 7000  # optimizer steps of the flow (stage 2); also the length of its cosine schedule
    batch_size: int = 32  # global batch size of the flow (every batch size is split across DDP ranks)
    lr: float = 2e-3  # peak learning rate of the flow model
    min_lr: float = 1e-4  # learning rate at the end of each cosine decay
    warmup_steps: int = 50  # linear warm-up steps of each stage
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    # system
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA if supported, else fp32), float32, bfloat16
    compile: str = "auto"  # torch.compile: auto (on for CUDA), 1, 0
    seed: int = 0  # seed for the data, the initialisation, the noise and the training order
    # io
    out_dir: str = "out/sd3_mini"  # where ckpt.pt, log.jsonl, metrics.json and the PNGs go
    log_every: int = 50  # steps between progress lines
    eval_every: int = 0  # steps between quick alignment checks of the flow (0: only at the end)
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    resume: str = ""  # checkpoint to resume training from, or to evaluate with --eval_only 1
    stop_step: int = 0  # end this run at this step although the schedule spans ae_steps + max_steps (0: off)
    eval_only: bool = False  # with --resume: only evaluate the checkpoint and write the grids


# The accepted range of each numeric field, checked before any work (check_config). A field not
# listed is an integer >= 1 or a finite float > 0.
RANGES = {"kl_weight": ">= 0", "ae_steps": ">= 0", "clip_steps": ">= 0", "t_loc": "[-10, 10]", "p_drop": "[0, 1)",
          "ema_decay": "[0, 1]",
          "cfg_w": ">= 0", "min_lr": ">= 0", "warmup_steps": ">= 0", "weight_decay": ">= 0", "grad_clip": ">= 0",
          "seed": ">= 0", "eval_every": ">= 0", "stop_step": ">= 0"}

# Fields that may change when a run is resumed (any other difference is an error), and that
# --eval_only takes from the command line: vit.py's, plus the sampler and the evaluation.
RUNTIME_FIELDS = ("device", "dtype", "compile", "out_dir", "log_every", "eval_every", "ckpt_every",
                  "resume", "stop_step", "eval_only", "max_steps", "cfg_w", "solver", "sample_steps",
                  "eval_per_prompt", "eval_nfe", "eval_solvers")

# The Config defaults are the cpu preset; the others override a few fields.
PRESETS = {
    "tiny": dict(image_size=16, dim=32, depth=2, num_heads=2, clip_dim=32, clip_depth=1, clip_embed_dim=16,
                 t5_dim=32, t5_depth=1, ae_channels=8, ae_max_mult=2, ae_steps=2, ae_batch_size=8, clip_steps=2,
                 clip_batch_size=8, n_train=128, n_test=32,
                 max_steps=4, batch_size=8, warmup_steps=2, log_every=2, ckpt_every=1000, sample_steps=2,
                 eval_per_prompt=1, eval_nfe="1,2"),
    "cpu": dict(),
    "gpu": dict(text_patch=4, dim=384, depth=8, num_heads=6, clip_dim=256, clip_depth=4, clip_heads=4, clip_embed_dim=256,
                t5_dim=256, t5_depth=4, t5_heads=4, ae_channels=64, ae_res_blocks=2, latent_channels=8,
                ae_steps=5000, ae_batch_size=256, clip_steps=3000, clip_batch_size=1024, clip_lr=1e-3, n_train=100000,
                n_test=10000, max_steps=20000, batch_size=256, lr=5e-4, ae_lr=5e-4, min_lr=1e-5, warmup_steps=500,
                ema_decay=0.9999, log_every=100, ckpt_every=2000, eval_solvers="euler,heun"),
}


# ----------------------------------------------------------------------------------------------
# The two text encoders, as SD3 combines CLIP and T5: vit.py's Transformer block, clip.py's tokenizer
# and text tower, a bidirectional byte encoder in T5's role
# ----------------------------------------------------------------------------------------------

# Copied from vit.attention_reference
def attention_reference(q, k, v, mask=None):
    """Explicit attention; returns (output, weights). q, k, v: (B, nh, T, hd); mask: True = attend."""
    # Eq (attention, Vaswani et al.): A = softmax(Q K^T / sqrt(hd)),  out = A V
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


# Copied from vit.Attention
class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash/efficient kernels)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, return_attn=False):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        if return_attn:
            out, weights = attention_reference(q, k, v, mask)
        else:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
        out = self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        return (out, weights) if return_attn else out


# Copied from vit.MLP
class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> Linear. act='quick_gelu' is OpenAI
    CLIP's approximation x * sigmoid(1.702 x), which its released weights were trained with."""

    def __init__(self, dim, hidden, act="gelu"):
        super().__init__()
        self.quick_gelu = act == "quick_gelu"
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h))


# Copied from vit.DropPath
class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample, rescale the kept ones."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


# Copied from vit.Block
class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, norm_eps=1e-5, act="gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, round(dim * mlp_ratio), act)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, mask=None, return_attn=False):
        h = self.attn(self.norm1(x), mask, return_attn)
        h, weights = h if return_attn else (h, None)
        x = x + self.drop_path(h)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, weights) if return_attn else x


# Copied from vit.unpatchify
def unpatchify(x_p, patch_size, height, width):
    """Inverse of patchify: (B, N, P*P*C) -> (B, C, H, W)."""
    B, N, K = x_p.shape
    P = patch_size
    C = K // (P * P)
    x = x_p.reshape(B, height // P, width // P, P, P, C)  # (B, H/P, W/P, P, P, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, height, width)  # (B, C, H, W)


# Copied from clip.ByteTokenizer
class ByteTokenizer:
    """Text <-> ids with no vocabulary file: UTF-8 bytes are ids 0..255, plus three special ids.

    A text becomes [BOS] bytes... [EOS] [PAD]..., padded to `context_length`:
        0..255 = the UTF-8 bytes, pad_id = 256, bos_id = 257, eos_id = 258, vocab_size = 259.
    A text of more than context_length - 2 bytes raises ValueError, or with truncate=True keeps its
    longest prefix that ends on a whole character, so that decoding gives a prefix of the text.
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, texts, context_length, truncate=False):
        """B strings -> ids (B, context_length) long and lengths (B,) long (BOS and EOS counted)."""
        room = context_length - 2
        if room < 0:
            raise ValueError(f"context_length={context_length} leaves no room for BOS and EOS; use 2 or more")
        ids = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        lengths = torch.zeros(len(texts), dtype=torch.long)
        for row, text in enumerate(texts):
            data = text.encode("utf-8")
            if len(data) > room:
                if not truncate:
                    raise ValueError(f"a text of {len(data)} UTF-8 bytes does not fit context_length={context_length} "
                                     f"(at most {room} bytes): {text[:40]!r}...")
                # Cut before the character that straddles the limit: its continuation bytes
                # (0b10xxxxxx) must not be split from its first byte.
                cut = room
                while cut > 0 and data[cut] & 0xC0 == 0x80:
                    cut -= 1
                data = data[:cut]
            n = len(data) + 2
            ids[row, 0] = self.bos_id
            ids[row, 1:n - 1] = torch.tensor(list(data), dtype=torch.long)
            ids[row, n - 1] = self.eos_id
            lengths[row] = n
        return ids, lengths

    def decode(self, ids):
        """One sequence (1-D tensor or list) -> str: skips BOS and PAD, stops at the first EOS."""
        data = bytearray()
        for token in ids.tolist() if torch.is_tensor(ids) else ids:
            if token == self.eos_id:
                break
            if token < 256:
                data.append(token)
        return data.decode("utf-8", errors="replace")


# Copied from clip.TextEncoder
class TextEncoder(nn.Module):
    """f_T: a causal Transformer over byte tokens, read out at EOS, LN, projection."""

    def __init__(self, context_length, dim, depth, num_heads, mlp_ratio, embed_dim,
                 vocab_size=ByteTokenizer.vocab_size, eos_id=ByteTokenizer.eos_id):
        super().__init__()
        self.eos_id = eos_id
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, dim) * 0.01)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.ln_final = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim, bias=False)
        self.register_buffer("causal_mask", torch.ones(context_length, context_length, dtype=torch.bool).tril(),
                             persistent=False)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def tokens(self, ids, depth=None):
        """(B, T, D) per-token states after the first `depth` blocks (all by default), before
        ln_final: a text-to-image model reads them as its context (SD3 takes the penultimate)."""
        T = ids.shape[1]
        x = self.token_embed(ids) + self.pos_embed[:, :T]  # (B, T, D)
        # Causal: the state at EOS summarises BOS..EOS only, so whatever follows EOS (padding)
        # cannot change the embedding, and a batch needs no padding mask.
        mask = self.causal_mask[:T, :T]  # (T, T), True = attend
        for block in self.blocks[:depth]:
            x = block(x, mask)
        return x

    def forward(self, ids):
        x = self.tokens(ids)
        eos = (ids == self.eos_id).int().argmax(dim=1)  # (B,) position of the first EOS
        return self.proj(self.ln_final(x[torch.arange(ids.shape[0], device=ids.device), eos]))  # (B, E)


class TextEncoderT5(nn.Module):
    """T5's role in SD3: a bidirectional Transformer encoder over the same bytes, ids (B, T) -> (B, T, D).
    Every state sees the whole caption (CLIP's see only their prefix); padding is masked out as a
    key, so the text's states do not depend on the padding after it. Learned absolute positions
    stand in for T5's relative position bias."""

    def __init__(self, context_length, dim, depth, num_heads, mlp_ratio, vocab_size=ByteTokenizer.vocab_size,
                 pad_id=ByteTokenizer.pad_id):
        super().__init__()
        self.pad_id = pad_id
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, dim) * 0.01)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.ln_final = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.token_embed(ids) + self.pos_embed[:, :T]  # (B, L, D)
        keys = (ids != self.pad_id)[:, None, None, :]  # (B, 1, 1, L), True = a text token to attend to
        for block in self.blocks:
            x = block(x, keys)
        return self.ln_final(x)


# ----------------------------------------------------------------------------------------------
# Building blocks of the MM-DiT: time embedding, adaLN, joint attention, the two streams
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


def modulate(x, shift, scale):
    """adaLN: x (B, T, D) normalised without affine weights, then scaled and shifted per sample (B, D)."""
    # Eq (DiT adaLN): y = LN(x) (1 + scale(c)) + shift(c)
    return x * (1 + scale[:, None]) + shift[:, None]


def joint_attention(q, k, v, num_context, context_mask=None):
    """One attention over the concatenated sequence [context; image] of both streams.

    q, k, v: (B, nh, L + N, hd), the context's L tokens first (SD3's order). Every token attends
    to every token of both streams, except to the context tokens where context_mask (B, L) is
    False (padding); returns the context's and the image's outputs, (B, nh, L, hd), (B, nh, N, hd).
    """
    mask = None
    if context_mask is not None:
        image_keys = context_mask.new_ones(context_mask.shape[0], q.shape[2] - num_context)
        mask = torch.cat([context_mask, image_keys], dim=1)[:, None, None, :]  # (B, 1, 1, L + N)
    # Eq (MM-DiT): softmax([Q_c; Q_x] [K_c; K_x]^T / sqrt(hd)) [V_c; V_x], over both streams at once
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, L + N, hd)
    return out[:, :, :num_context], out[:, :, num_context:]


class StreamLayers(nn.Module):
    """One stream's own weights in an MM-DiT block: adaLN-Zero modulation, QKV with RMS QK-norm,
    output projection and MLP. Text and image tokens have different statistics, so SD3 gives each
    modality its own weights and lets them meet only in the joint attention. pre_only (the text
    stream of the last block, whose outputs nobody reads): only what feeds the attention."""

    def __init__(self, dim, num_heads, mlp_ratio, pre_only=False):
        super().__init__()
        self.num_heads, self.pre_only = num_heads, pre_only
        # (shift, scale) of the attention input, and unless pre_only (gate, shift, scale, gate) more
        self.modulation = nn.Linear(dim, (2 if pre_only else 6) * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        # RMS QK-norm (SD3, after Dehghani et al.): q / rms(q) * g per head keeps the logits bounded
        self.q_norm, self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6), nn.RMSNorm(dim // num_heads, eps=1e-6)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = MLP(dim, int(dim * mlp_ratio))
        # adaLN-Zero (DiT): shift, scale and gate start at 0, so the block starts as the identity
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def pre_attention(self, x, c):
        """x (B, T, D), conditioning c (B, D) -> q, k, v (B, nh, T, hd) each, and the modulation."""
        B, T, D = x.shape
        mod = self.modulation(F.silu(c)).chunk(2 if self.pre_only else 6, dim=-1)  # each (B, D)
        h = modulate(self.norm1(x), mod[0], mod[1])
        q, k, v = self.qkv(h).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        return self.q_norm(q), self.k_norm(k), v, mod

    def post_attention(self, x, attn_out, mod):
        """The residual updates, each scaled by its zero-initialised gate (adaLN-Zero)."""
        B, T, D = x.shape
        _, _, gate_attn, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_attn[:, None] * self.proj(attn_out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
    """SD3's MM-DiT block: two streams with separate weights, one joint attention."""

    def __init__(self, dim, num_heads, mlp_ratio, context_pre_only=False):
        super().__init__()
        self.context = StreamLayers(dim, num_heads, mlp_ratio, pre_only=context_pre_only)
        self.image = StreamLayers(dim, num_heads, mlp_ratio)

    def forward(self, ctx, img, c, context_mask=None):
        """ctx (B, L, D), img (B, N, D), c (B, D) -> (ctx or None after a pre-only block, img)."""
        qc, kc, vc, mod_c = self.context.pre_attention(ctx, c)
        qi, ki, vi, mod_i = self.image.pre_attention(img, c)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qc, qi), (kc, ki), (vc, vi)))  # (B, nh, L + N, hd)
        out_c, out_i = joint_attention(q, k, v, ctx.shape[1], context_mask)
        img = self.image.post_attention(img, out_i, mod_i)
        ctx = None if self.context.pre_only else self.context.post_attention(ctx, out_c, mod_c)
        return ctx, img


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm + linear map of each image token to its patch, zero-initialised."""

    def __init__(self, dim, patch_dim):
        super().__init__()
        self.modulation = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_dim)
        for layer in (self.modulation, self.linear):  # the first velocity is 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, P*P*C)


# ----------------------------------------------------------------------------------------------
# The model: MM-DiT over [text; image] tokens, the text side, the autoencoder
# ----------------------------------------------------------------------------------------------

def sincos_2d(grid, dim):
    """Fixed 2-D sin-cos positions (DiT, SD3's PatchEmbed) of a grid x grid token map, (grid^2, dim)
    in raster order: the first half of the channels embeds the row, the second half the column,
    each by timestep_embedding's sin-cos of the index."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([timestep_embedding(rows.flatten(), dim // 2),
                      timestep_embedding(cols.flatten(), dim - dim // 2)], dim=1)  # (grid^2, dim)


class MMDiT(nn.Module):
    """SD3's velocity network v_theta(z_t, t, context, pooled). Image: patches of z_t, embedded by
    a strided conv, plus fixed 2-D sin-cos positions (or a learned table). Text: the context embedded by one linear map, with no
    positions of its own (the encoders put order into their states); context_mask marks text, not
    padding. c = MLP(sin-emb(1000 t)) + MLP(pooled) drives every adaLN; all of them and the final
    layer start at zero, so every block starts as the identity and the first velocity is 0."""

    def __init__(self, input_size, patch_size, in_channels, dim, depth, num_heads, mlp_ratio, context_width,
                 pooled_dim, freq_dim=256, pos_embed="sincos"):
        super().__init__()
        self.patch_size, self.freq_dim = patch_size, freq_dim
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)  # vit.py's x_p W_e
        grid = input_size // patch_size
        if pos_embed == "sincos":  # DiT's and SD3's fixed table: every token knows its row and column from step 0
            self.register_buffer("pos_embed", sincos_2d(grid, dim)[None], persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)
        self.context_embed = nn.Linear(context_width, dim)
        self.time_embed = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.pooled_embed = nn.Sequential(nn.Linear(pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(MMDiTBlock(dim, num_heads, mlp_ratio, context_pre_only=i == depth - 1)
                                    for i in range(depth))
        self.final = FinalLayer(dim, patch_size * patch_size * in_channels)

    def forward(self, z, t, context, pooled, context_mask=None):
        """z (B, C, H, W), t (B,) in [0, 1], context (B, 2L, W), pooled (B, E) -> velocity (B, C, H, W)."""
        B, C, H, W = z.shape
        img = self.patch_embed(z).flatten(2).transpose(1, 2) + self.pos_embed  # (B, D, H/P, W/P) -> (B, N, D)
        ctx = self.context_embed(context)  # (B, 2L, D)
        # Eq (SD3 conditioning): c = MLP(emb(1000 t)) + MLP(pooled CLIP vector)
        c = self.time_embed(timestep_embedding(1000 * t, self.freq_dim)) + self.pooled_embed(pooled)  # (B, D)
        for block in self.blocks:
            ctx, img = block(ctx, img, c, context_mask)
        return unpatchify(self.final(img, c), self.patch_size, H, W)


class SD3(nn.Module):
    """The flow model: both text encoders and the MM-DiT, one module so that DDP and the EMA see
    every trained weight. `null_ids` is the empty prompt "", the null condition of guidance."""

    def __init__(self, clip_text, t5_text, dit, context_length, text_patch):
        super().__init__()
        self.clip_text, self.t5_text, self.dit, self.text_patch = clip_text, t5_text, dit, text_patch
        self.context_width = max(clip_text.ln_final.normalized_shape[0], t5_text.ln_final.normalized_shape[0])
        self.register_buffer("null_ids", ByteTokenizer().encode([""], context_length)[0], persistent=False)

    def condition(self, clip_ids, t5_ids=None):
        """Token ids (B, T) of each encoder (the same caption unless one was dropped) -> the MM-DiT's
        (context, pooled (B, E), context_mask). CLIP gives its penultimate block's token states and
        its pooled vector, the T5-role encoder its final states, as SD3 reads them."""
        t5_ids = clip_ids if t5_ids is None else t5_ids
        clip, T = self.clip_text, clip_ids.shape[1]
        # clip.tokens(ids, -1) and clip(ids) in one pass: the penultimate states, then the last block
        penultimate = clip.tokens(clip_ids, -1)  # (B, T, Dc)
        last = clip.blocks[-1](penultimate, clip.causal_mask[:T, :T])
        eos = (clip_ids == clip.eos_id).int().argmax(dim=1)  # (B,) position of the first EOS
        pooled = clip.proj(clip.ln_final(last[torch.arange(len(clip_ids), device=clip_ids.device), eos]))  # (B, E)
        context, mask = text_context([penultimate, self.t5_text(t5_ids)], [clip_ids != ByteTokenizer.pad_id,
                                     t5_ids != ByteTokenizer.pad_id], self.context_width, self.text_patch)
        return context, pooled, mask

    def forward(self, z, t, ids, keep_clip=None, keep_t5=None):
        """The training call: velocity for z_t at t given captions ids, each encoder kept where keep_*."""
        if keep_clip is not None:
            return self.dit(z, t, *self.condition(*drop_text(ids, self.null_ids, keep_clip, keep_t5)))
        return self.dit(z, t, *self.condition(ids))


def flow_geometry(cfg, image_channels):
    """(channels, side) of what the flow sees: the latent grid, or the image with --space pixel."""
    if cfg.space == "pixel":
        return image_channels, cfg.image_size
    return cfg.latent_channels, cfg.image_size // cfg.downsample


def build_model(cfg, in_channels=3, clip_arch=None):
    """The flow model (text encoders + MM-DiT); clip_arch overrides the CLIP tower's shape (--clip_init)."""
    clip_arch = clip_arch or dict(context_length=cfg.context_length, dim=cfg.clip_dim, depth=cfg.clip_depth,
                                  num_heads=cfg.clip_heads, mlp_ratio=cfg.mlp_ratio, embed_dim=cfg.clip_embed_dim)
    clip_text = TextEncoder(**clip_arch)
    t5_text = TextEncoderT5(cfg.context_length, cfg.t5_dim, cfg.t5_depth, cfg.t5_heads, cfg.mlp_ratio)
    channels, side = flow_geometry(cfg, in_channels)
    dit = MMDiT(side, cfg.patch_size, channels, cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio,
                cfg.text_patch * max(clip_arch["dim"], cfg.t5_dim), clip_arch["embed_dim"], pos_embed=cfg.pos_embed)
    return SD3(clip_text, t5_text, dit, cfg.context_length, cfg.text_patch)


# ----------------------------------------------------------------------------------------------
# Stage 1b: CLIP's objective on the latents pretrains the CLIP text tower, which then stays frozen
# ----------------------------------------------------------------------------------------------

class LatentImageEncoder(nn.Module):
    """CLIP's image tower for stage 1b, on what the flow sees: the normalised latents cut into the
    MM-DiT's patches, fixed 2-D sin-cos positions, vit.py's blocks, the mean token, LN, a
    projection to E. It only teaches the text tower and is dropped after stage 1b."""

    def __init__(self, input_size, patch_size, in_channels, dim, depth, num_heads, mlp_ratio, embed_dim):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d(input_size // patch_size, dim)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.ln_final = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim, bias=False)

    def forward(self, z):
        x = self.patch_embed(z).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_final(x.mean(dim=1)))  # (B, E)


class LatentCLIP(nn.Module):
    """Stage 1b, clip.py's model on (latent, caption) pairs: f_I the latent tower above, f_T a CLIP
    text tower of the flow model's shape (copied into the flow model, frozen, when stage 1b ends),
    unit-norm embeddings and the learnable logit scale log(1/tau).

    Why: SD3's text encoders are pretrained and frozen. A text tower trained only through the flow
    loss learned the colors here (the pooled vector drives every adaLN) but in 4000 steps neither
    where nor what to draw: shape and position stayed at chance, and the position words did not
    move the predicted latent (README). Pretrained here and frozen, the same tower gave 100% of
    size and position; fine-tuned by the flow instead, it lost them within 2000 steps."""

    def __init__(self, image_encoder, text_encoder, tau_init=0.07):
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / tau_init)))

    def forward(self, z, ids):
        """Latents (B, C, h, w), caption ids (B, T) -> unit-norm (B, E) each, and log(1/tau)."""
        return (F.normalize(self.image_encoder(z), dim=-1), F.normalize(self.text_encoder(ids), dim=-1),
                self.logit_scale)


def build_latent_clip(cfg, image_channels):
    """Stage 1b's model: this file's CLIP text tower, and a latent tower of the same width and depth."""
    channels, side = flow_geometry(cfg, image_channels)
    text = TextEncoder(cfg.context_length, cfg.clip_dim, cfg.clip_depth, cfg.clip_heads, cfg.mlp_ratio,
                       cfg.clip_embed_dim)
    image = LatentImageEncoder(side, cfg.patch_size, channels, cfg.clip_dim, cfg.clip_depth, cfg.clip_heads,
                               cfg.mlp_ratio, cfg.clip_embed_dim)
    return LatentCLIP(image, text)


@torch.no_grad()
def zero_shot_accuracy(latent_clip, latents, labels, context_length):
    """Stage 1b's check on shapes: the share of latents (n, C, h, w) whose nearest caption among
    "a {color} {shape}" of all 21 pairs is their own pair; labels (n,) = shape * 7 + color."""
    names = [f"a {color} {shape}" for shape in SHAPES for color in COLOR_NAMES]
    device = latent_clip.logit_scale.device
    text = F.normalize(latent_clip.text_encoder(tokenize(ByteTokenizer(), names, context_length).to(device)), dim=-1)
    image = torch.cat([F.normalize(latent_clip.image_encoder(z.to(device)), dim=-1) for z in latents.split(500)])
    return float(((image @ text.T).argmax(dim=1).cpu() == torch.as_tensor(labels)).float().mean())


# Copied from clip.LOGIT_SCALE_MAX
LOGIT_SCALE_MAX = math.log(100.0)  # 1/tau <= 100, so that the logits cannot blow up


# Copied from clip.clip_similarity
def clip_similarity(a, b, logit_scale):
    """Unit-norm (N, E) and (M, E) -> (N, M) logits; row i scores a_i against every b_j."""
    # Eq (Lec11 CLIP similarity): s_ij = f_I(x_i)^T f_T(y_j) / tau,  1/tau = exp(logit_scale)
    return logit_scale.exp() * a @ b.T


# Copied from clip.clip_loss
def clip_loss(logits_per_image, logits_per_text, labels):
    """Symmetric contrastive loss. logits_per_image[i, j] = s_ij (image i against text j) and
    logits_per_text[i, j] = s_ji (text i against image j); labels[i] is row i's matching column."""
    # Eq (Lec11 CLIP): L_img = -1/N sum_i log( e^{s_ii} / sum_j e^{s_ij} )
    loss_img = F.cross_entropy(logits_per_image, labels)
    # Eq (Lec11 CLIP): L_text = -1/N sum_i log( e^{s_ii} / sum_j e^{s_ji} )
    loss_text = F.cross_entropy(logits_per_text, labels)
    # Eq (Lec11 CLIP): L_CLIP = (L_img + L_text) / 2
    return (loss_img + loss_text) / 2


# Copied from clip.clip_loss_local
def clip_loss_local(image_local, text_local, image_all, text_all, logit_scale, rank):
    """One rank's share of L_CLIP (open_clip's local loss): its n rows of s and of s^T against all
    N = world * n columns. The mean over ranks equals L_CLIP of the global batch."""
    n = image_local.shape[0]
    labels = rank * n + torch.arange(n, device=image_local.device)  # where this rank's pairs sit in the gather
    logits_per_image = clip_similarity(image_local, text_all, logit_scale)  # (n, N): rows of s
    logits_per_text = clip_similarity(text_local, image_all, logit_scale)  # (n, N): rows of s^T
    return clip_loss(logits_per_image, logits_per_text, labels)


# Copied from clip.AllGatherWithGrad
class AllGatherWithGrad(torch.autograd.Function):
    """all_gather (n, E) -> (world * n, E) whose backward returns to each rank the gradient that
    all ranks' losses put on its rows. all_reduce instead of reduce_scatter, so gloo works too."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (world * n, E), in rank order

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over ranks: every rank's loss saw every rank's rows
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]  # (n, E)


# Copied from clip.gather_with_grad
def gather_with_grad(x):
    """Every rank's embeddings, differentiable; the identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return AllGatherWithGrad.apply(x)


# Copied from clip.clamp_logit_scale
def clamp_logit_scale(model):
    """After each optimizer step: 0 <= log(1/tau) <= log(100), as CLIP does."""
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)


# ----------------------------------------------------------------------------------------------
# The autoencoder: vqvae.py's conv encoder, decoder and Gaussian bottleneck
# ----------------------------------------------------------------------------------------------

# Copied from vqvae.EdgeConv2d
class EdgeConv2d(nn.Conv2d):
    """A 3x3 convolution whose border repeats the edge pixels, as Conv2d with padding_mode
    "replicate" does, but padded by concatenation: torch.compile (inductor, torch 2.13) gives the
    gradient of replication_pad2d the wrong strides and fails. Same parameters, same values."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=0)

    def forward(self, x):
        x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)  # (B, C, H + 2, W)
        x = torch.cat([x[:, :, :, :1], x, x[:, :, :, -1:]], dim=3)  # (B, C, H + 2, W + 2)
        return super().forward(x)


# Copied from vqvae.ConvResBlock
class ConvResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), a 1x1 conv on the skip path where the width changes.

    local=True drops the GroupNorms, whose statistics span the whole image, and pads by
    replicating the border, so that a uniform field stays uniform up to the edge: an output then
    depends on its receptive field only (the encoder's choice, see Encoder)."""

    def __init__(self, in_channels, out_channels, local=False):
        super().__init__()
        norm = (lambda c: nn.Identity()) if local else (lambda c: nn.GroupNorm(math.gcd(8, c), c))  # noqa: E731
        conv = EdgeConv2d if local else (lambda i, o: nn.Conv2d(i, o, 3, padding=1))  # noqa: E731
        self.norm1 = norm(in_channels)
        self.conv1 = conv(in_channels, out_channels)
        self.norm2 = norm(out_channels)
        self.conv2 = conv(out_channels, out_channels)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


# Copied from vqvae.Encoder
class Encoder(nn.Module):
    """(B, C, H, W) -> (B, latent_channels, H/f, W/f), f = 2 ** (len(channel_mults) - 1).

    Each level but the last runs num_res_blocks ConvResBlocks at width channels * channel_mults[i]
    and a stride-2 conv to the next level's width; at the latent resolution a SiLU and a 1x1 conv.
    The encoder is local: a code sees its own f x f patch and a margin (a 21 px window at f = 4),
    with no GroupNorm (its statistics mix the whole image in) and border-replicating padding. So
    the black cells away from the object all encode to the same vector and take one code. The
    usual design (GroupNorm, zero padding, 3x3 convs at the latent resolution, as in the decoder)
    gave black cells 111 of the 128 codes, depending on the object's size, color and position and
    on the cell's distance to the border (6.2 bits of code entropy on pure-black cells, 0.8 bits
    left given position, class and size), detail that the prior then had to model. The decoder
    keeps GroupNorm and a middle block at the latent resolution.
    """

    def __init__(self, in_channels, channels, channel_mults, num_res_blocks, latent_channels):
        super().__init__()
        layers, ch = [EdgeConv2d(in_channels, channels)], channels
        for i, mult in enumerate(channel_mults[:-1]):
            for _ in range(num_res_blocks):
                layers.append(ConvResBlock(ch, channels * mult, local=True))
                ch = channels * mult
            layers.append(EdgeConv2d(ch, channels * channel_mults[i + 1], stride=2))
            ch = channels * channel_mults[i + 1]
        layers.append(nn.SiLU())
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch, latent_channels, 1)

    def forward(self, x):
        return self.conv_out(self.layers(x))


# Copied from vqvae.Decoder
class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, out_channels, h*f, w*f), the encoder in mirror image:
    nearest-neighbour upsampling + conv between levels. conv_out is the last layer (VQGAN's
    adaptive weight reads its weight)."""

    def __init__(self, out_channels, channels, channel_mults, num_res_blocks, latent_channels):
        super().__init__()
        ch = channels * channel_mults[-1]
        layers = [nn.Conv2d(latent_channels, ch, 3, padding=1), ConvResBlock(ch, ch)]
        for i in reversed(range(len(channel_mults))):
            for _ in range(num_res_blocks):
                layers.append(ConvResBlock(ch, channels * channel_mults[i]))
                ch = channels * channel_mults[i]
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [nn.GroupNorm(math.gcd(8, ch), ch), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z):
        return self.conv_out(self.layers(z))


# Copied from vqvae.GaussianBottleneck
class GaussianBottleneck(nn.Module):
    """The VAE's q(z|x) = N(mean, diag(exp(logvar))) from an encoder output of 2 * latent channels:
    forward(h, noise) -> (z, mean, logvar) with z reparameterised; encode(h) -> mean (deterministic,
    e.g. the latent of a latent diffusion model)."""

    def forward(self, h, noise=None):
        mean, logvar = self.split(h)
        if noise is None:
            noise = torch.randn_like(mean)
        return reparameterize(mean, logvar, noise), mean, logvar

    @staticmethod
    def split(h):
        mean, logvar = h.chunk(2, dim=1)  # 2 x (B, D, h, w)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, h):
        return self.split(h)[0]


# Copied from vqvae.reparameterize
def reparameterize(mean, logvar, noise):
    """z = mu + sigma * eps: a sample of q(z|x) whose gradient reaches mu and sigma."""
    # Eq (Lec12 VAE, reparameterisation): z = mu + sigma eps,  eps ~ N(0, I)
    return mean + torch.exp(0.5 * logvar) * noise


# Copied from vqvae.gaussian_kl
def gaussian_kl(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample (B,), summed over the other dimensions (nats)."""
    # Eq (Lec12 VAE, closed form): KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class LatentAutoencoder(nn.Module):
    """vqvae.py's Gaussian autoencoder as latent diffusion uses it, built as vqvae.py builds it (the
    encoder emits mean and log-variance of q(z|x), the decoder mean and log-scale of p(x|z)), so
    its checkpoints load key for key. forward(x, noise) -> (decoder output, mean, logvar);
    encode(x) -> the mean of q(z|x), the latent the flow models; decode(z) -> the mean of p(x|z)."""

    def __init__(self, encoder, decoder, image_channels):
        super().__init__()
        self.encoder, self.bottleneck, self.decoder = encoder, GaussianBottleneck(), decoder
        self.image_channels = image_channels

    def forward(self, x, noise=None):
        z, mean, logvar = self.bottleneck(self.encoder(x), noise)
        return self.decoder(z), mean, logvar

    def encode(self, x):
        return self.bottleneck.encode(self.encoder(x))

    def decode(self, z):
        return self.decoder(z)[:, :self.image_channels]


def build_autoencoder(cfg, in_channels=3):
    """vqvae.py's build_model(--bottleneck gaussian) from this file's ae_* flags."""
    mults = tuple(min(2 ** i, cfg.ae_max_mult) for i in range(int(math.log2(cfg.downsample)) + 1))
    encoder = Encoder(in_channels, cfg.ae_channels, mults, cfg.ae_res_blocks, 2 * cfg.latent_channels)
    decoder = Decoder(2 * in_channels, cfg.ae_channels, mults, cfg.ae_res_blocks, cfg.latent_channels)
    return LatentAutoencoder(encoder, decoder, in_channels)


# ----------------------------------------------------------------------------------------------
# The method as pure functions: path, target, times and their shift, text dropout, guidance, solvers
# ----------------------------------------------------------------------------------------------

def rf_path(x0, eps, t):
    """Point z_t on the straight path from data x0 (t = 0) to noise eps (t = 1); t is (B,)."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))  # (B, 1, ..., 1)
    # Eq (SD3 Eq. 3, rectified flow): z_t = (1 - t) x_0 + t eps
    return (1 - t) * x0 + t * eps


def rf_target(x0, eps):
    """The velocity the network regresses on: the path's constant time derivative."""
    # Eq (SD3 RF target): d/dt z_t = eps - x_0
    return eps - x0


def rf_loss(velocity, x0, eps, t):
    """L_RF for given data, noise and times; velocity(z_t, t) is the network with its text bound."""
    # Eq (SD3 L_RF, the lecture's L_CFM in SD3's time): E || v_theta(z_t, t) - (eps - x_0) ||^2
    return (velocity(rf_path(x0, eps, t), t) - rf_target(x0, eps)).pow(2).mean()


# Copied from flow_matching.sample_time
def sample_time(n, generator, device=None, schedule="uniform", loc=0.0, scale=1.0):
    """Training times t in (0, 1): U(0, 1), or logit-normal (SD3, Esser et al. 2024)."""
    if schedule == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if schedule == "logit_normal":
        # t = sigmoid(m + s n), n ~ N(0, 1): puts more weight on the hard middle of the path
        u = torch.randn(n, generator=generator, device=device)
        return torch.sigmoid(loc + scale * u)
    raise ValueError(f"--t_schedule must be 'uniform' or 'logit_normal', got {schedule!r}")


def shift_time(t, shift):
    """SD3's resolution-dependent timestep shift; s > 1 moves every time towards noise. In log-odds
    a translation, logit t' = logit t + log s: shifts compose by multiplying, shift_{1/s} undoes
    shift_s, 0 and 1 stay put. SD3 derives s = sqrt(m/n) from keeping the uncertainty about a
    constant patch fixed when the number of values grows from n to m."""
    # Eq (SD3 Eq. 23, timestep shift): t' = s t / (1 + (s - 1) t)
    return shift * t / (1 + (shift - 1) * t)


def sigma_schedule(num_steps, shift):
    """Sampling times t_0 = 1 > t_1 > ... > t_N = 0: the uniform grid, shifted exactly once.

    Its last nonzero time is shift_s(1/N). diffusers' FlowMatchEulerDiscreteScheduler (issue
    #13243) rebuilt its grid between already-shifted end points and shifted again, so that
    schedule ended elsewhere and differed from the one the model was trained on; a test pins ours.
    """
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def drop_text(ids, null_ids, keep_clip, keep_t5):
    """Classifier-free training with two encoders (SD3): each encoder reads "" (null_ids) instead of
    the caption where its keep (B,) is False, so its outputs, tokens and (CLIP) pooled vector alike,
    become exactly its outputs for "", the null of guidance. The two are dropped independently,
    so the model learns every combination, the fully unconditional one included.
    ids (B, T), null_ids (1, >= T) -> (ids for CLIP, ids for the T5-role encoder), each (B, T)."""
    null = null_ids[:, :ids.shape[1]].expand_as(ids)  # (B, T)
    return torch.where(keep_clip[:, None], ids, null), torch.where(keep_t5[:, None], ids, null)


def text_context(states, is_text, width, patch):
    """SD3's context: each encoder's states zero-padded to a common width, concatenated along the
    sequence; here every `patch` consecutive byte states become one token, as pixels become
    patches. [(B, T, D_i)], [(B, T) bool is-text] -> context (B, n ceil(T/patch), patch * width)
    and its mask, True where a patch holds text. Padding states are zeroed (padding-invariant)."""
    context, mask = [], []
    for x, text in zip(states, is_text):
        B, T, D = x.shape
        pad = (-T) % patch
        x = F.pad(x * text[..., None], (0, width - D, 0, pad))  # (B, T + pad, width)
        context.append(x.reshape(B, (T + pad) // patch, patch * width))  # (B, ceil(T/patch), patch * width)
        mask.append(F.pad(text.float(), (0, pad)).reshape(B, -1, patch).amax(dim=-1) > 0)  # (B, ceil(T/patch))
    return torch.cat(context, dim=1), torch.cat(mask, dim=1)


# Copied from ddpm.cfg_combine with eps->v
def cfg_combine(v_cond, v_uncond, w):
    """Classifier-free guidance in the lecture's form; w = 0 is the plain conditional model."""
    # Eq (Lec15 CFG): v~ = (1 + w) v(z, c) - w v(z)
    return (1 + w) * v_cond - w * v_uncond


def guided_velocity(dit, cond, null, w):
    """Velocity field v(z, t) of the MM-DiT for a fixed text condition cond = (context, pooled,
    context_mask), guided by w against null = the same for "" (batch 1, padded to the same
    length). The conditional and the null branch run in one call on a doubled batch, which still
    counts as one function evaluation."""

    def velocity(z, t):
        if w == 0:
            return dit(z, t, *cond)
        B = z.shape[0]
        both = [torch.cat([c, n.expand(B, *n.shape[1:])]) for c, n in zip(cond, null)]
        v_cond, v_uncond = dit(torch.cat([z, z]), torch.cat([t, t]), *both).chunk(2)
        return cfg_combine(v_cond, v_uncond, w)

    return velocity


SOLVERS = ("euler", "heun")


def sample_flow(velocity, noise, times, method="euler"):
    """Integrate dz/dt = v(z, t) from z = noise at times[0] = 1 down to times[-1] = 0.

    times: the (N + 1,) grid of sigma_schedule. Euler: z <- z + (t' - t) v(z, t). Heun (EDM's
    second-order step): average v at both ends of each step, except on the last, where t' = 0
    and the velocity of the data itself is undefined. Returns (z_0, nfe), nfe counting the calls.
    """
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose from {', '.join(SOLVERS)}")
    nfe = 0

    def v(z, t):
        nonlocal nfe
        nfe += 1
        return velocity(z, torch.full((z.shape[0],), float(t), dtype=z.dtype, device=z.device))

    z = noise
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        d = v(z, t)
        # Eq (Lec15 flow ODE, one Euler step towards the data): z <- z + (t' - t) v(z, t)
        z_next = z + (t_next - t) * d
        if method == "heun" and t_next > 0:
            z_next = z + (t_next - t) * 0.5 * (d + v(z_next, t_next))
        z = z_next
    return z, nfe


@torch.no_grad()
def encode_images(ae, images, rt, batch_size=500):
    """uint8 images (n, H, W, C) -> what the flow models before normalising, (n, C, h, w) float on the
    CPU: the mean of q(z|x), or with --space pixel (ae None) the pixels themselves."""
    out = []
    for lo in range(0, len(images), batch_size):
        x = images_to_tensor(images[lo:lo + batch_size]).to(rt.device)
        with rt.autocast():
            out.append((x if ae is None else ae.encode(x)).float().cpu())
    return torch.cat(out)


def latent_stats(latents):
    """SD3's (shift_factor, scaling_factor) of a latent space: the mean and 1/std of all its values."""
    values = latents.double()
    return values.mean().item(), 1.0 / values.std().item()


def to_latent(z, stats):
    """Normalised latent the flow models: (z - shift) * scale (zero mean, unit variance)."""
    return (z - stats[0]) * stats[1]


def from_latent(z, stats):
    """Inverse of to_latent, before the decoder."""
    return z / stats[1] + stats[0]


def autoencoder_loss(x, decoder_out, mean, logvar, kl_weight):
    """Stage 1, latent diffusion's autoencoder objective: the squared error of the decoder's mean
    plus kl_weight times KL(q(z|x) || N(0, I)), both per subpixel: (loss, mse, kl). The small KL
    keeps the latent bounded and smooth without the ELBO's pull towards the prior (LDM uses 1e-6
    next to a perceptual loss), so the latent stays informative and the flow models the data."""
    x_mean = decoder_out.float()[:, :x.shape[1]]
    mse = (x_mean - x).pow(2).mean()
    kl = gaussian_kl(mean.float(), logvar.float()).mean() / x[0].numel()
    return mse + kl_weight * kl, mse, kl


# ----------------------------------------------------------------------------------------------
# Evaluation: prompts, alignment, pictures, tables
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


# Copied from clip.tokenize
def tokenize(tokenizer, texts, context_length):
    """Captions -> ids (B, T), T the longest caption's length: the columns after it are padding,
    which the causal text encoder never reads, so they are not computed at all."""
    try:
        ids, lengths = tokenizer.encode(texts, context_length)
    except ValueError as e:
        raise InputError(f"--context_length {context_length}: {e}; "
                         f"raise --context_length or shorten the captions") from None
    return ids[:, :int(lengths.max())]


ATTRIBUTES = ("shape", "color", "size", "position")
PROMPT_KINDS = ("shape+color", "all four")


def eval_sets(data, cfg):
    """{name: (prompts, asked (n, 4) or None)}. For shapes, per (shape, color) pair eval_per_prompt
    prompts of two kinds: 'shape+color' ("a red circle") and 'all four' with a random size and
    position ("a large red circle at the top left"), over the 18 seen pairs and over the 3
    heldout pairs (never seen together in training); asked holds the named attributes, -1
    elsewhere. For an .npz, test captions (no detector)."""
    if cfg.data != "shapes":
        return {"test captions": (data["test"]["captions"][:8 * cfg.eval_per_prompt], None)}
    rng = np.random.default_rng([cfg.seed, 12])
    seen = sorted({(int(s), int(c)) for s, c in data["train"]["attributes"][:, :2]})
    heldout = [(SHAPES.index(s), COLOR_NAMES.index(c)) for s, c in HELDOUT_PAIRS]
    sets = {}
    for split, pairs in (("seen", seen), ("heldout", heldout)):
        for kind in PROMPT_KINDS:
            named = (True, True, kind == "all four", kind == "all four")
            attrs = np.array([[shape, color, rng.integers(len(SIZES)), rng.integers(len(POSITIONS))]
                              for shape, color in pairs for _ in range(cfg.eval_per_prompt)])
            sets[f"{split} {kind}"] = ([shapes_caption(a, 0, named) for a in attrs], np.where(named, attrs, -1))
    return sets


def prompt_alignment(images, asked):
    """Share of samples in which the detector finds every attribute the prompt names, and the
    share per attribute among the prompts that name it. asked (n, 4), -1 = not named."""
    found = detect_attributes(images)
    hit = (asked < 0) | (found == asked)  # (n, 4)
    per_attribute = {name: float(hit[asked[:, i] >= 0, i].mean())
                     for i, name in enumerate(ATTRIBUTES) if (asked[:, i] >= 0).any()}
    return float(hit.all(axis=1).mean()), per_attribute, hit.all(axis=1)


@torch.no_grad()
def sample_images(model, ae, stats, prompts, noise, cfg, rt, w, solver, steps, batch_size=128):
    """Images uint8 (n, H, W, C) for n prompts from noise (n, C, h, w), and the NFE per sample."""
    model.eval()
    tokenizer, times, out, nfe = ByteTokenizer(), sigma_schedule(steps, cfg.shift), [], 0
    for lo in range(0, len(prompts), batch_size):
        ids = tokenize(tokenizer, prompts[lo:lo + batch_size], cfg.context_length).to(rt.device)
        with rt.autocast():
            cond, null = model.condition(ids), model.condition(model.null_ids[:, :ids.shape[1]])
        field = guided_velocity(model.dit, cond, null, w)

        def velocity(z, t):
            with rt.autocast():
                return field(z, t).float()

        z, nfe = sample_flow(velocity, noise[lo:lo + len(ids)].to(rt.device), times, solver)
        with rt.autocast():
            x = from_latent(z, stats)
            out.append(tensor_to_images((x if ae is None else ae.decode(x)).float()))
    return np.concatenate(out), nfe


@torch.no_grad()
def reconstruction_metrics(ae, split, rt, batch_size=500):
    """The autoencoder on test images: PSNR (dB, pixels in [0, 1]) and the share of reconstructions
    in which the detector finds all four attributes of the original, the ceiling of any latent sample."""
    ae.eval()
    recon = []
    for lo in range(0, len(split["images"]), batch_size):
        x = images_to_tensor(split["images"][lo:lo + batch_size]).to(rt.device)
        with rt.autocast():
            recon.append(tensor_to_images(ae.decode(ae.encode(x)).float()))
    recon = np.concatenate(recon)
    mse = ((recon.astype(np.float64) - split["images"]) / 255.0) ** 2
    out = {"psnr_db": float(10 * np.log10(1.0 / mse.mean()))}
    if "attributes" in split:
        out["detector_on_reconstructions"] = float((detect_attributes(recon) == split["attributes"]).all(axis=1).mean())
    return out, recon


def captioned_grid(images, prompts, hits, ncols=8, scale=3):
    """Samples with their prompt below (two lines of the 3x5 font), green where the detector finds
    every named attribute, red where it does not."""
    h, w = images.shape[1] * scale, images.shape[2] * scale
    width = max(w, 96)
    tiles = []
    for image, prompt, hit in zip(images, prompts, hits):
        tile = np.zeros((h + 16, width, 3), dtype=np.uint8)
        image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
        tile[:h, :w] = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
        for i, line in enumerate(textwrap.wrap(prompt, width // 4)[:2]):
            draw_text(tile, line, 0, h + 2 + 7 * i, (80, 255, 80) if hit else (255, 80, 80))
        tiles.append(tile)
    return image_grid(np.stack(tiles), ncols)


def evaluate(model, ae, stats, data, cfg, rt, write_files=True):
    """Prompt alignment of the final sampler on every prompt set; the autoencoder's reconstructions;
    with write_files the sample grids and, if --eval_nfe is set, the alignment-vs-NFE table.
    Every setting starts from the same noise, so differences come from the sampler alone."""
    sets = eval_sets(data, cfg)
    channels, side = flow_geometry(cfg, data["channels"])
    n = max(len(prompts) for prompts, _ in sets.values())
    noise = torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(cfg.seed + 1))
    metrics, samples = {"alignment": {}, "attributes": {}}, {}
    for name, (prompts, asked) in sets.items():
        images, nfe = sample_images(model, ae, stats, prompts, noise, cfg, rt, cfg.cfg_w, cfg.solver, cfg.sample_steps)
        samples[name] = images
        if asked is not None:
            metrics["alignment"][name], metrics["attributes"][name], _ = prompt_alignment(images, asked)
    metrics.update(sampler=f"{cfg.solver}, {cfg.sample_steps} steps, NFE {nfe}, w={cfg.cfg_w:g}, shift {cfg.shift:g}",
                   nfe=nfe, eval_samples=sum(len(p) for p, _ in sets.values()))
    if ae is not None:
        metrics["reconstruction"], recon = reconstruction_metrics(ae, data["test"], rt)
    if not write_files:
        return metrics
    if cfg.data == "shapes":
        # samples.png: one row per (shape, color) pair of the 'shape+color' prompts (its first 16
        # samples), heldout pairs last; samples_all_four.png: the first 'all four' prompt of every pair
        k = cfg.eval_per_prompt
        names = [f"{split} shape+color" for split in ("seen", "heldout")]
        rows = [samples[n][lo:lo + min(k, 16)] for n in names for lo in range(0, len(samples[n]), k)]
        heads = [sets[n][0][lo] + (" (heldout)" if "heldout" in n else "") for n in names for lo in range(0, len(samples[n]), k)]
        save_png(os.path.join(cfg.out_dir, "samples.png"), labelled_rows(rows, heads))
        names = [f"{split} all four" for split in ("seen", "heldout")]
        images = np.concatenate([samples[n][::k] for n in names])
        hits = np.concatenate([prompt_alignment(samples[n][::k], sets[n][1][::k])[2] for n in names])
        save_png(os.path.join(cfg.out_dir, "samples_all_four.png"),
                 captioned_grid(images, [p for n in names for p in sets[n][0][::k]], hits))
    else:
        prompts = sets["test captions"][0]
        save_png(os.path.join(cfg.out_dir, "samples.png"),
                 captioned_grid(samples["test captions"], prompts, np.ones(len(prompts), bool)))
    if ae is not None:
        k = min(16, len(recon))
        save_png(os.path.join(cfg.out_dir, "reconstructions.png"),
                 labelled_rows([data["test"]["images"][:k], recon[:k]], ["test", "decoded"]))
    if cfg.eval_nfe and cfg.data == "shapes":
        metrics["nfe_sweep"] = []
        for solver in parse_list(cfg.eval_solvers, str, "eval_solvers"):
            for budget in parse_list(cfg.eval_nfe, int, "eval_nfe"):
                # Heun's N steps cost 2N - 1 NFE: the most steps within the budget
                steps = budget if solver == "euler" else (budget + 1) // 2
                row = {"solver": solver, "budget": budget, "steps": steps}
                for name in ("seen shape+color", "seen all four"):
                    images, row["nfe"] = sample_images(model, ae, stats, sets[name][0], noise, cfg, rt, cfg.cfg_w,
                                                       solver, steps)
                    row[name] = prompt_alignment(images, sets[name][1])[0]
                metrics["nfe_sweep"].append(row)
    return metrics


def format_tables(metrics):
    """The evaluation as Markdown tables (the README's format)."""
    lines = []
    if metrics.get("alignment"):
        lines += ["", f"prompt alignment ({metrics['sampler']}, {metrics['eval_samples']} samples)",
                  "| prompts | alignment | shape | color | size | position |", "|---|---|---|---|---|---|"]
        for name, value in metrics["alignment"].items():
            attrs = metrics["attributes"][name]
            lines.append(f"| {name} | {value:.3f} | " + " | ".join(
                f"{attrs[a]:.3f}" if a in attrs else "-" for a in ATTRIBUTES) + " |")
    if "reconstruction" in metrics:
        lines.append("autoencoder on the test split: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["reconstruction"].items()))
    if "nfe_sweep" in metrics:
        lines += ["", "alignment against NFE (seen pairs; Heun's N steps cost 2N - 1 NFE)",
                  "| NFE budget | solver | steps | NFE | shape+color | all four |", "|---|---|---|---|---|---|"]
        for r in sorted(metrics["nfe_sweep"], key=lambda r: (r["budget"], r["solver"])):
            lines.append(f"| {r['budget']} | {r['solver']} | {r['steps']} | {r['nfe']} | "
                         f"{r['seen shape+color']:.3f} | {r['seen all four']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Training: stage 1 the autoencoder, stage 2 the flow on its normalised latents
# ----------------------------------------------------------------------------------------------

def validate_config(cfg, data):
    """Every check that can fail before any work is done (DESIGN.md section 6)."""
    if cfg.space not in ("latent", "pixel"):
        raise InputError(f"--space {cfg.space}: expected latent or pixel")
    f = cfg.downsample
    if f & (f - 1):
        raise InputError(f"--downsample {f}: expected a power of 2 (e.g. 4 or 8)")
    factor = (f if cfg.space == "latent" else 1) * cfg.patch_size
    if cfg.image_size % factor:
        raise InputError(f"--image_size {cfg.image_size} is not divisible by "
                         + ("--downsample x --patch_size" if cfg.space == "latent" else "--patch_size")
                         + f" = {factor}; pick a multiple of {factor} or a smaller --patch_size")
    if cfg.dim % cfg.num_heads:
        raise InputError(f"--dim {cfg.dim} is not divisible by --num_heads {cfg.num_heads}")
    for name in ("clip", "t5"):
        if getattr(cfg, f"{name}_dim") % getattr(cfg, f"{name}_heads"):
            raise InputError(f"--{name}_dim {getattr(cfg, f'{name}_dim')} is not divisible by --{name}_heads "
                             f"{getattr(cfg, f'{name}_heads')}")
    if cfg.context_length < 3:
        raise InputError(f"--context_length {cfg.context_length}: needs room for BOS, one byte and EOS (3 or more)")
    if cfg.pos_embed not in ("sincos", "learned"):
        raise InputError(f"--pos_embed {cfg.pos_embed}: expected sincos or learned")
    if cfg.t_schedule not in ("uniform", "logit_normal"):
        raise InputError(f"--t_schedule {cfg.t_schedule}: expected logit_normal or uniform")
    for solver in [cfg.solver] + parse_list(cfg.eval_solvers, str, "eval_solvers"):
        if solver not in SOLVERS:
            raise InputError(f"solver {solver!r} (--solver, --eval_solvers): expected one of {', '.join(SOLVERS)}")
    if cfg.eval_nfe and min(parse_list(cfg.eval_nfe, int, "eval_nfe")) < 1:
        raise InputError(f"--eval_nfe {cfg.eval_nfe}: every budget must be >= 1")
    if cfg.space == "latent" and not cfg.ae_init and cfg.ae_steps == 0 and not cfg.eval_only:
        raise InputError("--ae_steps 0 leaves the latent space untrained; pass --ae_init path/to/ckpt.pt or --ae_steps >= 1")
    world = int(os.environ.get("WORLD_SIZE", 1))
    for flag in ("ae_batch_size", "clip_batch_size"):
        if getattr(cfg, flag) % world:
            raise InputError(f"--{flag} {getattr(cfg, flag)} is global and must divide evenly over {world} processes")
    if data is not None:
        for flag in ("batch_size", "ae_batch_size", "clip_batch_size"):
            if getattr(cfg, flag) > len(data["train"]["images"]):
                raise InputError(f"--{flag} {getattr(cfg, flag)} is larger than the {len(data['train']['images'])} "
                                 f"training pairs; lower it or add data")
        if "captions" not in data["train"]:
            raise InputError(f"--data {cfg.data}: a text-to-image model trains on image-caption pairs; "
                             f"the .npz needs a 'captions' array")


def train(cfg):
    """Train the autoencoder (stage 1), then the flow (stage 2); or with --eval_only evaluate a
    checkpoint. Returns the final metrics."""
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
        tokenizer = ByteTokenizer()
        train_ids, train_lengths = tokenizer.encode(data["train"]["captions"], cfg.context_length, truncate=True)
        tokenize(tokenizer, data["train"]["captions"], cfg.context_length)  # a caption too long: one clear error
        clip_arch, clip_state = ckpt.get("clip_arch") if ckpt else None, None
        if cfg.clip_init and not cfg.eval_only:
            clip_arch, clip_state = load_clip_text_tower(cfg.clip_init, cfg.context_length)
        model = build_model(cfg, data["channels"], clip_arch).to(rt.device)
        if clip_state is not None:
            model.clip_text.load_state_dict(clip_state)
        clip_steps = cfg.clip_steps if not cfg.clip_init else 0  # stage 1b unless a tower is loaded
        latent_clip = None if cfg.eval_only or not clip_steps else build_latent_clip(cfg, data["channels"]).to(rt.device)
        if cfg.clip_init or clip_steps:
            model.clip_text.requires_grad_(False)  # SD3 keeps its pretrained text encoders frozen
        ema = copy.deepcopy(model).requires_grad_(False)
        ae = build_autoencoder(cfg, data["channels"]).to(rt.device) if cfg.space == "latent" else None
        ae_steps = cfg.ae_steps if ae is not None and not cfg.ae_init else 0  # stage 1 unless loaded
        flow_start = ae_steps + clip_steps
        if cfg.eval_only:
            if ckpt is None:
                raise InputError("--eval_only 1 needs --resume path/to/ckpt.pt")
            if ckpt["step"] <= flow_start:
                raise InputError(f"--resume {cfg.resume}: written in stage 1 or 1b (step {ckpt['step']}), before the "
                                 f"flow; resume training without --eval_only first")
            ema.load_state_dict(ckpt["ema"])
            if ae is not None:
                ae.load_state_dict(ckpt["autoencoder"])
            metrics = evaluate(ema, ae, ckpt["latent_stats"], data, cfg, rt) if rt.master else {}
            if rt.master:
                print(format_tables(metrics), flush=True)
            return finish_run(cfg, rt, metrics, t_start)
        if ae is not None and cfg.ae_init:
            ae.load_state_dict(load_autoencoder_state(cfg.ae_init, cfg, data["channels"]))
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, rt)
        ae_optimizer = make_optimizer(ae, cfg.ae_lr, cfg.weight_decay, rt) if ae is not None else None
        clip_optimizer = None if latent_clip is None else make_optimizer(latent_clip, cfg.clip_lr, cfg.weight_decay, rt)
        start, stats, timing = 0, None, {}
        if ckpt is not None:
            for module, key in ((model, "model"), (ema, "ema"), (optimizer, "optimizer"), (ae, "autoencoder"),
                                (ae_optimizer, "ae_optimizer"), (latent_clip, "latent_clip"),
                                (clip_optimizer, "clip_optimizer")):
                if module is not None:
                    module.load_state_dict(ckpt[key])
            start, stats = ckpt["step"], ckpt["latent_stats"]
            if ckpt["clip_zero_shot"] is not None:  # stage 1b's check, measured before the resume
                timing["clip_zero_shot"] = ckpt["clip_zero_shot"]
            set_rng_state(ckpt["rng"])
        run_model = prepare_model(model, rt)
        run_ae = prepare_model(ae, rt) if ae is not None else None
        run_clip = prepare_model(latent_clip, rt) if latent_clip is not None else None
        logger = Logger(cfg.out_dir, cfg, rt, append=ckpt is not None)
        n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
        channels, side = flow_geometry(cfg, data["channels"])
        clip_note = f" (frozen, {cfg.clip_init})" if cfg.clip_init else " (stage 1b, then frozen)" if clip_steps else ""
        logger.print(f"sd3_mini: MM-DiT {n_params(model.dit):.2f}M, CLIP text {n_params(model.clip_text):.2f}M{clip_note}, "
                     f"T5-role text {n_params(model.t5_text):.2f}M"
                     + (f", autoencoder {n_params(ae):.2f}M" if ae is not None else "")
                     + f"; flow on {channels}x{side}x{side} {cfg.space}s, {(side // cfg.patch_size) ** 2} image tokens; "
                     f"{len(train_ids)} training pairs, device {rt.device}, {'bf16' if rt.amp_dtype else 'fp32'}"
                     f"{', compiled' if rt.compile else ''}, world size {rt.world_size}")
        train_images = torch.as_tensor(data["train"]["images"])
        total = flow_start + cfg.max_steps
        end = min(cfg.stop_step, total) if cfg.stop_step else total
        bounds = {"autoencoder": (0, ae_steps), "clip": (ae_steps, flow_start), "flow": (flow_start, total)}
        batch = {"autoencoder": cfg.ae_batch_size, "clip": cfg.clip_batch_size, "flow": cfg.batch_size}
        titles = {"autoencoder": "stage 1: the autoencoder", "clip": "stage 1b: CLIP on the latents (the text tower)",
                  "flow": "stage 2: the flow"}
        progress, latents, phase_time = None, None, dict.fromkeys(bounds, 0.0)
        for step in range(start, end):
            stage = next(name for name, (lo, hi) in bounds.items() if lo <= step < hi)
            phase_step, bs = step - bounds[stage][0], batch[stage]
            share = slice(rt.rank * bs // rt.world_size, (rt.rank + 1) * bs // rt.world_size)
            if progress is None or step == bounds[stage][0]:
                progress = Progress(dataclasses.replace(cfg, batch_size=bs), rt, logger, step, end, total)
                logger.print(titles[stage])
            if stage != "autoencoder" and latents is None:
                # the autoencoder is frozen from here on: encode the training set once (SD3 caches
                # its latents too), measure the shift and scale if this is the end of stage 1
                t_encode = time.time()
                if ae is not None:
                    ae.eval().requires_grad_(False)
                latents = encode_images(ae, train_images, rt)  # (n_train, C, h, w)
                if stats is None:
                    stats = latent_stats(latents)
                latents = to_latent(latents, stats)
                timing["encode_s"] = time.time() - t_encode
                logger.print(f"latent shift {stats[0]:.4f}, scale {stats[1]:.4f} (SD3's shift_factor and scaling_factor), "
                             f"measured on {len(latents)} training {cfg.space}s")
            t_step = time.time()
            g = torch.Generator(rt.device).manual_seed(cfg.seed * 1_000_003 + step)
            # every draw is made for the global batch, then sliced: DDP ranks see the single-process draws
            idx = batch_indices(phase_step, len(train_ids), bs, cfg.seed)
            if stage == "autoencoder":
                lr = cosine_lr(phase_step, ae_steps, cfg.ae_lr, cfg.min_lr, cfg.warmup_steps)
                net, opt = ae, ae_optimizer
                x = images_to_tensor(train_images[idx[share]]).to(rt.device, non_blocking=True)
                noise = torch.randn((bs, cfg.latent_channels, side, side), generator=g, device=rt.device)[share]
                with rt.autocast():
                    out, mean, logvar = run_ae(x, noise)
                loss, mse, kl = autoencoder_loss(x, out, mean, logvar, cfg.kl_weight)
                extra = {"mse": mse, "kl": kl, "stage": "autoencoder"}
            elif stage == "clip":
                lr = cosine_lr(phase_step, clip_steps, cfg.clip_lr, cfg.min_lr, cfg.warmup_steps)
                net, opt = latent_clip, clip_optimizer
                ids = train_ids[idx[share], :int(train_lengths[idx].max())].to(rt.device)
                with rt.autocast():
                    image_emb, text_emb, logit_scale = run_clip(latents[idx[share]].to(rt.device), ids)
                image_emb, text_emb = image_emb.float(), text_emb.float()
                # Eq (Lec11 CLIP) over the global batch: this rank's rows against every rank's columns
                loss = clip_loss_local(image_emb, text_emb, gather_with_grad(image_emb), gather_with_grad(text_emb),
                                       logit_scale, rt.rank)
                extra = {"stage": "clip"}
            else:
                lr = cosine_lr(phase_step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
                net, opt = model, optimizer
                x0 = latents[idx[share]].to(rt.device, non_blocking=True)
                ids = train_ids[idx[share], :int(train_lengths[idx].max())].to(rt.device)  # cut to the longest caption
                # Eq (SD3 L_RF): x_0 ~ data, eps ~ N(0, I), t ~ logit-normal, shifted
                eps = torch.randn((bs, *x0.shape[1:]), generator=g, device=rt.device)[share]
                t = shift_time(sample_time(bs, g, rt.device, cfg.t_schedule, cfg.t_loc, cfg.t_scale), cfg.shift)[share]
                keep_clip = (torch.rand(bs, generator=g, device=rt.device) >= cfg.p_drop)[share]
                keep_t5 = (torch.rand(bs, generator=g, device=rt.device) >= cfg.p_drop)[share]
                with rt.autocast():
                    loss = rf_loss(lambda z, tt: run_model(z, tt, ids, keep_clip, keep_t5).float(), x0, eps, t)
                extra = {"stage": "flow"}
            for group in opt.param_groups:
                group["lr"] = lr
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if stage == "clip":
                clamp_logit_scale(latent_clip)
            if stage == "flow":
                ema_update(ema, model, cfg.ema_decay, phase_step)
            done = step + 1
            phase_time[stage] += time.time() - t_step
            if done == min(end, bounds[stage][1]):  # a stage ends, or the run inside it
                timing[f"{stage}_ms_per_step"] = 1000 * phase_time[stage] / (done - max(start, bounds[stage][0]))
            ckpt_now = progress.step(done, loss, lr, **extra)
            if stage == "clip" and done == flow_start:
                # stage 1b's text tower becomes the flow model's, frozen (its EMA copy too)
                for flow_model in (model, ema):
                    flow_model.clip_text.load_state_dict(latent_clip.text_encoder.state_dict())
                if rt.master and cfg.data == "shapes":
                    test_latents = to_latent(encode_images(ae, torch.as_tensor(data["test"]["images"]), rt), stats)
                    timing["clip_zero_shot"] = zero_shot_accuracy(latent_clip, test_latents, data["test"]["labels"],
                                                                  cfg.context_length)
                    logger.print(f"stage 1b: zero-shot (shape, color) of the test {cfg.space}s against the 21 "
                                 f"captions 'a {{color}} {{shape}}': {timing['clip_zero_shot']:.3f}")
            if cfg.eval_every and done % cfg.eval_every == 0 and done != end and rt.master and stage == "flow":
                with progress.paused():
                    quick = evaluate(ema, ae, stats, data, cfg, rt, write_files=False)
                logger.print(f"step {done}: alignment " + ", ".join(f"{k} {v:.3f}" for k, v in quick["alignment"].items()))
                logger.log({"step": done, "alignment": quick["alignment"]})
            if ckpt_now and rt.master:
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), {
                    "model_name": MODEL_NAME, "model": model.state_dict(), "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(), "step": done, "config": asdict(cfg), "rng": rng_state(),
                    "data_position": done, "latent_stats": stats, "clip_arch": clip_arch,
                    "clip_zero_shot": timing.get("clip_zero_shot"),
                    "autoencoder": ae.state_dict() if ae is not None else None,
                    "ae_optimizer": ae_optimizer.state_dict() if ae is not None else None,
                    "latent_clip": latent_clip.state_dict() if latent_clip is not None else None,
                    "clip_optimizer": clip_optimizer.state_dict() if latent_clip is not None else None})
        metrics = {}
        if rt.master:
            metrics = dict(timing)  # training-only numbers: --eval_only does not reproduce them
            if end <= flow_start:  # the run stopped before the flow's first step: nothing to sample from yet
                return finish_run(cfg, rt, {**metrics, "steps": end, "final_loss": progress.loss}, t_start)
            metrics.update(evaluate(ema, ae, stats, data, cfg, rt))
            metrics.update(steps=end, final_loss=progress.loss if progress else None, latent_stats=list(stats),
                           image_tokens=(side // cfg.patch_size) ** 2)
            logger.print(format_tables(metrics))
            logger.print(", ".join(f"{k} {metrics[k]:.1f}" for k in ("autoencoder_ms_per_step", "clip_ms_per_step",
                                                                      "flow_ms_per_step", "encode_s") if k in metrics))
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


# ----------------------------------------------------------------------------------------------
# Loading clip.py's and vqvae.py's checkpoints (--clip_init, --ae_init)
# ----------------------------------------------------------------------------------------------

def read_checkpoint(path, flag):
    """A checkpoint of this project, read with weights_only=True, or one clear error naming the flag."""
    if not os.path.isfile(path):
        raise InputError(f"--{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"--{flag} {path}: cannot read the checkpoint, it is corrupt or truncated ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model_name" not in ckpt or "config" not in ckpt:
        raise InputError(f"--{flag} {path}: not a checkpoint written by this project")
    return ckpt


def check_state(expected, given, where):
    """Every key a module needs is in `given` with the right shape, and nothing else is."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    if missing or unexpected or misshapen:
        raise InputError(f"{where}: the weights do not fit (missing {missing[:4]}, unexpected {unexpected[:4]}, "
                         f"misshapen {misshapen[:4]}); pass a checkpoint of the right architecture")


def load_clip_text_tower(path, context_length):
    """(constructor arguments, state dict) of the CLIP text tower of a clip.py checkpoint, or of an
    sd3_mini.py one written after its stage 1b (to rerun the flow on the same frozen tower), every
    key checked. The tower is rebuilt from the checkpoint's own config, so any size loads."""
    ckpt = read_checkpoint(path, "clip_init")
    saved = ckpt["config"]
    if ckpt["model_name"] == MODEL_NAME:
        ae_steps = 0 if saved["ae_init"] or saved["space"] == "pixel" else saved["ae_steps"]
        if not saved["clip_init"] and (saved["clip_steps"] == 0 or ckpt["step"] < ae_steps + saved["clip_steps"]):
            raise InputError(f"--clip_init {path}: this sd3_mini.py run has no pretrained CLIP tower "
                             + ("(--clip_steps 0)" if saved["clip_steps"] == 0
                                else "yet (written before its stage 1b ended)"))
        arch = ckpt["clip_arch"] or dict(context_length=saved["context_length"], dim=saved["clip_dim"],
                                         depth=saved["clip_depth"], num_heads=saved["clip_heads"],
                                         mlp_ratio=saved["mlp_ratio"], embed_dim=saved["clip_embed_dim"])
        prefix, weights = "clip_text.", ckpt["model"]
    elif ckpt["model_name"] == "clip":
        arch = dict(context_length=saved["context_length"], dim=saved["text_dim"], depth=saved["text_depth"],
                    num_heads=saved["text_heads"], mlp_ratio=saved["mlp_ratio"], embed_dim=saved["embed_dim"])
        prefix, weights = "text_encoder.", ckpt["model"]
    else:
        raise InputError(f"--clip_init {path}: a checkpoint of {ckpt['model_name']!r}, not of clip.py or sd3_mini.py")
    if context_length > arch["context_length"]:
        raise InputError(f"--context_length {context_length} is longer than the {arch['context_length']} positions of "
                         f"the CLIP tower in --clip_init {path}; lower --context_length")
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    check_state(TextEncoder(**arch).state_dict(), state, f"--clip_init {path}")
    return arch, state


AE_FLAGS = {"downsample": "downsample", "channels": "ae_channels", "max_mult": "ae_max_mult",
            "num_res_blocks": "ae_res_blocks", "latent_dim": "latent_channels"}  # vqvae.py's name -> this file's flag


def load_autoencoder_state(path, cfg, in_channels):
    """The state dict of the Gaussian autoencoder in a vqvae.py (--bottleneck gaussian) or
    sd3_mini.py checkpoint, every key checked against the autoencoder of this file's flags."""
    ckpt = read_checkpoint(path, "ae_init")
    saved, name = ckpt["config"], ckpt["model_name"]
    if name == "vqvae":
        if saved.get("bottleneck") != "gaussian":
            raise InputError(f"--ae_init {path}: a vqvae.py checkpoint of the VQ tokenizer; latent diffusion needs "
                             f"the Gaussian autoencoder of `python vqvae.py --bottleneck gaussian`")
        arch, state = {k: saved[k] for k in AE_FLAGS}, ckpt["model"]
    elif name == MODEL_NAME:
        if ckpt.get("autoencoder") is None:
            raise InputError(f"--ae_init {path}: this sd3_mini.py run had no autoencoder (--space pixel)")
        arch = {k: saved[flag] for k, flag in AE_FLAGS.items()}
        state = ckpt["autoencoder"]
    else:
        raise InputError(f"--ae_init {path}: a checkpoint of {name!r}; expected vqvae.py or sd3_mini.py")
    mine = {k: getattr(cfg, flag) for k, flag in AE_FLAGS.items()}
    if arch != mine:
        flags = " ".join(f"--{AE_FLAGS[k]} {v}" for k, v in arch.items())
        raise InputError(f"--ae_init {path}: its autoencoder has {arch}, these flags ask for {mine}; pass {flags}")
    check_state(build_autoencoder(cfg, in_channels).state_dict(), state, f"--ae_init {path}")
    return state


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
