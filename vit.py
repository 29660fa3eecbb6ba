"""Vision Transformer (ViT): an image as a sequence of patch tokens, classified by a Transformer.

Lecture: lecture-notes.md, Lec11 "Vision Transformer". The equations, as named in the notes:

    (Lec11 patches)     N = HW / P^2,  x_p in R^{N x (P^2 C)}               -> patchify()
    (Lec11 embedding)   x = x_p W_e,   W_e in R^{(P^2 C) x D}               -> PatchEmbed, a strided conv
    (Lec11 positions)   tokens + learned position embeddings                -> ViT.pos_embed
    (Lec11 claim)       "early layers are local, later layers attend to broader regions"
                        -> mean_attention_distance(), measured on the trained model

Papers: Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words" (arXiv:2010.11929), whose
Figure 7 introduced the mean attention distance; Vaswani et al. 2017 (arXiv:1706.03762) for
attention; Huang et al. 2016 (arXiv:1603.09382) for stochastic depth (DropPath).

Conventions. Images enter the model as float tensors (B, C, H, W) in [-1, 1]; on disk and in the
data sets they are uint8 (N, H, W, C). A patch vector is ordered (row in patch, column in patch,
channel), i.e. x_p[b, n] = x[b, :, i*P:(i+1)*P, j*P:(j+1)*P] laid out as (P, P, C), with patches
n = i * (W/P) + j in raster order. Shape legend: B batch, C channels, H W image size, P patch size,
N patches, T tokens (N, or N+1 with the class token), D model width, nh heads, hd head width.

Measured (`python vit.py`, cpu preset: 800 steps of batch 128 on 32 px, 2-core CPU alone): test
accuracy 100.0% on 2000 images in 7 min 49 s to 8 min 02 s. The mean attention distance stays
at the uniform 16.6 px in every block (most queries are background); on the object's patches it
falls from 12.5 px in block 0 to 8.4 px in block 2: the claim of the notes does not show on this
data (README).

This file also owns the blocks that every model file of the project copies (the shapes world,
the runtime, checkpoints, PNG writer); each copy is marked `# Copied from vit.<name>`.

Commands:
    python vit.py                                   # cpu preset: trains, evaluates, writes out/vit/
    python vit.py --preset gpu                      # one GPU: bf16 autocast and torch.compile
    torchrun --standalone --nproc_per_node=4 vit.py --preset gpu     # DDP; --batch_size is global
    python vit.py --eval_only 1 --resume out/vit/ckpt.pt             # evaluate a checkpoint
    python tools/to_npz.py digits --out digits.npz                   # real images (tools/to_npz.py: MNIST, CIFAR, folders)
    python vit.py --data digits.npz --image_size 8 --patch_size 2    # train on them
    python vit.py --init vit_tiny.pth --eval_only 1 --data val224.npz --image_size 224  # a timm checkpoint, as it is
    python vit.py --init vit_tiny.pth --data cifar10.npz --image_size 32                # fine-tuned (new head, positions resized)

Published weights (--init, read_state_dict / timm_vit_config / load_timm_weights): a state dict in
timm's VisionTransformer layout (.pth, .bin or .safetensors) sets the architecture from its tensor
shapes; what they do not record comes from timm's conventions or a flag (--init_heads, --input_norm,
--act, --norm_eps). Checked against timm's own models: identical logits (README).
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

MODEL_NAME = "vit"


@dataclass
class Config:
    # model
    image_size: int = 32  # input height and width in pixels (shapes data is rendered at this size)
    patch_size: int = 4  # P: side of a square patch; image_size must be a multiple of it
    dim: int = 96  # D: token width
    depth: int = 6  # number of Transformer blocks
    num_heads: int = 4  # attention heads per block
    mlp_ratio: float = 2.0  # hidden width of the MLP as a multiple of D
    pool: str = "cls"  # how the image is summarised for the head: cls (class token) or mean
    drop_path: float = 0.0  # stochastic depth rate at the last block (linear from 0 at the first)
    pos_embed_cls: bool = False  # the class token has a position embedding too (timm's and CLIP's layout)
    patch_bias: bool = True  # a bias on the patch embedding (CLIP's ViTs have none)
    norm_pre: bool = False  # a LayerNorm before the first block (CLIP's ViTs and timm's *_clip_* models)
    norm_eps: float = 0.0  # LayerNorm epsilon; 0: timm's 1e-6 with --init (1e-5 for its CLIP ViTs), else 1e-5
    act: str = "gelu"  # MLP activation: gelu, or quick_gelu (x * sigmoid(1.702 x), OpenAI CLIP's weights)
    input_norm: str = "auto"  # pixels the model sees: unit ([-1, 1]), imagenet or clip mean/std; auto: imagenet with --init (clip for timm's CLIP ViTs), else unit
    # published weights
    init: str = ""  # a ViT state dict in timm's layout (.pth, .bin, .safetensors) to start from; its shapes set the architecture
    init_heads: int = 0  # attention heads of the --init weights, which their tensors do not record (0: width / 64)
    # method
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    # data
    data: str = "shapes"  # 'shapes' (built-in world) or a path to an .npz file with images and labels
    n_train: int = 20000  # shapes images rendered for training
    n_test: int = 2000  # shapes images rendered for the test split (and the heldout split)
    # optim
    max_steps: int = 800  # optimizer steps; also the length of the cosine schedule
    batch_size: int = 128  # global batch size (split across DDP ranks)
    lr: float = 2e-3  # peak learning rate
    min_lr: float = 1e-5  # learning rate at the end of the cosine decay
    warmup_steps: int = 60  # linear warm-up steps
    weight_decay: float = 0.05  # AdamW weight decay on matrices (not on norms, biases, embeddings)
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    # system
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA if supported, else fp32), float32, bfloat16
    compile: str = "auto"  # torch.compile: auto (on for CUDA), 1, 0
    seed: int = 0  # seed for the data, the initialisation and the training order
    # io
    out_dir: str = "out/vit"  # where ckpt.pt, log.jsonl, metrics.json and the PNGs go
    log_every: int = 50  # steps between progress lines
    eval_every: int = 200  # steps between test-accuracy evaluations (0: only at the end)
    ckpt_every: int = 200  # steps between checkpoints (one is always written at the end)
    resume: str = ""  # checkpoint to resume training from, or to evaluate with --eval_only 1
    stop_step: int = 0  # end this run at this step although the schedule spans max_steps (0: off)
    eval_only: bool = False  # with --resume (or --init): only evaluate the weights and write the grid


# The accepted range of each numeric field, checked before any work (check_config). A field not
# listed is an integer >= 1 or a finite float > 0.
RANGES = {"drop_path": "[0, 1)", "norm_eps": ">= 0", "init_heads": ">= 0", "label_smoothing": "[0, 1)",
          "min_lr": ">= 0", "warmup_steps": ">= 0", "weight_decay": ">= 0", "grad_clip": ">= 0", "seed": ">= 0", "eval_every": ">= 0", "stop_step": ">= 0"}

# Fields that may change when a run is resumed (any other difference is an error), and that
# --eval_only takes from the command line rather than from the checkpoint.
RUNTIME_FIELDS = ("device", "dtype", "compile", "out_dir", "log_every", "eval_every", "ckpt_every",
                  "resume", "stop_step", "eval_only", "max_steps")

# The Config defaults are the cpu preset; the others override a few fields.
PRESETS = {
    "tiny": dict(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2, n_train=256, n_test=64,
                 max_steps=6, batch_size=16, warmup_steps=2, log_every=2, eval_every=0,
                 ckpt_every=1000),
    "cpu": dict(),
    "gpu": dict(dim=384, depth=12, num_heads=6, mlp_ratio=4.0, drop_path=0.1, n_train=100000,
                n_test=10000, max_steps=10000, batch_size=512, lr=1e-3, warmup_steps=500,
                log_every=100, eval_every=2000, ckpt_every=2000),
}


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def attention_reference(q, k, v, mask=None):
    """Explicit attention; returns (output, weights). q, k, v: (B, nh, T, hd); mask: True = attend."""
    # Eq (attention, Vaswani et al.): A = softmax(Q K^T / sqrt(hd)),  out = A V
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


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


class PatchEmbed(nn.Module):
    """x = x_p W_e + b as a convolution with kernel = stride = P (same weights, one fused op)."""

    def __init__(self, patch_size, in_channels, dim, bias=True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) -> (B, N, D)


class InputNorm(nn.Module):
    """The project's pixels x in [-1, 1] mapped to the convention that published weights were
    trained with: (p - mean) / std per channel on p = (x + 1) / 2 in [0, 1]; 'unit' keeps x."""

    STATS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # timm's default for ImageNet ViTs
             "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}  # OpenAI CLIP

    def __init__(self, kind="unit"):
        super().__init__()
        self.kind = kind
        if kind != "unit":
            mean, std = self.STATS[kind]
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return x if self.kind == "unit" else ((x + 1) / 2 - self.mean) / self.std


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class ViT(nn.Module):
    """[Input norm] + patch embedding + learned positions + [class token] + pre-norm blocks + LayerNorm + head.

    pos_embed_cls gives the class token a position embedding too (timm's and CLIP's layout: the
    table holds 1 + N rows, class first); norm_pre adds CLIP's LayerNorm before the first block."""

    def __init__(self, image_size, patch_size, in_channels, dim, depth, num_heads, mlp_ratio,
                 num_classes, pool="cls", drop_path=0.0, pos_embed_cls=False, patch_bias=True, norm_pre=False,
                 norm_eps=1e-5, act="gelu", input_norm="unit"):
        super().__init__()
        self.patch_size, self.pool = patch_size, pool
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.num_pos_prefix = int(pos_embed_cls)  # class-token rows at the head of pos_embed
        self.input_norm = InputNorm(input_norm)
        self.patch_embed = PatchEmbed(patch_size, in_channels, dim, patch_bias)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_pos_prefix + self.grid[0] * self.grid[1], dim) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.norm_pre = nn.LayerNorm(dim, eps=norm_eps) if norm_pre else nn.Identity()
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, r, norm_eps, act) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def encode(self, x, return_attn=False):
        """Image (B, C, H, W) -> normalised tokens (B, T, D) [and per-block attention weights]."""
        B, C, H, W = x.shape
        grid = (H // self.patch_size, W // self.patch_size)
        pos = self.pos_embed if grid == self.grid else resize_pos_embed(self.pos_embed, self.grid, grid,
                                                                        self.num_pos_prefix)
        # Eq (Lec11 embedding): x = x_p W_e, then add the position embeddings
        tokens = self.patch_embed(self.input_norm(x))  # (B, N, D)
        if self.num_pos_prefix == 0:
            tokens = tokens + pos
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)  # (B, N+1, D)
        if self.num_pos_prefix:
            tokens = tokens + pos
        tokens = self.norm_pre(tokens)
        attns = []
        for block in self.blocks:
            tokens = block(tokens, return_attn=return_attn)
            if return_attn:
                tokens, weights = tokens
                attns.append(weights)
        tokens = self.norm(tokens)
        return (tokens, attns) if return_attn else tokens

    def forward(self, x, return_attn=False):
        tokens = self.encode(x, return_attn)
        tokens, attns = tokens if return_attn else (tokens, None)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(dim=1)  # (B, D)
        logits = self.head(pooled)
        return (logits, attns) if return_attn else logits

    def flops_per_image(self):
        """Training FLOPs per image (forward + backward): 6 per matmul weight per token + attention."""
        N = self.grid[0] * self.grid[1]
        T = N + (self.cls_token is not None)
        D, L = self.pos_embed.shape[2], len(self.blocks)
        matmul_params = sum(p.numel() for n, p in self.named_parameters() if p.dim() >= 2 and "embed" not in n)
        patch_params = self.patch_embed.proj.weight.numel()
        return 6 * matmul_params * T + 6 * patch_params * N + 12 * L * T * T * D


