"""CLIP: contrastive image-text pretraining, zero-shot classification and retrieval.

Lecture: lecture-notes.md, Lec11 "CLIP: Learn Vision from Language Supervision". The equations, as
named in the notes:

    (Lec11 CLIP similarity)  s_ij = f_I(x_i)^T f_T(y_j) / tau, f unit-norm   -> clip_similarity()
    (Lec11 CLIP)             L_img  = -1/N sum_i log( e^{s_ii} / sum_j e^{s_ij} )
                             L_text = -1/N sum_i log( e^{s_ii} / sum_j e^{s_ji} )
                             L_CLIP = (L_img + L_text) / 2                   -> clip_loss()
    (Lec11 claim)            "enables strong zero-shot transfer"            -> zero_shot_log_probs()
                             CLIP's rule: class embedding = normalised mean of its prompts'
                             embeddings, p(c | x) = softmax_c(s(x, c)), measured on the test split
                             and on the (shape, color) pairs never seen in training

f_I is the ViT of vit.py in CLIP's layout (LayerNorm before and after the blocks, the class token
projected into the joint space); f_T is a causal Transformer over UTF-8 bytes, read out at the
end-of-text token and projected likewise. Both start from OpenAI CLIP's initialisation
(init_tower). 1/tau = exp(logit_scale) is learned, starts at 1/tau_init (CLIP's tau = 0.07) and is
clamped at 100 after every step. Under DDP each rank gathers every rank's embeddings with their
gradients and scores its own n rows against all N columns (open_clip's local loss): O(nN) memory
per rank, and the averaged gradient is exactly that of L_CLIP on the global batch.

Zero-shot classification never trains on a label: the 21 (shape, color) classes become prompts
written the way the world writes a caption that names a shape and a color ("a red circle", "there
is a red circle", "red circle"), and CLIP's rule (paper section 3.1.4) averages each class's
normalised prompt embeddings into one class embedding. `--zero_shot softmax_sum` instead sums the
model's softmax over all 90 captions the world can write that name the class (every size and
position, or none, in every phrasing). Captions are partial ("a circle", "something red on the
left"), so a batch holds pairs whose captions also describe other images of the batch; L_CLIP counts
them as negatives, as CLIP does with web captions. The heldout split shows only pairs such as "green
circle" that no training caption contains, so there the text encoder must compose a color and a
shape it only ever saw apart. Retrieval recall@k counts a hit when the retrieved caption describes
the image (every attribute it names is the image's), not only its own partner.
Measured alone on a 2-core machine (`python clip.py`, the cpu preset: 2000 steps of batch 96,
7 min 39 s): zero-shot (shape, color) accuracy 99.9% on the test split by CLIP's rule (chance
4.8%), 72.2% on the heldout pairs; the bare prompt "a red circle" 99.9% / 70.5%; the softmax-sum
ensemble 99.9% / 72.2%; seeds 1 to 3 (one thread each, beside another run): 100.0%, 99.9%,
100.0%. Circles and squares, which differ only at their corners, are the last thing the model
tells apart. From timm's std 0.02 for every matrix (vit.py's init) the image tower starts with
every image embedded alike (cosine 1.000 between any two), the texts "circle" and "square" and the
images of the two then collapse together (text cosine 0.997, a linear probe on the image
embeddings 67%), and whether a run ever separated them was a matter of the seed (98.4%, 66.4%,
80.2% at seeds 0-2 with the temperature starting at 0.02); from OpenAI's initialisation every seed
separates them by step 1000 (README: the runs).
At patch 8 (16 tokens) the model never told circles from squares (65.7% by CLIP's rule after 1500
steps, the old initialisation); 4-pixel patches did.

Papers: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (arXiv:2103.00020); Cherti et al. 2022, open_clip's scaling study (arXiv:2212.07143);
Dosovitskiy et al. 2020, ViT (arXiv:2010.11929).

Conventions. Images enter the model as float (B, C, H, W) in [-1, 1]; on disk they are uint8
(N, H, W, C). Text is bytes (ByteTokenizer): ids 0..255 are UTF-8 bytes, 256 PAD, 257 BOS, 258 EOS;
a caption is [BOS] bytes [EOS] [PAD]..., and one that does not fit the context is an error. Both
embeddings are L2-normalised, so tau * s_ij is a cosine. Shape legend: B batch, N pairs in the
global batch, n pairs on one rank, E joint width, T tokens, D token width.

This file owns the byte tokenizer (ByteTokenizer), which llava.py, vqgan.py and sd3_mini.py copy.

Commands:
    python clip.py                                  # cpu preset: trains, evaluates, writes out/clip/
    python clip.py --preset gpu                     # one GPU: bf16 autocast and torch.compile
    torchrun --standalone --nproc_per_node=4 clip.py --preset gpu     # DDP; --batch_size is global
    python clip.py --eval_only 1 --resume out/clip/ckpt.pt            # evaluate a checkpoint
    python clip.py --data pairs.npz --image_size 28 --patch_size 4  # images, captions [labels, class_names]
    python tools/to_npz.py cifar10 cifar-10-python.tar.gz --out c10.npz --captions "an image of a {}"  # such a file
    python clip.py --init ViT-B-32.pt --eval_only 1 --data c10.npz --image_size 224   # OpenAI's tower: its features
    python clip.py --init ViT-B-32.pt --data c10.npz --image_size 32                  # its tower, a new text encoder

Published weights (--init, openai_visual_config / load_openai_visual): the image tower of an OpenAI
CLIP file (its TorchScript .pt, or open_clip's .bin / .safetensors, which keep OpenAI's names); its
shapes set the tower, QuickGELU and CLIP's pixel statistics are the defaults. The text tower is
not loaded (it reads BPE tokens; this file's reads bytes), so --eval_only with --init measures the
tower by the nearest class mean of its embeddings. Checked against open_clip's models (README).
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

MODEL_NAME = "clip"


@dataclass
class Config:
    # model
    image_size: int = 32  # input height and width in pixels (shapes data is rendered at this size)
    patch_size: int = 4  # P: side of a square patch; image_size must be a multiple of it
    dim: int = 64  # D: token width of the image encoder (ViT)
    depth: int = 4  # image encoder blocks
    num_heads: int = 4  # image encoder attention heads
    mlp_ratio: float = 2.0  # hidden width of every MLP as a multiple of its block's width
    text_dim: int = 64  # token width of the text encoder
    text_depth: int = 2  # text encoder blocks
    text_heads: int = 2  # text encoder attention heads
    context_length: int = 64  # text tokens with BOS and EOS; a longer caption is an error
    embed_dim: int = 64  # E: width of the joint image-text space
    tau_init: float = 0.07  # initial temperature tau of the learned logit scale log(1/tau) (CLIP's 0.07), 0.01 to 1
    patch_bias: bool = True  # a bias on the image encoder's patch embedding (OpenAI CLIP's has none)
    act: str = "auto"  # image encoder MLP activation: gelu or quick_gelu; auto: quick_gelu with --init (OpenAI's), else gelu
    input_norm: str = "auto"  # pixels the image encoder sees: unit ([-1, 1]), imagenet or clip mean/std; auto: clip with --init, else unit
    # published weights
    init: str = ""  # an image tower in OpenAI CLIP's layout (visual.*: its .pt, open_clip's .bin or .safetensors) to start from; its shapes set the tower
    init_heads: int = 0  # attention heads of the --init tower, which its tensors do not record (0: width / 64)
    # evaluation
    zero_shot: str = "mean"  # zero-shot rule: mean (CLIP's: average each class's prompt embeddings) or softmax_sum
    # data
    data: str = "shapes"  # 'shapes' (built-in world) or an .npz with images and captions (labels optional)
    n_train: int = 20000  # shapes image-caption pairs rendered for training
    n_test: int = 2000  # shapes pairs rendered for the test split (and the heldout split)
    # optim
    max_steps: int = 2000  # optimizer steps; also the length of the cosine schedule
    batch_size: int = 96  # N: global batch of pairs, the negatives of each other (split across DDP ranks)
    lr: float = 2e-3  # peak learning rate
    min_lr: float = 1e-5  # learning rate at the end of the cosine decay
    warmup_steps: int = 150  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW weight decay on matrices (not on norms, biases, embeddings, logit scale)
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    # system
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA if supported, else fp32), float32, bfloat16
    compile: str = "auto"  # torch.compile: auto (on for CUDA), 1, 0
    seed: int = 0  # seed for the data, the initialisation and the training order
    # io
    out_dir: str = "out/clip"  # where ckpt.pt, log.jsonl, metrics.json and the PNGs go
    log_every: int = 50  # steps between progress lines
    eval_every: int = 1000  # steps between zero-shot and retrieval evaluations (0: only at the end)
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    resume: str = ""  # checkpoint to resume training from, or to evaluate with --eval_only 1
    stop_step: int = 0  # end this run at this step although the schedule spans max_steps (0: off)
    eval_only: bool = False  # with --resume: only evaluate the checkpoint and write the PNGs (with --init: the tower's features)


# The accepted range of each numeric field, checked before any work (check_config). A field not
# listed is an integer >= 1 or a finite float > 0.
RANGES = {"init_heads": ">= 0", "tau_init": "[0.01, 1]", "min_lr": ">= 0", "warmup_steps": ">= 0", "weight_decay": ">= 0", "grad_clip": ">= 0",
          "seed": ">= 0", "eval_every": ">= 0", "stop_step": ">= 0"}

# Fields that may change when a run is resumed (any other difference is an error), and that
# --eval_only takes from the command line rather than from the checkpoint.
RUNTIME_FIELDS = ("device", "dtype", "compile", "out_dir", "log_every", "eval_every", "ckpt_every",
                  "resume", "stop_step", "eval_only", "max_steps", "zero_shot")

# The Config defaults are the cpu preset; the others override a few fields.
PRESETS = {
    "tiny": dict(image_size=16, patch_size=4, dim=32, depth=1, num_heads=2, text_dim=32, text_depth=1,
                 embed_dim=16, n_train=256, n_test=64, max_steps=6, batch_size=16, warmup_steps=2,
                 log_every=2, eval_every=0, ckpt_every=1000),
    "cpu": dict(),
    "gpu": dict(patch_size=4, dim=384, depth=12, num_heads=6, mlp_ratio=4.0, text_dim=256, text_depth=6,
                text_heads=4, embed_dim=256, n_train=100000, n_test=10000, max_steps=10000, batch_size=1024,
                lr=5e-4, warmup_steps=500, log_every=100, eval_every=2000, ckpt_every=2000),
}


# ----------------------------------------------------------------------------------------------
# Building blocks
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


# Copied from vit.PatchEmbed
class PatchEmbed(nn.Module):
    """x = x_p W_e + b as a convolution with kernel = stride = P (same weights, one fused op)."""

    def __init__(self, patch_size, in_channels, dim, bias=True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) -> (B, N, D)


# Copied from vit.InputNorm
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


# ----------------------------------------------------------------------------------------------
# The model: two encoders into one joint space
# ----------------------------------------------------------------------------------------------

class ImageEncoder(nn.Module):
    """f_I: a ViT in CLIP's layout: [class token] + patches + positions, LN, blocks, LN, projection."""

    def __init__(self, image_size, patch_size, in_channels, dim, depth, num_heads, mlp_ratio, embed_dim,
                 patch_bias=True, act="gelu", input_norm="unit"):
        super().__init__()
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.input_norm = InputNorm(input_norm)
        self.patch_embed = PatchEmbed(patch_size, in_channels, dim, patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid[0] * self.grid[1] + 1, dim) * 0.02)
        # CLIP's one change to the ViT trunk: a LayerNorm before the blocks as well as after them.
        self.ln_pre = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, act=act) for _ in range(depth))
        self.ln_post = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim, bias=False)

    def tokens(self, x, depth=None):
        """(B, N+1, D) tokens, class token first, after the first `depth` blocks (all by default).
        LLaVA reads the patch tokens of the penultimate block: tokens(x, -1)[:, 1:]."""
        B = x.shape[0]
        # Eq (Lec11 embedding): x = x_p W_e, then add the position embeddings
        tokens = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(self.input_norm(x))], dim=1)  # (B, N+1, D)
        tokens = self.ln_pre(tokens + self.pos_embed)
        for block in self.blocks[:depth]:
            tokens = block(tokens)
        return tokens

    def forward(self, x):
        return self.proj(self.ln_post(self.tokens(x)[:, 0]))  # (B, E): the class token, projected


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


