"""MNIST loaders: IDX files written by the test, tfds through its offline mock, real data if present."""

import gzip
import os
import struct

import numpy as np
import pytest

from siamjax.data import mnist


def _write_idx(path, array, type_byte=0x08):
  header = struct.pack(">BBBB", 0, 0, type_byte, array.ndim) + struct.pack(
      f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / "mnist"
  folder.mkdir()
  data = {}
  for split, n in (("train", 30), ("test", 12)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    img_name, lbl_name = mnist.FILES[split]
    _write_idx(folder / img_name, images)
    _write_idx(folder / lbl_name, labels)
    data[split] = images, labels
  return tmp_path, data


def test_load_mnist_reads_generated_idx(fake_mnist):
  root, data = fake_mnist
  for split in ("train", "test"):
    images, labels = mnist.load_mnist(split, root)
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images, data[split][0])
    np.testing.assert_array_equal(labels, data[split][1])


def test_load_mnist_uses_env_var(fake_mnist, monkeypatch):
  root, data = fake_mnist
  monkeypatch.setenv("SIAMJAX_DATA_DIR", str(root))
  np.testing.assert_array_equal(mnist.load_mnist("test")[1], data["test"][1])


def test_load_mnist_errors(fake_mnist, tmp_path, monkeypatch):
  root, _ = fake_mnist
  with pytest.raises(ValueError, match="split"):
    mnist.load_mnist("valid", root)
  with pytest.raises(ValueError, match="data_dir"):
    mnist.load_mnist("train", tmp_path / "nowhere")
  monkeypatch.delenv("SIAMJAX_DATA_DIR", raising=False)
  with pytest.raises(ValueError, match="SIAMJAX_DATA_DIR"):
    mnist.load_mnist("train")


def test_read_idx_rejects_truncated_and_bad_magic(tmp_path):
  path = tmp_path / "x.idx.gz"
  _write_idx(path, np.zeros((3, 4), np.uint8))
  raw = gzip.open(path).read()
  with gzip.open(path, "wb") as f:
    f.write(raw[:-1])
  with pytest.raises(ValueError, match="IDX header"):
    mnist.read_idx(path)
  with gzip.open(path, "wb") as f:
    f.write(b"\x01\x02\x03\x04")
  with pytest.raises(ValueError, match="not an IDX file"):
    mnist.read_idx(path)


def test_load_mnist_tfds_with_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=7):
    images, labels = mnist.load_mnist_tfds("train")
  assert images.shape == (7, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (7,) and labels.dtype == np.int32
  assert ((labels >= 0) & (labels < 10)).all()


@pytest.mark.skipif(not os.environ.get("SIAMJAX_DATA_DIR"), reason="SIAMJAX_DATA_DIR is unset")
def test_real_mnist_counts():
  images, labels = mnist.load_mnist("test")
  assert images.shape == (10000, 28, 28)
  assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
