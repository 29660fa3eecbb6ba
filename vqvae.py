"""VQ-VAE: a convolutional image tokenizer with a vector-quantized bottleneck, the VAE it refines,
and a class-conditional autoregressive prior over its codes.

Lecture: lecture-notes.md, Lec12 "VAE Refresher", "VQ-VAE: Continuous to Discrete" and "Then model
discrete image tokens autoregressively". The equations, as named in the notes:

    (Lec12 VAE)        L_VAE = -E_q(z|x)[log p(x|z)] + KL(q(z|x) || p(z))       -> vae_loss()
                       q(z|x) = N(mu, sigma^2), z = mu + sigma eps               -> GaussianBottleneck, reparameterize()
                       KL(N(mu, sigma^2) || N(0, I)) in closed form               -> gaussian_kl()
    (Lec12 ELBO)       log p(x) >= E_q[log p(x|z)] - KL(q(z|x) || p(z))         -> evaluate(): bits/dim of the bound
    (Lec12 VQ)         k* = argmin_j ||z_e(x) - e_j||_2,  z_q(x) = e_k*          -> nearest_code()
    (Lec12 VQ loss)    L = -log p(x|z_q) + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2
                       -> vq_losses(); the gradient of z_q passes straight through -> straight_through()
    (VQ-VAE, App. A.1) EMA codebook: N_k <- g N_k + (1-g) n_k, m_k <- g m_k + (1-g) sum z, e_k = m_k / N_k
                       -> ema_codebook_update(), laplace_smooth()
    (Lec12 prior)      p(k_1..k_T | c) = prod_t p(k_t | k_<t, c) over the code grid in raster order,
                       the Transformer of pixel_ar.py -> CausalTransformer, generate()

Papers: Kingma & Welling 2013, VAE (arXiv:1312.6114); van den Oord et al. 2017, VQ-VAE
(arXiv:1711.00937); Razavi et al. 2019, VQ-VAE-2 (arXiv:1906.00446); Dhariwal et al. 2020, Jukebox,
dead-code reset (arXiv:2005.00341); Esser et al. 2021, taming transformers / VQGAN (arXiv:2012.09841);
Yu et al. 2021, ViT-VQGAN, l2-normalised codes (arXiv:2110.04627); Ho & Salimans 2022,
classifier-free guidance (arXiv:2207.12598).

Conventions. Images are float (B, C, H, W) in [-1, 1]; uint8 (N, H, W, C) on disk. The encoder
downsamples by f = 2 ** (levels - 1): a 32 px image becomes an (h, w) = (8, 8) grid of D-dim
vectors at f = 4. Codes are read in raster order (row by row), t = i * w + j. The prior's
vocabulary is [K codes | num_classes class tokens | one null class]; a sequence is one class
token followed by the h*w codes. The Gaussian likelihood p(x|z) is discretised to the 256 pixel
values (bins 2/255 wide), so -ELBO in bits/dim bounds the same -log2 p(x) per subpixel that
pixel_ar.py reports. Shape legend: B batch, C channels, H W image size, h w latent grid, D code
dimension, K codebook size, n vectors (B*h*w), T tokens.

Measured (`python vqvae.py`, cpu preset, 2-core CPU alone, 5 min 27 s): the tokenizer (1000 steps
of batch 32) reconstructs at 33.4 dB PSNR and the detector reads 98.2% of its reconstructions (100%
of clean renders); 100% of the codebook used on the test split, perplexity 5.6; 64 codes per image;
the prior (width 64, 6000 steps of batch 32) reaches 0.432 bits per code on the test split, and its
samples are aligned with their class 92.2% of the time (576 samples, w = 1, temperature 0.5, all
codes; seed 1 and the sampler sweep in the README). The prior is small on purpose: it is limited
by compute, and at width 128 a longer run (2400 prior steps, 6 min 36 s) aligned 80.9%.

Commands:
    python vqvae.py                                 # cpu preset: tokenizer, then prior; writes out/vqvae/
    python vqvae.py --bottleneck gaussian           # the VAE refresher: ELBO in bits/dim, reconstructions
    python vqvae.py --preset gpu                    # one GPU: bf16 autocast and torch.compile
    torchrun --standalone --nproc_per_node=4 vqvae.py --preset gpu   # DDP; --batch_size is global
    python vqvae.py --eval_only 1 --resume out/vqvae/ckpt.pt         # evaluate and sample a checkpoint
    python vqvae.py --downsample 8                  # f = 8: 4x4 codes at 32 px
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

MODEL_NAME = "vqvae"


@dataclass
class Config:
    # model
    image_size: int = 32  # height and width in pixels; a multiple of --downsample
    downsample: int = 4  # f, a power of 2: the latent grid is image_size / f on a side (4: 8x8 codes at 32 px)
    channels: int = 16  # encoder/decoder width at full resolution
    max_mult: int = 4  # width cap: resolution level i has channels * min(2**i, max_mult) channels
    num_res_blocks: int = 1  # residual blocks per resolution level (encoder and decoder)
    latent_dim: int = 16  # D: channels of the latent grid (code dimension, or the Gaussian's dimension)
    # method
    bottleneck: str = "vq"  # vq (VQ-VAE) or gaussian (the VAE: q(z|x) = N(mu, sigma^2), ELBO in bits/dim)
    rec_loss: str = "l2"  # the VQ-VAE's reconstruction term: l2 (the lecture's Gaussian -log p(x|z_q)) or l1 (a Laplacian's)
    num_codes: int = 128  # K: codebook size
    beta: float = 0.25  # commitment weight on ||z_e - sg[e]||^2
    ema: bool = True  # update the codebook by an EMA of its assigned vectors instead of the codebook loss
    ema_decay: float = 0.99  # gamma of the EMA codebook
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA counts
    dead_code_threshold: float = 1.0  # reset a code whose EMA count (vectors per batch) falls below this (0: off)
    kmeans_init: bool = True  # initialise the codebook by k-means++ on the first batch's encodings
    l2_normalize: bool = False  # quantize l2-normalised vectors against l2-normalised codes (cosine distance)
    # prior
    prior_dim: int = 64  # width of the prior's Transformer
    prior_depth: int = 4  # Transformer blocks of the prior
    prior_heads: int = 4  # attention heads of the prior
    prior_steps: int = 6000  # optimizer steps of the prior, after the tokenizer's max_steps (vq only)
    prior_lr: float = 2e-3  # peak learning rate of the prior
    prior_batch_size: int = 32  # global batch size of the prior (split across DDP ranks)
    p_uncond: float = 0.1  # probability of replacing the class token by the null class (for CFG)
    cfg_w: float = 1.0  # guidance weight w in logits = (1 + w) cond - w uncond
    temperature: float = 0.5  # sampling temperature of the prior (0: argmax)
    top_k: int = 0  # sample among the k most likely codes (0: all)
    # evaluation
    eval_per_class: int = 32  # prior samples per class for the alignment score and the grid
    # data
    data: str = "shapes"  # 'shapes' (built-in world) or a path to an .npz file with images (and labels)
    n_train: int = 20000  # shapes images rendered for training
    n_test: int = 2000  # shapes images rendered for the test split (and the heldout split)
    # optim
    max_steps: int = 1000  # optimizer steps of the tokenizer; also the length of its cosine schedule
    batch_size: int = 32  # global batch size of the tokenizer (split across DDP ranks)
    lr: float = 2e-3  # peak learning rate of the tokenizer
    min_lr: float = 1e-4  # learning rate at the end of each cosine decay
    warmup_steps: int = 30  # linear warm-up steps of each stage
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # clip the gradient norm to this (0: off)
    # system
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA if supported, else fp32), float32, bfloat16
    compile: str = "auto"  # torch.compile: auto (on for CUDA), 1, 0
    seed: int = 0  # seed for the data, the initialisation, the sampling and the training order
    # io
    out_dir: str = "out/vqvae"  # where ckpt.pt, log.jsonl, metrics.json and the PNGs go
    log_every: int = 50  # steps between progress lines
    eval_every: int = 0  # steps between quick reconstruction checks of the tokenizer (0: only at the end)
    ckpt_every: int = 200  # steps between checkpoints (one is always written at the end)
    resume: str = ""  # checkpoint to resume training from, or to evaluate with --eval_only 1
    stop_step: int = 0  # end this run at this step although the schedule spans max_steps + prior_steps (0: off)
    eval_only: bool = False  # with --resume: only evaluate the checkpoint and write the grids


# The accepted range of each numeric field, checked before any work (check_config). A field not
# listed is an integer >= 1 or a finite float > 0.
RANGES = {"beta": ">= 0", "ema_decay": "[0, 1)", "ema_eps": ">= 0", "dead_code_threshold": ">= 0",
          "p_uncond": "[0, 1)", "cfg_w": ">= 0", "temperature": ">= 0", "top_k": ">= 0", "min_lr": ">= 0",
          "warmup_steps": ">= 0", "weight_decay": ">= 0", "grad_clip": ">= 0", "seed": ">= 0",
          "eval_every": ">= 0", "stop_step": ">= 0"}

# Fields that may change when a run is resumed (any other difference is an error), and that
# --eval_only takes from the command line rather than from the checkpoint.
RUNTIME_FIELDS = ("device", "dtype", "compile", "out_dir", "log_every", "eval_every", "ckpt_every",
                  "resume", "stop_step", "eval_only", "max_steps", "cfg_w", "temperature", "top_k",
                  "eval_per_class")

# The Config defaults are the cpu preset; the others override a few fields.
PRESETS = {
    "tiny": dict(image_size=16, channels=8, max_mult=2, latent_dim=8, num_codes=16, prior_dim=32, prior_depth=1,
                 prior_heads=2, prior_steps=4, prior_batch_size=8, eval_per_class=1, n_train=128, n_test=32,
                 max_steps=4, batch_size=8, warmup_steps=2, log_every=2, ckpt_every=1000),
    "cpu": dict(),
    "gpu": dict(channels=64, num_res_blocks=2, latent_dim=32, num_codes=512, prior_dim=384, prior_depth=8,
                prior_heads=6, n_train=100000, n_test=10000, max_steps=10000, prior_steps=10000, batch_size=64,
                prior_batch_size=256,
                lr=5e-4, prior_lr=5e-4, min_lr=1e-5, warmup_steps=500, log_every=100, ckpt_every=2000,
                eval_per_class=64),
}


# ----------------------------------------------------------------------------------------------
# Building blocks: the convolutional encoder and decoder, the two bottlenecks
# ----------------------------------------------------------------------------------------------

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


def all_gather_rows(x):
    """Concatenate a tensor's rows over the DDP ranks in rank order (the global batch's order);
    x itself without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x):
    """Sum a tensor over the DDP ranks in place (a no-op without DDP); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


class VectorQuantizer(nn.Module):
    """z_e (B, D, h, w) -> z_q (straight-through), code indices (B, h, w) and the loss terms.

    With ema=True the codebook is a buffer moved by an exponential moving average of the vectors
    assigned to each code (the codebook term then has no gradient and is reported only); with
    ema=False it is a parameter trained by the codebook term. Options against codebook collapse,
    applied in training mode only: k-means++ initialisation on the first batch (kmeans_init),
    resetting codes whose EMA count falls below dead_code_threshold to vectors of the batch
    (drawn with probability proportional to their quantisation error), and l2-normalised vectors
    and codes (l2_normalize: the distance becomes the cosine distance). The batch statistics are
    summed over DDP ranks, so that every rank makes the single-process update.
    """

    def __init__(self, num_codes, code_dim, beta=0.25, ema=True, decay=0.99, eps=1e-5, l2_normalize=False,
                 dead_code_threshold=0.0, kmeans_init=False, kmeans_iters=10):
        super().__init__()
        self.num_codes, self.code_dim, self.beta = num_codes, code_dim, beta
        self.ema, self.decay, self.eps, self.l2_normalize = ema, decay, eps, l2_normalize
        self.dead_code_threshold, self.kmeans_init, self.kmeans_iters = dead_code_threshold, kmeans_init, kmeans_iters
        codebook = torch.empty(num_codes, code_dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if ema:
            self.register_buffer("codebook", codebook)
        else:
            self.codebook = nn.Parameter(codebook)
        # "Sane" EMA state: every code starts as if one vector, itself, had been assigned to it, so
        # e_k = m_k / N_k is the initial code and an unused code stays put while N_k decays. (With
        # N_k = 0, a common default, the first update divides by about eps and throws codes far away.)
        self.register_buffer("counts", torch.ones(num_codes))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("initialised", torch.tensor(not kmeans_init))

    def codes(self):
        """The codebook as used for the search and for z_q: (K, D), l2-normalised if asked."""
        return F.normalize(self.codebook, dim=1) if self.l2_normalize else self.codebook

    def embed_codes(self, indices):
        """Code indices (B, h, w) -> z_q (B, D, h, w): the decoder's input for a prior's tokens."""
        return F.embedding(indices, self.codes()).permute(0, 3, 1, 2)  # (B, h, w, D) -> (B, D, h, w)

    def flatten(self, z_e):
        """(B, D, h, w) -> the vectors to quantize (B*h*w, D), l2-normalised if asked."""
        B, D, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(B * h * w, D)  # (n, D)
        return F.normalize(flat, dim=1) if self.l2_normalize else flat

    def quantize_indices(self, z_e):
        """Code indices (B, h, w) of z_e (B, D, h, w); no state changes (the tokenizer's encode)."""
        B, _, h, w = z_e.shape
        return nearest_code(self.flatten(z_e), self.codes()).reshape(B, h, w)

    def forward(self, z_e, generator=None):
        B, D, h, w = z_e.shape
        flat = self.flatten(z_e)  # (n, D)
        if self.training and not bool(self.initialised):
            self.init_from_kmeans(flat.detach(), generator)
        codebook = self.codes()
        indices = nearest_code(flat, codebook)  # (n,)
        z_q = F.embedding(indices, codebook).to(flat.dtype)  # (n, D)
        codebook_loss, commitment_loss = vq_losses(flat, z_q, self.beta)
        if self.training:
            self.update(flat.detach(), indices, generator)
        z_q = straight_through(flat, z_q).reshape(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return z_q, indices.reshape(B, h, w), {"codebook": codebook_loss, "commitment": commitment_loss}

    @torch.compiler.disable
    @torch.no_grad()
    def init_from_kmeans(self, z, generator=None):
        """Codebook <- k-means++ centres of the (global) batch's vectors; counts <- cluster sizes."""
        centres, sizes = kmeans(all_gather_rows(z).float(), self.num_codes, self.kmeans_iters, generator)
        sizes = sizes.clamp_min(1.0)  # an empty cluster keeps its centre as a code used once
        self.codebook.data.copy_(centres)
        self.counts.copy_(sizes)
        self.embed_sum.copy_(centres * sizes[:, None])
        self.initialised.fill_(True)

    @torch.compiler.disable
    @torch.no_grad()
    def update(self, z, indices, generator=None):
        """After a training step's search: the EMA statistics (counts are kept without EMA too:
        they decide which codes are dead), the EMA codebook, then dead-code reset."""
        z = z.float()
        batch_counts, batch_sums = (all_reduce_sum(s) for s in codebook_stats(z, indices, self.num_codes))
        if not bool(torch.isfinite(batch_sums).all()):  # a diverged step (same on every rank after the
            return                                      # reduce): keep the codebook; the loss check stops the run
        counts, embed_sum, codebook = ema_codebook_update(self.counts, self.embed_sum, batch_counts, batch_sums,
                                                          self.decay, self.eps)
        self.counts.copy_(counts)
        if self.ema:
            self.embed_sum.copy_(embed_sum)
            self.codebook.copy_(codebook)
        if self.dead_code_threshold > 0:
            dead = torch.nonzero(self.counts < self.dead_code_threshold).flatten()
            if len(dead):
                z_all = all_gather_rows(z)
                errors = (z_all - self.codes().float()[all_gather_rows(indices)]).pow(2).sum(1)  # (n_global,)
                # from the batch, favouring the vectors the codebook serves worst
                pick = torch.multinomial(errors.clamp_min(1e-12), len(dead), replacement=len(dead) > len(z_all),
                                         generator=generator)
                self.codebook.data[dead] = z_all[pick].to(self.codebook.dtype)
                self.embed_sum[dead] = z_all[pick]
                self.counts[dead] = 1.0


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


class Autoencoder(nn.Module):
    """encoder -> bottleneck (VectorQuantizer or GaussianBottleneck) -> decoder.

    forward(x, noise, generator) -> (decoder output, terms): for vq the terms are the code indices
    and the codebook and commitment losses, for gaussian the mean and logvar of q(z|x). encode(x)
    gives the code indices (vq) or the mean (gaussian); decode_indices(indices) turns a prior's
    tokens (B, h, w) into decoder outputs.
    """

    def __init__(self, encoder, bottleneck, decoder):
        super().__init__()
        self.encoder, self.bottleneck, self.decoder = encoder, bottleneck, decoder
        self.quantized = isinstance(bottleneck, VectorQuantizer)

    def forward(self, x, noise=None, generator=None):
        h = self.encoder(x)
        if self.quantized:
            z_q, indices, terms = self.bottleneck(h, generator)
            return self.decoder(z_q), {"indices": indices, **terms}
        z, mean, logvar = self.bottleneck(h, noise)
        return self.decoder(z), {"mean": mean, "logvar": logvar}

    def encode(self, x):
        h = self.encoder(x)
        return self.bottleneck.quantize_indices(h) if self.quantized else self.bottleneck.encode(h)

    def decode(self, z):
        return self.decoder(z)

    def decode_indices(self, indices):
        return self.decoder(self.bottleneck.embed_codes(indices))


# ----------------------------------------------------------------------------------------------
# Building blocks of the prior: pixel_ar.py's decoder-only Transformer and its static KV cache
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


# Copied from pixel_ar.KVCache
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


# Copied from pixel_ar.causal_mask
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


# Copied from pixel_ar.CausalSelfAttention
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


# Copied from pixel_ar.DecoderBlock
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


# Copied from pixel_ar.CausalTransformer
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


class GridPositions(nn.Module):
    """Position of slot s = the code it predicts, k_{s+1} (row s // w, column s % w of the grid),
    embedded as row + column. "The code above" is then the same relation at every slot: with one
    table of h*w rows the prior has to learn it for each slot apart. Measured on the default
    tokenizer, 1600 prior steps at width 128: 0.585 bits per code and 77.8% aligned samples,
    against 0.644 and 66.7% with one table."""

    def __init__(self, width, dim):
        super().__init__()
        self.width = width
        self.row = nn.Embedding(width, dim)  # the grid is square: h = w rows
        self.column = nn.Embedding(width, dim)

    def forward(self, positions):
        return self.row(positions // self.width) + self.column(positions % self.width)  # (B, T, D)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

def channel_mults(cfg):
    """Width multipliers of the resolution levels: f = 2 ** (levels - 1)."""
    return tuple(min(2 ** i, cfg.max_mult) for i in range(int(math.log2(cfg.downsample)) + 1))


def build_model(cfg, in_channels=3):
    """The tokenizer (vq) or the VAE (gaussian). The VAE's encoder emits mean and logvar (2 D
    channels), its decoder the mean and log-scale of the discretised Gaussian p(x|z) (2 C channels)."""
    mults, gaussian = channel_mults(cfg), cfg.bottleneck == "gaussian"
    encoder = Encoder(in_channels, cfg.channels, mults, cfg.num_res_blocks, cfg.latent_dim * (1 + gaussian))
    decoder = Decoder(in_channels * (1 + gaussian), cfg.channels, mults, cfg.num_res_blocks, cfg.latent_dim)
    if gaussian:
        bottleneck = GaussianBottleneck()
    else:
        bottleneck = VectorQuantizer(cfg.num_codes, cfg.latent_dim, cfg.beta, cfg.ema, cfg.ema_decay, cfg.ema_eps,
                                     cfg.l2_normalize, cfg.dead_code_threshold, cfg.kmeans_init)
    return Autoencoder(encoder, bottleneck, decoder)


def build_prior(cfg, num_classes):
    """The prior over the h*w codes: input ids [K codes | num_classes class tokens | null class],
    a head over the K codes only (class tokens are read, never predicted), grid positions."""
    grid = cfg.image_size // cfg.downsample
    return CausalTransformer(cfg.num_codes + num_classes + 1, grid * grid, cfg.prior_dim, cfg.prior_depth,
                             cfg.prior_heads, num_outputs=cfg.num_codes, pos_embed=GridPositions(grid, cfg.prior_dim))


# ----------------------------------------------------------------------------------------------
# The math as pure functions
# ----------------------------------------------------------------------------------------------

def nearest_code(z, codebook):
    """k* (n,) of each row of z (n, D) against the codebook (K, D); in fp32 (or wider) even under
    autocast, where bf16 distances would tie or swap near codes."""
    with torch.autocast(z.device.type, enabled=False):
        dtype = torch.promote_types(z.dtype, torch.float32)
        z, codebook = z.to(dtype), codebook.to(dtype)
        # Eq (Lec12 VQ): k* = argmin_j ||z_e - e_j||^2 = argmin_j (||e_j||^2 - 2 z_e . e_j); ||z_e||^2 is common to all j
        distances = codebook.pow(2).sum(1) - 2 * z @ codebook.t()  # (n, K)
        return distances.argmin(dim=1)


def straight_through(z_e, z_q):
    """The value of z_q with the gradient of z_e: dL/dz_e := dL/dz_q (the argmin has none)."""
    return z_e + (z_q - z_e).detach()


def vq_losses(z_e, z_q, beta):
    """(codebook term, commitment term), each a mean over the n*D entries.

    The codebook term moves only the codes, the commitment term only the encoder, and beta scales
    the commitment term. taming-transformers' VectorQuantizer (with legacy=True, its default)
    computes mean((z_q.detach() - z)^2) + beta * mean((z_q - z.detach())^2): beta lands on the
    codebook term, so its encoder is held with weight 1 and its codebook learns at beta.
    """
    # Eq (Lec12 VQ loss): ||sg[z_e] - e||^2 (codebook) + beta ||z_e - sg[e]||^2 (commitment)
    codebook = F.mse_loss(z_q, z_e.detach())
    commitment = beta * F.mse_loss(z_e, z_q.detach())
    return codebook, commitment


def codebook_stats(z, indices, num_codes):
    """This batch's n_k (K,), the vectors assigned to each code, and sum_{i: k_i = k} z_i (K, D)."""
    counts = torch.bincount(indices, minlength=num_codes).to(z.dtype)
    sums = torch.zeros(num_codes, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, indices, z)
    return counts, sums


def laplace_smooth(counts, eps):
    """N_k -> (N_k + eps) / (n + K eps) * n with n = sum_k N_k: no count is 0 and the total stays n."""
    n = counts.sum()
    return (counts + eps) / (n + len(counts) * eps) * n


def ema_codebook_update(counts, embed_sum, batch_counts, batch_sums, decay, eps):
    """One EMA step of the codebook: returns (N (K,), m (K, D), e = m / smoothed N (K, D))."""
    # Eq (VQ-VAE App. A.1): N_k <- g N_k + (1 - g) n_k,  m_k <- g m_k + (1 - g) sum_{i: k_i = k} z_i
    counts = decay * counts + (1 - decay) * batch_counts
    embed_sum = decay * embed_sum + (1 - decay) * batch_sums
    # Eq (VQ-VAE App. A.1): e_k = m_k / N_k, with N_k Laplace-smoothed
    codebook = embed_sum / laplace_smooth(counts, eps)[:, None]
    return counts, embed_sum, codebook


def kmeans(z, num_codes, iters, generator=None):
    """k-means++ seeding, then Lloyd iterations, on the rows of z (n, D): (centres (K, D), sizes (K,)).
    The seeding spreads the centres over the data, which Lloyd's random init would not do here:
    most vectors encode the same black background."""
    n = len(z)
    first = torch.randint(n, (1,), generator=generator, device=z.device)
    centres = [z[first]]
    nearest = (z - centres[0]).pow(2).sum(1)  # (n,) squared distance to the closest centre so far
    for _ in range(1, num_codes):
        pick = torch.multinomial(nearest.clamp_min(1e-12), 1, generator=generator)
        centres.append(z[pick])
        nearest = torch.minimum(nearest, (z - z[pick]).pow(2).sum(1))
    centres = torch.cat(centres)  # (K, D)
    for _ in range(iters):
        sizes, sums = codebook_stats(z, nearest_code(z, centres), num_codes)
        centres = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None], centres)
    sizes, _ = codebook_stats(z, nearest_code(z, centres), num_codes)
    return centres, sizes


def codebook_perplexity(counts):
    """exp(H(p)) of the code histogram p = counts / sum(counts): K for uniform use, 1 for one code."""
    p = counts.double() / counts.sum()
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()  # 0 log 0 = 0
    return float(entropy.exp())


def reparameterize(mean, logvar, noise):
    """z = mu + sigma * eps: a sample of q(z|x) whose gradient reaches mu and sigma."""
    # Eq (Lec12 VAE, reparameterisation): z = mu + sigma eps,  eps ~ N(0, I)
    return mean + torch.exp(0.5 * logvar) * noise


def gaussian_kl(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample (B,), summed over the other dimensions (nats)."""
    # Eq (Lec12 VAE, closed form): KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def discretized_gaussian_nll(x, mean, log_scale):
    """-log P(x) per sample (B,), in nats, of pixel values x in [-1, 1] (256 levels, bins 2/255
    wide) under N(mean, exp(log_scale)^2) integrated over each value's bin; the end bins take the
    tails, so the 256 probabilities sum to 1."""
    inv_scale = torch.exp(-log_scale)
    upper = (x - mean + 1.0 / 255) * inv_scale
    lower = (x - mean - 1.0 / 255) * inv_scale
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X <= upper edge), for the value 0
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower edge), for the value 255
    mass = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    # deep in a tail the difference of the two cdfs underflows: density at the centre times the width
    log_density = -0.5 * ((x - mean) * inv_scale).pow(2) - log_scale - 0.5 * math.log(2 * math.pi) + math.log(2.0 / 255)
    log_mass = torch.where(mass > 1e-6, torch.log(mass.clamp_min(1e-12)), log_density)
    log_prob = torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mass))
    return -log_prob.flatten(1).sum(1)


# Copied from pixel_ar.bits_per_dim
def bits_per_dim(nats, num_dims=1):
    """A negative log-likelihood of num_dims values in nats -> bits per dimension."""
    # Eq (bits/dim): bpd = L / (T ln 2)
    return nats / (num_dims * math.log(2))


def vq_vae_loss(x, x_hat, terms, rec_loss="l2"):
    """The lecture's VQ-VAE loss with -log p(x|z_q) as the mean squared error (a Gaussian of
    fixed variance, up to constants), or with rec_loss="l1" the mean absolute error (a Laplacian,
    as taming-transformers' VQGAN): (total, reconstruction)."""
    # Eq (Lec12 VQ loss): L = -log p(x|z_q) + ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2
    reconstruction = (F.l1_loss if rec_loss == "l1" else F.mse_loss)(x_hat.float(), x)
    return reconstruction + terms["codebook"] + terms["commitment"], reconstruction


def vae_loss(x, decoder_out, mean, logvar):
    """-ELBO per subpixel in nats (the training loss) and its two terms per sample (B,) in nats."""
    C = x.shape[1]
    x_mean, log_scale = decoder_out.float().split(C, dim=1)
    # Eq (Lec12 VAE): L_VAE = -E_q(z|x)[log p(x|z)] + KL(q(z|x) || p(z)), one sample of z per image
    nll = discretized_gaussian_nll(x, x_mean, log_scale.clamp(-7.0, 2.0))
    kl = gaussian_kl(mean.float(), logvar.float())
    return (nll + kl).mean() / x[0].numel(), nll, kl


def prior_inputs(codes, labels, num_codes):
    """The shift: input [class token, k_1, ..., k_{T-1}] (B, T) for codes (B, T) in raster order
    and labels (B,) (num_classes = the null class): slot t-1 predicts k_t."""
    return torch.cat([(num_codes + labels)[:, None].to(codes), codes[:, :-1]], dim=1)


def prior_loss(logits, codes):
    """Negative log-likelihood of the codes per token in nats, logits (B, T, K)."""
    # Eq (Lec12 prior): L = -1/T sum_t log p(k_t | k_<t, c), the codes read in raster order
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))


