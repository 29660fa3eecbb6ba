"""Specification of clip.py: tokenizer, encoders, the Lec11 contrastive loss and its distributed form,
zero-shot classification and retrieval, then training, resume, CLI and bad inputs."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import clip

TOK = clip.ByteTokenizer()
TINY = clip.Config(**clip.PRESETS["tiny"])
seeds = st.integers(0, 2**31 - 1)


def tiny_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return clip.build_model(TINY).to(dtype)


def unit_rows(gen, n, d=8, dtype=torch.float64):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=-1)


def random_pairs(gen, n, dtype=torch.float32):
    images = torch.rand(n, 3, TINY.image_size, TINY.image_size, generator=gen, dtype=dtype) * 2 - 1
    ids, _ = TOK.encode([f"caption number {i}" for i in range(n)], TINY.context_length)
    return images, ids


####################################################################################################
# Tokenizer
####################################################################################################

@given(text=st.text(max_size=40), slack=st.integers(0, 5))
def test_tokenizer_round_trips_any_unicode_string_that_fits(text, slack):
    size = len(text.encode("utf-8"))
    ids, lengths = TOK.encode([text], size + 2 + slack)
    assert TOK.decode(ids[0]) == text
    assert lengths.tolist() == [size + 2]


def test_tokenizer_layout_is_bos_bytes_eos_then_padding():
    ids, lengths = TOK.encode(["hi", "é"], 6)
    assert ids.tolist() == [[TOK.bos_id, ord("h"), ord("i"), TOK.eos_id, TOK.pad_id, TOK.pad_id],
                            [TOK.bos_id, 0xC3, 0xA9, TOK.eos_id, TOK.pad_id, TOK.pad_id]]
    assert lengths.tolist() == [4, 4] and ids.dtype == torch.long
    assert len({TOK.pad_id, TOK.bos_id, TOK.eos_id}) == 3 and min(TOK.pad_id, TOK.bos_id, TOK.eos_id) >= 256
    assert TOK.vocab_size == max(TOK.pad_id, TOK.bos_id, TOK.eos_id) + 1


def test_tokenizer_rejects_a_text_longer_than_the_context_by_default():
    with pytest.raises(ValueError, match="context_length=5"):
        TOK.encode(["four"], 5)


@given(text=st.text(min_size=1, max_size=30), context_length=st.integers(2, 20))
def test_truncation_keeps_the_longest_whole_character_prefix(text, context_length):
    ids, lengths = TOK.encode([text], context_length, truncate=True)
    decoded = TOK.decode(ids[0])
    assert text.startswith(decoded)
    assert len(decoded.encode("utf-8")) + 2 == lengths[0].item() <= context_length
    rest = text[len(decoded):]
    if rest:  # the next character would not have fit
        assert len(decoded.encode("utf-8")) + len(rest[0].encode("utf-8")) > context_length - 2


def test_decode_skips_bos_and_padding_and_stops_at_eos():
    assert TOK.decode([TOK.bos_id, ord("a"), TOK.pad_id, ord("b"), TOK.eos_id, ord("c")]) == "ab"


####################################################################################################
# Encoders
####################################################################################################

@given(seed=seeds, batch=st.integers(1, 4))
def test_embeddings_are_unit_norm_in_the_joint_space(seed, batch):
    gen = torch.Generator().manual_seed(seed)
    images, ids = random_pairs(gen, batch)
    image_emb, text_emb, logit_scale = tiny_model(seed % 100)(images, ids)
    assert image_emb.shape == text_emb.shape == (batch, TINY.embed_dim)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(batch))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(batch))
    assert logit_scale.shape == ()


@given(tau=st.floats(0.01, 1.0))
def test_the_learned_temperature_starts_at_tau_init(tau):
    model = clip.build_model(dataclasses.replace(TINY, tau_init=tau))
    assert model.logit_scale.exp().item() == pytest.approx(1 / tau, rel=1e-6)


@given(seed=seeds, text=st.text(st.characters(codec="ascii"), max_size=20))
def test_tokens_after_eos_do_not_change_the_text_embedding(seed, text):
    gen = torch.Generator().manual_seed(seed)
    model = tiny_model(seed % 100)
    ids, lengths = TOK.encode([text], TINY.context_length)
    noisy = ids.clone()
    noisy[0, lengths[0]:] = torch.randint(0, TOK.vocab_size, (TINY.context_length - lengths[0],), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(noisy), model.encode_text(ids), rtol=0, atol=1e-6)
        # Trimming the padding away (as training does) changes nothing either.
        torch.testing.assert_close(model.encode_text(ids[:, :lengths[0]]), model.encode_text(ids), rtol=0, atol=1e-6)


@given(seed=seeds)
def test_text_encoder_is_causal(seed):
    """Changing token t leaves the state at every s < t (read out by putting EOS at s) unchanged."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_model(seed % 100)
    T = 12
    ids = torch.randint(0, 256, (1, T), generator=gen)
    ids[0, -1] = TOK.eos_id
    t = int(torch.randint(1, T - 1, (), generator=gen))
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % 256
    with torch.no_grad():
        for s in range(t):
            a, b = ids.clone(), changed.clone()
            a[0, s] = b[0, s] = TOK.eos_id
            torch.testing.assert_close(model.encode_text(a), model.encode_text(b), rtol=0, atol=1e-6)
        # ...while the state at the end does see the change, so the check above has teeth.
        assert not torch.allclose(model.encode_text(ids), model.encode_text(changed), atol=1e-6)


