"""Dataset readers: Fashion-MNIST / MNIST IDX files (checked against published MD5 sums),
with scikit-learn's embedded digits as a fallback when Fashion-MNIST is not installed.

Images come back as float32 tensors ``(N, 1, H, W)`` standardized with the training set's
mean and std, labels as int64 ``(N,)``.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import re
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from smallbn._optional import require

__all__ = [
    "DEFAULT_FASHION_MNIST",
    "Dataset",
    "DatasetError",
    "DATASETS",
    "OptionError",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_idx_dataset",
    "read_idx",
    "resolve_dataset",
]

DEFAULT_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

DATASETS = ("fashion-mnist", "digits", "idx", "cifar10", "imagefolder")

_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Published MD5 sums of the .gz files (github.com/zalandoresearch/fashion-mnist) and of their
# decompressed contents.  Debian's dataset-fashion-mnist recompresses the files, so its .gz
# sums differ while the contents are byte-identical: either sum identifies a good file.
_FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ),
    "train-labels-idx1-ubyte": (
        "25c81989df183df01b3e8a0aad5dffbe",
        "9018921c3c673c538a1fc5bad174d6f9",
    ),
    "t10k-images-idx3-ubyte": (
        "bef4ecab320f06d8554ea6380940ec79",
        "8181f5470baa50b63fa0f6fddb340f0a",
    ),
    "t10k-labels-idx1-ubyte": (
        "bb300cfdad3c16e7a12a480ee83cd310",
        "15d484375f8d13e6eb1aabb0c3f46965",
    ),
}

_IDX_DTYPES: dict[int, str | type] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


class DatasetError(RuntimeError):
    """A dataset is missing, corrupt or not in the expected format."""


class OptionError(ValueError):
    """A job's option whose value cannot run, found once the data or the model is known
    (too few training samples for a batch, a channel the layer does not have).  Jobs raise it
    before training anything; the command line reports it as a usage error of ``option``."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(option, message)  # both in args: it pickles (worker processes)
        self.option = option
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Dataset:
    """Standardized images and labels, split into train and test."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @property
    def num_classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])


def _read_bytes(path: Path) -> bytes:
    """The file's contents, decompressed when its name ends in ``.gz``.

    gzip and zlib report a damaged file without its name (``EOFError``, ``BadGzipFile``), which
    is useless in a folder of four; the error names the file and what to do about it.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(
            f"{path}: cannot read it ({error}): the file is truncated or damaged, or named .gz "
            f"without being gzip-compressed. Download it again (or, if it is an uncompressed "
            f"IDX file, rename it without .gz)"
        ) from error


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path}: not an IDX file (bad magic number {data[:4]!r}); pass the folder of the "
            f"four *-idx?-ubyte(.gz) files of MNIST or Fashion-MNIST"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"{path}: truncated IDX header ({len(data)} bytes, {header} needed for {ndim} "
            f"dimensions); download the file again"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])  # type: ignore[call-overload]
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[header:]
    if len(body) != expected:
        raise DatasetError(
            f"{path}: truncated IDX file ({len(body)} bytes of data, expected {expected}); "
            f"download the file again"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise DatasetError(f"{root}: missing {stem}(.gz)")


def _verify_md5(path: Path, stem: str, sums: dict[str, tuple[str, str]]) -> None:
    if stem not in sums:
        return
    packed, content = sums[stem]
    raw = path.read_bytes()
    if hashlib.md5(raw).hexdigest() == packed:
        return
    data = _read_bytes(path)
    if hashlib.md5(data).hexdigest() == content:
        return
    raise DatasetError(
        f"{path}: MD5 mismatch: the file is corrupt or not the published Fashion-MNIST. "
        f"Reinstall it (apt-get install --reinstall dataset-fashion-mnist), or, for another "
        f"IDX dataset such as MNIST, pass --dataset idx --data-root FOLDER on the command line "
        f"(verify=False in load_idx_dataset) to skip Fashion-MNIST's published checksums"
    )


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[Tensor, Tensor]:
    train_t = torch.from_numpy(train.astype(np.float32)).unsqueeze(1)
    test_t = torch.from_numpy(test.astype(np.float32)).unsqueeze(1)
    mean, std = train_t.mean(), train_t.std()
    return (train_t - mean) / std, (test_t - mean) / std


def load_idx_dataset(root: Path | str, *, verify: bool = True, name: str | None = None) -> Dataset:
    """Fashion-MNIST or MNIST from a folder of the four IDX files (``.gz`` or raw).

    With ``verify`` the files are checked against Fashion-MNIST's published MD5 sums.
    """
    root = Path(root)
    arrays: dict[str, np.ndarray] = {}
    paths: dict[str, Path] = {}
    for key, stem in _FILES.items():
        path = _find(root, stem)
        if verify:
            _verify_md5(path, stem, _FASHION_MNIST_MD5)
        arrays[key] = read_idx(path)
        paths[key] = path
    for key, array in arrays.items():
        # images are (N, H, W), labels (N,): a flattened or swapped file would otherwise
        # train on nonsense shapes or read pixels as class indices
        want = 3 if key.endswith("images") else 1
        if array.ndim != want:
            kind = "(N, H, W) images" if want == 3 else "(N,) labels"
            raise DatasetError(
                f"{paths[key]}: {array.ndim}-dimensional IDX array of shape {array.shape}, "
                f"expected {kind}; check that the file is the {_FILES[key]} of the dataset"
            )
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DatasetError(
                f"{root}: {paths[f'{split}_images'].name} holds {len(images)} images but "
                f"{paths[f'{split}_labels'].name} {len(labels)} labels; the two files must come "
                f"from the same dataset and split"
            )
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DatasetError(
            f"{root}: training images are {arrays['train_images'].shape[1:]} (H, W) but test "
            f"images {arrays['test_images'].shape[1:]}; both splits must have the same image size"
        )
    train_x, test_x = _standardize(arrays["train_images"], arrays["test_images"])
    return Dataset(
        name or ("fashion-mnist" if verify else root.name),
        train_x,
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_x,
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's embedded 8×8 digits (1,797 images), split deterministically."""
    sklearn_digits = require("sklearn.datasets", "the digits dataset").load_digits

    bunch = sklearn_digits()
    images, labels = bunch.images, bunch.target
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(len(labels) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    train_x, test_x = _standardize(images[train], images[test])
    return Dataset(
        "digits",
        train_x,
        torch.from_numpy(labels[train].astype(np.int64)),
        test_x,
        torch.from_numpy(labels[test].astype(np.int64)),
    )


def _to_dataset(
    name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]
) -> Dataset:
    """Images ``(N, H, W[, C])`` on the 8-bit scale (uint8, or float for 16-bit sources) →
    standardized ``(N, C, H, W)`` float32 tensors."""

    def channels_first(images: np.ndarray) -> Tensor:
        tensor = torch.from_numpy(images.astype(np.float32))
        return tensor.unsqueeze(1) if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2)

    train_x, test_x = channels_first(train[0]), channels_first(test[0])
    dims = (0, 2, 3)
    mean = train_x.mean(dims, keepdim=True)
    std = train_x.std(dims, keepdim=True).clamp_min(1e-6)
    return Dataset(
        name,
        ((train_x - mean) / std).contiguous(),
        torch.from_numpy(train[1].astype(np.int64)),
        ((test_x - mean) / std).contiguous(),
        torch.from_numpy(test[1].astype(np.int64)),
    )


def _cifar_entry(batch: dict[Any, Any], name: str) -> Any:
    """``batch[name]`` under a bytes key (the published files, read with encoding="bytes")
    or a str key (pickles written by Python 3 tools); None when absent."""
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    return None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 pickle → images ``(N, 32, 32, 3)`` uint8 and labels ``(N,)``."""
    with path.open("rb") as handle:
        try:
            batch = pickle.load(handle, encoding="bytes")
        except Exception as error:
            raise DatasetError(
                f"{path}: not a CIFAR-10 pickle ({error}); download the python version "
                f"(cifar-10-python.tar.gz) again"
            ) from error
    data = _cifar_entry(batch, "data") if isinstance(batch, dict) else None
    labels = _cifar_entry(batch, "labels") if isinstance(batch, dict) else None
    if data is None or labels is None:
        raise DatasetError(
            f"{path}: no 'data'/'labels' entries (a CIFAR-10 python pickle has both; "
            f"CIFAR-100's have 'fine_labels' and are not supported)"
        )
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    # a row is one 32x32 RGB image, planes in order: any other width reshapes silently
    # into a different number of (wrong) images
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{path}: 'data' has shape {data.shape}, expected (N, 3072) rows of 32x32x3 bytes "
            f"(a CIFAR-10 python pickle)"
        )
    if labels.ndim != 1 or len(labels) != len(data):
        raise DatasetError(
            f"{path}: {len(data)} images but {labels.size} labels; the file is damaged, "
            f"download it again"
        )
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


_CIFAR_TRAIN = re.compile(r"data_batch_[1-5]")


def load_cifar10(root: Path | str) -> Dataset:
    """CIFAR-10 from its python-pickle folder (``data_batch_1`` … ``data_batch_5``,
    ``test_batch``: dicts with ``b"data"`` ``(N, 3072)`` uint8 and ``b"labels"``; str keys
    are accepted too)."""
    root = Path(root)

    def read(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for path in paths:
            if not path.exists():
                raise DatasetError(f"{root}: missing {path.name} (a CIFAR-10 python folder)")
            batch_images, batch_labels = _read_cifar_batch(path)
            images.append(batch_images)
            labels.append(batch_labels)
        return np.concatenate(images), np.concatenate(labels)

    # exactly the published names: a backup such as data_batch_1.bak must not add its images
    train_files = sorted(p for p in root.glob("data_batch_*") if _CIFAR_TRAIN.fullmatch(p.name))
    if not train_files:
        raise DatasetError(
            f"{root}: no data_batch_1 … data_batch_5 files; pass --data-root the folder "
            f"cifar-10-batches-py of the python version of CIFAR-10"
        )
    return _to_dataset("cifar10", read(train_files), read([root / "test_batch"]))


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

#: Single-channel modes read as grayscale; every other mode is read as RGB.
_GRAY_MODES = {"L", "1", "I;16", "I;16L", "I;16B", "I;16N"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}

# Pillow errors for unreadable files: UnidentifiedImageError and "image file is truncated" are
# OSErrors; some plugins raise SyntaxError or ValueError on malformed headers.
_IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError)


def _skipped(path: Path) -> bool:
    """Hidden entries (``.ipynb_checkpoints``, macOS ``._x.png``) and ``__*`` folders
    (``__MACOSX``, ``__pycache__``) are tool debris, not classes or images."""
    return path.name.startswith((".", "__"))


def _image_pixels(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image as ``(H, W)`` (``mode="L"``) or ``(H, W, 3)`` pixels on the 8-bit scale:
    uint8 for 8-bit images, float32 in [0, 255] for 16-bit ones.

    ``convert("L")`` clips 16-bit values at 255 (every pixel turns black or white), so 16-bit
    grayscale is divided by 257 (65535 → 255) instead; 32-bit integer and float images have no
    fixed range and are refused.
    """
    Image = require("PIL.Image", "reading image files")

    with Image.open(path) as image:
        sixteen = image.mode in _SIXTEEN_BIT or (image.mode == "I" and image.format == "PNG")
        if sixteen:  # PNG has no 32-bit grayscale: its "I" images are 16-bit
            gray = np.asarray(image, dtype=np.float32) / 257.0
            pixels = np.asarray(Image.fromarray(gray).resize(size))
            return np.repeat(pixels[..., None], 3, axis=-1) if mode == "RGB" else pixels
        if image.mode in ("I", "F"):
            raise DatasetError(
                f"{path}: a 32-bit {'integer' if image.mode == 'I' else 'float'} image "
                f"(mode {image.mode}), whose range is unknown; save the images as 8- or "
                f"16-bit PNG/JPEG for --dataset imagefolder"
            )
        return np.asarray(image.convert(mode).resize(size))


def load_image_folder(
    root: Path | str, *, test_fraction: float = 0.2, size: int | None = None, seed: int = 0
) -> Dataset:
    """An image folder with one subfolder per class (``root/<class>/<image>``), split
    deterministically into train and test.  Images are read with Pillow, converted to
    grayscale if every image is grayscale (else RGB; 16-bit grayscale scaled to 8 bits), and
    resized to ``size`` (default: the first image's size).  Hidden entries and ``__*``
    folders are skipped."""
    Image = require("PIL.Image", "an image folder dataset")

    root = Path(root)
    classes = (
        sorted(p.name for p in root.iterdir() if p.is_dir() and not _skipped(p))
        if root.is_dir()
        else []
    )
    if not classes:
        raise DatasetError(f"{root}: no class subfolders (expected root/<class>/<image>)")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in _IMAGE_SUFFIXES and path.is_file() and not _skipped(path)
    ]
    if not files:
        raise DatasetError(
            f"{root}: found 0 images; images ({', '.join(sorted(_IMAGE_SUFFIXES))}) must sit "
            f"directly in one subfolder per class (root/<class>/<image>), not deeper"
        )
    counts = {name: 0 for name in classes}
    for path, _ in files:
        counts[path.parent.name] += 1
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise DatasetError(
            f"{root}: class folder(s) {', '.join(empty)} hold no images; a class without "
            f"images shifts every label after it. Add images or remove the folder(s)"
        )
    if len(files) < 2:
        raise DatasetError(f"{root}: found {len(files)} images; need at least 2")
    # One file open at a time: a first pass reads only the headers (modes and first size),
    # so a folder of thousands of images stays under the open-file limit.
    modes = []
    first_size: tuple[int, int] | None = None
    for path, _ in files:
        try:
            with Image.open(path) as image:
                modes.append(image.mode)
                first_size = first_size or image.size
        except _IMAGE_ERRORS as error:
            raise DatasetError(
                f"{path}: Pillow cannot read it ({error}); delete or replace the file"
            ) from error
    mode = "L" if all(m in _GRAY_MODES for m in modes) else "RGB"
    assert first_size is not None
    width, height = (size, size) if size else first_size
    pixels = []
    for path, _ in files:
        try:
            pixels.append(_image_pixels(path, mode, (width, height)))
        except _IMAGE_ERRORS as error:
            raise DatasetError(
                f"{path}: Pillow cannot read it ({error}); delete or replace the file"
            ) from error
    images = np.stack(pixels)
    labels = np.array([label for _, label in files], dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = max(1, min(len(labels) - 1, int(round(len(labels) * (1 - test_fraction)))))
    train, test = order[:cut], order[cut:]
    return _to_dataset(root.name, (images[train], labels[train]), (images[test], labels[test]))


def resolve_dataset(name: str, root: Path | str | None = None) -> str:
    """The dataset ``load_dataset(name, root)`` will actually load: ``name``, or
    ``"digits"`` when ``"fashion-mnist"`` is asked for without a root and Debian's folder is
    absent (printing the visible notice).

    A job that records which data a result came from calls this first, so a fallback run is
    labelled ``digits`` and never mistaken for (or skipped in favour of) a Fashion-MNIST run.
    An explicit ``root`` that does not exist is an error, not a fallback.
    """
    if name not in DATASETS:
        raise DatasetError(
            f"unknown dataset '{name}' (one of {', '.join(DATASETS)}); pass --dataset"
        )
    if root is not None and name != "digits" and not Path(root).exists():
        raise DatasetError(
            f"--data-root {root} does not exist; pass the folder that holds the {name} files "
            f"(or leave --data-root out for the default data)"
        )
    if name == "fashion-mnist" and root is None and not DEFAULT_FASHION_MNIST.exists():
        print(
            f"NOTICE: Fashion-MNIST not found at {DEFAULT_FASHION_MNIST} (install Debian's "
            f"dataset-fashion-mnist or pass --data-root); falling back to scikit-learn's 8x8 "
            f"digits, and results are labelled dataset=digits.",
            file=sys.stderr,
        )
        return "digits"
    return name


def load_dataset(name: str = "fashion-mnist", root: Path | str | None = None) -> Dataset:
    """The dataset a job asks for.

    ``"fashion-mnist"`` reads ``root`` (default: Debian's dataset-fashion-mnist folder) and,
    without a ``root``, falls back to the digits with a visible notice when Debian's folder is
    absent (:func:`resolve_dataset`); ``"digits"`` is the embedded digits; ``"idx"`` is any IDX
    folder (MNIST), ``"cifar10"`` a CIFAR-10 python folder, ``"imagefolder"`` a folder of class
    subfolders, each given as ``root``.  A given ``root`` that does not exist is an error.
    """
    name = resolve_dataset(name, root)
    if name == "digits":
        return load_digits()
    if name in ("idx", "cifar10", "imagefolder"):
        if root is None:
            raise DatasetError(f"dataset '{name}' needs a folder: pass --data-root")
        if name == "idx":
            return load_idx_dataset(root, verify=False)
        return load_cifar10(root) if name == "cifar10" else load_image_folder(root)
    return load_idx_dataset(Path(root) if root is not None else DEFAULT_FASHION_MNIST)
