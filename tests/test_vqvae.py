"""Specification of vqvae.py: contracts, the quantizer's and the VAE's math, learning, runtime."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import vqvae

SEEDS = st.integers(0, 2 ** 31 - 1)


def tiny_args(out_dir, *extra):
    return ["--preset", "tiny", "--out_dir", str(out_dir), *map(str, extra)]


def tiny_autoencoder(bottleneck="vq", **quantizer):
    cfg = vqvae.Config(**{**vqvae.PRESETS["tiny"], "bottleneck": bottleneck, **quantizer})
    return cfg, vqvae.build_model(cfg)


# ---------------------------------------------------------------------------------------------
# Shape and dtype contracts


@pytest.mark.parametrize("mults,size", [((1, 2, 2), 32), ((1, 2, 2, 2), 32), ((1, 2), 8)])
def test_encoder_downsamples_by_f_and_decoder_mirrors_it(mults, size):
    f = 2 ** (len(mults) - 1)
    encoder = vqvae.Encoder(3, 8, mults, 1, 5)
    decoder = vqvae.Decoder(3, 8, mults, 1, 5)
    z = encoder(torch.randn(2, 3, size, size))
    assert z.shape == (2, 5, size // f, size // f)
    out = decoder(z)
    assert out.shape == (2, 3, size, size) and out.dtype == torch.float32
    assert isinstance(decoder.conv_out, torch.nn.Conv2d) and decoder.conv_out.out_channels == 3


@given(st.integers(0, 10_000), st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 2]))
def test_edge_conv_equals_a_conv_with_replicate_padding(seed, h, w, stride):
    g = torch.Generator().manual_seed(seed)
    edge = vqvae.EdgeConv2d(3, 4, stride=stride)
    reference = torch.nn.Conv2d(3, 4, 3, stride=stride, padding=1, padding_mode="replicate")
    reference.load_state_dict(edge.state_dict())
    x = torch.randn(2, 3, h, w, generator=g)
    torch.testing.assert_close(edge(x), reference(x), rtol=1e-5, atol=1e-6)


def test_vq_autoencoder_returns_reconstruction_codes_and_loss_terms():
    cfg, model = tiny_autoencoder()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out, terms = model(x)
    grid = 16 // cfg.downsample
    assert out.shape == x.shape
    assert terms["indices"].shape == (3, grid, grid) and terms["indices"].dtype == torch.long
    assert 0 <= terms["indices"].min() and terms["indices"].max() < cfg.num_codes
    assert terms["codebook"].dim() == 0 and terms["commitment"].dim() == 0
    model.eval()
    assert torch.equal(model.encode(x), model(x)[1]["indices"])
    assert model.decode_indices(model.encode(x)).shape == x.shape


def test_gaussian_autoencoder_emits_posterior_and_likelihood_parameters():
    cfg, model = tiny_autoencoder("gaussian")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out, terms = model(x, torch.zeros(2, cfg.latent_dim, 4, 4))
    assert out.shape == (2, 6, 16, 16)  # mean and log-scale of p(x|z) per subpixel
    assert terms["mean"].shape == terms["logvar"].shape == (2, cfg.latent_dim, 4, 4)
    # with zero noise the sample is the mean, which is what encode() returns
    assert torch.equal(model.encode(x), terms["mean"])


# ---------------------------------------------------------------------------------------------
# The quantizer's math


@given(seed=SEEDS, n=st.integers(1, 40), K=st.integers(1, 30), D=st.integers(1, 6))
def test_nearest_code_equals_brute_force_search(seed, n, K, D):
    g = torch.Generator().manual_seed(seed)
    z, codebook = torch.randn(n, D, generator=g), torch.randn(K, D, generator=g)
    brute = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # (n, K)
    chosen = vqvae.nearest_code(z, codebook)
    # the chosen code is at the minimum distance (up to rounding where two codes tie)
    torch.testing.assert_close(brute.gather(1, chosen[:, None])[:, 0], brute.min(1).values, rtol=1e-5, atol=1e-5)
    exact = vqvae.nearest_code(z.double(), codebook.double())
    assert torch.equal(exact, ((z.double()[:, None] - codebook.double()[None]) ** 2).sum(-1).argmin(1))


def test_nearest_code_searches_in_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(2000, 16, generator=g), torch.randn(1024, 16, generator=g)
    reference = ((z[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chosen = vqvae.nearest_code(z, codebook)
        bf16 = (codebook.pow(2).sum(1) - 2 * z @ codebook.t()).argmin(1)
    assert not torch.equal(bf16, reference), "bf16 distances must swap some near codes, or the test proves nothing"
    assert torch.equal(chosen, reference)


@given(seed=SEEDS, ema=st.booleans())
def test_straight_through_forward_is_z_q_and_gradient_is_the_upstream_gradient(seed, ema):
    g = torch.Generator().manual_seed(seed)
    quantizer = vqvae.VectorQuantizer(6, 3, ema=ema).eval()
    quantizer.codebook.data.copy_(torch.randn(6, 3, generator=g))
    z_e = torch.randn(2, 3, 2, 2, generator=g, requires_grad=True)
    upstream = torch.randn(2, 3, 2, 2, generator=g)
    z_q, indices, _ = quantizer(z_e)
    # z_e + (z_q - z_e) is z_q up to one rounding
    torch.testing.assert_close(z_q, quantizer.codebook[indices].permute(0, 3, 1, 2), rtol=1e-6, atol=1e-6)
    (z_q * upstream).sum().backward()
    # dL/dz_e = dL/dz_q: the argmin is skipped in the backward pass
    assert torch.equal(z_e.grad, upstream)


def vq_term_grads(beta, seed, term):
    g = torch.Generator().manual_seed(seed)
    z_e = torch.randn(5, 4, generator=g, requires_grad=True)
    e = torch.randn(5, 4, generator=g, requires_grad=True)  # the codes chosen for each z_e
    codebook, commitment = vqvae.vq_losses(z_e, e, beta)
    loss = {"codebook": codebook, "commitment": commitment, "both": codebook + commitment}[term]
    loss.backward()
    zero = torch.zeros(5, 4)
    return (z_e.grad if z_e.grad is not None else zero), (e.grad if e.grad is not None else zero), z_e, e


@given(seed=SEEDS, beta=st.floats(0.01, 4.0))
def test_codebook_term_moves_only_the_codebook(seed, beta):
    grad_z, grad_e, z_e, e = vq_term_grads(beta, seed, "codebook")
    assert torch.equal(grad_z, torch.zeros_like(grad_z))
    torch.testing.assert_close(grad_e, 2 * (e - z_e).detach() / e.numel())


@given(seed=SEEDS, beta=st.floats(0.01, 4.0))
def test_commitment_term_moves_only_the_encoder(seed, beta):
    grad_z, grad_e, z_e, e = vq_term_grads(beta, seed, "commitment")
    assert torch.equal(grad_e, torch.zeros_like(grad_e))
    torch.testing.assert_close(grad_z, beta * 2 * (z_e - e).detach() / z_e.numel())


@given(seed=SEEDS, beta=st.floats(0.01, 4.0))
def test_beta_scales_the_encoders_term_and_not_the_codebooks(seed, beta):
    """taming-transformers' default (legacy=True) has it the other way round and fails this."""
    grad_z, grad_e, _, _ = vq_term_grads(beta, seed, "both")
    grad_z1, grad_e1, _, _ = vq_term_grads(1.0, seed, "both")
    torch.testing.assert_close(grad_z, beta * grad_z1)
    torch.testing.assert_close(grad_e, grad_e1)