####################################################################################################
# The Lec11 loss
####################################################################################################

def reference_clip_loss(image_emb, text_emb, tau):
    """The lecture's formulas, written out with loops in float64."""
    n = image_emb.shape[0]
    s = [[float(image_emb[i] @ text_emb[j]) / tau for j in range(n)] for i in range(n)]
    loss_img = -sum(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    loss_text = -sum(s[i][i] - math.log(sum(math.exp(s[j][i]) for j in range(n))) for i in range(n)) / n
    return (loss_img + loss_text) / 2


pair_batches = st.tuples(seeds, st.integers(1, 8), st.floats(0.0, clip.LOGIT_SCALE_MAX))


@given(pair_batches)
def test_loss_matches_the_plain_formula(args):
    seed, n, logit_scale = args
    gen = torch.Generator().manual_seed(seed)
    image_emb, text_emb = unit_rows(gen, n), unit_rows(gen, n)
    loss = clip.clip_loss_global(image_emb, text_emb, torch.tensor(logit_scale, dtype=torch.float64))
    assert loss.item() == pytest.approx(reference_clip_loss(image_emb, text_emb, math.exp(-logit_scale)), rel=1e-9)


@given(pair_batches)
def test_loss_is_symmetric_under_swapping_images_and_texts(args):
    seed, n, logit_scale = args
    gen = torch.Generator().manual_seed(seed)
    image_emb, text_emb = unit_rows(gen, n), unit_rows(gen, n)
    scale = torch.tensor(logit_scale, dtype=torch.float64)
    torch.testing.assert_close(clip.clip_loss_global(image_emb, text_emb, scale),
                               clip.clip_loss_global(text_emb, image_emb, scale))


@given(pair_batches)
def test_loss_is_invariant_under_a_joint_permutation_of_the_pairs(args):
    seed, n, logit_scale = args
    gen = torch.Generator().manual_seed(seed)
    image_emb, text_emb = unit_rows(gen, n), unit_rows(gen, n)
    perm = torch.randperm(n, generator=gen)
    scale = torch.tensor(logit_scale, dtype=torch.float64)
    torch.testing.assert_close(clip.clip_loss_global(image_emb[perm], text_emb[perm], scale),
                               clip.clip_loss_global(image_emb, text_emb, scale))


@given(seed=seeds, n=st.integers(1, 16), logit_scale=st.floats(0.0, clip.LOGIT_SCALE_MAX))
def test_loss_equals_log_n_when_all_similarities_are_equal(seed, n, logit_scale):
    gen = torch.Generator().manual_seed(seed)
    image_emb, text_emb = unit_rows(gen, 1).expand(n, -1), unit_rows(gen, 1).expand(n, -1)
    loss = clip.clip_loss_global(image_emb, text_emb, torch.tensor(logit_scale, dtype=torch.float64))
    assert loss.item() == pytest.approx(math.log(n), abs=1e-12)


@given(seed=seeds, n=st.integers(2, 8), delta=st.floats(1e-3, 5.0))
def test_raising_a_matched_pairs_similarity_lowers_the_loss(seed, n, delta):
    gen = torch.Generator().manual_seed(seed)
    s = 3 * torch.randn(n, n, generator=gen, dtype=torch.float64)
    i = int(torch.randint(0, n, (), generator=gen))
    raised = s.clone()
    raised[i, i] += delta
    labels = torch.arange(n)
    assert clip.clip_loss(raised, raised.T, labels) < clip.clip_loss(s, s.T, labels)


def test_the_logit_scale_clamp_holds_after_optimizer_steps():
    torch.manual_seed(0)
    model = clip.build_model(TINY)  # 1/tau starts at 1/0.07, far enough below the clamp to climb
    # Aligned pairs whose embeddings are distinct but close (cosine about 0.9): the loss falls as
    # 1/tau grows and its gradient stays large, so the optimizer keeps pushing 1/tau up.
    gen = torch.Generator().manual_seed(0)
    text_emb = torch.nn.functional.normalize(1.0 + 0.3 * torch.randn(4, TINY.embed_dim, generator=gen), dim=-1)
    optimizer = torch.optim.SGD([model.logit_scale], lr=50.0)
    went_past = False
    for _ in range(20):
        optimizer.zero_grad()
        clip.clip_loss_global(text_emb, text_emb, model.logit_scale).backward()
        optimizer.step()
        went_past |= model.logit_scale.item() > clip.LOGIT_SCALE_MAX
        clip.clamp_logit_scale(model)
        assert 0.0 <= model.logit_scale.item() <= torch.tensor(clip.LOGIT_SCALE_MAX).item()
        assert model.logit_scale.exp().item() <= 100.0 * (1 + 1e-6)
    assert went_past, "the optimizer never pushed past the clamp, so the clamp was not tested"


####################################################################################################
# The distributed loss: each rank's rows against the gathered columns
####################################################################################################

def loss_and_grads(model, images, ids, loss_fn):
    model.zero_grad()
    loss = loss_fn(*model(images, ids))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@given(seed=seeds, world=st.sampled_from([1, 2, 4]), n=st.integers(1, 3))
def test_local_loss_over_k_fake_ranks_gives_the_global_loss_and_gradients(seed, world, n):
    """k fake ranks, each scoring its n rows against the gathered N = k n (gathered with gradient),
    averaged as DDP averages: the same loss and the same gradients as L_CLIP on the whole batch."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_model(seed % 100, torch.float64)
    images, ids = random_pairs(gen, world * n, torch.float64)

    def fake_ranks(image_emb, text_emb, logit_scale):
        return sum(clip.clip_loss_local(image_emb[r * n:(r + 1) * n], text_emb[r * n:(r + 1) * n],
                                        image_emb, text_emb, logit_scale, r) for r in range(world)) / world

    loss_g, grads_g = loss_and_grads(model, images, ids, clip.clip_loss_global)
    loss_l, grads_l = loss_and_grads(model, images, ids, fake_ranks)
    torch.testing.assert_close(loss_l, loss_g)
    for name in grads_g:
        torch.testing.assert_close(grads_l[name], grads_g[name], msg=name)


def test_a_gather_without_gradient_would_lose_the_cross_rank_terms():
    """Why the gather must carry gradients: detaching the other ranks' rows changes the update."""
    gen = torch.Generator().manual_seed(0)
    model = tiny_model(0, torch.float64)
    world, n = 2, 3
    images, ids = random_pairs(gen, world * n, torch.float64)

    def detached_gather(image_emb, text_emb, logit_scale):
        total = 0
        for r in range(world):
            own = slice(r * n, (r + 1) * n)
            image_all, text_all = image_emb.detach().clone(), text_emb.detach().clone()
            image_all[own], text_all[own] = image_emb[own], text_emb[own]
            total = total + clip.clip_loss_local(image_emb[own], text_emb[own], image_all, text_all, logit_scale, r)
        return total / world

    _, grads_g = loss_and_grads(model, images, ids, clip.clip_loss_global)
    _, grads_d = loss_and_grads(model, images, ids, detached_gather)
    assert not torch.allclose(grads_d["text_encoder.proj.weight"], grads_g["text_encoder.proj.weight"])


def test_gather_with_grad_is_the_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert clip.gather_with_grad(x) is x


def _gather_worker(rank, world, init_file, out_file):
    """One gloo rank: embeds its slice, gathers with gradient, local loss, DDP-style gradient mean."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = tiny_model(0, torch.float64)
    images, ids = random_pairs(torch.Generator().manual_seed(0), 6, torch.float64)
    n = 6 // world
    image_emb, text_emb, logit_scale = model(images[rank * n:(rank + 1) * n], ids[rank * n:(rank + 1) * n])
    loss = clip.clip_loss_local(image_emb, text_emb, clip.gather_with_grad(image_emb), clip.gather_with_grad(text_emb),
                                logit_scale, rank)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)
        grads[name] = p.grad / world
    if rank == 0:
        torch.save(grads, out_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_with_the_real_all_gather_reproduce_the_global_gradient(tmp_path):
    torch.multiprocessing.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "grads.pt")), nprocs=2)
    grads = torch.load(tmp_path / "grads.pt", weights_only=True)
    model = tiny_model(0, torch.float64)
    images, ids = random_pairs(torch.Generator().manual_seed(0), 6, torch.float64)
    _, expected = loss_and_grads(model, images, ids, clip.clip_loss_global)
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], msg=name)


####################################################################################################
# Zero-shot classification and retrieval
####################################################################################################

def test_prompt_embeddings_are_the_text_embeddings_of_each_class_prompt():
    model = tiny_model()
    prompts = [["a red circle", "a small red circle"], ["a blue square", "a large blue square"]]
    emb = clip.prompt_embeddings(model, TOK, prompts, TINY.context_length, "cpu")
    assert emb.shape == (2, 2, TINY.embed_dim)
    ids, _ = TOK.encode([p for ps in prompts for p in ps], TINY.context_length)
    with torch.no_grad():
        torch.testing.assert_close(emb.reshape(4, -1), model.encode_text(ids))


def reference_zero_shot_probs(image_emb, prompt_emb, tau):
    """p(c | x) = sum over the prompts t of class c of softmax_t(s(x, t)), with loops in float64."""
    B, (C, P, _) = image_emb.shape[0], prompt_emb.shape
    probs = []
    for b in range(B):
        e = [[math.exp(float(image_emb[b] @ prompt_emb[c, p]) / tau) for p in range(P)] for c in range(C)]
        total = sum(map(sum, e))
        probs.append([sum(e[c]) / total for c in range(C)])
    return torch.tensor(probs, dtype=torch.float64)


@given(seed=seeds, batch=st.integers(1, 4), classes=st.integers(1, 5), prompts=st.integers(1, 4),
       logit_scale=st.floats(0.0, clip.LOGIT_SCALE_MAX))
def test_softmax_sum_rule_gives_a_class_the_summed_softmax_of_its_prompts(seed, batch, classes, prompts, logit_scale):
    gen = torch.Generator().manual_seed(seed)
    image_emb = unit_rows(gen, batch)
    prompt_emb = unit_rows(gen, classes * prompts).view(classes, prompts, -1)
    log_probs = clip.zero_shot_log_probs(image_emb, prompt_emb, torch.tensor(logit_scale, dtype=torch.float64),
                                         "softmax_sum")
    expected = reference_zero_shot_probs(image_emb, prompt_emb, math.exp(-logit_scale))
    torch.testing.assert_close(log_probs.exp(), expected)
    torch.testing.assert_close(log_probs.exp().sum(dim=1), torch.ones(batch, dtype=torch.float64))


@given(seed=seeds, batch=st.integers(1, 4), classes=st.integers(1, 5), prompts=st.integers(1, 4),
       logit_scale=st.floats(0.0, clip.LOGIT_SCALE_MAX))
def test_mean_rule_is_a_softmax_over_the_renormalised_mean_prompt_of_each_class(seed, batch, classes, prompts,
                                                                                logit_scale):
    gen = torch.Generator().manual_seed(seed)
    image_emb = unit_rows(gen, batch)
    prompt_emb = unit_rows(gen, classes * prompts).view(classes, prompts, -1)
    log_probs = clip.zero_shot_log_probs(image_emb, prompt_emb, torch.tensor(logit_scale, dtype=torch.float64), "mean")
    for b in range(batch):
        logits = []
        for c in range(classes):
            mean = sum(prompt_emb[c, p] for p in range(prompts)) / prompts
            logits.append(math.exp(logit_scale) * float(image_emb[b] @ mean) / float(mean.norm()))
        total = sum(math.exp(v) for v in logits)
        torch.testing.assert_close(log_probs[b].exp(), torch.tensor([math.exp(v) / total for v in logits],
                                                                    dtype=torch.float64))


@given(seed=seeds, classes=st.integers(2, 6), batch=st.integers(1, 10), rule=st.sampled_from(["mean", "softmax_sum"]))
def test_with_one_prompt_per_class_both_rules_pick_the_most_similar_class_text(seed, classes, batch, rule):
    gen = torch.Generator().manual_seed(seed)
    class_emb, image_emb = unit_rows(gen, classes), unit_rows(gen, batch)
    log_probs = clip.zero_shot_log_probs(image_emb, class_emb[:, None], torch.tensor(math.log(1 / 0.07)), rule)
    brute = [max(range(classes), key=lambda c: float(image_emb[b] @ class_emb[c])) for b in range(batch)]
    assert log_probs.argmax(dim=1).tolist() == brute


def test_shapes_prompts_name_the_class_and_the_ensemble_every_caption_that_names_it():
    names = clip.shapes_class_names()
    prompts = clip.zero_shot_prompts("shapes", names)
    assert prompts[0] == ["a red circle", "there is a red circle", "red circle"]
    ensemble = clip.zero_shot_prompts("shapes", names, ensemble=True)
    assert len(ensemble) == 21 and all(len(p) == len(set(p)) == 90 for p in ensemble)
    for name, class_prompts in zip(names, ensemble):
        color, shape = name.split()
        assert all(color in p and shape in p for p in class_prompts)
    split = clip.shapes_split("test", 300, 16, 0)
    for caption, label, named in zip(split["captions"], split["labels"], split["caption_attributes"]):
        if named[0] >= 0 and named[1] >= 0:  # a caption that names the shape and color is one of the class's prompts
            assert caption in ensemble[label]
    assert clip.zero_shot_prompts("digits.npz", ["zero"]) == [["a zero", "a photo of a zero", "a picture of a zero"]]


@given(seed=seeds, n=st.integers(1, 12), density=st.floats(0.05, 0.9))
def test_retrieval_recall_matches_a_brute_force_count(seed, n, density):
    gen = torch.Generator().manual_seed(seed)
    image_emb, text_emb = unit_rows(gen, n), unit_rows(gen, n)
    relevant = torch.rand(n, n, generator=gen) < density
    recall = clip.retrieval_recall(image_emb, text_emb, relevant, ks=(1, 5))
    sim = (image_emb @ text_emb.T).tolist()
    for k in (1, 5):
        i2t = sum(any(relevant[i, j] for j in sorted(range(n), key=lambda j: -sim[i][j])[:k]) for i in range(n))
        t2i = sum(any(relevant[i, j] for i in sorted(range(n), key=lambda i: -sim[i][j])[:k]) for j in range(n))
        assert recall[f"i2t_R@{k}"] == pytest.approx(i2t / n)
        assert recall[f"t2i_R@{k}"] == pytest.approx(t2i / n)
    assert recall["i2t_R@1"] <= recall["i2t_R@5"] and recall["t2i_R@1"] <= recall["t2i_R@5"]


def test_retrieval_is_perfect_when_each_text_embeds_exactly_like_its_image():
    emb = unit_rows(torch.Generator().manual_seed(0), 20)
    recall = clip.retrieval_recall(emb, emb.clone(), torch.eye(20, dtype=torch.bool))
    assert recall == {"i2t_R@1": 1.0, "i2t_R@5": 1.0, "t2i_R@1": 1.0, "t2i_R@5": 1.0}


def test_a_caption_describes_every_image_that_has_the_attributes_it_names():
    split = clip.shapes_split("test", 200, 16, 0)
    relevant = clip.caption_relevance(split)
    assert relevant.diagonal().all()  # a caption describes its own image
    attrs, named = split["attributes"], split["caption_attributes"]
    for i, j in [(0, 1), (3, 7), (10, 11), (50, 2)]:
        expected = all(named[j, k] < 0 or named[j, k] == attrs[i, k] for k in range(4))
        assert bool(relevant[i, j]) == expected
    by_text = clip.caption_relevance({"captions": ["a", "b", "a"]})
    assert by_text.tolist() == [[True, False, True], [False, True, False], [True, False, True]]


####################################################################################################
# Learning
####################################################################################################

def test_a_small_batch_of_pairs_is_overfit_to_perfect_retrieval():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, depth=2, text_depth=2)
    model = clip.build_model(cfg)
    split = clip.shapes_split("train", 400, cfg.image_size, 0)
    # 8 images of different content, each with the caption that names all four attributes
    keep = np.sort(np.unique(split["attributes"], axis=0, return_index=True)[1])[:8]  # the first 8 contents
    images = clip.images_to_tensor(split["images"][keep])
    captions = [clip.shapes_caption(split["attributes"][i], phrasing=1) for i in keep]
    ids = clip.tokenize(TOK, captions, cfg.context_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    initial = clip.clip_loss_global(*model(images, ids)).item()
    for _ in range(150):
        loss = clip.clip_loss_global(*model(images, ids))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clip.clamp_logit_scale(model)
    with torch.no_grad():
        image_emb, text_emb, _ = model(images, ids)
    assert loss.item() < 0.05 * initial
    assert (image_emb @ text_emb.T).argmax(dim=1).tolist() == list(range(8))
    assert (text_emb @ image_emb.T).argmax(dim=1).tolist() == list(range(8))


def tiny_args(out_dir, *extra):
    return ["--preset", "tiny", "--out_dir", str(out_dir), *map(str, extra)]


####################################################################################################
# CLI
####################################################################################################

def test_cli_trains_evaluates_and_writes_metrics_and_pictures(tmp_path):
    metrics = clip.main(tiny_args(tmp_path))
    for key in ["zero_shot_test_accuracy", "zero_shot_heldout_accuracy", "zero_shot_chance",
                "zero_shot_test_accuracy_bare_prompt", "zero_shot_heldout_accuracy_bare_prompt",
                "zero_shot_test_accuracy_softmax_sum", "zero_shot_heldout_accuracy_softmax_sum",
                "i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "final_loss", "wall_time_s"]:
        assert key in metrics, key
    assert metrics["zero_shot_chance"] == pytest.approx(1 / 21)
    assert json.loads((tmp_path / "metrics.json").read_text())["t2i_R@5"] == metrics["t2i_R@5"]
    for name in ["similarity.png", "retrieval.png"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_cli_trains_on_an_npz_of_images_and_captions(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 80)
    images = (labels[:, None, None, None] * 60 + rng.integers(0, 30, (80, 8, 8, 1))).astype(np.uint8)
    captions = np.array([f"brightness level {k}" for k in labels])
    np.savez(tmp_path / "quad.npz", images=images, captions=captions)
    metrics = clip.main(tiny_args(tmp_path / "o", "--data", tmp_path / "quad.npz", "--image_size", 8, "--patch_size", 2,
                                  "--max_steps", 150, "--lr", 3e-3))
    assert metrics["test_size"] == 8 and "zero_shot_test_accuracy" not in metrics  # no labels: retrieval only
    assert metrics["t2i_R@1"] == 1.0 and metrics["i2t_R@1"] == 1.0


####################################################################################################
# Published weights: OpenAI CLIP's image tower
####################################################################################################

TEXT_KEYS = {"token_embedding.weight": torch.zeros(10, 8), "positional_embedding": torch.zeros(7, 8),
             "ln_final.weight": torch.ones(8), "text_projection": torch.zeros(8, 16), "logit_scale": torch.tensor(4.6)}


def random_tower(size=16, patch=4, dim=32, depth=2, heads=2, embed=16, seed=0, **layout):
    """An image encoder whose every parameter (norms and biases included) is random."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY, image_size=size, patch_size=patch, dim=dim, depth=depth, num_heads=heads,
                              embed_dim=embed, **layout)
    encoder = clip.build_model(cfg).image_encoder.eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return encoder