# Copied from pixel_ar.filter_logits
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


# Copied from pixel_ar.sample_next
def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One id per row of logits (B, K): argmax at temperature 0, else a draw from
    softmax(filter_logits(logits / temperature))."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32, fp64 stays
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# Copied from pixel_ar.cfg_logits
def cfg_logits(cond, uncond, w):
    """Classifier-free guidance on next-token logits; w = 0 is the plain conditional model."""
    # Eq (Lec15 CFG form, on logits): l~ = (1 + w) l(x_<t, c) - w l(x_<t, null)
    return (1 + w) * cond - w * uncond


# Copied from pixel_ar.generate
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
# Evaluation: reconstructions, codebook use, the prior's samples; pictures
# ----------------------------------------------------------------------------------------------

def validate_config(cfg, data):
    """Every check that can fail before any work is done (DESIGN.md section 6)."""
    f = cfg.downsample
    if f & (f - 1):
        raise InputError(f"--downsample {f}: expected a power of 2 (e.g. 4 or 8)")
    if cfg.image_size % f:
        raise InputError(f"--image_size {cfg.image_size} is not divisible by --downsample {f}; "
                         f"pick an image size that is a multiple of {f} or a smaller --downsample")
    if cfg.bottleneck not in ("vq", "gaussian"):
        raise InputError(f"--bottleneck {cfg.bottleneck}: expected vq or gaussian")
    if cfg.rec_loss not in ("l1", "l2"):
        raise InputError(f"--rec_loss {cfg.rec_loss}: expected l1 or l2")
    if cfg.prior_dim % cfg.prior_heads:
        raise InputError(f"--prior_dim {cfg.prior_dim} is not divisible by --prior_heads {cfg.prior_heads}")
    if cfg.prior_batch_size % int(os.environ.get("WORLD_SIZE", 1)):
        raise InputError(f"--prior_batch_size {cfg.prior_batch_size} is global and must divide evenly over the processes")
    if cfg.top_k > cfg.num_codes:
        raise InputError(f"--top_k {cfg.top_k} is larger than the codebook (--num_codes {cfg.num_codes})")
    if data is not None:
        n = len(data["train"]["images"])
        for flag in ("batch_size", "prior_batch_size"):
            if getattr(cfg, flag) > n:
                raise InputError(f"--{flag} {getattr(cfg, flag)} is larger than the {n} training images; lower it or add data")
        if cfg.bottleneck == "vq" and "labels" not in data["train"]:
            raise InputError(f"--data {cfg.data}: the class-conditional prior needs a 'labels' array "
                             f"(or train the VAE alone with --bottleneck gaussian)")


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


