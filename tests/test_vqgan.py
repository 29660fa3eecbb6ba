"""vqgan.py: the tokenizer's shapes, the VQ-GAN losses (hinge, the two players' gradients, the
adaptive weight, the perceptual term), the joint vocabulary and its logit mask, the sampler's
layout and cache, learning, the CLI on real images, bad inputs, GPU."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import vqgan as vg

TINY = vg.Config(**vg.PRESETS["tiny"])
N_IMG = (TINY.image_size // TINY.downsample) ** 2
L = TINY.context_length


def tiny_args(out_dir, *extra):
    return ["--preset", "tiny", "--out_dir", str(out_dir), *map(str, extra)]


def tokenizer_and_disc(seed=0):
    torch.manual_seed(seed)
    model, disc = vg.build_model(TINY), vg.build_discriminator(TINY)
    model.bottleneck.initialised.fill_(True)  # no k-means draw: the forward is a pure function
    return model, disc


def random_prior(seed, dtype=torch.float64, scale=0.3):
    """The tiny prior with every parameter drawn from a local generator (any parameters)."""
    prior = vg.build_prior(TINY).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prior.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * scale)
    return prior.eval()


def images(seed, n=4, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- shapes and dtypes

def test_tokenizer_maps_images_to_a_grid_of_codes_and_back_to_images():
    model, disc = tokenizer_and_disc()
    x = images(0)
    x_hat, terms = model(x)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    codes = model.encode(x)
    assert codes.shape == (4, 4, 4) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < TINY.num_codes
    assert model.decode_indices(codes).shape == x.shape
    assert disc(x).shape == (4, 1, 16 // 2 - 2, 16 // 2 - 2)  # one logit per patch


def test_prior_scores_the_joint_vocabulary_at_every_slot():
    prior = vg.build_prior(TINY)
    assert prior.max_len == L + N_IMG + 2 and prior.token_embed.num_embeddings == vg.vocab_size(TINY.num_codes) == 261 + 16
    logits = prior(torch.randint(0, prior.max_len, (2, prior.max_len)))
    assert logits.shape == (2, prior.max_len, 261 + 16) and logits.dtype == torch.float32


# ---------------------------------------------------------------- the VQ-GAN losses

@given(seed=st.integers(0, 2**16), n=st.integers(1, 40))
def test_hinge_losses_equal_their_definitions(seed, n):
    g = torch.Generator().manual_seed(seed)
    real, fake = torch.randn(n, generator=g, dtype=torch.float64) * 3, torch.randn(n, generator=g, dtype=torch.float64) * 3
    r, f = real.numpy(), fake.numpy()
    want_d = 0.5 * (np.maximum(0, 1 - r).mean() + np.maximum(0, 1 + f).mean())
    assert vg.hinge_d_loss(real, fake).item() == pytest.approx(want_d, rel=1e-12, abs=1e-12)
    assert vg.hinge_g_loss(fake).item() == pytest.approx(-f.mean(), rel=1e-12, abs=1e-12)


def test_discriminator_step_leaves_the_generator_gradients_untouched():
    model, disc = tokenizer_and_disc()
    x = images(1)
    x_hat, _ = model(x)
    d_loss, _, _ = vg.discriminator_objective(disc, x, x_hat)
    d_loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.parameters())


def test_generator_step_does_not_update_the_discriminator():
    model, disc = tokenizer_and_disc()
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = images(2)
    x_hat, terms = model(x)
    loss, parts = vg.generator_objective(x, x_hat, terms, disc, model.decoder.conv_out.weight, TINY, 1.0,
                                         vg.RandomFeatures(3))
    loss.backward()
    assert all(p.grad is None for p in disc.parameters()) and all(p.requires_grad for p in disc.parameters())
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in disc.state_dict().items())


@settings(max_examples=8)
@given(seed=st.integers(0, 2**16))
def test_adaptive_weight_is_the_ratio_of_the_two_gradient_norms_at_the_last_layer(seed):
    model, disc = tokenizer_and_disc(seed % 7)
    model.eval()
    x = images(seed)
    W = model.decoder.conv_out.weight

    def losses():
        x_hat, _ = model(x)
        nll = (x_hat - x).abs().mean() + vg.laplacian_l1(x_hat, x)
        return nll, vg.hinge_g_loss(disc(x_hat))

    norms = []
    for which in range(2):  # each gradient from its own graph, by backward
        model.zero_grad(set_to_none=True)
        losses()[which].backward()
        norms.append(W.grad.norm().item())
    nll, g_loss = losses()
    lam = vg.adaptive_weight(nll, g_loss, W, max_weight=1e9)
    assert not lam.requires_grad
    assert lam.item() == pytest.approx(norms[0] / (norms[1] + 1e-4), rel=1e-5)
    assert vg.adaptive_weight(nll, g_loss, W, max_weight=1e-3).item() == pytest.approx(min(1e-3, lam.item()))


def test_adversarial_weight_ramps_in_from_zero_while_the_discriminator_trains_from_the_start():
    ramp = [vg.adversarial_ramp(t, 10) for t in range(15)]
    assert ramp[0] == 0 and ramp[5] == 0.5 and ramp[10:] == [1.0] * 5 and ramp == sorted(ramp)
    assert vg.adversarial_ramp(0, 0) == 1.0
    model, disc = tokenizer_and_disc()
    x = images(3)
    x_hat, terms = model(x)
    loss, parts = vg.generator_objective(x, x_hat, terms, disc, model.decoder.conv_out.weight, TINY, ramp[0],
                                         vg.RandomFeatures(3))
    assert loss.item() == pytest.approx((parts["rec"] + parts["perceptual"] + parts["codebook"] + parts["commitment"]).item())
    d_loss, _, _ = vg.discriminator_objective(disc, x, x_hat)  # at step 0 the discriminator has a loss to learn from
    d_loss.backward()
    assert sum(p.grad.abs().sum() for p in disc.parameters()) > 0


@pytest.mark.parametrize("kind", ["laplacian", "features"])
@given(seed=st.integers(0, 2**16), size=st.sampled_from([8, 12, 16]), channels=st.sampled_from([1, 3]))
def test_perceptual_term_is_zero_for_identical_images_positive_otherwise_and_differentiable(kind, seed, size, channels):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, channels, size, size, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    net = vg.RandomFeatures(channels).double() if kind == "features" else None
    assert vg.perceptual_loss(x, x.clone(), kind, net).item() == 0.0
    loss = vg.perceptual_loss(y, x, kind, net)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


@given(seed=st.integers(0, 2**16), size=st.sampled_from([8, 11, 16]))
def test_laplacian_pyramid_is_invertible_so_equal_pyramids_mean_equal_images(seed, size):
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    bands = vg.laplacian_pyramid(x, 3)
    image = bands[-1]
    for band in reversed(bands[:-1]):
        image = band + torch.nn.functional.interpolate(image, size=band.shape[-2:], mode="bilinear", align_corners=False)
    torch.testing.assert_close(image, x)


# ---------------------------------------------------------------- the joint vocabulary and its mask

@given(text=st.text(max_size=20), seed=st.integers(0, 2**16))
def test_vocabulary_offsets_round_trip_text_ids_to_bytes_and_image_ids_to_codes(text, seed):
    ids, lengths = vg.ByteTokenizer().encode([text], 64)
    data = list(text.encode("utf-8"))
    assert ids[0, 1:lengths[0] - 1].tolist() == data  # a text id is its byte
    assert vg.ByteTokenizer().decode(ids[0]) == text and int(ids.max()) < vg.TEXT_VOCAB
    codes = torch.randint(0, 512, (3, 5), generator=torch.Generator().manual_seed(seed))
    image_ids = vg.code_ids(codes)
    assert torch.equal(vg.id_codes(image_ids), codes) and int(image_ids.min()) >= vg.IMAGE_OFFSET > vg.EOI_ID > vg.BOI_ID >= vg.TEXT_VOCAB
    assert int(image_ids.max()) < vg.vocab_size(512)


@given(seed=st.integers(0, 2**16), image_first=st.booleans())
def test_every_real_sequence_is_allowed_by_its_mask_and_slots_hold_their_kind(seed, image_first):
    g = torch.Generator().manual_seed(seed)
    words = ["a red circle", "", "there is a large blue square in the top left"]
    text = vg.caption_region([words[seed % 3]], L)
    codes = torch.randint(0, TINY.num_codes, (1, N_IMG), generator=g)
    seq = vg.build_sequences(text, vg.code_ids(codes), torch.tensor([image_first]))[0]
    allowed = vg.allowed_ids(L, N_IMG, TINY.num_codes, image_first)
    kinds = vg.slot_kinds(L, N_IMG, image_first)
    assert len(seq) == vg.sequence_length(L, N_IMG) and allowed[torch.arange(len(seq)), seq].all()
    assert (seq[kinds == vg.IMAGE] >= vg.IMAGE_OFFSET).all() and (seq[kinds == vg.TEXT] < vg.TEXT_VOCAB).all()
    assert torch.equal(vg.id_codes(seq[kinds == vg.IMAGE]), codes[0])
    assert (allowed[kinds == vg.FIXED].sum(1) == 1).all()


@given(text_len=st.integers(3, 20), grid=st.integers(1, 5))
def test_each_slot_reads_the_role_of_the_token_it_predicts_alike_in_both_orders(text_len, grid):
    n_img = grid * grid
    roles = {}
    for image_first in (False, True):
        ids = vg.role_ids(text_len, n_img, image_first)
        kinds = vg.slot_kinds(text_len, n_img, image_first)
        seq = vg.build_sequences(torch.arange(text_len)[None], vg.code_ids(torch.arange(n_img))[None],
                                 torch.tensor([image_first]))[0]  # caption slot j holds j, code n holds n
        assert len(ids) == len(seq) - 1 == vg.sequence_length(text_len, n_img) - 1
        for s, role in enumerate(ids.tolist()):  # slot s predicts the token at s + 1
            target = int(seq[s + 1])
            if kinds[s + 1] == vg.IMAGE:
                assert role == text_len + 2 + int(vg.id_codes(seq[s + 1]))
            elif target in (vg.BOI_ID, vg.EOI_ID):
                assert role == text_len + (target == vg.EOI_ID)
            else:
                assert role == target  # caption slot j, BOS (j = 0) included
            roles.setdefault(role, set()).add(image_first)
    # every role occurs in both orders but those of the tokens that open a sequence, never predicted there
    only = {0: {True}, text_len: {False}}  # BOS is predicted only after an image, BOI only after a caption
    assert len(roles) == text_len + 2 + n_img and all(both == only.get(r, {False, True}) for r, both in roles.items())


@given(seed=st.integers(0, 2**16), text_len=st.integers(3, 12), grid=st.integers(1, 4))
def test_role_positions_embed_codes_as_row_plus_column_and_text_roles_by_their_own_rows(seed, text_len, grid):
    torch.manual_seed(seed)
    pos = vg.RolePositions(text_len, grid, 8)
    roles = torch.arange(text_len + 2 + grid * grid)[None]
    out = pos(roles)[0]
    for r in roles[0].tolist():
        if r < text_len + 2:
            expected = pos.text.weight[r]
        else:
            n = r - text_len - 2
            expected = pos.row.weight[n // grid] + pos.column.weight[n % grid]
        torch.testing.assert_close(out[r], expected)
    assert isinstance(vg.build_prior(TINY).pos_embed, vg.RolePositions)


@settings(max_examples=6)  # each example samples whole sequences
@given(seed=st.integers(0, 2**16), image_first=st.booleans(), cfg_w=st.sampled_from([0.0, 2.0]))
def test_under_the_logit_mask_text_slots_never_sample_image_ids_and_image_slots_never_text_ids(seed, image_first, cfg_w):
    prior = random_prior(seed, scale=1.0)
    with torch.no_grad():  # make the unmasked model prefer the wrong modality everywhere
        prior.head.weight[vg.IMAGE_OFFSET:] += 5.0 * (not image_first)
    allowed = vg.allowed_ids(L, N_IMG, TINY.num_codes, image_first)
    kinds = vg.slot_kinds(L, N_IMG, image_first)
    prompt = torch.tensor([[vg.BOI_ID] if image_first else [vg.BOS_ID]] * 3)
    g = torch.Generator().manual_seed(seed)
    new = vg.generate(prior, prompt, prior.max_len - 1, temperature=1.5, cfg_w=cfg_w, null_prompt=prompt,
                      allowed=allowed, generator=g)
    seq = torch.cat([prompt, new], dim=1)
    assert (seq[:, kinds == vg.IMAGE] >= vg.IMAGE_OFFSET).all()
    assert (seq[:, kinds == vg.TEXT] < vg.TEXT_VOCAB).all() and (seq[:, kinds == vg.TEXT] != vg.BOS_ID).all()


@settings(max_examples=6)  # each example samples whole sequences
@given(seed=st.integers(0, 2**16))
def test_a_generated_image_has_exactly_h_times_w_codes_between_boi_and_eoi(seed):
    model, _ = tokenizer_and_disc()
    prior = random_prior(seed, dtype=torch.float32)
    cfg = dataclasses.replace(TINY, cfg_w=1.0)
    rt = vg.Runtime(torch.device("cpu"), None, False)
    pictures, new = vg.text_to_image(prior, model, ["a red circle", "a large blue square at the top left"], cfg, rt,
                                     torch.Generator().manual_seed(seed))
    assert pictures.shape == (2, 16, 16, 3) and pictures.dtype == np.uint8
    prompt = vg.caption_region(["a red circle", "a large blue square at the top left"], L)
    seq = torch.cat([prompt, torch.full((2, 1), vg.BOI_ID), new], dim=1)
    for row in seq:
        boi, eoi = row.tolist().index(vg.BOI_ID), row.tolist().index(vg.EOI_ID)
        between = row[boi + 1:eoi]
        assert len(between) == N_IMG and (between >= vg.IMAGE_OFFSET).all() and eoi == len(row) - 1


@given(seed=st.integers(0, 2**16), text_weight=st.floats(0, 1))
def test_prior_loss_weights_text_and_image_terms_and_ddp_counts_give_the_global_mean(seed, text_weight):
    g = torch.Generator().manual_seed(seed)
    B = 4
    text = vg.caption_region(["a red circle", "", "a large shape at the top", "cyan"], L)
    order = torch.tensor([False, True, False, True])
    seq = vg.build_sequences(text, vg.code_ids(torch.randint(0, 16, (B, N_IMG), generator=g)), order)
    layouts = [(vg.allowed_ids(L, N_IMG, 16, o)[1:], vg.slot_kinds(L, N_IMG, o)[1:]) for o in (False, True)]
    allowed = torch.stack([layouts[int(o)][0] for o in order])
    kinds = torch.stack([layouts[int(o)][1] for o in order])
    logits = torch.randn(B, seq.shape[1] - 1, vg.vocab_size(16), generator=g, dtype=torch.float64)
    loss, text_loss, image_loss = vg.prior_loss(logits, seq[:, 1:], allowed, kinds, text_weight)
    assert loss.item() == pytest.approx(text_weight * text_loss.item() + (1 - text_weight) * image_loss.item())
    lp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1).gather(-1, seq[:, 1:, None])[..., 0]
    text_mask = (kinds == vg.TEXT) & (seq[:, 1:] != vg.PAD_ID)
    assert text_loss.item() == pytest.approx(-lp[text_mask].mean().item())
    assert torch.isfinite(lp[kinds == vg.FIXED]).all() and (lp[kinds == vg.FIXED] == 0).all()
    counts = (text_mask.sum() / 2, torch.tensor(B * N_IMG / 2))  # two ranks, each with half the batch
    halves = [vg.prior_loss(logits[s], seq[s, 1:], allowed[s], kinds[s], text_weight, counts)[0] for s in (slice(0, 2), slice(2, 4))]
    assert (sum(halves) / 2).item() == pytest.approx(loss.item())


# ---------------------------------------------------------------- sampler oracles

@pytest.mark.parametrize("image_first", [False, True])
@settings(max_examples=6)  # each example samples whole sequences
@given(seed=st.integers(0, 2**16))
def test_cached_generation_equals_recompute(image_first, seed):
    prior = random_prior(seed)
    allowed = vg.allowed_ids(L, N_IMG, TINY.num_codes, image_first)
    if image_first:  # captioning: [BOI] codes [EOI] [BOS], then text until EOS
        codes = vg.code_ids(torch.randint(0, 16, (3, N_IMG), generator=torch.Generator().manual_seed(seed)))
        prompt = torch.cat([torch.full((3, 1), vg.BOI_ID), codes, torch.full((3, 1), vg.EOI_ID), torch.full((3, 1), vg.BOS_ID)], 1)
        kwargs = dict(eos_id=vg.EOS_ID)
    else:  # text-to-image with guidance against the empty caption
        prompt = torch.cat([vg.caption_region(["a red circle", "a square", ""], L), torch.full((3, 1), vg.BOI_ID)], 1)
        null = torch.cat([vg.caption_region([""] * 3, L), torch.full((3, 1), vg.BOI_ID)], 1)
        kwargs = dict(cfg_w=1.5, null_prompt=null, top_k=5)
    positions = vg.prior_positions(TINY, image_first)[None]
    runs = [vg.generate(prior, prompt, prior.max_len - prompt.shape[1], 1.0, allowed=allowed, positions=positions,
                        use_cache=c, generator=torch.Generator().manual_seed(seed), **kwargs) for c in (True, False)]
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------- evaluation helpers

@given(attrs=st.tuples(st.integers(0, 2), st.integers(0, 6), st.integers(0, 1), st.integers(0, 8)),
       phrasing=st.integers(0, 2), named=st.tuples(*[st.booleans()] * 4).filter(any))
def test_parse_caption_reads_back_what_every_shapes_caption_names(attrs, phrasing, named):
    text = vg.shapes_caption(np.array(attrs), phrasing, named)
    parsed, well_formed = vg.parse_caption(text)
    assert parsed.tolist() == [a if n else -1 for a, n in zip(attrs, named)] and well_formed
    assert not vg.parse_caption("a red red circle")[1] and not vg.parse_caption("qqq")[1]


def test_sharpness_ratios_are_one_for_the_originals_and_below_one_for_a_blur():
    data = vg.shapes_split("test", 16, 32, 0)
    x = data["images"]
    same = vg.reconstruction_metrics(x, x, data["attributes"])
    assert same["gradient_energy_ratio"] == same["high_freq_energy_ratio"] == same["detector_accuracy"] == 1.0
    blurred = vg.tensor_to_images(vg.binomial_blur(vg.images_to_tensor(x)))
    blur = vg.reconstruction_metrics(blurred, x)
    assert blur["gradient_energy_ratio"] < 0.8 and blur["high_freq_energy_ratio"] < 0.5 and blur["l1"] > 0


# ---------------------------------------------------------------- learning

def test_prior_learns_which_image_follows_which_caption():
    torch.manual_seed(0)
    prior = vg.build_prior(TINY)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    text = vg.caption_region(["a red circle", "a blue square"], L)
    codes = torch.tensor([[1] * N_IMG, [7] * N_IMG])
    order = torch.tensor([False, False])
    seq = vg.build_sequences(text, vg.code_ids(codes), order)
    allowed = vg.allowed_ids(L, N_IMG, 16, False)[1:].expand(2, -1, -1)
    kinds = vg.slot_kinds(L, N_IMG, False)[1:].expand(2, -1)
    positions = vg.prior_positions(TINY, False)[None]
    for _ in range(60):
        loss = vg.prior_loss(prior(seq[:, :-1], positions), seq[:, 1:], allowed, kinds, 0.125)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    cfg = dataclasses.replace(TINY, cfg_w=0.0, temperature=0.0)
    rt = vg.Runtime(torch.device("cpu"), None, False)
    model, _ = tokenizer_and_disc()
    _, new = vg.text_to_image(prior, model, ["a red circle", "a blue square"], cfg, rt, None)
    assert torch.equal(vg.id_codes(new[:, :N_IMG]), codes)


# ---------------------------------------------------------------- the command line on real data

@pytest.mark.parametrize("channels", [1, 3])
def test_cli_trains_on_an_npz_with_captions_gray_or_color(tmp_path, channels):
    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (40, 16, 16, channels), dtype=np.uint8)
    captions = np.array(["a bright thing", "a dark thing"] * 20)
    np.savez(tmp_path / "real.npz", images=pictures, captions=captions)
    metrics = vg.main(tiny_args(tmp_path / "out", "--data", tmp_path / "real.npz"))
    assert np.isfinite(metrics["final_loss"]) and metrics["tokens_per_image"] == N_IMG
    assert (tmp_path / "out" / "text_to_image.png").exists() and (tmp_path / "out" / "reconstructions.png").exists()


def test_compare_reads_a_vqvae_checkpoint_and_reports_both_tokenizers(tmp_path):
    torch.manual_seed(1)
    other = vg.build_model(TINY)
    torch.save({"model_name": "vqvae", "config": {**dataclasses.asdict(TINY), "bottleneck": "vq"},
                "model": other.state_dict()}, tmp_path / "vqvae.pt")
    metrics = vg.main(tiny_args(tmp_path / "out", "--prior_steps", 0, "--compare", tmp_path / "vqvae.pt"))
    assert set(metrics["comparison"]) == {"vqvae", "vqgan"}
    assert {"psnr_db", "l1", "gradient_energy_ratio", "detector_accuracy"} <= set(metrics["comparison"]["vqgan"])
    assert (tmp_path / "out" / "compare.png").exists()


def test_the_two_commands_of_the_readme_equal_the_one_run_bitwise(tmp_path):
    """--stop_step at the end of the tokenizer's phase, then --resume: the prior's phase starts by
    tokenizing the training set with the restored tokenizer. The first command skips the prior's
    evaluation (it has not trained)."""
    common = ["--log_every", 1]
    first = vg.main(tiny_args(tmp_path / "a", *common, "--stop_step", TINY.max_steps))
    assert "recon_detector_accuracy" in first and not any(k.startswith(("t2i", "caption")) for k in first)
    resumed = vg.main(tiny_args(tmp_path / "a", *common, "--resume", tmp_path / "a" / "ckpt.pt"))
    straight = vg.main(tiny_args(tmp_path / "b", *common))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == TINY.max_steps + TINY.prior_steps
    for key in ("model", "discriminator", "prior"):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
    assert resumed["t2i_seen"] == straight["t2i_seen"] and resumed["final_loss"] == straight["final_loss"]


# ---------------------------------------------------------------- bad inputs

def error_of(argv):
    with pytest.raises(SystemExit) as e:
        vg.main(argv)
    return str(e.value.code)


def test_bad_inputs_specific_to_vqgan_are_clear_errors(tmp_path):
    assert "--perceptual lpips: expected laplacian, features or none" in error_of(tiny_args(tmp_path, "--perceptual", "lpips"))
    assert "--disc_layers 3" in error_of(tiny_args(tmp_path, "--disc_layers", 3))
    assert "pass --context_length" in error_of(tiny_args(tmp_path, "--context_length", 20))
    np.savez(tmp_path / "plain.npz", images=np.zeros((20, 16, 16, 3), np.uint8))
    assert "needs a 'captions' array" in error_of(tiny_args(tmp_path, "--data", tmp_path / "plain.npz"))
    torch.save({"model_name": "vqvae", "config": {"bottleneck": "gaussian"}}, tmp_path / "vae.pt")
    assert "not a checkpoint of vqvae.py's vector-quantized" in error_of(tiny_args(tmp_path, "--compare", tmp_path / "vae.pt"))
    torch.save({"model_name": "vqvae", "config": {**dataclasses.asdict(TINY), "bottleneck": "vq", "num_codes": 32},
                "model": vg.build_model(dataclasses.replace(TINY, num_codes=32)).state_dict()}, tmp_path / "k32.pt")
    assert "equal tokens" in error_of(tiny_args(tmp_path, "--compare", tmp_path / "k32.pt"))
    torch.save({"model_name": "vqvae", "config": {**dataclasses.asdict(TINY), "bottleneck": "vq"}, "model": {}},
               tmp_path / "empty.pt")
    assert "does not fit" in error_of(tiny_args(tmp_path, "--compare", tmp_path / "empty.pt"))


# ---------------------------------------------------------------- GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_run_under_bf16_autocast_on_cuda(tmp_path):
    metrics = vg.main(tiny_args(tmp_path, "--device", "cuda", "--dtype", "bfloat16"))
    assert np.isfinite(metrics["final_loss"]) and 0 <= metrics["t2i_seen"] <= 1
