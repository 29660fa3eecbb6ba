"""pixel_ar.py: the token layout, causality, the 256-way distribution and bits/dim, the sampler's
laws, cached == recompute generation, learning, the CLI on real images, bad inputs, GPU."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import pixel_ar as pa


def tiny_args(out_dir, *extra):
    return ["--preset", "tiny", "--out_dir", str(out_dir), *map(str, extra)]


def random_model(seed, vocab=300, max_len=24, dim=16, depth=2, num_heads=2, num_outputs=256, scale=0.3,
                 dtype=torch.float64):
    """A CausalTransformer whose every parameter is drawn from a local generator (any parameters)."""
    model = pa.CausalTransformer(vocab, max_len, dim, depth, num_heads, 2.0, 0.0, num_outputs).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * scale + (1.0 if p.dim() == 1 and p.shape[0] == dim else 0.0))
    return model.eval()


# ---------------------------------------------------------------- token layout and shapes

@given(n=st.integers(1, 3), size=st.integers(1, 5), channels=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_tokens_are_the_bytes_in_raster_order_then_channels_and_tokens_to_images_inverts(n, size, channels, seed):
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    tokens = pa.image_to_tokens(images)
    assert tokens.shape == (n, size * size * channels) and tokens.dtype == torch.long
    for r, c, ch in [(0, 0, 0), (size - 1, 0, channels - 1), (size // 2, size - 1, 0)]:
        assert tokens[0, (r * size + c) * channels + ch] == images[0, r, c, ch]
    assert np.array_equal(pa.tokens_to_images(tokens, size, channels), images)


def test_input_is_the_class_token_then_the_image_shifted_by_one():
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    first = pa.condition_tokens(torch.tensor([2, -1]), num_classes=4)  # class 2, and the null class
    assert first.tolist() == [256 + 2, 256 + 4]
    assert pa.ar_inputs(tokens, first).tolist() == [[258, 5, 6], [260, 8, 9]]


def test_model_maps_ids_or_embeddings_to_256_logits_per_slot():
    cfg = pa.Config(**pa.PRESETS["tiny"])
    model = pa.build_model(cfg, num_classes=21, channels=3)
    T = cfg.image_size ** 2 * 3
    assert model.max_len == T and model.token_embed.num_embeddings == 256 + 22
    x = torch.randint(0, 256, (2, T))
    logits = model(x)
    assert logits.shape == (2, T, 256) and logits.dtype == torch.float32
    torch.testing.assert_close(model(model.embed(x)), logits)  # float input: whole input embeddings
    plain = pa.build_model(pa.Config(**pa.PRESETS["tiny"], neighbours=False), num_classes=21, channels=3)
    assert type(plain) is pa.CausalTransformer and type(model) is pa.PixelTransformer
    torch.testing.assert_close(plain(plain.token_embed(x)), plain(x))


@given(size=st.integers(1, 5), channels=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_neighbour_ids_are_the_left_and_upper_pixels_of_the_predicted_sub_pixel_in_its_channel(size, channels, seed):
    image = np.random.default_rng(seed).integers(0, 256, (1, size, size, channels), dtype=np.uint8)
    model = pa.build_model(pa.Config(image_size=size, dim=8, depth=1, num_heads=2), num_classes=3, channels=channels)
    inputs = pa.ar_inputs(pa.image_to_tokens(image), pa.condition_tokens(torch.tensor([1]), 3))
    ids = model.neighbour_ids(inputs)  # (4, 1, T)
    for s in range(size * size * channels):  # slot s predicts sub-pixel s
        r, c, ch = s // channels // size, s // channels % size, s % channels
        for k, (dr, dc) in enumerate([(0, -1), (-1, -1), (-1, 0), (-1, 1)]):  # left, up-left, up, up-right
            inside = 0 <= r + dr and 0 <= c + dc < size
            assert ids[k, 0, s] == (image[0, r + dr, c + dc, ch] if inside else 256), (s, k)


# ---------------------------------------------------------------- causality and the distribution

@given(seed=st.integers(0, 2**16), length=st.integers(2, 12))
def test_logits_at_slot_t_have_zero_gradient_from_inputs_after_t(seed, length):
    model = random_model(seed)
    emb = torch.randn(1, length, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)
    logits = model(emb)
    for t in range(length):
        (grad,) = torch.autograd.grad(logits[0, t].sum(), emb, retain_graph=True)
        assert (grad[0, t + 1:] == 0).all(), f"logits[{t}] depend on a later input"
        assert grad[0, t].abs().sum() > 0


def test_the_target_x_t_never_reaches_the_logits_that_predict_it():
    """Through the real shift: changing pixel value x_t leaves p(x_1..x_t | ...) exactly unchanged."""
    model = pa.build_model(pa.Config(**pa.PRESETS["tiny"]), 21).double().eval()
    T = model.max_len
    tokens = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(0))
    first = pa.condition_tokens(torch.tensor([3]), 21)
    base = model(pa.ar_inputs(tokens, first))
    for t in range(T):  # 0-based: tokens[:, t] is x_{t+1}, predicted at slot t (also through the neighbours)
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 128) % 256
        logits = model(pa.ar_inputs(changed, first))
        assert torch.equal(logits[:, :t + 1], base[:, :t + 1])
        assert not torch.equal(logits[:, t + 1:], base[:, t + 1:]) or t == T - 1


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), cuts=st.lists(st.integers(1, 8), min_size=1, max_size=3, unique=True))
def test_causality_holds_through_the_cache_when_the_sequence_comes_in_chunks(seed, cuts):
    model = random_model(seed)
    length = 9
    emb = torch.randn(1, length, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)
    bounds = [0, *sorted(cuts), length]
    # the cache is written in place after autograd saved its prefix: keep the saved versions
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        cache = model.new_cache(1)
        logits = torch.cat([model(emb[:, a:b], cache=cache, start=a) for a, b in zip(bounds, bounds[1:])], dim=1)
        for t in range(length):
            (grad,) = torch.autograd.grad(logits[0, t].sum(), emb, retain_graph=True)
            assert (grad[0, t + 1:] == 0).all() and (grad[0, :t + 1].abs().sum(-1) > 0).all()
    torch.testing.assert_close(logits, model(emb), rtol=1e-10, atol=1e-10)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), cuts=st.lists(st.integers(1, 107), min_size=1, max_size=4, unique=True))
def test_the_pixel_model_fed_in_chunks_through_the_cache_equals_one_pass(seed, cuts):
    """The neighbours of a token fed to the cache come from the ids of earlier calls (cache.ids)."""
    model = pa.build_model(pa.Config(**pa.PRESETS["tiny"]), 21).double().eval()
    T = model.max_len
    g = torch.Generator().manual_seed(seed)
    x = pa.ar_inputs(torch.randint(0, 256, (2, T), generator=g), pa.condition_tokens(torch.tensor([3, -1]), 21))
    cache = model.new_cache(2)
    bounds = [0, *sorted(cuts), T]
    chunks = torch.cat([model(x[:, a:b], cache=cache, start=a) for a, b in zip(bounds, bounds[1:])], dim=1)
    torch.testing.assert_close(chunks, model(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="past slot 0 needs the cache"):
        model(x[:, 5:], start=5)
    with pytest.raises(ValueError, match="a cached PixelTransformer needs ids"):
        model(model.embed(x), cache=model.new_cache(2))


def test_cache_slots_past_the_written_prefix_are_never_read():
    model = random_model(1)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    runs = []
    for fill in (0.0, float("nan")):
        cache = model.new_cache(2)
        cache.k.fill_(fill)
        cache.v.fill_(fill)
        out = [model(prompt, cache=cache)]
        for t in range(5, 9):
            out.append(model(torch.full((2, 1), t), cache=cache, start=t))
        runs.append(torch.cat(out, dim=1))
    assert torch.isfinite(runs[1]).all() and torch.equal(runs[0], runs[1])


@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 3.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_256_probabilities_of_every_step_sum_to_one_for_any_parameters(seed, scale, dtype):
    model = random_model(seed, scale=scale, dtype=dtype)
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed))
    probs = model(x).softmax(dim=-1)
    assert probs.shape == (2, 24, 256) and torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 24, dtype=dtype), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_bits_per_dim_bookkeeping_on_a_hand_computed_case():
    # two dimensions: p(x_1 = 7) = 1/2 and p(x_2 = 9) = 1/4, so -log p = ln 2 + ln 4 = 3 ln 2 nats
    probs = torch.full((1, 2, 256), 0.0, dtype=torch.float64)
    probs[0, 0] = 0.5 / 255
    probs[0, 0, 7] = 0.5
    probs[0, 1] = 0.75 / 255
    probs[0, 1, 9] = 0.25
    nats = pa.mle_loss(probs.log(), torch.tensor([[7, 9]]))  # per dimension
    assert nats.item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    assert pa.bits_per_dim(nats.item()) == pytest.approx(1.5, rel=1e-6)
    assert pa.bits_per_dim(3 * math.log(2), num_dims=2) == pytest.approx(1.5, rel=1e-15)
    uniform = pa.mle_loss(torch.zeros(3, 5, 256), torch.randint(0, 256, (3, 5)))
    assert pa.bits_per_dim(uniform.item()) == pytest.approx(8.0, rel=1e-6)  # a uniform byte is 8 bits


# ---------------------------------------------------------------- sampler oracles

@given(seed=st.integers(0, 2**16))
def test_temperature_zero_is_argmax_and_small_temperatures_approach_it(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 50, generator=g, dtype=torch.float64)
    best = logits.argmax(-1)
    assert torch.equal(pa.sample_next(logits, temperature=0), best)
    second = logits.topk(2, dim=-1).values
    sharp = (second[:, 0] - second[:, 1]) > 0.05  # a gap of 0.05 at T = 1e-4: other values have mass e^-500
    assert torch.equal(pa.sample_next(logits, 1e-4, generator=g)[sharp], best[sharp])


@given(seed=st.integers(0, 2**16), vocab=st.integers(2, 40), k=st.integers(1, 40), ties=st.booleans())
def test_top_k_leaves_exactly_k_values_with_mass(seed, vocab, k, ties):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 4, (3, vocab), generator=g).double() if ties else torch.randn(3, vocab, generator=g)
    probs = pa.filter_logits(logits, top_k=k).softmax(-1)
    kept = probs > 0
    assert (kept.sum(-1) == min(k, vocab)).all()
    for row in range(3):  # the kept values are the largest ones
        assert logits[row][kept[row]].min() >= max(logits[row][~kept[row]].tolist(), default=-math.inf)


@given(seed=st.integers(0, 2**16), vocab=st.integers(1, 30), p=st.floats(0.01, 0.99), spread=st.floats(0.1, 5.0))
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(seed, vocab, p, spread):
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * spread
    full = logits.softmax(-1)
    kept = pa.filter_logits(logits, top_p=p) > -math.inf
    for row in range(4):
        mass, smallest = full[row][kept[row]].sum(), full[row][kept[row]].min()
        assert kept[row].any() and mass >= p - 1e-12
        assert mass - smallest < p + 1e-12  # without its least likely value the set falls short of p
        assert smallest >= max(full[row][~kept[row]].tolist(), default=0.0)  # and it is made of the most likely values


@given(seed=st.integers(0, 2**16), w=st.floats(0.0, 5.0))
def test_cfg_is_linear_in_w_and_w_zero_is_the_conditional_logits(seed, w):
    g = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(2, 3, 256, generator=g, dtype=torch.float64)
    assert torch.equal(pa.cfg_logits(cond, uncond, 0.0), cond)
    torch.testing.assert_close(pa.cfg_logits(cond, uncond, w), cond + w * (cond - uncond))


def test_generation_with_w_zero_and_a_null_prompt_is_the_conditional_model():
    model = random_model(2)
    prompt, null = torch.tensor([[260], [261]]), torch.tensor([[299], [299]])
    plain = pa.generate(model, prompt, 12, generator=torch.Generator().manual_seed(0))
    w0 = pa.generate(model, prompt, 12, cfg_w=0.0, null_prompt=null, generator=torch.Generator().manual_seed(0))
    guided = pa.generate(model, prompt, 12, cfg_w=3.0, null_prompt=null, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain, w0) and not torch.equal(plain, guided)


@given(seed=st.integers(0, 2**16), temperature=st.sampled_from([0.0, 0.7, 1.0]), top_k=st.sampled_from([0, 5]),
       top_p=st.sampled_from([1.0, 0.9]), cfg_w=st.sampled_from([0.0, 1.5]), embedded=st.booleans())
def test_cached_generation_equals_recompute_token_for_token(seed, temperature, top_k, top_p, cfg_w, embedded):
    model = random_model(seed, scale=0.5)
    g = torch.Generator().manual_seed(seed)
    prompt, null = torch.randint(256, 299, (3, 2), generator=g), torch.full((3, 2), 299)
    if embedded:  # llava's case: the prompt arrives as input embeddings
        prompt, null = model.token_embed(prompt).detach(), model.token_embed(null).detach()
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_w=cfg_w, null_prompt=null)
    cached = pa.generate(model, prompt, 20, **kw, generator=torch.Generator().manual_seed(seed))
    recomputed = pa.generate(model, prompt, 20, **kw, use_cache=False, generator=torch.Generator().manual_seed(seed))
    assert cached.shape == (3, 20) and torch.equal(cached, recomputed)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), temperature=st.sampled_from([0.0, 1.0]), cfg_w=st.sampled_from([0.0, 1.5]))
def test_the_pixel_model_generates_the_same_image_with_and_without_the_cache(seed, temperature, cfg_w):
    model = pa.build_model(pa.Config(**pa.PRESETS["tiny"]), 21).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    prompt, null = pa.condition_tokens(torch.tensor([[2], [7]]), 21), torch.full((2, 1), 256 + 21)
    kw = dict(temperature=temperature, cfg_w=cfg_w, null_prompt=null)
    cached = pa.generate(model, prompt, model.max_len, **kw, generator=torch.Generator().manual_seed(seed))
    recomputed = pa.generate(model, prompt, model.max_len, **kw, use_cache=False, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(cached, recomputed)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), cfg_w=st.sampled_from([0.0, 1.5]), per_sample=st.booleans())
def test_generation_reads_the_positions_it_is_given_at_every_slot(seed, cfg_w, per_sample):
    model = random_model(seed, scale=0.5)
    g = torch.Generator().manual_seed(seed)
    prompt, null = torch.randint(0, 256, (2, 3), generator=g), torch.full((2, 3), 299)
    kw = dict(temperature=0.0, cfg_w=cfg_w, null_prompt=null)
    default = pa.generate(model, prompt, 10, **kw)
    assert torch.equal(default, pa.generate(model, prompt, 10, positions=torch.arange(12)[None], **kw))
    shuffled = torch.randperm(model.max_len, generator=g)[:12].expand(2, -1)
    positions = shuffled.clone() if per_sample else shuffled[:1]
    if per_sample:
        positions[1] = positions[1].flip(0)
    cached = pa.generate(model, prompt, 10, positions=positions, **kw)
    assert torch.equal(cached, pa.generate(model, prompt, 10, positions=positions, use_cache=False, **kw))
    seq = torch.cat([prompt, cached], dim=1)  # greedy: each new token is the argmax of the model at those positions
    logits = pa.cfg_logits(model(seq[:, :-1], positions.expand(2, -1)),
                           model(torch.cat([null, cached[:, :-1]], 1), positions.expand(2, -1)), cfg_w)
    assert torch.equal(logits[:, 2:].argmax(-1), cached)
    mask = torch.ones_like(prompt, dtype=torch.bool)  # given positions win over the prompt mask's
    assert torch.equal(cached, pa.generate(model, prompt, 10, positions=positions, prompt_mask=mask, **kw))


@settings(max_examples=10)
@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, 6), min_size=2, max_size=4))
def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(seed, lengths):
    model = random_model(seed, scale=0.5)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    P = max(lengths)
    batch = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        batch[i, P - len(p):], mask[i, P - len(p):] = p, True
    for use_cache in (True, False):
        together = pa.generate(model, batch, 8, temperature=0, prompt_mask=mask, use_cache=use_cache)
        for i, p in enumerate(prompts):
            assert torch.equal(together[i], pa.generate(model, p[None], 8, temperature=0)[0]), (i, use_cache)


@given(seed=st.integers(0, 2**16), use_cache=st.booleans())
def test_the_allowed_mask_is_never_violated(seed, use_cache):
    model = random_model(seed)
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(24, 256, generator=g) < 0.05
    allowed[torch.arange(24), torch.randint(0, 256, (24,), generator=g)] = True  # at least one id per slot
    prompt = torch.randint(256, 300, (4, 3), generator=g)
    new = pa.generate(model, prompt, 15, allowed=allowed, use_cache=use_cache, generator=g)
    slots = torch.arange(3, 18)
    assert allowed[slots, new].all()


def test_after_eos_every_token_is_eos_and_generation_stops_when_all_are_done():
    model = random_model(3)
    allowed = torch.ones(24, 256, dtype=torch.bool)
    allowed[4] = False
    allowed[4, 7] = True  # the token at slot 4 (the third new one) must be id 7
    prompt = torch.tensor([[260, 1], [261, 2]])
    for use_cache in (True, False):
        new = pa.generate(model, prompt, 10, allowed=allowed, eos_id=7, use_cache=use_cache,
                          generator=torch.Generator().manual_seed(0))
        assert (new[:, 2:] == 7).all()
    assert torch.equal(new, pa.generate(model, prompt, 10, allowed=allowed, eos_id=7, generator=torch.Generator().manual_seed(0)))


def test_a_sequence_longer_than_the_context_is_a_clear_error():
    model = random_model(0)  # 24 positions
    with pytest.raises(ValueError, match="25 tokens is longer than the context of 24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    pa.generate(model, torch.zeros(1, 1, dtype=torch.long), 24)  # 1 + 24 new: the last is never fed back
    with pytest.raises(ValueError, match="needs 25 positions, more than the context of 24"):
        pa.generate(model, torch.zeros(1, 1, dtype=torch.long), 25)


# ---------------------------------------------------------------- learning

def test_overfits_a_tiny_batch_and_greedy_sampling_reproduces_each_image():
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)  # 4 classes of one image each
    x, labels = pa.image_to_tokens(images), torch.arange(4)
    model = pa.CausalTransformer(256 + 5, 27, 32, 2, 2, 2.0, num_outputs=256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = pa.mle_loss(model(pa.ar_inputs(x, pa.condition_tokens(labels, 4))), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert pa.bits_per_dim(loss.item()) < 0.05
    new = pa.generate(model, pa.condition_tokens(labels, 4)[:, None], 27, temperature=0)
    assert np.array_equal(pa.tokens_to_images(new, 3, 3), images)


# ---------------------------------------------------------------- CLI on real images, the table

@pytest.mark.parametrize("labelled", [True, False])
def test_cli_trains_on_a_grayscale_npz_and_samples_it(tmp_path, labelled):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    images = (labels[:, None, None, None] * 100 + rng.integers(0, 20, (60, 5, 5, 1))).astype(np.uint8)
    np.savez(tmp_path / "gray.npz", images=images, **({"labels": labels} if labelled else {}))
    metrics = pa.main(tiny_args(tmp_path / "o", "--data", tmp_path / "gray.npz", "--image_size", 5, "--max_steps", 4))
    assert math.isfinite(metrics["test_bits_per_dim"]) and metrics["test_images"] == 6
    assert metrics["eval_samples"] == (3 if labelled else 1) and "alignment" not in metrics
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    assert ckpt["model"]["pos_embed.channel.weight"].shape[0] == 1 and metrics["tokens_per_image"] == 25  # T = H W
    assert (tmp_path / "o" / "samples.png").exists()


def test_sequence_length_table_has_a_row_per_size_with_tokens_time_memory_and_speedup():
    cfg = pa.Config(**pa.PRESETS["tiny"], table_batch=2)
    rt = pa.Runtime(torch.device("cpu"), None, False)
    rows = pa.sequence_length_table(cfg, [2, 3], 3, rt, steps=1, full_recompute_tokens=20, probes=3)
    assert [r["tokens"] for r in rows] == [12, 27] and [r["recompute_extrapolated"] for r in rows] == [False, True]
    for r in rows:
        assert r["train_ms_per_step"] > 0 and r["activation_mb"] > 0 and r["sample_s_cache"] > 0 and r["speedup"] > 0
    assert rows[1]["activation_mb"] > rows[0]["activation_mb"]
    assert "| 3 px | 27 |" in pa.format_table(rows)


# ---------------------------------------------------------------- bad inputs

def test_an_image_longer_than_the_context_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"--image_size 6: an image of 3 channels is 108 tokens, longer than --context 100"):
        pa.main(tiny_args(tmp_path, "--context", 100))


def test_a_non_uint8_npz_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.random.default_rng(0).random((8, 6, 6, 3)))
    with pytest.raises(SystemExit, match=r"--data .*'images' must be uint8 \(N, H, W, C\).*got float64"):
        pa.main(tiny_args(tmp_path, "--data", tmp_path / "f.npz"))


def test_a_malformed_seq_table_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--seq_table '8,x': expected comma-separated image sizes"):
        pa.main(tiny_args(tmp_path, "--seq_table", "8,x"))


# ---------------------------------------------------------------- GPU only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_bf16_compiled_training_and_sampling_on_cuda(tmp_path):
    metrics = pa.main(tiny_args(tmp_path, "--device", "cuda", "--max_steps", 4))
    assert math.isfinite(metrics["final_loss"]) and math.isfinite(metrics["test_bits_per_dim"])


@cuda
def test_cached_generation_equals_recompute_on_cuda_and_the_cache_takes_the_autocast_dtype():
    model = random_model(0, dtype=torch.float32).cuda()
    prompt = torch.randint(256, 299, (4, 1), device="cuda")
    a = pa.generate(model, prompt, 20, temperature=0)
    b = pa.generate(model, prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model.new_cache(2).k.dtype == torch.bfloat16
        assert pa.generate(model, prompt, 20).shape == (4, 20)
