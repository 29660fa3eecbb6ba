"""Pixel-level autoregression: an image as a sequence of sub-pixel values, modelled by a causal Transformer.

Lecture: lecture-notes.md, Lec12 "Attempt 1: Pixel-level Autoregression". The equations, as named in
the notes:

    (Lec12 sequence)   x_img -> (x_1, ..., x_T),  x_t in {0..255},  T = H W C    -> image_to_tokens()
    (Lec12 AR)         p(x) = prod_t p_theta(x_t | x_<t), a 256-way softmax      -> CausalTransformer
    (PixelCNN mask A)  x_t's input adds its left, up-left, up, up-right values   -> PixelTransformer
    (Lec12 L_MLE)      L = -sum_t log p_theta(x_t | x_<t)                       -> mle_loss()
    (bits/dim)         L / (T ln 2), the number every pixel model reports        -> bits_per_dim()
    (Lec15 CFG form)   l~ = (1 + w) l(x_<t, c) - w l(x_<t, null), on logits     -> cfg_logits()
    (Lec12 bottleneck) "sequence length explodes"                               -> sequence_length_table()

Papers: van den Oord et al. 2016, PixelRNN / PixelCNN (arXiv:1601.06759); Parmar et al. 2018, Image
Transformer (arXiv:1802.05751); Chen et al. 2020, iGPT ("Generative Pretraining from Pixels", ICML
2020); Radford et al. 2019, GPT-2 (pre-norm decoder, scaled residual init); Ho & Salimans 2022,
classifier-free guidance (arXiv:2207.12598); Holtzman et al. 2019, nucleus (top-p) sampling
(arXiv:1904.09751); Pope et al. 2022, KV caching in Transformer inference (arXiv:2211.05102).

Conventions. An image is uint8 (H, W, C); its tokens are its bytes in raster order, channels last:
x_t for t = (row * W + column) * C + channel, so T = H W C (RGB: R, G, B of a pixel in turn; grayscale
C = 1: T = H W). Token ids 0..255 are pixel values, 256 + c is class c and 256 + num_classes the
null class ("no condition"; an unlabelled .npz uses only it, as a BOS token). The shift: the input is
[class token, x_1, ..., x_{T-1}] and the target [x_1, ..., x_T], so the logits at slot t-1 give
p(x_t | x_<t, c). The head has 256 outputs: class tokens are inputs only. Losses are in nats per
dimension; bits/dim = nats / ln 2. Shape legend: B batch, T tokens, D width, nh heads, hd head width,
L cache length, V vocabulary (input ids), K outputs.

This file owns the decoder-only Transformer that vqvae.py, vqgan.py and llava.py copy
(`# Copied from pixel_ar.<name>`): CausalTransformer (with CausalSelfAttention, DecoderBlock,
causal_mask), KVCache, and the sampler (filter_logits, sample_next, cfg_logits, generate).

The input. iGPT feeds each slot only the token before it, so the pixel above the one being predicted
(W C = 36 tokens back at 12 px) is found by attention from absolute positions, which a small model
learns late. PixelTransformer (the default; --neighbours 0 is iGPT's input) also adds learned
embeddings of the values of the predicted sub-pixel's four earlier neighbours in its channel: the
causal half of a 3x3 window, the context PixelCNN's first masked convolution sees. The model is still
p(x_t | x_<t) (it reads only earlier tokens; tests check it by perturbation and through the cache).
Same 2500 steps at width 64: 0.064 -> 0.031 test bits/dim, alignment 50% -> 87% at w = 1 (README).

Measured (`python pixel_ar.py`, cpu preset, 2-core CPU alone): 2000 steps of batch 16 on 12 px
images (T = 432) in 8 min 35 s; test bits/dim 0.032; the detector finds the requested (shape, color)
in 76.6% of 576 samples (w = 0.5, temperature 1; 75.7-84.5% at other seeds), against 80.2% on clean
12 px renders. Guidance also pulls the objects up (351 of 572 in the top third at w = 0.5, 500 of 576
at w = 1; at w = 0 they spread as in the data, 67.7% aligned): per token, it boosts "the object
starts here" at every background pixel (README). The sequence-length table is in the README.

Commands:
    python pixel_ar.py                              # cpu preset: trains, evaluates, writes out/pixel_ar/
    python pixel_ar.py --preset gpu                 # one GPU: bf16 autocast and torch.compile
    torchrun --standalone --nproc_per_node=4 pixel_ar.py --preset gpu   # DDP; --batch_size is global
    python pixel_ar.py --eval_only 1 --resume out/pixel_ar/ckpt.pt --cfg_w 0 --top_k 3   # resample
    python pixel_ar.py --eval_only 1 --resume out/pixel_ar/ckpt.pt --seq_table 8,12,16,24,32  # full table
    python pixel_ar.py --data digits.npz --image_size 8                # real (grayscale) images
    python pixel_ar.py --neighbours 0                # the ablation: iGPT's plain input
    python benchmarks/pixel_ar_cache.py              # cached vs recompute sampling speed-up
"""