def init_tower(encoder):
    """OpenAI CLIP's initialisation (its initialize_parameters) of a tower of width D and L blocks:
    attention in-projection std D^-1/2, the two projections back into the residual stream
    D^-1/2 (2L)^-1/2, the MLP's first layer (2D)^-1/2, the output projection D^-1/2, biases 0.
    OpenAI wrote the rule for its text tower and left the image tower on PyTorch's defaults (of
    about the same size); open_clip keeps the rule for the image tower too, commented out. An image
    tower's class token and positions start at D^-1/2 randn, as in OpenAI's VisionTransformer (a
    text tower's token embeddings at 0.02 and positions at 0.01, set where it is built). timm's std
    0.02 for every matrix (vit.py's) is 2-6x smaller at width 64: from it every image starts
    embedded alike (cosine 1.000 between any two), and clip.py's runs separated circles from
    squares at some seeds only (README)."""
    D, L = encoder.proj.in_features, len(encoder.blocks)
    residual_std = D ** -0.5 * (2 * L) ** -0.5
    for block in encoder.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=D ** -0.5)
        nn.init.normal_(block.attn.proj.weight, std=residual_std)
        nn.init.normal_(block.mlp.fc1.weight, std=(2 * D) ** -0.5)
        nn.init.normal_(block.mlp.fc2.weight, std=residual_std)
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            nn.init.zeros_(linear.bias)
    nn.init.normal_(encoder.proj.weight, std=D ** -0.5)
    if isinstance(encoder, ImageEncoder):
        nn.init.normal_(encoder.cls_token, std=D ** -0.5)
        nn.init.normal_(encoder.pos_embed, std=D ** -0.5)


