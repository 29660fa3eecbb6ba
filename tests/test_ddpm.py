"""Specification of ddpm.py: contracts, the forward-process algebra, oracles, learning, runtime."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import ddpm

SCHEDULES = st.sampled_from(["linear", "cosine"])
# the evaluation tables shrunk to one setting each: runtime tests check the plumbing, not quality
FAST_EVAL = ["--eval_ws", "0", "--eval_cls_ws", "1", "--eval_steps", "1", "--eval_per_class", "2", "--sample_steps", "2"]


def tiny_args(out_dir, *extra):
    return ["--preset", "tiny", "--out_dir", str(out_dir), *FAST_EVAL, *map(str, extra)]


def gaussian_eps_oracle(mu, s):
    """The optimal eps-predictor E[eps | z_t] for data N(mu, s^2 I), in the samplers' signature.

    z_t = a x0 + sigma eps is Gaussian jointly with eps, so E[eps | z] = sigma (z - a mu) / var_z
    with var_z = a^2 s^2 + sigma^2.
    """

    def eps_fn(z, t, a, sigma):
        return sigma * (z - a * mu) / (a * a * s * s + sigma * sigma)

    return eps_fn


class GaussianOracleModel(nn.Module):
    """The same oracle behind the network signature model(z, t, y), for the loss function."""

    def __init__(self, sched, mu, s, num_classes=1):
        super().__init__()
        self.sched, self.mu, self.s, self.num_classes = sched, mu, s, num_classes

    def forward(self, z, t, y=None):
        t = t.long()
        a = self.sched["a"][t].reshape(-1, 1, 1, 1)
        sigma = self.sched["sigma"][t].reshape(-1, 1, 1, 1)
        return gaussian_eps_oracle(self.mu, self.s)(z, t, a, sigma)


# ---------------------------------------------------------------------------------------------
# Shape and dtype contracts


@pytest.mark.parametrize("num_levels,num_res_blocks,attn_levels,size", [(3, 1, 1, 32), (2, 2, 2, 16), (1, 1, 1, 8)])
def test_unet_maps_input_shape_to_itself(num_levels, num_res_blocks, attn_levels, size):
    torch.manual_seed(0)
    model = ddpm.UNet(in_channels=3, base_channels=8, num_classes=5, num_levels=num_levels,
                      num_res_blocks=num_res_blocks, attn_levels=attn_levels, num_heads=2)
    x = torch.randn(2, 3, size, size)
    out = model(x, torch.tensor([3.0, 999.0]), torch.tensor([0, 5]))
    assert out.shape == x.shape and out.dtype == torch.float32


def test_unet_accepts_float_time_and_missing_label():
    model = ddpm.UNet(in_channels=1, base_channels=8, num_classes=3, num_levels=2, num_heads=2)
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 1, 16, 16)
    uncond = model(x, torch.tensor([0.25, 0.75]), None)
    assert torch.equal(uncond, model(x, torch.tensor([0.25, 0.75]), torch.tensor([3, 3])))
    # the time embedding is not quantised: nearby float times give different outputs
    assert not torch.equal(model(x, 0.25), model(x, 0.2501))


def test_unet_output_depends_on_class():
    torch.manual_seed(0)
    model = ddpm.UNet(in_channels=3, base_channels=8, num_classes=4, num_levels=2, num_heads=2)
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([10.0, 10.0]), torch.tensor([0, 1]))
    assert not torch.allclose(out[0], out[1])


def test_timestep_embedding_shape_and_range():
    emb = ddpm.timestep_embedding(torch.tensor([0.0, 1.5, 999.0]), 9)
    assert emb.shape == (3, 9)
    assert emb.abs().max() <= 1.0
    assert torch.equal(emb[0, :4], torch.ones(4))  # cos(0) = 1


def test_noisy_classifier_gives_logits_over_real_classes():
    clf = ddpm.NoisyClassifier(in_channels=3, base_channels=8, num_classes=7, num_levels=3)
    logits = clf(torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 500, 999]))
    assert logits.shape == (4, 7)


def test_straightness_is_zero_for_a_line_and_positive_for_a_detour():
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    u = torch.linspace(0, 1, 9).reshape(-1, 1, 1, 1, 1)
    line = (1 - u) * start + u * end  # (9, 5, 3, 4, 4)
    assert abs(ddpm.path_straightness(line)) < 1e-12
    assert abs(ddpm.path_straightness(list(line))) < 1e-12
    # via the corner (end.x, start.y) in 2-D: length = |dx| + |dy|, chord = sqrt(dx^2 + dy^2)
    corner = torch.stack([torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 0.0]]), torch.tensor([[3.0, 4.0]])])
    assert ddpm.path_straightness(corner) == pytest.approx(7 / 5 - 1)


# ---------------------------------------------------------------------------------------------
# The forward process (Lec15 closed form) and the posterior


@settings(max_examples=20)
@given(kind=SCHEDULES, T=st.integers(50, 2000))
def test_alpha_bar_strictly_decreasing_in_unit_interval_and_near_zero_at_T(kind, T):
    sched = ddpm.get_schedule(kind, T)
    abar = sched["abar"]
    assert abar.dtype == torch.float64
    assert (abar > 0).all() and (abar <= 1).all()
    assert (abar[1:] < abar[:-1]).all()
    assert abar[-1] < 1e-3
    assert sched["abar_prev"][0] == 1.0  # abar_0 = 1: the chain starts at the data


def test_linear_schedule_matches_ho_et_al_at_T_1000():
    betas = ddpm.get_schedule("linear", 1000)["betas"]
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert ddpm.get_schedule("cosine", 1000)["betas"].max() <= 0.999


@settings(max_examples=20)
@given(kind=SCHEDULES, T=st.integers(50, 1200), frac=st.floats(0, 1))
def test_closed_form_equals_iterated_forward_process(kind, T, frac):
    """Compose q(x_k | x_{k-1}) for k = 1..t symbolically: x_t = c0 x_0 + sum_k c_k eps_k.

    q_step is affine, so applying it to coefficient vectors over (x_0, eps_1, ..., eps_t) with
    eps_k the k-th unit vector composes the kernels exactly; the closed form must give the mean
    coefficient c0 = sqrt(abar_t) and the variance sum_k c_k^2 = 1 - abar_t.
    """
    sched = ddpm.get_schedule(kind, T)
    t = min(int(frac * T), T - 1)
    x = torch.zeros(1, t + 2, dtype=torch.float64)
    x[0, 0] = 1.0  # x_0 = 1 * x_0
    for k in range(t + 1):
        unit = torch.zeros_like(x)
        unit[0, k + 1] = 1.0
        x = ddpm.q_step(x, torch.tensor([k]), unit, sched)
    mean_coef, var = x[0, 0], (x[0, 1:] ** 2).sum()
    assert mean_coef.item() == pytest.approx(sched["a"][t].item(), rel=1e-9, abs=1e-12)
    assert var.item() == pytest.approx(1 - sched["abar"][t].item(), rel=1e-9, abs=1e-12)
    # and q_sample computes that closed form
    x0, eps = torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64)
    z = ddpm.q_sample(x0, torch.tensor([t]), eps, sched)
    assert z.item() == pytest.approx((mean_coef + var.sqrt()).item(), rel=1e-9)


@settings(max_examples=20)
@given(kind=SCHEDULES, T=st.integers(50, 1000), seed=st.integers(0, 2**31 - 1))
def test_posterior_mean_in_eps_form_equals_x0_form(kind, T, seed):
    sched = ddpm.get_schedule(kind, T)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, T, (6,), generator=g)
    xt = ddpm.q_sample(x0, t, eps, sched)
    mean_x0, _ = ddpm.q_posterior(x0, xt, t, sched)
    mean_eps = ddpm.posterior_mean_from_eps(xt, eps, t, sched)
    torch.testing.assert_close(mean_eps, mean_x0, rtol=1e-7, atol=1e-7)


@settings(max_examples=20)
@given(kind=SCHEDULES, T=st.integers(2, 2000))
def test_posterior_variance_at_most_beta(kind, T):
    sched = ddpm.get_schedule(kind, T)
    assert (sched["beta_tilde"] <= sched["betas"]).all()
    assert sched["beta_tilde"][0] == 0.0  # x_0 is known given x_1 and x_0


@settings(max_examples=20)
@given(kind=SCHEDULES, T=st.integers(50, 1000), seed=st.integers(0, 2**31 - 1), t=st.integers(1, 49))
def test_posterior_is_bayes_rule_of_the_forward_kernels(kind, T, seed, t):
    """q(x_{t-1}|x_t,x_0) prop. to q(x_t|x_{t-1}) q(x_{t-1}|x_0): check its log density gradient."""
    sched = ddpm.get_schedule(kind, T)
    g = torch.Generator().manual_seed(seed)
    x0, xt, x_prev = torch.randn(3, generator=g, dtype=torch.float64)
    alpha, abar_prev = sched["alphas"][t], sched["abar_prev"][t]
    x_prev = x_prev.clone().requires_grad_(True)
    log_joint = (-(xt - alpha.sqrt() * x_prev) ** 2 / (2 * (1 - alpha))
                 - (x_prev - abar_prev.sqrt() * x0) ** 2 / (2 * (1 - abar_prev)))
    (grad,) = torch.autograd.grad(log_joint, x_prev)
    mean, var = ddpm.q_posterior(x0.reshape(1, 1), xt.reshape(1, 1), torch.tensor([t]), sched)
    assert grad.item() == pytest.approx(-(x_prev.item() - mean.item()) / var.item(), rel=1e-6, abs=1e-8)


@settings(max_examples=10)
@given(kind=SCHEDULES, T=st.sampled_from([60, 1000]), num_steps=st.integers(1, 60))
def test_respacing_keeps_alpha_bar_at_kept_steps(kind, T, num_steps):
    full = ddpm.get_schedule(kind, T)
    sub = ddpm.respace(full, num_steps)
    tau = sub["timesteps"]
    assert len(tau) == num_steps and tau[-1] == T - 1 and (tau[1:] > tau[:-1]).all()
    torch.testing.assert_close(sub["abar"], full["abar"][tau], rtol=1e-12, atol=0)
    # and the respaced betas are the ones that compose to those abar
    torch.testing.assert_close(torch.cumprod(1 - sub["betas"], 0), sub["abar"], rtol=1e-8, atol=0)
    assert (sub["beta_tilde"] <= sub["betas"]).all()


def test_respacing_with_all_steps_is_the_identity():
    full = ddpm.get_schedule("linear", 100)
    sub = ddpm.respace(full, 100)
    for key in ("betas", "abar", "beta_tilde", "coef_x0", "coef_xt"):
        torch.testing.assert_close(sub[key], full[key], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Parameterisations and the score


@settings(max_examples=30)
@given(abar=st.floats(1e-4, 1 - 1e-4), seed=st.integers(0, 2**31 - 1))
def test_eps_x0_v_score_conversions_are_exact_inverses(abar, seed):
    g = torch.Generator().manual_seed(seed)
    a, sigma = math.sqrt(abar), math.sqrt(1 - abar)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    z = a * x0 + sigma * eps
    close = dict(rtol=1e-9, atol=1e-9 / a)
    torch.testing.assert_close(ddpm.x0_from_eps(z, eps, a, sigma), x0, **close)
    torch.testing.assert_close(ddpm.eps_from_x0(z, x0, a, sigma), eps, rtol=1e-9, atol=1e-9 / sigma)
    v = ddpm.v_from_eps_x0(eps, x0, a, sigma)
    torch.testing.assert_close(ddpm.eps_from_v(z, v, a, sigma), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ddpm.x0_from_v(z, v, a, sigma), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ddpm.eps_from_score(ddpm.score_from_eps(eps, sigma), sigma), eps)
    for param in ("eps", "x0", "v"):
        target = ddpm.training_target(eps, x0, a, sigma, param)
        eps_back, x0_back = ddpm.prediction_to_eps_x0(target, z, a, sigma, param)
        torch.testing.assert_close(eps_back, eps, rtol=1e-9, atol=1e-9 / sigma)
        torch.testing.assert_close(x0_back, x0, rtol=1e-9, atol=1e-9 / a)


@settings(max_examples=20)
@given(kind=SCHEDULES, mu=st.floats(-2, 2), s=st.floats(0.1, 2), seed=st.integers(0, 2**31 - 1))
def test_optimal_noise_predictor_is_minus_sigma_times_score(kind, mu, s, seed):
    """For data N(mu, s^2 I), E[eps | z_t] = -sigma_t grad log p(z_t); the score by autograd."""
    sched = ddpm.get_schedule(kind, 1000)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (8,), generator=g)
    a, sigma = sched["a"][t][:, None], sched["sigma"][t][:, None]
    z = (a * mu + (a * a * s * s + sigma * sigma).sqrt() * torch.randn(8, 5, generator=g, dtype=torch.float64))
    z.requires_grad_(True)
    # the marginal q(z_t) = N(a mu, (a^2 s^2 + sigma^2) I), written as a log density
    var = a * a * s * s + sigma * sigma
    log_p = (-(z - a * mu) ** 2 / (2 * var) - 0.5 * torch.log(2 * math.pi * var)).sum()
    (score,) = torch.autograd.grad(log_p, z)
    eps_star = gaussian_eps_oracle(mu, s)(z.detach(), t, a, sigma)
    torch.testing.assert_close(eps_star, ddpm.eps_from_score(score, sigma), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ddpm.score_from_eps(eps_star, sigma), score, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_loss_of_the_exact_oracle_is_the_irreducible_floor(kind):
    """L_simple at the optimum equals E_t[a^2 s^2 / (a^2 s^2 + sigma^2)] (Var(eps | z_t))."""
    mu, s = 0.3, 0.5
    sched = ddpm.get_schedule(kind, 1000)
    floor = (sched["abar"] * s * s / (sched["abar"] * s * s + 1 - sched["abar"])).mean().item()
    g = torch.Generator().manual_seed(0)
    x0 = mu + s * torch.randn(4000, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.zeros(4000, dtype=torch.long)
    model = GaussianOracleModel(sched, mu, s)
    losses = []
    for _ in range(5):
        t = torch.randint(0, 1000, (4000,), generator=g)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        losses.append(ddpm.diffusion_loss(model, x0, y, t, eps, sched, "eps").item())
    mc = sum(losses) / len(losses)
    # 20000 draws of t: the standard error of the mean over t is about 0.002
    assert mc == pytest.approx(floor, abs=0.01)
    assert 0 < floor < 1


# ---------------------------------------------------------------------------------------------
# Samplers with the exact oracle: data mean and variance are reproduced, better with more steps


def _exact_prior(sched, mu, s):
    """Mean and std of q(x_T) for data N(mu, s^2): starting there isolates discretisation error."""
    a, sigma = sched["a"][-1].item(), sched["sigma"][-1].item()
    return a * mu, math.sqrt(a * a * s * s + sigma * sigma)


@settings(max_examples=10)
@given(kind=SCHEDULES, mu=st.floats(-2, 2), s=st.floats(0.2, 2))
def test_ddim_with_exact_oracle_reproduces_data_moments_better_with_more_steps(kind, mu, s):
    """DDIM(eta=0) with an affine oracle is an affine map x_T -> x_0: two runs give its moments."""
    full = ddpm.get_schedule(kind, 1000)
    m_T, sd_T = _exact_prior(full, mu, s)
    errors = []
    for steps in (10, 100, 1000):
        sched = ddpm.respace(full, steps)
        at_mean = ddpm.ddim_sample(gaussian_eps_oracle(mu, s), sched, torch.tensor([m_T], dtype=torch.float64))
        at_plus_sd = ddpm.ddim_sample(gaussian_eps_oracle(mu, s), sched, torch.tensor([m_T + sd_T], dtype=torch.float64))
        mean, sd = at_mean.item(), (at_plus_sd - at_mean).abs().item()
        errors.append(max(abs(mean - mu), abs(sd - s)))
        assert errors[-1] <= 5 / steps
    assert errors[0] > errors[1] > errors[2]


@settings(max_examples=6)
@given(kind=SCHEDULES, variance=st.sampled_from(["beta", "beta_tilde"]), mu=st.floats(-2, 2),
       s=st.floats(0.2, 2), seed=st.integers(0, 2**31 - 1))
def test_ancestral_sampling_with_exact_oracle_reproduces_data_moments(kind, variance, mu, s, seed):
    full = ddpm.get_schedule(kind, 1000)
    m_T, sd_T = _exact_prior(full, mu, s)
    n = 20000
    # 5 standard errors of the sample mean of n draws (the sample std's is smaller)
    mc_tol = 5 * s / math.sqrt(n)
    for steps in (10, 100, 1000):
        g = torch.Generator().manual_seed(seed)
        x_T = m_T + sd_T * torch.randn(n, dtype=torch.float64, generator=g)
        x = ddpm.ddpm_sample(gaussian_eps_oracle(mu, s), ddpm.respace(full, steps), x_T, variance, generator=g)
        err = max(abs(x.mean().item() - mu), abs(x.std().item() - s))
        assert err <= 5 / steps + mc_tol


def test_ddim_eta_one_is_ancestral_sampling_with_posterior_variance():
    sched = ddpm.respace(ddpm.get_schedule("cosine", 1000), 20)
    eps_fn = gaussian_eps_oracle(0.5, 0.7)
    x_T = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = ddpm.ddim_sample(eps_fn, sched, x_T, eta=1.0, generator=torch.Generator().manual_seed(2))
    b = ddpm.ddpm_sample(eps_fn, sched, x_T, "beta_tilde", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_samplers_return_trajectories_of_nfe_plus_one_states():
    sched = ddpm.respace(ddpm.get_schedule("linear", 1000), 7)
    calls = []

    def eps_fn(z, t, a, sigma):
        calls.append(t)
        return gaussian_eps_oracle(0.0, 1.0)(z, t, a, sigma)

    x_T = torch.randn(3, 2)
    x, traj = ddpm.ddim_sample(eps_fn, sched, x_T, return_traj=True)
    assert len(calls) == 7 and calls == sorted(calls, reverse=True) and calls[0] == 999
    assert len(traj) == 8 and traj[0] is x_T and torch.equal(traj[-1], x)


@pytest.mark.parametrize("steps", [1, 3, 50])
def test_ddim_with_a_single_data_point_follows_the_arc_and_lands_on_it(steps):
    """For data = one point x*, E[x0 | z] = x*, so DDIM keeps eps fixed: z_k = a_k x* + sigma_k e
    exactly, at any step count. The path is an arc in the (x*, e) plane, not a line: with x* and
    e orthogonal and of equal norm its straightness tends to (pi/2) / sqrt(2) - 1."""
    sched = ddpm.respace(ddpm.get_schedule("cosine", 1000), steps)
    x_star = torch.zeros(1, 2, dtype=torch.float64)
    x_star[0, 0] = 3.0
    e = torch.zeros(1, 2, dtype=torch.float64)
    e[0, 1] = 3.0
    a_T, s_T = sched["a"][-1].item(), sched["sigma"][-1].item()

    def eps_fn(z, t, a, sigma):
        return (z - a * x_star) / sigma

    x, traj = ddpm.ddim_sample(eps_fn, sched, a_T * x_star + s_T * e, return_traj=True)
    torch.testing.assert_close(x, x_star, rtol=0, atol=1e-9)
    a_k = torch.cat([sched["a"].flip(0), torch.ones(1, dtype=torch.float64)])
    s_k = torch.cat([sched["sigma"].flip(0), torch.zeros(1, dtype=torch.float64)])
    for k, z in enumerate(traj):
        torch.testing.assert_close(z, a_k[k] * x_star + s_k[k] * e, rtol=0, atol=1e-9)
    if steps == 50:
        assert ddpm.path_straightness(traj) == pytest.approx(math.pi / 2 / math.sqrt(2) - 1, abs=2e-3)


# ---------------------------------------------------------------------------------------------
# Guidance


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), w=st.floats(-3, 10))
def test_cfg_zero_weight_is_conditional_and_output_affine_in_w(seed, w):
    g = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ddpm.cfg_combine(cond, uncond, 0.0), cond)
    at0, at1 = ddpm.cfg_combine(cond, uncond, 0.0), ddpm.cfg_combine(cond, uncond, 1.0)
    torch.testing.assert_close(ddpm.cfg_combine(cond, uncond, w), at0 + w * (at1 - at0))
    torch.testing.assert_close(ddpm.cfg_combine(cond, cond, w), cond)


class _TwoClassOracle(nn.Module):
    """Exact eps-predictor for a two-class Gaussian mixture, mean mus[c], std s, equal priors."""

    def __init__(self, sched, mus, s):
        super().__init__()
        self.sched, self.mus, self.s, self.num_classes = sched, torch.tensor(mus, dtype=torch.float64), s, 2

    def log_likelihoods(self, z, t):
        a = self.sched["a"][t.long()].reshape(-1, 1, 1, 1)
        var = a * a * self.s**2 + 1 - a * a
        mean = a[:, None] * self.mus.reshape(1, 2, 1, 1, 1)  # (B, 2, 1, 1, 1)
        return (-(z[:, None] - mean) ** 2 / (2 * var[:, None])).flatten(2).sum(-1)  # (B, 2)

    def forward(self, z, t, y=None):
        a = self.sched["a"][t.long()].reshape(-1, 1, 1, 1)
        sigma = (1 - a * a).sqrt()
        post = self.log_likelihoods(z, t).softmax(-1)  # (B, 2) p(c | z_t)
        per_class = torch.stack([gaussian_eps_oracle(m, self.s)(z, t, a, sigma) for m in self.mus.tolist()], 1)
        if y is None:
            y = torch.full((z.shape[0],), 2)
        weights = torch.where((y == 2)[:, None], post, nn.functional.one_hot(y.clamp(max=1), 2).double())
        return (weights.reshape(-1, 2, 1, 1, 1) * per_class).sum(1)


class _BayesClassifier(nn.Module):
    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle

    def forward(self, z, t):
        return self.oracle.log_likelihoods(z, t)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), t=st.integers(0, 999))
def test_classifier_guidance_with_bayes_classifier_turns_unconditional_into_conditional(seed, t):
    """grad log p(z|c) = grad log p(z) + grad log p(c|z): w=1 with the exact classifier is exact."""
    sched = ddpm.get_schedule("cosine", 1000)
    oracle = _TwoClassOracle(sched, [-1.0, 1.5], 0.4)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    a, sigma = sched["a"][t].item(), sched["sigma"][t].item()
    tt = torch.full((4,), t)
    uncond = oracle(z, tt, None)
    grad = ddpm.classifier_log_prob_grad(_BayesClassifier(oracle), z, tt, y)
    guided = ddpm.classifier_guidance(uncond, grad, sigma, 1.0)
    torch.testing.assert_close(guided, oracle(z, tt, y), rtol=1e-8, atol=1e-8)
    assert a > 0


def test_guided_eps_fn_combines_one_batched_pass_like_separate_passes():
    torch.manual_seed(0)
    model = ddpm.UNet(in_channels=1, base_channels=8, num_classes=3, num_levels=2, num_heads=2).double()
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    z, y, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 2]), 500
    a, sigma = 0.6, 0.8
    for param in ("eps", "v"):
        guided = ddpm.make_eps_fn(model, y, param, cfg_w=2.5)(z, t, a, sigma)
        tt = torch.full((2,), float(t), dtype=torch.float64)
        cond, _ = ddpm.prediction_to_eps_x0(model(z, tt, y), z, a, sigma, param)
        uncond, _ = ddpm.prediction_to_eps_x0(model(z, tt, None), z, a, sigma, param)
        torch.testing.assert_close(guided, ddpm.cfg_combine(cond, uncond, 2.5))


@settings(max_examples=20)
@given(p=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_condition_dropout_only_replaces_by_null_class(p, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (200,), generator=g)
    dropped = ddpm.drop_condition(y, p, 5, g)
    assert ((dropped == y) | (dropped == 5)).all()
    if p == 0:
        assert torch.equal(dropped, y)
    if p == 1:
        assert (dropped == 5).all()


# ---------------------------------------------------------------------------------------------
# Learning


@pytest.mark.parametrize("parameterization", ["v", "x0"])
def test_a_model_trained_on_two_images_generates_each_for_its_label(parameterization):
    """Overfit a tiny batch: two renders with two labels; DDIM from fresh noise gives them back."""
    torch.manual_seed(0)
    attrs = np.array([[1, 0, 1, 4], [0, 2, 1, 4]])  # a large red square, a large blue circle, centred
    x0 = ddpm.images_to_tensor(ddpm.render_shapes(attrs, np.zeros((2, 2)), 16))
    y = torch.tensor([0, 1])
    model = ddpm.UNet(3, 8, 2, num_levels=2, num_heads=2)
    sched = ddpm.get_schedule("cosine", 100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        t = torch.randint(0, 100, (16,), generator=g)
        eps = torch.randn(16, 3, 16, 16, generator=g)
        loss = ddpm.diffusion_loss(model, x0.repeat(8, 1, 1, 1), y.repeat(8), t, eps, sched, parameterization)
        opt.zero_grad()
        loss.backward()
        opt.step()
    labels = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        out = ddpm.ddim_sample(ddpm.make_eps_fn(model.eval(), labels, parameterization), ddpm.respace(sched, 20),
                               torch.randn(4, 3, 16, 16, generator=g), clip_x0=1.0)
    rms = (out - x0[labels]).pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert (rms < 0.3).all(), rms


# ---------------------------------------------------------------------------------------------
# Checkpoint and resume


def test_resume_inside_the_classifier_phase_equals_the_uninterrupted_run_bitwise(tmp_path):
    """The contract resumes inside the diffusion phase; here the run stops in the classifier's."""
    stop = 7  # diffusion: steps 1-6, classifier: 7-9
    common = ["--max_steps", 6, "--cls_steps", 3, "--log_every", 1, "--dropout", 0.1]  # dropout: torch RNG
    ddpm.main(tiny_args(tmp_path / "a", *common, "--stop_step", stop))
    ddpm.main(tiny_args(tmp_path / "a", *common, "--resume", tmp_path / "a" / "ckpt.pt"))
    ddpm.main(tiny_args(tmp_path / "b", *common))
    resumed = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    straight = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 9
    for key in ("model", "ema", "classifier"):
        for name, tensor in straight[key].items():
            assert torch.equal(resumed[key][name], tensor), (key, name)
    losses = lambda p: [r["loss"] for r in map(json.loads, open(p / "log.jsonl")) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_trains_on_a_real_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    images = np.where(labels[:, None, None, None] == 1, 200, 20).astype(np.uint8) * np.ones((1, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "two.npz", images=images, labels=labels, class_names=np.array(["dark", "bright"]))
    metrics = ddpm.main(tiny_args(tmp_path / "o", "--data", tmp_path / "two.npz", "--image_size", 8))
    assert "alignment" not in metrics and metrics["eval_samples"] == 4 and np.isfinite(metrics["final_loss"])


# ---------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("flags, message", [
    (["--image_size", 18, "--num_levels", 3], "--image_size 18 is not divisible by the U-Net's downsampling factor"),
    (["--num_heads", 3], "--num_heads 3 does not divide the U-Net widths"),
    (["--schedule", "quadratic"], "--schedule quadratic: expected one of linear, cosine"),
    (["--parameterization", "score"], "--parameterization score: expected one of eps, x0, v"),
    (["--sampler", "euler"], "--sampler euler: expected one of ddim, ddpm"),
    (["--eval_steps", "1,2000"], "every --eval_steps entry must be in \\[1, --timesteps 1000\\]"),
    (["--eval_ws", "a,b"], "--eval_ws 'a,b': expected a comma-separated list of float"),
    (["--p_uncond", 1.0], r"--p_uncond 1.0: expected a finite number in \[0, 1\)"),
    (["--batch_size", 512], "--batch_size 512 is larger than the 128 training images"),
])
def test_bad_flags_are_clear_errors(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        ddpm.main(tiny_args(tmp_path, *flags))


def test_an_npz_without_labels_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="a class-conditional diffusion model needs a 'labels' array"):
        ddpm.main(tiny_args(tmp_path, "--data", tmp_path / "bad.npz", "--image_size", 8))


