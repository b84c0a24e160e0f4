"""MNIST as arrays: the IDX ``.gz`` files from a data directory, or ``tfds`` ``mnist``.

Both sources return the same thing: ``images`` ``[N, 28, 28]`` uint8 (0 background,
255 ink) and ``labels`` ``[N]`` int32 digits, in the file's order. Scale the images
on the device (``images.astype(jnp.float32) / 255``) rather than keeping float copies
on the host.

The data directory follows the project convention: a folder holding an ``mnist/``
subfolder (``--data-dir`` flag, else the ``SIAMJAX_DATA_DIR`` environment variable).
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib

import numpy as np

__all__ = ["FILES", "MIRROR", "data_dir_from_env", "read_idx", "load_mnist", "load_mnist_tfds"]

#: Split name -> (image file, label file), the standard names from LeCun's site.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: A public mirror of LeCun's files (the one tensorflow-datasets downloads from).
MIRROR = "https://storage.googleapis.com/cvdf-datasets/mnist/"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def data_dir_from_env(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns ``data_dir``, else ``$SIAMJAX_DATA_DIR``; raises ValueError when neither is set.

  >>> str(data_dir_from_env("/tmp/some/where"))
  '/tmp/some/where'
  """
  if data_dir is None:
    data_dir = os.environ.get("SIAMJAX_DATA_DIR")
  if not data_dir:
    raise ValueError("data_dir is not given and SIAMJAX_DATA_DIR is not set: pass --data-dir "
                     "DIR (a folder with an mnist/ subfolder) or export SIAMJAX_DATA_DIR")
  return pathlib.Path(data_dir)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads one IDX file (gzip-compressed when its name ends in ``.gz``).

  Args:
    path: the file. Format: two zero bytes, a type byte (0x08 = uint8, ...), the number
      of dimensions, then each dimension as a big-endian uint32, then the data.

  Returns:
    The array with the file's shape and dtype.

  Raises:
    ValueError: naming the file, when it is truncated, not gzip, or not IDX (delete it
      and download it again).

  References:
    Y. LeCun, C. Cortes, C. Burges, "The MNIST database of handwritten digits",
    the IDX file format section.
  """
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  fix = f"delete it and download {path.name} again (e.g. from {MIRROR})"
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # truncated or corrupt gzip
    raise ValueError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
                     f"{fix}") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r}); {fix}")
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  ndim = raw[3]
  header = 4 + 4 * ndim
  shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  count = int(np.prod(shape)) if shape else 1
  if len(raw) != header + count * dtype.itemsize:
    raise ValueError(f"{path}: IDX header says shape {shape} ({count} values) but the "
                     f"file holds {len(raw) - header} data bytes (truncated?); {fix}")
  return np.frombuffer(raw, dtype, count=count, offset=header).reshape(shape).astype(
      dtype.newbyteorder("="))


def load_mnist(split: str = "train", data_dir: str | os.PathLike | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Loads an MNIST split from the IDX ``.gz`` files in ``<data_dir>/mnist/``.

  Args:
    split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
    data_dir: folder holding ``mnist/``; ``None`` reads ``$SIAMJAX_DATA_DIR``.

  Returns:
    ``(images [N, 28, 28] uint8, labels [N] int32)``.

  Raises:
    ValueError: an unknown split, a data directory that is not a folder, a missing,
      truncated or corrupt file (named, with what to do).
  """
  if split not in FILES:
    raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
  root = data_dir_from_env(data_dir)
  if not root.is_dir():
    raise ValueError(f"data_dir: {root} (from {'--data-dir' if data_dir else 'SIAMJAX_DATA_DIR'})"
                     f" is not a folder; pass --data-dir DIR or set SIAMJAX_DATA_DIR to the "
                     f"folder that holds mnist/")
  folder = root / "mnist"
  image_file, label_file = (folder / name for name in FILES[split])
  for f in (image_file, label_file):
    if not f.is_file():
      raise ValueError(f"data_dir: {f} does not exist; place the MNIST IDX files "
                       f"{', '.join(FILES[split])} (e.g. from {MIRROR}) in {folder}")
  images = read_idx(image_file)
  labels = read_idx(label_file)
  if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
    raise ValueError(f"data_dir: {image_file.name} {images.shape} and {label_file.name} "
                     f"{labels.shape} do not form [N, H, W] images with [N] labels")
  if images.dtype != np.uint8 or labels.dtype != np.uint8 or (labels.size and labels.max() > 9):
    raise ValueError(f"data_dir: {image_file.name} ({images.dtype}) and {label_file.name} "
                     f"({labels.dtype}, up to {labels.max() if labels.size else None}) are not "
                     f"MNIST's uint8 images and digit labels 0..9")
  return images.astype(np.uint8), labels.astype(np.int32)


def load_mnist_tfds(split: str = "train", data_dir: str | os.PathLike | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Loads an MNIST split through ``tensorflow_datasets`` (``mnist``).

  Reads through ``tfds.data_source`` (random access to ``array_record`` files, no
  TensorFlow needed) and falls back to ``tfds.load`` (which needs TensorFlow) when
  that fails, e.g. for data prepared in the older ``tfrecord`` format.

  Args:
    split: a tfds split string (``"train"``, ``"test"``, ``"train[:10%]"``, ...).
    data_dir: tfds' own data directory (``None``: tfds' default, ``~/tensorflow_datasets``).
      tfds downloads and prepares the data there on first use.

  Returns:
    ``(images [N, 28, 28] uint8, labels [N] int32)``, the same layout as :func:`load_mnist`.
  """
  import tensorflow_datasets as tfds  # optional at import time: slow to import

  data_dir = None if data_dir is None else str(data_dir)
  try:
    source = tfds.data_source("mnist", split=split, data_dir=data_dir)
    records = [source[i] for i in range(len(source))]
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.asarray([r["label"] for r in records])
  except Exception as source_error:  # noqa: BLE001 - retry through the TensorFlow path
    try:
      data = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1, data_dir=data_dir))
    except Exception as load_error:  # noqa: BLE001
      raise ValueError(f"split {split!r}: tfds could not read mnist ({source_error!r}; "
                       f"then {load_error!r})") from load_error
    images, labels = np.asarray(data["image"]), np.asarray(data["label"])
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  return images.astype(np.uint8), labels.astype(np.int32)