from __future__ import annotations

import argparse
import contextlib
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

MODEL_NAME = "pixel_ar"
NUM_VALUES = 256  # a sub-pixel is one byte


@dataclass
class Config:
    # model
    image_size: int = 12  # height and width in pixels; T = image_size^2 * channels tokens
    context: int = 0  # Transformer positions; 0: exactly T, else at least T (longer leaves positions unused)
    dim: int = 64  # D: token width
    depth: int = 4  # decoder blocks
    num_heads: int = 2  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of D
    dropout: float = 0.0  # dropout on the embeddings, residual branches and attention weights
    neighbours: bool = True  # add each sub-pixel's left, up-left, up, up-right values (same channel) to its input; 0: iGPT's input
    # method
    p_uncond: float = 0.1  # probability of replacing the class token by the null class (for CFG)
    # evaluation
    cfg_w: float = 0.5  # guidance weight w of the samples, in l~ = (1 + w) l(c) - w l(null)
    temperature: float = 1.0  # sampling temperature (0: greedy argmax)
    top_k: int = 0  # keep the k most likely values at each step (0: all)
    top_p: float = 1.0  # keep the smallest set of values whose probability reaches p (1: all)
    eval_per_class: int = 32  # samples per class for the alignment (the grid shows the first 16)
    eval_images: int = 256  # test images for bits/dim (the first of the test split)
    seq_table: str = "8,12,16"  # image sizes of the sequence-length table ('' off; the full table: 8,12,16,24,32)
    table_batch: int = 8  # batch of the table's timed training steps
    # data
    data: str = "shapes"  # 'shapes' (built-in world) or a path to an .npz file with images (labels optional)
    n_train: int = 8000  # shapes images rendered for training
    n_test: int = 500  # shapes images rendered for the test split (and the heldout split)
    # optim
    max_steps: int = 2000  # optimizer steps; also the length of the cosine schedule
    batch_size: int = 16  # global batch size (split across DDP ranks)
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 30  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay on matrices (not on norms, biases, embeddings)
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    # system
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA if supported, else fp32), float32, bfloat16
    compile: str = "auto"  # torch.compile: auto (on for CUDA), 1, 0
    seed: int = 0  # seed for the data, the initialisation, the class dropout, the order and the samples
    # io
    out_dir: str = "out/pixel_ar"  # where ckpt.pt, log.jsonl, metrics.json and the PNGs go
    log_every: int = 25  # steps between progress lines
    eval_every: int = 0  # steps between test bits/dim evaluations (0: only at the end)
    ckpt_every: int = 200  # steps between checkpoints (one is always written at the end)
    resume: str = ""  # checkpoint to resume training from, or to evaluate with --eval_only 1
    stop_step: int = 0  # end this run at this step although the schedule spans max_steps (0: off)
    eval_only: bool = False  # with --resume: only evaluate the checkpoint and write the grid


# The accepted range of each numeric field, checked before any work (check_config). A field not
# listed is an integer >= 1 or a finite float > 0.
RANGES = {"context": ">= 0", "dropout": "[0, 1)", "p_uncond": "[0, 1)", "cfg_w": ">= 0", "temperature": ">= 0",
          "top_k": ">= 0", "top_p": "(0, 1]", "min_lr": ">= 0", "warmup_steps": ">= 0", "weight_decay": ">= 0",
          "grad_clip": ">= 0", "seed": ">= 0", "eval_every": ">= 0", "stop_step": ">= 0"}

# Fields that may change when a run is resumed (any other difference is an error), and that
# --eval_only takes from the command line rather than from the checkpoint.
RUNTIME_FIELDS = ("device", "dtype", "compile", "out_dir", "log_every", "eval_every", "ckpt_every",
                  "resume", "stop_step", "eval_only", "max_steps", "cfg_w", "temperature", "top_k", "top_p",
                  "eval_per_class", "eval_images", "seq_table", "table_batch")

# The Config defaults are the cpu preset; the others override a few fields.
PRESETS = {
    "tiny": dict(image_size=6, dim=32, depth=2, num_heads=2, mlp_ratio=2.0, n_train=128, n_test=16, max_steps=6,
                 batch_size=8, warmup_steps=2, log_every=2, ckpt_every=1000, eval_per_class=1, eval_images=16,
                 seq_table=""),
    "cpu": dict(),
    "gpu": dict(image_size=32, dim=512, depth=12, num_heads=8, dropout=0.1, n_train=100000, n_test=2000,
                max_steps=20000, batch_size=64, lr=6e-4, min_lr=6e-5, warmup_steps=1000, weight_decay=0.1,
                log_every=100, eval_every=2000, ckpt_every=2000, eval_per_class=16, eval_images=1000,
                seq_table="8,12,16,24,32", table_batch=16),
}


# ----------------------------------------------------------------------------------------------
# Building blocks: the decoder-only Transformer and its static KV cache (copied by vqvae, vqgan, llava)
# ----------------------------------------------------------------------------------------------

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