def load_tower(path, size=16, **flags):
    cfg, sd = clip.init_config(dataclasses.replace(TINY, init=str(path), image_size=size, **flags))
    encoder = clip.build_model(cfg).image_encoder.eval()
    left_out = clip.load_openai_visual(encoder, sd)
    return cfg, encoder, left_out


@given(patch_bias=st.booleans(), act=st.sampled_from(["gelu", "quick_gelu"]),
       input_norm=st.sampled_from(["unit", "imagenet", "clip"]), seed=seeds)
def test_openai_layout_round_trip_gives_identical_embeddings(tmp_path_factory, patch_bias, act, input_norm, seed):
    encoder = random_tower(seed=seed % 2**16, patch_bias=patch_bias, act=act, input_norm=input_norm)
    sd = clip.openai_visual_state_dict(encoder)
    assert "visual.conv1.weight" in sd and sd["visual.proj"].shape == (32, 16)
    assert sd["visual.transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    path = tmp_path_factory.mktemp("w") / "clip.pt"
    torch.save({**sd, **TEXT_KEYS}, path)
    cfg, loaded, left_out = load_tower(path, act=act, input_norm=input_norm, init_heads=2)
    assert (cfg.patch_size, cfg.dim, cfg.depth, cfg.embed_dim, cfg.patch_bias) == (4, 32, 2, 16, patch_bias)
    assert left_out == len(TEXT_KEYS)  # the text tower's tensors are counted, not loaded
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=0)