class CLIP(nn.Module):
    """f_I and f_T with unit-norm outputs, and the learnable logit scale log(1/tau)."""

    def __init__(self, image_encoder, text_encoder, tau_init=0.07):
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / tau_init)))
        for encoder in (image_encoder, text_encoder):
            init_tower(encoder)

    def encode_image(self, images):
        return F.normalize(self.image_encoder(images), dim=-1)  # (B, E), unit norm

    def encode_text(self, ids):
        return F.normalize(self.text_encoder(ids), dim=-1)  # (B, E), unit norm

    def forward(self, images, ids):
        """-> image embeddings (B, E), text embeddings (B, E), logit_scale = log(1/tau)."""
        return self.encode_image(images), self.encode_text(ids), self.logit_scale

    def flops_per_pair(self, text_tokens):
        """Training FLOPs per pair (forward + backward), both encoders: 6 per matmul weight per token
        plus attention (the token embedding lookups are not counted)."""
        total = 0
        for encoder, T in ((self.image_encoder, self.image_encoder.pos_embed.shape[1]),
                           (self.text_encoder, text_tokens)):
            lookups = ("token_embed", "pos_embed", "cls_token")
            matmul_params = sum(p.numel() for n, p in encoder.named_parameters()
                                if p.dim() >= 2 and not n.startswith(lookups))
            total += 6 * matmul_params * T + 12 * len(encoder.blocks) * T * T * encoder.pos_embed.shape[2]
        return total


def build_model(cfg, in_channels=3):
    cfg = resolve_auto_fields(cfg)
    image_encoder = ImageEncoder(cfg.image_size, cfg.patch_size, in_channels, cfg.dim, cfg.depth, cfg.num_heads,
                                 cfg.mlp_ratio, cfg.embed_dim, cfg.patch_bias, cfg.act, cfg.input_norm)
    text_encoder = TextEncoder(cfg.context_length, cfg.text_dim, cfg.text_depth, cfg.text_heads, cfg.mlp_ratio,
                               cfg.embed_dim)
    return CLIP(image_encoder, text_encoder, cfg.tau_init)


# ----------------------------------------------------------------------------------------------
# The method's math as pure functions
# ----------------------------------------------------------------------------------------------

LOGIT_SCALE_MAX = math.log(100.0)  # 1/tau <= 100, so that the logits cannot blow up


