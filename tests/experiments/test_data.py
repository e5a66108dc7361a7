"""Dataset readers on small files the tests write."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from smallbn.experiments import data


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    payload = _idx_bytes(array)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _idx_folder(root: Path, compress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (12, 4, 5), dtype=np.uint8)
    labels = rng.integers(0, 3, 12, dtype=np.uint8)
    _write_idx(root / "train-images-idx3-ubyte", train, compress)
    _write_idx(root / "train-labels-idx1-ubyte", labels, compress)
    _write_idx(root / "t10k-images-idx3-ubyte", train[:5], compress)
    _write_idx(root / "t10k-labels-idx1-ubyte", labels[:5], compress)
    return train, labels


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_round_trip(tmp_path, compress):
    train, labels = _idx_folder(tmp_path, compress)
    dataset = data.load_idx_dataset(tmp_path, verify=False)
    assert dataset.train_x.shape == (12, 1, 4, 5) and dataset.test_x.shape == (5, 1, 4, 5)
    assert torch.equal(dataset.train_y, torch.from_numpy(labels.astype(np.int64)))
    raw = train.astype(np.float64)
    expected = (raw - raw.mean()) / raw.std(ddof=1)
    np.testing.assert_allclose(dataset.train_x[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_idx_md5_mismatch_is_a_clear_error(tmp_path):
    _idx_folder(tmp_path)
    with pytest.raises(data.DatasetError, match="MD5 mismatch.*Reinstall"):
        data.load_idx_dataset(tmp_path, verify=True)


def test_idx_md5_mismatch_names_the_cli_fix(tmp_path):
    _idx_folder(tmp_path)
    with pytest.raises(data.DatasetError, match="--dataset idx"):
        data.load_idx_dataset(tmp_path, verify=True)


def test_damaged_gzip_and_short_header_name_the_file(tmp_path):
    packed = gzip.compress(_idx_bytes(np.zeros((10, 4, 4), np.uint8)))
    cases = {
        "truncated.gz": packed[: len(packed) // 2],  # EOFError inside gzip
        "raw.gz": _idx_bytes(np.zeros((10, 4, 4), np.uint8)),  # BadGzipFile
        "short": bytes([0, 0, 8, 3, 0, 0]),  # struct.error: header cut after 6 bytes
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(data.DatasetError, match=f"{path}: .*(again|rename)"):
            data.read_idx(path)
    # the MD5 check decompresses too: a truncated download fails there, naming the file
    stem = "train-images-idx3-ubyte"
    path = tmp_path / f"{stem}.gz"
    path.write_bytes(cases["truncated.gz"])
    with pytest.raises(data.DatasetError, match=f"{path}: cannot read it"):
        data._verify_md5(path, stem, data._FASHION_MNIST_MD5)


def test_idx_dims_counts_and_sizes_are_checked(tmp_path):
    _idx_folder(tmp_path, compress=False)
    rng = np.random.default_rng(3)
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    images.write_bytes(_idx_bytes(rng.integers(0, 256, (12, 20))))  # flattened (N, H*W)
    with pytest.raises(data.DatasetError, match="train-images-idx3-ubyte: 2-dimensional"):
        data.load_idx_dataset(tmp_path, verify=False)
    images.write_bytes(_idx_bytes(rng.integers(0, 256, (12, 4, 5))))
    labels.write_bytes(_idx_bytes(rng.integers(0, 256, (12, 4, 5))))  # images as labels
    with pytest.raises(data.DatasetError, match="train-labels-idx1-ubyte: 3-dimensional"):
        data.load_idx_dataset(tmp_path, verify=False)
    labels.write_bytes(_idx_bytes(rng.integers(0, 3, 11)))
    with pytest.raises(data.DatasetError, match="12 images but .*11 labels"):
        data.load_idx_dataset(tmp_path, verify=False)
    labels.write_bytes(_idx_bytes(rng.integers(0, 3, 12)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(rng.integers(0, 256, (5, 6, 6))))
    with pytest.raises(data.DatasetError, match="same image size"):
        data.load_idx_dataset(tmp_path, verify=False)


def test_truncated_and_bad_idx(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(data.DatasetError, match="truncated"):
        data.read_idx(path)
    path.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(data.DatasetError, match="not an IDX file"):
        data.read_idx(path)


@pytest.mark.skipif(not data.DEFAULT_FASHION_MNIST.exists(), reason="dataset-fashion-mnist absent")
def test_installed_fashion_mnist_passes_md5():
    dataset = data.load_dataset("fashion-mnist")
    assert dataset.train_x.shape == (60000, 1, 28, 28) and dataset.test_x.shape[0] == 10000
    assert dataset.num_classes == 10


def test_missing_fashion_mnist_falls_back_to_digits(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_FASHION_MNIST", tmp_path / "absent")
    assert data.resolve_dataset("fashion-mnist") == "digits"
    assert "falling back to scikit-learn's 8x8 digits" in capsys.readouterr().err
    dataset = data.load_dataset("fashion-mnist")
    assert dataset.name == "digits" and dataset.train_x.shape[1:] == (1, 8, 8)
    assert "falling back to scikit-learn's 8x8 digits" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fashion-mnist", "idx", "cifar10", "imagefolder"])
def test_explicit_missing_data_root_is_an_error_not_a_fallback(tmp_path, name):
    with pytest.raises(data.DatasetError, match="--data-root .*absent does not exist"):
        data.load_dataset(name, tmp_path / "absent")


def test_cifar10_pickle_folder(tmp_path):
    rng = np.random.default_rng(1)
    for name, n in (("data_batch_1", 6), ("data_batch_2", 4), ("test_batch", 3)):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n)),
        }
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    dataset = data.load_dataset("cifar10", tmp_path)
    assert dataset.train_x.shape == (10, 3, 32, 32) and dataset.test_x.shape == (3, 3, 32, 32)
    first = pickle.loads((tmp_path / "data_batch_1").read_bytes())[b"data"][0]
    red = first[:1024].reshape(32, 32).astype(np.float32)
    # standardized per channel: the red plane keeps its ordering
    assert np.corrcoef(dataset.train_x[0, 0].numpy().ravel(), red.ravel())[0, 1] > 0.999
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(data.DatasetError, match="not a CIFAR-10 pickle"):
        data.load_cifar10(tmp_path)


def _cifar_batch(
    path: Path,
    n: int,
    key: Callable[[bytes], Any] = bytes.decode,
    labels: int | None = None,
    width: int = 3072,
) -> None:
    rng = np.random.default_rng(len(path.name))
    batch = {
        key(b"data"): rng.integers(0, 256, (n, width), dtype=np.uint8),
        key(b"labels"): list(rng.integers(0, 10, n if labels is None else labels)),
    }
    path.write_bytes(pickle.dumps(batch))


def test_cifar10_str_keys_and_only_published_batch_names(tmp_path):
    _cifar_batch(tmp_path / "data_batch_1", 6)  # str keys, as Python 3 tools write them
    _cifar_batch(tmp_path / "data_batch_1.bak", 5)
    _cifar_batch(tmp_path / "data_batch_10", 5)
    _cifar_batch(tmp_path / "test_batch", 3)
    dataset = data.load_cifar10(tmp_path)
    assert dataset.train_x.shape == (6, 3, 32, 32) and dataset.test_x.shape == (3, 3, 32, 32)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"labels": 7}, "10 images but 7 labels"), ({"width": 3000}, r"shape \(10, 3000\)")],
)
def test_cifar10_checks_each_file(tmp_path, options, message):
    _cifar_batch(tmp_path / "data_batch_1", 4)
    _cifar_batch(tmp_path / "test_batch", 10, key=lambda k: k, **options)
    with pytest.raises(data.DatasetError, match=f"test_batch: .*{message}"):
        data.load_cifar10(tmp_path)


def _gray_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (6, 7)) -> None:
    from PIL import Image

    rng = np.random.default_rng(4)
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size, dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(root / cls / f"{i}.png")


def test_image_folder_scales_16_bit_grayscale(tmp_path):
    from PIL import Image

    eight, sixteen = tmp_path / "eight", tmp_path / "sixteen"
    _gray_folder(eight, {"a": 3, "b": 3})
    for path in eight.rglob("*.png"):
        target = sixteen / path.relative_to(eight)
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(path)).astype(np.uint16) * 257  # same image, 16 bits
        Image.fromarray(pixels).save(target)
    assert Image.open(next(sixteen.rglob("*.png"))).mode.startswith("I")
    a, b = data.load_image_folder(eight), data.load_image_folder(sixteen)
    assert b.in_channels == 1
    torch.testing.assert_close(a.train_x, b.train_x)
    torch.testing.assert_close(a.test_x, b.test_x)


def test_image_folder_refuses_float_images(tmp_path):
    from PIL import Image

    _gray_folder(tmp_path, {"a": 2, "b": 2})
    Image.fromarray(np.ones((6, 7), np.float32)).save(tmp_path / "a" / "f.tif")
    with pytest.raises(data.DatasetError, match=r"f\.tif: a 32-bit float image.*8- or 16-bit"):
        data.load_image_folder(tmp_path)


def test_image_folder_keeps_few_files_open(tmp_path):
    resource = pytest.importorskip("resource")
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to count open files")
    _gray_folder(tmp_path, {"a": 60, "b": 60}, size=(2, 2))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(list(Path("/proc/self/fd").iterdir())) + 40  # fewer than the 120 images
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        dataset = data.load_image_folder(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(dataset.train_x) + len(dataset.test_x) == 120


def test_image_folder_skips_debris_and_names_bad_folders_and_files(tmp_path):
    _gray_folder(tmp_path / "ok", {"cat": 2, "dog": 2, ".ipynb_checkpoints": 2, "__MACOSX": 2})
    (tmp_path / "ok" / "cat" / "._0.png").write_bytes(b"AppleDouble")  # macOS metadata
    dataset = data.load_image_folder(tmp_path / "ok")
    assert dataset.num_classes == 2 and len(dataset.train_x) + len(dataset.test_x) == 4

    _gray_folder(tmp_path / "empty", {"cat": 2, "dog": 2})
    (tmp_path / "empty" / "bird").mkdir()
    with pytest.raises(data.DatasetError, match="class folder.* bird hold no images"):
        data.load_image_folder(tmp_path / "empty")

    _gray_folder(tmp_path / "nested" / "cat", {"sub": 2})
    _gray_folder(tmp_path / "nested" / "dog", {"sub": 2})
    with pytest.raises(data.DatasetError, match="found 0 images.*directly in one subfolder"):
        data.load_image_folder(tmp_path / "nested")

    _gray_folder(tmp_path / "bad", {"cat": 2, "dog": 2})
    (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(data.DatasetError, match=r"broken\.png: Pillow cannot read it"):
        data.load_image_folder(tmp_path / "bad")


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, (6, 7), dtype=np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp_path / cls / f"{i}.png")
    dataset = data.load_dataset("imagefolder", tmp_path)
    assert dataset.in_channels == 1 and dataset.train_x.shape[2:] == (6, 7)
    assert len(dataset.train_x) + len(dataset.test_x) == 10
    assert set(torch.cat([dataset.train_y, dataset.test_y]).tolist()) == {0, 1}
    with pytest.raises(data.DatasetError, match="no class subfolders"):
        data.load_image_folder(tmp_path / "cat")


def test_folder_datasets_need_a_root():
    with pytest.raises(data.DatasetError, match="pass --data-root"):
        data.load_dataset("cifar10")
