"""flow_matching.py: shapes, the lecture's math, exact sampler oracles, learning, resume, CLI,
bad inputs, compile and DDP, GPU. Order as in DESIGN.md section 7."""

import copy
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flow_matching as fm

ROOT = pathlib.Path(__file__).resolve().parent.parent

seeds = st.integers(0, 2**31 - 1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


class TinyVelocity(torch.nn.Module):
    """Stand-in for the U-Net: v(x, t, y) on flattened inputs, with a null class for guidance."""

    def __init__(self, shape, num_classes=3, hidden=32):
        super().__init__()
        dim = math.prod(shape)
        self.embed = torch.nn.Embedding(num_classes + 1, hidden)
        self.inp = torch.nn.Linear(dim + 1, hidden)
        self.out = torch.nn.Linear(hidden, dim)

    def forward(self, x, t, y):
        h = self.inp(torch.cat([x.flatten(1), t[:, None]], 1)) + self.embed(y)
        return self.out(torch.tanh(h)).reshape(x.shape)


def tiny_args(out_dir, *extra):
    return ["--preset", "tiny", "--out_dir", str(out_dir), *map(str, extra)]


def untrained_unet(cfg, num_classes=21, in_channels=3, seed=0):
    """A U-Net whose zero-initialised output layers are perturbed, so that its velocity is not 0."""
    torch.manual_seed(seed)
    model = fm.build_model(cfg, num_classes, in_channels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------- shapes and dtypes

def test_unet_maps_noisy_images_times_and_labels_to_a_velocity_of_the_same_shape():
    cfg = fm.Config(**fm.PRESETS["tiny"])
    model = fm.build_model(cfg, num_classes=21)
    x = torch.randn(3, 3, 16, 16)
    y = torch.tensor([0, 20, 21])  # 21 is the null class of guidance
    v = model(x, torch.tensor([0.0, 500.0, 1000.0]), y)
    assert v.shape == x.shape and v.dtype == torch.float32


def test_sampler_returns_uint8_images_and_counts_nfe():
    cfg = fm.Config(**fm.PRESETS["tiny"])
    model = untrained_unet(cfg)
    rt = fm.Runtime(torch.device("cpu"), None, False)
    labels, noise = torch.tensor([0, 5]), torch.randn(2, 3, 16, 16)
    images, nfe, gap = fm.sample_images(model, labels, noise, cfg, rt, 2.0, "rk4", 3, trajectory=True)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert nfe == 12 and gap > 0


# ---------------------------------------------------------------- math invariants (hypothesis)


@given(seed=seeds, batch=st.integers(1, 4), size=st.integers(1, 6))
def test_path_hits_noise_at_time_zero_and_data_at_time_one(seed, batch, size):
    g = gen(seed)
    x0, x1 = torch.randn(2, batch, 3, size, size, generator=g, dtype=torch.float64)
    zeros, ones = torch.zeros(batch, dtype=torch.float64), torch.ones(batch, dtype=torch.float64)
    assert torch.equal(fm.interpolate(x0, x1, zeros), x0)
    assert torch.equal(fm.interpolate(x0, x1, ones), x1)


@given(seed=seeds, batch=st.integers(1, 4))
def test_cfm_target_is_the_time_derivative_of_the_path(seed, batch):
    g = gen(seed)
    x0, x1 = torch.randn(2, batch, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(batch, generator=g, dtype=torch.float64)
    _, dxdt = torch.func.jvp(lambda tt: fm.interpolate(x0, x1, tt), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(dxdt, fm.cfm_target(x0, x1), rtol=1e-12, atol=1e-12)


@given(seed=seeds, loc=st.floats(-1, 1), scale=st.floats(0.3, 2))
def test_time_samples_lie_in_the_unit_interval(seed, loc, scale):
    for schedule in ("uniform", "logit_normal"):
        t = fm.sample_time(256, gen(seed), schedule=schedule, loc=loc, scale=scale)
        assert t.shape == (256,) and bool(((t >= 0) & (t < 1)).all())


def test_logit_normal_time_has_normal_logits():
    loc, scale = 0.5, 0.8
    t = fm.sample_time(200_000, gen(0), schedule="logit_normal", loc=loc, scale=scale).double()
    logits = torch.log(t) - torch.log1p(-t)
    # standard errors are scale / sqrt(n) ~ 2e-3 for the mean and ~1.3e-3 for the std
    assert abs(logits.mean().item() - loc) < 0.01
    assert abs(logits.std().item() - scale) < 0.01


def test_unknown_time_schedule_is_rejected_by_name():
    with pytest.raises(ValueError, match="t_schedule"):
        fm.sample_time(4, gen(0), schedule="beta")


@given(seed=seeds, t=st.floats(0.0, 0.95))
def test_marginal_velocity_of_one_point_is_the_conditional_velocity(seed, t):
    g = gen(seed)
    x, x1 = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    tt = torch.full((3,), t, dtype=torch.float64)
    v = fm.marginal_velocity(x, tt, x1[:1])
    torch.testing.assert_close(v, (x1[:1] - x) / (1 - t))


def _mixture_log_density(x, t, data):
    """log p_t(x) for p_t = mean_i N(t x_i, (1 - t)^2 I), written independently of the velocity."""
    d = x.shape[-1]
    var = (1 - t) ** 2
    sq = (x[:, None, :] - t * data[None]).pow(2).sum(-1)  # (B, N)
    log_n = -sq / (2 * var) - 0.5 * d * torch.log(2 * math.pi * var)
    return torch.logsumexp(log_n, 1) - math.log(data.shape[0])


@given(seed=seeds, n_points=st.integers(1, 5), t=st.floats(0.05, 0.9))
def test_marginal_velocity_solves_the_continuity_equation(seed, n_points, t):
    """d/dt p_t + div(p_t v_t) = 0: the exact marginal field transports p_0 = N(0, I) to the data."""
    g = gen(seed)
    data = torch.randn(n_points, 2, generator=g, dtype=torch.float64)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    p = _mixture_log_density(x, tt, data).exp()  # (B,)
    (dp_dt,) = torch.autograd.grad(p.sum(), tt, create_graph=True)
    flux = p[:, None] * fm.marginal_velocity(x, tt.expand(4), data)  # (B, 2)
    div = sum(torch.autograd.grad(flux[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(2))
    # dp_dt is a sum over the batch (p_i depends on t only), so compare the sums
    torch.testing.assert_close(dp_dt, -div.sum(), rtol=1e-7, atol=1e-9)


@given(seed=seeds, mu=st.floats(-2, 2), s=st.floats(0.1, 2), t=st.floats(0.0, 1.0))
def test_gaussian_flow_solves_the_ode_of_the_gaussian_velocity(seed, mu, s, t):
    g = gen(seed)
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    tt = torch.full((3,), t, dtype=torch.float64)
    x_t, dxdt = torch.func.jvp(lambda u: fm.gaussian_flow(x0, u, mu, s), (tt,), (torch.ones_like(tt),))
    torch.testing.assert_close(dxdt, fm.gaussian_velocity(x_t, tt, mu, s))
    endpoint = fm.gaussian_flow(x0, torch.ones(3, dtype=torch.float64), mu, s)
    torch.testing.assert_close(endpoint, mu + s * x0)


@settings(max_examples=10)
@given(seed=seeds, mu=st.floats(-2, 2), s=st.floats(0.2, 2), t=st.floats(0.05, 0.95))
def test_gaussian_velocity_is_the_conditional_mean_of_the_cfm_target(seed, mu, s, t):
    """Monte Carlo: E[x_1 - X_0 | X_t] is linear in X_t for Gaussian data, so the least-squares
    regression of sampled CFM targets on X_t estimates it."""
    g = gen(seed)
    n = 200_000
    x0 = torch.randn(n, generator=g, dtype=torch.float64)
    x1 = mu + s * torch.randn(n, generator=g, dtype=torch.float64)
    x_t = fm.interpolate(x0, x1, torch.full((n,), t, dtype=torch.float64))
    target = fm.cfm_target(x0, x1)
    design = torch.stack([torch.ones_like(x_t), x_t], 1)
    coef = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
    probe = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    oracle = fm.gaussian_velocity(probe, torch.full((3,), t, dtype=torch.float64), mu, s)
    torch.testing.assert_close(coef[0] + coef[1] * probe, oracle, rtol=0, atol=0.05)


@given(seed=seeds, w1=st.floats(-2, 8), w2=st.floats(-2, 8))
def test_guidance_with_zero_weight_is_conditional_and_affine_in_w(seed, w1, w2):
    g = gen(seed)
    cond, uncond = torch.randn(2, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    assert torch.equal(fm.cfg_combine(cond, uncond, 0.0), cond)
    f = lambda w: fm.cfg_combine(cond, uncond, w)
    # affine: f(w) = f(0) + w (f(1) - f(0))
    for w in (w1, w2):
        torch.testing.assert_close(f(w), f(0.0) + w * (f(1.0) - f(0.0)))
    torch.testing.assert_close(fm.cfg_combine(cond, cond, w1), cond)


@given(seed=seeds, w=st.floats(0.5, 4))
def test_guided_velocity_combines_separate_conditional_and_unconditional_calls(seed, w):
    torch.manual_seed(0)
    model = TinyVelocity((2, 4, 4)).double()
    g = gen(seed)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(fm.guided_velocity(model, y, 0.0, 3)(x, t), model(x, t, y))
        expected = (1 + w) * model(x, t, y) - w * model(x, t, torch.full_like(y, 3))
        torch.testing.assert_close(fm.guided_velocity(model, y, w, 3)(x, t), expected)


def test_cfm_loss_is_zero_for_the_exact_field_of_one_point():
    g = gen(0)
    x1 = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64).expand(5, -1, -1, -1)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.99
    loss = fm.cfm_loss(lambda x, tt: fm.marginal_velocity(x, tt, x1[:1]), x0, x1, t)
    assert loss.item() < 1e-20


@given(seed=seeds, t=st.floats(0.0, 1.0))
def test_lecture_convention_maps_to_sd3_by_reversing_time(seed, t):
    """SD3 puts data at 0 and noise at 1: z_s = (1 - s) x_1 + s X_0 with target X_0 - x_1."""
    g = gen(seed)
    x0, x1 = torch.randn(2, 2, 3, generator=g, dtype=torch.float64)
    tt = torch.full((2,), t, dtype=torch.float64)
    s = 1 - tt
    z_sd3 = (1 - s[:, None]) * x1 + s[:, None] * x0
    torch.testing.assert_close(fm.interpolate(x0, x1, tt), z_sd3)
    torch.testing.assert_close(fm.cfm_target(x0, x1), -(x0 - x1))


# ---------------------------------------------------------------- sampler oracles (closed forms)


@pytest.mark.parametrize("method", sorted(fm.ODE_METHODS))
@given(steps=st.integers(1, 7))
def test_nfe_counts_every_call_of_the_velocity(method, steps):
    calls = []

    def velocity(x, t):
        calls.append(t)
        return -x

    x = torch.ones(2, 3)
    _, nfe, traj = fm.ode_sample(velocity, x, steps, method, return_trajectory=True)
    assert nfe == len(calls) == steps * fm.ODE_METHODS[method]
    assert len(traj) == steps + 1 and torch.equal(traj[0], x)


@pytest.mark.parametrize("method", ["euler", "midpoint"])
@given(seed=seeds, steps=st.integers(1, 40))
def test_euler_lands_exactly_on_a_single_data_point_for_any_number_of_steps(method, seed, steps):
    """With one training point the marginal field is constant along each straight path.

    Heun and RK4 are left out: their last stage evaluates the field at t = 1, where the exact
    field of a finite data set is 0/0 on the data point itself.
    """
    g = gen(seed)
    x1 = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    out, _, _ = fm.ode_sample(lambda x, t: fm.marginal_velocity(x, t, x1), x0, steps, method)
    torch.testing.assert_close(out, x1.expand_as(out), rtol=0, atol=1e-9)


@given(seed=seeds, n_points=st.integers(2, 6))
def test_euler_with_the_exact_marginal_velocity_reaches_a_training_point(seed, n_points):
    g = gen(seed)
    data = 3 * torch.randn(n_points, 2, 3, 3, generator=g, dtype=torch.float64)
    x0 = torch.randn(8, 2, 3, 3, generator=g, dtype=torch.float64)
    out, _, _ = fm.ode_sample(lambda x, t: fm.marginal_velocity(x, t, data), x0, 200, "euler")
    nearest = torch.cdist(out.flatten(1), data.flatten(1)).min(1).values  # (B,)
    spread = torch.pdist(data.flatten(1)).min()
    assert bool((nearest < 0.05 * spread).all()), nearest


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
@given(seed=seeds, mu=st.floats(-1.5, 1.5), s=st.sampled_from([0.2, 0.5, 2.0]))
def test_solver_error_with_a_gaussian_oracle_shrinks_at_the_method_order(method, order, seed, mu, s):
    """Doubling the steps divides the endpoint error by at least 2^order; by exactly 2 for Euler (O(1/N))."""
    g = gen(seed)
    x0 = torch.randn(16, 4, generator=g, dtype=torch.float64)
    exact = mu + s * x0
    errors = []
    for steps in (32, 64, 128):
        out, _, _ = fm.ode_sample(lambda x, t: fm.gaussian_velocity(x, t, mu, s), x0, steps, method)
        errors.append((out - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine > 0.8 * 2**order, errors
        if method == "euler":
            assert coarse / fine < 2.5, errors


def test_single_step_euler_sample_is_noise_plus_velocity_at_time_zero():
    g = gen(1)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    out, nfe, _ = fm.ode_sample(lambda x, t: fm.gaussian_velocity(x, t, 0.5, 0.3), x0, 1)
    # at t=0 the Gaussian field is mu - X_0, so one step of size 1 lands on mu for every sample
    torch.testing.assert_close(out, torch.full_like(out, 0.5))
    assert nfe == 1


@given(seed=seeds, s=st.sampled_from([0.3, 0.5, 2.0]))
def test_straightness_is_zero_for_reflowed_gaussian_and_positive_before(seed, s):
    """The Gaussian flow bends unless s = 1; the straight path between its reflow couplings does not."""
    g = gen(seed)
    x0 = torch.randn(32, 4, generator=g, dtype=torch.float64)
    velocity = lambda x, t: fm.gaussian_velocity(x, t, 0.7, s)
    _, _, traj = fm.ode_sample(velocity, x0, 64, "rk4", return_trajectory=True)
    assert fm.path_straightness(traj) > 1e-3
    pair0, pair1 = fm.reflow_pairs(velocity, x0, 64, "rk4")
    line = [fm.interpolate(pair0, pair1, torch.full((32,), k / 8, dtype=torch.float64)) for k in range(9)]
    assert fm.path_straightness(line) == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(pair1, 0.7 + s * x0, rtol=0, atol=1e-7)


@given(seed=seeds, decay=st.floats(0.5, 0.9999), step=st.integers(0, 10_000))
def test_ema_moves_towards_the_weights_by_one_minus_the_warmed_up_decay(seed, decay, step):
    g = gen(seed)
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for p in (*ema.parameters(), *model.parameters()):
        p.data = torch.randn(p.shape, generator=g, dtype=torch.float64)
    before = [p.clone() for p in ema.parameters()]
    fm.ema_update(ema, model, decay, step)
    d = min(decay, (1 + step) / (10 + step))
    for old, new, p in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(new, d * old + (1 - d) * p)


def test_alignment_of_clean_renders_is_one_and_of_wrong_labels_zero():
    data = fm.shapes_split("test", 200, 32, seed=2)
    assert fm.alignment(data["images"], data["labels"]) >= 0.99
    wrong = (data["labels"] + 1) % 21  # the next color (or shape): never the rendered pair
    assert fm.alignment(data["images"], wrong) <= 0.01


def test_diversity_is_zero_for_copies_and_grows_with_spread():
    data = fm.shapes_split("train", 40, 16, seed=0)
    images = data["images"]
    same = np.repeat(images[:1], 6, axis=0)
    assert fm.diversity(same, np.zeros(6, np.int64)) == 0.0
    assert fm.diversity(images[:6], np.zeros(6, np.int64)) > 0.05
    # separate classes are never compared with each other
    assert fm.diversity(np.concatenate([same[:3], images[10:11].repeat(3, 0)]), np.array([0, 0, 0, 1, 1, 1])) == 0.0


# ---------------------------------------------------------------- learning


def test_overfits_two_images_and_samples_each_from_its_label():
    torch.manual_seed(0)
    data = fm.shapes_split("train", 2, 16, seed=0)
    x1, y = fm.images_to_tensor(data["images"]).repeat(8, 1, 1, 1), torch.as_tensor(data["labels"]).repeat(8)
    model = fm.build_model(fm.Config(**fm.PRESETS["tiny"]), 21)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = gen(0)
    for _ in range(300):
        x0, t = torch.randn(x1.shape, generator=g), torch.rand(len(x1), generator=g)
        loss = fm.cfm_loss(lambda x, tt: model(x, 1000 * tt, y), x0, x1, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out, _, _ = fm.ode_sample(fm.guided_velocity(model.eval(), y[:4], 0.0, 21, 1000.0),
                                  torch.randn(4, 3, 16, 16, generator=g), 20, "heun")
    own = (out - x1[:4]).pow(2).mean((1, 2, 3))
    other = (out - x1[:4].roll(1, 0)).pow(2).mean((1, 2, 3))
    assert bool((own < 0.05).all() and (own < other / 2).all()), (own, other)


class PointVelocity(torch.nn.Module):
    """v(x, t) for 2-D points."""

    def __init__(self, hidden=64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.SiLU(), torch.nn.Linear(hidden, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None]], 1))


def _fit(model, draw_pairs, g, steps=1500):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x0, x1 = draw_pairs(256)
        loss = fm.cfm_loss(model, x0, x1, torch.rand(256, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_reflow_straightens_a_learned_two_mode_flow_so_one_euler_step_suffices():
    """Liu et al.: retraining on the flow's own couplings removes the crossing of straight paths."""
    torch.manual_seed(0)
    g = gen(0)
    centres = torch.tensor([[3.0, 3.0], [-3.0, -3.0]])

    def data_pairs(n):
        x1 = centres[torch.randint(2, (n,), generator=g)] + 0.3 * torch.randn(n, 2, generator=g)
        return torch.randn(n, 2, generator=g), x1

    flow = _fit(PointVelocity(), data_pairs, g)
    z = torch.randn(512, 2, generator=g)

    def straightness_and_one_step_error(model):
        with torch.no_grad():
            fine, _, traj = fm.ode_sample(model, z, 100, "euler", return_trajectory=True)
            one, _, _ = fm.ode_sample(model, z, 1, "euler")
        return fm.path_straightness(traj), (one - fine).norm(dim=1).mean().item()

    with torch.no_grad():
        p0, p1 = fm.reflow_pairs(flow, torch.randn(4096, 2, generator=g), 100, "euler")

    def coupled_pairs(n):
        i = torch.randint(len(p0), (n,), generator=g)
        return p0[i], p1[i]

    rectified = _fit(copy.deepcopy(flow), coupled_pairs, g)
    (gap, err), (gap_re, err_re) = straightness_and_one_step_error(flow), straightness_and_one_step_error(rectified)
    assert gap > 5e-3 and gap_re < gap / 5, (gap, gap_re)
    assert err_re < err / 3, (err, err_re)


# ---------------------------------------------------------------- checkpoint and resume


def test_resume_inside_the_reflow_pass_equals_the_uninterrupted_run_bitwise(tmp_path):
    """The contract resumes inside flow matching; here the run stops inside the reflow pass, whose
    teacher and couplings must come back from the checkpoint."""
    stop = 6  # flow matching: steps 1-4, reflow: 5-8
    common = ["--max_steps", 4, "--reflow_steps", 4, "--log_every", 1, "--eval_nfe", 1, "--eval_solvers", "euler"]
    fm.main(tiny_args(tmp_path / "a", *common, "--stop_step", stop))
    fm.main(tiny_args(tmp_path / "a", *common, "--resume", tmp_path / "a" / "ckpt.pt"))
    fm.main(tiny_args(tmp_path / "b", *common))
    resumed = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    straight = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 8
    for key in ("model", "ema", "teacher"):
        for name, tensor in straight[key].items():
            assert torch.equal(resumed[key][name], tensor), (key, name)
    losses = lambda p: [r["loss"] for r in map(json.loads, open(p / "log.jsonl")) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_eval_only_takes_the_model_from_the_checkpoint_and_the_sampler_from_the_flags(tmp_path, capsys):
    fm.main(tiny_args(tmp_path, "--base_channels", 16))
    again = fm.main(tiny_args(tmp_path / "eval", "--eval_only", 1, "--resume", tmp_path / "ckpt.pt",
                              "--eval_nfe", "3,6", "--eval_solvers", "midpoint", "--eval_ws", "0,3"))
    assert [(r["solver"], r["nfe"]) for r in again["nfe_sweep"]] == [("midpoint", 6)]  # 3 is no multiple of 2
    assert [r["w"] for r in again["cfg_sweep"]] == [None, 0.0, 3.0]  # None: the real test images
    assert "| w | alignment | diversity |" in capsys.readouterr().out
    for name in ("samples.png", "cfg_sweep.png", "nfe_sweep.png"):
        assert (tmp_path / "eval" / name).exists()


# ---------------------------------------------------------------- CLI


def test_cli_trains_on_a_real_npz_file_and_samples_follow_the_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    images = (labels[:, None, None, None] * 200 + rng.integers(0, 30, (80, 8, 8, 1))).astype(np.uint8)  # dark or bright
    np.savez(tmp_path / "two.npz", images=images, labels=labels, class_names=np.array(["dark", "bright"]))
    metrics = fm.main(["--preset", "tiny", "--data", str(tmp_path / "two.npz"), "--image_size", "8",
                       "--max_steps", "150", "--batch_size", "16", "--lr", "3e-3", "--eval_per_class", "4",
                       "--out_dir", str(tmp_path / "o")])
    assert "alignment" not in metrics and (tmp_path / "o" / "samples.png").exists()
    model = fm.build_model(fm.Config(**{**fm.PRESETS["tiny"], "image_size": 8}), 2, in_channels=1)
    model.load_state_dict(torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["ema"])
    rt = fm.Runtime(torch.device("cpu"), None, False)
    cfg = fm.Config(**{**fm.PRESETS["tiny"], "image_size": 8})
    noise = torch.randn(8, 1, 8, 8, generator=gen(0))
    samples, _, _ = fm.sample_images(model, torch.tensor([0] * 4 + [1] * 4), noise, cfg, rt, 0.0, "heun", 8)
    dark, bright = samples[:4].mean(), samples[4:].mean()
    assert dark < 60 and bright > 150, (dark, bright)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("flags, message", [
    (["--num_levels", 3, "--image_size", 18], "--image_size 18 is not divisible by the U-Net's downsampling factor"),
    (["--num_heads", 3], "--num_heads 3 does not divide"),
    (["--solver", "rk45"], "solver 'rk45'"),
    (["--eval_solvers", "euler,dopri"], "solver 'dopri'"),
    (["--t_schedule", "beta"], "--t_schedule beta: expected uniform or logit_normal"),
    (["--eval_nfe", "1,two"], "--eval_nfe '1,two': expected a comma-separated list of int"),
    (["--eval_nfe", "0,4"], "every --eval_nfe entry must be >= 1"),
    (["--p_uncond", 1.5], "--p_uncond 1.5: expected a finite number in"),
    (["--batch_size", 512], "--batch_size 512 is larger than the 128 training images"),
    (["--eval_only", 1], "--eval_only 1 needs --resume"),
])
def test_bad_flags_are_one_clear_error(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        fm.main(tiny_args(tmp_path, *flags))


def test_an_npz_without_labels_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="a class-conditional flow needs a 'labels' array"):
        fm.main(tiny_args(tmp_path, "--data", tmp_path / "bad.npz", "--image_size", 8))


# ---------------------------------------------------------------- slow: compile and DDP


@pytest.mark.slow
def test_two_processes_through_a_reflow_pass_give_the_single_process_loss_curve(tmp_path):
    """The contract's DDP run has no reflow; the couplings must be the same on every rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = tiny_args(tmp_path / "ddp", "--max_steps", 4, "--reflow_steps", 2, "--log_every", 1, "--device", "cpu")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "flow_matching.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    fm.main(tiny_args(tmp_path / "one", "--max_steps", 4, "--reflow_steps", 2, "--log_every", 1, "--device", "cpu"))
    read = lambda p: [r["loss"] for r in map(json.loads, open(p / "log.jsonl")) if "loss" in r]  # noqa: E731
    assert json.loads(open(tmp_path / "ddp" / "log.jsonl").readline())["world_size"] == 2
    # the reflow losses are ~1e-4, where all-reduce summation order shows in the last digits
    np.testing.assert_allclose(read(tmp_path / "ddp"), read(tmp_path / "one"), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- GPU only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_bf16_compiled_training_and_sampling_on_cuda(tmp_path):
    metrics = fm.main(tiny_args(tmp_path, "--device", "cuda", "--max_steps", 4, "--reflow_steps", 2))
    assert np.isfinite(metrics["final_loss"]) and 0 <= metrics["alignment"] <= 1
    start = json.loads(open(tmp_path / "log.jsonl").readline())
    assert start["device"].startswith("cuda")


@cuda
def test_bf16_autocast_velocity_close_to_fp32_on_cuda():
    model = untrained_unet(fm.Config()).cuda().eval()
    x, t, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.rand(8, device="cuda") * 1000, torch.arange(8, device="cuda")
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x, t, y).float()
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


@cuda
def test_noise_draws_on_cuda_are_reproducible_per_step(tmp_path):
    a = fm.main(tiny_args(tmp_path / "a", "--device", "cuda", "--compile", 0, "--dtype", "float32", "--max_steps", 3))
    b = fm.main(tiny_args(tmp_path / "b", "--device", "cuda", "--compile", 0, "--dtype", "float32", "--max_steps", 3))
    assert a["final_loss"] == b["final_loss"]
