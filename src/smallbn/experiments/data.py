"""Dataset readers: Fashion-MNIST / MNIST IDX files (checked against published MD5 sums),
with scikit-learn's embedded digits as a fallback when Fashion-MNIST is not installed.

Images come back as float32 tensors ``(N, 1, H, W)`` standardized with the training set's
mean and std, labels as int64 ``(N,)``.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_FASHION_MNIST",
    "Dataset",
    "DatasetError",
    "DATASETS",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_idx_dataset",
    "read_idx",
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


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])  # type: ignore[call-overload]
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise DatasetError(
            f"{path}: truncated IDX file ({len(body)} bytes of data, expected {expected})"
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
    data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    if hashlib.md5(data).hexdigest() == content:
        return
    raise DatasetError(
        f"{path}: MD5 mismatch: the file is corrupt or not the published Fashion-MNIST. "
        f"Reinstall it (apt-get install --reinstall dataset-fashion-mnist) or pass verify=False "
        f"for another IDX dataset such as MNIST"
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
    arrays = {}
    for key, stem in _FILES.items():
        path = _find(root, stem)
        if verify:
            _verify_md5(path, stem, _FASHION_MNIST_MD5)
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DatasetError(f"{root}: {split} images and labels differ in length")
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
    from sklearn.datasets import load_digits as sklearn_digits

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
    """Images ``(N, H, W[, C])`` uint8 → standardized ``(N, C, H, W)`` float32 tensors."""

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


def load_cifar10(root: Path | str) -> Dataset:
    """CIFAR-10 from its python-pickle folder (``data_batch_1`` … ``data_batch_5``,
    ``test_batch``: dicts with ``b"data"`` ``(N, 3072)`` uint8 and ``b"labels"``)."""
    root = Path(root)

    def read(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for path in paths:
            if not path.exists():
                raise DatasetError(f"{root}: missing {path.name} (a CIFAR-10 python folder)")
            with path.open("rb") as handle:
                try:
                    batch = pickle.load(handle, encoding="bytes")
                except Exception as error:
                    raise DatasetError(f"{path}: not a CIFAR-10 pickle ({error})") from error
            if b"data" not in batch or b"labels" not in batch:
                raise DatasetError(f"{path}: no b'data'/b'labels' entries (a CIFAR-10 pickle?)")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return np.concatenate(images), np.concatenate(labels)

    train_files = sorted(root.glob("data_batch_*"))
    if not train_files:
        raise DatasetError(f"{root}: no data_batch_* files (a CIFAR-10 python folder)")
    return _to_dataset("cifar10", read(train_files), read([root / "test_batch"]))


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image_folder(
    root: Path | str, *, test_fraction: float = 0.2, size: int | None = None, seed: int = 0
) -> Dataset:
    """An image folder with one subfolder per class (``root/<class>/<image>``), split
    deterministically into train and test.  Images are read with Pillow, converted to
    grayscale if every image is grayscale (else RGB), and resized to ``size`` (default: the
    first image's size)."""
    from PIL import Image

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DatasetError(f"{root}: no class subfolders (expected root/<class>/<image>)")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in _IMAGE_SUFFIXES
    ]
    if len(files) < 2:
        raise DatasetError(f"{root}: found {len(files)} images; need at least 2")
    opened = [Image.open(path) for path, _ in files]
    mode = "L" if all(image.mode in ("L", "1", "I;16") for image in opened) else "RGB"
    width, height = (size, size) if size else opened[0].size
    images = np.stack([np.asarray(image.convert(mode).resize((width, height))) for image in opened])
    labels = np.array([label for _, label in files], dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = max(1, min(len(labels) - 1, int(round(len(labels) * (1 - test_fraction)))))
    train, test = order[:cut], order[cut:]
    return _to_dataset(root.name, (images[train], labels[train]), (images[test], labels[test]))


def load_dataset(name: str = "fashion-mnist", root: Path | str | None = None) -> Dataset:
    """The dataset a job asks for.

    ``"fashion-mnist"`` reads ``root`` (default: Debian's dataset-fashion-mnist folder) and
    falls back to the digits with a visible notice when it is absent; ``"digits"`` is the
    embedded digits; ``"idx"`` is any IDX folder (MNIST), ``"cifar10"`` a CIFAR-10 python
    folder, ``"imagefolder"`` a folder of class subfolders, each given as ``root``.
    """
    if name == "digits":
        return load_digits()
    if name in ("idx", "cifar10", "imagefolder"):
        if root is None:
            raise DatasetError(f"dataset '{name}' needs a folder: pass --data-root")
        if name == "idx":
            return load_idx_dataset(root, verify=False)
        return load_cifar10(root) if name == "cifar10" else load_image_folder(root)
    if name != "fashion-mnist":
        raise DatasetError(
            f"unknown dataset '{name}' (fashion-mnist, digits, idx, cifar10, imagefolder)"
        )
    folder = Path(root) if root is not None else DEFAULT_FASHION_MNIST
    if not folder.exists():
        print(
            f"NOTICE: Fashion-MNIST not found at {folder} (install Debian's dataset-fashion-mnist "
            f"or pass --data-root); falling back to scikit-learn's 8x8 digits.",
            file=sys.stderr,
        )
        return load_digits()
    return load_idx_dataset(folder)