def random_assignment(seed, n, K, D):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=g, dtype=torch.float64)
    indices = torch.randint(K, (n,), generator=g)
    counts = torch.rand(K, generator=g, dtype=torch.float64) * 5 + 0.1
    embed_sum = torch.randn(K, D, generator=g, dtype=torch.float64) * counts[:, None]
    return z, indices, counts, embed_sum


@given(seed=SEEDS, K=st.integers(1, 50), eps=st.floats(1e-8, 1.0))
def test_laplace_smoothing_keeps_the_total_count_and_no_count_is_zero(seed, K, eps):
    g = torch.Generator().manual_seed(seed)
    counts = torch.rand(K, generator=g, dtype=torch.float64) * (torch.rand(K, generator=g) < 0.5) * 10
    counts[0] = 1.0  # at least one vector assigned
    smoothed = vqvae.laplace_smooth(counts, eps)
    torch.testing.assert_close(smoothed.sum(), counts.sum())
    assert (smoothed > 0).all()


@given(seed=SEEDS, n=st.integers(1, 30), K=st.integers(2, 12), decay=st.floats(0.0, 0.999))
def test_ema_counts_of_unused_codes_decay_by_gamma(seed, n, K, decay):
    z, indices, counts, embed_sum = random_assignment(seed, n, K, 3)
    batch_counts, batch_sums = vqvae.codebook_stats(z, indices, K)
    new_counts, _, _ = vqvae.ema_codebook_update(counts, embed_sum, batch_counts, batch_sums, decay, 1e-5)
    unused = batch_counts == 0
    torch.testing.assert_close(new_counts[unused], decay * counts[unused], rtol=1e-12, atol=0)
    torch.testing.assert_close(new_counts.sum(), decay * counts.sum() + (1 - decay) * n)


