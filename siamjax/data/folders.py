"""User data as arrays: a folder of class-named image folders, or a CSV of vector pairs.

* :func:`load_image_folder`: ``root/<class>/<image>`` files of any size and Pillow mode,
  resized to one shape, as ``uint8`` arrays with integer labels; the folder layout is
  checked (split folders, nested folders and loose images are refused, naming the folder).
* :func:`load_vector_pairs_csv`: each row a left vector, a right vector and a 0/1
  label (the 200 + 200 + 1 column layout by default); a bad row raises
  :class:`CSVDataError` (a ``ValueError``) naming its file, line and column.
* :func:`write_synthetic_vector_pairs_csv`: a CSV with known separability, for tests,
  smoke runs and demos.
"""

from __future__ import annotations

import csv
import os
import pathlib

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "CSVDataError", "ImageFolderError", "SPLIT_NAMES",
           "load_image_folder", "open_image", "image_array", "load_vector_pairs_csv",
           "write_synthetic_vector_pairs_csv", "write_synthetic_image_folder"]

#: The file suffixes read as images (any case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# ---------------------------------------------------------------------------------
# Vector pairs in a CSV
# ---------------------------------------------------------------------------------


def _is_header(row: list[str]) -> bool:
  """A header is a row of names: every cell non-empty and none of them a number.

  A row with a missing or non-numeric cell among numbers is a bad data row, never a
  header, so detection cannot drop a data row.

  >>> _is_header(["l0", "l1", "label"]), _is_header(["1.5", "abc", "1"]), _is_header(["", "x"])
  (True, False, False)
  """
  return bool(row) and all(c.strip() and not _is_float(c) for c in row)


def _header_flag(header) -> bool | None:
  if header is None or isinstance(header, (bool, np.bool_)):
    return None if header is None else bool(header)
  raise ValueError(f"header must be True, False or None (detect), got {header!r}")


class CSVDataError(ValueError):
  """A vector-pair CSV that cannot be read as pairs: names the file, line and column."""


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
    header: whether the first row is a header; ``None`` decides once for the file: the
      first row is a header when it is a row of names (every cell non-empty and not a
      number). A first row with a missing or non-numeric cell among numbers is a bad
      data row and raises, so no data row is ever dropped.
    delimiter: the field separator.

  Returns:
    ``(left [P, L] float32, right [P, R] float32, similar [P] int32)``.

  Raises:
    CSVDataError: a ``ValueError`` naming the file, line and column of a row with the
      wrong number of columns, a missing, non-numeric or non-finite cell, or a label other
      than 0 or 1; a file with no data rows, or whose rows all carry one label (a Siamese
      model needs same and different pairs).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise CSVDataError(f"path: {path} "
                       f"{'is a folder, not a CSV file' if path.is_dir() else 'does not exist'}")
  if left_columns < 1 or (right_columns is not None and right_columns < 1):
    raise ValueError(f"left_columns and right_columns must be >= 1, got {left_columns}, "
                     f"{right_columns}")
  header = _header_flag(header)
  try:
    with open(path, newline="") as f:
      rows = list(csv.reader(f, delimiter=delimiter))
  except (UnicodeDecodeError, csv.Error) as e:
    raise CSVDataError(f"{path} is not a readable text CSV ({e})") from None
  detected = header is None
  first = 1 if rows and (header if header is not None else _is_header(rows[0])) else 0
  # With detection, an error on line 1 may be a header that holds a number: say how to skip it.
  hint = " (if line 1 is a header, pass --header / header=True)" if detected and not first else ""
  body = [(line, row) for line, row in enumerate(rows[first:], start=first + 1) if row]
  if not body:
    raise CSVDataError(f"path: {path} has no data rows")
  width = len(body[0][1])
  if right_columns is None:
    right_columns = width - 1 - left_columns
    if right_columns < 1:
      raise CSVDataError(f"{path}: line {body[0][0]} has {width} columns, too few for "
                         f"left_columns={left_columns} + a right vector + a label")
  expected = left_columns + right_columns + 1
  if not -expected <= label_column < expected:
    raise ValueError(f"label_column must be in [{-expected}, {expected}), got {label_column}")
  label_at = label_column % expected
  values = np.empty((len(body), expected), np.float64)
  for k, (line, row) in enumerate(body):
    if len(row) != expected:
      raise CSVDataError(f"{path}: line {line} has {len(row)} columns, expected {expected} "
                         f"({left_columns} left + {right_columns} right + 1 label)"
                         + (hint if line == 1 else ""))
    try:
      values[k] = [float(cell) for cell in row]
    except ValueError:
      bad = next(j for j, cell in enumerate(row) if not _is_float(cell))
      what = "is empty" if not row[bad].strip() else f"is not a number: {row[bad]!r}"
      raise CSVDataError(f"{path}: line {line}, column {bad + 1} {what}"
                         + (hint if line == 1 else "")) from None
  if not np.all(np.isfinite(values)):
    k, j = np.argwhere(~np.isfinite(values))[0]
    raise CSVDataError(f"{path}: line {body[k][0]}, column {j + 1} is not finite: "
                       f"{body[k][1][j]!r}")
  labels = values[:, label_at]
  bad_label = np.flatnonzero((labels != 0) & (labels != 1))
  if bad_label.size:
    k = int(bad_label[0])
    raise CSVDataError(f"{path}: line {body[k][0]} has label {body[k][1][label_at]!r} in "
                       f"column {label_at + 1}; labels must be 0 or 1 (1 = same class)"
                       + (hint if body[k][0] == 1 else ""))
  if np.all(labels == labels[0]):
    raise CSVDataError(
        f"{path}: all {labels.size} rows have label {int(labels[0])} (column {label_at + 1}); "
        f"pairs need both labels, 1 (same class) and 0 (different): add pairs of the other "
        f"label, or check --label-column")
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


