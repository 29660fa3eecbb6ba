"""tools/to_npz.py: tiny files in each source format, written byte for byte as the real ones are,
converted and checked pixel for pixel; the errors; and the output read by every model file."""

import gzip
import importlib
import importlib.util
import io
import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("to_npz", ROOT / "tools" / "to_npz.py")
to_npz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(to_npz)

MODELS = [m for m in ("vit", "clip", "llava", "pixel_ar", "vqvae", "vqgan", "ddpm", "flow_matching", "sd3_mini")
          if (ROOT / f"{m}.py").exists()]
MNIST_DIGITS = [str(d) for d in range(10)]


def convert(argv, capsys):
    """Run the converter in-process: (exit code, stdout, stderr)."""
    code = to_npz.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def load(path):
    with np.load(path, allow_pickle=False) as z:  # the model files' loader refuses pickles too
        return {k: z[k] for k in z.files}


def assert_one_error_line(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


# ---- writers of the source formats

def idx_bytes(array, type_byte=0x08):
    """An idx file: two zero bytes, the type byte, the number of dimensions, big-endian uint32 sizes."""
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder, gz=False, n_train=12, n_test=6, seed=0):
    """Four idx files with random pixels and labels; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sets = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = folder / f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                name.with_name(name.name + ".gz").write_bytes(gzip.compress(data))
            else:
                name.write_bytes(data)
        sets[split] = (images, labels)
    return sets


class Py2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2's str opcodes (SHORT_BINSTRING / BINSTRING), as the real CIFAR
    batches were written by Python 2's cPickle; Python 3's protocol 2 goes through _codecs.encode."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)
    dispatch[bytes] = save_py2_str


def pickle_bytes(obj, py2=False):
    if not py2:
        return pickle.dumps(obj, protocol=2)
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    # numpy 1.x, which wrote the real files, named its module numpy.core; numpy 2 says numpy._core.
    return f.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def cifar_rows(rng, n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar(tmp_path, fmt, as_tar, py2=False, seed=0):
    """A tiny CIFAR-10 (5 train batches of 3, a test batch of 4) or CIFAR-100 (train 6, test 4), as
    a tar.gz with the real inner folder or as the extracted folder. Returns (INPUT, expected)."""
    rng = np.random.default_rng(seed)
    if fmt == "cifar10":
        inner, names = "cifar-10-batches-py", [f"class_{i}" for i in range(10)]
        files = {"batches.meta": {b"label_names": [n.encode() for n in names], b"num_vis": 3072}}
        parts = [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 4)]
    else:
        inner, names = "cifar-100-python", [f"fine_{i}" for i in range(100)]
        files = {"meta": {b"fine_label_names": [n.encode() for n in names],
                          b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}}
        parts = [("train", 6), ("test", 4)]
    expected = {"data": [], "labels": [], "coarse": []}
    for name, n in parts:
        rows = cifar_rows(rng, n)
        if name in ("data_batch_1", "train"):  # one pixel with distinct R, G, B at row 3, column 5
            rows[0, [0 * 1024 + 3 * 32 + 5, 1 * 1024 + 3 * 32 + 5, 2 * 1024 + 3 * 32 + 5]] = (10, 20, 30)
        labels = rng.integers(0, len(names), n).tolist()
        batch = {b"batch_label": name.encode(), b"data": rows, b"filenames": [b"x.png"] * n}
        if fmt == "cifar10":
            batch[b"labels"] = labels
        else:
            coarse = rng.integers(0, 20, n).tolist()
            batch.update({b"fine_labels": labels, b"coarse_labels": coarse})
            expected["coarse"] += coarse
        files[name] = batch
        expected["data"].append(rows)
        expected["labels"] += labels
    # images[i, row, col, ch] = data[i, ch * 1024 + row * 32 + col], spelled out as an index array
    row, col, ch = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    images = np.concatenate(expected["data"])[:, ch * 1024 + row * 32 + col]
    expected.update(images=images, class_names=names)
    if as_tar:
        path = tmp_path / f"{inner.replace('-batches-py', '-python')}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, obj in files.items():
                data = pickle_bytes(obj, py2)
                info = tarfile.TarInfo(f"{inner}/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path, expected
    folder = tmp_path / inner
    folder.mkdir()
    for name, obj in files.items():
        (folder / name).write_bytes(pickle_bytes(obj, py2))
    return folder, expected


def write_class_folder(root, sizes=((6, 6),) * 3, classes=("cat", "ant")):
    """root/<class>/<i>.png with random RGB pixels (PNG is lossless); plus a file to be ignored.
    Returns {class: [arrays in file-name order]}."""
    rng = np.random.default_rng(1)
    out = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        out[name] = []
        for i, (h, w) in enumerate(sizes):
            x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(x).save(root / name / f"{i}.{'PNG' if i == 0 else 'png'}")  # case-insensitive
            out[name].append(x)
        (root / name / "notes.txt").write_text("not an image")
    return out


# ---- MNIST and Fashion-MNIST

@pytest.mark.parametrize("fmt,names", [("mnist", MNIST_DIGITS), ("fashion_mnist", list(to_npz.FASHION_NAMES))])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, capsys, fmt, names, gz):
    sets = write_idx_set(tmp_path / "raw", gz=gz)
    code, out, _ = convert([fmt, tmp_path / "raw", "--out", tmp_path / "o.npz"], capsys)
    assert code == 0
    z = load(tmp_path / "o.npz")
    assert set(z) == {"images", "labels", "class_names"}  # no captions unless asked
    assert z["images"].dtype == np.uint8 and z["images"].shape == (18, 28, 28, 1)
    np.testing.assert_array_equal(z["images"][..., 0], np.concatenate([sets["train"][0], sets["test"][0]]))
    np.testing.assert_array_equal(z["labels"], np.concatenate([sets["train"][1], sets["test"][1]]))
    assert z["class_names"].dtype.kind == "U" and list(z["class_names"]) == names
    assert f"18 images, 28 x 28 x 1, 10 classes -> {tmp_path / 'o.npz'} (" in out and "KB)" in out


def test_split_limit_seed(tmp_path, capsys):
    sets = write_idx_set(tmp_path / "raw")
    raw, out = tmp_path / "raw", tmp_path / "o.npz"
    assert convert(["mnist", raw, "--out", out, "--split", "test"], capsys)[0] == 0
    np.testing.assert_array_equal(load(out)["images"][..., 0], sets["test"][0])
    assert convert(["mnist", raw, "--out", out, "--split", "train", "--limit", "5"], capsys)[0] == 0
    np.testing.assert_array_equal(load(out)["labels"], sets["train"][1][:5])
    shuffled = []
    for _ in range(2):  # --seed: a shuffled subset, the same one every time
        assert convert(["mnist", raw, "--out", out, "--split", "train", "--seed", "3", "--limit", "12"], capsys)[0] == 0
        shuffled.append(load(out)["images"][..., 0])
    np.testing.assert_array_equal(shuffled[0], shuffled[1])
    assert not np.array_equal(shuffled[0], sets["train"][0])
    assert sorted(map(bytes, shuffled[0])) == sorted(map(bytes, sets["train"][0]))


def test_split_train_needs_only_the_train_files(tmp_path, capsys):
    write_idx_set(tmp_path / "raw", gz=True)
    for f in (tmp_path / "raw").glob("t10k-*"):
        f.unlink()
    assert convert(["mnist", tmp_path / "raw", "--out", tmp_path / "o.npz", "--split", "train"], capsys)[0] == 0
    code, _, err = convert(["mnist", tmp_path / "raw", "--out", tmp_path / "o.npz"], capsys)
    assert_one_error_line(code, err, "t10k-images-idx3-ubyte", "yann.lecun.com/exdb/mnist")


@pytest.mark.parametrize("damage", ["magic", "type", "dims", "truncated", "trailing", "gz_truncated", "count"])
def test_malformed_idx(tmp_path, capsys, damage):
    write_idx_set(tmp_path / "raw")
    f = tmp_path / "raw" / "train-images-idx3-ubyte"
    data = f.read_bytes()
    if damage == "magic":
        data = b"\x01\x02" + data[2:]
    elif damage == "type":
        data = data[:2] + b"\x0b" + data[3:]  # 0x0B = int16
    elif damage == "dims":
        data = data[:3] + b"\x02" + data[4:]
    elif damage == "truncated":
        data = data[:-100]
    elif damage == "trailing":
        data = data + b"\x00"
    elif damage == "gz_truncated":
        f.unlink()
        f = f.with_name(f.name + ".gz")
        data = gzip.compress(data)[:-20]
    elif damage == "count":  # 12 images but 11 labels
        f = tmp_path / "raw" / "train-labels-idx1-ubyte"
        data = idx_bytes(np.zeros(11, np.uint8))
    f.write_bytes(data)
    code, _, err = convert(["mnist", tmp_path / "raw", "--out", tmp_path / "o.npz"], capsys)
    assert_one_error_line(code, err, str(f) if damage != "count" else "11 labels")
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("fmt,source", [("mnist", "yann.lecun.com/exdb/mnist"),
                                        ("fashion_mnist", "zalandoresearch/fashion-mnist"),
                                        ("cifar10", "www.cs.toronto.edu/~kriz/cifar.html"),
                                        ("cifar100", "www.cs.toronto.edu/~kriz/cifar.html"),
                                        ("folder", "one sub-folder of images per class")])
def test_missing_input(tmp_path, capsys, fmt, source):
    code, _, err = convert([fmt, tmp_path / "nowhere", "--out", tmp_path / "o.npz"], capsys)
    assert_one_error_line(code, err, str(tmp_path / "nowhere"), source)


def test_missing_file_inside_a_folder(tmp_path, capsys):
    write_idx_set(tmp_path / "raw")
    (tmp_path / "raw" / "train-labels-idx1-ubyte").unlink()
    code, _, err = convert(["fashion_mnist", tmp_path / "raw", "--out", tmp_path / "o.npz"], capsys)
    assert_one_error_line(code, err, "train-labels-idx1-ubyte", "zalandoresearch/fashion-mnist")
    folder, _ = write_cifar(tmp_path, "cifar10", as_tar=False)
    (folder / "data_batch_3").unlink()
    code, _, err = convert(["cifar10", folder, "--out", tmp_path / "o.npz"], capsys)
    assert_one_error_line(code, err, "data_batch_3", "www.cs.toronto.edu/~kriz/cifar.html")


def test_script_exits_2_without_a_traceback_and_imports_no_optional_package(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "to_npz.py"), "mnist", str(tmp_path),
                        "--out", str(tmp_path / "o.npz")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: mnist: no train-images-idx3-ubyte")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('t', {str(ROOT / 'tools' / 'to_npz.py')!r}); "
            "s.loader.exec_module(importlib.util.module_from_spec(s)); assert not {'PIL', 'sklearn'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- CIFAR

@pytest.mark.parametrize("as_tar,py2", [(True, True), (False, False)])
@pytest.mark.parametrize("fmt", ["cifar10", "cifar100"])
def test_cifar_round_trip(tmp_path, capsys, fmt, as_tar, py2):
    path, expected = write_cifar(tmp_path, fmt, as_tar, py2)
    code, out, _ = convert([fmt, path, "--out", tmp_path / "o.npz"], capsys)
    assert code == 0, out
    z = load(tmp_path / "o.npz")
    n = len(expected["labels"])
    assert z["images"].dtype == np.uint8 and z["images"].shape == (n, 32, 32, 3)
    np.testing.assert_array_equal(z["images"], expected["images"])
    assert tuple(z["images"][0, 3, 5]) == (10, 20, 30)  # R, G, B planes -> (row, col, channel)
    np.testing.assert_array_equal(z["labels"], expected["labels"])
    assert list(z["class_names"]) == [name.replace("_", " ") for name in expected["class_names"]]
    if fmt == "cifar100":
        assert convert([fmt, path, "--out", tmp_path / "c.npz", "--labels", "coarse", "--split", "test"], capsys)[0] == 0
        z = load(tmp_path / "c.npz")
        np.testing.assert_array_equal(z["labels"], expected["coarse"][-4:])
        assert list(z["class_names"]) == [f"coarse {i}" for i in range(20)]
        np.testing.assert_array_equal(z["images"], expected["images"][-4:])


def test_cifar_folder_given_by_its_parent(tmp_path, capsys):
    _, expected = write_cifar(tmp_path, "cifar10", as_tar=False)
    assert convert(["cifar10", tmp_path, "--out", tmp_path / "o.npz", "--split", "test"], capsys)[0] == 0
    np.testing.assert_array_equal(load(tmp_path / "o.npz")["images"], expected["images"][-4:])


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = pickle.dumps({b"data": RunsCode(marker), b"labels": [0]}, protocol=2)
    with pytest.raises(to_npz.ConvertError, match="system.*refusing"):
        to_npz.unpickle(evil, "data_batch_1")
    folder, _ = write_cifar(tmp_path, "cifar10", as_tar=False)
    (folder / "data_batch_1").write_bytes(evil)
    code, _, err = convert(["cifar10", folder, "--out", tmp_path / "o.npz"], capsys)
    assert_one_error_line(code, err, "data_batch_1", "refusing")
    assert not marker.exists()
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    code, _, err = convert(["cifar10", folder, "--out", tmp_path / "o.npz"], capsys)
    assert_one_error_line(code, err, "data_batch_1", "not a readable pickle")


# ---- digits and folders

def test_digits_from_scikit_learn(tmp_path, capsys):
    from sklearn.datasets import load_digits
    assert convert(["digits", "--out", tmp_path / "d.npz"], capsys)[0] == 0
    z = load(tmp_path / "d.npz")
    assert z["images"].shape == (1797, 8, 8, 1) and z["images"].dtype == np.uint8
    assert list(z["class_names"]) == MNIST_DIGITS and set(z["labels"]) == set(range(10))
    digits = load_digits()
    np.testing.assert_array_equal(z["images"][..., 0], np.round(digits.images * 255 / 16))
    np.testing.assert_array_equal(z["labels"], digits.target)
    assert z["images"].max() == 255


def test_folder_of_pngs(tmp_path, capsys):
    arrays = write_class_folder(tmp_path / "pics")
    code, out, _ = convert(["folder", tmp_path / "pics", "--out", tmp_path / "o.npz"], capsys)
    assert code == 0 and "6 images, 6 x 6 x 3, 2 classes" in out
    z = load(tmp_path / "o.npz")
    assert list(z["class_names"]) == ["ant", "cat"]  # sorted folder names
    np.testing.assert_array_equal(z["labels"], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(z["images"], np.stack(arrays["ant"] + arrays["cat"]))
    assert convert(["folder", tmp_path / "pics", "--out", tmp_path / "g.npz", "--gray"], capsys)[0] == 0
    gray = np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in arrays["ant"] + arrays["cat"]])
    np.testing.assert_array_equal(load(tmp_path / "g.npz")["images"][..., 0], gray)  # Pillow's luma exactly


def test_folder_of_mixed_sizes_needs_size(tmp_path, capsys):
    write_class_folder(tmp_path / "pics", sizes=((6, 6), (9, 7)))
    code, _, err = convert(["folder", tmp_path / "pics", "--out", tmp_path / "o.npz"], capsys)
    assert_one_error_line(code, err, "--size")
    assert convert(["folder", tmp_path / "pics", "--out", tmp_path / "o.npz", "--size", "8"], capsys)[0] == 0
    assert load(tmp_path / "o.npz")["images"].shape == (4, 8, 8, 3)


def test_grayscale_images_in_a_folder_become_rgb(tmp_path, capsys):
    (tmp_path / "pics" / "a").mkdir(parents=True)
    x = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    Image.fromarray(x).save(tmp_path / "pics" / "a" / "g.png")  # mode L
    assert convert(["folder", tmp_path / "pics", "--out", tmp_path / "o.npz"], capsys)[0] == 0
    np.testing.assert_array_equal(load(tmp_path / "o.npz")["images"][0], np.repeat(x[..., None], 3, axis=2))


# ---- options

def test_rgb_repeats_the_channel(tmp_path, capsys):
    sets = write_idx_set(tmp_path / "raw")
    assert convert(["mnist", tmp_path / "raw", "--out", tmp_path / "o.npz", "--rgb", "--limit", "3"], capsys)[0] == 0
    images = load(tmp_path / "o.npz")["images"]
    assert images.shape == (3, 28, 28, 3)
    for c in range(3):
        np.testing.assert_array_equal(images[..., c], sets["train"][0][:3])


def test_size_resizes(tmp_path, capsys):
    write_idx_set(tmp_path / "raw")
    code, out, _ = convert(["mnist", tmp_path / "raw", "--out", tmp_path / "o.npz", "--size", "14"], capsys)
    assert code == 0 and "14 x 14 x 1" in out and "resized from 28 x 28 with Pillow bilinear" in out
    assert load(tmp_path / "o.npz")["images"].shape == (18, 14, 14, 1)


@given(side=st.integers(1, 12), channels=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_resize_to_the_same_size_is_the_identity(side, channels, seed):
    x = np.random.default_rng(seed).integers(0, 256, (2, side, side, channels), dtype=np.uint8)
    for use_pillow in (True, False):
        np.testing.assert_array_equal(to_npz.resize(x, side, use_pillow), x)


@given(side=st.integers(1, 12), size=st.integers(1, 20), channels=st.sampled_from([1, 3]), value=st.integers(0, 255))
def test_resize_keeps_a_constant_image_constant(side, size, channels, value):
    x = np.full((2, side, side, channels), value, dtype=np.uint8)
    for use_pillow in (True, False):
        y = to_npz.resize(x, size, use_pillow)
        assert y.shape == (2, size, size, channels) and y.dtype == np.uint8
        assert (y == value).all(), (use_pillow, np.unique(y))


def test_numpy_resize_averages_blocks_and_interpolates():
    x = np.array([[0, 2, 10, 20], [4, 6, 30, 40], [1, 1, 0, 0], [1, 1, 0, 255]], dtype=np.uint8)[None, ..., None]
    np.testing.assert_array_equal(to_npz.resize(x, 2, use_pillow=False)[0, ..., 0], [[3, 25], [1, 64]])
    ramp = np.array([[0, 100]], dtype=np.uint8).repeat(2, axis=0)[None, ..., None]  # 2x2: columns 0, 100
    # Output pixel centres of a 4-wide row sit at 1/4 and 3/4 of the way between the input centres.
    np.testing.assert_array_equal(to_npz.resize(ramp, 4, use_pillow=False)[0, 0, :, 0], [0, 25, 75, 100])


def test_captions_from_the_class_names(tmp_path, capsys):
    sets = write_idx_set(tmp_path / "raw")
    code, out, _ = convert(["fashion_mnist", tmp_path / "raw", "--out", tmp_path / "o.npz",
                            "--captions", "a photo of a {}"], capsys)
    assert code == 0 and "note: captions synthesized" in out
    z = load(tmp_path / "o.npz")
    labels = np.concatenate([sets["train"][1], sets["test"][1]])
    assert z["captions"].dtype.kind == "U" and z["captions"].shape == (18,)
    assert list(z["captions"]) == [f"a photo of a {to_npz.FASHION_NAMES[y]}" for y in labels]


@pytest.mark.parametrize("template", ["no braces", "{} and {}", "{name}", "unclosed {", "{0}"])
def test_bad_caption_template(tmp_path, capsys, template):
    code, _, err = convert(["digits", "--out", tmp_path / "o.npz", "--captions", template], capsys)
    assert_one_error_line(code, err, "--captions")


@pytest.mark.parametrize("argv,words", [(["digits", "--split", "train"], "no train/test split"),
                                        (["digits", "x"], "no INPUT"), (["mnist"], "needs INPUT"),
                                        (["digits", "--labels", "coarse"], "cifar100 only"),
                                        (["digits", "--limit", "0"], "--limit")])
def test_bad_flags(tmp_path, capsys, argv, words):
    code, _, err = convert(argv + ["--out", tmp_path / "o.npz"], capsys)
    assert_one_error_line(code, err, words)


# ---- the output, read by the model files

def test_every_model_file_loads_the_output(tmp_path, capsys):
    write_idx_set(tmp_path / "raw", n_train=16, n_test=4)
    path = tmp_path / "o.npz"
    argv = ["mnist", tmp_path / "raw", "--out", path, "--rgb", "--size", "16", "--captions", "a photo of a {}"]
    assert convert(argv, capsys)[0] == 0
    for name in MODELS:
        model = importlib.import_module(name)
        data = model.load_data(str(path), 16, 0, 0, 0)
        assert data["channels"] == 3 and data["class_names"] == MNIST_DIGITS, name
        for split, n in (("train", 18), ("test", 2)):
            assert data[split]["images"].shape == (n, 16, 16, 3), name
            assert data[split]["labels"].shape == (n,) and len(data[split]["captions"]) == n, name
            assert all(c.startswith("a photo of a ") for c in data[split]["captions"]), name


def make_input(fmt, tmp_path):
    if fmt in ("mnist", "fashion_mnist"):
        write_idx_set(tmp_path / "raw", n_train=16, n_test=4)
        return [tmp_path / "raw"]
    if fmt in ("cifar10", "cifar100"):
        return [write_cifar(tmp_path, fmt, as_tar=True)[0]]
    if fmt == "folder":
        write_class_folder(tmp_path / "pics", sizes=((20, 20),) * 6)
        return [tmp_path / "pics"]
    return []


@pytest.mark.parametrize("fmt", list(to_npz.LOADERS))
def test_vit_trains_on_the_output(tmp_path, capsys, fmt):
    path = tmp_path / "o.npz"
    assert convert([fmt, *make_input(fmt, tmp_path), "--out", path, "--size", "16", "--limit", "40"], capsys)[0] == 0
    vit = importlib.import_module("vit")  # here, not at the top: whatever vit.py is now
    vit.main(["--preset", "tiny", "--data", str(path), "--image_size", "16", "--patch_size", "4", "--device", "cpu",
              "--out_dir", str(tmp_path / "run"), "--max_steps", "2", "--batch_size", "8"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