def build_model(cfg, num_classes, in_channels=3):
    cfg = resolve_auto_fields(cfg)
    return ViT(cfg.image_size, cfg.patch_size, in_channels, cfg.dim, cfg.depth, cfg.num_heads,
               cfg.mlp_ratio, num_classes, cfg.pool, cfg.drop_path, cfg.pos_embed_cls, cfg.patch_bias,
               cfg.norm_pre, cfg.norm_eps, cfg.act, cfg.input_norm)


# ----------------------------------------------------------------------------------------------
# The math as pure functions
# ----------------------------------------------------------------------------------------------

def patchify(x, patch_size):
    """(B, C, H, W) -> x_p (B, N, P*P*C), patch vectors ordered (row, column, channel)."""
    B, C, H, W = x.shape
    P = patch_size
    # Eq (Lec11 patches): N = H W / P^2,  x_p in R^{N x (P^2 C)}
    x = x.reshape(B, C, H // P, P, W // P, P)  # (B, C, H/P, P, W/P, P)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // P) * (W // P), P * P * C)  # (B, N, P*P*C)


def unpatchify(x_p, patch_size, height, width):
    """Inverse of patchify: (B, N, P*P*C) -> (B, C, H, W)."""
    B, N, K = x_p.shape
    P = patch_size
    C = K // (P * P)
    x = x_p.reshape(B, height // P, width // P, P, P, C)  # (B, H/P, W/P, P, P, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, height, width)  # (B, C, H, W)


def patch_embedding_matrix(conv):
    """The conv's weights as W_e (P*P*C, D), so that conv(x) == patchify(x) @ W_e + b."""
    D = conv.weight.shape[0]
    return conv.weight.permute(0, 2, 3, 1).reshape(D, -1).T  # (D, C, P, P) -> (P*P*C, D)


def resize_pos_embed(pos_embed, old_grid, new_grid, num_prefix_tokens=0):
    """Bicubic resize (antialiased when shrinking, as timm does) of learned position embeddings
    (1, [prefix +] gh*gw, D) to another patch grid; the rows of prefix tokens (a class token's) are
    kept as they are."""
    D = pos_embed.shape[-1]
    prefix, pos_embed = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = pos_embed.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)], dim=1)  # (1, [1 +] N', D)


