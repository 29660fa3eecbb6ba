"""VQ-GAN and one Transformer over text and image tokens: a sharper image tokenizer, then
text-to-image and image captioning with a single causal model (DALL-E, Chameleon).

Lecture: lecture-notes.md, Lec12 "VQ-GAN" ("VQ-GAN improves VQ-VAE by adding adversarial/perceptual
signals in tokenizer training") and "Unifying Text and Image Tokens" (1. add image tokens to the
LM vocabulary, 2. train on mixed text+image token streams, 3. decode image tokens back to pixels
with the de-tokenizer). The equations, as named in the notes and papers:

    (Lec12 VQ)          k* = argmin_j ||z_e(x) - e_j||_2,  z_q(x) = e_k*          -> nearest_code()
    (Lec12 VQ loss)     ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2 (EMA codebook)  -> vq_losses(), VectorQuantizer
    (Lec12 VQ-GAN)      L = ||x - x^||^2 + w_p L_perc(x^, x) + r(t) w_adv lambda L_G + L_VQ -> generator_objective()
                        (the squared error is vqvae.py's; --rec_loss l1 takes taming's |x - x^|_1)
      hinge, D          L_D = 1/2 E[relu(1 - D(x))] + 1/2 E[relu(1 + D(x^))]        -> hinge_d_loss()
      hinge, G          L_G = -E[D(x^)]                                              -> hinge_g_loss()
      adaptive weight   lambda = ||grad_W L_rec|| / (||grad_W L_G|| + 1e-4), W = the decoder's last
                        layer, clamped to [0, max_lambda] and detached              -> adaptive_weight()
      warm-up           D trains from step 0; r(t) = min(1, t / adv_warmup) ramps the generator's
                        adversarial weight in (not taming's switch at disc_start)  -> adversarial_ramp()
      perceptual        LPIPS with unit weights on a fixed random conv net            -> feature_distance()
                        (or a Laplacian-pyramid L1, sum_j mean |L_j(x^) - L_j(x)|    -> laplacian_l1())
    (Lec12 unify, 1)    one vocabulary: [256 bytes, PAD, BOS, EOS | BOI, EOI | K codes] -> code_ids(), TEXT_VOCAB
    (Lec12 unify, 2)    [caption] [BOI] [codes] [EOI] and [BOI] [codes] [EOI] [caption], each slot's
                        logits masked to its modality; L = 1/8 L_text + 7/8 L_image (DALL-E)
                        -> build_sequences(), allowed_ids(), prior_loss()
    (Lec12 unify, 3)    sampled codes -> pixels by the tokenizer's decoder          -> text_to_image()
    (Lec15 CFG form)    l~ = (1 + w) l(x_<t, caption) - w l(x_<t, empty caption)   -> cfg_logits()

Papers: Esser et al. 2021, taming transformers / VQGAN (arXiv:2012.09841); van den Oord et al. 2017,
VQ-VAE (arXiv:1711.00937); Isola et al. 2017, pix2pix PatchGAN (arXiv:1611.07004); Lim & Ye 2017,
geometric GAN / hinge loss (arXiv:1705.02894); Bojanowski et al. 2018, GLO, the Laplacian-pyramid
L1 (arXiv:1707.05776); Zhang et al. 2018, LPIPS (arXiv:1801.03924); Ramesh et al. 2021, DALL-E
(arXiv:2102.12092); Chameleon Team 2024 (arXiv:2405.09818); Ho & Salimans 2022, classifier-free
guidance (arXiv:2207.12598).

The perceptual term. No weights can be downloaded, so LPIPS's VGG is out. Three weight-free choices
are implemented (--perceptual): `features` (the default), LPIPS's distance on the channel-normalised
activations of a fixed randomly initialised conv net (random conv features keep edges and colour
contrasts, and need no training); `laplacian`, the L1 distance between Laplacian pyramids, whose
finest band is mostly edges (the first default, for that reason); `none`. Measured (README, 500
steps of batch 32): the tokenizer trained alone (`--prior_steps 0`, seed 0) with `features` is
sharper than with the pyramid (gradient-energy ratio 0.71, 0.73 with seed 1, against 0.67) and its
reconstructions read better (95.0% and 94.7% against 90.0%); two default runs of that time, whose
random streams differed, were closer (0.67 against 0.65; 91.7% against 92.3%). Runs differ by a few
points, so only the sharpness gain holds in both. The discriminator adds sharpness, not accuracy:
without it, the pyramid's 0.67 falls to 0.56, and the squared error alone reads 96.1% at 0.69.

Conventions. Images are float (B, C, H, W) in [-1, 1], uint8 (N, H, W, C) on disk. The encoder
downsamples by f = 2 ** (levels - 1): 32 px becomes an 8x8 grid of codes at f = 4, read in raster
order. Token ids: 0..255 UTF-8 bytes, 256 PAD, 257 BOS, 258 EOS (clip.py's ByteTokenizer), 259 BOI,
260 EOI, 261 + k image code k. A caption occupies a fixed region of context_length slots
([BOS] bytes [EOS] [PAD]...), so that every image code has a fixed slot in each order. Slot s of
the logits predicts the token at slot s + 1; allowed[s + 1] says which ids it may take (text slots:
bytes, PAD, EOS; image slots: the K codes; BOS, BOI, EOI slots: that id); its position id is the
role of that token (role_ids: caption slot j, BOI, EOI or code n), the same in both orders, and
generate() is given these positions. Shape legend: B batch, C channels, H W image size, h w code
grid, N = h w image tokens, L caption region, S = L + N + 2 sequence slots, V vocabulary, K
codebook size.

Measured (the cpu preset on a 2-core CPU, alone): `python vqgan.py --stop_step 1000` (the tokenizer,
2 min 46 s) then `python vqgan.py --resume out/vqgan/ckpt.pt` (the prior, 9 min 30 s), 12 min 16 s in
all; `python vqgan.py` runs both in one command. Reconstructions 32.4 dB PSNR, the detector reads
97.1% of them (vqvae.py's default, trained as long: 97.7%, 33.4 dB; vqgan.py's are a little sharper,
0.75 against 0.73 in gradient energy). Text-to-image finds every requested attribute in 87.3% of 576
samples on seen (shape, color) pairs (84.7% for "a red circle" prompts, 89.9% naming all four; seed
1: 84.9%), 46.9% on heldout pairs; captions name the right attribute 87.9% of the time and are
well-formed sentences in 98.4%. What bought the prior's 11.8% -> 87.3% (README): a 0.25M model
trained for 6000 steps instead of a 0.91M one for 400, 80% of the sequences text-first, 2 heads of
32, w = 0.75, temperature 0.3.

Commands:
    python vqgan.py --stop_step 1000                # cpu preset, stage 1: the tokenizer; writes out/vqgan/
    python vqgan.py --resume out/vqgan/ckpt.pt      # stage 2: the prior, then the evaluation
    python vqgan.py                                 # both stages in one command
    python vqgan.py --preset gpu                    # one GPU: bf16 autocast and torch.compile
    torchrun --standalone --nproc_per_node=4 vqgan.py --preset gpu   # DDP; batch sizes are global
    python vqgan.py --eval_only 1 --resume out/vqgan/ckpt.pt --compare out/vqvae/ckpt.pt   # vs vqvae.py
    python vqgan.py --eval_only 1 --resume out/vqgan/ckpt.pt --cfg_w 3 --top_k 16           # resample
    python vqgan.py --prior_steps 0 --perceptual laplacian    # the tokenizer alone (the ablation)
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

MODEL_NAME = "vqgan"


@dataclass
class Config:
    # model: the tokenizer (vqvae.py's autoencoder and quantizer) and its discriminator
    image_size: int = 32  # height and width in pixels; a multiple of --downsample
    downsample: int = 4  # f, a power of 2: the code grid is image_size / f on a side (4: 8x8 codes at 32 px)
    channels: int = 16  # encoder/decoder width at full resolution
    max_mult: int = 4  # width cap: resolution level i has channels * min(2**i, max_mult) channels
    num_res_blocks: int = 1  # residual blocks per resolution level (encoder and decoder)
    latent_dim: int = 16  # D: code dimension
    num_codes: int = 128  # K: codebook size
    beta: float = 0.25  # commitment weight on ||z_e - sg[e]||^2
    ema: bool = True  # update the codebook by an EMA of its assigned vectors instead of the codebook loss
    ema_decay: float = 0.99  # gamma of the EMA codebook
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA counts
    dead_code_threshold: float = 1.0  # reset a code whose EMA count (vectors per batch) falls below this (0: off)
    kmeans_init: bool = True  # initialise the codebook by k-means++ on the first batch's encodings
    l2_normalize: bool = False  # quantize l2-normalised vectors against l2-normalised codes (cosine distance)
    disc_channels: int = 32  # width of the PatchGAN's first layer
    disc_layers: int = 2  # stride-2 convolutions of the PatchGAN (taming's n_layers)
    # method: the tokenizer's loss
    rec_loss: str = "l2"  # reconstruction term: l2 (mean squared error, vqvae.py's) or l1 (taming's)
    perceptual: str = "features"  # perceptual term: features (LPIPS on a fixed random conv net), laplacian (pyramid L1), none
    perceptual_weight: float = 1.0  # w_p
    adv_weight: float = 0.5  # w_adv, on top of the adaptive weight lambda (0: no discriminator, a VQ-VAE with a perceptual term)
    adv_warmup: int = 150  # steps over which the generator's adversarial weight ramps from 0 to 1 (D trains from 0)
    max_lambda: float = 100.0  # clamp of the adaptive weight lambda
    # model: the prior, one causal Transformer over text and image tokens
    prior_dim: int = 64  # width of the Transformer
    prior_depth: int = 4  # decoder blocks
    prior_heads: int = 2  # attention heads per block (width 32 each: a CPU step of 86 ms against 112 with 4 of 16)
    prior_positions: str = "roles"  # roles: a slot embeds the role of the token it predicts, alike in both orders (RolePositions); slots: one table
    context_length: int = 56  # L: caption slots, BOS and EOS included (shapes captions are at most 53 bytes)
    # method: the prior
    prior_steps: int = 6000  # optimizer steps of the prior, after the tokenizer's max_steps (0: tokenizer only)
    prior_batch_size: int = 32  # global batch of the prior (split across DDP ranks)
    prior_lr: float = 2e-3  # peak learning rate of the prior
    p_uncond: float = 0.1  # probability of replacing a text-first caption by the empty caption (for CFG)
    p_image_first: float = 0.2  # share of sequences in the order [image] [caption] (captioning)
    text_loss_weight: float = 0.125  # weight of the text tokens' loss, the image tokens get 1 - it (DALL-E: 1/8)
    # evaluation
    cfg_w: float = 0.75  # guidance weight w in l~ = (1 + w) l(caption) - w l(empty caption)
    temperature: float = 0.3  # sampling temperature of the image tokens (captions are greedy)
    top_k: int = 0  # sample among the k most likely codes (0: all)
    eval_per_pair: int = 16  # text-to-image samples per (shape, color) pair and prompt kind
    caption_images: int = 256  # test (and heldout) images captioned for the captioning accuracy
    compare: str = ""  # a vqvae.py checkpoint: compare its reconstructions with this tokenizer's
    # data
    data: str = "shapes"  # 'shapes' (built-in world) or a path to an .npz file with images (and captions)
    n_train: int = 20000  # shapes images rendered for training
    n_test: int = 1000  # shapes images rendered for the test split (and the heldout split)
    # optim
    max_steps: int = 1000  # optimizer steps of the tokenizer; also the length of its cosine schedule
    batch_size: int = 32  # global batch of the tokenizer (split across DDP ranks)
    lr: float = 1e-3  # peak learning rate of the tokenizer and its discriminator
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
    out_dir: str = "out/vqgan"  # where ckpt.pt, log.jsonl, metrics.json and the PNGs go
    log_every: int = 100  # steps between progress lines
    eval_every: int = 0  # steps between quick reconstruction checks of the tokenizer (0: only at the end)
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    resume: str = ""  # checkpoint to resume training from, or to evaluate with --eval_only 1
    stop_step: int = 0  # end this run at this step although the schedule spans max_steps + prior_steps (0: off)
    eval_only: bool = False  # with --resume: only evaluate the checkpoint and write the pictures


# The accepted range of each numeric field, checked before any work (check_config). A field not
# listed is an integer >= 1 or a finite float > 0.
RANGES = {"beta": ">= 0", "ema_decay": "[0, 1)", "ema_eps": ">= 0", "dead_code_threshold": ">= 0",
          "perceptual_weight": ">= 0", "adv_weight": ">= 0", "adv_warmup": ">= 0", "context_length": ">= 3",
          "prior_steps": ">= 0", "p_uncond": "[0, 1)", "p_image_first": "[0, 1]", "text_loss_weight": "[0, 1]",
          "cfg_w": ">= 0", "temperature": ">= 0", "top_k": ">= 0", "caption_images": ">= 0", "min_lr": ">= 0",
          "warmup_steps": ">= 0", "weight_decay": ">= 0", "grad_clip": ">= 0", "seed": ">= 0", "eval_every": ">= 0",
          "stop_step": ">= 0"}

# Fields that may change when a run is resumed (any other difference is an error), and that
# --eval_only takes from the command line rather than from the checkpoint.
RUNTIME_FIELDS = ("device", "dtype", "compile", "out_dir", "log_every", "eval_every", "ckpt_every",
                  "resume", "stop_step", "eval_only", "max_steps", "cfg_w", "temperature", "top_k",
                  "eval_per_pair", "caption_images", "compare")

# The Config defaults are the cpu preset; the others override a few fields.
PRESETS = {
    "tiny": dict(image_size=16, channels=8, max_mult=2, latent_dim=8, num_codes=16, disc_channels=8, disc_layers=1,
                 adv_warmup=2, prior_dim=32, prior_depth=1, prior_heads=2, prior_steps=4, prior_batch_size=8,
                 eval_per_pair=1, caption_images=8, n_train=128, n_test=32, max_steps=4, batch_size=8,
                 warmup_steps=2, log_every=2, ckpt_every=1000),
    "cpu": dict(),
    "gpu": dict(channels=64, num_res_blocks=2, latent_dim=32, num_codes=512, disc_channels=64, disc_layers=3,
                prior_dim=384, prior_depth=8, prior_heads=6, prior_steps=10000, prior_batch_size=128, prior_lr=5e-4,
                eval_per_pair=32, caption_images=2000, n_train=100000, n_test=5000, max_steps=10000, batch_size=128,
                lr=2e-4, min_lr=1e-5, warmup_steps=500, log_every=100, ckpt_every=2000, adv_warmup=2000),
}


# ----------------------------------------------------------------------------------------------
# Building blocks: vqvae.py's encoder, decoder and quantizer; the PatchGAN; the perceptual net
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


# Copied from vqvae.all_gather_rows
def all_gather_rows(x):
    """Concatenate a tensor's rows over the DDP ranks in rank order (the global batch's order);
    x itself without DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# Copied from vqvae.all_reduce_sum
