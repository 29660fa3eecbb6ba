"""vit.py: shapes, the lecture's math, the shapes world, learning, resume, CLI, bad inputs, GPU."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import vit

ROOT = pathlib.Path(__file__).resolve().parent.parent


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


def test_captions_name_every_attribute():
    data = vit.shapes_split("train", 40, 32, 0)
    for (shape, color, size, pos), caption in zip(data["attributes"], data["captions"]):
        for word in [vit.SHAPES[shape], vit.COLOR_NAMES[color], vit.SIZES[size], vit.POSITIONS[pos]]:
            assert word in caption
    assert len(set(c.split()[0] for c in data["captions"])) > 1  # more than one phrasing


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


# ---------------------------------------------------------------- checkpoint and resume

def test_n_steps_then_resume_then_m_steps_equals_n_plus_m_steps_bitwise(tmp_path):
    common = ["--max_steps", 8, "--drop_path", 0.2, "--log_every", 1]  # drop_path: the torch RNG matters
    vit.main(tiny_args(tmp_path / "a", *common, "--stop_step", 3))
    vit.main(tiny_args(tmp_path / "a", *common, "--resume", tmp_path / "a" / "ckpt.pt"))
    vit.main(tiny_args(tmp_path / "b", *common))
    resumed = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    straight = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 8
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    losses = lambda p: [r["loss"] for r in map(json.loads, open(p / "log.jsonl")) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_eval_only_takes_the_config_from_the_checkpoint(tmp_path):
    vit.main(tiny_args(tmp_path, "--dim", 48))
    metrics = vit.main(["--eval_only", "1", "--resume", str(tmp_path / "ckpt.pt"), "--out_dir", str(tmp_path / "eval")])
    trained = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_accuracy"] == trained["test_accuracy"]
    assert (tmp_path / "eval" / "predictions.png").exists()


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


def test_script_runs_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "vit.py", *tiny_args(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "step       6/6" in out.stdout and "test accuracy" in out.stdout


# ---------------------------------------------------------------- bad inputs

def test_image_size_not_divisible_by_patch_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--image_size 18 is not divisible by --patch_size 4"):
        vit.main(tiny_args(tmp_path, "--image_size", 18))


@pytest.mark.parametrize("content, message", [
    (dict(pixels=np.zeros((4, 8, 8, 3), np.uint8)), "missing key 'images'"),
    (dict(images=np.zeros((4, 8, 8, 3), np.float32)), "must be uint8"),
    (dict(images=np.zeros((4, 8, 8), np.uint8)), "must be uint8"),
    (dict(images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(3, np.int64)), "'labels' must be"),
    (dict(images=np.zeros((0, 8, 8, 3), np.uint8)), "is empty"),
    (dict(images=np.zeros((4, 8, 8, 3), np.uint8)), "needs a 'labels' array"),
    (dict(images=np.zeros((4, 16, 16, 3), np.uint8), labels=np.zeros(4, np.int64)), "pass --image_size 16"),
    (None, "not a readable .npz"),
])
def test_malformed_npz_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    if content is None:
        path.write_bytes(b"this is not a zip file")
    else:
        np.savez(path, **content)
    with pytest.raises(SystemExit, match=message):
        vit.main(tiny_args(tmp_path, "--data", path, "--image_size", 8, "--patch_size", 2))


def test_batch_larger_than_the_data_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--batch_size 512 is larger than the 256 training images"):
        vit.main(tiny_args(tmp_path, "--batch_size", 512))


def test_resume_from_another_models_or_config_or_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    vit.main(tiny_args(tmp_path))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "model_name": "clip"}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="checkpoint of 'clip', not of 'vit'"):
        vit.main(tiny_args(tmp_path, "--resume", tmp_path / "other.pt"))
    with pytest.raises(SystemExit, match=r"another config \(dim: checkpoint 32, now 64\)"):
        vit.main(tiny_args(tmp_path, "--resume", tmp_path / "ckpt.pt", "--dim", 64))
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="corrupt or truncated"):
        vit.main(tiny_args(tmp_path, "--resume", tmp_path / "cut.pt"))
    with pytest.raises(SystemExit, match="no such file"):
        vit.main(tiny_args(tmp_path, "--resume", tmp_path / "missing.pt"))


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 2"):
        vit.main(tiny_args(tmp_path, "--lr", 1e30, "--grad_clip", 0, "--log_every", 1, "--ckpt_every", 1))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1


# ---------------------------------------------------------------- slow: compile and DDP

@pytest.mark.slow
def test_compiled_tiny_preset_trains_on_cpu(tmp_path):
    metrics = vit.main(tiny_args(tmp_path, "--compile", 1, "--max_steps", 2, "--device", "cpu"))
    assert metrics["steps"] == 2 and np.isfinite(metrics["final_loss"])


@pytest.mark.slow
def test_two_process_ddp_gives_the_single_process_loss_curve(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = tiny_args(tmp_path / "ddp", "--max_steps", 6, "--log_every", 1, "--device", "cpu")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "vit.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    vit.main(tiny_args(tmp_path / "one", "--max_steps", 6, "--log_every", 1, "--device", "cpu"))
    read = lambda p: [r["loss"] for r in map(json.loads, open(p / "log.jsonl")) if "loss" in r]  # noqa: E731
    start = json.loads(open(tmp_path / "ddp" / "log.jsonl").readline())
    assert start["world_size"] == 2
    np.testing.assert_allclose(read(tmp_path / "ddp"), read(tmp_path / "one"), rtol=1e-4)


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
