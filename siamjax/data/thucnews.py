"""THUCNews news titles (Chinese, 14 classes): loading, few-shot draws, tokenising.

The 14-class pool is the union of the four csv files in
``<data_dir>/thucnews_titles/thucnews14_titles/``, deduplicated on ``(title, label)``,
with the titles that carry two different labels dropped (152,666 titles). Everything is
host-side NumPy; the arrays it returns go to the device once.

Tokens: a title becomes its characters followed by its character bigrams. Both
vocabularies are built from the text they are given (callers pass non-test text only);
an n-gram outside the vocabulary is dropped, so unseen test text can never leak in.
Id 0 is padding.

References:
  M. Sun et al., "THUCTC: An Efficient Chinese Text Classifier", 2016.
"""

from __future__ import annotations

import collections
import csv
import os
from typing import NamedTuple, Sequence

import numpy as np

from siamjax import _checks

__all__ = [
    "CLASS_NAMES",
    "CLASS_NAMES_EN",
    "FewShotSplit",
    "Vocab",
    "build_vocab",
    "data_dir_from_env",
    "draw_split",
    "encode",
    "load_thucnews14",
    "ngrams",
    "synthetic_titles",
]

#: The 14 class names, in label order.
CLASS_NAMES = ("财经", "彩票", "房产", "股票", "家居", "教育", "科技", "社会", "时尚", "时政",
               "体育", "星座", "游戏", "娱乐")

CLASS_NAMES_EN = ("finance", "lottery", "real estate", "stocks", "home", "education",
                  "technology", "society", "fashion", "politics", "sports", "horoscope",
                  "games", "entertainment")

_FILES = ("client1_nonEQ.csv", "client2_nonEQ.csv", "client3_nonIID.csv",
          "thucnews_test_data.csv")


def data_dir_from_env(data_dir: str | None = None) -> str:
  """Returns ``data_dir``, else ``$SIAMJAX_DATA_DIR``; raises ValueError if neither is set."""
  data_dir = data_dir or os.environ.get("SIAMJAX_DATA_DIR")
  if not data_dir:
    raise ValueError("data_dir is not given and SIAMJAX_DATA_DIR is unset")
  return data_dir


