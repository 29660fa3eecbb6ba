"""Convert a data set you already have on disk into the .npz file the model files read (--data).

Nothing is downloaded. The file holds
    images       uint8 (N, H, W, C), square, C = 1 (grayscale) or 3 (RGB)
    labels       int64 (N,), 0 <= label < len(class_names)
    class_names  str (K,)
    captions     str (N,), only with --captions (clip.py, llava.py, vqgan.py and sd3_mini.py need them)
The model files make their own fixed 90/10 train/test split of the one file, so --split here only
chooses which of the original splits go in.

Formats:
    python tools/to_npz.py mnist DIR --out mnist.npz
        DIR holds train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
        t10k-labels-idx1-ubyte, each gzipped (.gz) or not: the MNIST page (yann.lecun.com/exdb/mnist)
        or any mirror.
    python tools/to_npz.py fashion_mnist DIR --out fashion.npz
        the same four file names, from github.com/zalandoresearch/fashion-mnist (data/fashion).
    python tools/to_npz.py cifar10 cifar-10-python.tar.gz --out cifar10.npz
    python tools/to_npz.py cifar100 cifar-100-python.tar.gz --out cifar100.npz [--labels coarse]
        the "python version" archives of www.cs.toronto.edu/~kriz/cifar.html, or the folders they
        extract to (cifar-10-batches-py/, cifar-100-python/). CIFAR-100 names have '_' as ' '.
    python tools/to_npz.py digits --out digits.npz
        scikit-learn's bundled 8x8 digits (1797 images, needs scikit-learn, no download).
    python tools/to_npz.py folder DIR --out mine.npz --size 32
        DIR/<class name>/<images>: one sub-folder per class (sorted names are the classes) of png,
        jpg, jpeg, bmp, gif or webp files (GIFs: the first frame), read with Pillow as RGB.

Options:
    --size S        resize to S x S: Pillow's bilinear filter (antialiased when shrinking) if Pillow is
                    installed, else numpy (the mean of each k x k block when shrinking by an integer
                    factor k, bilinear otherwise). Folders of mixed or non-square sizes need it (a
                    non-square image is squashed to S x S, not cropped).
    --rgb / --gray  repeat a grayscale channel three times / convert RGB to luma (Pillow's 'L' formula).
    --split         train, test or all (default; train then test), for mnist, fashion_mnist, cifar*.
    --seed S        shuffle the images with this seed before --limit (default: keep the file order;
                    a folder is sorted by class, so --limit alone would keep only the first classes).
    --limit N       keep the first N images.
    --captions T    synthetic captions T.format(class name), e.g. "an image of a {}" (not one of
                    clip.py's zero-shot prompts "a {}", "a photo of a {}", "a picture of a {}",
                    which would then be training captions).

Example: MNIST for the ViT at 16 px, RGB, with captions for CLIP:
    python tools/to_npz.py mnist ~/data/mnist --out mnist16.npz --size 16 --rgb --captions "a handwritten {}"
    python vit.py --data mnist16.npz --image_size 16 --patch_size 4
"""

import argparse
import codecs
import gzip
import io
import os
import pickle
import string
import struct
import sys
import tarfile
import zlib