def classification_loss(logits, labels, label_smoothing=0.0):
    # Eq (cross-entropy): L = -1/B sum_b log softmax(logits_b)[y_b]  (optionally smoothed targets)
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def mean_attention_distance(attn, grid, patch_size, num_prefix_tokens=1, query_mask=None):
    """Attention-weighted mean pixel distance between query and key patches, per head (nh,).

    As in ViT's Figure 7: for each query patch, sum_j a_ij * ||pos_i - pos_j||, averaged over
    queries and images. Prefix tokens (the class token) are dropped and each query's weights over
    the patches renormalised, so the number is a distance in pixels between patch centres.
    query_mask (B, N), optional, keeps only some query patches (e.g. those showing the object).
    """
    a = attn[:, :, num_prefix_tokens:, num_prefix_tokens:].float()  # (B, nh, N, N)
    a = a / a.sum(dim=-1, keepdim=True)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).float() * patch_size  # (N, 2)
    dist_px = torch.cdist(centres, centres).to(a.device)  # (N, N)
    # Eq (ViT Fig. 7, the Lec11 claim measured): d_i = sum_j a_ij ||pos_i - pos_j||
    per_query = (a * dist_px).sum(dim=-1)  # (B, nh, N)
    if query_mask is None:
        return per_query.mean(dim=(0, 2))
    weights = query_mask[:, None, :].float()  # (B, 1, N)
    return (per_query * weights).sum(dim=(0, 2)) / weights.sum(dim=(0, 2)).clamp_min(1)


