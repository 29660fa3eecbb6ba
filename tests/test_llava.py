"""What is specific to llava.py: the vision tokens, the splice, the label mask, the stages, the
clip.py tower, generation with the cache and left padding. The shared contract (resume, CLI,
bad flags, DDP) is tests/test_contract.py's."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import clip
import llava

TINY = llava.Config(**llava.PRESETS["tiny"])
CPU = llava.Runtime(torch.device("cpu"), None, False)
TOKENIZER = llava.ByteTokenizer()
texts = st.text(alphabet="abcdefghij ?.", max_size=12)


def tiny_model(seed=0, dtype=torch.float32, num_words=0, **overrides):
    torch.manual_seed(seed)
    return llava.build_model(dataclasses.replace(TINY, **overrides), num_words=num_words).to(dtype)


def tiny_images(n, seed=0):
    return llava.shapes_split("test", n, TINY.image_size, seed)


# ---------------------------------------------------------------- shapes and dtypes

@pytest.mark.parametrize("pool, crops, tokens", [(False, False, 16), (True, False, 4), (False, True, 80), (True, True, 20)])
def test_vision_tokens_have_the_lm_width_and_the_token_count_of_pooling_and_crops(pool, crops, tokens):
    model = tiny_model(pool=pool, crops=crops)
    x = llava.images_to_tensor(tiny_images(3)["images"])
    h_v = model.vision_tokens(x)
    assert h_v.shape == (3, tokens, TINY.lm_dim) == (3, model.num_vision_tokens, TINY.lm_dim) and h_v.dtype == torch.float32
    ids, _ = llava.encode_examples(TOKENIZER, ["q\n"] * 3, ["abc"] * 3, tokens, TINY.text_length)
    assert model(ids, x).shape == (3, ids.shape[1], llava.IMAGE_ID)


def test_pooling_averages_each_2x2_group_of_neighbouring_patches():
    grid = torch.arange(16.0).reshape(1, 16, 1)  # patch n = 4 * row + column
    pooled = llava.pool_2x2(grid, 4)[0, :, 0]
    assert pooled.tolist() == [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]


def test_the_views_are_the_image_then_its_quadrants_in_raster_order():
    x = torch.zeros(2, 3, 8, 8)
    for q, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        x[:, :, r:r + 4, c:c + 4] = q + 1.0  # each quadrant one value
    views = llava.image_views(x, crops=True)  # (B, 5, C, H, W)
    assert views.shape == (2, 5, 3, 8, 8) and torch.equal(views[:, 0], x)
    for q in range(4):
        assert torch.equal(views[:, q + 1], torch.full((2, 3, 8, 8), q + 1.0))


# ---------------------------------------------------------------- the splice and the label mask

@given(pairs=st.lists(st.tuples(texts, texts), min_size=1, max_size=4), num_vision=st.integers(0, 5))
def test_labels_are_ignore_exactly_at_image_prompt_and_padding_positions(pairs, num_vision):
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    ids, labels = llava.encode_examples(TOKENIZER, prompts, answers, num_vision, 40)
    for b, (prompt, answer) in enumerate(zip(prompts, answers)):
        answer_ids = list(answer.encode()) + [TOKENIZER.eos_id]
        first = 1 + num_vision + len(prompt.encode())
        expected = [llava.IGNORE] * first + answer_ids + [llava.IGNORE] * (ids.shape[1] - first - len(answer_ids))
        assert labels[b].tolist() == expected
        assert ids[b, :first].tolist() == [TOKENIZER.bos_id] + [llava.IMAGE_ID] * num_vision + list(prompt.encode())
        assert ids[b, first:first + len(answer_ids)].tolist() == answer_ids
        assert set(ids[b, first + len(answer_ids):].tolist()) <= {TOKENIZER.pad_id}


@given(seed=st.integers(0, 2 ** 31 - 1), prompts=st.lists(texts, min_size=1, max_size=4))
def test_logits_where_no_answer_follows_do_not_change_the_loss(seed, prompts):
    g = torch.Generator().manual_seed(seed)
    ids, labels = llava.encode_examples(TOKENIZER, prompts, ["yes"] * len(prompts), 3, 40)
    logits = torch.randn(*ids.shape, llava.IMAGE_ID, generator=g, dtype=torch.float64)
    scored = torch.zeros(ids.shape, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != llava.IGNORE  # slot t scores the token at t + 1
    noise = torch.randn(logits.shape, generator=g, dtype=torch.float64) * 10
    changed = torch.where(scored[..., None], logits, logits + noise)  # image, prompt, padding, last slot
    assert llava.answer_loss(changed, labels) == llava.answer_loss(logits, labels)
    assert llava.answer_loss(torch.where(scored[..., None], logits + noise, logits), labels) != llava.answer_loss(logits, labels)


@given(seed=st.integers(0, 2 ** 31 - 1), lengths=st.lists(st.integers(0, 6), min_size=1, max_size=4))
def test_the_projected_vision_tokens_sit_exactly_at_the_placeholders(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    ids, mask = llava.encode_prompts(TOKENIZER, ["x" * n for n in lengths], 4)  # left-padded: placeholders move
    embeds = torch.randn(*ids.shape, 8, generator=g)
    vision = torch.randn(len(lengths), 4, 8, generator=g)
    out = llava.splice(embeds, ids, vision)
    is_image = ids == llava.IMAGE_ID
    assert torch.equal(out[~is_image], embeds[~is_image])
    for b in range(len(lengths)):
        assert torch.equal(out[b, is_image[b]], vision[b])
        assert is_image[b].nonzero()[:, 0].tolist() == list(range(int((~mask[b]).sum()) + 1, int((~mask[b]).sum()) + 5))


def test_the_model_reads_the_image_only_through_the_placeholders():
    model = tiny_model(dtype=torch.float64)
    split = tiny_images(2)
    x = llava.images_to_tensor(split["images"]).double()
    ids, _ = llava.encode_examples(TOKENIZER, ["what?\n"] * 2, ["a"] * 2, model.num_vision_tokens, 40)
    first = 1 + model.num_vision_tokens
    logits, swapped = model(ids, x), model(ids, x.flip(0))
    assert torch.equal(logits[:, :1], swapped[:, :1])  # BOS sees no image token
    assert not torch.allclose(logits[:, first:], swapped[:, first:])


# ---------------------------------------------------------------- generation: left padding and the cache

def generate_ids(model, images, questions, use_cache=True, temperature=0.0, seed=0):
    ids, mask = llava.encode_prompts(TOKENIZER, [q + llava.SEP for q in questions], model.num_vision_tokens)
    embeds = model.embed(ids, llava.images_to_tensor(images).double())
    return llava.generate(model.lm, embeds, 12, temperature, prompt_mask=mask, eos_id=TOKENIZER.eos_id,
                          use_cache=use_cache, generator=torch.Generator().manual_seed(seed))


def test_a_left_padded_batch_generates_what_each_question_generates_alone():
    model = tiny_model(seed=1, dtype=torch.float64)
    images = tiny_images(4)["images"]
    questions = ["where?", "what color is the shape?", "", "is there a red circle?"]
    batch = generate_ids(model, images, questions)
    for b in range(4):
        assert torch.equal(batch[b], generate_ids(model, images[b:b + 1], questions[b:b + 1])[0])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_generation_equals_recomputing_the_whole_sequence(temperature):
    model = tiny_model(seed=2, dtype=torch.float64)
    images = tiny_images(3)["images"]
    questions = ["describe the image.", "what?", "where is it?"]
    cached = generate_ids(model, images, questions, True, temperature, seed=5)
    assert torch.equal(cached, generate_ids(model, images, questions, False, temperature, seed=5))


# ---------------------------------------------------------------- the stages: what trains

def one_step(model, stage, optimizer):
    split = tiny_images(4)
    images = llava.images_to_tensor(split["images"])
    if stage == 0:
        vocabulary = llava.word_vocabulary(split["captions"])
        llava.word_loss(model(None, images), llava.word_targets(split["captions"], vocabulary)).backward()
    else:
        prompts = [""] * 4 if stage < 3 else ["what shape is it?\n"] * 4
        answers = split["captions"] if stage < 3 else [llava.SHAPES[a] for a in split["attributes"][:, 0]]
        ids, labels = llava.encode_examples(TOKENIZER, prompts, answers, model.num_vision_tokens, TINY.text_length)
        llava.answer_loss(model(ids, images if stage > 1 else None), labels).backward()
    optimizer.step()


@pytest.mark.parametrize("stage, train_vision", [(0, False), (1, False), (2, False), (2, True), (3, False), (3, True)])
def test_frozen_parameters_get_no_gradient_and_do_not_change_and_the_optimizer_holds_only_the_rest(stage, train_vision):
    vocabulary = llava.word_vocabulary(tiny_images(4)["captions"])
    model = tiny_model(vision_depth=2, num_words=len(vocabulary))
    llava.set_trainable(model, stage, train_vision, align_vision=train_vision)  # stage 2 reads align_vision
    optimizer = llava.make_optimizer(model, 1e-2, 0.05, CPU)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    tower = ("tower.",) if train_vision and stage > 1 else ()
    expected = {0: ("tower.", "word_head."), 1: ("lm.",), 2: ("projector.",) + tower,
                3: ("lm.", "projector.") + tower}[stage]
    assert {n.split(".")[0] + "." for n in trains} == set(expected)
    # the tower's last block, ln_post and proj are never read, so they never train
    assert not any(n.startswith(("tower.blocks.1.", "tower.ln_post", "tower.proj")) for n in trains)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    one_step(model, stage, optimizer)
    for n, p in model.named_parameters():
        if n not in trains:
            assert p.grad is None and torch.equal(p, before[n]), n
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trains and p.dim() >= 2 and "embed" not in n)


def test_stages_follow_the_step_count_and_the_tower_trains_by_default_only_when_nothing_trained_it():
    cfg = dataclasses.replace(TINY, vision_steps=2, lm_steps=3, align_steps=2, max_steps=10)
    assert [llava.stage_of(s, cfg) for s in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # a CLIP tower skips stage 0, and its steps go to stage 3
    clip_cfg = dataclasses.replace(cfg, vision_init="x.pt")
    assert [llava.stage_of(s, clip_cfg) for s in range(10)] == [1, 1, 1, 2, 2, 3, 3, 3, 3, 3]
    assert llava.has_vision_stage(cfg) and not llava.has_vision_stage(clip_cfg)
    assert not llava.has_vision_stage(dataclasses.replace(cfg, vision_steps=0))
    # auto: only a tower that neither stage 0 nor clip.py trained learns in stage 3
    no_stage_0 = dataclasses.replace(cfg, vision_steps=0)
    assert llava.tower_trains(no_stage_0) and not llava.tower_trains(cfg) and not llava.tower_trains(clip_cfg)
    assert llava.tower_trains(dataclasses.replace(clip_cfg, train_vision="1"))
    assert llava.tower_trains(dataclasses.replace(cfg, train_vision="1"))
    assert not llava.tower_trains(dataclasses.replace(no_stage_0, train_vision="0"))
    # stage 2 trains the tower only when it is random, trains, and skipped stage 0
    assert llava.tower_aligns(no_stage_0) and not llava.tower_aligns(dataclasses.replace(no_stage_0, train_vision="0"))
    assert not llava.tower_aligns(cfg) and not llava.tower_aligns(dataclasses.replace(clip_cfg, train_vision="1"))


# ---------------------------------------------------------------- stage 0: the words of the captions

def test_the_vocabulary_keeps_the_most_frequent_words_and_the_targets_mark_each_one_present():
    captions = ["a red circle", "a red square", "There is a Red circle."]  # a 3, red 3, circle 2, the rest 1
    assert llava.word_vocabulary(captions) == ["a", "circle", "is", "red", "square", "there"]
    assert llava.word_vocabulary(captions, max_words=3) == ["a", "circle", "red"]
    targets = llava.word_targets(["a red red circle", "blue", "RED!"], ["a", "circle", "red"])
    assert targets.tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 1]]
    assert llava.caption_words("Ein grüner Würfel, 3 mal.") == ["ein", "grüner", "würfel", "3", "mal"]


def test_captions_without_words_are_one_clear_error_unless_stage_0_is_off(tmp_path):
    split = llava.shapes_split("train", 40, 16, 0)
    np.savez(tmp_path / "marks.npz", images=split["images"], captions=np.array(["?!"] * 40))
    flags = ["--preset", "tiny", "--out_dir", str(tmp_path / "out"), "--data", str(tmp_path / "marks.npz")]
    with pytest.raises(SystemExit) as e:
        llava.main(flags)
    assert str(e.value.code) == (f"error: --data {tmp_path / 'marks.npz'}: its captions hold no words for stage 0 "
                                 f"to learn; pass --vision_steps 0")
    assert "test_accuracy_describe" in llava.main(flags + ["--vision_steps", "0"])


@given(st.lists(st.lists(st.tuples(st.floats(-30, 30), st.booleans()), min_size=3, max_size=3), min_size=1, max_size=4))
def test_the_word_loss_is_the_binary_cross_entropy_summed_over_words_and_averaged_over_images(rows):
    logits = torch.tensor([[s for s, _ in row] for row in rows], dtype=torch.float64)
    targets = torch.tensor([[float(y) for _, y in row] for row in rows])
    # -log sigma(s) for a word in the caption, -log(1 - sigma(s)) = -log sigma(-s) for one that is not
    expected = np.mean([sum(np.logaddexp(0.0, -s if y else s) for s, y in row) for row in rows])
    assert llava.word_loss(logits, targets).item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_a_tiny_tower_learns_the_color_words_of_its_captions():
    split = llava.shapes_split("train", 64, TINY.image_size, 4)
    vocabulary = llava.word_vocabulary(split["captions"])
    model = tiny_model(vision_depth=2, num_words=len(vocabulary))
    llava.set_trainable(model, 0, False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    images, targets = llava.images_to_tensor(split["images"]), llava.word_targets(split["captions"], vocabulary)
    before = llava.word_scores(model, split, vocabulary, CPU)
    for _ in range(300):
        optimizer.zero_grad()
        llava.word_loss(model(None, images), targets).backward()
        optimizer.step()
    after = llava.word_scores(model, split, vocabulary, CPU)
    # one color in five goes unnamed by its caption (CAPTION_NAME_PROB), and chance is 1 in 7
    assert after["word_loss"] < 0.5 * before["word_loss"] and after["word_accuracy_color"] >= 0.7 > before["word_accuracy_color"]


# ---------------------------------------------------------------- the instruction data

def test_no_training_question_names_a_heldout_pair_but_the_heldout_split_asks_about_them():
    split = llava.shapes_split("train", 64, 16, 0)
    heldout_names = {f"{c} {s}" for s, c in llava.HELDOUT_PAIRS}
    for step in range(30):
        questions, answers = llava.instruction_batch(split, list(range(64)), step, 0, llava.KINDS, None, 64)
        assert not any(name in q + a for q, a in zip(questions, answers) for name in heldout_names)
    held = llava.shapes_split("heldout", 40, 16, 0)
    rows = llava.eval_questions("heldout", held, 0, llava.KINDS)
    assert any(name in q and a == "yes" for _, kind, q, a in rows for name in heldout_names)
    assert {kind for _, kind, _, _ in rows} == set(llava.KINDS) and len(rows) == 40 * len(llava.KINDS)


def test_stage_3_asks_each_kind_in_the_proportions_of_the_question_mix():
    split = llava.shapes_split("train", 64, 16, 0)
    def kind_of(question):
        return next(k for k in llava.KINDS for t in llava.QUESTIONS[k] if question[:-1] == t or
                    ("{" in t and question.startswith(t.split("{")[0])))
    counts = {k: 0 for k in llava.KINDS}
    for step in range(200):
        questions, _ = llava.instruction_batch(split, list(range(64)), step, 0, llava.KINDS, None, 64)
        for q in questions:
            counts[kind_of(q)] += 1
    total = sum(llava.QUESTION_MIX[k] for k in llava.KINDS)
    for k in llava.KINDS:  # 12800 draws: the binomial standard deviation of a share is below 0.004
        assert abs(counts[k] / 12800 - llava.QUESTION_MIX[k] / total) < 0.02, (k, counts)


def test_yes_no_questions_are_half_true_and_the_answers_follow_the_attributes():
    split = llava.shapes_split("test", 400, 16, 0)
    rows = [r for r in llava.eval_questions("test", split, 0, llava.KINDS) if r[1] == "yes_no"]
    assert 0.4 < np.mean([a == "yes" for *_, a in rows]) < 0.6
    for i, _, q, a in rows:
        shape, color = split["attributes"][i, :2]
        assert (f"{llava.COLOR_NAMES[color]} {llava.SHAPES[shape]}?" in q) == (a == "yes")


# ---------------------------------------------------------------- learning

def test_a_tiny_model_learns_to_answer_the_same_question_about_different_images():
    model = tiny_model(lm_dim=64, lm_heads=4, vision_depth=2)
    llava.set_trainable(model, 3, True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    split = tiny_images(32, seed=3)
    pick = [int(np.flatnonzero(split["attributes"][:, 1] == c)[0]) for c in range(4)]  # four colors
    images, questions = split["images"][pick], ["what color is it?"] * 4
    answers = [llava.COLOR_NAMES[c] for c in range(4)]
    ids, labels = llava.encode_examples(TOKENIZER, [q + llava.SEP for q in questions], answers, 16, TINY.text_length)
    x = llava.images_to_tensor(images)
    for _ in range(300):
        optimizer.zero_grad()
        llava.answer_loss(model(ids, x), labels).backward()
        optimizer.step()
    assert llava.answer_questions(model, TOKENIZER, images, questions, 8) == answers


# ---------------------------------------------------------------- the clip.py tower

@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip-tiny")
    clip.main(["--preset", "tiny", "--out_dir", str(out)])
    return out / "ckpt.pt"


def test_a_clip_checkpoint_maps_every_tower_key_and_gives_clips_image_features(clip_checkpoint):
    ckpt = torch.load(clip_checkpoint, weights_only=True)
    model = tiny_model(seed=7)
    keys = llava.load_tower(model.tower, llava.read_clip_tower(str(clip_checkpoint), TINY), clip_checkpoint)
    assert keys == sorted(k[len("image_encoder."):] for k in ckpt["model"] if k.startswith("image_encoder."))
    assert keys == sorted(model.tower.state_dict())
    reference = clip.build_model(clip.Config(**ckpt["config"]))
    reference.load_state_dict(ckpt["model"])
    x = llava.images_to_tensor(tiny_images(5)["images"])
    with torch.no_grad():
        assert torch.equal(model.tower(x), reference.image_encoder(x))
        assert torch.equal(model.tower.tokens(x, -1), reference.image_encoder.tokens(x, -1))


def test_training_from_a_clip_tower_freezes_it_and_keeps_its_weights(clip_checkpoint, tmp_path):
    llava.main(["--preset", "tiny", "--out_dir", str(tmp_path), "--vision_init", str(clip_checkpoint)])
    tower = {k[len("tower."):]: v for k, v in torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"].items()
             if k.startswith("tower.")}
    saved = torch.load(clip_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(v, saved["image_encoder." + k]) for k, v in tower.items())


def test_a_bad_vision_init_is_one_clear_error(clip_checkpoint, tmp_path):
    def error(*flags):
        with pytest.raises(SystemExit) as e:
            llava.main(["--preset", "tiny", "--out_dir", str(tmp_path), *map(str, flags)])
        return str(e.value.code)

    assert "no such file" in error("--vision_init", tmp_path / "missing.pt")
    torch.save({"model_name": "vit", "model": {}, "config": {}}, tmp_path / "vit.pt")
    assert "not a checkpoint written by clip.py" in error("--vision_init", tmp_path / "vit.pt")
    assert "another shape; pass --vision_dim 32" in error("--vision_init", clip_checkpoint, "--vision_dim", 64)
    ckpt = torch.load(clip_checkpoint, weights_only=True)
    del ckpt["model"]["image_encoder.ln_pre.weight"]
    torch.save(ckpt, tmp_path / "cut.pt")
    message = error("--vision_init", tmp_path / "cut.pt")
    assert message.startswith("error: --vision_init") and "missing ['ln_pre.weight']" in message


# ---------------------------------------------------------------- real data and bad inputs

def test_cli_trains_on_a_grayscale_npz_with_captions_and_labels(tmp_path):
    split = llava.shapes_split("train", 60, 16, 0)
    gray = split["images"].max(axis=3, keepdims=True)
    np.savez(tmp_path / "gray.npz", images=gray, captions=np.array(split["captions"]), labels=split["attributes"][:, 0],
             class_names=np.array(llava.SHAPES))
    metrics = llava.main(["--preset", "tiny", "--out_dir", str(tmp_path / "out"), "--data", str(tmp_path / "gray.npz")])
    assert {"test_accuracy_describe", "test_accuracy_class"} <= set(metrics)
    logged = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert sum("caption_nll_with_image" in row for row in logged) == 2  # at the end of stages 1 and 2
    assert sum("word_loss" in row for row in logged) == 1  # at the end of stage 0
    assert list((tmp_path / "out").glob("answers_test.png"))


@pytest.mark.parametrize("flags, message", [
    (["--pool", "1", "--patch_size", "16"], "--pool 1 averages 2x2 patch tokens"),
    (["--projector", "conv"], "--projector conv: expected linear or mlp"),
    (["--train_vision", "yes"], "--train_vision yes: expected auto, 0 or 1"),
    (["--lm_dim", "31"], "--lm_dim 31 is not divisible by --lm_heads 2"),
    (["--text_length", "40"], "--text_length 40: the longest caption or question and answer takes"),
])
def test_bad_llava_flags_are_one_clear_error(flags, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        llava.main(["--preset", "tiny", "--out_dir", str(tmp_path), *flags])
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)


def test_an_npz_without_captions_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "plain.npz", images=np.zeros((20, 16, 16, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        llava.main(["--preset", "tiny", "--out_dir", str(tmp_path), "--data", str(tmp_path / "plain.npz")])
    assert "needs a 'captions' array" in str(e.value.code)


# ---------------------------------------------------------------- GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cached_generation_on_gpu_equals_recomputing():
    model = tiny_model(seed=3).cuda()
    split, questions = tiny_images(8), ["where is it?", "describe the image."] * 4
    cached = llava.answer_questions(model, TOKENIZER, split["images"], questions, 10)
    assert cached == llava.answer_questions(model, TOKENIZER, split["images"], questions, 10, use_cache=False)
