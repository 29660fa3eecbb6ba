"""vit.py: shapes, the lecture's math, the shapes world, learning, resume, CLI, bad inputs, GPU."""

import json
import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import vit


def tiny_args(out_dir, *extra):
    return ["--preset", "tiny", "--out_dir", str(out_dir), *map(str, extra)]


# ---------------------------------------------------------------- shapes and dtypes

@given(batch=st.integers(1, 3), channels=st.sampled_from([1, 3]), patch=st.sampled_from([1, 2, 4]),
       grid_h=st.integers(1, 4), grid_w=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_patchify_gives_N_patches_of_P2C_and_unpatchify_inverts_it(batch, channels, patch, grid_h, grid_w, seed):
    H, W = grid_h * patch, grid_w * patch
    x = torch.randn(batch, channels, H, W, generator=torch.Generator().manual_seed(seed))
    x_p = vit.patchify(x, patch)
    assert x_p.shape == (batch, H * W // patch**2, patch * patch * channels)
    assert torch.equal(vit.unpatchify(x_p, patch, H, W), x)


def test_patch_vector_layout_is_row_column_channel():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)  # (B, C, H, W)
    x_p = vit.patchify(x, 2)
    # patch 1 is the top-right 2x2 block; its vector runs over (row, column, channel)
    expected = [x[0, c, i, 2 + j] for i in range(2) for j in range(2) for c in range(2)]
    assert x_p[0, 1].tolist() == torch.stack(expected).tolist()


@given(seed=st.integers(0, 2**16), patch=st.sampled_from([2, 4]), channels=st.sampled_from([1, 3]))
def test_conv_patch_embedding_equals_patchify_then_linear_map(seed, patch, channels):
    torch.manual_seed(seed)
    embed = vit.PatchEmbed(patch, channels, 8)
    x = torch.randn(2, channels, 4 * patch, 4 * patch, generator=torch.Generator().manual_seed(seed))
    W_e = vit.patch_embedding_matrix(embed.proj)  # (P^2 C, D)
    assert W_e.shape == (patch * patch * channels, 8)
    torch.testing.assert_close(embed(x), vit.patchify(x, patch) @ W_e + embed.proj.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_model_maps_images_to_logits_and_attention_maps(pool):
    cfg = vit.Config(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2, pool=pool)
    model = vit.build_model(cfg, num_classes=5)
    logits, attns = model(torch.randn(3, 3, 16, 16), return_attn=True)
    T = 16 + (pool == "cls")
    assert logits.shape == (3, 5) and logits.dtype == torch.float32
    assert len(attns) == 2 and all(a.shape == (3, 2, T, T) for a in attns)


# ---------------------------------------------------------------- the math

@given(seed=st.integers(0, 2**16), tokens=st.integers(1, 12), head_dim=st.sampled_from([4, 8]),
       masked=st.booleans())
def test_sdpa_equals_explicit_softmax_attention_and_rows_sum_to_one(seed, tokens, head_dim, masked):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, tokens, head_dim, generator=g) for _ in range(3))
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril() if masked else None
    out, weights = vit.attention_reference(q, k, v, mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, tokens))
    if masked:
        assert (weights.triu(diagonal=1) == 0).all()


def test_attention_module_returns_the_same_output_with_and_without_weights():
    torch.manual_seed(0)
    attn = vit.Attention(16, 4)
    x = torch.randn(2, 5, 16)
    out, weights = attn(x, return_attn=True)
    torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-5)
    assert weights.shape == (2, 4, 5, 5)


@given(seed=st.integers(0, 2**16), pool=st.sampled_from(["cls", "mean"]))
def test_without_positions_encoder_is_permutation_equivariant_and_pooling_invariant(seed, pool):
    torch.manual_seed(seed)
    cfg = vit.Config(image_size=8, patch_size=2, dim=16, depth=2, num_heads=2, pool=pool)
    model = vit.build_model(cfg, num_classes=3).eval()
    with torch.no_grad():
        model.pos_embed.zero_()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    perm = torch.randperm(16, generator=g)
    x_perm = vit.unpatchify(vit.patchify(x, 2)[:, perm], 2, 8, 8)  # the same patches, shuffled
    with torch.no_grad():
        tokens, tokens_perm = model.encode(x), model.encode(x_perm)
        prefix = 1 if pool == "cls" else 0
        torch.testing.assert_close(tokens_perm[:, prefix:], tokens[:, prefix:][:, perm], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x_perm), model(x), rtol=1e-4, atol=1e-5)
    # and the position embeddings are what breaks the symmetry
    with torch.no_grad():
        model.pos_embed.normal_()
        assert not torch.allclose(model(x_perm), model(x), atol=1e-4)