# ----------------------------------------------------------------------------------------------
# Published weights: timm's layout
# ----------------------------------------------------------------------------------------------
# vit.py names its modules as timm's VisionTransformer does (patch_embed.proj, cls_token, pos_embed,
# blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2, norm, head), so a timm state
# dict loads key for key. What the tensors do not record comes from flags: the heads (--init_heads,
# else width / 64 as in every timm ViT), the pixel statistics (--input_norm, ImageNet's by default),
# the activation (--act quick_gelu for timm's *_quickgelu models), LayerNorm eps (timm's 1e-6, and
# 1e-5 for its CLIP ViTs, the ones with norm_pre).

def read_state_dict(path, flag="--init"):
    """(state dict, the project checkpoint's config or None) from a .safetensors file (read here, no
    package needed; little-endian, as every machine torch runs on), a torch file (.pth, .bin, .pt:
    torch.load with weights_only=True, so that no code in it runs), a TorchScript archive (OpenAI's
    CLIP releases: only its tensors are read), or a checkpoint of this project."""
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file")
    if path.endswith(".safetensors"):
        # The format: an 8-byte little-endian header size n, n bytes of JSON {name: {dtype, shape,
        # data_offsets: [begin, end)} (offsets into the bytes after the header), then the data.
        dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                  "U8": torch.uint8, "BOOL": torch.bool}
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header, data = json.loads(f.read(n)), bytearray(f.read())
            header.pop("__metadata__", None)
            sd = {}
            for name, info in header.items():
                begin, end = info["data_offsets"]
                flat = torch.frombuffer(data, dtype=dtypes[info["dtype"]], count=math.prod(info["shape"]), offset=begin) \
                    if end > begin else torch.empty(0, dtype=dtypes[info["dtype"]])
                sd[name] = flat.reshape(info["shape"]).clone()
        except Exception as e:
            raise InputError(f"{flag} {path}: not a readable .safetensors file ({type(e).__name__}: {e})") from None
        return sd, None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        try:  # OpenAI's CLIP files are TorchScript archives: their weights are read, their code never run
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception:
            raise InputError(f"{flag} {path}: not a readable weights file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
    saved = obj.get("config") if isinstance(obj, dict) and "model_name" in obj else None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise InputError(f"{flag} {path}: expected a state dict (names -> tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}, saved


def timm_vit_config(sd, num_heads=0):
    """The Config fields that a timm-layout ViT state dict fixes, read off its tensor shapes."""
    need = ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight",
            "blocks.0.mlp.fc1.weight", "norm.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise InputError(f"--init: not a class-token ViT state dict in timm's layout (no {', '.join(missing)}; "
                         f"it has {', '.join(list(sd)[:4])}, ...)")
    D, _, P, P2 = sd["patch_embed.proj.weight"].shape
    L = sd["pos_embed"].shape[1]
    if math.isqrt(L - 1) ** 2 == L - 1:
        pos_embed_cls = True  # timm's default: the class token has a position too
    elif math.isqrt(L) ** 2 == L:
        pos_embed_cls = False  # no_embed_class=True (and vit.py's own layout)
    else:
        raise InputError(f"--init: pos_embed has {L} rows, neither a square grid nor 1 + a square grid")
    heads = num_heads or D // 64
    if P != P2 or heads < 1 or D % heads:
        raise InputError(f"--init: width {D} with {heads} heads and patch {P}x{P2}: pass --init_heads "
                         f"with the checkpoint's number of heads")
    return dict(patch_size=P, dim=D, num_heads=heads, pool="cls", pos_embed_cls=pos_embed_cls,
                depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D, norm_pre="norm_pre.weight" in sd,
                patch_bias="patch_embed.proj.bias" in sd)


def resolve_auto_fields(cfg):
    """The 'auto' defaults made concrete: timm's conventions with --init (its ImageNet ViTs: eps 1e-6
    and ImageNet statistics; its CLIP ViTs, the ones with norm_pre: CLIP's 1e-5 and statistics),
    the project's without."""
    timm_imagenet, timm_clip = bool(cfg.init) and not cfg.norm_pre, bool(cfg.init) and cfg.norm_pre
    auto_norm = "imagenet" if timm_imagenet else "clip" if timm_clip else "unit"
    return dataclasses.replace(cfg, norm_eps=cfg.norm_eps or (1e-6 if timm_imagenet else 1e-5),
                               input_norm=auto_norm if cfg.input_norm == "auto" else cfg.input_norm)


def init_config(cfg):
    """With --init: the config with the architecture of the weights (and, for a checkpoint of this
    project, its conventions), the auto fields resolved; returns (cfg, state dict or None)."""
    if not cfg.init or (cfg.eval_only and cfg.resume):
        return resolve_auto_fields(cfg), None
    sd, saved = read_state_dict(cfg.init)
    arch = timm_vit_config(sd, cfg.init_heads or (saved or {}).get("num_heads", 0))
    if saved is not None:  # ours: same names, and the conventions it was trained with
        arch.update(act=saved.get("act", "gelu"))
        arch.update(norm_eps=cfg.norm_eps or saved.get("norm_eps", 1e-5),
                    input_norm=saved.get("input_norm", "unit") if cfg.input_norm == "auto" else cfg.input_norm)
    return resolve_auto_fields(dataclasses.replace(cfg, **arch)), sd


def load_timm_weights(model, sd, keep_head=True):
    """Load a timm-layout ViT state dict into `model`, position embeddings resized to the model's
    grid. Every tensor of the file must be used and every parameter set, or one error says which."""
    sd = dict(sd)
    for key in ("head.weight", "head.bias") if not keep_head else ():
        sd.pop(key, None)
    own = model.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        prefix = model.num_pos_prefix
        side = math.isqrt(sd["pos_embed"].shape[1] - prefix)
        if side * side + prefix == sd["pos_embed"].shape[1]:
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"].float(), (side, side), model.grid, prefix)
    unused = [k for k in sd if k not in own]
    unset = [k for k in own if k not in sd and not (k.startswith("head.") and not keep_head)]
    misshapen = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
                 if k in own and sd[k].shape != own[k].shape]
    if unused or unset or misshapen:
        parts = [f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}" for what, keys in
                 (("tensors vit.py's ViT has no place for", unused), ("parameters the file does not set", unset),
                  ("shapes that differ (file vs model)", misshapen)) if keys]
        raise InputError("--init: the weights do not fit the model; " + "; ".join(parts))
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in sd.items()}})