def all_reduce_sum(x):
    """Sum a tensor over the DDP ranks in place (a no-op without DDP); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


# Copied from vqvae.VectorQuantizer
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


# Copied from vqvae.Autoencoder
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


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix; taming's NLayerDiscriminator): a conv net whose output is a grid of logits,
    one per overlapping patch, so that it judges local edges and texture, where an autoencoder
    blurs, rather than the whole picture. num_layers stride-2 convs, one stride-1 conv, a 1-channel
    conv. GroupNorm instead of taming's BatchNorm: each image is judged on its own, so real and fake
    can share one batch and DDP ranks compute the single-process result."""

    def __init__(self, in_channels, channels, num_layers):
        super().__init__()
        layers, ch = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)], channels
        for i in range(1, num_layers + 1):
            out = channels * min(2 ** i, 8)
            # no bias before a norm: GroupNorm removes it, and its gradient, 0 up to rounding, would get
            # full-size steps of random sign from Adam (and DDP's rounding differs from one process's)
            layers += [nn.Conv2d(ch, out, 4, stride=2 if i < num_layers else 1, padding=1, bias=False),
                       nn.GroupNorm(math.gcd(8, out), out), nn.LeakyReLU(0.2)]
            ch = out
        # no bias on the logits either: an offset shared by real and fake says nothing, and while every
        # margin is active (as at the start) the hinge loss gives it a gradient of exactly 0 + rounding
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1, bias=False))
        self.layers = nn.Sequential(*layers)
        for m in self.modules():  # taming's init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x):
        return self.layers(x)  # (B, 1, H / 2^num_layers - 2, W / 2^num_layers - 2) patch logits