@given(seed=SEEDS, n=st.integers(1, 40), K=st.integers(1, 12), D=st.integers(1, 4))
def test_ema_with_gamma_zero_moves_each_used_code_to_the_mean_of_its_vectors(seed, n, K, D):
    z, indices, counts, embed_sum = random_assignment(seed, n, K, D)
    batch_counts, batch_sums = vqvae.codebook_stats(z, indices, K)
    _, _, codebook = vqvae.ema_codebook_update(counts, embed_sum, batch_counts, batch_sums, 0.0, 1e-9)
    for k in indices.unique():
        torch.testing.assert_close(codebook[k], z[indices == k].mean(0), rtol=1e-6, atol=1e-6)


def test_ema_codes_that_no_vector_chooses_stay_put():
    """The counts start at 1 with m_k = e_k, so an unused code keeps its place (with N_k = 0, a
    common default, the first update would divide by about eps and throw it far away)."""
    quantizer = vqvae.VectorQuantizer(8, 2, ema=True).train()
    quantizer.codebook.copy_(torch.arange(16.0).reshape(8, 2))
    quantizer.embed_sum.copy_(quantizer.codebook)  # the EMA state of codes used once each
    before = quantizer.codebook.clone()
    z_e = torch.zeros(1, 2, 4, 4) + 0.1  # every vector chooses code 0
    for _ in range(20):
        quantizer(z_e)
    torch.testing.assert_close(quantizer.codebook[1:], before[1:], rtol=1e-3, atol=0)
    torch.testing.assert_close(quantizer.codebook[0], torch.full((2,), 0.1), rtol=0, atol=1e-3 + 0.99 ** 20)


def test_dead_codes_are_reset_to_vectors_of_the_batch():
    quantizer = vqvae.VectorQuantizer(8, 2, ema=True, dead_code_threshold=1.0).train()
    quantizer.codebook.copy_(torch.arange(16.0).reshape(8, 2) * 10)
    quantizer.embed_sum.copy_(quantizer.codebook)
    z_e = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    quantizer(z_e, torch.Generator().manual_seed(1))
    vectors = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in range(1, 8):  # code 0 took every vector; the others fell below one vector per batch
        assert torch.isclose(vectors, quantizer.codebook[k]).all(dim=1).any(), k
        assert quantizer.counts[k] == 1.0


def test_kmeans_init_finds_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    z = (means[:, None, :] + 0.1 * torch.randn(4, 50, 2, generator=g)).reshape(200, 2)
    centres, sizes = vqvae.kmeans(z, 4, 10, torch.Generator().manual_seed(1))
    order = torch.argsort(centres[:, 0] * 100 + centres[:, 1])  # the order of `means`: by x, then y
    torch.testing.assert_close(centres[order], z.reshape(4, 50, 2).mean(1)[[0, 2, 1, 3]], rtol=0, atol=1e-5)
    assert sizes.tolist() == [50.0] * 4