def test_openai_defaults_are_openais_conventions(tmp_path):
    """--init alone: QuickGELU, CLIP's pixel statistics, width / 64 heads, no patch bias."""
    encoder = random_tower(dim=128, heads=2, patch_bias=False, act="quick_gelu", input_norm="clip")
    torch.save(clip.openai_visual_state_dict(encoder), tmp_path / "w.pt")
    cfg, loaded, _ = load_tower(tmp_path / "w.pt")
    assert (cfg.act, cfg.input_norm, cfg.num_heads, cfg.patch_bias) == ("quick_gelu", "clip", 2, False)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=0)


def test_openai_position_resizing_at_load_equals_resizing_after_load(tmp_path):
    encoder = random_tower(size=16, patch=4)  # a 4x4 grid
    torch.save(clip.openai_visual_state_dict(encoder), tmp_path / "w.pt")
    for grid in (2, 3, 6):
        _, loaded, _ = load_tower(tmp_path / "w.pt", size=4 * grid, init_heads=2, act="gelu", input_norm="unit")
        after = clip.resize_pos_embed(encoder.pos_embed.detach(), (4, 4), (grid, grid), num_prefix_tokens=1)
        torch.testing.assert_close(loaded.pos_embed.detach(), after, rtol=0, atol=0)
        assert torch.equal(loaded.pos_embed[0, 0], encoder.pos_embed[0, 0])  # the class row is kept


