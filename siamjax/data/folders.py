"""User data as arrays: a folder of class-named image folders, or a CSV of vector pairs.

* :func:`load_image_folder`: ``root/<class>/<image>`` files of any size, resized to one
  shape, as ``uint8`` arrays with integer labels.
* :func:`load_vector_pairs_csv`: each row a left vector, a right vector and a 0/1
  label (the 200 + 200 + 1 column layout by default); a bad row raises ``ValueError``
  naming its line.
* :func:`write_synthetic_vector_pairs_csv`: a CSV with known separability, for tests,
  smoke runs and demos.
"""

from __future__ import annotations

import csv
import os
import pathlib

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "load_image_folder", "load_vector_pairs_csv",
           "write_synthetic_vector_pairs_csv", "write_synthetic_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# ---------------------------------------------------------------------------------
# Vector pairs in a CSV
# ---------------------------------------------------------------------------------


def _is_header(row: list[str]) -> bool:
  try:
    [float(c) for c in row]
  except ValueError:
    return True
  return False


def load_vector_pairs_csv(
    path: str | os.PathLike,
    *,
    left_columns: int = 200,
    right_columns: int | None = 200,
    label_column: int = -1,
    header: bool | None = None,
    delimiter: str = ",",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads pairs of feature vectors with 0/1 labels from a CSV file.

  Every row holds ``left_columns`` values of the left vector, then ``right_columns``
  values of the right vector, with the label in column ``label_column`` (counted
  among all columns, negative from the end; the label column is not part of either
  vector). The default is the 200 + 200 + label layout.

  Args:
    path: the CSV file.
    left_columns: width of the left vector (the split point).
    right_columns: width of the right vector; ``None`` takes every remaining column.
    label_column: position of the 0/1 label (1 = same class); ``-1`` is the last column.
    header: whether the first row is a header; ``None`` detects it (a first row with
      any non-numeric cell).
    delimiter: the field separator.

  Returns:
    ``(left [P, L] float32, right [P, R] float32, similar [P] int32)``.

  Raises:
    ValueError: naming the file line of a row with the wrong number of columns, a
      non-numeric cell, or a label other than 0 or 1.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"path: {path} does not exist")
  if left_columns < 1 or (right_columns is not None and right_columns < 1):
    raise ValueError(f"left_columns and right_columns must be >= 1, got {left_columns}, "
                     f"{right_columns}")
  with open(path, newline="") as f:
    rows = list(csv.reader(f, delimiter=delimiter))
  first = 0
  if rows and (header if header is not None else _is_header(rows[0])):
    first = 1
  body = [(line, row) for line, row in enumerate(rows[first:], start=first + 1) if row]
  if not body:
    raise ValueError(f"path: {path} has no data rows")
  width = len(body[0][1])
  if right_columns is None:
    right_columns = width - 1 - left_columns
    if right_columns < 1:
      raise ValueError(f"path: line {body[0][0]} has {width} columns, too few for "
                       f"left_columns={left_columns} + a right vector + a label")
  expected = left_columns + right_columns + 1
  if not -expected <= label_column < expected:
    raise ValueError(f"label_column must be in [{-expected}, {expected}), got {label_column}")
  label_at = label_column % expected
  values = np.empty((len(body), expected), np.float64)
  for k, (line, row) in enumerate(body):
    if len(row) != expected:
      raise ValueError(f"{path}: line {line} has {len(row)} columns, expected {expected} "
                       f"({left_columns} left + {right_columns} right + 1 label)")
    try:
      values[k] = [float(cell) for cell in row]
    except ValueError:
      bad = next(j for j, cell in enumerate(row) if not _is_float(cell))
      raise ValueError(f"{path}: line {line}, column {bad + 1} is not a number: "
                       f"{row[bad]!r}") from None
  if not np.all(np.isfinite(values)):
    k, j = np.argwhere(~np.isfinite(values))[0]
    raise ValueError(f"{path}: line {body[k][0]}, column {j + 1} is not finite: "
                     f"{body[k][1][j]!r}")
  labels = values[:, label_at]
  bad_label = np.flatnonzero((labels != 0) & (labels != 1))
  if bad_label.size:
    k = int(bad_label[0])
    raise ValueError(f"{path}: line {body[k][0]} has label {body[k][1][label_at]!r} in column "
                     f"{label_at + 1}; labels must be 0 or 1 (1 = same class)")
  features = np.delete(values, label_at, axis=1).astype(np.float32)
  return (features[:, :left_columns], features[:, left_columns:],
          labels.astype(np.int32))


def _is_float(cell: str) -> bool:
  try:
    float(cell)
  except ValueError:
    return False
  return True