@torch.no_grad()
def reconstruct(model, images, cfg, rt, batch_size=250):
    """Test-time pass over uint8 images (N, H, W, C) in eval mode: reconstructions (uint8), code
    indices (N, h, w) for vq, and for gaussian the per-image -log p(x|z) and KL in nats, with one
    sample of z per image from a fixed generator (the reconstructions decode the mean)."""
    model.eval()
    g = torch.Generator(rt.device).manual_seed(cfg.seed + 2)
    recon, codes, nll, kl = [], [], [], []
    for lo in range(0, len(images), batch_size):
        x = images_to_tensor(images[lo:lo + batch_size]).to(rt.device)
        with rt.autocast():
            h = model.encoder(x)
            if model.quantized:
                indices = model.bottleneck.quantize_indices(h)
                recon.append(tensor_to_images(model.decode_indices(indices)))
                codes.append(indices.cpu())
                continue
            mean, logvar = model.bottleneck.split(h)
            z = reparameterize(mean, logvar, torch.randn(mean.shape, generator=g, device=rt.device))
            _, nll_b, kl_b = vae_loss(x, model.decode(z), mean, logvar)
            recon.append(tensor_to_images(model.decode(mean)[:, :x.shape[1]]))
        nll.append(nll_b.cpu())
        kl.append(kl_b.cpu())
    out = {"images": np.concatenate(recon)}
    if model.quantized:
        out["codes"] = torch.cat(codes)
    else:
        out["nll"], out["kl"] = torch.cat(nll), torch.cat(kl)
    return out


