"""The contract every model file keeps (DESIGN.md sections 1-3 and 6), checked over the files
present: a new file gets all of it by existing. Its own tests/test_<model>.py holds only what is
specific to the model."""

import ast
import contextlib
import dataclasses
import importlib
import io
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = [m for m in ["vit", "clip", "llava", "pixel_ar", "vqvae", "vqgan", "ddpm", "flow_matching", "sd3_mini"]
          if (ROOT / f"{m}.py").exists()]
SHARED_FLAGS = ["preset", "device", "dtype", "compile", "seed", "out_dir", "data", "max_steps", "batch_size",
                "lr", "log_every", "eval_every", "ckpt_every", "resume", "stop_step", "eval_only"]
RUN_ONLY = {"wall_time_s", "steps", "final_loss"}  # metrics of a training run that evaluation does not make


def tiny(out_dir, *extra):
    return ["--preset", "tiny", "--out_dir", str(out_dir), *map(str, extra)]


def losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(pathlib.Path(out_dir) / "log.jsonl")) if "loss" in r]


def numbers(metrics, prefix=""):
    """{path: value} of every number in a (nested) metrics dict."""
    out = {}
    items = metrics.items() if isinstance(metrics, dict) else enumerate(metrics)
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, (dict, list)):
            out.update(numbers(value, path + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[path] = value
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run per file, shared by the tests that only read its outputs."""
    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(f"{name}-tiny")
            runs[name] = (out, importlib.import_module(name).main(tiny(out)))
        return runs[name]

    return get


# ---------------------------------------------------------------- the file stands alone

@pytest.mark.parametrize("name", MODELS)
def test_imports_only_stdlib_numpy_torch(name):
    allowed = set(sys.stdlib_module_names) | {"torch", "numpy"}
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        for n in names:
            assert n.split(".")[0] in allowed, f"{name}.py:{node.lineno} imports {n}"


@pytest.fixture(scope="module")
def import_report():
    """Import every model file in one fresh interpreter whose argv holds an unknown flag: what each
    import printed and which files it created."""
    code = ("import contextlib, io, json, os, sys; sys.argv = ['x', '--definitely-not-a-flag']; report = {}\n"
            f"for name in {MODELS!r}:\n"
            "    before, out = set(os.listdir('.')), io.StringIO()\n"
            "    with contextlib.redirect_stdout(out):\n"
            "        __import__(name)\n"
            "    report[name] = {'printed': out.getvalue(), 'new_files': sorted(set(os.listdir('.')) - before)}\n"
            "print(json.dumps(report))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", MODELS)
def test_import_runs_nothing(name, import_report):
    """Importing a model file parses no arguments, prints nothing and writes no files."""
    assert import_report[name] == {"printed": "", "new_files": []}


@pytest.mark.parametrize("name", MODELS)
def test_public_api_and_layout(name):
    module = importlib.import_module(name)
    for attr in ["Config", "PRESETS", "RANGES", "RUNTIME_FIELDS", "build_model", "train", "main"]:
        assert hasattr(module, attr), f"{name}.py lacks {attr}"
    assert {"tiny", "cpu", "gpu"} <= set(module.PRESETS) and module.PRESETS["cpu"] == {}
    fields = {f.name for f in dataclasses.fields(module.Config)}
    for preset, overrides in module.PRESETS.items():
        assert set(overrides) <= fields, f"{name}.PRESETS[{preset!r}] sets unknown fields {set(overrides) - fields}"
    assert set(module.RANGES) <= fields and set(module.RUNTIME_FIELDS) <= fields
    assert module.__doc__ and "torchrun" in module.__doc__, f"{name}.py: the docstring needs its commands"
    # the story first: train() in the first 60% of the file, then one plumbing section at the end
    lines = (ROOT / f"{name}.py").read_text().splitlines()
    train_at = next(i for i, line in enumerate(lines) if line.startswith("def train("))
    plumbing_at = next(i for i, line in enumerate(lines) if line.startswith("# Plumbing"))
    assert train_at < 0.6 * len(lines) and train_at < plumbing_at, f"{name}.py: train() at line {train_at + 1}"


@pytest.mark.parametrize("name", MODELS)
def test_help_lists_every_field_with_its_comment(name):
    module = importlib.import_module(name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = out.getvalue()
    helps = module.config_help(module.Config)
    for field in module.Config.__dataclass_fields__:
        assert f"--{field}" in text, f"{name} --help lacks --{field}"
        assert helps.get(field), f"{name}.Config.{field} has no comment to serve as its help"
    for flag in SHARED_FLAGS:
        assert f"--{flag}" in text, f"{name} lacks the shared flag --{flag}"


# ---------------------------------------------------------------- a run and its outputs

@pytest.mark.parametrize("name", MODELS)
def test_tiny_training_run_writes_the_outputs(name, trained):
    out, metrics = trained(name)
    assert isinstance(metrics, dict) and metrics
    for f in ["ckpt.pt", "log.jsonl", "metrics.json"]:
        assert (out / f).exists(), f"{name} wrote no {f}"
    assert list(out.glob("*.png")), f"{name} wrote no PNG"
    assert json.loads((out / "metrics.json").read_text())
    start = json.loads(open(out / "log.jsonl").readline())
    assert start["event"] == "start" and start["config"]["out_dir"] == str(out) and "torch" in start
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    for key in ["model_name", "model", "optimizer", "step", "config", "rng"]:
        assert key in ckpt, f"{name} checkpoint lacks {key}"
    assert ckpt["model_name"] == name and math.isfinite(metrics["final_loss"])


@pytest.mark.parametrize("name", MODELS)
def test_eval_only_reproduces_the_metrics_of_the_run(name, trained, tmp_path):
    out, metrics = trained(name)
    module = importlib.import_module(name)
    # the model comes from the checkpoint, the evaluation settings (runtime fields) from the flags
    again = module.main(tiny(tmp_path, "--eval_only", 1, "--resume", out / "ckpt.pt"))
    trained_numbers = {k: v for k, v in numbers(metrics).items() if k not in RUN_ONLY}
    eval_numbers = numbers(again)
    shared = trained_numbers.keys() & eval_numbers.keys()
    assert shared, f"{name}: --eval_only reports none of the run's metrics"
    for key in shared:
        assert eval_numbers[key] == pytest.approx(trained_numbers[key], rel=1e-6, abs=1e-9, nan_ok=True), key
    assert list(tmp_path.glob("*.png")), f"{name} --eval_only wrote no PNG"


@pytest.mark.parametrize("name", MODELS)
def test_n_steps_then_resume_then_m_steps_equals_n_plus_m_steps_bitwise(name, tmp_path):
    module = importlib.import_module(name)
    module.main(tiny(tmp_path / "a", "--stop_step", 3, "--log_every", 1))
    module.main(tiny(tmp_path / "a", "--log_every", 1, "--resume", tmp_path / "a" / "ckpt.pt"))
    module.main(tiny(tmp_path / "b", "--log_every", 1))
    resumed = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    straight = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == straight["step"] > 3

    def same(a, b, where):
        if torch.is_tensor(a):
            assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
        elif isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                same(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        else:
            assert a == b or (a != a and b != b), where

    for key in straight:
        if key != "config":  # it names the output directory
            same(resumed[key], straight[key], key)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


# ---------------------------------------------------------------- bad input: one clear line

def error_of(module, argv):
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    return str(e.value.code)


@pytest.mark.parametrize("name", MODELS)
def test_unknown_preset_and_wrong_type_are_clear_errors(name, capsys):
    module = importlib.import_module(name)
    assert error_of(module, ["--preset", "huge"]) == "2" and "invalid choice: 'huge'" in capsys.readouterr().err
    assert error_of(module, ["--max_steps", "ten"]) == "2" and "--max_steps" in capsys.readouterr().err


@pytest.mark.parametrize("name", MODELS)
def test_every_numeric_field_outside_its_range_is_one_clear_error(name, tmp_path):
    """Each int and float field, set just outside its accepted range (RANGES, else int >= 1 or
    float > 0), or to nan, stops before any work with an error naming the flag and the range."""
    module = importlib.import_module(name)
    for f in dataclasses.fields(module.Config):
        if f.type not in ("int", "float"):
            continue
        spec = module.RANGES.get(f.name, ">= 1" if f.type == "int" else "> 0")
        if spec[0] in "[(":
            low, high = (float(s) for s in spec[1:-1].split(","))
            bad = [low - 1, high + 1]
        else:
            bad = [float(spec.split()[1]) - (1 if spec.startswith(">=") else 0)]
        bad = [int(v) for v in bad] if f.type == "int" else bad + [float("nan")]
        for value in bad:
            message = error_of(module, tiny(tmp_path, f"--{f.name}", value))
            assert message.startswith(f"error: --{f.name} ") and "expected" in message, (f.name, value, message)


@pytest.mark.parametrize("name", MODELS)
def test_an_out_dir_that_cannot_be_created_is_a_clear_error(name, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    message = error_of(importlib.import_module(name), tiny(tmp_path / "file" / "out"))
    assert message.startswith("error: --out_dir") and "cannot create" in message


@pytest.mark.parametrize("content, message", [
    (dict(pixels=np.zeros((4, 8, 8, 3), np.uint8)), "missing key 'images'"),
    (dict(images=np.zeros((4, 8, 8, 3), np.float32)), "must be uint8"),
    (dict(images=np.zeros((4, 8, 8), np.uint8)), "must be uint8"),
    (dict(images=np.zeros((0, 8, 8, 3), np.uint8)), "is empty"),
    (dict(images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(3, np.int64)), "'labels' must be"),
    (dict(images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(4, np.int64),
          captions=np.array(["a"] * 4)), "pass --image_size 8"),
    (None, "not a readable .npz"),
])
@pytest.mark.parametrize("name", MODELS)
def test_malformed_npz_is_a_clear_error(name, tmp_path, content, message):
    path = tmp_path / "bad.npz"
    if content is None:
        path.write_bytes(b"this is not a zip file")
    else:
        np.savez(path, **content)
    text = error_of(importlib.import_module(name), tiny(tmp_path, "--data", path))
    assert text.startswith("error: --data") and message in text, text


@pytest.mark.parametrize("name", MODELS)
def test_batch_larger_than_the_data_is_a_clear_error(name, tmp_path):
    message = error_of(importlib.import_module(name), tiny(tmp_path, "--batch_size", 100000))
    assert message.startswith("error: --batch_size 100000 is larger than"), message


@pytest.mark.parametrize("name", MODELS)
def test_resume_from_another_model_a_changed_config_or_a_bad_file_is_a_clear_error(name, trained, tmp_path):
    out, _ = trained(name)
    module = importlib.import_module(name)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    other = "clip" if name != "clip" else "vit"
    torch.save({**ckpt, "model_name": other}, tmp_path / "other.pt")
    assert f"checkpoint of {other!r}, not of {name!r}" in error_of(module, tiny(tmp_path, "--resume", tmp_path / "other.pt"))
    changed = error_of(module, tiny(tmp_path, "--resume", out / "ckpt.pt", "--seed", 1))
    assert "another config (seed: checkpoint 0, now 1)" in changed
    data = (out / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in error_of(module, tiny(tmp_path, "--resume", tmp_path / "cut.pt"))
    assert "no such file" in error_of(module, tiny(tmp_path, "--resume", tmp_path / "missing.pt"))
    assert "needs --resume" in error_of(module, tiny(tmp_path, "--eval_only", 1))


@pytest.mark.parametrize("name", MODELS)
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(name, tmp_path):
    module = importlib.import_module(name)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step (\d+)") as e:
        module.main(tiny(tmp_path, "--lr", 1e30, "--grad_clip", 0, "--log_every", 1, "--ckpt_every", 1))
    failed_at = int(str(e.value).split(" at step ")[1].split(";")[0])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == failed_at - 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


# ---------------------------------------------------------------- slow: compile, DDP and the command line

@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_compiled_tiny_run_trains_on_cpu(name, tmp_path):
    metrics = importlib.import_module(name).main(tiny(tmp_path, "--compile", 1, "--max_steps", 2, "--device", "cpu"))
    assert metrics["steps"] >= 2 and math.isfinite(metrics["final_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_the_script_under_torchrun_gives_the_single_process_loss_curve(name, tmp_path):
    """Two gloo processes started from the command line (so this is also the CLI test) follow the
    loss curve of one process: --batch_size is global and the ranks split each batch."""
    args = tiny(tmp_path / "ddp", "--max_steps", 4, "--log_every", 1, "--device", "cpu")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          f"{name}.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step       4/" in out.stdout
    importlib.import_module(name).main(tiny(tmp_path / "one", "--max_steps", 4, "--log_every", 1, "--device", "cpu"))
    assert json.loads(open(tmp_path / "ddp" / "log.jsonl").readline())["world_size"] == 2
    np.testing.assert_allclose(losses(tmp_path / "ddp"), losses(tmp_path / "one"), rtol=1e-4)