def timm_state_dict(model):
    """The model's weights in timm's layout (a file timm's VisionTransformer loads with the same
    class_token / no_embed_class / pre_norm settings): the names are already timm's."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Evaluation: accuracy, attention distances, the prediction grid
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model, images, rt, batch_size=500):
    """Logits for uint8 images (N, H, W, C), in eval mode, batched."""
    was_training = model.training
    model.eval()
    out = []
    for lo in range(0, len(images), batch_size):
        x = images_to_tensor(images[lo:lo + batch_size]).to(rt.device)
        with rt.autocast():
            out.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def attention_distances(model, images, rt):
    """Mean attention distance per block in pixels: over heads (mean, min, max) for all query
    patches, and the mean for the query patches that show part of the object (not pure black)."""
    model.eval()
    x = images_to_tensor(images).to(rt.device)
    _, attns = model(x, return_attn=True)
    prefix = 1 if model.cls_token is not None else 0
    on_object = patchify(x, model.patch_size).amax(dim=-1) > -0.9  # (B, N): some pixel is lit
    rows = []
    for layer, a in enumerate(attns):
        heads = mean_attention_distance(a, model.grid, model.patch_size, prefix).cpu()
        on_obj = mean_attention_distance(a, model.grid, model.patch_size, prefix, on_object).mean().item()
        rows.append({"layer": layer, "mean": heads.mean().item(), "min": heads.min().item(),
                     "max": heads.max().item(), "object_queries": on_obj})
    return rows


def prediction_grid(images, predicted, labels, class_names, ncols=8):
    """Test images, each with its predicted class below (green if right, red with the truth if wrong)."""
    scale = max(1, 72 // images.shape[1])
    h, w = images.shape[1] * scale, images.shape[2] * scale
    tiles = []
    for img, p, y in zip(images, predicted, labels):
        tile = np.zeros((h + 14, max(w, 72), 3), dtype=np.uint8)
        big = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
        tile[:h, :w] = big if big.shape[2] == 3 else np.repeat(big, 3, axis=2)
        right = p == y
        draw_text(tile, class_names[p][:18], 0, h + 1, (80, 255, 80) if right else (255, 80, 80))
        if not right:
            draw_text(tile, class_names[y][:18], 0, h + 8, (200, 200, 200))
        tiles.append(tile)
    return image_grid(np.stack(tiles), ncols)


def evaluate(model, data, cfg, rt, write_files=True):
    """Test accuracy, attention distances, the prediction grid; returns the metrics."""
    logits = predict(model, data["test"]["images"], rt)
    predicted = logits.argmax(dim=1).numpy()
    labels = data["test"]["labels"]
    metrics = {"test_accuracy": float((predicted == labels).mean()), "test_size": int(len(labels))}
    if write_files:
        # The first mistakes (up to 16), then correct predictions, 32 in all.
        wrong, right = np.flatnonzero(predicted != labels), np.flatnonzero(predicted == labels)
        show = np.concatenate([wrong[:16], right[:32 - min(16, len(wrong))]])
        save_png(os.path.join(cfg.out_dir, "predictions.png"), prediction_grid(
            data["test"]["images"][show], predicted[show], labels[show], data["class_names"]))
        metrics["attention_distance"] = attention_distances(model, data["test"]["images"][:256], rt)
    return metrics


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def validate_config(cfg, data):
    """Every check that can fail before any work is done (DESIGN.md section 6)."""
    if cfg.image_size % cfg.patch_size:
        raise InputError(f"--image_size {cfg.image_size} is not divisible by --patch_size {cfg.patch_size}; "
                         f"pick a patch size that divides it (e.g. {next(p for p in (4, 2, 1) if cfg.image_size % p == 0)})")
    if cfg.dim % cfg.num_heads:
        raise InputError(f"--dim {cfg.dim} is not divisible by --num_heads {cfg.num_heads}")
    if cfg.pool not in ("cls", "mean"):
        raise InputError(f"--pool {cfg.pool}: expected cls or mean")
    if cfg.pos_embed_cls and cfg.pool != "cls":
        raise InputError("--pos_embed_cls 1 needs the class token (--pool cls)")
    if cfg.act not in ("gelu", "quick_gelu"):
        raise InputError(f"--act {cfg.act}: expected gelu or quick_gelu")
    if cfg.input_norm not in ("auto", "unit", *InputNorm.STATS):
        raise InputError(f"--input_norm {cfg.input_norm}: expected auto, unit, {' or '.join(InputNorm.STATS)}")
    if data is not None:
        if "labels" not in data["train"]:
            raise InputError(f"--data {cfg.data}: a classifier needs a 'labels' array")
        if cfg.input_norm != "unit" and data["channels"] != 3:
            raise InputError(f"--input_norm {cfg.input_norm} needs RGB images; --data {cfg.data} has "
                             f"{data['channels']} channel (tools/to_npz.py --rgb converts it)")
        if cfg.batch_size > len(data["train"]["labels"]):
            raise InputError(f"--batch_size {cfg.batch_size} is larger than the {len(data['train']['labels'])} "
                             f"training images; lower it or add data")


def train(cfg):
    """Train (or, with --eval_only, evaluate) and return the final metrics."""
    t_start = time.time()
    cfg, init_sd = init_config(cfg)
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
        init_classes = init_sd["head.weight"].shape[0] if init_sd is not None and "head.weight" in init_sd else 0
        if cfg.eval_only:
            if ckpt is None and init_sd is None:
                raise InputError("--eval_only 1 needs --resume path/to/ckpt.pt or --init weights")
            if ckpt is None and init_classes != num_classes:
                raise InputError(f"--eval_only 1 --init {cfg.init}: its head has {init_classes} classes and --data "
                                 f"{cfg.data} has {num_classes}; evaluating needs the same classes")
            if ckpt is not None:
                model.load_state_dict(ckpt["model"])
            else:
                load_timm_weights(model, init_sd)
            metrics = evaluate(model, data, cfg, rt) if rt.master else {}
            if rt.master:
                source = f"checkpoint {cfg.resume} (step {ckpt['step']})" if ckpt is not None else f"--init {cfg.init}"
                print(f"test accuracy {metrics['test_accuracy']:.4f} of {source}")
            return finish_run(cfg, rt, metrics, t_start)
        if ckpt is None and init_sd is not None:
            load_timm_weights(model, init_sd, keep_head=init_classes == num_classes)
            if rt.master:
                print(f"vit: weights from --init {cfg.init}" + ("" if init_classes == num_classes else
                      f"; its {init_classes}-class head replaced by a new one for the {num_classes} classes of the data"))
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, rt)
        start = 0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start = ckpt["step"]
            set_rng_state(ckpt["rng"])
        run_model = prepare_model(model, rt)
        logger = Logger(cfg.out_dir, cfg, rt, append=ckpt is not None)
        logger.print(f"vit: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                     f"{len(data['train']['labels'])} training images, {num_classes} classes, device {rt.device}, "
                     f"{'bf16' if rt.amp_dtype else 'fp32'}{', compiled' if rt.compile else ''}, world size {rt.world_size}")
        train_images = torch.as_tensor(data["train"]["images"])
        train_labels = torch.as_tensor(data["train"]["labels"])
        end = min(cfg.stop_step, cfg.max_steps) if cfg.stop_step else cfg.max_steps
        progress = Progress(cfg, rt, logger, start, end, cfg.max_steps, model.flops_per_image())
        for step in range(start, end):
            lr = cosine_lr(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = batch_indices(step, len(train_labels), cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
            x = images_to_tensor(train_images[idx]).to(rt.device, non_blocking=True)
            y = train_labels[idx].to(rt.device, non_blocking=True)
            with rt.autocast():
                loss = classification_loss(run_model(x), y, cfg.label_smoothing)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            ckpt_now = progress.step(done, loss, lr)
            if cfg.eval_every and done % cfg.eval_every == 0 and done != end and rt.master:
                with progress.paused():
                    acc = evaluate(model, data, cfg, rt, write_files=False)["test_accuracy"]
                logger.print(f"step {done}: test accuracy {acc:.4f}")
                logger.log({"step": done, "test_accuracy": acc})
            if ckpt_now and rt.master:
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"),
                                {"model_name": MODEL_NAME, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "step": done, "config": asdict(cfg), "rng": rng_state(), "data_position": done})
        metrics = {}
        if rt.master:
            metrics = evaluate(model, data, cfg, rt)
            metrics.update(steps=end, final_loss=progress.loss)
            logger.print(f"test accuracy {metrics['test_accuracy']:.4f}")
            logger.print("mean attention distance (px) per layer, all queries / object queries: " + "  ".join(
                f"{r['layer']}:{r['mean']:.1f}/{r['object_queries']:.1f}" for r in metrics["attention_distance"]))
        return finish_run(cfg, rt, metrics, t_start)
    finally:
        cleanup_runtime(rt)


def main(argv=None):
    cfg = parse_config(Config, PRESETS, argv, description=__doc__.split("\n")[0])
    try:
        return train(cfg)
    except InputError as e:
        sys.exit(f"error: {e}")


# ==============================================================================================
# Plumbing: owned by this file; every model file carries a checked copy of it, the same blocks
# in the same order (the shapes world and .npz loading, runtime, logging and checkpoints, PNG and
# font). None of it is specific to the ViT; a reader can stop here.
# ==============================================================================================


# ---- the shapes world and .npz loading

SHAPES = ("circle", "square", "triangle")
COLOR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
COLOR_RGB = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                      [0, 255, 255], [255, 255, 255]], dtype=np.float32)
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
# The (shape, color) pairs never rendered in train/test: the compositional zero-shot split.
HELDOUT_PAIRS = (("circle", "green"), ("square", "magenta"), ("triangle", "cyan"))
SPLITS = ("train", "test", "heldout")
HALF_EXTENT = (0.25, 0.40)  # half the shape's side, as a fraction of a grid cell, small / large
JITTER = 0.08  # uniform jitter of the centre, as a fraction of a grid cell
# How often a caption names the shape, color, size and position, each on its own (a caption that
# would name none is redrawn): 16% of captions name just the shape and color ("a red circle"),
# 16% all four, 4% only the color.
CAPTION_NAME_PROB = (0.8, 0.8, 0.5, 0.5)


class InputError(ValueError):
    """Bad input from the user (a flag, a data file, a checkpoint): reported as one clear line."""


def shapes_class_names():
    """Class index = shape * len(COLOR_NAMES) + color; name 'red circle'."""
    return [f"{c} {s}" for s in SHAPES for c in COLOR_NAMES]


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


def render_shapes(attrs, jitter, image_size):
    """Anti-aliased renders (n, S, S, 3) uint8 of one shape each on a black background."""
    cell = image_size / 3.0
    cy = (attrs[:, 3] // 3 + 0.5 + jitter[:, 0]) * cell
    cx = (attrs[:, 3] % 3 + 0.5 + jitter[:, 1]) * cell
    h = np.array(HALF_EXTENT)[attrs[:, 2]] * cell
    coverage = shape_coverage(attrs[:, 0], cx, cy, h, image_size)
    return np.round(coverage[..., None] * COLOR_RGB[attrs[:, 1]][:, None, None, :]).astype(np.uint8)


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


def shapes_split(split, n, image_size, seed):
    """One split of the shapes world as a dict: images, labels, attributes, captions, and
    caption_attributes (n, 4), the attributes each caption names, -1 where it leaves one out."""
    attrs, jitter, phrasing, named = shapes_attributes(split, n, seed)
    return {"images": render_shapes(attrs, jitter, image_size),
            "labels": attrs[:, 0] * len(COLOR_NAMES) + attrs[:, 1],
            "attributes": attrs,
            "captions": [shapes_caption(a, p, m) for a, p, m in zip(attrs, phrasing, named)],
            "caption_attributes": np.where(named, attrs, -1)}


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


def images_to_tensor(images):
    """uint8 (N, H, W, C) array or tensor -> float (N, C, H, W) in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x):
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C) numpy array (values clipped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


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


def config_help(config_cls):
    """Each Config field's trailing comment, read from the source: the comment is the --help."""
    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.M)}


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