def evaluate_tokenizer(model, data, cfg, rt, write_files=True):
    """Reconstruction error (PSNR), the detector on reconstructions, codebook usage and perplexity
    (vq) or the ELBO's terms in bits/dim (gaussian), on the test split; the reconstruction grid."""
    test = data["test"]["images"]
    out = reconstruct(model, test, cfg, rt)
    mse = float(((out["images"].astype(np.float64) - test) ** 2).mean())
    metrics = {"recon_mse": mse / 255 ** 2, "recon_psnr_db": 10 * math.log10(255 ** 2 / max(mse, 1e-10)),
               "test_size": len(test)}
    right = None
    if cfg.data == "shapes":
        right = (detect_attributes(out["images"]) == data["test"]["attributes"]).all(axis=1)
        metrics["detector_accuracy_recon"] = float(right.mean())
        metrics["detector_accuracy_clean"] = float((detect_attributes(test) == data["test"]["attributes"]).all(axis=1).mean())
    if model.quantized:
        counts = torch.bincount(out["codes"].flatten(), minlength=cfg.num_codes)
        metrics.update(codebook_usage=float((counts > 0).float().mean()), codebook_perplexity=codebook_perplexity(counts),
                       tokens_per_image=int(out["codes"][0].numel()), pixel_values_per_image=int(test[0].size))
    else:
        D = test[0].size
        nll, kl = bits_per_dim(out["nll"].mean().item(), D), bits_per_dim(out["kl"].mean().item(), D)
        metrics.update(elbo_bits_per_dim=nll + kl, recon_nll_bits_per_dim=nll, kl_bits_per_dim=kl)
    if write_files:
        # the first detector mistakes (up to 6), then the first test images: 24 in all, test over reconstruction
        first = np.flatnonzero(~right)[:6] if right is not None else np.zeros(0, dtype=np.int64)
        show = np.concatenate([first, np.setdiff1d(np.arange(len(test)), first)])[:24]
        rows, names = [], []
        for part in (show[:12], show[12:24]):
            if len(part) == 0:
                continue
            rows += [test[part], out["images"][part]]
            names += ["test", cfg.bottleneck]
        save_png(os.path.join(cfg.out_dir, "reconstructions.png"), labelled_rows(rows, names))
    return metrics