def test_openai_loader_names_a_missing_an_extra_and_a_misshapen_tensor(tmp_path):
    sd = clip.openai_visual_state_dict(random_tower())
    cases = {"missing": ({k: v for k, v in sd.items() if k != "visual.ln_post.bias"}, "does not set: ln_post.bias"),
             "extra": ({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)},
                       "no place for: visual.transformer.resblocks.0.ls_1.gamma"),
             "misshapen": ({**sd, "visual.ln_pre.weight": torch.ones(33)}, r"ln_pre.weight \(33,\) vs \(32,\)"),
             "resnet": ({**sd, "visual.layer1.0.conv1.weight": torch.ones(1)}, "a ResNet image tower"),
             "not clip": ({"conv.weight": torch.ones(3)}, "not an image tower in OpenAI CLIP's layout")}
    for name, (bad, message) in cases.items():
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(clip.InputError, match=message):
            load_tower(tmp_path / f"{name}.pt", init_heads=2)


def test_openai_torchscript_archives_are_read_without_running_their_code(tmp_path):
    encoder = random_tower(patch_bias=False, act="quick_gelu", input_norm="clip")
    sd = clip.openai_visual_state_dict(encoder)

    class Holder(torch.nn.Module):  # a TorchScript module whose state dict has OpenAI's names
        def __init__(self):
            super().__init__()
            for name, value in sd.items():
                self.register_buffer(name.replace(".", "__"), value)

    scripted = torch.jit.script(Holder())
    scripted.save(str(tmp_path / "ViT.pt"))
    loaded_sd, _ = clip.read_state_dict(str(tmp_path / "ViT.pt"))
    assert {k.replace("__", "."): v for k, v in loaded_sd.items()}.keys() == sd.keys()


