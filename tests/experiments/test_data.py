"""Dataset readers on small files the tests write."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from smallbn.experiments import data


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
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


def test_missing_fashion_mnist_falls_back_to_digits(tmp_path, capsys):
    dataset = data.load_dataset("fashion-mnist", tmp_path / "absent")
    assert dataset.name == "digits" and dataset.train_x.shape[1:] == (1, 8, 8)
    assert "falling back to scikit-learn's 8x8 digits" in capsys.readouterr().err


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