@torch.no_grad()
def encode_codes(model, images, rt, batch_size=500):
    """uint8 images (N, H, W, C) -> their codes (N, h*w) long in raster order, on the CPU."""
    model.eval()
    out = []
    for lo in range(0, len(images), batch_size):
        with rt.autocast():
            out.append(model.encode(images_to_tensor(images[lo:lo + batch_size]).to(rt.device)).flatten(1).cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_codes(prior, labels, num_codes, num_classes, tokens, cfg, rt, generator, w=None, batch_size=256):
    """Class-conditional code grids (N, T) for labels (N,), with CFG against the null class."""
    out = []
    for lo in range(0, len(labels), batch_size):
        prompt = (num_codes + torch.as_tensor(labels[lo:lo + batch_size]))[:, None].to(rt.device)  # (B, 1)
        null = torch.full_like(prompt, num_codes + num_classes)
        with rt.autocast():
            out.append(generate(prior, prompt, tokens, cfg.temperature, cfg.top_k, 1.0, cfg.cfg_w if w is None else w,
                                null, generator=generator))
    return torch.cat(out)


def evaluate_prior(model, prior, data, cfg, rt, write_files=True):
    """The prior's test NLL per code and its samples: tokens decoded to images, their alignment
    with the requested class; (metrics, timing: seconds per sampled image, batched and alone)."""
    num_classes, grid = len(data["class_names"]), cfg.image_size // cfg.downsample
    tokens = grid * grid
    prior.eval()
    test_codes = encode_codes(model, data["test"]["images"], rt)
    test_labels = torch.as_tensor(data["test"]["labels"])
    nats = 0.0
    with torch.no_grad():
        for lo in range(0, len(test_codes), 500):
            codes = test_codes[lo:lo + 500].to(rt.device)
            with rt.autocast():
                logits = prior(prior_inputs(codes, test_labels[lo:lo + 500].to(rt.device), cfg.num_codes))
            nats += prior_loss(logits, codes).item() * len(codes)
    metrics = {"prior_test_bits_per_code": nats / len(test_codes) / math.log(2)}
    classes = np.unique(data["train"]["labels"])  # for shapes: the 18 seen (shape, color) pairs
    labels = np.repeat(classes, cfg.eval_per_class)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    codes = sample_codes(prior, labels, cfg.num_codes, num_classes, tokens, cfg, rt, torch.Generator(rt.device).manual_seed(cfg.seed + 3))
    with torch.no_grad(), rt.autocast():
        images = np.concatenate([tensor_to_images(model.decode_indices(codes[lo:lo + 256].reshape(-1, grid, grid)))
                                 for lo in range(0, len(codes), 256)])
    sync()
    timing = {"sample_s_per_image_batched": (time.perf_counter() - t0) / len(labels)}
    # pixel_ar's protocol: one sequence after a one-token prompt, KV cache, no guidance, tokens only
    one = torch.full((1, 1), cfg.num_codes, dtype=torch.long, device=rt.device)
    generate(prior, one, min(8, tokens))  # warm-up
    sync()
    t0 = time.perf_counter()
    generate(prior, one, tokens, generator=torch.Generator(rt.device).manual_seed(0))
    sync()
    timing["sample_s_cache"] = time.perf_counter() - t0
    metrics.update(eval_samples=len(labels), sampler=f"cfg w={cfg.cfg_w:g}, temperature {cfg.temperature:g}, top-k {cfg.top_k}")
    if cfg.data == "shapes":
        metrics["alignment"] = alignment(images, labels)
    if write_files:
        names = [data["class_names"][c] for c in classes]
        show = images.reshape(len(classes), cfg.eval_per_class, *images.shape[1:])[:, :12]
        save_png(os.path.join(cfg.out_dir, "samples.png"), labelled_rows(show, names))
    return metrics, timing


def evaluate(model, prior, data, cfg, rt, write_files=True):
    """The tokenizer's metrics and, with a prior, its samples' alignment and test NLL. Returns
    (metrics, timing): timings vary from run to run and stay out of metrics.json."""
    metrics, timing = evaluate_tokenizer(model, data, cfg, rt, write_files), {}
    if prior is not None:
        prior_metrics, timing = evaluate_prior(model, prior, data, cfg, rt, write_files)
        metrics.update(prior_metrics)
    return metrics, timing


def format_metrics(metrics):
    """One line per result, for the end of the run."""
    keys = ["recon_psnr_db", "recon_mse", "detector_accuracy_recon", "detector_accuracy_clean", "codebook_usage",
            "codebook_perplexity", "tokens_per_image", "elbo_bits_per_dim", "recon_nll_bits_per_dim",
            "kl_bits_per_dim", "prior_test_bits_per_code", "alignment"]
    return "\n".join(f"{k}: {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}: {metrics[k]}"
                     for k in keys if k in metrics)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def train(cfg):
    """Train the tokenizer (max_steps), then the prior over its codes (prior_steps, vq only); or
    with --eval_only evaluate a checkpoint. Returns the final metrics."""
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
        model = build_model(cfg, data["channels"]).to(rt.device)
        quantized = cfg.bottleneck == "vq"
        prior = build_prior(cfg, len(data["class_names"])).to(rt.device) if quantized else None
        if cfg.eval_only:
            if ckpt is None:
                raise InputError("--eval_only 1 needs --resume path/to/ckpt.pt")
            model.load_state_dict(ckpt["model"])
            if prior is not None:
                prior.load_state_dict(ckpt["prior"])
            metrics, timing = evaluate(model, prior, data, cfg, rt) if rt.master else ({}, {})
            if rt.master:
                print(format_metrics(metrics), flush=True)
            return finish_run(cfg, rt, metrics, t_start)
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, rt)
        prior_optimizer = make_optimizer(prior, cfg.prior_lr, cfg.weight_decay, rt) if quantized else None
        start = 0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if quantized:
                prior.load_state_dict(ckpt["prior"])
                prior_optimizer.load_state_dict(ckpt["prior_optimizer"])
            start = ckpt["step"]
            set_rng_state(ckpt["rng"])
        run_model = prepare_model(model, rt)
        run_prior = prepare_model(prior, rt) if quantized else None
        logger = Logger(cfg.out_dir, cfg, rt, append=ckpt is not None)
        n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
        logger.print(f"vqvae: {cfg.bottleneck} autoencoder {n_params(model):.2f}M parameters"
                     + (f", prior {n_params(prior):.2f}M" if quantized else "")
                     + f", {len(data['train']['images'])} training images, device {rt.device}, "
                     f"{'bf16' if rt.amp_dtype else 'fp32'}{', compiled' if rt.compile else ''}, world size {rt.world_size}")
        train_images = torch.as_tensor(data["train"]["images"])
        grid = cfg.image_size // cfg.downsample
        share = slice(rt.rank * cfg.batch_size // rt.world_size, (rt.rank + 1) * cfg.batch_size // rt.world_size)
        total = cfg.max_steps + (cfg.prior_steps if quantized else 0)
        end = min(cfg.stop_step, total) if cfg.stop_step else total
        progress, codes, prior_time = None, None, 0.0
        for step in range(start, end):
            tokenizer_phase = step < cfg.max_steps
            phase_step = step if tokenizer_phase else step - cfg.max_steps
            if progress is None or step == cfg.max_steps:
                phase_cfg = cfg if tokenizer_phase else dataclasses.replace(cfg, batch_size=cfg.prior_batch_size)
                progress = Progress(phase_cfg, rt, logger, step, end, total)
                logger.print("training the " + ("tokenizer" if tokenizer_phase else "prior over the codes"))
            g = torch.Generator(rt.device).manual_seed(cfg.seed * 1_000_003 + step)
            if tokenizer_phase:
                lr = cosine_lr(phase_step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
                net, opt = model, optimizer
                idx = batch_indices(step, len(train_images), cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
                x = images_to_tensor(train_images[idx]).to(rt.device, non_blocking=True)
                # the noise of q(z|x) is drawn for the global batch: DDP ranks see the single-process draw
                noise = None if quantized else torch.randn((cfg.batch_size, cfg.latent_dim, grid, grid), generator=g,
                                                            device=rt.device)[share]
                with rt.autocast():
                    out, terms = run_model(x, noise, g)
                if quantized:
                    loss, recon = vq_vae_loss(x, out, terms, cfg.rec_loss)
                    extra = {"recon": recon, "codebook": terms["codebook"], "commitment": terms["commitment"]}
                else:
                    loss, nll, kl = vae_loss(x, out, terms["mean"], terms["logvar"])
                    extra = {"recon_nll": nll.mean() / x[0].numel(), "kl": kl.mean() / x[0].numel()}
            else:
                if codes is None:  # the tokenizer is frozen from here on: tokenize the training set once
                    model.eval().requires_grad_(False)
                    codes = encode_codes(model, data["train"]["images"], rt)
                    t_prior = time.time()
                lr = cosine_lr(phase_step, cfg.prior_steps, cfg.prior_lr, cfg.min_lr, cfg.warmup_steps)
                net, opt = prior, prior_optimizer
                idx = batch_indices(phase_step, len(codes), cfg.prior_batch_size, cfg.seed + 1)  # global batch
                labels = torch.as_tensor(data["train"]["labels"])[idx].to(rt.device)
                # class dropout for CFG (the null class is num_classes), drawn for the global batch
                labels = torch.where(torch.rand(len(labels), generator=g, device=rt.device) < cfg.p_uncond,
                                     len(data["class_names"]), labels)
                mine = slice(rt.rank * len(idx) // rt.world_size, (rt.rank + 1) * len(idx) // rt.world_size)
                batch_codes = codes[idx[mine]].to(rt.device)
                with rt.autocast():
                    loss = prior_loss(run_prior(prior_inputs(batch_codes, labels[mine], cfg.num_codes)), batch_codes)
                extra = {}
            for group in opt.param_groups:
                group["lr"] = lr
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            ckpt_now = progress.step(done, loss, lr, **extra)
            if not tokenizer_phase:
                prior_time = time.time() - t_prior
            if cfg.eval_every and done % cfg.eval_every == 0 and done != end and rt.master and tokenizer_phase:
                with progress.paused():
                    quick = evaluate_tokenizer(model, data, cfg, rt, write_files=False)
                    model.train()
                logger.print(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in quick.items() if isinstance(v, float)))
                logger.log({"step": done, **quick})
            if ckpt_now and rt.master:
                state = {"model_name": MODEL_NAME, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": done, "config": asdict(cfg), "rng": rng_state(), "data_position": done}
                if quantized:
                    state.update(prior=prior.state_dict(), prior_optimizer=prior_optimizer.state_dict())
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), state)
        metrics = {}
        if rt.master:
            metrics, timing = evaluate(model, prior, data, cfg, rt)
            if codes is not None:
                timing["prior_ms_per_step"] = 1000 * prior_time / (end - max(start, cfg.max_steps))
            metrics.update(steps=end, final_loss=progress.loss if progress else None)
            logger.print(format_metrics(metrics))
            if timing:
                logger.print(", ".join(f"{k} {v:.4g}" for k, v in timing.items()))
                logger.log({"event": "timing", **timing})
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