def test_l2_normalised_codes_and_outputs_have_unit_norm():
    quantizer = vqvae.VectorQuantizer(16, 4, ema=True, l2_normalize=True, kmeans_init=True).train()
    z_e = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    z_q, _, _ = quantizer(z_e, torch.Generator().manual_seed(1))
    torch.testing.assert_close(z_q.norm(dim=1), torch.ones(2, 4, 4))
    torch.testing.assert_close(quantizer.codes().norm(dim=1), torch.ones(16))


@given(indices=st.lists(st.integers(0, 19), min_size=1, max_size=60))
def test_perplexity_lies_between_one_and_min_of_k_and_n(indices):
    K = 20
    counts = torch.bincount(torch.tensor(indices), minlength=K)
    ppl = vqvae.codebook_perplexity(counts)
    assert 1 - 1e-9 <= ppl <= min(K, len(indices)) + 1e-9


@given(K=st.integers(1, 500), per_code=st.integers(1, 9))
def test_perplexity_of_uniform_use_is_k(K, per_code):
    assert math.isclose(vqvae.codebook_perplexity(torch.full((K,), per_code)), K, rel_tol=1e-9)


# ---------------------------------------------------------------------------------------------
# The VAE's math


@given(seed=SEEDS, D=st.integers(1, 4))
def test_closed_form_kl_equals_monte_carlo(seed, D):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(1, D, generator=g, dtype=torch.float64)
    logvar = torch.randn(1, D, generator=g, dtype=torch.float64)
    n = 200_000
    z = vqvae.reparameterize(mean, logvar, torch.randn(n, D, generator=g, dtype=torch.float64))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    log_ratio = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(1)  # (n,)
    closed = vqvae.gaussian_kl(mean, logvar)[0]
    assert abs(log_ratio.mean() - closed) < 5 * log_ratio.std() / math.sqrt(n) + 1e-9