def clip_similarity(a, b, logit_scale):
    """Unit-norm (N, E) and (M, E) -> (N, M) logits; row i scores a_i against every b_j."""
    # Eq (Lec11 CLIP similarity): s_ij = f_I(x_i)^T f_T(y_j) / tau,  1/tau = exp(logit_scale)
    return logit_scale.exp() * a @ b.T


def clip_loss(logits_per_image, logits_per_text, labels):
    """Symmetric contrastive loss. logits_per_image[i, j] = s_ij (image i against text j) and
    logits_per_text[i, j] = s_ji (text i against image j); labels[i] is row i's matching column."""
    # Eq (Lec11 CLIP): L_img = -1/N sum_i log( e^{s_ii} / sum_j e^{s_ij} )
    loss_img = F.cross_entropy(logits_per_image, labels)
    # Eq (Lec11 CLIP): L_text = -1/N sum_i log( e^{s_ii} / sum_j e^{s_ji} )
    loss_text = F.cross_entropy(logits_per_text, labels)
    # Eq (Lec11 CLIP): L_CLIP = (L_img + L_text) / 2
    return (loss_img + loss_text) / 2


def clip_loss_global(image_emb, text_emb, logit_scale):
    """L_CLIP of one batch of N aligned pairs (pair n = row n of both): (N, E), (N, E) -> scalar."""
    s = clip_similarity(image_emb, text_emb, logit_scale)  # (N, N)
    return clip_loss(s, s.T, torch.arange(s.shape[0], device=s.device))


def clip_loss_local(image_local, text_local, image_all, text_all, logit_scale, rank):
    """One rank's share of L_CLIP (open_clip's local loss): its n rows of s and of s^T against all
    N = world * n columns. The mean over ranks equals L_CLIP of the global batch."""
    n = image_local.shape[0]
    labels = rank * n + torch.arange(n, device=image_local.device)  # where this rank's pairs sit in the gather
    logits_per_image = clip_similarity(image_local, text_all, logit_scale)  # (n, N): rows of s
    logits_per_text = clip_similarity(text_local, image_all, logit_scale)  # (n, N): rows of s^T
    return clip_loss(logits_per_image, logits_per_text, labels)


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


def gather_with_grad(x):
    """Every rank's embeddings, differentiable; the identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return AllGatherWithGrad.apply(x)


def clamp_logit_scale(model):
    """After each optimizer step: 0 <= log(1/tau) <= log(100), as CLIP does."""
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)


@torch.no_grad()
def prompt_embeddings(model, tokenizer, prompts, context_length, device):
    """f_T of each class's prompts: C lists of P strings -> (C, P, E)."""
    ids, _ = tokenizer.encode([text for class_prompts in prompts for text in class_prompts], context_length)
    emb = model.encode_text(ids.to(device)).float()  # (C * P, E)
    return emb.view(len(prompts), len(prompts[0]), -1)  # (C, P, E)


def zero_shot_log_probs(image_emb, prompt_emb, logit_scale, rule="mean"):
    """log p(c | x) for each image and class: (B, E), (C, P, E) unit-norm prompt embeddings -> (B, C).

    rule "mean" is CLIP's (paper section 3.1.4): a class's P prompt embeddings are averaged and
    renormalised into one class embedding, and the image's softmax over the C class embeddings
    classifies it. rule "softmax_sum" reads every prompt as a candidate text of L_img's softmax:
    p(t | x) over all C * P prompts, and a class's probability is the sum over its prompts; it
    suits prompts that embed far apart (e.g. naming sizes and positions the class does not fix).
    With P = 1 the two rules are the same.
    """
    scale = logit_scale.exp()
    if rule == "mean":
        class_emb = F.normalize(prompt_emb.mean(dim=1), dim=-1)  # (C, E)
        # Eq (Lec11 CLIP similarity): s(x, c) = f_I(x)^T f_T(c) / tau
        return (scale * image_emb @ class_emb.T).log_softmax(dim=1)  # (B, C)
    if rule == "softmax_sum":
        # Eq (Lec11 CLIP similarity): s(x, t) = f_I(x)^T f_T(t) / tau, for every prompt t of every class
        s = scale * torch.einsum("be,cpe->bcp", image_emb, prompt_emb)  # (B, C, P)
        # p(t | x) = softmax over all C * P prompts; p(c | x) = sum_{t in T_c} p(t | x)
        return s.logsumexp(dim=2) - s.flatten(1).logsumexp(dim=1, keepdim=True)  # (B, C)
    raise ValueError(f"unknown zero-shot rule {rule!r}: use 'mean' or 'softmax_sum'")


def retrieval_recall(image_emb, text_emb, relevant, ks=(1, 5)):
    """Recall@k of image->text and text->image retrieval over one pool of pairs.

    relevant[i, j] says whether caption j describes image i. A retrieved item is right when it is
    relevant, not only when it is the query's own partner: captions name only some attributes, so
    "a red circle" describes every red circle of the pool. Returns {"i2t_R@k", "t2i_R@k"} per k.
    """
    sim = image_emb @ text_emb.T  # (N_img, N_txt)
    result = {}
    for name, scores, hits in (("i2t", sim, relevant), ("t2i", sim.T, relevant.T)):
        for k in ks:
            top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (Q, k)
            result[f"{name}_R@{k}"] = hits.gather(1, top).any(dim=1).float().mean().item()
    return result