@given(seed=st.integers(0, 2**16), gh=st.integers(1, 6), gw=st.integers(1, 6))
def test_resizing_position_embeddings_to_the_same_grid_is_the_identity(seed, gh, gw):
    pos = torch.randn(1, gh * gw, 8, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(vit.resize_pos_embed(pos, (gh, gw), (gh, gw)), pos, rtol=1e-5, atol=1e-5)


def test_resized_position_embeddings_let_the_model_run_at_another_resolution():
    model = vit.build_model(vit.Config(image_size=16, patch_size=4, dim=16, depth=1, num_heads=2), 3)
    pos = torch.ones(1, 16, 16) * torch.arange(16.0)  # constant along the grid: stays constant
    torch.testing.assert_close(vit.resize_pos_embed(pos, (4, 4), (6, 6)), torch.ones(1, 36, 16) * torch.arange(16.0))
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 3)


def test_mean_attention_distance_oracles():
    grid, P = (3, 3), 4
    N = 9
    eye = torch.eye(N).expand(1, 2, N, N)
    assert torch.allclose(vit.mean_attention_distance(eye, grid, P, 0), torch.zeros(2))
    uniform = torch.full((1, 1, N, N), 1.0 / N)
    centres = torch.tensor([[r * P, c * P] for r in range(3) for c in range(3)], dtype=torch.float32)
    expected = torch.cdist(centres, centres).mean()
    torch.testing.assert_close(vit.mean_attention_distance(uniform, grid, P, 0), expected.reshape(1))
    # every query looks at its right-hand neighbour (or itself in the last column): 4 px or 0 px
    shift = torch.zeros(1, 1, N, N)
    for i in range(N):
        shift[0, 0, i, i + 1 if i % 3 < 2 else i] = 1.0
    torch.testing.assert_close(vit.mean_attention_distance(shift, grid, P, 0), torch.tensor([4.0 * 6 / 9]))
    # a class token row/column is dropped and the rest renormalised
    with_cls = torch.zeros(1, 1, N + 1, N + 1)
    with_cls[0, 0, :, 0] = 0.5
    with_cls[0, 0, 1:, 1:] = 0.5 * torch.eye(N)
    assert torch.allclose(vit.mean_attention_distance(with_cls, grid, P, 1), torch.zeros(1))
    # a query mask averages over the chosen queries only: the last column's queries look at themselves
    last_column = torch.tensor([[i % 3 == 2 for i in range(N)]])
    assert torch.allclose(vit.mean_attention_distance(shift, grid, P, 0, last_column), torch.zeros(1))
    torch.testing.assert_close(vit.mean_attention_distance(shift, grid, P, 0, ~last_column), torch.tensor([4.0]))


def test_drop_path_is_identity_in_eval_and_unbiased_in_training():
    dp = vit.DropPath(0.3)
    x = torch.ones(20000, 4)
    assert torch.equal(dp.eval()(x), x)
    y = dp.train()(x)
    kept = (y[:, 0] != 0).float().mean().item()
    assert abs(kept - 0.7) < 0.02 and abs(y.mean().item() - 1.0) < 0.03
    torch.testing.assert_close(torch.unique(y), torch.tensor([0.0, 1.0 / 0.7]))


# ---------------------------------------------------------------- the shapes world

def test_renderer_is_deterministic_per_index():
    a = vit.shapes_split("train", 30, 32, seed=3)
    b = vit.shapes_split("train", 60, 32, seed=3)  # a longer split starts with the same samples
    assert np.array_equal(a["images"], b["images"][:30]) and a["captions"] == b["captions"][:30]
    c = vit.shapes_split("train", 30, 32, seed=4)
    assert not np.array_equal(a["images"], c["images"])
    assert a["images"].dtype == np.uint8 and a["images"].shape == (30, 32, 32, 3)