def write_synthetic_vector_pairs_csv(
    path: str | os.PathLike,
    n_rows: int,
    *,
    left_columns: int = 200,
    right_columns: int = 200,
    classes: int = 20,
    noise: float = 1.0,
    seed: int = 0,
    header: bool = True,
) -> None:
  """Writes a CSV of vector pairs whose labels a Siamese network can learn.

  Each vector is a random linear map of its class's centre plus Gaussian noise (the
  left and right vectors use different maps, as two views or sensors would); half the
  rows pair two vectors of the same class (label 1), half of different classes.

  Args:
    path: the file to write.
    n_rows: number of pairs.
    left_columns, right_columns: widths of the two vectors.
    classes: number of latent classes.
    noise: noise standard deviation relative to the class centres' (1.0).
    seed: NumPy ``Generator`` seed (host-side data preparation).
    header: write a header row ``l0..., r0..., label``.
  """
  rng = np.random.default_rng(seed)
  latent = 16
  centres = rng.normal(size=(classes, latent))
  map_l = rng.normal(size=(latent, left_columns)) / np.sqrt(latent)
  map_r = rng.normal(size=(latent, right_columns)) / np.sqrt(latent)
  similar = (np.arange(n_rows) % 2 == 0).astype(np.int64)
  rng.shuffle(similar)
  c_left = rng.integers(0, classes, n_rows)
  c_right = np.where(similar == 1, c_left, (c_left + rng.integers(1, classes, n_rows)) % classes)
  left = (centres[c_left] + noise * rng.normal(size=(n_rows, latent))) @ map_l
  right = (centres[c_right] + noise * rng.normal(size=(n_rows, latent))) @ map_r
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    if header:
      w.writerow([f"l{i}" for i in range(left_columns)] + [f"r{i}" for i in range(right_columns)]
                 + ["label"])
    for row in np.concatenate([left, right, similar[:, None]], axis=1):
      w.writerow([f"{v:.5g}" for v in row[:-1]] + [str(int(row[-1]))])


# ---------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------


def load_image_folder(
    root: str | os.PathLike,
    *,
    size: tuple[int, int] = (64, 64),
    grayscale: bool = False,
    min_per_class: int = 2,
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
  """Loads ``root/<class name>/<image file>`` images, resized to ``size``.

  Args:
    root: folder of class-named subfolders; files with an image suffix
      (:data:`IMAGE_SUFFIXES`) are read, others ignored; classes are sorted by name.
    size: ``(height, width)`` after resizing (bilinear, Pillow).
    grayscale: one channel instead of RGB.
    min_per_class: classes with fewer images are an error (pairs need two).

  Returns:
    ``(images [N, H, W, C] uint8, labels [N] int32, class_names [C], paths [N])``.
  """
  from PIL import Image  # Pillow: optional, only needed for image folders

  root = pathlib.Path(root)
  if not root.is_dir():
    raise ValueError(f"root: {root} is not a folder")
  class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
  if len(class_dirs) < 2:
    raise ValueError(f"root: {root} needs at least two class subfolders, found "
                     f"{[d.name for d in class_dirs]}")
  h, w = size
  images, labels, paths = [], [], []
  for c, d in enumerate(class_dirs):
    files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < min_per_class:
      raise ValueError(f"root: class folder {d.name!r} has {len(files)} images, needs at "
                       f"least {min_per_class}")
    for p in files:
      try:
        with Image.open(p) as im:
          im = im.convert("L" if grayscale else "RGB").resize((w, h), Image.BILINEAR)
          images.append(np.asarray(im, np.uint8))
      except OSError as e:
        raise ValueError(f"root: cannot read image {p} ({e})") from e
      labels.append(c)
      paths.append(str(p))
  x = np.stack(images)
  if grayscale:
    x = x[..., None]
  return x, np.asarray(labels, np.int32), [d.name for d in class_dirs], paths


def write_synthetic_image_folder(root: str | os.PathLike, *, classes: int = 4,
                                 per_class: int = 10, seed: int = 0) -> None:
  """Writes ``root/class_k/img_j.png``: per class a coloured shape, at random sizes and spots.

  Images have random sizes (20 to 40 pixels a side) so loaders must resize. For tests,
  smoke runs and demos.
  """
  from PIL import Image, ImageDraw

  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  colours = rng.integers(40, 256, (classes, 3))
  for c in range(classes):
    folder = root / f"class_{c:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(per_class):
      w, h = (int(v) for v in rng.integers(20, 41, 2))
      pixels = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
      im = Image.fromarray(pixels)
      draw = ImageDraw.Draw(im)
      box = (w * 0.2 + rng.uniform(-2, 2), h * 0.2 + rng.uniform(-2, 2), w * 0.8, h * 0.8)
      shape = [draw.rectangle, draw.ellipse][c % 2]
      shape(box, fill=tuple(int(v) for v in colours[c]))
      if c % 3 == 2:
        draw.line((0, 0, w, h), fill=(255, 255, 255), width=2)
      im.save(folder / f"img_{j:03d}.png")