def linear_gaussian(seed, d, m):
    """p(z) = N(0, I_d), p(x|z) = N(W z + b, s2 I_m) with orthogonal columns of W, so that the
    true posterior is a diagonal Gaussian; one observation x."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64))
    W = Q * (torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.2)  # (m, d)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    s2 = float(torch.rand(1, generator=g) * 0.5 + 0.1)
    x = W @ torch.randn(d, generator=g, dtype=torch.float64) + b + math.sqrt(s2) * torch.randn(m, generator=g, dtype=torch.float64)
    return W, b, s2, x, g


def elbo(W, b, s2, x, mean, logvar):
    """E_q[log p(x|z)] in closed form for q = N(mean, diag(exp(logvar))), minus vqvae.gaussian_kl."""
    m = len(x)
    residual = x - W @ mean - b
    expected_loglik = -0.5 * m * math.log(2 * math.pi * s2) - (residual @ residual + ((W ** 2).sum(0) * logvar.exp()).sum()) / (2 * s2)
    return expected_loglik - vqvae.gaussian_kl(mean[None], logvar[None])[0]


@given(seed=SEEDS, d=st.integers(1, 3), extra=st.integers(0, 3))
def test_elbo_is_below_log_evidence_with_equality_at_the_true_posterior(seed, d, extra):
    W, b, s2, x, g = linear_gaussian(seed, d, d + extra)
    log_px = torch.distributions.MultivariateNormal(b, W @ W.T + s2 * torch.eye(len(x), dtype=torch.float64)).log_prob(x)
    precision = 1 + (W ** 2).sum(0) / s2  # diagonal of I + W^T W / s2
    post_mean, post_logvar = (W.T @ (x - b)) / s2 / precision, -precision.log()
    torch.testing.assert_close(elbo(W, b, s2, x, post_mean, post_logvar), log_px, rtol=0, atol=1e-9)
    for _ in range(5):
        mean = post_mean + torch.randn(d, generator=g, dtype=torch.float64)
        logvar = post_logvar + torch.randn(d, generator=g, dtype=torch.float64)
        assert elbo(W, b, s2, x, mean, logvar) < log_px


@given(mean=st.floats(-1.5, 1.5), log_scale=st.floats(-6.0, 1.0))
def test_discretized_gaussian_probabilities_of_the_256_values_sum_to_one(mean, log_scale):
    x = (torch.arange(256, dtype=torch.float64) / 127.5 - 1)[:, None]  # (256, 1): each value a sample
    nll = vqvae.discretized_gaussian_nll(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert abs(torch.exp(-nll).sum().item() - 1) < 1e-4


@given(seed=SEEDS)
def test_reconstruction_term_is_the_mean_squared_or_the_mean_absolute_error(seed):
    g = torch.Generator().manual_seed(seed)
    x, x_hat = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1, torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    terms = {"codebook": torch.tensor(0.25), "commitment": torch.tensor(0.5)}
    for rec_loss, expected in (("l2", ((x_hat - x) ** 2).mean()), ("l1", (x_hat - x).abs().mean())):
        loss, recon = vqvae.vq_vae_loss(x, x_hat, terms, rec_loss)
        torch.testing.assert_close(recon, expected)
        torch.testing.assert_close(loss, expected + 0.75)


def test_bits_per_dim_bookkeeping():
    # a uniform distribution over the 256 values costs exactly 8 bits per subpixel
    assert math.isclose(vqvae.bits_per_dim(3072 * math.log(256), 3072), 8.0)


# ---------------------------------------------------------------------------------------------
# Learning


def test_vq_autoencoder_overfits_four_images():
    torch.manual_seed(0)
    cfg, model = tiny_autoencoder(channels=16, num_codes=32, latent_dim=8)
    x = vqvae.images_to_tensor(vqvae.shapes_split("train", 4, 16, 0)["images"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        out, terms = model(x, generator=torch.Generator().manual_seed(step))
        loss, recon = vqvae.vq_vae_loss(x, out, terms)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert F.mse_loss(model.decode_indices(model.encode(x)), x).item() < 0.02


# ---------------------------------------------------------------------------------------------
# The prior


def test_prior_input_is_the_class_token_then_the_codes_shifted_by_one():
    codes = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    inputs = vqvae.prior_inputs(codes, torch.tensor([0, 2]), num_codes=10)
    assert inputs.tolist() == [[10, 3, 1, 4], [12, 5, 9, 2]]


def test_grid_positions_embed_the_row_and_column_of_the_predicted_code():
    torch.manual_seed(0)
    width, dim = 3, 5
    positions = vqvae.GridPositions(width, dim)
    out = positions(torch.arange(width * width)[None])  # (1, 9, D)
    for slot in range(width * width):
        row, column = divmod(slot, width)
        assert torch.equal(out[0, slot], positions.row.weight[row] + positions.column.weight[column])
    cfg = vqvae.Config(**vqvae.PRESETS["tiny"])
    assert isinstance(vqvae.build_prior(cfg, 5).pos_embed, vqvae.GridPositions)


def test_prior_tokens_decode_to_images_of_the_right_shape():
    torch.manual_seed(0)
    cfg, model = tiny_autoencoder()
    num_classes = 5
    prior = vqvae.build_prior(cfg, num_classes)
    grid = cfg.image_size // cfg.downsample
    labels = np.array([0, 3, 4])
    codes = vqvae.sample_codes(prior, labels, cfg.num_codes, num_classes, grid * grid, cfg,
                               vqvae.setup_runtime(cfg), torch.Generator().manual_seed(0), w=1.0)
    assert codes.shape == (3, grid * grid) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < cfg.num_codes  # the head scores codes only, never class tokens
    images = model.eval().decode_indices(codes.reshape(3, grid, grid))
    assert images.shape == (3, 3, cfg.image_size, cfg.image_size)


def test_resume_inside_the_prior_phase_equals_the_uninterrupted_run_bitwise(tmp_path):
    """The contract resumes inside the tokenizer's phase; here the run stops in the prior's, so the
    resumed run must re-tokenize the training set with the restored tokenizer."""
    common = ["--max_steps", 3, "--prior_steps", 3, "--log_every", 1, "--dead_code_threshold", 2.0]
    vqvae.main(tiny_args(tmp_path / "a", *common, "--stop_step", 4))
    vqvae.main(tiny_args(tmp_path / "a", *common, "--resume", tmp_path / "a" / "ckpt.pt"))
    vqvae.main(tiny_args(tmp_path / "b", *common))
    resumed = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    straight = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 6
    for key in ("model", "prior"):
        for name, tensor in straight[key].items():
            assert torch.equal(resumed[key][name], tensor), (key, name)
    losses = lambda p: [r["loss"] for r in map(json.loads, open(p / "log.jsonl")) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


# ---------------------------------------------------------------------------------------------
# CLI


def test_gaussian_bottleneck_run_reports_the_elbo_in_bits_per_dim(tmp_path):
    metrics = vqvae.main(tiny_args(tmp_path, "--bottleneck", "gaussian"))
    assert metrics["elbo_bits_per_dim"] > 0 and metrics["kl_bits_per_dim"] >= 0
    assert math.isclose(metrics["elbo_bits_per_dim"], metrics["recon_nll_bits_per_dim"] + metrics["kl_bits_per_dim"])
    assert "alignment" not in metrics and (tmp_path / "reconstructions.png").exists()


def test_cli_trains_on_a_grayscale_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    images = (np.where(labels[:, None, None, None] == 1, 200, 20) * np.ones((1, 8, 8, 1))).astype(np.uint8)
    np.savez(tmp_path / "two.npz", images=images, labels=labels, class_names=np.array(["dark", "bright"]))
    metrics = vqvae.main(tiny_args(tmp_path / "o", "--data", tmp_path / "two.npz", "--image_size", 8))
    assert metrics["tokens_per_image"] == 4 and 0 < metrics["codebook_usage"] <= 1
    assert "detector_accuracy_recon" not in metrics and "alignment" not in metrics
    assert (tmp_path / "o" / "samples.png").exists()


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("flags, message", [
    (["--downsample", 3], "--downsample 3: expected a power of 2"),
    (["--image_size", 18], "--image_size 18 is not divisible by --downsample 4"),
    (["--bottleneck", "flow"], "--bottleneck flow: expected vq or gaussian"),
    (["--rec_loss", "l3"], "--rec_loss l3: expected l1 or l2"),
    (["--prior_heads", 3], "--prior_dim 32 is not divisible by --prior_heads 3"),
    (["--top_k", 17], r"--top_k 17 is larger than the codebook \(--num_codes 16\)"),
    (["--ema_decay", 1.0], r"--ema_decay 1.0: expected a finite number in \[0, 1\)"),
    (["--prior_batch_size", 512], "--prior_batch_size 512 is larger than the 128 training images"),
])
def test_bad_flags_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        vqvae.main(tiny_args(tmp_path, *flags))


def test_an_npz_without_labels_is_a_clear_error_for_the_prior_only(tmp_path):
    np.savez(tmp_path / "bare.npz", images=np.zeros((20, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="the class-conditional prior needs a 'labels' array"):
        vqvae.main(tiny_args(tmp_path, "--data", tmp_path / "bare.npz", "--image_size", 8))
    metrics = vqvae.main(tiny_args(tmp_path, "--data", tmp_path / "bare.npz", "--image_size", 8, "--bottleneck", "gaussian"))
    assert math.isfinite(metrics["elbo_bits_per_dim"])


# ---------------------------------------------------------------------------------------------
# GPU only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_nearest_code_searches_in_fp32_under_cuda_bf16_autocast():
    g = torch.Generator("cuda").manual_seed(0)
    z, codebook = torch.randn(4000, 16, device="cuda", generator=g), torch.randn(1024, 16, device="cuda", generator=g)
    reference = torch.cdist(z.double(), codebook.double()).argmin(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        chosen = vqvae.nearest_code(z, codebook)
    assert (chosen == reference).float().mean() > 0.999  # fp32 rounding may split a near tie, bf16 would split many


@cuda
def test_bf16_compiled_tokenizer_and_prior_on_cuda(tmp_path):
    metrics = vqvae.main(tiny_args(tmp_path, "--device", "cuda", "--compile", "1"))
    assert math.isfinite(metrics["final_loss"]) and 0 <= metrics["alignment"] <= 1
    assert json.loads(open(tmp_path / "log.jsonl").readline())["device"].startswith("cuda")