#: Folder names taken for train / validation / test splits rather than classes.
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "dev", "test", "testing")


class ImageFolderError(ValueError):
  """An image folder whose layout or files cannot be read as classes: names the folder."""


def _visible(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_image(p: pathlib.Path) -> bool:
  return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _holds_images(folder: pathlib.Path) -> bool:
  return any(_is_image(p) for p in folder.rglob("*")
             if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _to_uint8(im, grayscale: bool, path) -> np.ndarray:
  """One decoded Pillow image as ``[H, W]`` (grey) or ``[H, W, 3]`` uint8, any mode.

  ``1``, ``L``, ``P`` (with or without transparency), ``LA``, ``RGB``, ``RGBA``, ``CMYK``,
  ``YCbCr`` ...: Pillow's conversion (alpha dropped). 16-bit (``I;16*``) and ``I`` images
  holding 16-bit values are scaled by 255/65535 (Pillow would clip them to 255).
  """
  from PIL import Image, ImageOps

  im = ImageOps.exif_transpose(im)  # camera JPEGs: the orientation a viewer shows
  target = "L" if grayscale else "RGB"
  if im.mode.startswith("I;16") or im.mode == "I":
    a = np.asarray(im).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
      raise ImageFolderError(
          f"{path}: mode {im.mode} image holds values in [{a.min()}, {a.max()}], outside "
          f"the 16-bit range [0, 65535]; save it as an 8- or 16-bit image")
    im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))
  elif im.mode == "F":
    raise ImageFolderError(f"{path}: mode F (32-bit float) images have no fixed range; save "
                           f"it as an 8- or 16-bit image")
  elif im.mode == "P" and "transparency" in im.info:
    im = im.convert("RGBA")  # Pillow asks for this before dropping the palette's alpha
  try:
    return np.asarray(im.convert(target), np.uint8)
  except ValueError as e:  # a mode Pillow cannot convert
    raise ImageFolderError(f"{path}: cannot convert mode {im.mode} to {target} ({e})") from None