def test_train_and_test_never_contain_heldout_pairs_and_heldout_only_them():
    heldout = {(vit.SHAPES.index(s), vit.COLOR_NAMES.index(c)) for s, c in vit.HELDOUT_PAIRS}
    for split in ["train", "test"]:
        pairs = {tuple(p) for p in vit.shapes_split(split, 400, 16, 0)["attributes"][:, :2]}
        assert not pairs & heldout and len(pairs) == 18
    pairs = {tuple(p) for p in vit.shapes_split("heldout", 100, 16, 0)["attributes"][:, :2]}
    assert pairs == heldout


@pytest.mark.parametrize("size", [24, 32, 64])
def test_detector_reads_back_the_attributes_of_clean_test_renders(size):
    data = vit.shapes_split("test", 600, size, seed=1)
    found = vit.detect_attributes(data["images"])
    accuracy = (found == data["attributes"]).all(axis=1).mean()
    assert accuracy >= 0.99, f"detector reads {accuracy:.3f} of {size}px renders"


def test_detector_finds_nothing_on_black_and_is_not_fooled_by_a_wrong_color():
    assert (vit.detect_attributes(np.zeros((2, 32, 32, 3), np.uint8)) == -1).all()
    data = vit.shapes_split("test", 50, 32, seed=0)
    swapped = data["images"][..., ::-1]  # BGR: red and blue swap, so some colors must change
    changed = vit.detect_attributes(np.ascontiguousarray(swapped))[:, 1] != data["attributes"][:, 1]
    assert changed.any()


def test_captions_name_exactly_the_attributes_they_mark_as_named():
    data = vit.shapes_split("train", 400, 32, 0)
    words = [vit.SHAPES, vit.COLOR_NAMES, vit.SIZES, vit.POSITIONS]
    for attrs, named, caption in zip(data["attributes"], data["caption_attributes"], data["captions"]):
        assert (named >= 0).any() and ((named == attrs) | (named == -1)).all()
        for k in range(4):
            if named[k] >= 0:
                assert words[k][attrs[k]] in caption, (caption, k)
            else:  # no word of an unnamed attribute appears
                assert not any(w in caption.replace(",", "").split() for value in words[k] for w in value.split()), caption
    assert len({c.split()[0] for c in data["captions"]}) > 2  # more than one phrasing


def test_captions_name_each_attribute_with_its_probability():
    named = vit.shapes_split("test", 3000, 16, 0)["caption_attributes"] >= 0
    p = np.array(vit.CAPTION_NAME_PROB)
    none = np.prod(1 - p)
    expected = p / (1 - none)  # P(named | at least one named)
    np.testing.assert_allclose(named.mean(axis=0), expected, atol=0.03)
    shape_and_color_only = (named == [True, True, False, False]).all(axis=1).mean()
    assert shape_and_color_only == pytest.approx(p[0] * p[1] * (1 - p[2]) * (1 - p[3]) / (1 - none), abs=0.02)


@pytest.mark.parametrize("named, phrasing, caption", [
    ((True, True, False, False), 0, "a red circle"),
    ((True, True, True, True), 0, "a large red circle at the top left"),
    ((True, False, True, True), 1, "there is a large circle in the top left"),
    ((False, True, False, True), 2, "something red in the top left"),
    ((False, True, True, False), 2, "something large and red"),
    ((False, False, False, True), 0, "a shape at the top left"),
])
def test_caption_phrasings(named, phrasing, caption):
    assert vit.shapes_caption((0, 0, 1, 0), phrasing, named) == caption
    assert vit.shapes_caption((1, 2, 0, 1), 0, (True, True, True, True)) == "a small blue square at the top"
    assert vit.shapes_caption((1, 2, 0, 3), 1, (False, False, False, True)) == "there is a shape on the left"


