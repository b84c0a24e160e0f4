"""Omniglot (Lake et al. 2015) as uint8 arrays, and Lake's 20 one-shot runs.

Arrays use one convention whatever the source: ``uint8`` with ink ``255`` and background
``0`` (the PNGs store ink as ``False`` in 1-bit mode; PIL decodes them to {0, 1} and
TensorFlow to {0, 255}, so both are normalised explicitly).

* :func:`load_omniglot` returns an :class:`OmniglotSplit`: ``images [chars, 20, 105,
  105]`` (drawers 01..20 in order), ``alphabet_ids [chars]`` and the names.
* :func:`load_lake_runs` returns :class:`LakeRuns`: Lake's 20 within-alphabet 20-way
  runs from ``all_runs.zip``.

Sources: Lake's zip files in ``<data_dir>/omniglot/`` (``data_dir`` from the argument,
else the ``SIAMJAX_DATA_DIR`` environment variable), downloaded from Lake's repository
with SHA-256 verification when ``download=True`` and missing, or tensorflow-datasets
(``source="tfds"``). Local zips are checked by structure and counts, never by checksum
(rebuilt zips hold the same images with different zip metadata). Decoded arrays are
cached as ``.npz`` under ``cache_dir`` (default ``~/.cache/siamjax``), keyed by the zip's
size and modification time, so a second load takes well under a second.
:func:`prepare_arrays` writes the same bit-packed arrays into a data folder
(``<data_dir>/omniglot/<zip stem>.npz``); a data folder holding them is read without
the zips and without Pillow (a machine that only runs the experiment needs neither).

References:
  B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum, "Human-level concept learning through
  probabilistic program induction", Science 350(6266), 2015.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from siamjax import _cache

__all__ = [
    "OmniglotSplit", "LakeRuns", "OmniglotDataError", "load_omniglot", "load_lake_runs",
    "resolve_data_dir", "prepare_arrays", "URLS", "SHA256", "SPLIT_FILES", "IMAGE_SIZE",
    "DRAWERS", "ink_mask", "lake_alphabets",
]

IMAGE_SIZE = 105
DRAWERS = 20
SPLIT_FILES = {
    "background": "images_background.zip",
    "evaluation": "images_evaluation.zip",
    "background_small1": "images_background_small1.zip",
    "background_small2": "images_background_small2.zip",
}
# Expected (alphabets, characters) per split, checked on every decode.
_COUNTS = {"background": (30, 964), "evaluation": (20, 659),
           "background_small1": (5, 136), "background_small2": (5, 156)}
_BASE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
URLS = {
    "images_background.zip": _BASE + "images_background.zip",
    "images_evaluation.zip": _BASE + "images_evaluation.zip",
    "images_background_small1.zip": _BASE + "images_background_small1.zip",
    "images_background_small2.zip": _BASE + "images_background_small2.zip",
    "all_runs.zip": _BASE + "one-shot-classification/all_runs.zip",
}
# SHA-256 of Lake's original files (tensorflow/datasets url_checksums; all_runs from
# brendenlake/omniglot @057f034b). Checked for downloads only.
SHA256 = {
    "images_background.zip": "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
    "images_evaluation.zip": "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
    "images_background_small1.zip":
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    "images_background_small2.zip":
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
    "all_runs.zip": "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325",
}
_CACHE_VERSION = 1
_PNG = re.compile(r"(?:^|/)([^/]+)/(character\d+)/(\d{4})_(\d{2})\.png$")


class OmniglotDataError(ValueError):
  """A data file is missing, corrupt or has an unexpected layout."""


class OmniglotSplit(NamedTuple):
  """One Omniglot split.

  Attributes:
    images: ``[chars, 20, 105, 105]`` uint8, ink 255, background 0; axis 1 is the drawer
      (01..20 in order).
    alphabet_ids: ``[chars]`` int32 index into ``alphabets``.
    alphabets: alphabet names, sorted.
    characters: ``"<Alphabet>/characterNN"`` for each character.
  """

  images: np.ndarray
  alphabet_ids: np.ndarray
  alphabets: tuple[str, ...]
  characters: tuple[str, ...]


class LakeRuns(NamedTuple):
  """Lake's 20 runs of 20-way within-alphabet one-shot classification (400 trials).

  Attributes:
    support: ``[20 runs, 20 classes, 105, 105]`` uint8 training images (``classNN``).
    query: ``[20 runs, 20 items, 105, 105]`` uint8 test images (``itemNN``).
    answers: ``[20 runs, 20 items]`` int32: the index of each item's class in ``support``.
  """

  support: np.ndarray
  query: np.ndarray
  answers: np.ndarray


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
  """Returns ``data_dir``, else ``$SIAMJAX_DATA_DIR``, else ``None``."""
  if data_dir is None:
    data_dir = os.environ.get("SIAMJAX_DATA_DIR") or None
  return None if data_dir is None else Path(data_dir).expanduser()


def _cache_dir(cache_dir) -> Path:
  if cache_dir is None:
    cache_dir = _cache.cache_dir()
  return Path(cache_dir).expanduser()


def _how_to_get(name: str) -> str:
  return (f"get it from {URLS[name]} into <data_dir>/omniglot/ (data_dir: the --data-dir "
          f"flag or SIAMJAX_DATA_DIR), or pass download=True (--download) to fetch it with "
          f"SHA-256 verification")


def _fetch(url: str, dest: Path) -> None:
  """Downloads ``url`` to ``dest`` (replaced in tests)."""
  with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
    while chunk := r.read(1 << 20):
      f.write(chunk)


def _place_it(name: str, folder: Path, data_dir_given: bool) -> str:
  """How to provide ``name`` by hand: where to put it, and the flag or variable to set."""
  if data_dir_given:
    return (f"download {URLS[name]} on a machine that is online and place it at "
            f"{folder / name} (the omniglot/ folder of your --data-dir / SIAMJAX_DATA_DIR)")
  return (f"download {URLS[name]} on a machine that is online, place it at "
          f"DIR/omniglot/{name} and pass --data-dir DIR (or export SIAMJAX_DATA_DIR=DIR); "
          f"or place it at {folder / name}")


def _download(name: str, folder: Path, data_dir_given: bool = False) -> Path:
  folder.mkdir(parents=True, exist_ok=True)  # omniglot/ in an existing data dir, or the cache
  dest = folder / name
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=name + ".", suffix=".part")
  os.close(fd)
  tmp = Path(tmp)
  try:
    try:
      _fetch(URLS[name], tmp)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
      raise OmniglotDataError(
          f"could not download {name} ({e}); offline? "
          f"{_place_it(name, folder, data_dir_given)}") from None
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    if digest != SHA256[name]:
      raise OmniglotDataError(
          f"downloaded {name} has SHA-256 {digest}, expected {SHA256[name]}: the download is "
          f"corrupt or the file changed upstream; delete it and retry")
    tmp.replace(dest)
  finally:
    tmp.unlink(missing_ok=True)
  return dest


def _locate(name: str, data_dir, download: bool, cache_dir) -> Path:
  root = resolve_data_dir(data_dir)
  if root is not None and not root.is_dir():  # reported, never created
    source = "--data-dir / data_dir" if data_dir is not None else "SIAMJAX_DATA_DIR"
    raise OmniglotDataError(
        f"data_dir: {root} (from {source}) is not a folder; pass --data-dir DIR or set "
        f"SIAMJAX_DATA_DIR to an existing folder holding omniglot/{name} (it is never "
        f"created; unset both to download into the cache)")
  if root is not None:
    for path in (root / "omniglot" / name, root / name):
      if path.is_file():
        return path
  if download:
    folder = root / "omniglot" if root is not None else _cache_dir(cache_dir) / "downloads"
    path = folder / name
    return path if path.is_file() else _download(name, folder, root is not None)
  where = (f"{root / 'omniglot' / name}" if root is not None else
           "no data directory (pass --data-dir or set SIAMJAX_DATA_DIR)")
  raise OmniglotDataError(f"Omniglot file {name} not found: {where}; {_how_to_get(name)}")


def _open_zip(path: Path) -> zipfile.ZipFile:
  try:
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise OmniglotDataError(
        f"{path} is not a readable zip file ({e}); delete it and {_how_to_get(path.name)}"
    ) from None


def ink_mask(im) -> np.ndarray:
  """A decoded drawing (a Pillow image) as a bool ink mask, as the dataset's PNGs are read.

  Mode ``"1"`` (Omniglot's own): ``True`` is background. Other modes: dark pixels
  (grey < 128) are ink.
  """
  return ~np.asarray(im, bool) if im.mode == "1" else np.asarray(im.convert("L")) < 128


def _decode_png(zf: zipfile.ZipFile, member: str, path: Path) -> np.ndarray:
  """Decodes one PNG to a ``[105, 105]`` bool ink mask."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(io.BytesIO(zf.read(member))) as im:
      im.load()
      ink = ink_mask(im)
  except (zipfile.BadZipFile, UnidentifiedImageError, OSError, EOFError, ValueError) as e:
    raise OmniglotDataError(
        f"{path}: member {member} is corrupt ({e}); delete {path.name} and "
        f"{_how_to_get(path.name)}") from None
  if ink.shape != (IMAGE_SIZE, IMAGE_SIZE):
    raise OmniglotDataError(f"{path}: member {member} has shape {ink.shape}, expected "
                            f"({IMAGE_SIZE}, {IMAGE_SIZE})")
  return ink


def _decode_split(path: Path, split: str) -> OmniglotSplit:
  with _open_zip(path) as zf:
    entries = {}
    for member in zf.namelist():
      m = _PNG.search(member)
      if m:
        alphabet, char, _, drawer = m.groups()
        entries.setdefault((alphabet, char), {})[int(drawer)] = member
    if not entries:
      raise OmniglotDataError(f"{path} holds no <Alphabet>/characterNN/NNNN_DD.png images; "
                              f"is it an Omniglot images_*.zip? {_how_to_get(path.name)}")
    keys = sorted(entries)
    alphabets = tuple(sorted({a for a, _ in keys}))
    expected = _COUNTS.get(split)
    if expected is not None and expected != (len(alphabets), len(keys)):
      raise OmniglotDataError(
          f"{path}: found {len(alphabets)} alphabets and {len(keys)} characters, expected "
          f"{expected[0]} and {expected[1]}; the file is incomplete, {_how_to_get(path.name)}")
    ink = np.zeros((len(keys), DRAWERS, IMAGE_SIZE, IMAGE_SIZE), bool)
    for i, key in enumerate(keys):
      drawers = entries[key]
      if sorted(drawers) != list(range(1, DRAWERS + 1)):
        raise OmniglotDataError(f"{path}: {key[0]}/{key[1]} has drawers {sorted(drawers)}, "
                                f"expected 1..{DRAWERS}")
      for d in range(DRAWERS):
        ink[i, d] = _decode_png(zf, drawers[d + 1], path)
  alphabet_ids = np.array([alphabets.index(a) for a, _ in keys], np.int32)
  return OmniglotSplit(ink.astype(np.uint8) * np.uint8(255), alphabet_ids, alphabets,
                       tuple(f"{a}/{c}" for a, c in keys))


def _decode_runs(path: Path) -> LakeRuns:
  support = np.zeros((20, 20, IMAGE_SIZE, IMAGE_SIZE), bool)
  query = np.zeros_like(support)
  answers = np.zeros((20, 20), np.int32)
  with _open_zip(path) as zf:
    names = set(zf.namelist())
    for r in range(20):
      run = f"run{r + 1:02d}"
      labels = f"{run}/class_labels.txt"
      if labels not in names:
        raise OmniglotDataError(f"{path}: {labels} is missing; is it Lake's all_runs.zip? "
                                f"{_how_to_get('all_runs.zip')}")
      lines = zf.read(labels).decode().split()
      pairs = dict(zip(lines[0::2], lines[1::2]))
      for c in range(20):
        support[r, c] = _decode_png(zf, f"{run}/training/class{c + 1:02d}.png", path)
      for q in range(20):
        item = f"{run}/test/item{q + 1:02d}.png"
        target = pairs.get(item)
        m = re.fullmatch(rf"{run}/training/class(\d\d)\.png", target or "")
        if m is None:
          raise OmniglotDataError(f"{path}: {labels} has no valid answer for {item}")
        answers[r, q] = int(m.group(1)) - 1
        query[r, q] = _decode_png(zf, item, path)
  return LakeRuns(support.astype(np.uint8) * np.uint8(255),
                  query.astype(np.uint8) * np.uint8(255), answers)


def _cache_path(path: Path, cache_dir) -> Path:
  st = path.stat()
  return _cache_dir(cache_dir) / (
      f"{path.stem}-v{_CACHE_VERSION}-{st.st_size}-{st.st_mtime_ns}.npz")


def _read_packed(path: Path, names) -> dict:
  """The fields ``names`` of a bit-packed ``.npz`` (:func:`_write_packed`'s format)."""
  with np.load(path) as z:
    fields = {}
    for n in names:
      v = z[n]
      if n + "__shape" in z:
        v = np.unpackbits(v, count=int(np.prod(z[n + "__shape"])))
        v = v.reshape(z[n + "__shape"]) * np.uint8(255)
      elif v.dtype.kind == "U":
        v = tuple(v.tolist())
      fields[n] = v
  return fields


def _write_packed(path: Path, value: dict, names, *, compress: bool = False) -> None:
  """Writes ``value``'s fields to ``path`` atomically: uint8 images as one bit each."""
  arrays = {}
  for n in names:
    v = value[n]
    if isinstance(v, tuple):
      arrays[n] = np.array(v, dtype=str)
    elif v.dtype == np.uint8:
      arrays[n] = np.packbits(v > 0)
      arrays[n + "__shape"] = np.array(v.shape)
    else:
      arrays[n] = v
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.part")
  try:
    with os.fdopen(fd, "wb") as f:
      (np.savez_compressed if compress else np.savez)(f, **arrays)
    os.replace(tmp, path)
  finally:
    Path(tmp).unlink(missing_ok=True)


def _cached(path: Path, cache_dir, decode, names):
  """Decodes ``path`` with ``decode`` once, then reads the bit-packed ``.npz`` cache."""
  cache = _cache_path(path, cache_dir)
  if cache.is_file():
    try:
      return _read_packed(cache, names)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
      pass  # A broken cache is rebuilt below.
  value = decode(path)._asdict()
  try:
    _write_packed(cache, value, names)
  except OSError:
    pass  # A read-only cache directory only costs speed.
  return value


def _prepared(name: str, data_dir, names) -> dict | None:
  """The fields of ``<data_dir>/omniglot/<stem>.npz`` (:func:`prepare_arrays`), if present."""
  root = resolve_data_dir(data_dir)
  path = None if root is None else root / "omniglot" / (Path(name).stem + ".npz")
  if path is None or not path.is_file():
    return None
  try:
    return _read_packed(path, names)
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise OmniglotDataError(f"{path} is not readable prepared Omniglot arrays ({e}); delete "
                            f"it and run prepare_arrays again") from None


def _check_split(f: dict, split: str, where) -> None:
  expected = _COUNTS.get(split)
  shape = tuple(f["images"].shape)
  if shape[1:] != (DRAWERS, IMAGE_SIZE, IMAGE_SIZE) or (
      expected is not None and expected != (len(f["alphabets"]), shape[0])):
    raise OmniglotDataError(f"{where}: images {shape} over {len(f['alphabets'])} alphabets, "
                            f"expected {expected} (alphabets, characters) of "
                            f"[{DRAWERS}, {IMAGE_SIZE}, {IMAGE_SIZE}]; delete it and prepare "
                            f"it again")


def prepare_arrays(dest, *, data_dir=None, cache_dir=None, download: bool = False,
                   splits=("background", "evaluation")) -> list[Path]:
  """Writes Omniglot as prepared arrays that load without decoding a PNG (no Pillow).

  Each split and Lake's runs become ``<dest>/omniglot/<zip stem>.npz`` (one bit per pixel,
  compressed: 5.5 MB for the three files the Omniglot recipe reads, against 46 MB
  unpacked);
  :func:`load_omniglot` and :func:`load_lake_runs` read them from a ``data_dir`` that holds
  them, before any zip.

  Args:
    dest: the data folder to fill.
    data_dir, cache_dir, download: where the zips are, as in :func:`load_omniglot`.
    splits: the splits to write, besides Lake's runs.

  Returns:
    The files written.
  """
  out = Path(dest).expanduser() / "omniglot"
  load = dict(data_dir=data_dir, cache_dir=cache_dir, download=download)
  written = []
  for split in splits:
    path = out / (Path(SPLIT_FILES[split]).stem + ".npz")
    _write_packed(path, load_omniglot(split, **load)._asdict(), OmniglotSplit._fields,
                  compress=True)
    written.append(path)
  path = out / "all_runs.npz"
  _write_packed(path, load_lake_runs(**load)._asdict(), LakeRuns._fields, compress=True)
  return written + [path]


def load_omniglot(split: str = "background", *, data_dir=None, cache_dir=None,
                  source: str = "zip", download: bool = False) -> OmniglotSplit:
  """Loads an Omniglot split as uint8 arrays (ink 255).

  Args:
    split: ``"background"`` (30 alphabets, 964 characters), ``"evaluation"`` (20, 659),
      ``"background_small1"`` or ``"background_small2"``.
    data_dir: folder holding ``omniglot/<zip>`` (default: ``$SIAMJAX_DATA_DIR``).
    cache_dir: where decoded arrays are cached (default ``$SIAMJAX_CACHE_DIR`` or
      ``~/.cache/siamjax``).
    source: ``"zip"`` (Lake's zip files) or ``"tfds"`` (tensorflow-datasets' ``omniglot``,
      which must be prepared; its drawer order is not recorded, so drawers are sorted by
      image content there).
    download: fetch a missing zip from Lake's repository, checking its SHA-256.

  Returns:
    An :class:`OmniglotSplit` with ``images [chars, 20, 105, 105]`` uint8.

  Raises:
    OmniglotDataError: a ``ValueError`` for missing, corrupt or malformed files, with
      the file's name and how to get it.
  """
  if split not in SPLIT_FILES:
    raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
  if source == "tfds":
    return _load_tfds(split)
  if source != "zip":
    raise ValueError(f"source must be 'zip' or 'tfds', got {source!r}")
  f = _prepared(SPLIT_FILES[split], data_dir, OmniglotSplit._fields)
  if f is not None:
    _check_split(f, split, resolve_data_dir(data_dir) / "omniglot")
  else:
    path = _locate(SPLIT_FILES[split], data_dir, download, cache_dir)
    f = _cached(path, cache_dir, lambda p: _decode_split(p, split), OmniglotSplit._fields)
  return OmniglotSplit(f["images"], np.asarray(f["alphabet_ids"], np.int32),
                       tuple(f["alphabets"]), tuple(f["characters"]))


def lake_alphabets(evaluation: OmniglotSplit, runs: LakeRuns) -> set[int]:
  """Alphabet ids of the evaluation split that Lake's runs draw from (found by matching
  the runs' images to the split's, pixel for pixel): the other evaluation alphabets are
  free for validation."""
  by_image = {np.packbits(img > 0).tobytes(): a for imgs, a in
              zip(evaluation.images, evaluation.alphabet_ids) for img in imgs}
  found = {by_image.get(np.packbits(img > 0).tobytes()) for img in runs.support.reshape(
      (-1,) + runs.support.shape[2:])}
  return {int(a) for a in found if a is not None}


def load_lake_runs(*, data_dir=None, cache_dir=None, download: bool = False) -> LakeRuns:
  """Loads Lake's 20 one-shot runs (``all_runs.zip``): 400 within-alphabet 20-way trials.

  Args:
    data_dir, cache_dir, download: as in :func:`load_omniglot`.

  Returns:
    :class:`LakeRuns` with ``support``/``query`` ``[20, 20, 105, 105]`` uint8 (ink 255)
    and ``answers [20, 20]``.
  """
  f = _prepared("all_runs.zip", data_dir, LakeRuns._fields)
  if f is None:
    path = _locate("all_runs.zip", data_dir, download, cache_dir)
    f = _cached(path, cache_dir, _decode_runs, LakeRuns._fields)
  elif f["support"].shape != (20, 20, IMAGE_SIZE, IMAGE_SIZE) or f["query"].shape != \
      f["support"].shape or f["answers"].shape != (20, 20):
    raise OmniglotDataError(f"{resolve_data_dir(data_dir)}/omniglot/all_runs.npz: shapes "
                            f"{f['support'].shape}, {f['query'].shape}, {f['answers'].shape}, "
                            f"expected [20, 20, {IMAGE_SIZE}, {IMAGE_SIZE}] twice and [20, 20]; "
                            f"delete it and prepare it again")
  return LakeRuns(f["support"], f["query"], np.asarray(f["answers"], np.int32))


_TFDS_SPLITS = {"background": "train", "evaluation": "test",
                "background_small1": "small1", "background_small2": "small2"}


def _tfds_examples(split: str):
  """Yields tensorflow-datasets' Omniglot examples as NumPy dicts (replaced in tests)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:  # tfds needs TensorFlow to decode.
    raise OmniglotDataError(f"source='tfds' needs tensorflow-datasets and tensorflow ({e}); "
                            f"use source='zip' instead") from None
  try:
    ds = tfds.load("omniglot", split=_TFDS_SPLITS[split], download=False)
  except Exception as e:  # noqa: BLE001 - tfds raises many types; name the fix instead.
    raise OmniglotDataError(f"tensorflow-datasets' omniglot is not prepared ({e}); run "
                            f"tfds.builder('omniglot').download_and_prepare() first") from None
  return tfds.as_numpy(ds)


def _load_tfds(split: str) -> OmniglotSplit:
  by_label, alphabet_of = {}, {}
  for ex in _tfds_examples(split):
    image = np.asarray(ex["image"])
    gray = image[..., 0] if image.ndim == 3 else image
    # TensorFlow decodes the 1-bit PNGs to {0, 255} (PIL to {0, 1}): normalise explicitly.
    ink = gray < (128 if gray.max() > 1 else 1)
    label = int(ex["label"])
    by_label.setdefault(label, []).append(ink)
    alphabet_of[label] = int(ex["alphabet"])
  labels = sorted(by_label)
  images = np.zeros((len(labels), DRAWERS, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  for i, label in enumerate(labels):
    inks = by_label[label]
    if len(inks) != DRAWERS:
      raise OmniglotDataError(f"tfds omniglot/{split}: label {label} has {len(inks)} images, "
                              f"expected {DRAWERS}")
    inks.sort(key=lambda a: np.packbits(a).tobytes())  # tfds records no drawer id.
    images[i] = np.stack(inks).astype(np.uint8) * np.uint8(255)
  alph = sorted({alphabet_of[l] for l in labels})
  alphabet_ids = np.array([alph.index(alphabet_of[l]) for l in labels], np.int32)
  return OmniglotSplit(images, alphabet_ids, tuple(f"alphabet{a}" for a in alph),
                       tuple(f"label{l}" for l in labels))