class KVCache:
    """Static, preallocated keys and values of every layer: k, v (depth, B, nh, L, hd).

    A forward call at slots [start, start + T) writes its keys and values there in place and reads
    back the written prefix [0, start + T) as a view: no concatenation and no reallocation per step,
    and slots past the prefix are never read (they may hold anything)."""

    def __init__(self, depth, batch, num_heads, max_len, head_dim, device=None, dtype=torch.float32):
        self.k = torch.zeros(depth, batch, num_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    @property
    def max_len(self):
        return self.k.shape[3]

    def update(self, layer, start, k, v):
        """Write k, v (B, nh, T, hd) at slots [start, start + T) of `layer`; return the prefix views."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, end, hd)


def causal_mask(start, length, key_mask=None, device=None):
    """Which keys each query may attend to, (1 or B, 1, T, start + T) bool, True = attend.

    Query i sits at slot start + i and sees slots j <= start + i; with key_mask (B, >= start + T)
    bool, False marks a padding key that nobody attends to, except the query at that slot itself,
    so that a padding row stays finite (never NaN)."""
    end = start + length
    query = torch.arange(start, end, device=device)[:, None]  # (T, 1)
    key = torch.arange(end, device=device)[None, :]  # (1, end)
    allowed = key <= query  # (T, end)
    if key_mask is None:
        return allowed[None, None]  # (1, 1, T, end)
    allowed = (allowed & key_mask[:, None, :end]) | (key == query)  # (B, T, end)
    return allowed[:, None]  # (B, 1, T, end)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through F.scaled_dot_product_attention, with an optional cache."""

    def __init__(self, dim, num_heads, dropout=0.0):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, cache=None, layer=0, start=0):
        """x (B, T, D) at slots [start, start + T). mask: causal_mask(...), or None for plain causal
        attention (SDPA's is_causal: right for a whole sequence from slot 0, and a single query sees
        every written key anyway)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, nh, start + T, hd)
        # Eq (attention, Vaswani et al.): softmax(Q K^T / sqrt(hd) + causal mask) V
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=mask is None and T > 1)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: x + Attn(LN(x)) with causal attention, then x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None, cache=None, layer=0, start=0):
        x = x + self.drop(self.attn(self.norm1(x), mask, cache, layer, start))
        return x + self.drop(self.mlp(self.norm2(x)))


class CausalTransformer(nn.Module):
    """GPT-style decoder: token + learned position embeddings, pre-norm causal blocks, LayerNorm, head.

    vocab_size input ids; the head scores the first num_outputs of them (default all): conditioning
    ids above num_outputs (class tokens, a null class) are read but never predicted. pos_embed: a
    module mapping position ids (B, T) to (B, T, D), default one learned table of max_len rows."""

    def __init__(self, vocab_size, max_len, dim, depth, num_heads, mlp_ratio=4.0, dropout=0.0, num_outputs=None,
                 pos_embed=None):
        super().__init__()
        self.max_len, self.num_heads = max_len, num_heads
        self.token_embed = nn.Embedding(vocab_size, dim)  # public: a caller may embed ids itself and splice
        self.pos_embed = pos_embed if pos_embed is not None else nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs or vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 depth)
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch, max_len=None, dtype=None):
        """An empty KVCache for `batch` sequences of up to max_len (default: the context) slots, in the
        dtype the keys will have (the autocast dtype when autocast is on, else the parameters')."""
        weight = self.token_embed.weight
        if dtype is None:
            kind = weight.device.type
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        head_dim = weight.shape[1] // self.num_heads
        return KVCache(len(self.blocks), batch, self.num_heads, max_len or self.max_len, head_dim, weight.device, dtype)

    def forward(self, x, positions=None, cache=None, start=0, key_mask=None):
        """Logits (B, T, K) for x at slots [start, start + T).

        x: token ids (B, T) long, or input embeddings (B, T, D) float (positions are added here).
        positions: (B, T) position ids (default start..start+T-1); left-padded prompts pass
            cumsum(mask) - 1, so each sample's first real token is position 0.
        cache, start: write this call's keys and values at [start, start + T), attend over [0, start + T).
        key_mask: (B, >= start + T) bool, False = a padding key (see causal_mask).
        """
        B, T = x.shape[:2]
        if start + T > self.max_len:
            raise ValueError(f"a sequence of {start + T} tokens is longer than the context of {self.max_len} positions")
        h = x if x.is_floating_point() else self.token_embed(x)  # (B, T, D)
        if positions is None:
            positions = torch.arange(start, start + T, device=h.device)[None]  # (1, T)
        h = self.drop(h + self.pos_embed(positions))
        # SDPA's is_causal suffices unless the queries start past slot 0 or some keys are padding
        mask = causal_mask(start, T, key_mask, h.device) if key_mask is not None or (start > 0 and T > 1) else None
        for layer, block in enumerate(self.blocks):
            h = block(h, mask, cache, layer, start)
        return self.head(self.norm(h))  # (B, T, K)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per matmul weight + 12 L D T for attention."""
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() >= 2 and "embed" not in n)
        return 6 * matmul + 12 * len(self.blocks) * self.token_embed.weight.shape[1] * seq_len