import numpy as np

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                 "sandal", "shirt", "sneaker", "bag", "ankle boot")
SOURCES = {"mnist": "the MNIST page (yann.lecun.com/exdb/mnist) or any mirror",
           "fashion_mnist": "the GitHub repository zalandoresearch/fashion-mnist (data/fashion)",
           "cifar10": "www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version)",
           "cifar100": "www.cs.toronto.edu/~kriz/cifar.html (CIFAR-100 python version)"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SPLIT_FORMATS = ("mnist", "fashion_mnist", "cifar10", "cifar100")


class ConvertError(Exception):
    """A user error (missing or malformed input, bad flag): reported as one line, exit code 2."""


# ---- MNIST and Fashion-MNIST: idx files

def read_idx(path, ndim):
    """An idx file (gzipped or not) as a uint8 array. Header: two zero bytes, the type byte (0x08 =
    unsigned byte), the number of dimensions, then each size as a big-endian uint32."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated .gz
        raise ConvertError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ConvertError(f"{path}: not an idx file (it does not start with two zero bytes)")
    if raw[2] != 0x08 or raw[3] != ndim:
        raise ConvertError(f"{path}: idx type 0x{raw[2]:02x} with {raw[3]} dimensions, "
                           f"expected 0x08 (unsigned bytes) with {ndim}")
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ConvertError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    if len(raw) - start != int(np.prod(dims)):
        raise ConvertError(f"{path}: the header says {' x '.join(map(str, dims))} = {int(np.prod(dims))} "
                           f"bytes of data, the file has {len(raw) - start} (truncated or corrupt)")
    return np.frombuffer(raw, np.uint8, offset=start).reshape(dims)


def load_idx_set(fmt, folder, splits, class_names):
    if not os.path.isdir(folder):
        raise ConvertError(f"{fmt}: no folder {folder}; expected a folder with the four idx files "
                           f"{', '.join(sum(MNIST_FILES.values(), ()))} (gzipped or not) from {SOURCES[fmt]}")
    images, labels = [], []
    for split in splits:
        found = []
        for name in MNIST_FILES[split]:
            paths = [os.path.join(folder, name + ext) for ext in ("", ".gz")]
            if not any(os.path.isfile(p) for p in paths):
                raise ConvertError(f"{fmt}: no {name} or {name}.gz in {folder}; get the idx files from {SOURCES[fmt]}")
            found.append(next(p for p in paths if os.path.isfile(p)))
        x, y = read_idx(found[0], 3), read_idx(found[1], 1)
        if len(x) != len(y):
            raise ConvertError(f"{fmt}: {found[0]} has {len(x)} images but {found[1]} has {len(y)} labels")
        if y.max(initial=0) >= len(class_names):
            raise ConvertError(f"{found[1]}: label {y.max()} is not one of the {len(class_names)} classes")
        images.append(x[..., None])
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels), list(class_names)


def load_mnist(args):
    return load_idx_set("mnist", args.input, args.splits, [str(d) for d in range(10)])


def load_fashion_mnist(args):
    return load_idx_set("fashion_mnist", args.input, args.splits, FASHION_NAMES)


# ---- CIFAR-10 and CIFAR-100: pickled batches, in the tar.gz or extracted

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickling can call any importable function a file names (os.system included), so a pickle
    from elsewhere can run code. A CIFAR batch needs only numpy's array reconstruction and, when
    written by Python 3 with protocol 2, codecs.encode for its bytes; everything else is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def __init__(self, file, source):
        super().__init__(file, encoding="bytes")  # the batches were written by Python 2: str -> bytes
        self.source = source

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise ConvertError(f"{self.source}: the pickle asks for {module}.{name}, which no CIFAR batch "
                               f"needs; refusing to load it (a pickle can run code)")
        if name == "_reconstruct":  # numpy 2 renamed numpy.core to numpy._core
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return {"ndarray": np.ndarray, "dtype": np.dtype, "encode": codecs.encode}[name]


def unpickle(data, source):
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), source).load()
    except ConvertError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise ConvertError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def cifar_reader(fmt, path, inner):
    """read(name) -> the bytes of `inner/name`, from the tar.gz or from an extracted folder (the
    folder itself or its parent), without extracting anything to disk."""
    if os.path.isfile(path):
        # One sequential pass over the archive: a .gz cannot seek back without decompressing again.
        try:
            with tarfile.open(path, "r:*") as tar:
                files = {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar
                         if m.isfile() and m.name.removeprefix("./").startswith(inner + "/")}
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ConvertError(f"{path}: not a readable tar archive ({e})") from None

        def read(name):
            if f"{inner}/{name}" not in files:
                raise ConvertError(f"{path}: no {inner}/{name} in the archive; expected the {SOURCES[fmt]}")
            return files[f"{inner}/{name}"]
        return read
    if os.path.isdir(path):
        folder = os.path.join(path, inner) if os.path.isdir(os.path.join(path, inner)) else path

        def read(name):
            if not os.path.isfile(os.path.join(folder, name)):
                raise ConvertError(f"{fmt}: no {name} in {folder}; expected the extracted {inner}/ of {SOURCES[fmt]}")
            with open(os.path.join(folder, name), "rb") as f:
                return f.read()
        return read
    raise ConvertError(f"{fmt}: no file or folder {path}; expected {inner.replace('-batches-py', '-python')}.tar.gz "
                       f"or its extracted {inner}/ from {SOURCES[fmt]}")


def cifar_batch(batch, label_key, source):
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ConvertError(f"{source}: expected b'data' uint8 (n, 3072), got {getattr(data, 'shape', type(data).__name__)}")
    labels = np.asarray(batch.get(label_key, []), dtype=np.int64)
    if labels.shape != (len(data),):
        raise ConvertError(f"{source}: expected {len(data)} values under {label_key}, got {labels.shape}")
    # Each row is the R plane, then G, then B, each 32 x 32 in row-major order: (n, C, H, W) -> HWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar(fmt, args, inner, files, meta_file, label_key, names_key):
    read = cifar_reader(fmt, args.input, inner)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in unpickle(read(meta_file), meta_file)[names_key]]
    images, labels = [], []
    for split in args.splits:
        for name in files[split]:
            x, y = cifar_batch(unpickle(read(name), name), label_key, name)
            images.append(x)
            labels.append(y)
    labels = np.concatenate(labels)
    if labels.min() < 0 or labels.max() >= len(names):
        raise ConvertError(f"{fmt}: labels outside 0..{len(names) - 1}, the classes of {meta_file}")
    return np.concatenate(images), labels, [n.replace("_", " ") for n in names]


def load_cifar10(args):
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return load_cifar("cifar10", args, "cifar-10-batches-py", files, "batches.meta", b"labels", b"label_names")


def load_cifar100(args):
    return load_cifar("cifar100", args, "cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta",
                      f"{args.labels}_labels".encode(), f"{args.labels}_label_names".encode())


# ---- scikit-learn's digits and a folder of images

def load_digits(args):
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ConvertError("digits needs scikit-learn (its 8x8 digits ship with it): pip install scikit-learn") from None
    digits = sklearn_digits()
    images = np.floor(digits.images * (255 / 16) + 0.5).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    return images, digits.target.astype(np.int64), [str(d) for d in range(10)]


def pillow():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def load_folder(args):
    Image = pillow()
    if Image is None:
        raise ConvertError("folder needs Pillow to read images: pip install pillow")
    root = args.input
    if not os.path.isdir(root):
        raise ConvertError(f"folder: no folder {root}; expected a folder with one sub-folder of images per class")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ConvertError(f"folder: {root} has no sub-folders; expected one sub-folder of images per class")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ConvertError(f"folder: {os.path.join(root, name)} has no {'/'.join(IMAGE_EXTENSIONS)} files")
        for f in files:
            path = os.path.join(root, name, f)
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
                    if args.size:  # resized here: images of different sizes cannot be stacked
                        im = im.resize((args.size, args.size), getattr(Image, "Resampling", Image).BILINEAR)
                    images.append(np.asarray(im, dtype=np.uint8))
            except (OSError, ValueError) as e:
                raise ConvertError(f"{path}: not a readable image ({e})") from None
            labels.append(label)
    shapes = sorted({x.shape[:2] for x in images})
    if len(shapes) > 1 or shapes[0][0] != shapes[0][1]:
        raise ConvertError(f"folder: the images are {', '.join(f'{h}x{w}' for h, w in shapes[:4])}"
                           f"{' ...' if len(shapes) > 4 else ''}, not all one square size; pass --size S")
    return np.stack(images), np.array(labels, dtype=np.int64), classes


LOADERS = {"mnist": load_mnist, "fashion_mnist": load_fashion_mnist, "cifar10": load_cifar10,
           "cifar100": load_cifar100, "digits": load_digits, "folder": load_folder}


# ---- common post-processing

def resize(images, size, use_pillow=None):
    """uint8 (N, H, H, C) -> (N, size, size, C). Pillow's bilinear filter (which widens to average
    all covered pixels when shrinking) if use_pillow (default: if installed); else numpy: the mean
    of each k x k block when shrinking by an integer factor k, else bilinear between pixel centres."""
    Image = pillow() if use_pillow is not False else None
    if use_pillow and Image is None:
        raise ConvertError("resizing with Pillow needs it installed: pip install pillow")
    n, h, w, c = images.shape
    if h != w:
        raise ConvertError(f"images are {h}x{w}, not square; --size resizes square images only")
    if Image is not None:
        bilinear = getattr(Image, "Resampling", Image).BILINEAR
        out = [np.asarray(Image.fromarray(x[..., 0] if c == 1 else x).resize((size, size), bilinear)) for x in images]
        return np.stack(out).reshape(n, size, size, c)
    x = images.astype(np.float64)
    if h > size and h % size == 0:
        k = h // size
        x = x.reshape(n, size, k, size, k, c).mean(axis=(2, 4))
    else:
        for axis in (1, 2):  # separable: rows, then columns; edges are clamped
            pos = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
            lo = np.floor(pos).astype(np.int64)
            hi = np.minimum(lo + 1, h - 1)
            frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(4)])
            x = np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def to_gray(images):
    """RGB -> luma with Pillow's integer formula (ITU-R 601), so it equals Image.convert('L')."""
    r, g, b = (images[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]


def postprocess(images, labels, class_names, args):
    """Shuffle (--seed), --limit, --size, --rgb / --gray and --captions: the arrays to write."""
    order = np.arange(len(images)) if args.seed is None else np.random.default_rng(args.seed).permutation(len(images))
    keep = order[:args.limit] if args.limit else order
    images, labels = images[keep], labels[keep]
    if args.size and images.shape[1:3] != (args.size, args.size):
        images = resize(images, args.size)
    if args.rgb and images.shape[3] == 1:
        images = np.repeat(images, 3, axis=3)
    if args.gray and images.shape[3] == 3:
        images = to_gray(images)
    arrays = {"images": np.ascontiguousarray(images), "labels": labels.astype(np.int64),
              "class_names": np.array(class_names, dtype=str)}
    if args.captions:
        arrays["captions"] = np.array([args.captions.format(class_names[y]) for y in labels], dtype=str)
    return arrays


def check_args(args):
    """Every check that needs no data, so that a typo fails before a long conversion."""
    needs_input = args.format != "digits"
    if needs_input != (args.input is not None):
        raise ConvertError(f"{args.format} needs INPUT, the file or folder to convert" if needs_input
                           else "digits takes no INPUT (the images ship with scikit-learn)")
    if args.split and args.format not in SPLIT_FORMATS:
        raise ConvertError(f"--split: {args.format} has no train/test split")
    args.splits = ("train", "test") if args.split in (None, "all") else (args.split,)
    if args.labels and args.format != "cifar100":
        raise ConvertError("--labels fine|coarse is for cifar100 only")
    args.labels = args.labels or "fine"
    for flag in ("size", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConvertError(f"--{flag} must be 1 or more")
    if args.captions is not None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(args.captions) if f is not None]
        except ValueError as e:
            raise ConvertError(f"--captions {args.captions!r}: {e}") from None
        if fields != [""]:
            raise ConvertError(f"--captions {args.captions!r}: needs exactly one {{}} where the class name goes")


def human_size(n):
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=list(LOADERS))
    parser.add_argument("input", nargs="?", help="the file or folder to convert (none for digits)")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--size", type=int, help="resize to SIZE x SIZE")
    color = parser.add_mutually_exclusive_group()
    color.add_argument("--rgb", action="store_true", help="grayscale -> RGB (the channel repeated)")
    color.add_argument("--gray", action="store_true", help="RGB -> grayscale (luma)")
    parser.add_argument("--limit", type=int, help="keep the first LIMIT images")
    parser.add_argument("--split", choices=["train", "test", "all"], help="the original split(s) to keep (default all)")
    parser.add_argument("--seed", type=int, help="shuffle with this seed before --limit (default: file order)")
    parser.add_argument("--labels", choices=["fine", "coarse"], help="cifar100: the 100 fine or 20 coarse classes")
    parser.add_argument("--captions", metavar="TEMPLATE", help='synthetic captions, e.g. "an image of a {}"')
    args = parser.parse_args(argv)
    try:
        check_args(args)
        images, labels, class_names = LOADERS[args.format](args)
        source_shape = images.shape[1:]
        arrays = postprocess(images, labels, class_names, args)
        out_dir = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "wb") as f:  # a file object: np.savez_compressed would append .npz to a name
            np.savez_compressed(f, **arrays)
        os.replace(tmp, args.out)  # no half-written file under the real name
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n, h, w, c = arrays["images"].shape
    how = ""
    if source_shape[:2] != (h, w) and args.format != "folder":
        how = f", resized from {source_shape[0]} x {source_shape[1]} with {'Pillow bilinear' if pillow() else 'numpy'}"
    if "captions" in arrays:
        first = str(arrays["captions"][0])
        print(f"note: captions synthesized from the class names ('{first}', ...); "
              f"clip.py, llava.py, vqgan.py and sd3_mini.py train on captions")
    print(f"wrote {n} images, {h} x {w} x {c}, {len(class_names)} classes{how} -> {args.out} "
          f"({human_size(os.path.getsize(args.out))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