def test_png_writer_writes_a_decodable_png(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    vit.save_png(str(path), img)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    rows = zlib.decompress(idat)
    decoded = np.frombuffer(rows, np.uint8).reshape(5, 1 + 7 * 3)[:, 1:].reshape(5, 7, 3)
    assert np.array_equal(decoded, img)


def test_draw_text_marks_pixels_inside_the_text_box_only():
    canvas = np.zeros((10, 40, 3), np.uint8)
    vit.draw_text(canvas, "ab1", 2, 2)
    ys, xs = np.nonzero(canvas[..., 0])
    assert len(ys) > 10 and ys.min() >= 2 and ys.max() < 7 and xs.min() >= 2 and xs.max() < 2 + 12


@given(step=st.integers(0, 500), world=st.sampled_from([1, 2, 4]))
def test_ranks_split_exactly_the_single_process_batch(step, world):
    full = vit.batch_indices(step, 100, 8, seed=0)
    parts = torch.cat([vit.batch_indices(step, 100, 8, 0, r, world) for r in range(world)])
    assert torch.equal(parts, full)
    epoch = torch.cat([vit.batch_indices(s, 100, 8, 0) for s in range(12)])  # 12 steps = 1 epoch
    assert len(set(epoch.tolist())) == 96


@given(value=st.floats(allow_nan=True, allow_infinity=True), low=st.integers(-3, 3), width=st.integers(1, 4))
def test_range_specs_mean_what_they_say(value, low, width):
    high = low + width
    finite = math.isfinite(value)
    assert vit.in_range(value, f">= {low}") == (finite and value >= low)
    assert vit.in_range(value, f"> {low}") == (finite and value > low)
    assert vit.in_range(value, f"[{low}, {high})") == (finite and low <= value < high)
    assert vit.in_range(value, f"[{low}, {high}]") == (finite and low <= value <= high)
    assert vit.in_range(value, f"({low}, {high})") == (finite and low < value < high)


def test_config_help_comes_from_the_field_comments():
    helps = vit.config_help(vit.Config)
    assert helps["patch_size"].startswith("P: side of a square patch")
    cfg = vit.parse_config(vit.Config, vit.PRESETS, ["--preset", "tiny", "--image_size", "32", "--eval_only", "1"])
    assert cfg.image_size == 32 and cfg.dim == vit.PRESETS["tiny"]["dim"] and cfg.eval_only is True


# ---------------------------------------------------------------- learning

def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    data = vit.shapes_split("train", 16, 16, seed=0)
    x, y = vit.images_to_tensor(data["images"]), torch.as_tensor(data["labels"])
    model = vit.build_model(vit.Config(image_size=16, patch_size=4, dim=32, depth=2, num_heads=2), 21)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = vit.classification_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert (model(x).argmax(1) == y).all()


# ---------------------------------------------------------------- CLI

def test_cli_trains_on_a_real_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 80)
    noise = rng.integers(0, 30, (80, 8, 8, 1))
    images = (labels[:, None, None, None] * 60 + noise).astype(np.uint8)  # class k: brightness level k
    np.savez(tmp_path / "quad.npz", images=images, labels=labels, class_names=np.array(["a", "b", "c", "d"]))
    metrics = vit.main(["--preset", "tiny", "--data", str(tmp_path / "quad.npz"), "--image_size", "8",
                        "--patch_size", "2", "--max_steps", "150", "--batch_size", "16", "--out_dir", str(tmp_path / "o")])
    assert metrics["test_size"] == 8 and metrics["test_accuracy"] == 1.0


# ---------------------------------------------------------------- published weights: timm's layout