# ----------------------------------------------------------------------------------------------
# Sampling: logit filters, one sampling step, guidance, generate() (copied with the Transformer)
# ----------------------------------------------------------------------------------------------

def filter_logits(logits, top_k=0, top_p=1.0):
    """Logits (..., K) with -inf outside the kept set: the top_k largest (exactly k, ties broken by
    index; 0 = all), then the smallest set whose probability reaches top_p (always >= 1 value)."""
    if 0 < top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = F.pad(probs.cumsum(dim=-1)[..., :-1], (1, 0))  # probability of the values ranked above
        # Eq (nucleus, Holtzman et al.): keep v_(1..m), m = min{m : sum_{i<=m} p_(i) >= p}
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One id per row of logits (B, K): argmax at temperature 0, else a draw from
    softmax(filter_logits(logits / temperature))."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def cfg_logits(cond, uncond, w):
    """Classifier-free guidance on next-token logits; w = 0 is the plain conditional model."""
    # Eq (Lec15 CFG form, on logits): l~ = (1 + w) l(x_<t, c) - w l(x_<t, null)
    return (1 + w) * cond - w * uncond


@torch.no_grad()
def generate(model, prompt, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, cfg_w=0.0, null_prompt=None,
             prompt_mask=None, allowed=None, eos_id=None, positions=None, use_cache=True, generator=None):
    """Sample max_new_tokens ids after each prompt; returns the new ids (B, max_new_tokens).

    prompt: ids (B, P) long or input embeddings (B, P, D) float. null_prompt: the same shape, the
        unconditional prompt for cfg_w != 0 (cond and uncond run as one batch of 2B; the guided next
        token is fed to both halves). prompt_mask: (B, P) bool, False = left padding (it applies to
        the null prompt too). allowed: (>= P + max_new_tokens, K) bool, allowed[i] = the ids the token
        at slot i of the sequence may take, applied after guidance. eos_id: once a sample emits it,
        its later tokens are eos_id; generation stops when every sample has. positions: (1 or B,
        >= P + max_new_tokens - 1) the position ids of the slots the model reads, for a model whose
        positions are not 0, 1, ... (default: with prompt_mask, each sample's count of real tokens
        before the slot; else the model's own 0, 1, ...). use_cache=False recomputes the whole
        sequence at every step: the reference path, with the same tokens.
    The model runs in eval mode (restored afterwards); wrap the call in autocast for low precision.
    """
    B, P = prompt.shape[:2]
    length = P + max_new_tokens - 1  # slots the model reads: the last new token is never fed back
    if length > model.max_len:
        raise ValueError(f"a prompt of {P} tokens + {max_new_tokens} new tokens needs {length} positions, more than "
                         f"the context of {model.max_len}")
    guided = cfg_w != 0
    if guided and null_prompt is None:
        raise ValueError("cfg_w != 0 needs a null_prompt")
    seq = torch.cat([prompt, null_prompt]) if guided else prompt  # (B2, P) or (B2, P, D)
    if positions is not None and guided and len(positions) > 1:
        positions = torch.cat([positions, positions])  # (B2, length)
    key_mask = None
    if prompt_mask is not None:
        mask = torch.cat([prompt_mask, prompt_mask]) if guided else prompt_mask
        key_mask = torch.cat([mask, mask.new_ones(len(mask), max_new_tokens)], dim=1)  # (B2, P + max_new_tokens)
        if positions is None:
            positions = (key_mask.long().cumsum(dim=1) - 1).clamp_min(0)  # (B2, length)
    pos = (lambda lo, hi: None if positions is None else positions[:, lo:hi])  # noqa: E731
    new = torch.zeros(B, max_new_tokens, dtype=torch.long, device=seq.device)
    finished = torch.zeros(B, dtype=torch.bool, device=seq.device)
    cache = model.new_cache(len(seq), max(length, P)) if use_cache else None
    was_training = model.training
    model.eval()
    try:
        for t in range(max_new_tokens):
            if cache is None:  # the whole sequence again
                fed = new[:, :t].repeat(2, 1) if guided else new[:, :t]  # (B2, t)
                x = torch.cat([seq, model.token_embed(fed) if seq.is_floating_point() else fed], dim=1)
                logits = model(x, pos(0, P + t), key_mask=key_mask)[:, -1]
            elif t == 0:  # the prompt once, filling slots [0, P)
                logits = model(seq, pos(0, P), cache, 0, key_mask)[:, -1]
            else:  # only the newest token, at slot P + t - 1
                fed = new[:, t - 1:t].repeat(2, 1) if guided else new[:, t - 1:t]  # (B2, 1)
                logits = model(fed, pos(P + t - 1, P + t), cache, P + t - 1, key_mask)[:, -1]
            if guided:
                logits = cfg_logits(logits[:B], logits[B:], cfg_w)  # (B, K)
            if allowed is not None:
                logits = logits.masked_fill(~allowed[P + t], float("-inf"))
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_id), token)
                finished |= token == eos_id
            new[:, t] = token
            if eos_id is not None and bool(finished.all()):
                new[:, t + 1:] = eos_id
                break
    finally:
        model.train(was_training)
    return new


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class PixelPositions(nn.Module):
    """Position of slot s = the sub-pixel it predicts, x_{s+1} (pixel s // C, channel s % C), embedded
    as row + column + channel: what a channel means and where a pixel lies is shared across the image
    instead of learned T times over, as one table of T rows would."""

    def __init__(self, image_size, channels, dim, max_len):
        super().__init__()
        self.width, self.channels = image_size, channels
        self.row = nn.Embedding(-(-max_len // (image_size * channels)), dim)  # enough rows for the whole context
        self.column = nn.Embedding(image_size, dim)
        self.channel = nn.Embedding(channels, dim)

    def forward(self, positions):
        pixel = positions // self.channels
        return self.row(pixel // self.width) + self.column(pixel % self.width) + self.channel(positions % self.channels)


class PixelTransformer(CausalTransformer):
    """The CausalTransformer with each sub-pixel's causal neighbourhood added to its input.

    Slot s predicts sub-pixel s (0-based: pixel s // C, channel s % C); its input is the token before
    it (the class token at slot 0) plus, for each of the four neighbours of the predicted sub-pixel
    that come earlier in raster order (left, up-left, up, up-right: the causal half of a 3x3 window,
    PixelCNN's mask A), in the same channel, a learned embedding of that neighbour's value, or of
    'outside' past the image border. Attention can find those pixels from the positions alone; it
    learns to only after many steps (measured in the README). A generated token's neighbours were fed
    at earlier steps, so the KV cache also keeps the ids fed so far (cache.ids)."""

    OFFSETS = ((0, -1), (-1, -1), (-1, 0), (-1, 1))  # (row, column) of each neighbour: left, up-left, up, up-right

    def __init__(self, image_size, channels, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.width, self.channels = image_size, channels
        dim = self.token_embed.weight.shape[1]
        self.neighbour_embed = nn.ModuleList(nn.Embedding(NUM_VALUES + 1, dim) for _ in self.OFFSETS)  # id 256: outside
        for table in self.neighbour_embed:
            nn.init.normal_(table.weight, std=0.02)

    def new_cache(self, batch, max_len=None, dtype=None):
        cache = super().new_cache(batch, max_len, dtype)
        cache.ids = torch.zeros(batch, cache.max_len, dtype=torch.long, device=cache.k.device)  # ids fed so far
        return cache

    def neighbour_ids(self, ids, start=0):
        """ids: the input ids of slots [0, start + T) (B, start + T); returns (len(OFFSETS), B, T): the value
        of each neighbour of the sub-pixel predicted at slots [start, start + T), NUM_VALUES = outside."""
        end = ids.shape[1]
        s = torch.arange(start, end, device=ids.device)  # the sub-pixel each slot predicts
        row, column = s // self.channels // self.width, s // self.channels % self.width
        out = []
        for dr, dc in self.OFFSETS:
            inside = (row + dr >= 0) & (column + dc >= 0) & (column + dc < self.width)
            slot = s + (dr * self.width + dc) * self.channels + 1  # the input slot that holds that sub-pixel
            value = ids[:, slot.clamp(1, end - 1)]  # (B, T); clamped reads are masked out below
            out.append(torch.where(inside, value, torch.full_like(value, NUM_VALUES)))
        return torch.stack(out)

    def embed(self, ids, start=0, history=None):
        """Input embeddings (B, T, D) of ids at slots [start, start + T): token plus neighbours. history:
        the ids of slots [0, start + T) (default: ids, which must then start at slot 0)."""
        history = ids if history is None else history
        neighbours = self.neighbour_ids(history, start)  # (4, B, T)
        # Eq (PixelCNN mask A): h_s = E[input_s] + sum_k E_k[value of the k-th earlier neighbour of sub-pixel s]
        return self.token_embed(ids) + sum(table(n) for table, n in zip(self.neighbour_embed, neighbours))

    def forward(self, x, positions=None, cache=None, start=0, key_mask=None):
        """As CausalTransformer.forward; ids get their neighbours (from cache.ids in a cached call), float
        input is taken as whole input embeddings (see embed), uncached only: the cache must see the ids."""
        if x.is_floating_point() and cache is not None:
            raise ValueError("a cached PixelTransformer needs ids: a later token's neighbours are read from them")
        if not x.is_floating_point():
            history = None
            if cache is not None:
                cache.ids[:, start:start + x.shape[1]] = x
                history = cache.ids[:, :start + x.shape[1]]
            elif start:
                raise ValueError("a call past slot 0 needs the cache, which holds the earlier ids")
            x = self.embed(x, start, history)
        return super().forward(x, positions, cache, start, key_mask)


def build_model(cfg, num_classes, channels=3):
    """The decoder over 256 pixel values + num_classes class tokens + the null class, 256 outputs (with
    cfg.neighbours, a PixelTransformer)."""
    max_len = cfg.context or cfg.image_size ** 2 * channels
    args = (NUM_VALUES + num_classes + 1, max_len, cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.dropout,
            NUM_VALUES, PixelPositions(cfg.image_size, channels, cfg.dim, max_len))
    if cfg.neighbours:
        return PixelTransformer(cfg.image_size, channels, *args)
    return CausalTransformer(*args)


# ----------------------------------------------------------------------------------------------
# The math as pure functions
# ----------------------------------------------------------------------------------------------

def image_to_tokens(images):
    """uint8 (N, H, W, C) array or tensor -> tokens (N, T) long in raster order, channels last."""
    x = torch.as_tensor(np.asarray(images))
    # Eq (Lec12 sequence): x_img -> (x_1, ..., x_T), x_t in {0..255}, T = H W C
    return x.reshape(len(x), -1).long()  # (N, H*W*C): NHWC memory order is (row, column, channel)


def tokens_to_images(tokens, image_size, channels):
    """Inverse of image_to_tokens: (N, T) -> uint8 (N, H, W, C) numpy array."""
    return tokens.reshape(len(tokens), image_size, image_size, channels).to(torch.uint8).cpu().numpy()


def condition_tokens(labels, num_classes):
    """The first token of each sequence: 256 + class, or 256 + num_classes (null) where the label is -1."""
    labels = torch.as_tensor(labels)
    return NUM_VALUES + torch.where(labels < 0, torch.full_like(labels, num_classes), labels)


def drop_labels(labels, p_uncond, generator=None):
    """Class dropout: each label becomes -1 (null) with probability p_uncond, so one model learns p(x)
    and p(x | c) and can be guided."""
    drop = torch.rand(labels.shape, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(labels, -1), labels)


def ar_inputs(tokens, first):
    """The shift: input [first, x_1, ..., x_{T-1}] (B, T), so that slot t-1 predicts target x_t."""
    return torch.cat([first[:, None].to(tokens), tokens[:, :-1]], dim=1)


def mle_loss(logits, tokens):
    """L_MLE per dimension in nats: -1/(B T) sum_b sum_t log p(x_t | x_<t), logits (B, T, 256)."""
    # Eq (Lec12 L_MLE): L = -sum_t log p_theta(x_t | x_<t)   (averaged over the B T dimensions)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def bits_per_dim(nats, num_dims=1):
    """A negative log-likelihood of num_dims values in nats -> bits per dimension."""
    # Eq (bits/dim): bpd = L / (T ln 2)
    return nats / (num_dims * math.log(2))


# ----------------------------------------------------------------------------------------------
# Evaluation: bits/dim, class-conditional samples, the sequence-length table
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def dataset_bits_per_dim(model, images, labels, num_classes, rt, batch_size=64):
    """Mean bits/dim of uint8 images (N, H, W, C) under the model, conditioned on their labels."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(images), batch_size):
        x = image_to_tokens(images[lo:lo + batch_size]).to(rt.device)
        first = condition_tokens(labels[lo:lo + batch_size], num_classes).to(rt.device)
        with rt.autocast():
            logits = model(ar_inputs(x, first))
        total += mle_loss(logits, x).item() * x.numel()
        count += x.numel()
    model.train(was_training)
    return bits_per_dim(total / count)


def sample_images(model, labels, num_classes, image_size, channels, cfg, rt, batch_size=256):
    """Class-conditional samples uint8 (N, H, W, C) for labels (N,) (-1: unconditional), with the cache."""
    g = torch.Generator(rt.device).manual_seed(cfg.seed + 1)
    seq_len = image_size ** 2 * channels
    out = []
    for lo in range(0, len(labels), batch_size):
        y = torch.as_tensor(labels[lo:lo + batch_size])
        prompt = condition_tokens(y, num_classes)[:, None].to(rt.device)  # (B, 1)
        null = torch.full_like(prompt, NUM_VALUES + num_classes)
        w = cfg.cfg_w if num_classes > 0 else 0.0
        with rt.autocast():
            tokens = generate(model, prompt, seq_len, cfg.temperature, cfg.top_k, cfg.top_p, w, null, generator=g)
        out.append(tokens_to_images(tokens, image_size, channels))
    return np.concatenate(out)


# Copied from ddpm.alignment
def alignment(images, labels):
    """Prompt alignment: share of samples in which the detector finds the requested (shape, color)."""
    attrs = detect_attributes(images)
    return float((attrs[:, 0] * len(COLOR_NAMES) + attrs[:, 1] == np.asarray(labels)).mean())


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


def saved_activation_bytes(loss_fn):
    """Bytes autograd keeps for the backward of loss_fn() (parameters and shared storages counted
    once, parameters excluded): the activation memory of a training step, on any device."""
    seen, total = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and not isinstance(t, nn.Parameter):
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return total[0]


@torch.no_grad()
def sampling_seconds(model, seq_len, use_cache, device, probes=0):
    """Seconds to sample one sequence of seq_len tokens after a 1-token prompt. probes > 0 (recompute
    only): time the forward pass at `probes` evenly spaced lengths instead and sum their linear
    interpolation over the seq_len steps (each recompute step is one forward over the sequence so far)."""
    model.eval()
    prompt = torch.full((1, 1), NUM_VALUES, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if probes and not use_cache:
        lengths = np.unique(np.linspace(1, seq_len, probes).round().astype(int))
        times = []
        for n in lengths:
            x = torch.full((1, int(n)), NUM_VALUES, dtype=torch.long, device=device)
            model(x)  # warm-up at this length
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t0)
        return float(np.interp(np.arange(1, seq_len + 1), lengths, times).sum())
    generate(model, prompt, min(seq_len, 8), use_cache=use_cache)  # warm-up
    sync()
    t0 = time.perf_counter()
    generate(model, prompt, seq_len, use_cache=use_cache, generator=torch.Generator(device).manual_seed(0))
    sync()
    return time.perf_counter() - t0


def sequence_length_table(cfg, sizes, channels, rt, steps=3, full_recompute_tokens=800, probes=12):
    """The Lec12 bottleneck measured: for each image size, tokens T, train ms/step at cfg.table_batch,
    activation memory of one step, seconds to sample one image with and without the KV cache (the
    recompute time extrapolated from timed forwards past full_recompute_tokens tokens)."""
    rows = []
    for size in sizes:
        seq_len = size * size * channels
        torch.manual_seed(cfg.seed)
        model = build_model(dataclasses.replace(cfg, image_size=size, context=0), 18, channels).to(rt.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, NUM_VALUES, (cfg.table_batch, seq_len), device=rt.device)
        first = torch.full((cfg.table_batch,), NUM_VALUES, device=rt.device)

        def loss_fn():
            with rt.autocast():
                return mle_loss(model(ar_inputs(x, first)), x)

        if rt.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(rt.device)
        times = []
        for i in range(steps + 1):  # the first step warms up
            t0 = time.perf_counter()
            loss_fn().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row = {"image_size": size, "tokens": seq_len, "train_ms_per_step": 1000 * float(np.median(times[1:])),
               "batch": cfg.table_batch, "activation_mb": saved_activation_bytes(loss_fn) / 2 ** 20}
        if rt.device.type == "cuda":
            row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(rt.device) / 2 ** 20
        model.zero_grad(set_to_none=True)
        with rt.autocast():
            row["sample_s_cache"] = sampling_seconds(model, seq_len, True, rt.device)
            extrapolate = seq_len > full_recompute_tokens
            row["sample_s_recompute"] = sampling_seconds(model, seq_len, False, rt.device, probes if extrapolate else 0)
        row["recompute_extrapolated"] = extrapolate
        row["speedup"] = row["sample_s_recompute"] / row["sample_s_cache"]
        rows.append(row)
    return rows


def format_table(rows):
    """The sequence-length table as Markdown (the README's format)."""
    lines = ["| image | tokens T | train ms/step (batch %d) | activations MB | sample s, cache | sample s, recompute | speed-up |"
             % rows[0]["batch"], "|---|---|---|---|---|---|---|"]
    for r in rows:
        star = " (extrapolated)" if r["recompute_extrapolated"] else ""
        lines.append(f"| {r['image_size']} px | {r['tokens']} | {r['train_ms_per_step']:.0f} | {r['activation_mb']:.1f} | "
                     f"{r['sample_s_cache']:.2f} | {r['sample_s_recompute']:.1f}{star} | {r['speedup']:.0f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------

def parse_sizes(text):
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = [0]
    if any(s < 1 for s in sizes):
        raise InputError(f"--seq_table {text!r}: expected comma-separated image sizes such as 8,12,16 (or '' for none)")
    return sizes


def validate_config(cfg, data):
    """Every check that can fail before any work is done (DESIGN.md section 6)."""
    if cfg.dim % cfg.num_heads:
        raise InputError(f"--dim {cfg.dim} is not divisible by --num_heads {cfg.num_heads}")
    parse_sizes(cfg.seq_table)
    if data is not None:
        seq_len = cfg.image_size ** 2 * data["channels"]
        if cfg.context and seq_len > cfg.context:
            raise InputError(f"--image_size {cfg.image_size}: an image of {data['channels']} channels is {seq_len} tokens, "
                             f"longer than --context {cfg.context}; pass --context {seq_len} (or 0) or a smaller image")
        n = len(data["train"]["images"])
        if cfg.batch_size > n:
            raise InputError(f"--batch_size {cfg.batch_size} is larger than the {n} training images; lower it or add data")


def evaluate(model, data, cfg, rt, write_files=True):
    """Test bits/dim; with write_files also the class-conditional samples, their alignment and the grid."""
    num_classes = len(data["class_names"] or [])
    test = data["test"]
    n = min(cfg.eval_images, len(test["images"]))
    labels = test["labels"][:n] if num_classes else np.full(n, -1)
    metrics = {"test_bits_per_dim": dataset_bits_per_dim(model, test["images"][:n], labels, num_classes, rt),
               "test_images": int(n), "tokens_per_image": cfg.image_size ** 2 * data["channels"]}
    if not write_files:
        return metrics
    classes = np.unique(data["train"]["labels"]) if num_classes else np.array([-1])  # shapes: the 18 seen pairs
    wanted = np.repeat(classes, cfg.eval_per_class)
    images = sample_images(model, wanted, num_classes, cfg.image_size, data["channels"], cfg, rt)
    metrics.update(sampler=f"cfg w={cfg.cfg_w:g}, temperature {cfg.temperature:g}, top-k {cfg.top_k}, "
                   f"top-p {cfg.top_p:g}, KV cache", eval_samples=len(wanted))
    if cfg.data == "shapes":  # the detector reads only the shapes world
        metrics["alignment"] = alignment(images, wanted)
        metrics["detector_accuracy_clean"] = alignment(test["images"], test["labels"])
    names = [data["class_names"][c] for c in classes] if num_classes else ["samples"]
    save_png(os.path.join(cfg.out_dir, "samples.png"),
             labelled_rows(images.reshape(len(classes), cfg.eval_per_class, *images.shape[1:])[:, :16], names, scale=4))
    return metrics


def train(cfg):
    """Train (or, with --eval_only, evaluate) and return the final metrics."""
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
        num_classes = len(data["class_names"] or [])
        seq_len = cfg.image_size ** 2 * data["channels"]
        model = build_model(cfg, num_classes, data["channels"]).to(rt.device)
        if cfg.eval_only:
            if ckpt is None:
                raise InputError("--eval_only 1 needs --resume path/to/ckpt.pt")
            model.load_state_dict(ckpt["model"])
            metrics = evaluate(model, data, cfg, rt) if rt.master else {}
        else:
            optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, rt, betas=(0.9, 0.95))
            start = 0
            if ckpt is not None:
                model.load_state_dict(ckpt["model"])
                optimizer.load_state_dict(ckpt["optimizer"])
                start = ckpt["step"]
                set_rng_state(ckpt["rng"])
            run_model = prepare_model(model, rt)
            logger = Logger(cfg.out_dir, cfg, rt, append=ckpt is not None)
            logger.print(f"pixel_ar: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                         f"{len(data['train']['images'])} training images of {seq_len} tokens, {num_classes} classes, "
                         f"device {rt.device}, {'bf16' if rt.amp_dtype else 'fp32'}{', compiled' if rt.compile else ''}, "
                         f"world size {rt.world_size}")
            train_images = torch.as_tensor(data["train"]["images"])
            train_labels = torch.as_tensor(data["train"]["labels"]) if num_classes else None
            end = min(cfg.stop_step, cfg.max_steps) if cfg.stop_step else cfg.max_steps
            progress = Progress(cfg, rt, logger, start, end, cfg.max_steps, seq_len * model.flops_per_token(seq_len))
            share = slice(rt.rank * cfg.batch_size // rt.world_size, (rt.rank + 1) * cfg.batch_size // rt.world_size)
            for step in range(start, end):
                lr = cosine_lr(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = batch_indices(step, len(train_images), cfg.batch_size, cfg.seed)  # the global batch
                x = image_to_tokens(train_images[idx[share]]).to(rt.device, non_blocking=True)  # (B, T)
                # class dropout drawn for the global batch: DDP sees the single-process labels
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                y = drop_labels(train_labels[idx], cfg.p_uncond, g)[share] if num_classes else torch.full((len(x),), -1)
                first = condition_tokens(y, num_classes).to(rt.device)
                with rt.autocast():
                    loss = mle_loss(run_model(ar_inputs(x, first)), x)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                ckpt_now = progress.step(done, loss, lr)
                if cfg.eval_every and done % cfg.eval_every == 0 and done != end and rt.master:
                    with progress.paused():
                        bpd = evaluate(model, data, cfg, rt, write_files=False)["test_bits_per_dim"]
                    logger.print(f"step {done}: test bits/dim {bpd:.4f}")
                    logger.log({"step": done, "test_bits_per_dim": bpd})
                if ckpt_now and rt.master:
                    save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"),
                                    {"model_name": MODEL_NAME, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "step": done, "config": asdict(cfg), "rng": rng_state(), "data_position": done})
            metrics = {}
            if rt.master:
                metrics = evaluate(model, data, cfg, rt)
                metrics.update(steps=end, final_loss=progress.loss, final_train_bits_per_dim=bits_per_dim(progress.loss))
        if rt.master:
            line = f"test bits/dim {metrics['test_bits_per_dim']:.4f} on {metrics['test_images']} images"
            if "alignment" in metrics:
                line += (f"; alignment {metrics['alignment']:.3f} of {metrics['eval_samples']} samples ({metrics['sampler']}),"
                         f" detector on clean {cfg.image_size} px renders {metrics['detector_accuracy_clean']:.3f}")
            print(line, flush=True)
            sizes = parse_sizes(cfg.seq_table)
            if sizes:
                metrics["sequence_length_table"] = sequence_length_table(cfg, sizes, data["channels"], rt)
                print(format_table(metrics["sequence_length_table"]), flush=True)
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