def cleanup_runtime(rt):
    if rt.world_size > 1 and dist.is_initialized():
        dist.barrier()  # rank 0 may still be evaluating; tearing gloo down under it aborts
        # A gloo worker thread frees each finished collective after it completes, and freeing a
        # tensor that Python let go of needs the GIL; the group's destructor (run when the DDP
        # wrapper dies, after this) joins those threads while holding the GIL. Sleeping releases
        # it so the workers finish first (a two-rank test run hung there once, torch 2.13).
        time.sleep(0.1)
        dist.destroy_process_group()


def prepare_model(model, rt):
    """Move to the device, then compile and wrap in DDP as the runtime says; returns the model to call."""
    model.to(rt.device)
    run_model = torch.compile(model) if rt.compile else model
    if rt.world_size > 1:
        run_model = nn.parallel.DistributedDataParallel(run_model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    return run_model


def make_optimizer(model, lr, weight_decay, rt, betas=(0.9, 0.999)):
    """AdamW with decay on matrices only (not norms, biases, embeddings); fused on CUDA."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "embed" not in n and "token" not in n]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=rt.device.type == "cuda")


def cosine_lr(step, max_steps, lr, min_lr, warmup_steps):
    """Linear warm-up to lr, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ---- logging and checkpoints


def peak_flops(device):
    """Dense bf16 peak FLOP/s of known GPUs, for MFU; None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40": 181e12, "4090": 165e12, "A6000": 155e12, "3090": 71e12}
    return next((v for k, v in table.items() if k in name), None)


def format_progress(step, total, loss, lr, ms_per_step, items_per_s, eta_s, mfu=None, unit="img"):
    """One fixed-width progress line."""
    eta = f"{int(eta_s // 3600):d}:{int(eta_s % 3600 // 60):02d}:{int(eta_s % 60):02d}"
    line = (f"step {step:>7d}/{total:<7d} | loss {loss:9.4f} | lr {lr:.2e} | {ms_per_step:8.1f} ms/step"
            f" | {items_per_s:9.1f} {unit}/s | eta {eta}")
    return line + (f" | mfu {100 * mfu:5.1f}%" if mfu is not None else "")


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


def finish_run(cfg, rt, metrics, t_start):
    """Rank 0 adds the wall time and writes metrics.json; every rank returns the metrics."""
    if rt.master:
        metrics["wall_time_s"] = time.time() - t_start
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def check_finite(loss_value, step, out_dir):
    """Stop on a non-finite loss, leaving the last checkpoint (written only at finite steps) intact."""
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"non-finite loss ({loss_value}) at step {step}; the last good checkpoint "
                                 f"is {os.path.join(out_dir, 'ckpt.pt')} if one was written; lower --lr")


def rng_state():
    """Every RNG this process uses, as plain data (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    """Atomic: write a temporary file, then rename it over the old checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
FONT = dict(zip("abcdefghijklmnopqrstuvwxyz0123456789 .:-/%=<>?,()+'_", (
    "25755 65656 34443 65556 74647 74644 34553 55755 72227 11152 55655 44447 57755 65555 25552 65644 "
    "25563 65655 34216 72222 55557 55552 55775 55255 55222 71247 75557 26227 61247 61216 55711 74616 "
    "34652 71222 25252 25316 00000 00002 02020 00700 11244 51245 07070 12421 42124 61202 00024 12221 "
    "42224 02720 22000 00007").split()))


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
