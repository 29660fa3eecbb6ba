"""The contract every model file keeps (DESIGN.md sections 1-3), checked over the files present."""

import ast
import contextlib
import importlib
import io
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = [m for m in ["vit", "clip", "llava", "pixel_ar", "vqvae", "vqgan", "ddpm", "flow_matching", "sd3_mini"]
          if (ROOT / f"{m}.py").exists()]
SHARED_FLAGS = ["preset", "device", "dtype", "compile", "seed", "out_dir", "data", "max_steps", "batch_size",
                "lr", "log_every", "eval_every", "ckpt_every", "resume"]


@pytest.mark.parametrize("name", MODELS)
def test_imports_only_stdlib_numpy_torch(name):
    allowed = set(sys.stdlib_module_names) | {"torch", "numpy"}
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        for n in names:
            assert n.split(".")[0] in allowed, f"{name}.py:{node.lineno} imports {n}"


@pytest.mark.parametrize("name", MODELS)
def test_import_runs_nothing(name):
    """Importing a model file parses no arguments, prints nothing and writes no files."""
    code = (f"import sys, os; sys.argv = ['x', '--definitely-not-a-flag']; before = set(os.listdir('.'));"
            f"import {name}; assert set(os.listdir('.')) == before, 'import wrote files'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "", f"import printed: {out.stdout!r}"


@pytest.mark.parametrize("name", MODELS)
def test_public_api(name):
    module = importlib.import_module(name)
    for attr in ["Config", "PRESETS", "build_model", "train", "main"]:
        assert hasattr(module, attr), f"{name}.py lacks {attr}"
    assert {"tiny", "cpu", "gpu"} <= set(module.PRESETS)
    fields = {f.name for f in module.Config.__dataclass_fields__.values()}
    for preset, overrides in module.PRESETS.items():
        assert set(overrides) <= fields, f"{name}.PRESETS[{preset!r}] sets unknown fields {set(overrides) - fields}"
    assert module.__doc__ and "torchrun" in module.__doc__, f"{name}.py: the docstring needs its commands"


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


@pytest.mark.parametrize("name", MODELS)
def test_tiny_training_run_writes_the_outputs(name, tmp_path):
    module = importlib.import_module(name)
    metrics = module.main(["--preset", "tiny", "--out_dir", str(tmp_path)])
    assert isinstance(metrics, dict) and metrics
    for f in ["ckpt.pt", "log.jsonl", "metrics.json"]:
        assert (tmp_path / f).exists(), f"{name} wrote no {f}"
    assert list(tmp_path.glob("*.png")), f"{name} wrote no PNG"
    assert json.loads((tmp_path / "metrics.json").read_text())
    import torch
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for key in ["model_name", "model", "optimizer", "step", "config", "rng"]:
        assert key in ckpt, f"{name} checkpoint lacks {key}"
    assert ckpt["model_name"] == name


@pytest.mark.parametrize("name", MODELS)
def test_unknown_preset_and_wrong_type_are_clear_errors(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        module.main(["--preset", "huge"])
    assert e.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        module.main(["--max_steps", "ten"])
    assert e.value.code == 2 and "--max_steps" in capsys.readouterr().err