def load_thucnews14(data_dir: str | None = None) -> tuple[list[str], np.ndarray]:
  """Loads the deduplicated 14-class THUCNews title pool.

  Args:
    data_dir: folder holding ``thucnews_titles/thucnews14_titles/`` (e.g. the shared
      data folder); defaults to ``$SIAMJAX_DATA_DIR``.

  Returns:
    ``(titles, labels)``: a list of ``N`` distinct title strings (sorted, so the order
    does not depend on the files) and ``[N]`` int32 class ids in ``[0, 14)`` (names in
    :data:`CLASS_NAMES`).
  """
  folder = os.path.join(data_dir_from_env(data_dir), "thucnews_titles", "thucnews14_titles")
  if not os.path.isdir(folder):
    raise ValueError(f"data_dir has no thucnews_titles/thucnews14_titles folder: {folder}")
  pairs = set()
  for name in _FILES:
    with open(os.path.join(folder, name), encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      for row in reader:
        pairs.add((row["Title"], int(row["Label"])))
  per_title = collections.Counter(t for t, _ in pairs)
  kept = sorted((t, y) for t, y in pairs if per_title[t] == 1)
  titles = [t for t, _ in kept]
  labels = np.asarray([y for _, y in kept], np.int32)
  return titles, labels


class FewShotSplit(NamedTuple):
  """Indices into the pool for one few-shot draw (each ``[n]`` int64, disjoint).

  ``train``: the labelled shots; ``test``: held-out queries, whose text is used by
  nothing else; ``val``: labelled queries carved from the non-test pool for tuning;
  ``unlabelled``: the remaining non-test titles, usable as unlabelled text only.
  """
  train: np.ndarray
  val: np.ndarray
  test: np.ndarray
  unlabelled: np.ndarray


def draw_split(labels: np.ndarray, seed: int, *, shots: int = 50, max_test: int = 3000,
               val_per_class: int = 0) -> FewShotSplit:
  """Draws one few-shot split: per class ``shots`` train, up to ``max_test`` test titles.

  Per class, a seeded permutation gives the ``shots`` training titles, then up to
  ``max_test`` test titles (all that is left when fewer remain, as for 星座), then up
  to ``val_per_class`` validation titles; the rest is unlabelled text.

  Args:
    labels: ``[N]`` integer class ids.
    seed: seed of the draw (a NumPy Generator; host-side data preparation only).
    shots: labelled training titles per class.
    max_test: most test titles per class.
    val_per_class: most validation titles per class (carved after the test titles).

  Returns:
    A :class:`FewShotSplit`.

  >>> s = draw_split(np.array([0] * 10 + [1] * 4), 0, shots=2, max_test=5, val_per_class=2)
  >>> [len(s.train), len(s.test), len(s.val), len(s.unlabelled)]
  [4, 7, 2, 1]
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a [N] integer array, got {labels.dtype} {labels.shape}")
  shots = _checks.positive_int("shots", shots)
  max_test = _checks.positive_int("max_test", max_test)
  if val_per_class < 0:
    raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
  rng = np.random.default_rng(seed)
  parts = {"train": [], "val": [], "test": [], "unlabelled": []}
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    if len(idx) <= shots:
      raise ValueError(f"class {c} has {len(idx)} titles, need more than shots={shots}")
    n_test = min(max_test, len(idx) - shots)
    n_val = min(val_per_class, len(idx) - shots - n_test)
    cuts = np.cumsum([shots, n_test, n_val])
    parts["train"].append(idx[:cuts[0]])
    parts["test"].append(idx[cuts[0]:cuts[1]])
    parts["val"].append(idx[cuts[1]:cuts[2]])
    parts["unlabelled"].append(idx[cuts[2]:])
  return FewShotSplit(**{k: np.sort(np.concatenate(v)) for k, v in parts.items()})


def ngrams(title: str) -> list[str]:
  """A title's characters followed by its character bigrams.

  >>> ngrams("股市涨")
  ['股', '市', '涨', '股市', '市涨']
  """
  chars = list(title.strip())
  return chars + [a + b for a, b in zip(chars, chars[1:])]


class Vocab(NamedTuple):
  """N-gram -> id (ids from 1; 0 is padding)."""
  ids: dict

  @property
  def size(self) -> int:
    """Number of ids including padding."""
    return len(self.ids) + 1


def build_vocab(texts: Sequence[str], *, min_count: int = 2, chars_only: bool = False) -> Vocab:
  """Builds the character + bigram vocabulary from ``texts`` (pass non-test text only).

  Characters are always kept; bigrams are kept when they occur at least ``min_count``
  times. Ids are assigned by descending count, ties by the n-gram, so they are
  deterministic.

  Args:
    texts: the titles to count.
    min_count: least count for a bigram to get an id.
    chars_only: characters only (no bigrams).

  Returns:
    A :class:`Vocab`.

  >>> build_vocab(["ab", "ab", "c"]).ids
  {'a': 1, 'ab': 2, 'b': 3, 'c': 4}
  """
  if min_count < 1:
    raise ValueError(f"min_count must be >= 1, got {min_count}")
  counts = collections.Counter(g for t in texts for g in ngrams(t))
  kept = [(g, n) for g, n in counts.items()
          if len(g) == 1 or (n >= min_count and not chars_only)]
  kept.sort(key=lambda gn: (-gn[1], gn[0]))
  return Vocab({g: i + 1 for i, (g, _) in enumerate(kept)})


def encode(texts: Sequence[str], vocab: Vocab, *, max_len: int = 64,
           chars_only: bool = False) -> np.ndarray:
  """Encodes titles as ``[N, max_len]`` int32 n-gram ids, 0-padded (out-of-vocab dropped).

  Args:
    texts: ``N`` titles.
    vocab: from :func:`build_vocab`.
    max_len: tokens kept per title (characters first, then bigrams).
    chars_only: keep the characters only (the seed model's input).

  Returns:
    ``[N, max_len]`` int32 ids.

  >>> v = build_vocab(["ab", "ab"])
  >>> encode(["abz"], v, max_len=5).tolist()
  [[1, 3, 2, 0, 0]]
  """
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  out = np.zeros((len(texts), max_len), np.int32)
  get = vocab.ids.get
  for i, t in enumerate(texts):
    grams = list(t.strip()) if chars_only else ngrams(t)
    ids = [j for j in map(get, grams) if j is not None][:max_len]
    out[i, :len(ids)] = ids
  return out


def synthetic_titles(*, num_classes: int = 14, per_class: int = 80,
                     seed: int = 0) -> tuple[list[str], np.ndarray]:
  """A small generated stand-in for the title pool (tests and ``--smoke``).

  Each class has 12 topic characters; a title mixes 3 to 8 of them with 4 to 10 of 60
  common characters, so bag-of-n-gram models can learn the classes but not trivially.

  Returns:
    ``(titles, labels)`` like :func:`load_thucnews14`.

  >>> t, y = synthetic_titles(num_classes=3, per_class=5)
  >>> len(t), y.tolist()[:6]
  (15, [0, 0, 0, 0, 0, 1])
  """
  if num_classes < 2 or per_class < 1:
    raise ValueError(f"num_classes must be >= 2 and per_class >= 1, got {num_classes}, {per_class}")
  rng = np.random.default_rng(seed)
  common = np.arange(0x4E00, 0x4E00 + 60)
  titles, labels = [], []
  for c in range(num_classes):
    topic = np.arange(0x5000 + 12 * c, 0x5000 + 12 * (c + 1))
    for _ in range(per_class):
      chars = np.concatenate([rng.choice(topic, rng.integers(3, 9)),
                              rng.choice(common, rng.integers(4, 11))])
      titles.append("".join(map(chr, rng.permutation(chars))))
      labels.append(c)
  return titles, np.asarray(labels, np.int32)
