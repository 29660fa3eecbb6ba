"""sd3_mini.py: shapes, the timestep shift and the rest of SD3's math, the MM-DiT's laws, exact
sampler oracles, learning, loading clip.py / vqvae.py checkpoints, resume at the stage boundary,
CLI, bad inputs, GPU. Order as in DESIGN.md section 7; the shared contract is tests/test_contract.py."""

import functools
import math
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sd3_mini as sd3

ROOT = pathlib.Path(__file__).resolve().parent.parent

seeds = st.integers(0, 2**31 - 1)
times = st.floats(1e-4, 1 - 1e-4)
shifts = st.floats(0.1, 10.0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny_cfg(**overrides):
    return sd3.Config(**{**sd3.PRESETS["tiny"], **overrides})


def tiny_args(out_dir, *extra):
    return ["--preset", "tiny", "--out_dir", str(out_dir), *map(str, extra)]


def perturbed(module, seed, scale=0.1):
    """The module with every weight moved off its initialisation (zero gates included)."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def caption_ids(texts, context_length=56):
    return sd3.tokenize(sd3.ByteTokenizer(), texts, context_length)


def exact_velocity_of_one_point(z, t, x0):
    """The optimal velocity when the data is the single point x0: E[eps - x_0 | z_t = z] = (z - x_0) / t."""
    return (z - x0) / t.reshape(-1, *([1] * (z.dim() - 1)))


# ---------------------------------------------------------------- shapes and dtypes

def test_flow_model_maps_latents_times_and_captions_to_a_velocity_of_the_same_shape():
    cfg = tiny_cfg()
    model = perturbed(sd3.build_model(cfg, 3), 0)
    z = torch.randn(3, cfg.latent_channels, 4, 4)
    v = model(z, torch.tensor([0.0, 0.5, 1.0]), caption_ids(["a red circle", "", "there is a large shape at the top"]))
    assert v.shape == z.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize("solver, steps, nfe", [("euler", 3, 3), ("heun", 3, 5), ("heun", 1, 1)])
def test_sampler_returns_uint8_images_and_counts_every_function_evaluation(solver, steps, nfe):
    cfg = tiny_cfg()
    model, ae = perturbed(sd3.build_model(cfg, 3), 0), sd3.build_autoencoder(cfg, 3)
    rt = sd3.Runtime(torch.device("cpu"), None, False)
    images, counted = sd3.sample_images(model, ae, (0.0, 1.0), ["a red circle", "a blue square"],
                                        torch.randn(2, cfg.latent_channels, 4, 4), cfg, rt, 2.0, solver, steps)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert counted == nfe == (steps if solver == 'euler' else 2 * steps - 1)


# ---------------------------------------------------------------- the timestep shift (hypothesis)

def logit(t):
    return math.log(t / (1 - t))


@given(times, shifts)
def test_shift_adds_log_s_to_the_logit_of_the_time(t, s):
    assert logit(sd3.shift_time(t, s)) == pytest.approx(logit(t) + math.log(s), abs=1e-9)


@given(times, shifts, shifts)
def test_shifts_compose_by_multiplying_their_factors(t, a, b):
    assert sd3.shift_time(sd3.shift_time(t, b), a) == pytest.approx(sd3.shift_time(t, a * b), rel=1e-9, abs=1e-12)


@given(times, shifts)
def test_shift_by_one_over_s_inverts_the_shift_and_the_ends_stay_fixed(t, s):
    assert sd3.shift_time(sd3.shift_time(t, s), 1 / s) == pytest.approx(t, rel=1e-9)
    assert sd3.shift_time(0.0, s) == 0.0 and sd3.shift_time(1.0, s) == pytest.approx(1.0, abs=1e-15)


@given(st.integers(1, 200), shifts)
def test_the_last_nonzero_time_of_a_shifted_schedule_is_the_shift_of_one_over_n(n, s):
    """The grid is shifted once: no double shift (diffusers issue #13243)."""
    schedule = sd3.sigma_schedule(n, s)
    assert len(schedule) == n + 1 and schedule[0] == pytest.approx(1.0) and schedule[-1] == 0.0
    assert (schedule[1:] < schedule[:-1]).all()
    assert schedule[-2].item() == pytest.approx(sd3.shift_time(1.0 / n, s), rel=1e-12)


# ---------------------------------------------------------------- the MM-DiT's laws (hypothesis)

@given(seeds, st.integers(1, 6), st.integers(1, 9))
def test_an_adaln_zero_block_at_initialisation_is_the_identity_on_both_streams(seed, L, N):
    torch.manual_seed(seed % 1000)
    block = sd3.MMDiTBlock(16, 2, 2.0)
    g = gen(seed)
    ctx, img, c = torch.randn(2, L, 16, generator=g), torch.randn(2, N, 16, generator=g), torch.randn(2, 16, generator=g)
    ctx_out, img_out = block(ctx, img, c)
    assert torch.equal(ctx_out, ctx) and torch.equal(img_out, img)


@given(seeds, st.integers(1, 6), st.integers(1, 9))
def test_joint_attention_equals_one_attention_over_the_concatenated_sequence(seed, L, N):
    g = gen(seed)
    q, k, v = (torch.randn(2, 2, L + N, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, L, generator=g) < 0.7
    mask[:, 0] = True
    out_c, out_i = sd3.joint_attention(q, k, v, L, mask)
    full_mask = torch.cat([mask, torch.ones(2, N, dtype=torch.bool)], 1)[:, None, None, :]
    reference, _ = sd3.attention_reference(q, k, v, full_mask)
    assert out_c.shape == (2, 2, L, 8) and out_i.shape == (2, 2, N, 8)
    torch.testing.assert_close(torch.cat([out_c, out_i], dim=2), reference)


def test_a_block_attends_over_both_streams_with_each_streams_own_weights():
    """The block's image update equals the one computed by hand: each stream's own QKV, one
    softmax over all L + N keys, the image stream's own projection."""
    block = perturbed(sd3.MMDiTBlock(16, 2, 2.0), 1).double()
    g = gen(2)
    ctx, img, c = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((1, 3, 16), (1, 4, 16), (1, 16)))
    qc, kc, vc, _ = block.context.pre_attention(ctx, c)
    qi, ki, vi, mod = block.image.pre_attention(img, c)
    scores = torch.cat([qi @ kc.transpose(-1, -2), qi @ ki.transpose(-1, -2)], -1) / math.sqrt(8)  # image queries
    out_i = scores.softmax(-1) @ torch.cat([vc, vi], dim=2)
    torch.testing.assert_close(block(ctx, img, c)[1], block.image.post_attention(img, out_i, mod))
    assert block.context.qkv.weight.data_ptr() != block.image.qkv.weight.data_ptr()


@given(seeds, st.integers(2, 7))
def test_permuting_text_tokens_permutes_their_outputs_and_leaves_image_outputs_unchanged(seed, L):
    torch.manual_seed(seed % 1000)
    block = perturbed(sd3.MMDiTBlock(16, 2, 2.0), seed).double()
    g = gen(seed)
    ctx, img, c = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((2, L, 16), (2, 5, 16), (2, 16)))
    perm = torch.randperm(L, generator=g)
    ctx_out, img_out = block(ctx, img, c)
    ctx_perm, img_perm = block(ctx[:, perm], img, c)
    torch.testing.assert_close(ctx_perm, ctx_out[:, perm])
    torch.testing.assert_close(img_perm, img_out)


def test_the_velocity_does_not_depend_on_the_padding_after_a_caption():
    """Padding is masked out of both encoders and of the joint attention, so cutting a batch to
    its longest caption changes nothing."""
    cfg = tiny_cfg()
    model = perturbed(sd3.build_model(cfg, 3), 3)
    ids = caption_ids(["a red circle", "a blue square at the top"])
    longer = torch.nn.functional.pad(ids, (0, 9), value=sd3.ByteTokenizer.pad_id)
    z, t = torch.randn(2, 4, 4, 4, generator=gen(0)), torch.tensor([0.3, 0.8])
    torch.testing.assert_close(model(z, t, longer), model(z, t, ids), rtol=1e-5, atol=1e-6)


def test_the_condition_reads_clips_penultimate_tokens_and_its_pooled_vector_in_one_pass():
    model = perturbed(sd3.build_model(tiny_cfg(clip_depth=2), 3), 4)
    ids = caption_ids(["a red circle", "something cyan in the bottom left"])
    context, pooled, _ = model.condition(ids)
    torch.testing.assert_close(pooled, model.clip_text(ids))
    clip_part = sd3.text_context([model.clip_text.tokens(ids, -1)], [ids != 256], model.context_width, model.text_patch)[0]
    torch.testing.assert_close(context[:, :clip_part.shape[1]], clip_part)


# ---------------------------------------------------------------- rectified flow in SD3's convention

@given(seeds, times)
def test_the_target_is_the_time_derivative_of_the_path(seed, t):
    g = gen(seed)
    x0, eps = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    t, h = torch.full((3,), t, dtype=torch.float64), 1e-6
    derivative = (sd3.rf_path(x0, eps, t + h) - sd3.rf_path(x0, eps, t - h)) / (2 * h)  # exact for a straight path
    torch.testing.assert_close(derivative, sd3.rf_target(x0, eps))
    torch.testing.assert_close(sd3.rf_path(x0, eps, torch.zeros(3, dtype=torch.float64)), x0)
    torch.testing.assert_close(sd3.rf_path(x0, eps, torch.ones(3, dtype=torch.float64)), eps)


@given(seeds, times)
def test_sd3_time_is_the_lectures_time_reversed_and_its_velocity_the_negative(seed, t):
    fm = pytest.importorskip("flow_matching")
    g = gen(seed)
    x0, eps = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    t = torch.full((2,), t)
    torch.testing.assert_close(sd3.rf_path(x0, eps, t), fm.interpolate(eps, x0, 1 - t))
    torch.testing.assert_close(sd3.rf_target(x0, eps), -fm.cfm_target(eps, x0))


@given(seeds, st.integers(1, 40), shifts, st.sampled_from(sd3.SOLVERS))
def test_the_exact_velocity_of_one_data_point_makes_the_solver_land_on_it_for_any_n(seed, n, s, solver):
    g = gen(seed)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    z, nfe = sd3.sample_flow(lambda z, t: exact_velocity_of_one_point(z, t, x0), noise, sd3.sigma_schedule(n, s), solver)
    torch.testing.assert_close(z, x0)
    assert nfe == (n if solver == 'euler' else 2 * n - 1)


def test_rf_loss_is_zero_for_the_exact_velocity_of_one_point():
    g = gen(5)
    x0, eps, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.rand(4, generator=g)
    assert sd3.rf_loss(lambda z, tt: exact_velocity_of_one_point(z, tt, x0), x0, eps, t).item() < 1e-10


@given(seeds, st.floats(-3, 3), st.floats(0.1, 5))
def test_latent_shift_and_scale_give_zero_mean_and_unit_variance_on_the_data_they_were_measured_on(seed, loc, scale):
    z = loc + scale * torch.randn(50, 4, 3, 3, generator=gen(seed))
    stats = sd3.latent_stats(z)
    normalised = sd3.to_latent(z, stats).double()
    assert abs(normalised.mean().item()) < 1e-5 and normalised.std().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(sd3.from_latent(sd3.to_latent(z, stats), stats), z)


# ---------------------------------------------------------------- guidance and text dropout

@functools.lru_cache(maxsize=1)
def tiny_flow_model():
    torch.manual_seed(0)
    return perturbed(sd3.build_model(tiny_cfg(), 3), 8)


@given(seeds, st.floats(0.5, 8))
def test_guidance_with_zero_weight_is_the_conditional_velocity_and_w_mixes_two_calls(seed, w):
    model = tiny_flow_model()
    ids = caption_ids(["a red circle", "a green square on the left"])
    cond, null = model.condition(ids), model.condition(model.null_ids[:, :ids.shape[1]])
    g = gen(seed)
    z, t = torch.randn(2, 4, 4, 4, generator=g), torch.rand(2, generator=g)
    v_cond = model.dit(z, t, *cond)
    torch.testing.assert_close(sd3.guided_velocity(model.dit, cond, null, 0.0)(z, t), v_cond)
    v_null = model.dit(z, t, *(x.expand(2, *x.shape[1:]) for x in null))
    torch.testing.assert_close(sd3.guided_velocity(model.dit, cond, null, w)(z, t), (1 + w) * v_cond - w * v_null,
                               rtol=1e-4, atol=1e-5)


def test_text_dropout_replaces_only_the_dropped_encoders_by_their_output_for_the_empty_prompt():
    cfg = tiny_cfg(clip_dim=32, t5_dim=32)
    model = perturbed(sd3.build_model(cfg, 3), 6)
    ids = caption_ids(["a red circle", "a blue square", "a white triangle", "a large shape"])
    keep_clip, keep_t5 = torch.tensor([True, False, True, False]), torch.tensor([True, True, False, False])
    clip_ids, t5_ids = sd3.drop_text(ids, model.null_ids, keep_clip, keep_t5)
    context, pooled, _ = model.condition(clip_ids, t5_ids)
    full, full_pooled, _ = model.condition(ids)
    empty, empty_pooled, _ = model.condition(model.null_ids[:, :ids.shape[1]].expand_as(ids))
    half = context.shape[1] // 2  # [CLIP patches | T5 patches]
    for row in range(4):
        clip_ref = (full if keep_clip[row] else empty)[row, :half], (full_pooled if keep_clip[row] else empty_pooled)[row]
        t5_ref = (full if keep_t5[row] else empty)[row, half:]
        torch.testing.assert_close(context[row, :half], clip_ref[0])
        torch.testing.assert_close(pooled[row], clip_ref[1])
        torch.testing.assert_close(context[row, half:], t5_ref)


# ---------------------------------------------------------------- learning

def test_overfits_two_captioned_images_and_samples_each_from_its_caption():
    """Pixel space, 8 px: after a short fit, Euler from fresh noise lands nearer the image of the
    caption asked for than the other one, for both captions."""
    torch.manual_seed(0)
    model = sd3.build_model(tiny_cfg(space="pixel", image_size=8, patch_size=2), 3)
    x = sd3.images_to_tensor(sd3.render_shapes(np.array([[0, 0, 1, 4], [1, 2, 1, 4]]), np.zeros((2, 2)), 8))
    ids = caption_ids(["a red circle", "a blue square"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g, pick = gen(0), torch.arange(16) % 2
    for _ in range(300):
        eps, t = torch.randn(16, 3, 8, 8, generator=g), torch.rand(16, generator=g)
        sd3.rf_loss(lambda z, tt: model(z, tt, ids[pick]), x[pick], eps, t).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        velocity = sd3.guided_velocity(model.dit, model.condition(ids), None, 0.0)
        z, _ = sd3.sample_flow(velocity, torch.randn(2, 3, 8, 8, generator=g), sd3.sigma_schedule(8, 1.0))
    distance = torch.cdist(z.flatten(1), x.flatten(1))  # (sample, image)
    assert distance[0, 0] < distance[0, 1] and distance[1, 1] < distance[1, 0], distance


# ---------------------------------------------------------------- other files' checkpoints

@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    clip = pytest.importorskip("clip")
    out = tmp_path_factory.mktemp("clip-tiny")
    clip.main(["--preset", "tiny", "--out_dir", str(out)])
    return out / "ckpt.pt"


def test_loading_a_clip_checkpoint_maps_every_text_tower_key(clip_checkpoint):
    arch, state = sd3.load_clip_text_tower(str(clip_checkpoint), 56)
    saved = torch.load(clip_checkpoint, weights_only=True)
    tower_keys = {k for k in saved["model"] if k.startswith("text_encoder.")}
    assert {f"text_encoder.{k}" for k in state} == tower_keys
    tower = sd3.TextEncoder(**arch)
    tower.load_state_dict(state)  # strict: every key of the tower is there and fits
    for k, v in tower.state_dict().items():
        assert torch.equal(v, saved["model"][f"text_encoder.{k}"]), k
    assert arch["dim"] == saved["config"]["text_dim"] and arch["embed_dim"] == saved["config"]["embed_dim"]


def test_a_run_with_clip_init_keeps_the_loaded_tower_frozen(clip_checkpoint, tmp_path):
    sd3.main(tiny_args(tmp_path, "--clip_init", clip_checkpoint))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    saved = torch.load(clip_checkpoint, weights_only=True)["model"]
    for key in ("model", "ema"):
        tower = {k[len("clip_text."):]: v for k, v in ckpt[key].items() if k.startswith("clip_text.")}
        assert tower and all(torch.equal(v, saved[f"text_encoder.{k}"]) for k, v in tower.items())
    assert ckpt["clip_arch"]["dim"] == 32  # clip.py's tiny tower, not this file's flags


def test_a_clip_checkpoint_with_a_missing_key_is_one_clear_error(clip_checkpoint, tmp_path):
    saved = torch.load(clip_checkpoint, weights_only=True)
    del saved["model"]["text_encoder.ln_final.weight"]
    torch.save(saved, tmp_path / "cut.pt")
    with pytest.raises(sd3.InputError, match=r"--clip_init .*cut.pt: the weights do not fit \(missing \['ln_final.weight'\]"):
        sd3.load_clip_text_tower(str(tmp_path / "cut.pt"), 56)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3-tiny")
    sd3.main(tiny_args(out))
    return out / "ckpt.pt"


@pytest.mark.parametrize("stage", ["autoencoder", "clip"])
def test_resume_at_the_end_of_a_stage_equals_the_uninterrupted_run(tiny_run, tmp_path, stage):
    """The README's two commands stop at the end of stage 1b; a run stopped before the flow's first
    step reports no alignment and cannot be evaluated (there is no flow to sample from yet), and
    the second command's metrics keep stage 1b's zero-shot check."""
    boundary = sd3.PRESETS["tiny"]["ae_steps"] + (sd3.PRESETS["tiny"]["clip_steps"] if stage == "clip" else 0)
    first = sd3.main(tiny_args(tmp_path, "--stop_step", boundary))
    assert "alignment" not in first and ("clip_zero_shot" in first) == (stage == "clip")
    with pytest.raises(SystemExit, match="before the flow; resume training without --eval_only first"):
        sd3.main(tiny_args(tmp_path / "eval", "--eval_only", 1, "--resume", tmp_path / "ckpt.pt"))
    second = sd3.main(tiny_args(tmp_path, "--resume", tmp_path / "ckpt.pt"))
    assert "alignment" in second and second["clip_zero_shot"] == torch.load(tiny_run, weights_only=True)["clip_zero_shot"]
    a, b = torch.load(tmp_path / "ckpt.pt", weights_only=True), torch.load(tiny_run, weights_only=True)
    assert a["latent_stats"] == b["latent_stats"]
    for key in ("model", "ema", "autoencoder", "latent_clip"):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key


def test_stage_1b_trains_the_clip_text_tower_and_the_flow_keeps_it_frozen(tiny_run, tmp_path):
    """Stage 1b's text tower is the flow model's (and its EMA's) CLIP tower, unchanged by the flow
    steps; stage 1b did train it; the T5-role encoder and the MM-DiT train in the flow."""
    sd3.main(tiny_args(tmp_path, "--stop_step", sd3.PRESETS["tiny"]["ae_steps"]))
    before = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # the end of stage 1
    after = torch.load(tiny_run, weights_only=True)
    trained = {k[len("text_encoder."):]: v for k, v in after["latent_clip"].items() if k.startswith("text_encoder.")}
    for key in ("model", "ema"):
        tower = {k[len("clip_text."):]: v for k, v in after[key].items() if k.startswith("clip_text.")}
        assert tower.keys() == trained.keys() and all(torch.equal(v, trained[k]) for k, v in tower.items()), key
    assert not all(torch.equal(v, before["latent_clip"][k]) for k, v in after["latent_clip"].items())
    for prefix in ("t5_text.", "dit."):
        assert not all(torch.equal(v, before["model"][k]) for k, v in after["model"].items() if k.startswith(prefix))


def test_clip_init_from_this_files_checkpoint_loads_its_stage_1b_tower_and_refuses_an_earlier_one(tiny_run, tmp_path):
    """The ablations rerun the flow on the default run's frozen tower: --clip_init (and --ae_init) of
    a checkpoint of this file skip stages 1b (and 1); a checkpoint from before stage 1b ended has
    no pretrained tower yet, which is one clear error."""
    metrics = sd3.main(tiny_args(tmp_path / "again", "--clip_init", tiny_run, "--ae_init", tiny_run))
    a, b = torch.load(tiny_run, weights_only=True), torch.load(tmp_path / "again" / "ckpt.pt", weights_only=True)
    assert b["step"] == sd3.PRESETS["tiny"]["max_steps"] and "clip_zero_shot" not in metrics
    tower = {k: v for k, v in b["model"].items() if k.startswith("clip_text.")}
    assert tower and all(torch.equal(v, a["model"][k]) for k, v in tower.items())
    sd3.main(tiny_args(tmp_path / "early", "--stop_step", sd3.PRESETS["tiny"]["ae_steps"] + 1))
    with pytest.raises(sd3.InputError, match="no pretrained CLIP tower yet"):
        sd3.load_clip_text_tower(str(tmp_path / "early" / "ckpt.pt"), 56)


def test_zero_shot_accuracy_reads_labels_as_shape_times_seven_plus_color():
    """With an image tower that returns the text embedding of each latent's own caption, every
    latent is classified right, and with the labels reversed (each one another pair's) none is."""
    cfg = tiny_cfg()
    clip = sd3.build_latent_clip(cfg, 3)
    names = [f"a {color} {shape}" for shape in sd3.SHAPES for color in sd3.COLOR_NAMES]
    table = clip.text_encoder(caption_ids(names)).detach()  # (21, E)

    class OwnCaption(torch.nn.Module):  # a "latent" is its label in the first value
        def forward(self, z):
            return table[z[:, 0, 0, 0].long()]

    clip.image_encoder = OwnCaption()
    labels = np.array([0, 6, 7, 13, 20, 11])
    latents = torch.zeros(len(labels), 4, 2, 2)
    latents[:, 0, 0, 0] = torch.as_tensor(labels, dtype=torch.float32)
    assert sd3.zero_shot_accuracy(clip, latents, labels, 56) == 1.0
    assert sd3.zero_shot_accuracy(clip, latents, labels[::-1].copy(), 56) == 0.0


@given(st.integers(1, 6), st.integers(2, 12).map(lambda n: 2 * n))
def test_sincos_positions_embed_the_row_in_the_first_half_and_the_column_in_the_second(grid, dim):
    table = sd3.sincos_2d(grid, dim).view(grid, grid, dim)  # (row, column, D)
    index = sd3.timestep_embedding(torch.arange(grid), dim // 2)  # (grid, D/2): the sin-cos of 0..grid-1
    assert torch.allclose(table[:, :, :dim // 2], index[:, None].expand(grid, grid, -1))  # depends on the row only
    assert torch.allclose(table[:, :, dim // 2:], index[None].expand(grid, grid, -1))  # on the column only


def test_ae_init_from_a_checkpoint_of_this_file_skips_stage_one_and_keeps_the_autoencoder(tiny_run, tmp_path):
    sd3.main(tiny_args(tmp_path, "--ae_init", tiny_run))
    a, b = torch.load(tiny_run, weights_only=True), torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert b["step"] == sd3.PRESETS["tiny"]["clip_steps"] + sd3.PRESETS["tiny"]["max_steps"]  # no autoencoder steps
    assert all(torch.equal(v, a["autoencoder"][k]) for k, v in b["autoencoder"].items())


def test_ae_init_loads_every_key_of_a_vqvae_gaussian_autoencoder_and_names_the_flags_that_differ(tmp_path):
    vqvae = pytest.importorskip("vqvae")
    vqvae.main(["--preset", "tiny", "--bottleneck", "gaussian", "--max_steps", "1", "--out_dir", str(tmp_path)])
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    flags = dict(ae_channels=saved["config"]["channels"], ae_max_mult=saved["config"]["max_mult"],
                 latent_channels=saved["config"]["latent_dim"], downsample=saved["config"]["downsample"])
    ae = sd3.build_autoencoder(tiny_cfg(**flags), 3)
    ae.load_state_dict(sd3.load_autoencoder_state(str(tmp_path / "ckpt.pt"), tiny_cfg(**flags), 3))
    assert all(torch.equal(v, saved["model"][k]) for k, v in ae.state_dict().items())
    with pytest.raises(sd3.InputError, match=f"pass .*--latent_channels {flags['latent_channels']}"):
        sd3.load_autoencoder_state(str(tmp_path / "ckpt.pt"), tiny_cfg(**{**flags, "latent_channels": 3}), 3)


# ---------------------------------------------------------------- CLI on a real .npz, bad inputs

def test_cli_trains_on_a_grayscale_npz_with_captions_and_writes_samples(tmp_path):
    g = np.random.default_rng(0)
    images = (g.random((40, 16, 16, 1)) * 255).astype(np.uint8)
    captions = np.array([f"digit {i % 10}" for i in range(40)])
    np.savez(tmp_path / "digits.npz", images=images, captions=captions)
    metrics = sd3.main(tiny_args(tmp_path / "out", "--data", tmp_path / "digits.npz"))
    assert (tmp_path / "out" / "samples.png").exists() and "psnr_db" in metrics["reconstruction"]
    assert metrics["alignment"] == {}  # the detector reads only the shapes world


@pytest.mark.parametrize("flags, message", [
    (["--space", "latents"], "--space latents: expected latent or pixel"),
    (["--downsample", "3"], "--downsample 3: expected a power of 2"),
    (["--image_size", "20"], "--image_size 20 is not divisible by --downsample x --patch_size = 8"),
    (["--solver", "rk4"], "solver 'rk4' (--solver, --eval_solvers)"),
    (["--t_schedule", "cosine"], "--t_schedule cosine: expected logit_normal or uniform"),
    (["--pos_embed", "rope"], "--pos_embed rope: expected sincos or learned"),
    (["--ae_steps", "0"], "--ae_steps 0 leaves the latent space untrained"),
    (["--context_length", "20"], "--context_length 20: a text of"),
    (["--clip_init", "missing.pt"], "--clip_init missing.pt: no such file"),
    (["--ae_init", "missing.pt"], "--ae_init missing.pt: no such file"),
    (["--clip_batch_size", "1000"], "--clip_batch_size 1000 is larger than the 128 training pairs"),
])
def test_bad_flags_are_one_clear_error(tmp_path, flags, message):
    with pytest.raises(SystemExit) as e:
        sd3.main(tiny_args(tmp_path, *flags))
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code), e.value.code


def test_an_npz_without_captions_and_an_ae_init_of_another_model_are_clear_errors(tmp_path):
    np.savez(tmp_path / "plain.npz", images=np.zeros((20, 16, 16, 3), np.uint8))
    with pytest.raises(SystemExit, match="needs a 'captions' array"):
        sd3.main(tiny_args(tmp_path, "--data", tmp_path / "plain.npz"))
    torch.save({"model_name": "vit", "config": {}, "model": {}}, tmp_path / "vit.pt")
    with pytest.raises(SystemExit, match=r"--ae_init .*vit.pt: a checkpoint of 'vit'; expected vqvae.py or sd3_mini.py"):
        sd3.main(tiny_args(tmp_path, "--ae_init", tmp_path / "vit.pt"))


# ---------------------------------------------------------------- GPU only

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_velocity_is_close_to_fp32_on_cuda():
    cfg = tiny_cfg()
    model = perturbed(sd3.build_model(cfg, 3), 7).cuda()
    ids = caption_ids(["a red circle", "a blue square"]).cuda()
    z, t = torch.randn(2, 4, 4, 4, device="cuda"), torch.tensor([0.2, 0.7], device="cuda")
    v32 = model(z, t, ids)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        v16 = model(z, t, ids).float()
    assert (v16 - v32).norm() / v32.norm() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_compiled_tiny_run_trains_and_samples_on_cuda(tmp_path):
    metrics = sd3.main(tiny_args(tmp_path, "--device", "cuda", "--compile", "1"))
    assert math.isfinite(metrics["final_loss"]) and (tmp_path / "samples.png").exists()