def load_image_folder(
    root: str | os.PathLike,
    *,
    size: tuple[int, int] = (64, 64),
    grayscale: bool = False,
    min_per_class: int = 2,
    flatten_subfolders: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
  """Loads ``root/<class name>/<image file>`` images, resized to ``size``.

  The layout is checked, never guessed: ``root`` holds one folder per class (hidden
  folders and non-image files are skipped), each class folder holds its images.

  * A ``root`` whose folders are splits (``train/``, ``val/``, ``test/``, see
    :data:`SPLIT_NAMES`) each holding class folders is refused, naming the split folder
    to pass instead.
  * A class folder with subfolders of images is refused unless ``flatten_subfolders``,
    which reads every image below a class folder as that class.
  * Image files directly in ``root`` (outside any class folder) are refused.

  Every Pillow mode becomes 8-bit: ``1``, ``L``, ``P``, ``RGB``, ``RGBA``, ``CMYK`` ...
  through Pillow's conversion (alpha dropped), 16-bit (``I;16``, and ``I`` holding values
  in [0, 65535]) scaled by 255/65535, not clipped; float (``F``) images are refused.

  Args:
    root: folder of class-named subfolders; files with an image suffix
      (:data:`IMAGE_SUFFIXES`) are read, others ignored; classes are sorted by name.
    size: ``(height, width)`` after resizing (bilinear, Pillow).
    grayscale: one channel instead of RGB.
    min_per_class: classes with fewer images are an error (pairs need two).
    flatten_subfolders: read images in subfolders of a class folder as that class.

  Returns:
    ``(images [N, H, W, C] uint8, labels [N] int32, class_names [C], paths [N])``.

  Raises:
    ImageFolderError: a ``ValueError`` naming the folder or file and what to pass.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise ImageFolderError(f"root: {root} is not a folder")
  entries = _visible(root)
  class_dirs = [d for d in entries if d.is_dir()]
  splits = [d for d in class_dirs if d.name.lower() in SPLIT_NAMES
            and any(c.is_dir() and _holds_images(c) for c in _visible(d))]
  if splits:
    names = ", ".join(f"{d.name}/" for d in splits)
    first = next((d for d in splits if d.name.lower() in ("train", "training")), splits[0])
    raise ImageFolderError(
        f"root: {root} holds split folders ({names}) of class folders, not class folders; "
        f"pass one split, e.g. --data-dir {first} (the recipe holds out its own test images)")
  loose = [p for p in entries if _is_image(p)]
  if loose:
    raise ImageFolderError(
        f"root: {root} holds {len(loose)} image file(s) outside any class folder (e.g. "
        f"{loose[0].name}); put each class's images in a folder root/<class>/ of its own")
  if len(class_dirs) < 2:
    raise ImageFolderError(f"root: {root} needs at least two class subfolders "
                           f"(root/<class>/<image>), found {[d.name for d in class_dirs]}")
  h, w = size
  images, labels, paths = [], [], []
  for c, d in enumerate(class_dirs):
    nested = [s for s in _visible(d) if s.is_dir() and _holds_images(s)]
    if nested and not flatten_subfolders:
      subs = ", ".join(f"{s.name}/" for s in nested[:3]) + (", ..." if len(nested) > 3 else "")
      raise ImageFolderError(
          f"root: class folder {d} holds subfolders of images ({subs}); one level of class "
          f"folders is read: pass --flatten-subfolders (flatten_subfolders=True) to read "
          f"them as class {d.name!r}, or pass the folder whose subfolders are the classes")
    if flatten_subfolders:
      files = sorted(p for p in d.rglob("*") if _is_image(p)
                     and not any(q.startswith(".") for q in p.relative_to(d).parts))
    else:
      files = [p for p in _visible(d) if _is_image(p)]
    if len(files) < min_per_class:
      raise ImageFolderError(f"root: class folder {d} has {len(files)} image(s), needs at "
                             f"least {min_per_class}")
    for p in files:
      images.append(image_array(open_image(p, what="root: cannot read image"), size=(h, w),
                                grayscale=grayscale, where=p))
      labels.append(c)
      paths.append(str(p))
  return (np.stack(images), np.asarray(labels, np.int32), [d.name for d in class_dirs],
          paths)


def open_image(path: str | os.PathLike, *, what: str = "cannot read image"):
  """Opens and decodes one image file (a Pillow image, fully loaded).

  Raises:
    ImageFolderError: a ``ValueError`` the file is missing or does not decode, naming it.
  """
  from PIL import Image
  try:
    with Image.open(path) as im:
      im.load()
      return im
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageFolderError(f"{what} {path} ({e}); delete or replace it") from None


def image_array(im, *, size: tuple[int, int], grayscale: bool, where="image") -> np.ndarray:
  """One Pillow image as :func:`load_image_folder` reads it: 8-bit grey or RGB, resized.

  Args:
    im: a decoded Pillow image of any mode (see :func:`load_image_folder`).
    size: ``(height, width)`` after resizing (bilinear, Pillow).
    grayscale: one channel instead of RGB.
    where: the file or item named in errors.

  Returns:
    ``[H, W, 1]`` (grey) or ``[H, W, 3]`` uint8.
  """
  from PIL import Image
  h, w = size
  x = np.asarray(Image.fromarray(_to_uint8(im, grayscale, where)).resize((w, h), Image.BILINEAR),
                 np.uint8)
  return x[..., None] if grayscale else x


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