def random_vit(size=16, patch=4, dim=32, depth=2, heads=2, classes=5, seed=0, **layout):
    """A ViT whose every parameter (norms and biases included) is random, so a wrong map shows."""
    torch.manual_seed(seed)
    cfg = vit.Config(image_size=size, patch_size=patch, dim=dim, depth=depth, num_heads=heads, **layout)
    model = vit.build_model(cfg, classes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return cfg, model


def load_from_file(path, size=16, classes=5, **flags):
    cfg, sd = vit.init_config(vit.Config(init=str(path), image_size=size, **flags))
    model = vit.build_model(cfg, classes).eval()
    vit.load_timm_weights(model, sd)
    return cfg, model


@given(pos_embed_cls=st.booleans(), norm_pre=st.booleans(), patch_bias=st.booleans(),
       act=st.sampled_from(["gelu", "quick_gelu"]), input_norm=st.sampled_from(["unit", "imagenet", "clip"]),
       seed=st.integers(0, 2**16))
def test_timm_layout_round_trip_gives_identical_logits(tmp_path_factory, pos_embed_cls, norm_pre, patch_bias, act,
                                                       input_norm, seed):
    layout = dict(pos_embed_cls=pos_embed_cls, norm_pre=norm_pre, patch_bias=patch_bias, act=act,
                  input_norm=input_norm, norm_eps=1e-6)
    cfg, model = random_vit(seed=seed, **layout)
    path = tmp_path_factory.mktemp("w") / "vit.pth"
    torch.save(vit.timm_state_dict(model), path)
    loaded_cfg, loaded = load_from_file(path, act=act, input_norm=input_norm, init_heads=2, norm_eps=1e-6)
    # the architecture comes from the tensors' shapes; what they do not record, from the flags
    for name in ("patch_size", "dim", "depth", "num_heads", "mlp_ratio", "pos_embed_cls", "norm_pre", "patch_bias",
                 "norm_eps", "act", "input_norm"):
        assert getattr(loaded_cfg, name) == getattr(cfg, name), name
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_timm_defaults_are_timms_conventions(tmp_path):
    """--init alone: LayerNorm eps 1e-6, ImageNet statistics, width / 64 heads, the class position
    included; timm's CLIP ViTs (norm_pre): eps 1e-5 and CLIP's statistics."""
    _, model = random_vit(dim=128, heads=2, pos_embed_cls=True)
    torch.save(vit.timm_state_dict(model), tmp_path / "w.pth")
    cfg, loaded = load_from_file(tmp_path / "w.pth")
    assert (cfg.norm_eps, cfg.input_norm, cfg.num_heads, cfg.pos_embed_cls) == (1e-6, "imagenet", 2, True)
    assert loaded.blocks[0].norm1.eps == 1e-6
    x = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(loaded.input_norm(x * 2 - 1), (x - mean) / std)
    _, clip_like = random_vit(dim=128, heads=2, pos_embed_cls=True, norm_pre=True, patch_bias=False)
    torch.save(vit.timm_state_dict(clip_like), tmp_path / "c.pth")
    cfg, _ = load_from_file(tmp_path / "c.pth")
    assert (cfg.norm_eps, cfg.input_norm, cfg.norm_pre, cfg.patch_bias) == (1e-5, "clip", True, False)


def test_quick_gelu_is_x_sigmoid_1702x():
    mlp = vit.MLP(4, 6, act="quick_gelu")
    x = torch.randn(5, 4)
    h = mlp.fc1(x)
    torch.testing.assert_close(mlp(x), mlp.fc2(h * torch.sigmoid(1.702 * h)))
    assert not torch.allclose(mlp(x), mlp.fc2(torch.nn.functional.gelu(h)))


def test_safetensors_reader_matches_the_reference_writer(tmp_path):
    from safetensors.torch import save_file  # the format's own package, a test dependency only
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(6).reshape(2, 3), "u8": torch.arange(4, dtype=torch.uint8), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    sd, _ = vit.read_state_dict(str(tmp_path / "t.safetensors"))
    assert sd.keys() == tensors.keys()
    for name, value in tensors.items():
        assert sd[name].dtype == value.dtype and torch.equal(sd[name], value), name
    (tmp_path / "bad.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json")
    with pytest.raises(vit.InputError, match="not a readable .safetensors file"):
        vit.read_state_dict(str(tmp_path / "bad.safetensors"))


def test_safetensors_and_wrapped_state_dicts_load(tmp_path):
    from safetensors.torch import save_file
    _, model = random_vit(pos_embed_cls=True, norm_eps=1e-6, input_norm="imagenet")
    sd = vit.timm_state_dict(model)
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "wrapped.pth")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for name in ("w.safetensors", "wrapped.pth"):
        _, loaded = load_from_file(tmp_path / name, init_heads=2)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@given(pos_embed_cls=st.booleans(), new_grid=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_position_resizing_at_load_equals_resizing_after_load(tmp_path_factory, pos_embed_cls, new_grid, seed):
    _, model = random_vit(size=16, patch=4, seed=seed, pos_embed_cls=pos_embed_cls)  # a 4x4 grid
    path = tmp_path_factory.mktemp("w") / "vit.pth"
    torch.save(vit.timm_state_dict(model), path)
    _, at_load = load_from_file(path, size=4 * new_grid, init_heads=2, input_norm="unit", norm_eps=1e-5)
    after = vit.resize_pos_embed(model.pos_embed.detach(), (4, 4), (new_grid, new_grid), int(pos_embed_cls))
    torch.testing.assert_close(at_load.pos_embed.detach(), after, rtol=0, atol=0)
    x = torch.rand(2, 3, 4 * new_grid, 4 * new_grid) * 2 - 1
    with torch.no_grad():  # the trained model run at the new size resizes the same way on the fly
        torch.testing.assert_close(at_load(x), model(x), rtol=1e-5, atol=1e-5)


def test_loader_names_a_missing_an_extra_and_a_misshapen_tensor(tmp_path):
    _, model = random_vit(pos_embed_cls=True)
    sd = vit.timm_state_dict(model)
    cases = {"missing": ({k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}, "does not set: blocks.1.mlp.fc2.bias"),
             "extra": ({**sd, "blocks.0.ls1.gamma": torch.ones(32)}, "no place for: blocks.0.ls1.gamma"),
             "misshapen": ({**sd, "blocks.0.norm2.weight": torch.ones(33)}, r"blocks.0.norm2.weight \(33,\) vs \(32,\)"),
             "not a vit": ({"conv.weight": torch.ones(3)}, "not a class-token ViT state dict in timm's layout")}
    for name, (bad, message) in cases.items():
        torch.save(bad, tmp_path / f"{name}.pth")
        with pytest.raises(vit.InputError, match=message):
            load_from_file(tmp_path / f"{name}.pth", init_heads=2)
    (tmp_path / "junk.pth").write_bytes(b"not a weights file")
    with pytest.raises(SystemExit, match="not a readable weights file"):
        vit.main(tiny_args(tmp_path / "o", "--init", tmp_path / "junk.pth"))
    with pytest.raises(SystemExit, match="no such file"):
        vit.main(tiny_args(tmp_path / "o", "--init", tmp_path / "none.pth"))


def test_cli_init_evaluates_and_fine_tunes(tmp_path):
    trained = vit.main(tiny_args(tmp_path / "a"))
    _, model = random_vit()  # a 5-class head: the shapes data has 21
    torch.save(vit.timm_state_dict(model), tmp_path / "five.pth")
    # our own checkpoint as --init: the same weights and conventions, the same test accuracy
    again = vit.main(tiny_args(tmp_path / "b", "--init", tmp_path / "a" / "ckpt.pt", "--eval_only", 1))
    assert again["test_accuracy"] == trained["test_accuracy"]
    # exported to timm's layout and read back with the project's conventions: the same again
    ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    torch.save({k: v for k, v in ckpt["model"].items()}, tmp_path / "timm.pth")
    exported = vit.main(tiny_args(tmp_path / "c", "--init", tmp_path / "timm.pth", "--eval_only", 1,
                                  "--input_norm", "unit", "--norm_eps", 1e-5, "--init_heads", 2))
    assert exported["test_accuracy"] == trained["test_accuracy"]
    with pytest.raises(SystemExit, match="its head has 5 classes and --data shapes has 21"):
        vit.main(tiny_args(tmp_path / "d", "--init", tmp_path / "five.pth", "--eval_only", 1, "--init_heads", 2))
    tuned = vit.main(tiny_args(tmp_path / "e", "--init", tmp_path / "five.pth", "--init_heads", 2))
    assert np.isfinite(tuned["final_loss"])
    saved = json.loads(open(tmp_path / "e" / "metrics.json").read())
    assert saved["test_size"] == 64


# ---------------------------------------------------------------- bad inputs

def test_image_size_not_divisible_by_patch_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--image_size 18 is not divisible by --patch_size 4"):
        vit.main(tiny_args(tmp_path, "--image_size", 18))


# ---------------------------------------------------------------- GPU only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_bf16_compiled_training_on_cuda(tmp_path):
    metrics = vit.main(tiny_args(tmp_path, "--device", "cuda", "--max_steps", 4))
    assert np.isfinite(metrics["final_loss"])
    start = json.loads(open(tmp_path / "log.jsonl").readline())
    assert start["device"].startswith("cuda")


@cuda
def test_bf16_autocast_logits_close_to_fp32_on_cuda():
    torch.manual_seed(0)
    model = vit.build_model(vit.Config(image_size=16, patch_size=4, dim=64, depth=2, num_heads=2), 5).cuda().eval()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x).float()
    torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05)