class RandomFeatures(nn.Module):
    """The `features` perceptual term's network: three conv + ReLU layers (strides 1, 2, 2) drawn once
    from a fixed seed and never trained (LPIPS without learned weights; random conv features keep
    edges and colour contrasts)."""

    def __init__(self, in_channels, widths=(32, 64, 128), seed=1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        convs, ch = [], in_channels
        for i, width in enumerate(widths):
            conv = nn.Conv2d(ch, width, 3, stride=1 if i == 0 else 2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (ch * 9)))
                conv.bias.zero_()
            convs.append(conv)
            ch = width
        self.convs = nn.ModuleList(convs)
        self.requires_grad_(False)

    def forward(self, x):
        feats = []
        for conv in self.convs:
            x = F.relu(conv(x))
            feats.append(x)
        return feats


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


# ----------------------------------------------------------------------------------------------
# Building blocks: pixel_ar.py's causal Transformer, its static KV cache and the sampler
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
# The model
# ----------------------------------------------------------------------------------------------

# Copied from vqvae.channel_mults
def channel_mults(cfg):
    """Width multipliers of the resolution levels: f = 2 ** (levels - 1)."""
    return tuple(min(2 ** i, cfg.max_mult) for i in range(int(math.log2(cfg.downsample)) + 1))


def build_model(cfg, in_channels=3):
    """The tokenizer: vqvae.py's encoder, vector quantizer and decoder (C output channels)."""
    mults = channel_mults(cfg)
    encoder = Encoder(in_channels, cfg.channels, mults, cfg.num_res_blocks, cfg.latent_dim)
    decoder = Decoder(in_channels, cfg.channels, mults, cfg.num_res_blocks, cfg.latent_dim)
    quantizer = VectorQuantizer(cfg.num_codes, cfg.latent_dim, cfg.beta, cfg.ema, cfg.ema_decay, cfg.ema_eps,
                                cfg.l2_normalize, cfg.dead_code_threshold, cfg.kmeans_init)
    return Autoencoder(encoder, quantizer, decoder)


def build_discriminator(cfg, in_channels=3):
    return PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers)