def test_centroid_accuracy_oracle():
    emb = F.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [0.1, 0.8]]), dim=-1)
    labels = np.array([3, 3, 7, 7])
    assert clip.centroid_accuracy(emb, labels, emb, labels) == 1.0
    assert clip.centroid_accuracy(emb, labels, emb, labels[::-1].copy()) == 0.0


def test_cli_init_evaluates_features_and_trains(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    images = np.zeros((60, 16, 16, 3), np.uint8)
    images[np.arange(60), :, :, labels] = 200  # class k: channel k lit
    captions = np.array([f"an image of class {k}" for k in labels])
    np.savez(tmp_path / "rgb.npz", images=images, labels=labels, captions=captions)
    encoder = random_tower(patch_bias=False, act="quick_gelu", input_norm="clip")
    torch.save({**clip.openai_visual_state_dict(encoder), **TEXT_KEYS}, tmp_path / "w.pt")
    data = ["--data", tmp_path / "rgb.npz", "--init", tmp_path / "w.pt", "--init_heads", 2]
    metrics = clip.main(tiny_args(tmp_path / "a", *data, "--eval_only", 1))
    assert metrics["test_size"] == 6 and metrics["init_centroid_accuracy"] == 1.0  # colors: easy for any tower
    trained = clip.main(tiny_args(tmp_path / "b", *data, "--max_steps", 2, "--batch_size", 8))
    assert np.isfinite(trained["final_loss"])
    saved = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["config"]
    assert (saved["act"], saved["input_norm"], saved["patch_bias"], saved["init"]) == (
        "quick_gelu", "clip", False, str(tmp_path / "w.pt"))
    resumed = clip.main(tiny_args(tmp_path / "b", *data, "--max_steps", 3, "--batch_size", 8,
                                  "--resume", tmp_path / "b" / "ckpt.pt"))
    assert resumed["steps"] == 3


####################################################################################################
# Bad input: one clear error naming the flag or the file
####################################################################################################

def test_image_size_not_divisible_by_patch_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--image_size 18 is not divisible by --patch_size 4"):
        clip.main(tiny_args(tmp_path, "--image_size", 18))


def test_text_width_not_divisible_by_its_heads_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--text_dim 30 is not divisible by --text_heads 4"):
        clip.main(tiny_args(tmp_path, "--text_dim", 30, "--text_heads", 4))


def test_caption_longer_than_the_context_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--context_length 20: a text of .* UTF-8 bytes does not fit"):
        clip.main(tiny_args(tmp_path, "--context_length", 20))
    assert not (tmp_path / "ckpt.pt").exists()


####################################################################################################
# GPU only
####################################################################################################

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_bf16_compiled_training_on_cuda(tmp_path):
    metrics = clip.main(tiny_args(tmp_path, "--device", "cuda", "--max_steps", 4))
    assert np.isfinite(metrics["final_loss"]) and 0.0 <= metrics["zero_shot_test_accuracy"] <= 1.0
    start = json.loads(open(tmp_path / "log.jsonl").readline())
    assert start["device"].startswith("cuda")


@cuda
def test_bf16_autocast_embeddings_close_to_fp32_on_cuda():
    model = tiny_model().cuda().eval()
    images, ids = random_pairs(torch.Generator().manual_seed(0), 8)
    images, ids = images.cuda(), ids.cuda()
    with torch.no_grad():
        ref = model(images, ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(images, ids)
    for a, b in zip(low[:2], ref[:2]):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("width, depth", [(64, 4), (256, 2)])
def test_both_towers_start_from_openai_clips_initialisation(width, depth):
    torch.manual_seed(0)
    image = clip.ImageEncoder(32, 4, 3, width, depth, 4, 2.0, 64)
    text = clip.TextEncoder(32, width, depth, 4, 2.0, 64)
    clip.CLIP(image, text)
    residual = width ** -0.5 * (2 * depth) ** -0.5
    for tower in (image, text):
        for block in tower.blocks:
            for linear, std in ((block.attn.qkv, width ** -0.5), (block.attn.proj, residual),
                                (block.mlp.fc1, (2 * width) ** -0.5), (block.mlp.fc2, residual)):
                assert abs(linear.weight.std().item() / std - 1) < 0.1
                assert abs(linear.weight.mean().item()) < 0.1 * std
                assert torch.all(linear.bias == 0)
        assert abs(tower.proj.weight.std().item() * width ** 0.5 - 1) < 0.1
    assert abs(image.pos_embed.std().item() * width ** 0.5 - 1) < 0.1
    assert abs(text.token_embed.weight.std().item() / 0.02 - 1) < 0.1