# ----------------------------------------------------------------------------------------------
# Published weights: OpenAI CLIP's image tower
# ----------------------------------------------------------------------------------------------
# OpenAI's ViT towers (and open_clip's, which keep their names) hold the image tower under visual.*:
# conv1 (no bias), class_embedding, positional_embedding (class row first), ln_pre, transformer.
# resblocks.{i} (ln_1, attn.in_proj_weight = [W_q; W_k; W_v], attn.out_proj, ln_2, mlp.c_fc,
# mlp.c_proj), ln_post, proj (D, E), used as x @ proj. Their MLPs use QuickGELU, their LayerNorm eps
# is PyTorch's 1e-5, their pixels are normalised by CLIP's mean and std. The text tower is not
# loaded: it reads BPE tokens, and clip.py's reads bytes.

OPENAI_BLOCK_NAMES = {"ln_1.": "norm1.", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
                      "attn.out_proj.": "attn.proj.", "ln_2.": "norm2.", "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}


# Copied from vit.read_state_dict
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


# Copied from vit.resize_pos_embed
def resize_pos_embed(pos_embed, old_grid, new_grid, num_prefix_tokens=0):
    """Bicubic resize (antialiased when shrinking, as timm does) of learned position embeddings
    (1, [prefix +] gh*gw, D) to another patch grid; the rows of prefix tokens (a class token's) are
    kept as they are."""
    D = pos_embed.shape[-1]
    prefix, pos_embed = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = pos_embed.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D)], dim=1)  # (1, [1 +] N', D)


def openai_visual_config(sd, num_heads=0):
    """The Config fields that an OpenAI-layout image tower fixes, read off its tensor shapes."""
    if any(k.startswith("visual.layer1.") for k in sd):
        raise InputError("--init: a ResNet image tower (CLIP RN50 and kin); clip.py loads ViT towers only")
    need = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
            "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.0.mlp.c_fc.weight",
            "visual.ln_post.weight", "visual.proj")
    missing = [k for k in need if k not in sd]
    if missing:
        raise InputError(f"--init: not an image tower in OpenAI CLIP's layout (no {', '.join(missing[:3])}; "
                         f"it has {', '.join(list(sd)[:4])}, ...)")
    D, _, P, P2 = sd["visual.conv1.weight"].shape
    n_pos = sd["visual.positional_embedding"].shape[0] - 1
    heads = num_heads or D // 64
    if P != P2 or math.isqrt(n_pos) ** 2 != n_pos or heads < 1 or D % heads:
        raise InputError(f"--init: width {D}, {heads} heads, patch {P}x{P2}, {n_pos} patch positions: not a square "
                         f"ViT tower, or pass --init_heads with its number of heads")
    blocks = [k for k in sd if k.startswith("visual.transformer.resblocks.")]
    return dict(patch_size=P, dim=D, num_heads=heads, patch_bias="visual.conv1.bias" in sd,
                depth=1 + max(int(k.split(".")[3]) for k in blocks), embed_dim=sd["visual.proj"].shape[1],
                mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / D)


def resolve_auto_fields(cfg):
    """The 'auto' defaults made concrete: OpenAI's conventions with --init, the project's without."""
    return dataclasses.replace(
        cfg, act=cfg.act if cfg.act != "auto" else ("quick_gelu" if cfg.init else "gelu"),
        input_norm=cfg.input_norm if cfg.input_norm != "auto" else ("clip" if cfg.init else "unit"))


def init_config(cfg):
    """With --init: the config with the tower of the weights, auto fields resolved; returns
    (cfg, state dict or None)."""
    if not cfg.init or (cfg.eval_only and cfg.resume):
        return resolve_auto_fields(cfg), None
    sd, _ = read_state_dict(cfg.init)
    return resolve_auto_fields(dataclasses.replace(cfg, **openai_visual_config(sd, cfg.init_heads))), sd


def openai_visual_to_ours(sd):
    """{our ImageEncoder name: tensor} from the visual.* tensors of an OpenAI-layout state dict, and
    the visual.* names that have no place in it."""
    out, unused = {}, []
    for key, value in sd.items():
        name = key.removeprefix("visual.")
        if name == key:
            continue  # the text tower and logit_scale: not this loader's
        if name.startswith("conv1."):
            out["patch_embed.proj." + name[len("conv1."):]] = value
        elif name == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif name == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        elif name == "proj":
            out["proj.weight"] = value.T  # x @ proj == Linear with weight proj^T
        elif name.startswith(("ln_pre.", "ln_post.")):
            out[name] = value
        elif name.startswith("transformer.resblocks."):
            i, rest = name[len("transformer.resblocks."):].split(".", 1)
            ours = next((new + rest[len(old):] for old, new in OPENAI_BLOCK_NAMES.items() if rest.startswith(old)), None)
            if ours is None:
                unused.append(key)
            else:
                out[f"blocks.{i}.{ours}"] = value
        else:
            unused.append(key)
    return out, unused


def load_openai_visual(encoder, sd):
    """Load the image tower of an OpenAI-layout state dict into `encoder` (an ImageEncoder), position
    embeddings resized to its grid. Every visual.* tensor must be used and every parameter set, or one
    error says which; returns how many other tensors (the text tower's) were left out."""
    mapped, unused = openai_visual_to_ours(sd)
    own = encoder.state_dict()
    pos = mapped.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape and pos.shape[-1] == own["pos_embed"].shape[-1]:
        side = math.isqrt(pos.shape[1] - 1)
        mapped["pos_embed"] = resize_pos_embed(pos.float(), (side, side), encoder.grid, num_prefix_tokens=1)
    unused += [f"visual.{k}" for k in mapped if k not in own]
    unset = [k for k in own if k not in mapped]
    misshapen = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items()
                 if k in own and v.shape != own[k].shape]
    if unused or unset or misshapen:
        parts = [f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}" for what, keys in
                 (("tensors clip.py's image encoder has no place for", unused), ("parameters the file does not set", unset),
                  ("shapes that differ (file vs model)", misshapen)) if keys]
        raise InputError("--init: the weights do not fit the image encoder; " + "; ".join(parts))
    encoder.load_state_dict({k: v.to(own[k].dtype) for k, v in mapped.items()})
    return sum(not k.startswith("visual.") for k in sd)