# ---------------------------------------------------------------------------------------------
# Slow: compile and DDP


# ---------------------------------------------------------------------------------------------
# GPU only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_bf16_compiled_training_and_sampling_on_cuda(tmp_path):
    metrics = ddpm.main(tiny_args(tmp_path, "--device", "cuda", "--max_steps", 4))
    assert np.isfinite(metrics["final_loss"]) and 0 <= metrics["alignment"] <= 1
    assert json.loads(open(tmp_path / "log.jsonl").readline())["device"].startswith("cuda")


@cuda
def test_bf16_autocast_prediction_close_to_fp32_on_cuda():
    torch.manual_seed(0)
    model = ddpm.UNet(3, 32, 5, num_levels=3).cuda().eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)
    x, t, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.rand(8, device="cuda") * 999, torch.arange(8, device="cuda") % 6
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x, t, y).float()
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


@cuda
def test_samplers_and_classifier_guidance_run_on_cuda_with_exact_oracle():
    sched = ddpm.respace(ddpm.get_schedule("cosine", 1000), 20)
    x_T = torch.randn(4096, device="cuda", dtype=torch.float64, generator=torch.Generator("cuda").manual_seed(0))
    x = ddpm.ddpm_sample(gaussian_eps_oracle(1.0, 0.5), sched, x_T, generator=torch.Generator("cuda").manual_seed(1))
    assert x.device.type == "cuda" and abs(x.mean().item() - 1.0) < 0.05