class RolePositions(nn.Module):
    """Position of slot s = the role of the token it predicts, the one at slot s + 1 (role_ids): caption
    slot j, BOI, EOI (one learned row each), or image code n, embedded as row n // w + column n % w of
    the code grid. The two orders put a role at different slots; its embedding is the same in both,
    and "the code above" is the same relation at every image slot (vqvae.py's GridPositions).
    Measured against one table of slots (the default prior, 576 samples): text-to-image alike (88.0%
    against 87.7%), captions better (70.7% of test captions name every attribute right, against
    52.3%; at 3000 steps with half the sequences image-first, 74.2% against 59.8%)."""

    def __init__(self, text_len, width, dim):
        super().__init__()
        self.text_len, self.width = text_len, width
        self.text = nn.Embedding(text_len + 2, dim)  # caption slots 0..L-1, then BOI, EOI
        self.row = nn.Embedding(width, dim)  # the grid is square: h = w rows
        self.column = nn.Embedding(width, dim)

    def forward(self, roles):
        code = (roles - self.text_len - 2).clamp_min(0)  # (B, T) the code's index n, 0 at the text roles
        image = self.row(code // self.width) + self.column(code % self.width)  # (B, T, D)
        text = self.text(roles.clamp_max(self.text_len + 1))  # (B, T, D)
        return torch.where((roles >= self.text_len + 2)[..., None], image, text)


def build_prior(cfg):
    """One causal Transformer over the joint vocabulary; its context holds one whole sequence."""
    grid = cfg.image_size // cfg.downsample
    positions = RolePositions(cfg.context_length, grid, cfg.prior_dim) if cfg.prior_positions == "roles" else None
    return CausalTransformer(vocab_size(cfg.num_codes), sequence_length(cfg.context_length, grid * grid),
                             cfg.prior_dim, cfg.prior_depth, cfg.prior_heads, pos_embed=positions)


def prior_positions(cfg, image_first):
    """The position ids (S - 1,) the prior reads at slots 0..S-2 in one order: role_ids(), or the slots."""
    n_img = (cfg.image_size // cfg.downsample) ** 2
    if cfg.prior_positions == "roles":
        return role_ids(cfg.context_length, n_img, image_first)
    return torch.arange(sequence_length(cfg.context_length, n_img) - 1)


# ----------------------------------------------------------------------------------------------
# The math as pure functions: the quantizer (vqvae.py's), the VQ-GAN losses, the joint vocabulary
# ----------------------------------------------------------------------------------------------

# Copied from vqvae.nearest_code
def nearest_code(z, codebook):
    """k* (n,) of each row of z (n, D) against the codebook (K, D); in fp32 (or wider) even under
    autocast, where bf16 distances would tie or swap near codes."""
    with torch.autocast(z.device.type, enabled=False):
        dtype = torch.promote_types(z.dtype, torch.float32)
        z, codebook = z.to(dtype), codebook.to(dtype)
        # Eq (Lec12 VQ): k* = argmin_j ||z_e - e_j||^2 = argmin_j (||e_j||^2 - 2 z_e . e_j); ||z_e||^2 is common to all j
        distances = codebook.pow(2).sum(1) - 2 * z @ codebook.t()  # (n, K)
        return distances.argmin(dim=1)


# Copied from vqvae.straight_through
def straight_through(z_e, z_q):
    """The value of z_q with the gradient of z_e: dL/dz_e := dL/dz_q (the argmin has none)."""
    return z_e + (z_q - z_e).detach()


# Copied from vqvae.vq_losses
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


# Copied from vqvae.codebook_stats
def codebook_stats(z, indices, num_codes):
    """This batch's n_k (K,), the vectors assigned to each code, and sum_{i: k_i = k} z_i (K, D)."""
    counts = torch.bincount(indices, minlength=num_codes).to(z.dtype)
    sums = torch.zeros(num_codes, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, indices, z)
    return counts, sums


# Copied from vqvae.laplace_smooth
def laplace_smooth(counts, eps):
    """N_k -> (N_k + eps) / (n + K eps) * n with n = sum_k N_k: no count is 0 and the total stays n."""
    n = counts.sum()
    return (counts + eps) / (n + len(counts) * eps) * n


# Copied from vqvae.ema_codebook_update
def ema_codebook_update(counts, embed_sum, batch_counts, batch_sums, decay, eps):
    """One EMA step of the codebook: returns (N (K,), m (K, D), e = m / smoothed N (K, D))."""
    # Eq (VQ-VAE App. A.1): N_k <- g N_k + (1 - g) n_k,  m_k <- g m_k + (1 - g) sum_{i: k_i = k} z_i
    counts = decay * counts + (1 - decay) * batch_counts
    embed_sum = decay * embed_sum + (1 - decay) * batch_sums
    # Eq (VQ-VAE App. A.1): e_k = m_k / N_k, with N_k Laplace-smoothed
    codebook = embed_sum / laplace_smooth(counts, eps)[:, None]
    return counts, embed_sum, codebook


# Copied from vqvae.kmeans
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


# Copied from vqvae.codebook_perplexity
def codebook_perplexity(counts):
    """exp(H(p)) of the code histogram p = counts / sum(counts): K for uniform use, 1 for one code."""
    p = counts.double() / counts.sum()
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()  # 0 log 0 = 0
    return float(entropy.exp())


def hinge_d_loss(logits_real, logits_fake):
    """The discriminator's hinge loss: real patches pushed above +1, fakes below -1."""
    # Eq (VQ-GAN, hinge D): L_D = 1/2 E[relu(1 - D(x))] + 1/2 E[relu(1 + D(x^))]
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake):
    """The generator's side of the hinge game: raise the discriminator's score of its reconstructions."""
    # Eq (VQ-GAN, hinge G): L_G = -E[D(x^)]
    return -logits_fake.mean()


def adaptive_weight(rec_loss, g_loss, last_layer, max_weight):
    """taming's lambda: the adversarial gradient rescaled to the reconstruction gradient's size where
    both enter the decoder's last layer; clamped to [0, max_weight] and detached (a weight, not a
    loss). Under DDP both gradients are averaged over the ranks first: the global batch's lambda."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rec_grad, g_grad = all_reduce_sum(rec_grad) / world, all_reduce_sum(g_grad) / world
    # Eq (VQ-GAN, adaptive weight): lambda = ||grad_W L_rec|| / (||grad_W L_G|| + 1e-4)
    lam = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return lam.clamp(0.0, max_weight).detach()


def adversarial_ramp(step, warmup):
    """r(t) = min(1, t / warmup): the generator's adversarial weight fades in while the discriminator,
    training from step 0, learns to tell the blurry early reconstructions apart."""
    return 1.0 if warmup == 0 else min(1.0, step / warmup)


def binomial_blur(x):
    """Separable [1, 4, 6, 4, 1] / 16 blur of each channel (reflect padding)."""
    C = x.shape[1]
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).repeat(C, 1, 1, 1), groups=C)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).repeat(C, 1, 1, 1), groups=C)


def laplacian_pyramid(x, levels):
    """[L_0, ..., L_{levels-2}, G_{levels-1}]: band-pass images L_j = G_j - up(G_{j+1}) with
    G_0 = x and G_{j+1} = down(blur(G_j)). Invertible (G_j = L_j + up(G_{j+1})), so two images
    have equal pyramids only if they are equal."""
    bands = []
    for _ in range(levels - 1):
        low = F.avg_pool2d(binomial_blur(x), 2)
        bands.append(x - F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False))
        x = low
    return bands + [x]


def laplacian_l1(x_hat, x, levels=3):
    """The Laplacian-pyramid L1 (GLO's Lap1) on the band-pass levels, the mean absolute difference of
    each band summed, so that the finest band (the edges) weighs as much as the coarse ones; the
    low-pass residual is compared by its mean squared difference instead, because an L1 there pulls
    every uncertain pixel to the median colour, the black background."""
    *bands_hat, low_hat = laplacian_pyramid(x_hat, levels)
    *bands, low = laplacian_pyramid(x, levels)
    # Eq (Bojanowski et al. 2018, Lap1): sum_j 2^{2j} |L_j(x^) - L_j(x)|_1 (sums) = sum_j mean |L_j(x^) - L_j(x)|
    return sum((a - b).abs().mean() for a, b in zip(bands_hat, bands)) + (low_hat - low).pow(2).mean()


def feature_distance(net, x_hat, x):
    """LPIPS's distance without learned weights: per layer of `net`, the mean squared difference of
    the channel-normalised activations, summed over layers."""
    total = 0.0
    for a, b in zip(net(x_hat), net(x)):
        # Eq (LPIPS, unit weights): d = sum_l mean_hw ||f_l(x^) / |f_l(x^)| - f_l(x) / |f_l(x)| ||^2
        total = total + (F.normalize(a, dim=1, eps=1e-6) - F.normalize(b, dim=1, eps=1e-6)).pow(2).sum(1).mean()
    return total


def perceptual_loss(x_hat, x, kind, net=None):
    """The perceptual term chosen by --perceptual (see the module docstring)."""
    if kind == "laplacian":
        return laplacian_l1(x_hat, x)
    if kind == "features":
        return feature_distance(net, x_hat, x)
    return x.new_zeros(())


@contextlib.contextmanager
def frozen(module):
    """Parameters of `module` treated as constants inside the block: gradients flow through it to its
    input, none accumulate on it (the generator's step through the discriminator)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def generator_objective(x, x_hat, terms, disc, last_layer, cfg, ramp, feature_net=None):
    """The tokenizer's loss (total, {parts}): L2 or L1 + w_p perceptual + r(t) w_adv lambda L_G + the VQ
    terms. The discriminator is frozen here: its parameters get no gradient from this loss."""
    rec = (x_hat - x).abs().mean() if cfg.rec_loss == "l1" else (x_hat - x).pow(2).mean()
    perceptual = perceptual_loss(x_hat, x, cfg.perceptual, feature_net) if cfg.perceptual_weight > 0 else x.new_zeros(())
    nll = rec + cfg.perceptual_weight * perceptual
    parts = {"rec": rec, "perceptual": perceptual, "codebook": terms["codebook"], "commitment": terms["commitment"]}
    loss = nll + terms["codebook"] + terms["commitment"]
    if disc is not None:
        with frozen(disc):
            g_loss = hinge_g_loss(disc(x_hat))
        lam = adaptive_weight(nll, g_loss, last_layer, cfg.max_lambda) if ramp > 0 else x.new_zeros(())
        # Eq (Lec12 VQ-GAN): L = L_rec + w_p L_perc + r(t) w_adv lambda L_G + L_VQ
        loss = loss + ramp * cfg.adv_weight * lam * g_loss
        parts.update(g_loss=g_loss, adaptive_weight=lam)
    return loss, parts


def discriminator_objective(disc, x, x_hat):
    """(L_D, logits on real, logits on fake) for one batch of real images and detached
    reconstructions, judged in one pass: no gradient reaches the tokenizer."""
    logits = disc(torch.cat([x, x_hat.detach()]))
    real, fake = logits.chunk(2)
    return hinge_d_loss(real, fake), real, fake


# The joint vocabulary: clip.py's byte ids, two image brackets, then the K image codes.
TEXT_VOCAB = 259  # 0..255 bytes, 256 PAD, 257 BOS, 258 EOS (ByteTokenizer.vocab_size)
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
BOI_ID, EOI_ID = 259, 260
IMAGE_OFFSET = 261
TEXT, IMAGE, FIXED = 0, 1, 2  # what the token at a slot is: a text id, an image code, or a set bracket


def vocab_size(num_codes):
    return IMAGE_OFFSET + num_codes


def code_ids(codes):
    """Image codes k (any shape) -> token ids IMAGE_OFFSET + k."""
    # Eq (Lec12 unify, step 1): add image tokens to the LM vocabulary
    return codes + IMAGE_OFFSET


def id_codes(ids):
    """Token ids of image codes -> the codes k (the inverse of code_ids)."""
    return ids - IMAGE_OFFSET


def sequence_length(text_len, num_image_tokens):
    return text_len + num_image_tokens + 2


def slot_kinds(text_len, num_image_tokens, image_first):
    """What each slot of a sequence holds, (S,) long of TEXT / IMAGE / FIXED. Text first:
    [BOS] text.. | BOI | codes.. | EOI; image first: BOI | codes.. | EOI | [BOS] text.."""
    text = torch.full((text_len,), TEXT)
    text[0] = FIXED  # BOS opens every caption region
    image = torch.cat([torch.tensor([FIXED]), torch.full((num_image_tokens,), IMAGE), torch.tensor([FIXED])])
    return torch.cat([image, text] if image_first else [text, image])


def role_ids(text_len, num_image_tokens, image_first):
    """Position ids (S - 1,) of slots 0..S-2: the role of the token each slot predicts (the one at
    slot s + 1): caption slot j -> j, BOI -> L, EOI -> L + 1, image code n -> L + 2 + n. Text first:
    [1..L-1] L [L+2..L+N+1] L+1; image first: [L+2..L+N+1] L+1 0 [1..L-1]."""
    text = torch.arange(text_len)  # caption slot j (BOS is j = 0)
    codes = torch.arange(num_image_tokens) + text_len + 2
    boi, eoi = torch.tensor([text_len]), torch.tensor([text_len + 1])
    return torch.cat([codes, eoi, text] if image_first else [text[1:], boi, codes, eoi])


def allowed_ids(text_len, num_image_tokens, num_codes, image_first):
    """The per-slot logit mask (S, V) bool: allowed[s, v] = the token at slot s may be id v. Text
    slots emit bytes, PAD or EOS, image slots the K codes, a bracket slot only its own id."""
    kinds = slot_kinds(text_len, num_image_tokens, image_first)
    allowed = torch.zeros(len(kinds), vocab_size(num_codes), dtype=torch.bool)
    allowed[kinds == TEXT, :TEXT_VOCAB] = True
    allowed[kinds == TEXT, BOS_ID] = False
    allowed[kinds == IMAGE, IMAGE_OFFSET:] = True
    boi = num_image_tokens + 1 if image_first else text_len  # the EOI's slot, or the BOI's
    brackets = {0: BOI_ID, boi: EOI_ID, boi + 1: BOS_ID} if image_first else {0: BOS_ID, boi: BOI_ID, boi + num_image_tokens + 1: EOI_ID}
    for slot, token in brackets.items():
        allowed[slot, token] = True
    return allowed


def build_sequences(text_ids, image_ids, image_first):
    """(B, S) token sequences from caption regions (B, L), image token ids (B, N) and the order (B,) bool."""
    B = len(text_ids)
    boi = torch.full((B, 1), BOI_ID, dtype=torch.long, device=text_ids.device)
    eoi = torch.full_like(boi, EOI_ID)
    text_first = torch.cat([text_ids, boi, image_ids, eoi], dim=1)  # (B, S)
    # Eq (Lec12 unify, step 2): mixed text+image token streams, in both orders
    image_first_seq = torch.cat([boi, image_ids, eoi, text_ids], dim=1)  # (B, S)
    return torch.where(image_first[:, None], image_first_seq, text_first)


def prior_loss(logits, targets, allowed, kinds, text_weight, counts=None):
    """DALL-E's weighted cross-entropy (total, text term, image term) under the logit mask.

    logits (B, S-1, V) at slots 0..S-2, targets (B, S-1) the tokens at slots 1..S-1, allowed
    (B, S-1, V) and kinds (B, S-1) of the targets' slots. The text term averages over caption tokens
    up to EOS (PAD after it is implied), the image term over codes; brackets, whose masked logits
    leave one choice, cost nothing. counts: the (text, image) token counts to divide by (default
    this batch's); DDP ranks pass the global batch's counts / world size so that the average over
    ranks is the global mean."""
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, S-1)
    text = (kinds == TEXT) & (targets != PAD_ID)
    image = kinds == IMAGE
    n_text, n_image = counts if counts is not None else (text.sum(), image.sum())
    text_loss = (nll * text).sum() / torch.as_tensor(n_text).clamp_min(1)
    image_loss = (nll * image).sum() / torch.as_tensor(n_image).clamp_min(1)
    # Eq (DALL-E loss weights): L = 1/8 L_text + 7/8 L_image
    return text_weight * text_loss + (1 - text_weight) * image_loss, text_loss, image_loss


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def validate_config(cfg, data):
    """Every check that can fail before any work is done (DESIGN.md section 6)."""
    f = cfg.downsample
    if f & (f - 1):
        raise InputError(f"--downsample {f}: expected a power of 2 (e.g. 4 or 8)")
    if cfg.image_size % f:
        raise InputError(f"--image_size {cfg.image_size} is not divisible by --downsample {f}; "
                         f"pick an image size that is a multiple of {f} or a smaller --downsample")
    if cfg.image_size < 3 * 2 ** cfg.disc_layers:
        raise InputError(f"--disc_layers {cfg.disc_layers}: the PatchGAN leaves no patch of a {cfg.image_size} px "
                         f"image; use at most {max(int(math.log2(cfg.image_size / 3)), 1)} layers")
    if cfg.rec_loss not in ("l1", "l2"):
        raise InputError(f"--rec_loss {cfg.rec_loss}: expected l1 or l2")
    if cfg.perceptual not in ("laplacian", "features", "none"):
        raise InputError(f"--perceptual {cfg.perceptual}: expected laplacian, features or none")
    if cfg.prior_positions not in ("roles", "slots"):
        raise InputError(f"--prior_positions {cfg.prior_positions}: expected roles or slots")
    if cfg.prior_dim % cfg.prior_heads:
        raise InputError(f"--prior_dim {cfg.prior_dim} is not divisible by --prior_heads {cfg.prior_heads}")
    if cfg.top_k > cfg.num_codes:
        raise InputError(f"--top_k {cfg.top_k} is larger than the codebook (--num_codes {cfg.num_codes})")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.prior_batch_size % world_size:
        raise InputError(f"--prior_batch_size {cfg.prior_batch_size} is global and must divide evenly over {world_size} processes")
    if data is not None:
        n = len(data["train"]["images"])
        for flag, value in (("batch_size", cfg.batch_size), ("prior_batch_size", cfg.prior_batch_size if cfg.prior_steps else 0)):
            if value > n:
                raise InputError(f"--{flag} {value} is larger than the {n} training images; lower it or add data")
        if cfg.prior_steps and "captions" not in data["train"]:
            raise InputError(f"--data {cfg.data}: the text-image prior needs a 'captions' array "
                             f"(or train the tokenizer alone with --prior_steps 0)")
        if cfg.prior_steps:
            longest = max(len(c.encode("utf-8")) for s in ("train", "test") for c in data[s]["captions"])
            if longest + 2 > cfg.context_length:
                raise InputError(f"--context_length {cfg.context_length}: a caption of {longest} bytes needs "
                                 f"{longest + 2} slots with BOS and EOS; pass --context_length {longest + 2}")


def train(cfg):
    """Train the tokenizer against its discriminator (max_steps), then the prior over text and image
    tokens (prior_steps); or with --eval_only evaluate a checkpoint. Returns the final metrics."""
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
        channels = data["channels"]
        other = load_vqvae_tokenizer(cfg, channels).to(rt.device) if cfg.compare else None
        model = build_model(cfg, channels).to(rt.device)
        disc = build_discriminator(cfg, channels).to(rt.device) if cfg.adv_weight > 0 else None
        prior = build_prior(cfg).to(rt.device) if cfg.prior_steps else None
        if cfg.eval_only:
            if ckpt is None:
                raise InputError("--eval_only 1 needs --resume path/to/ckpt.pt")
            model.load_state_dict(ckpt["model"])
            if prior is not None:
                prior.load_state_dict(ckpt["prior"])
            metrics = evaluate(model, prior, data, cfg, rt, other=other) if rt.master else {}
            if rt.master:
                print(format_metrics(metrics), flush=True)
            return finish_run(cfg, rt, metrics, t_start)
        # built before a resumed run restores its RNG state: its convs' default initialisation draws
        # from the global stream (then overwritten), at the same point of it in every run
        feature_net = RandomFeatures(channels).to(rt.device) if cfg.perceptual == "features" else None
        betas = (0.5, 0.9)  # taming's, for both players of the game
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, rt, betas)
        disc_optimizer = make_optimizer(disc, cfg.lr, cfg.weight_decay, rt, betas) if disc is not None else None
        prior_optimizer = make_optimizer(prior, cfg.prior_lr, cfg.weight_decay, rt, (0.9, 0.95)) if prior is not None else None
        start = 0
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if disc is not None:
                disc.load_state_dict(ckpt["discriminator"])
                disc_optimizer.load_state_dict(ckpt["disc_optimizer"])
            if prior is not None:
                prior.load_state_dict(ckpt["prior"])
                prior_optimizer.load_state_dict(ckpt["prior_optimizer"])
            start = ckpt["step"]
            set_rng_state(ckpt["rng"])
        if rt.compile:  # adaptive_weight() runs the compiled generator's backward three times (two
            # autograd.grad with retain_graph, then backward), which donated buffers forbid
            torch._functorch.config.donated_buffer = False
        run_model = prepare_model(model, rt)
        run_disc = prepare_model(disc, rt) if disc is not None else None
        run_prior = prepare_model(prior, rt) if prior is not None else None
        logger = Logger(cfg.out_dir, cfg, rt, append=ckpt is not None)
        n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6 if m is not None else 0.0  # noqa: E731
        logger.print(f"vqgan: tokenizer {n_params(model):.2f}M parameters, discriminator {n_params(disc):.2f}M, "
                     f"prior {n_params(prior):.2f}M, {len(data['train']['images'])} training images, device {rt.device}, "
                     f"{'bf16' if rt.amp_dtype else 'fp32'}{', compiled' if rt.compile else ''}, world size {rt.world_size}")
        train_images = torch.as_tensor(data["train"]["images"])
        n_img = (cfg.image_size // cfg.downsample) ** 2
        if prior is not None:
            train_text = caption_region(data["train"]["captions"], cfg.context_length)  # (N, L)
            empty = caption_region([""], cfg.context_length)[0]
            layouts = [(allowed_ids(cfg.context_length, n_img, cfg.num_codes, o)[1:].to(rt.device),
                        slot_kinds(cfg.context_length, n_img, o)[1:].to(rt.device),
                        prior_positions(cfg, o).to(rt.device)) for o in (False, True)]
        per_rank = lambda b: slice(rt.rank * b // rt.world_size, (rt.rank + 1) * b // rt.world_size)  # noqa: E731
        total = cfg.max_steps + cfg.prior_steps
        end = min(cfg.stop_step, total) if cfg.stop_step else total
        progress, t_prior, prior_time = None, None, 0.0
        for step in range(start, end):
            tokenizer_phase = step < cfg.max_steps
            if progress is None or step == cfg.max_steps:  # a phase's throughput counts its own batch
                phase_cfg = cfg if tokenizer_phase else dataclasses.replace(cfg, batch_size=cfg.prior_batch_size)
                progress = Progress(phase_cfg, rt, logger, step, end, total, unit="img" if tokenizer_phase else "seq")
                logger.print("training the " + ("tokenizer against the discriminator" if tokenizer_phase
                                                else "prior over text and image tokens"))
            g = torch.Generator(rt.device).manual_seed(cfg.seed * 1_000_003 + step)
            if tokenizer_phase:
                lr = cosine_lr(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
                idx = batch_indices(step, len(train_images), cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
                x = images_to_tensor(train_images[idx]).to(rt.device, non_blocking=True)
                with rt.autocast():
                    x_hat, terms = run_model(x, generator=g)
                    loss, extra = generator_objective(x, x_hat.float(), terms, disc, model.decoder.conv_out.weight, cfg,
                                                      adversarial_ramp(step, cfg.adv_warmup), feature_net)
                for opt in (optimizer, disc_optimizer):
                    for group in (opt.param_groups if opt is not None else []):
                        group["lr"] = lr
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if disc is not None:  # the discriminator's step on the same reconstructions, detached
                    with rt.autocast():
                        d_loss, real, fake = discriminator_objective(run_disc, x, x_hat.float())
                    d_loss.backward()
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
                    disc_optimizer.step()
                    disc_optimizer.zero_grad(set_to_none=True)
                    extra.update(d_loss=d_loss, logits_real=real.mean(), logits_fake=fake.mean())
            else:
                if t_prior is None:  # the tokenizer is frozen from here on: tokenize the training set once
                    model.eval().requires_grad_(False)
                    with progress.paused():  # kept out of ms/step and the ETA
                        train_codes = code_ids(encode_codes(model, data["train"]["images"], rt))  # (N, h*w) ids
                    t_prior = time.time()
                phase_step = step - cfg.max_steps
                lr = cosine_lr(phase_step, cfg.prior_steps, cfg.prior_lr, cfg.min_lr, cfg.warmup_steps)
                for group in prior_optimizer.param_groups:
                    group["lr"] = lr
                B = cfg.prior_batch_size
                idx = batch_indices(phase_step, len(train_images), B, cfg.seed + 1)  # the global batch
                # the order and the caption dropout drawn for the global batch: DDP sees the single-process draw
                image_first = torch.rand(B, generator=g, device=rt.device) < cfg.p_image_first
                drop = (torch.rand(B, generator=g, device=rt.device) < cfg.p_uncond) & ~image_first
                text = torch.where(drop[:, None], empty.to(rt.device), train_text[idx].to(rt.device))  # (B, L)
                # the global batch's text targets (caption bytes and EOS) and image targets, per rank
                counts = ((text[:, 1:] != PAD_ID).sum() / rt.world_size, torch.tensor(B * n_img / rt.world_size))
                share = per_rank(B)
                kinds = torch.where(image_first[share, None], layouts[1][1], layouts[0][1])  # (b, S-1)
                positions = torch.where(image_first[share, None], layouts[1][2], layouts[0][2])  # (b, S-1)
                seq = build_sequences(text[share], train_codes[idx[share]].to(rt.device), image_first[share])  # (b, S)
                allowed = torch.where(image_first[share, None, None], layouts[1][0], layouts[0][0])  # (b, S-1, V)
                with rt.autocast():
                    loss, text_loss, image_loss = prior_loss(run_prior(seq[:, :-1], positions), seq[:, 1:], allowed,
                                                             kinds, cfg.text_loss_weight, counts)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.grad_clip)
                prior_optimizer.step()
                prior_optimizer.zero_grad(set_to_none=True)
                extra = {"text_loss": text_loss, "image_loss": image_loss}
            done = step + 1
            ckpt_now = progress.step(done, loss, lr, **extra)
            if not tokenizer_phase:
                prior_time = time.time() - t_prior
            if cfg.eval_every and done % cfg.eval_every == 0 and done != end and rt.master and tokenizer_phase:
                with progress.paused():
                    quick, _ = tokenizer_metrics(model, data, cfg, rt)
                logger.print(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in quick.items()))
                logger.log({"step": done, **quick})
            if ckpt_now and rt.master:
                state = {"model_name": MODEL_NAME, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": done, "config": asdict(cfg), "rng": rng_state(), "data_position": done}
                if disc is not None:
                    state.update(discriminator=disc.state_dict(), disc_optimizer=disc_optimizer.state_dict())
                if prior is not None:
                    state.update(prior=prior.state_dict(), prior_optimizer=prior_optimizer.state_dict())
                save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), state)
        metrics = {}
        if rt.master:
            t_eval = time.time()
            trained_prior = prior if end > cfg.max_steps else None  # a run stopped after the tokenizer skips it
            metrics = evaluate(model, trained_prior, data, cfg, rt, other=other)
            metrics.update(steps=end, final_loss=progress.loss if progress else None)
            logger.print(format_metrics(metrics))
            timing = {"eval_s": time.time() - t_eval}
            if prior_time:
                timing["prior_ms_per_step"] = 1000 * prior_time / (end - max(start, cfg.max_steps))
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


# ----------------------------------------------------------------------------------------------
# Evaluation (called by train() at the end): reconstructions and sharpness, text-to-image,
# captioning, the comparison with vqvae.py, pictures
# ----------------------------------------------------------------------------------------------

def gradient_energy(images):
    """Sum of squared horizontal and vertical finite differences of uint8 images, per image (N,)."""
    x = images.astype(np.float64) / 255
    return (np.diff(x, axis=1) ** 2).sum(axis=(1, 2, 3)) + (np.diff(x, axis=2) ** 2).sum(axis=(1, 2, 3))


def high_frequency_energy(images, cutoff=0.25):
    """Spectral energy above `cutoff` cycles per pixel (the upper half of the band), per image (N,)."""
    x = images.astype(np.float64) / 255
    power = np.abs(np.fft.fft2(x - x.mean(axis=(1, 2), keepdims=True), axes=(1, 2))) ** 2  # (N, H, W, C)
    fy, fx = np.fft.fftfreq(x.shape[1]), np.fft.fftfreq(x.shape[2])
    high = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) > cutoff  # (H, W)
    return (power * high[None, :, :, None]).sum(axis=(1, 2, 3))


def reconstruction_metrics(recon, images, attributes=None):
    """L1 (pixels in [0, 1]), PSNR, sharpness as ratios to the originals' gradient and
    high-frequency energy (1 is ideal, blur < 1), and the detector's accuracy on the reconstructions."""
    diff = recon.astype(np.float64) - images
    mse = float((diff ** 2).mean())
    out = {"l1": float(np.abs(diff).mean() / 255), "psnr_db": 10 * math.log10(255 ** 2 / max(mse, 1e-10)),
           "gradient_energy_ratio": float(gradient_energy(recon).sum() / gradient_energy(images).sum()),
           "high_freq_energy_ratio": float(high_frequency_energy(recon).sum() / high_frequency_energy(images).sum())}
    if attributes is not None:
        out["detector_accuracy"] = float((detect_attributes(recon) == attributes).all(axis=1).mean())
    return out


# Copied from vqvae.encode_codes
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
def reconstruct(model, images, rt, batch_size=250):
    """Reconstructions uint8 (N, H, W, C) and codes (N, h, w) of uint8 images, in eval mode."""
    was_training = model.training
    model.eval()
    recon, codes = [], []
    for lo in range(0, len(images), batch_size):
        x = images_to_tensor(images[lo:lo + batch_size]).to(rt.device)
        with rt.autocast():
            indices = model.encode(x)
            recon.append(tensor_to_images(model.decode_indices(indices)))
        codes.append(indices.cpu())
    model.train(was_training)
    return np.concatenate(recon), torch.cat(codes)


def load_vqvae_tokenizer(cfg, in_channels):
    """vqvae.py's trained tokenizer (--compare), rebuilt from its checkpoint's config with the copied
    blocks; it must have this run's image size, f and K, and every key must load (else one InputError)."""
    path = cfg.compare
    if not os.path.isfile(path):
        raise InputError(f"--compare {path}: no such file; pass a checkpoint written by vqvae.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"--compare {path}: cannot read the checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("model_name") != "vqvae" or ckpt.get("config", {}).get("bottleneck") != "vq":
        raise InputError(f"--compare {path}: not a checkpoint of vqvae.py's vector-quantized tokenizer")
    c = ckpt["config"]
    keys = ("image_size", "downsample", "num_codes")
    if any(c.get(k) != getattr(cfg, k) for k in keys):
        raise InputError(f"--compare {path}: trained with " + ", ".join(f"{k} {c.get(k)}" for k in keys)
                         + "; pass the same --image_size, --downsample and --num_codes for a comparison at equal tokens")
    try:
        vq_cfg = Config(**{k: c[k] for k in keys + ("channels", "max_mult", "num_res_blocks", "latent_dim", "ema",
                                                     "l2_normalize")})
        model = build_model(vq_cfg, in_channels)
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as e:
        raise InputError(f"--compare {path}: the checkpoint does not fit vqvae.py's tokenizer ({str(e)[:200]})") from None
    return model.eval()


def tokenizer_metrics(model, data, cfg, rt):
    """Reconstruction metrics on the test split, codebook use; and the reconstructions."""
    test = data["test"]
    recon, codes = reconstruct(model, test["images"], rt)
    metrics = reconstruction_metrics(recon, test["images"], test["attributes"] if cfg.data == "shapes" else None)
    counts = torch.bincount(codes.flatten(), minlength=cfg.num_codes)
    metrics.update(codebook_usage=float((counts > 0).float().mean()), codebook_perplexity=codebook_perplexity(counts),
                   tokens_per_image=int(codes[0].numel()))
    return metrics, recon


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


def caption_region(captions, context_length):
    """Captions -> the caption region (B, L) of ids: [BOS] bytes [EOS] [PAD]..."""
    return ByteTokenizer().encode(list(captions), context_length)[0]


@torch.no_grad()
def text_to_image(prior, model, captions, cfg, rt, generator, batch_size=256):
    """uint8 images (N, H, W, C) and the generated sequences' new tokens (N, N_img + 1) for captions:
    prompt [caption] [BOI], guided against the empty caption, the image slots' logits masked to the
    codes, then the decoder."""
    grid = cfg.image_size // cfg.downsample
    n_img = grid * grid
    allowed = allowed_ids(cfg.context_length, n_img, cfg.num_codes, False).to(rt.device)
    positions = prior_positions(cfg, False)[None].to(rt.device)  # (1, S - 1)
    images, tokens = [], []
    for lo in range(0, len(captions), batch_size):
        text = caption_region(captions[lo:lo + batch_size], cfg.context_length).to(rt.device)
        boi = torch.full((len(text), 1), BOI_ID, dtype=torch.long, device=rt.device)
        prompt = torch.cat([text, boi], dim=1)  # (B, L + 1)
        null = torch.cat([caption_region([""] * len(text), cfg.context_length).to(rt.device), boi], dim=1)
        with rt.autocast():
            new = generate(prior, prompt, n_img + 1, cfg.temperature, cfg.top_k, 1.0, cfg.cfg_w, null,
                           allowed=allowed, positions=positions, generator=generator)
            # Eq (Lec12 unify, step 3): decode image tokens back to pixels with the de-tokenizer
            x = model.decode_indices(id_codes(new[:, :n_img]).reshape(-1, grid, grid))
        images.append(tensor_to_images(x))
        tokens.append(new.cpu())
    return np.concatenate(images), torch.cat(tokens)


@torch.no_grad()
def caption_images(prior, model, images, cfg, rt, batch_size=256):
    """Greedy captions (list of str) of uint8 images: prompt [BOI] [codes] [EOI] [BOS], text slots'
    logits masked to bytes / EOS, stop at EOS."""
    n_img = (cfg.image_size // cfg.downsample) ** 2
    allowed = allowed_ids(cfg.context_length, n_img, cfg.num_codes, True).to(rt.device)
    positions = prior_positions(cfg, True)[None].to(rt.device)  # (1, S - 1)
    tokenizer, out = ByteTokenizer(), []
    for lo in range(0, len(images), batch_size):
        x = images_to_tensor(images[lo:lo + batch_size]).to(rt.device)
        with rt.autocast():
            codes = code_ids(model.encode(x).flatten(1))  # (B, N)
        ones = torch.ones(len(x), 1, dtype=torch.long, device=rt.device)
        prompt = torch.cat([ones * BOI_ID, codes, ones * EOI_ID, ones * BOS_ID], dim=1)  # (B, N + 3)
        with rt.autocast():
            new = generate(prior, prompt, cfg.context_length - 1, temperature=0.0, allowed=allowed, eos_id=EOS_ID,
                           positions=positions)
        out += [tokenizer.decode(row) for row in new.cpu()]
    return out


def parse_caption(text):
    """The attributes a caption names, (4,) [shape, color, size, position], -1 where it names none;
    and whether it is one the shapes world writes (shapes_caption of those attributes)."""
    named = [-1, -1, -1, -1]
    words = text.split()
    for i, vocab in enumerate((SHAPES, COLOR_NAMES, SIZES)):
        found = [vocab.index(w) for w in words if w in vocab]
        named[i] = found[0] if len(found) == 1 else -1
    place = re.search(r"(?:at|in|on) the ((?:top|bottom) (?:left|right)|top|bottom|left|right|center)$", text)
    if place:
        named[3] = POSITIONS.index(place.group(1))
    mask = tuple(a >= 0 for a in named)
    well_formed = any(mask) and any(shapes_caption([max(a, 0) for a in named], p, mask) == text for p in range(3))
    return np.array(named), well_formed


def requested_found(detected, requested):
    """(N,) bool: the detector found every attribute a prompt names (-1 = not named)."""
    return ((detected == requested) | (requested < 0)).all(axis=1)


def pair_prompts(pairs, n, seed):
    """For each (shape, color) pair, n short prompts "a {color} {shape}" and n full ones
    "a {size} {color} {shape} at the {position}" (size and position drawn from a fixed generator):
    (captions, requested attributes (M, 4), kind (M,) 'short' / 'full')."""
    captions, requested, kinds = [], [], []
    rng = np.random.default_rng([seed, 10])
    for shape, color in pairs:
        for kind in ("short", "full"):
            for _ in range(n):
                attrs = np.array([shape, color, rng.integers(len(SIZES)), rng.integers(len(POSITIONS))])
                named = (True, True, kind == "full", kind == "full")
                captions.append(shapes_caption(attrs, 0, named))
                requested.append(np.where(named, attrs, -1))
                kinds.append(kind)
    return captions, np.array(requested), np.array(kinds)


def caption_tiles(images, captions, right, scale=3):
    """Images with their generated caption below (green: every named attribute right, red: not)."""
    h, w = images.shape[1] * scale, images.shape[2] * scale
    width = max(w, 4 * max(len(c) for c in captions) + 4)
    tiles = []
    for img, text, ok in zip(images, captions, right):
        tile = np.zeros((h + 8, width, 3), dtype=np.uint8)
        big = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
        tile[:h, :w] = big if big.shape[2] == 3 else np.repeat(big, 3, axis=2)
        draw_text(tile, text, 0, h + 2, (80, 255, 80) if ok else (255, 80, 80))
        tiles.append(tile)
    return image_grid(np.stack(tiles), 4)


GRID_PROMPTS = ("a red circle", "a large blue square at the top left", "there is a small yellow triangle",
                "a white shape at the bottom right", "something cyan on the left", "a large green square",
                "a green circle", "a magenta square")  # the last two are heldout pairs


def evaluate_prior(prior, model, data, cfg, rt, write_files=True):
    """Text-to-image alignment (seen and heldout pairs, short and full prompts, the test captions) and
    captioning accuracy (test and heldout images); the two pictures."""
    metrics, shapes = {}, cfg.data == "shapes"
    g = torch.Generator(rt.device).manual_seed(cfg.seed + 1)
    if shapes:
        seen = sorted({(s, c) for s, c in data["train"]["attributes"][:, :2].tolist()})
        heldout = sorted({(s, c) for s, c in data["heldout"]["attributes"][:, :2].tolist()})
        for name, pairs in (("seen", seen), ("heldout", heldout)):
            captions, requested, kinds = pair_prompts(pairs, cfg.eval_per_pair, cfg.seed)
            images, _ = text_to_image(prior, model, captions, cfg, rt, g)
            found = requested_found(detect_attributes(images), requested)
            for kind in ("short", "full"):
                metrics[f"t2i_{name}_{kind}"] = float(found[kinds == kind].mean())
            metrics[f"t2i_{name}"] = float(found.mean())
        n = min(len(data["test"]["captions"]), len(seen) * cfg.eval_per_pair)
        images, _ = text_to_image(prior, model, data["test"]["captions"][:n], cfg, rt, g)
        metrics["t2i_test_captions"] = float(requested_found(detect_attributes(images),
                                                             data["test"]["caption_attributes"][:n]).mean())
    for split in ("test", "heldout") if shapes else ("test",):
        n = min(cfg.caption_images, len(data[split]["images"]))
        if n == 0 or not shapes:
            continue
        captions = caption_images(prior, model, data[split]["images"][:n], cfg, rt)
        parsed = [parse_caption(c) for c in captions]
        named = np.stack([p[0] for p in parsed])
        truth = data[split]["attributes"][:n]
        right = (named == truth) & (named >= 0)
        metrics[f"caption_{split}_attribute_accuracy"] = float(right.sum() / max((named >= 0).sum(), 1))
        metrics[f"caption_{split}_all_named_right"] = float(((right | (named < 0)).all(axis=1) & (named >= 0).any(axis=1)).mean())
        metrics[f"caption_{split}_named_per_caption"] = float((named >= 0).sum(axis=1).mean())
        metrics[f"caption_{split}_well_formed"] = float(np.mean([p[1] for p in parsed]))
        if split == "test":
            examples = captions
    if write_files:
        prompts = list(GRID_PROMPTS) if shapes else list(data["test"]["captions"][:8])
        images, _ = text_to_image(prior, model, [p for p in prompts for _ in range(8)], cfg, rt, g)
        save_png(os.path.join(cfg.out_dir, "text_to_image.png"),
                 labelled_rows(images.reshape(len(prompts), 8, *images.shape[1:]), prompts, scale=3))
        if shapes and cfg.caption_images:
            k = min(16, len(examples))
            named = np.stack([parse_caption(c)[0] for c in examples[:k]])
            right = requested_found(named, np.where(named >= 0, data["test"]["attributes"][:k], -1)) & (named >= 0).any(1)
            save_png(os.path.join(cfg.out_dir, "captions.png"), caption_tiles(data["test"]["images"][:k], examples[:k], right))
    return metrics


def compare_tokenizers(model, other, data, cfg, rt, write_files=True):
    """The lecture's claim measured: vqvae.py's tokenizer (`other`, from --compare) and this one on
    the same test images, at the same f, K and token count; the side-by-side picture."""
    test = data["test"]
    attrs = test["attributes"] if cfg.data == "shapes" else None
    other_recon, _ = reconstruct(other.to(rt.device), test["images"], rt)
    recon, _ = reconstruct(model, test["images"], rt)
    out = {"vqvae": reconstruction_metrics(other_recon, test["images"], attrs),
           "vqgan": reconstruction_metrics(recon, test["images"], attrs)}
    if write_files:
        show = np.arange(min(12, len(test["images"])))
        save_png(os.path.join(cfg.out_dir, "compare.png"),
                 labelled_rows([test["images"][show], other_recon[show], recon[show]], ["test", "vqvae", "vqgan"], scale=3))
    return out


def evaluate(model, prior, data, cfg, rt, write_files=True, other=None):
    """The tokenizer's metrics (and the comparison with vqvae.py's tokenizer `other`), then the prior's."""
    model.eval()
    metrics, recon = tokenizer_metrics(model, data, cfg, rt)
    metrics = {f"recon_{k}" if k in ("l1", "psnr_db", "detector_accuracy") else k: v for k, v in metrics.items()}
    if write_files:
        test = data["test"]["images"]
        halves = np.array_split(np.arange(min(24, len(test))), 2)
        save_png(os.path.join(cfg.out_dir, "reconstructions.png"),
                 labelled_rows([a for h in halves for a in (test[h], recon[h])], ["test", "vqgan"] * 2))
    if other is not None:
        metrics["comparison"] = compare_tokenizers(model, other, data, cfg, rt, write_files)
    if prior is not None:
        metrics.update(evaluate_prior(prior, model, data, cfg, rt, write_files))
    return metrics


def format_metrics(metrics):
    """The results as lines of text, for the end of the run."""
    lines = [", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                       if not isinstance(v, dict))]
    if "comparison" in metrics:
        keys = list(metrics["comparison"]["vqgan"])
        lines += ["| tokenizer | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |" for name, row in metrics["comparison"].items()]
    return "\n".join(lines)


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
