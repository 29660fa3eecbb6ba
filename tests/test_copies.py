"""Checked copies (DESIGN.md section 5): every `# Copied from <owner>.<name> [with Old->New, ...]`
marker sits on the line above a top-level def, class or assignment whose source must equal the
owner's (blank lines ignored, replacements applied to the owner's text).

    python tests/test_copies.py          # report drift, exit 1 if any
    python tests/test_copies.py --fix    # rewrite every copy from its owner
"""

import ast
import difflib
import functools
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ["vit", "clip", "llava", "pixel_ar", "vqvae", "vqgan", "ddpm", "flow_matching", "sd3_mini"]
MARKER = re.compile(r"^# Copied from (\w+)\.(\w+)(?: with (.+))?$")


def top_level_blocks(path):
    """{name: (first_line, last_line)} (1-based, decorators included) of a module's top-level defs."""
    return _blocks(path.read_text())


@functools.lru_cache(maxsize=64)
def _blocks(source):
    tree = ast.parse(source)
    blocks = {}
    for node in tree.body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            blocks[node.name] = (first, node.end_lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    blocks[t.id] = (first, node.end_lineno)
    return blocks


def find_copies(path):
    """[(marker_line, owner, name, replacements, first, last)] for each marker in a file."""
    lines = path.read_text().splitlines()
    starts = {first: (name, last) for name, (first, last) in top_level_blocks(path).items()}
    copies = []
    for i, line in enumerate(lines, start=1):
        m = MARKER.match(line)
        if not m:
            continue
        if i + 1 not in starts:
            raise AssertionError(f"{path.name}:{i}: marker '{line}' is not directly above a top-level def, class or assignment")
        reps = [tuple(r.split("->", 1)) for r in m.group(3).split(", ")] if m.group(3) else []
        copies.append((i, m.group(1), m.group(2), reps, i + 1, starts[i + 1][1]))
    return copies


def expected_text(owner, name, reps):
    path = ROOT / f"{owner}.py"
    blocks = top_level_blocks(path)
    if name not in blocks:
        raise AssertionError(f"{owner}.py has no top-level {name}")
    first, last = blocks[name]
    text = "\n".join(path.read_text().splitlines()[first - 1:last])
    for old, new in reps:
        text = text.replace(old, new)
    return text


def check(fix=False):
    """Returns a list of drift reports; with fix=True rewrites the copies instead."""
    problems = []
    for model in MODELS:
        path = ROOT / f"{model}.py"
        if not path.exists():
            continue
        # Fix bottom-up so that earlier line numbers stay valid.
        for marker, owner, name, reps, first, last in reversed(find_copies(path)):
            want = expected_text(owner, name, reps)
            lines = path.read_text().splitlines()
            have = "\n".join(lines[first - 1:last])
            squash = lambda s: [l for l in s.splitlines() if l.strip()]  # noqa: E731
            if squash(have) == squash(want):
                continue
            if fix:
                lines[first - 1:last] = want.splitlines()
                path.write_text("\n".join(lines) + "\n")
            else:
                diff = "\n".join(difflib.unified_diff(squash(want), squash(have), f"{owner}.{name}", f"{model}.py:{first}", lineterm=""))
                problems.append(f"{model}.py:{marker} differs from {owner}.{name}:\n{diff}")
    return problems


def test_every_marked_copy_equals_its_owner():
    problems = check()
    assert not problems, "\n\n".join(problems) + "\n\nrun `python tests/test_copies.py --fix` to copy the owners over"


def test_markers_name_existing_owners_and_no_owner_is_a_copy_of_itself():
    for model in MODELS:
        path = ROOT / f"{model}.py"
        if path.exists():
            for marker, owner, name, _, _, _ in find_copies(path):
                assert owner != model, f"{model}.py:{marker} marks a copy of itself"
                assert (ROOT / f"{owner}.py").exists(), f"{model}.py:{marker}: no file {owner}.py"


if __name__ == "__main__":
    if "--fix" in sys.argv[1:]:
        check(fix=True)
        print("copies rewritten from their owners")
    problems = check()
    print("\n\n".join(problems) if problems else "all copies match their owners")
    sys.exit(1 if problems else 0)