def openai_visual_state_dict(encoder):
    """The inverse map: an ImageEncoder's weights as OpenAI's visual.* tensors."""
    back = {new: old for old, new in OPENAI_BLOCK_NAMES.items()}
    out = {}
    for name, value in encoder.state_dict().items():
        value = value.detach().clone()
        if name.startswith("patch_embed.proj."):
            out["visual.conv1." + name[len("patch_embed.proj."):]] = value
        elif name == "cls_token":
            out["visual.class_embedding"] = value.reshape(-1)
        elif name == "pos_embed":
            out["visual.positional_embedding"] = value[0]
        elif name == "proj.weight":
            out["visual.proj"] = value.T.contiguous()
        elif name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            old = next(old + rest[len(new):] for new, old in back.items() if rest.startswith(new))
            out[f"visual.transformer.resblocks.{i}.{old}"] = value
        else:
            out["visual." + name] = value
    return out


@torch.no_grad()
def centroid_accuracy(train_emb, train_labels, test_emb, test_labels):
    """Accuracy of the nearest class mean (cosine) of unit-norm embeddings: what an image tower's
    features tell apart with no text tower and no training."""
    classes = np.unique(train_labels)
    means = torch.stack([train_emb[torch.as_tensor(train_labels == c)].mean(dim=0) for c in classes])
    predicted = classes[(test_emb @ F.normalize(means, dim=-1).T).argmax(dim=1).numpy()]
    return float((predicted == test_labels).mean())


# ----------------------------------------------------------------------------------------------
# Evaluation: zero-shot prompts, relevance, embeddings, the pictures
# ----------------------------------------------------------------------------------------------

def zero_shot_prompts(data, class_names, ensemble=False):
    """Zero-shot prompts, P per class; no image or label is used to write them. In the shapes
    world: the three phrasings the world uses for a caption that names only the shape and color
    ("a red circle", "there is a red circle", "red circle"); with ensemble=True every caption the
    world can write that names the class's shape and color (any size and position, or none, in
    every phrasing: 3 * 10 * 3 = 90). For other data: generic templates around the class name."""
    if data == "shapes":
        sizes, positions = ([None, 0, 1], [None, *range(len(POSITIONS))]) if ensemble else ([None], [None])
        return [[shapes_caption((shape, color, size or 0, pos or 0), phrasing, (True, True, size is not None, pos is not None))
                 for phrasing in range(3) for size in sizes for pos in positions]
                for shape in range(len(SHAPES)) for color in range(len(COLOR_NAMES))]
    return [[template.format(name) for template in ("a {}", "a photo of a {}", "a picture of a {}")]
            for name in class_names]


def caption_relevance(split):
    """(N, N) bool: caption j describes image i. Shapes: every attribute the caption names is the
    image's (an unnamed one, -1, matches anything). Other data: the two captions are the same text."""
    if "caption_attributes" in split:
        named = torch.as_tensor(split["caption_attributes"])  # (N, 4), -1 = not named
        attrs = torch.as_tensor(split["attributes"])  # (N, 4)
        return ((named[None] == attrs[:, None]) | (named[None] < 0)).all(dim=-1)
    index = {}
    ids = torch.tensor([index.setdefault(c, len(index)) for c in split["captions"]])
    return ids[:, None] == ids[None, :]


def tokenize(tokenizer, texts, context_length):
    """Captions -> ids (B, T), T the longest caption's length: the columns after it are padding,
    which the causal text encoder never reads, so they are not computed at all."""
    try:
        ids, lengths = tokenizer.encode(texts, context_length)
    except ValueError as e:
        raise InputError(f"--context_length {context_length}: {e}; "
                         f"raise --context_length or shorten the captions") from None
    return ids[:, :int(lengths.max())]


@torch.no_grad()
def embed(encode, inputs, rt, batch_size=500):
    """Unit-norm embeddings (N, E) of a whole split, batched, in fp32 on the runtime's device."""
    return torch.cat([encode(inputs[lo:lo + batch_size].to(rt.device)).float().cpu()
                      for lo in range(0, len(inputs), batch_size)])


def thumbnail(image, scale):
    """uint8 (H, W, C) -> (H * scale, W * scale, 3), nearest-neighbour; grey images become RGB."""
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    return big if big.shape[2] == 3 else np.repeat(big, 3, axis=2)


def similarity_picture(images, captions, sim):
    """Heat map of the cosine similarities of n pairs: image i heads row i, caption j (listed
    below) is column j, so the matching pairs lie on the diagonal. Blue = lowest, yellow = highest."""
    n, scale = len(images), max(1, 32 // images.shape[1])
    cell = images.shape[1] * scale
    width = max(cell * (n + 1), 4 * max(len(c) for c in captions) + 16)
    canvas = np.full((cell * (n + 1) + 8 * n + 8, width, 3), 40, dtype=np.uint8)  # grey: black images stand out
    lo, hi = float(sim.min()), float(sim.max())
    for i in range(n):
        canvas[cell * (i + 1) + 1:cell * (i + 2) - 1, 1:cell - 1] = thumbnail(images[i], scale)[1:-1, 1:-1]
        draw_text(canvas, str(i), cell * (i + 1) + cell // 2 - 2, cell // 2 - 2)
        for j in range(n):
            v = (float(sim[i, j]) - lo) / max(hi - lo, 1e-6)
            y, x = cell * (i + 1), cell * (j + 1)
            canvas[y + 1:y + cell - 1, x + 1:x + cell - 1] = (int(255 * v), int(200 * v), int(255 * (1 - v)))
            draw_text(canvas, f"{float(sim[i, j]):.2f}", x + 2, y + cell // 2 - 2, (0, 0, 0) if v > 0.5 else (255,) * 3)
    for j, caption in enumerate(captions):
        draw_text(canvas, f"{j}: {caption}", 2, cell * (n + 1) + 4 + 8 * j)
    return canvas


def retrieval_picture(captions, images, top, correct):
    """Text -> image retrieval: each query caption with its top-k images (q, k), framed green where
    the image shows what the caption says and red where it does not."""
    scale = max(1, 32 // images.shape[1])
    size = images.shape[1] * scale
    text_width = 4 * max(len(c) for c in captions) + 8
    canvas = np.zeros(((size + 6) * len(captions) + 4, text_width + top.shape[1] * (size + 6), 3), dtype=np.uint8)
    for q, caption in enumerate(captions):
        y = (size + 6) * q + 4
        draw_text(canvas, caption, 2, y + size // 2 - 2)
        for r, index in enumerate(top[q]):
            x = text_width + r * (size + 6)
            canvas[y - 2:y + size + 2, x - 2:x + size + 2] = (60, 220, 60) if correct[q, r] else (230, 60, 60)
            canvas[y:y + size, x:x + size] = thumbnail(images[index], scale)
    return canvas


def evaluate(model, data, cfg, rt, tokenizer, write_files=True):
    """Zero-shot accuracy (test, heldout) by the configured rule, by the other rule and with the bare
    prompt "a red circle"; retrieval recall on the test split; the two pictures."""
    was_training = model.training
    model.eval()
    test = data["test"]
    image_emb = embed(model.encode_image, images_to_tensor(test["images"]), rt)
    text_emb = embed(model.encode_text, tokenize(tokenizer, test["captions"], cfg.context_length), rt)
    relevant = caption_relevance(test)
    metrics = {"test_size": len(relevant)}
    metrics.update(retrieval_recall(image_emb, text_emb, relevant))
    if data.get("class_names") is not None and "labels" in test:
        names = data["class_names"]
        metrics["zero_shot_chance"] = 1.0 / len(names)
        image_embs = {"test": image_emb}
        if "heldout" in data:
            image_embs["heldout"] = embed(model.encode_image, images_to_tensor(data["heldout"]["images"]), rt)
        other = "softmax_sum" if cfg.zero_shot == "mean" else "mean"
        settings = (("", cfg.zero_shot, zero_shot_prompts(cfg.data, names, cfg.zero_shot == "softmax_sum")),
                    (f"_{other}", other, zero_shot_prompts(cfg.data, names, other == "softmax_sum")),
                    ("_bare_prompt", "mean", [[f"a {name}"] for name in names]))
        for suffix, rule, prompts in settings:
            prompt_emb = prompt_embeddings(model, tokenizer, prompts, cfg.context_length, rt.device).cpu()
            for split, emb in image_embs.items():
                predicted = zero_shot_log_probs(emb, prompt_emb, model.logit_scale.detach().cpu(), rule).argmax(dim=1)
                accuracy = (predicted.numpy() == data[split]["labels"]).mean()
                metrics[f"zero_shot_{split}_accuracy{suffix}"] = float(accuracy)
    metrics["inverse_temperature"] = model.logit_scale.exp().item()
    if write_files:
        n = min(8, len(relevant))
        save_png(os.path.join(cfg.out_dir, "similarity.png"),
                 similarity_picture(test["images"][:n], test["captions"][:n], image_emb[:n] @ text_emb[:n].T))
        queries = torch.arange(n)
        top = (text_emb[queries] @ image_emb.T).topk(min(5, len(relevant)), dim=1).indices  # (q, 5)
        save_png(os.path.join(cfg.out_dir, "retrieval.png"),
                 retrieval_picture([test["captions"][i] for i in queries.tolist()], test["images"], top.numpy(),
                                   relevant.T[queries[:, None], top].numpy()))
    model.train(was_training)
    return metrics


def evaluate_init_tower(cfg, data, sd, rt):
    """An --init image tower on --data, on its own terms: no text tower can load (see the loader), so
    the measure is how well its embeddings separate the classes, by the nearest class mean."""
    encoder = build_model(cfg, data["channels"]).image_encoder.to(rt.device)
    load_openai_visual(encoder, sd)
    encoder.eval()
    emb = {}
    with torch.no_grad(), rt.autocast():
        for split in ("train", "test"):
            images = data[split]["images"]
            emb[split] = torch.cat([F.normalize(encoder(images_to_tensor(images[lo:lo + 250]).to(rt.device)).float(), dim=-1).cpu()
                                    for lo in range(0, len(images), 250)])
    accuracy = centroid_accuracy(emb["train"], data["train"]["labels"], emb["test"], data["test"]["labels"])
    print(f"clip: --init {cfg.init}: nearest-class-mean accuracy of its image embeddings {accuracy:.4f} "
          f"({len(data['test']['labels'])} test images, class means from {len(data['train']['labels'])} training images)")
    return {"init_centroid_accuracy": accuracy, "test_size": int(len(data["test"]["labels"]))}


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
    if cfg.text_dim % cfg.text_heads:
        raise InputError(f"--text_dim {cfg.text_dim} is not divisible by --text_heads {cfg.text_heads}")
    if cfg.zero_shot not in ("mean", "softmax_sum"):
        raise InputError(f"--zero_shot {cfg.zero_shot}: expected mean or softmax_sum")
    if cfg.context_length < 3:
        raise InputError(f"--context_length {cfg.context_length}: needs room for BOS, one byte and EOS (3 or more)")
    if cfg.act not in ("auto", "gelu", "quick_gelu"):
        raise InputError(f"--act {cfg.act}: expected auto, gelu or quick_gelu")
    if cfg.input_norm not in ("auto", "unit", *InputNorm.STATS):
        raise InputError(f"--input_norm {cfg.input_norm}: expected auto, unit, {' or '.join(InputNorm.STATS)}")
    if data is not None:
        if cfg.input_norm != "unit" and data["channels"] != 3:
            raise InputError(f"--input_norm {cfg.input_norm} needs RGB images; --data {cfg.data} has "
                             f"{data['channels']} channel (tools/to_npz.py --rgb converts it)")
        if cfg.eval_only and cfg.init and not cfg.resume:
            if "labels" not in data["train"]:
                raise InputError(f"--data {cfg.data}: evaluating an --init tower's features needs a 'labels' array")
            return
        if "captions" not in data["train"]:
            raise InputError(f"--data {cfg.data}: CLIP trains on image-caption pairs; "
                             f"the .npz needs a 'captions' array")
        if cfg.batch_size > len(data["train"]["captions"]):
            raise InputError(f"--batch_size {cfg.batch_size} is larger than the {len(data['train']['captions'])} "
                             f"training pairs; lower it or add data")


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
        tokenizer = ByteTokenizer()
        if cfg.eval_only and ckpt is None and init_sd is not None:
            return finish_run(cfg, rt, evaluate_init_tower(cfg, data, init_sd, rt) if rt.master else {}, t_start)
        train_ids = tokenize(tokenizer, data["train"]["captions"], cfg.context_length)
        if data.get("class_names") is not None:
            for ensemble in (False, True):  # a prompt too long for the context fails here, not after training
                prompts = zero_shot_prompts(cfg.data, data["class_names"], ensemble)
                tokenize(tokenizer, [text for class_prompts in prompts for text in class_prompts], cfg.context_length)
        model = build_model(cfg, data["channels"]).to(rt.device)
        if cfg.eval_only:
            if ckpt is None:
                raise InputError("--eval_only 1 needs --resume path/to/ckpt.pt (or --init: a tower's features)")
            model.load_state_dict(ckpt["model"])
            metrics = evaluate(model, data, cfg, rt, tokenizer) if rt.master else {}
            return finish_run(cfg, rt, metrics, t_start)
        if ckpt is None and init_sd is not None:
            left_out = load_openai_visual(model.image_encoder, init_sd)
            if rt.master:
                print(f"clip: image encoder from --init {cfg.init} ({left_out} tensors outside visual.*, the text "
                      f"tower's, not loaded: clip.py's text encoder reads bytes, OpenAI's BPE tokens)")
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, rt)
        start = 0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start = ckpt["step"]
            set_rng_state(ckpt["rng"])
        run_model = prepare_model(model, rt)
        logger = Logger(cfg.out_dir, cfg, rt, append=ckpt is not None)
        logger.print(f"clip: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                     f"{len(train_ids)} training pairs, {train_ids.shape[1]} text tokens, device {rt.device}, "
                     f"{'bf16' if rt.amp_dtype else 'fp32'}{', compiled' if rt.compile else ''}, world size {rt.world_size}")
        train_images = torch.as_tensor(data["train"]["images"])
        end = min(cfg.stop_step, cfg.max_steps) if cfg.stop_step else cfg.max_steps
        progress = Progress(cfg, rt, logger, start, end, cfg.max_steps, model.flops_per_pair(train_ids.shape[1]), "pair")
        for step in range(start, end):
            lr = cosine_lr(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = batch_indices(step, len(train_ids), cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
            x = images_to_tensor(train_images[idx]).to(rt.device, non_blocking=True)
            ids = train_ids[idx].to(rt.device, non_blocking=True)
            with rt.autocast():
                image_emb, text_emb, logit_scale = run_model(x, ids)
            image_emb, text_emb = image_emb.float(), text_emb.float()
            # Every rank scores its rows against the whole global batch (identity on one process).
            loss = clip_loss_local(image_emb, text_emb, gather_with_grad(image_emb), gather_with_grad(text_emb),
                                   logit_scale, rt.rank)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clamp_logit_scale(model)
            done = step + 1
            ckpt_now = progress.step(done, loss, lr, inverse_temperature=model.logit_scale.detach().exp())
            if cfg.eval_every and done % cfg.eval_every == 0 and done != end and rt.master:
                with progress.paused():
                    result = evaluate(model, data, cfg, rt, tokenizer, write_files=False)
                summary = {k: v for k, v in result.items() if k.endswith("_accuracy")}
                logger.print(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items())
                             + f", t2i R@1 {result['t2i_R@1']:.4f}")
                logger.log({"step": done, **summary, "t2i_R@1": result["t2i_R@1"]})
            if ckpt_now and rt.master:
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"),
                                {"model_name": MODEL_NAME, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "step": done, "config": asdict(cfg), "rng": rng_state(), "data_position": done})
        metrics = {}
        if rt.master:
            metrics = evaluate(model, data, cfg, rt, tokenizer)
            metrics.update(steps=end, final_loss=progress.loss)
            logger.print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
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
