"""On-device sampling: pairs, P x K groups, one-shot trials and epoch shuffles.

Every sampler here is a pure function of a ``jax.random`` key and arrays that already
live on the device, so a jitted train step can fuse sampling, augmentation, encoding and
the update (:mod:`siamjax.train`). The samplers return *positions* into a flat array of
examples (images, vectors, token rows); the caller gathers ``x[positions]``.

A dataset's classes are described by an :class:`IndexTable` (row ``c`` lists the
positions of class ``c``'s examples): :func:`index_table` builds one from labels,
:func:`grid_table` from a ``[classes, members]`` bank such as Omniglot's characters x
drawers. A second table over *classes* (e.g. the characters of each alphabet) is passed
as ``groups``.

* :func:`sample_pairs`: balanced pairs, the first half same-class (two distinct
  members), the rest different classes (from one group with ``groups=``).
* :func:`sample_groups`: P classes x K members for in-batch losses, the classes
  optionally drawn a few at a time from one group.
* :func:`sample_oneshot_trials`: one N-way one-shot trial per query, its candidates
  drawn from a gallery table (held-out queries against training images).
* :func:`sample_oneshot_tasks`: random N-way one-shot tasks from a ``[C, D, H, W]`` bank
  (Omniglot's characters x drawers), one query per class, within or across alphabets.
* :func:`keras_pairs`: the alternating pairs of the Keras MNIST Siamese example.
* :func:`epoch_batches`: the rows of consecutive batches of an epoch-wise shuffled pass
  (a ``prepare`` for :func:`siamjax.train.make_train_step`).
* :func:`sample_rows`: i.i.d. uniform rows of an unlabelled pool, drawn afresh each step.
* :func:`exhaustive_pairs`: every same-class pair plus as many sampled negatives (host).
* :func:`split_views`: each row's tokens split at random into two disjoint views, the
  positive pair of split-view self-supervised pre-training (:mod:`siamjax.bag`).

The images' random distortions and resizing live in :mod:`siamjax.augment`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from siamjax import _checks

__all__ = [
    "IndexTable", "index_table", "grid_table", "sample_pairs", "sample_groups",
    "sample_oneshot_trials", "sample_oneshot_tasks", "keras_pairs", "epoch_batches",
    "sample_rows",
    "exhaustive_pairs", "split_views",
]


class IndexTable(NamedTuple):
  """Members of each class: ``table [C, M]`` int32 positions and ``counts [C]`` int32.

  Row ``c`` holds its ``counts[c]`` positions, then repeats its first one as padding. A
  pytree, so it can sit inside the ``data`` a train step receives.
  """

  table: jax.Array
  counts: jax.Array


def index_table(labels, num_classes: int | None = None, *, min_size: int = 1,
                name: str = "labels") -> IndexTable:
  """Host-side :class:`IndexTable`: row ``c`` lists the positions of class ``c`` in order.

  Args:
    labels: ``[N]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes (``labels.max() + 1`` when ``None``); every class must
      have a member (renumber sparse ids first, e.g. with ``np.unique(...,
      return_inverse=True)``).
    min_size: every class must have at least this many members.
    name: the argument name used in errors.

  Returns:
    :class:`IndexTable` of NumPy arrays (``jnp.asarray`` them or pass them to a jitted
    function).

  Raises:
    ValueError: ``labels`` is not a non-empty ``[N]`` integer array, has negative ids or
      ids ``>= num_classes``, a class is empty, or a class has fewer than ``min_size``.

  >>> t = index_table(np.array([1, 0, 1, 1]))
  >>> t.table.tolist(), t.counts.tolist()
  ([[1, 1, 1], [0, 2, 3]], [1, 3])
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be a non-empty [N] integer array, got {labels.dtype} "
                     f"{labels.shape}")
  if labels.min() < 0:
    raise ValueError(f"{name} must be >= 0, found {int(labels.min())}")
  c = int(labels.max()) + 1 if num_classes is None else int(num_classes)
  if labels.max() >= c:
    raise ValueError(f"{name} hold class {int(labels.max())} but num_classes is {c}")
  counts = np.bincount(labels, minlength=c).astype(np.int32)
  if (counts == 0).any():
    raise ValueError(f"{name}: classes {np.flatnonzero(counts == 0).tolist()[:5]} have no "
                     f"member (renumber the ids so that every class in [0, C) occurs)")
  if counts.min() < min_size:
    raise ValueError(f"{name}: class {int(np.argmin(counts))} has {int(counts.min())} "
                     f"member(s) but {min_size} are needed")
  order = np.argsort(labels, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  m = int(counts.max())
  j = np.where(np.arange(m)[None, :] < counts[:, None], np.arange(m)[None, :], 0)
  return IndexTable(order[starts[:, None] + j].astype(np.int32), counts)


def grid_table(num_classes: int, members_per_class: int, members=None) -> IndexTable:
  """The :class:`IndexTable` of a ``[C, D, ...]`` bank flattened to ``[C * D, ...]``.

  Class ``c``'s member ``d`` sits at position ``c * D + d`` (Omniglot: characters x
  drawers). ``members`` restricts every class to those member indices (e.g. Koch's 12
  training drawers); default all ``D``.

  >>> grid_table(2, 4, members=(1, 3)).table.tolist()
  [[1, 3], [5, 7]]
  """
  members = np.arange(members_per_class) if members is None else np.asarray(members, np.int64)
  if members.ndim != 1 or members.size == 0 or members.min() < 0 or (
      members.max() >= members_per_class) or len(set(members.tolist())) != members.size:
    raise ValueError(f"members must be distinct indices in [0, {members_per_class}), got "
                     f"{members.tolist()}")
  table = np.arange(num_classes)[:, None] * members_per_class + members[None, :]
  return IndexTable(table.astype(np.int32), np.full(num_classes, members.size, np.int32))


def _check_table(name: str, t) -> None:
  if not isinstance(t, IndexTable):
    raise ValueError(f"{name} must be an IndexTable (sampling.index_table), got "
                     f"{type(t).__name__}")
  if t.table.ndim != 2 or t.counts.shape != t.table.shape[:1]:
    raise ValueError(f"{name} must hold table [C, M] and counts [C], got {t.table.shape} and "
                     f"{t.counts.shape}")


def _host(x):
  """``x`` as a NumPy array when it is concrete, else ``None`` (value checks run outside
  ``jit`` only)."""
  return np.asarray(x) if _checks.is_concrete(x) else None


def _concrete_min(counts):
  """``min(counts)`` when ``counts`` is concrete, else ``None``."""
  host = _host(counts)
  return None if host is None else int(np.min(host))


def _distinct(key, n_rows: int, pool: int, k: int, valid=None) -> jax.Array:
  """``[n_rows, k]`` distinct indices in ``[0, pool)`` (only ``< valid[row]`` if given)."""
  u = jax.random.uniform(key, (n_rows, pool))
  if valid is not None:
    u = jnp.where(jnp.arange(pool)[None, :] < valid[:, None], u, 2.0)
  return jnp.argsort(u, axis=1)[:, :k].astype(jnp.int32)


def sample_pairs(key: jax.Array, classes: IndexTable, n_pairs: int, *,
                 groups: IndexTable | None = None, partners: IndexTable | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """Draws ``n_pairs`` pairs of positions, the first half same-class, on the device.

  A positive pair is a class drawn uniformly and two distinct members of it; a negative
  pair two distinct classes (both from one group, drawn uniformly, when ``groups`` is
  given, e.g. two characters of one alphabet as in Lake's test; else the second class is
  uniform among the others) and a uniform member of each.

  Args:
    key: a ``jax.random`` key.
    classes: the :class:`IndexTable` of the examples' classes.
    n_pairs: number of pairs ``P`` (even).
    groups: optional :class:`IndexTable` over *class* indices (its rows list classes):
      negatives come from one group. Every group needs two classes.
    partners: optional :class:`IndexTable` with the same classes: the second member of
      every pair is drawn from it instead (e.g. held-out queries against a training
      gallery; positives are then any member of the class in ``partners``, so keep the
      two sets disjoint).

  Returns:
    ``(pairs [P, 2] int32 positions, similar [P] float32)``, ``similar = 1`` for rows
    ``< P / 2`` (same class) and 0 after.

  Raises:
    ValueError: ``n_pairs`` is odd or below 2, a table is malformed, or (outside
      ``jit``) a class has fewer than two members for positives, or a group fewer than
      two classes.

  >>> t = grid_table(3, 2)   # 3 classes x 2 members: positions 0..5, class = pos // 2
  >>> pairs, similar = sample_pairs(jax.random.key(0), t, 6)
  >>> (pairs // 2)[:3, 0].tolist() == (pairs // 2)[:3, 1].tolist(), similar.tolist()
  (True, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
  """
  if not isinstance(n_pairs, (int, np.integer)) or n_pairs < 2 or n_pairs % 2:
    raise ValueError(f"n_pairs must be an even int >= 2, got {n_pairs!r}")
  _check_table("classes", classes)
  c = classes.table.shape[0]
  if c < 2:
    raise ValueError(f"classes: negative pairs need two classes, got {c}")
  if partners is not None:
    _check_table("partners", partners)
    if partners.table.shape[0] != c:
      raise ValueError(f"partners has {partners.table.shape[0]} classes, classes has {c}")
  elif (low := _concrete_min(classes.counts)) is not None and low < 2:
    raise ValueError("classes: every class needs two members for positive pairs "
                     f"(found a class with {low})")
  if groups is not None:
    _check_table("groups", groups)
    if (low := _concrete_min(groups.counts)) is not None and low < 2:
      raise ValueError(f"groups: every group needs two classes (found one with {low})")
  half = n_pairs // 2
  table, counts = jnp.asarray(classes.table), jnp.asarray(classes.counts)
  second = classes if partners is None else partners
  table2, counts2 = jnp.asarray(second.table), jnp.asarray(second.counts)
  k_c, k_a, k_p, k_g, k_n, k_m1, k_m2 = jax.random.split(key, 7)
  pos_c = jax.random.randint(k_c, (half,), 0, c)
  a = jax.random.randint(k_a, (half,), 0, counts[pos_c])
  if partners is None:  # a distinct second member
    p = (a + jax.random.randint(k_p, (half,), 1, jnp.maximum(counts[pos_c], 2))) % counts[pos_c]
  else:
    p = jax.random.randint(k_p, (half,), 0, counts2[pos_c])
  if groups is None:
    neg1 = jax.random.randint(k_g, (half,), 0, c)
    neg2 = (neg1 + jax.random.randint(k_n, (half,), 1, c)) % c
  else:
    g_table, g_counts = jnp.asarray(groups.table), jnp.asarray(groups.counts)
    g = jax.random.randint(k_g, (half,), 0, g_table.shape[0])
    two = _distinct(k_n, half, g_table.shape[1], 2, g_counts[g])
    neg = jnp.take_along_axis(g_table[g], two, axis=1)
    neg1, neg2 = neg[:, 0], neg[:, 1]
  m1 = jax.random.randint(k_m1, (half,), 0, counts[neg1])
  m2 = jax.random.randint(k_m2, (half,), 0, counts2[neg2])
  first = jnp.concatenate([table[pos_c, a], table[neg1, m1]])
  other = jnp.concatenate([table2[pos_c, p], table2[neg2, m2]])
  similar = jnp.concatenate([jnp.ones((half,), jnp.float32), jnp.zeros((half,), jnp.float32)])
  return jnp.stack([first, other], axis=1).astype(jnp.int32), similar


def sample_groups(key: jax.Array, classes: IndexTable, n_classes: int, per_class: int, *,
                  groups: IndexTable | None = None, classes_per_group: int | None = None,
                  replace: bool = False) -> tuple[jax.Array, jax.Array]:
  """Draws a P x K batch: ``n_classes`` distinct classes, ``per_class`` members each.

  Args:
    key: a ``jax.random`` key.
    classes: the :class:`IndexTable` of the examples' classes.
    n_classes: P, distinct classes per batch.
    per_class: K, members per class (2 gives one positive per anchor).
    groups, classes_per_group: when given, the classes come ``classes_per_group`` at a
      time from ``n_classes / classes_per_group`` distinct groups (rows of ``groups``
      list class indices), so that negatives share a group (Omniglot: an alphabet).
    replace: draw each class's members with replacement (cheap for large classes);
      default distinct members (every class needs ``per_class``).

  Returns:
    ``(positions [P K] int32, labels [P K] int32)`` ordered class-major; ``labels`` are
    class indices (rows of ``classes``).

  Raises:
    ValueError: the sizes do not fit the tables.

  >>> t = index_table(np.array([0, 1, 0, 1, 0, 1]))
  >>> pos, lab = sample_groups(jax.random.key(0), t, 2, 3)
  >>> bool(jnp.all(pos % 2 == lab)), sorted(pos.tolist())
  (True, [0, 1, 2, 3, 4, 5])
  """
  _check_table("classes", classes)
  c, m = classes.table.shape
  if per_class < 1 or (not replace and per_class > m):
    raise ValueError(f"per_class must be in [1, {m}] (the largest class), got {per_class}")
  if not replace and (low := _concrete_min(classes.counts)) is not None and low < per_class:
    raise ValueError(f"classes: a class has {low} members, fewer than per_class={per_class} "
                     f"(pass replace=True to draw with replacement)")
  table, counts = jnp.asarray(classes.table), jnp.asarray(classes.counts)
  k_c, k_m = jax.random.split(key)
  if classes_per_group is None:
    if not 1 <= n_classes <= c:
      raise ValueError(f"n_classes must be in [1, {c}], got {n_classes}")
    chosen = _distinct(k_c, 1, c, n_classes)[0]
  else:
    if groups is None:
      raise ValueError("groups must be given with classes_per_group")
    _check_table("groups", groups)
    if n_classes % classes_per_group:
      raise ValueError(f"n_classes={n_classes} must be a multiple of "
                       f"classes_per_group={classes_per_group}")
    n_groups = n_classes // classes_per_group
    if n_groups > groups.table.shape[0]:
      raise ValueError(f"n_classes / classes_per_group = {n_groups} exceeds the "
                       f"{groups.table.shape[0]} groups")
    if (low := _concrete_min(groups.counts)) is not None and low < classes_per_group:
      raise ValueError(f"groups: a group has {low} classes, fewer than "
                       f"classes_per_group={classes_per_group}")
    k_g, k_w = jax.random.split(k_c)
    g_table, g_counts = jnp.asarray(groups.table), jnp.asarray(groups.counts)
    g = _distinct(k_g, 1, g_table.shape[0], n_groups)[0]
    pick = _distinct(k_w, n_groups, g_table.shape[1], classes_per_group, g_counts[g])
    chosen = jnp.take_along_axis(g_table[g], pick, axis=1).reshape(-1)
  if replace:
    members = jax.random.randint(k_m, (n_classes, per_class), 0, counts[chosen][:, None])
  else:
    members = _distinct(k_m, n_classes, m, per_class, counts[chosen])
  positions = table[chosen[:, None], members]
  labels = jnp.broadcast_to(chosen[:, None], (n_classes, per_class))
  return positions.reshape(-1).astype(jnp.int32), labels.reshape(-1).astype(jnp.int32)


def sample_oneshot_trials(key: jax.Array, query_classes, gallery: IndexTable, n_way: int
                          ) -> tuple[jax.Array, jax.Array]:
  """One ``n_way``-way one-shot trial per query, its candidates drawn from ``gallery``.

  For query ``q`` of class ``y = query_classes[q]``: ``n_way - 1`` distinct classes other
  than ``y``, drawn uniformly, and one uniform member of ``gallery`` for each of the
  ``n_way`` classes, in a uniformly shuffled order; ``answers[q]`` is the column of
  class ``y``. (A fixed column for the true class would let a model that scores every
  candidate alike win every argmax.) Keep the queries out of ``gallery``, e.g. held-out
  images as queries against a table of training images. For Omniglot's characters x
  drawers bank, :func:`sample_oneshot_tasks` draws whole tasks of images instead.

  Args:
    key: a ``jax.random`` key.
    query_classes: ``[Q]`` integer class of each query (a row of ``gallery``).
    gallery: :class:`IndexTable` of the candidates' positions.
    n_way: candidates per trial, in ``[2, C]``.

  Returns:
    ``(support [Q, n_way] int32 gallery positions, answers [Q] int32)``.

  Raises:
    ValueError: ``n_way`` outside ``[2, C]``, a malformed table, or (outside ``jit``)
      ``query_classes`` that are not ``[Q]`` class ids of ``gallery``.

  >>> t = grid_table(3, 2)   # 3 classes x 2 members: positions 0..5, class = pos // 2
  >>> support, answers = sample_oneshot_trials(jax.random.key(0), jnp.array([0, 2]), t, 3)
  >>> (support // 2)[jnp.arange(2), answers].tolist()   # the query's class, at answers
  [0, 2]
  >>> [sorted(row) for row in (support // 2).tolist()]  # every class once per trial
  [[0, 1, 2], [0, 1, 2]]
  """
  _check_table("gallery", gallery)
  c = gallery.table.shape[0]
  if not isinstance(n_way, (int, np.integer)) or not 2 <= n_way <= c:
    raise ValueError(f"n_way must be an int in [2, {c}] (the gallery's classes), got "
                     f"{n_way!r}")
  y_Q = jnp.asarray(query_classes)
  if y_Q.ndim != 1 or not jnp.issubdtype(y_Q.dtype, jnp.integer):
    raise ValueError(f"query_classes must be a [Q] integer array, got {y_Q.dtype} "
                     f"{y_Q.shape}")
  y_host = _host(y_Q)
  if y_host is not None and y_host.size and (y_host.min() < 0 or y_host.max() >= c):
    raise ValueError(f"query_classes must be class ids in [0, {c}), found "
                     f"{int(y_host.min() if y_host.min() < 0 else y_host.max())}")
  table, counts = jnp.asarray(gallery.table), jnp.asarray(gallery.counts)
  q = y_Q.shape[0]
  k_cls, k_col, k_mem = jax.random.split(key, 3)
  u_QxC = jax.random.uniform(k_cls, (q, c))
  u_QxC = jnp.where(jnp.arange(c)[None, :] == y_Q[:, None], 2.0, u_QxC)  # own class last
  classes_QxN = jnp.concatenate([y_Q[:, None], jnp.argsort(u_QxC, axis=1)[:, :n_way - 1]],
                                axis=1)
  order_QxN = _distinct(k_col, q, n_way, n_way)  # a random permutation of the columns
  classes_QxN = jnp.take_along_axis(classes_QxN, order_QxN, axis=1)
  answers_Q = jnp.argmin(order_QxN, axis=1).astype(jnp.int32)  # where column 0 went
  members_QxN = jax.random.randint(k_mem, (q, n_way), 0, counts[classes_QxN])
  return table[classes_QxN, members_QxN].astype(jnp.int32), answers_Q


def sample_oneshot_tasks(key: jax.Array, images: jax.Array, alphabet_ids: np.ndarray, *,
                         n_way: int, n_tasks: int, within_alphabet: bool = True,
                         drawers: tuple[int, ...] | None = None):
  """Draws random N-way one-shot tasks (one query per class), on the device.

  Each task picks ``n_way`` characters (from one alphabet when ``within_alphabet``, as
  Lake's protocol; across all alphabets otherwise, as the Keras reimplementation of
  Koch et al.), and two distinct drawers per character: one support image and one query.

  Args:
    key: a ``jax.random`` key.
    images: ``[C, D, H, W]`` images (characters x drawers).
    alphabet_ids: ``[C]`` host int array of alphabet ids.
    n_way: classes per task.
    n_tasks: number of tasks ``T``.
    within_alphabet: distractors from the query's alphabet (harder) or from any.
    drawers: drawer indices to draw from (default all).

  Returns:
    ``(support [T, N, H, W], query [T, N, H, W], answers [T, N])``; ``answers`` is
    ``arange(N)`` per task (query ``i`` shows support class ``i``).

  Raises:
    ValueError: ``n_way`` below 2 or above the number of characters (or, within
      alphabets, of some alphabet's characters), ``n_tasks < 1``, fewer than two distinct
      ``drawers`` (the support would be the query) or drawers out of range.
  """
  if len(np.shape(images)) < 2:
    raise ValueError(f"images must be [C, D, ...] (characters x drawers), got shape "
                     f"{np.shape(images)}")
  c, d = np.shape(images)[:2]
  if n_way < 2:
    raise ValueError(f"n_way must be >= 2, got {n_way}")
  if n_way > c:
    raise ValueError(f"n_way={n_way} is larger than the {c} characters (classes) in images")
  if n_tasks < 1:
    raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
  drawer_list = list(range(d)) if drawers is None else [int(v) for v in np.ravel(drawers)]
  if len(set(drawer_list)) < 2 or len(set(drawer_list)) != len(drawer_list):
    raise ValueError(f"drawers must name at least two distinct drawers (the support image "
                     f"and the query must differ), got {tuple(drawer_list)}")
  if min(drawer_list) < 0 or max(drawer_list) >= d:
    raise ValueError(f"drawers must be in [0, {d}) (images has {d} drawers), got "
                     f"{tuple(drawer_list)}")
  table = counts = None
  if within_alphabet:
    alphabet_ids = np.asarray(alphabet_ids)
    if alphabet_ids.shape != (c,):
      raise ValueError(f"alphabet_ids must be [C] = [{c}] (one per character), got shape "
                       f"{alphabet_ids.shape}")
    ids = np.unique(alphabet_ids, return_inverse=True)[1].reshape(-1)
    if (sizes := np.bincount(ids)).min() < n_way:
      raise ValueError(f"n_way={n_way}: alphabet {int(np.argmin(sizes))} has only "
                       f"{int(sizes.min())} characters; within_alphabet tasks need n_way in "
                       f"every alphabet (lower n_way or pass within_alphabet=False)")
    table, counts = index_table(ids, min_size=n_way, name="alphabet_ids")
  return _draw_tasks(key, images, np.asarray(drawer_list), table, counts, n_way=n_way,
                     n_tasks=n_tasks)


@functools.partial(jax.jit, static_argnames=("n_way", "n_tasks"))
def _draw_tasks(key, images, drawer_ids, table, counts, *, n_way: int, n_tasks: int):
  """:func:`sample_oneshot_tasks`' draws and gathers, one program (``table`` None: any
  characters)."""
  k_char, k_draw = jax.random.split(key)
  if table is not None:
    k_a, k_c = jax.random.split(k_char)
    alph = jax.random.randint(k_a, (n_tasks,), 0, table.shape[0])
    u = jax.random.uniform(k_c, (n_tasks, table.shape[1]))
    u = jnp.where(jnp.arange(table.shape[1])[None, :] < counts[alph][:, None], u, 2.0)
    pick = jnp.argsort(u, axis=1)[:, :n_way]
    chars = jnp.take_along_axis(table[alph], pick, axis=1)
  else:
    u = jax.random.uniform(k_char, (n_tasks, images.shape[0]))
    chars = jnp.argsort(u, axis=1)[:, :n_way]
  ud = jax.random.uniform(k_draw, (n_tasks, n_way, drawer_ids.shape[0]))
  two = drawer_ids[jnp.argsort(ud, axis=-1)[..., :2]]
  support = images[chars, two[..., 0]]
  query = images[chars, two[..., 1]]
  answers = jnp.broadcast_to(jnp.arange(n_way, dtype=jnp.int32), (n_tasks, n_way))
  return support, query, answers


def keras_pairs(key: jax.Array, classes: IndexTable, n: int) -> tuple[jax.Array, jax.Array]:
  """The pairs of the Keras MNIST Siamese example (``create_pairs``), made on the device.

  For every class ``d`` and ``i < n``: the positive pair ``(x[d][i], x[d][i + 1])`` and
  the negative pair ``(x[d][i], x[d'][i])`` with ``d' = (d + u) % C``, ``u`` uniform in
  ``[1, C)``; pairs alternate positive, negative. ``n`` is the smallest class size
  minus one in the example (5,420 for MNIST train: 108,400 pairs; 891 for test: 17,820).

  Args:
    key: a ``jax.random`` key (the example uses Python's ``random.randrange``).
    classes: :class:`IndexTable` of the examples (positions in file order per class).
    n: pairs per class and sign; needs ``n + 1 <=`` the smallest class size.

  Returns:
    ``(pairs [2 C n, 2] int32 positions, similar [2 C n] float32)`` with ``similar = 1``
    for a same-class pair, as the example's labels (and Hadsell et al.).

  >>> t = IndexTable(jnp.array([[0, 2, 4], [1, 3, 5]]), jnp.array([3, 3]))
  >>> pairs, similar = keras_pairs(jax.random.key(0), t, 2)
  >>> pairs[::2].tolist(), similar.tolist()
  ([[0, 2], [2, 4], [1, 3], [3, 5]], [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
  >>> pairs[1::2].tolist()
  [[0, 1], [2, 3], [1, 0], [3, 2]]
  """
  _check_table("classes", classes)
  table = jnp.asarray(classes.table)
  if table.shape[0] < 2:
    raise ValueError(f"classes must have C >= 2 classes, got table shape {table.shape}")
  if (low := _concrete_min(classes.counts)) is not None:
    if not 1 <= n < low:
      raise ValueError(f"n must be in [1, {low - 1}] (the smallest class minus one), got {n}")
  elif not 1 <= n < table.shape[1]:
    raise ValueError(f"n must be in [1, {table.shape[1] - 1}], got {n}")
  c = table.shape[0]
  d_Cx1 = jnp.arange(c)[:, None]
  i_CxN = jnp.broadcast_to(jnp.arange(n)[None, :], (c, n))
  anchor_CxN = table[:, :n]
  positive_CxN = table[:, 1:n + 1]
  other_CxN = (d_Cx1 + jax.random.randint(key, (c, n), 1, c)) % c
  negative_CxN = table[other_CxN, i_CxN]
  pos_CxNx2 = jnp.stack([anchor_CxN, positive_CxN], axis=-1)
  neg_CxNx2 = jnp.stack([anchor_CxN, negative_CxN], axis=-1)
  pairs = jnp.stack([pos_CxNx2, neg_CxNx2], axis=2).reshape(-1, 2)
  similar = jnp.tile(jnp.array([1.0, 0.0], jnp.float32), c * n)
  return pairs.astype(jnp.int32), similar


def epoch_batches(key: jax.Array, n_rows: int, batch_size: int, first_step,
                  num_steps: int) -> jax.Array:
  """Rows of batches ``first_step .. first_step + num_steps - 1`` of shuffled epochs.

  Epoch ``e`` is one pass over ``range(n_rows)`` in the order
  ``jax.random.permutation(fold_in(key, e), n_rows)``, cut into ``n_rows // batch_size``
  batches (the last partial batch is dropped); step ``s`` belongs to epoch
  ``s // (n_rows // batch_size)``. A pure function of ``(key, step)``, so a resumed run
  sees the batches an uninterrupted one would. Use it as the ``prepare`` of
  :func:`siamjax.train.make_train_step` (once per call of ``num_steps`` fused updates).

  Args:
    key: a ``jax.random`` key.
    n_rows: rows in the dataset (static).
    batch_size: rows per batch (static, ``<= n_rows``).
    first_step: the global step of the first batch (may be traced).
    num_steps: number of consecutive batches (static, at most one epoch).

  Returns:
    ``[num_steps, batch_size]`` int32 row indices.

  >>> rows = epoch_batches(jax.random.key(0), 6, 2, 0, 3)
  >>> sorted(rows.reshape(-1).tolist())  # one epoch: every row once
  [0, 1, 2, 3, 4, 5]
  >>> bool(jnp.all(epoch_batches(jax.random.key(0), 6, 2, 1, 2) == rows[1:]))
  True
  """
  if not 1 <= batch_size <= n_rows:
    raise ValueError(f"batch_size must be in [1, n_rows={n_rows}], got {batch_size}")
  per_epoch = n_rows // batch_size
  if not 1 <= num_steps <= per_epoch:
    raise ValueError(f"num_steps must be in [1, {per_epoch}] (one epoch of batches), got "
                     f"{num_steps}")
  step = jnp.asarray(first_step, jnp.int32) + jnp.arange(num_steps, dtype=jnp.int32)
  e0 = step[0] // per_epoch
  perms = jnp.stack([jax.random.permutation(jax.random.fold_in(key, e0 + i), n_rows)
                     [:per_epoch * batch_size] for i in range(2)])
  perms = perms.reshape(2, per_epoch, batch_size)
  return perms[step // per_epoch - e0, step % per_epoch].astype(jnp.int32)


def sample_rows(key: jax.Array, n_rows: int, batch_size: int) -> jax.Array:
  """``batch_size`` positions drawn uniformly, with replacement, from ``range(n_rows)``.

  The batches of self-supervised pre-training on an unlabelled pool (the THUCNews
  split-view bags): a fresh i.i.d. batch every step from the step's key, so a run is a
  pure function of its seed. For passes that see every row once per epoch use
  :func:`epoch_batches` instead.

  Args:
    key: a ``jax.random`` key.
    n_rows: rows in the pool (static, ``>= 1``).
    batch_size: positions to draw (static, ``>= 1``; may exceed ``n_rows``).

  Returns:
    ``[batch_size]`` int32 positions.

  >>> rows = sample_rows(jax.random.key(0), 5, 8)
  >>> rows.shape, rows.dtype.name, bool(jnp.all((rows >= 0) & (rows < 5)))
  ((8,), 'int32', True)
  """
  for name, v in (("n_rows", n_rows), ("batch_size", batch_size)):
    if not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be an int >= 1, got {v!r}")
  return jax.random.randint(key, (batch_size,), 0, n_rows, dtype=jnp.int32)


def exhaustive_pairs(key: jax.Array, labels) -> tuple[jax.Array, jax.Array]:
  """Every within-class pair, plus one sampled negative for each (host side).

  Each positive ``(i, j)`` (``i < j``, same class) gets a negative ``(i, k)`` with ``k``
  drawn uniformly from the other classes' examples. For few labelled examples (the
  THUCNews seed model's pairs); the count grows with the square of the class sizes.

  Args:
    key: a ``jax.random`` key for the negatives.
    labels: ``[S]`` host integer class ids.

  Returns:
    ``(pairs [P, 2] int32, similar [P] float32)`` with ``P = 2 * #positives``,
    positives first.

  >>> pairs, sim = exhaustive_pairs(jax.random.key(0), np.array([0, 0, 1, 1]))
  >>> pairs.shape, sim.tolist()
  ((4, 2), [1.0, 1.0, 0.0, 0.0])
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a [S] integer array, got {labels.dtype} {labels.shape}")
  i, j = np.triu_indices(len(labels), k=1)
  same = labels[i] == labels[j]
  pos_Px2 = np.stack([i[same], j[same]], axis=1).astype(np.int32)
  if len(pos_Px2) == 0:
    raise ValueError("labels must have a class with at least two examples")
  if len(np.unique(labels)) < 2:
    raise ValueError("labels must hold at least two classes (negatives need another class)")
  # A uniform other-class partner: the r-th example among those not in the anchor's class.
  order = np.argsort(labels, kind="stable")
  starts = np.searchsorted(labels[order], labels[pos_Px2[:, 0]])
  counts = np.bincount(labels)[labels[pos_Px2[:, 0]]]
  r = np.asarray(jax.random.randint(key, (len(pos_Px2),), 0, len(labels) - counts))
  neg = order[np.where(r < starts, r, r + counts)].astype(np.int32)
  pairs = np.concatenate([pos_Px2, np.stack([pos_Px2[:, 0], neg], axis=1)])
  similar = np.concatenate([np.ones(len(pos_Px2)), np.zeros(len(pos_Px2))]).astype(np.float32)
  return jnp.asarray(pairs), jnp.asarray(similar)


def split_views(key: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits each row's tokens at random into two disjoint views (a fair coin each).

  Unlike SimCSE-style dropout views, two disjoint halves of a bag of n-grams cannot be
  matched by copying, so the pre-training task stays hard.

  Args:
    key: PRNG key.
    tokens: ``[B, L]`` token ids.

  Returns:
    ``(keep_a, keep_b)``, ``[B, L]`` bool masks with ``keep_a & keep_b`` all False.
  """
  coin_BxL = jax.random.bernoulli(key, 0.5, tokens.shape)
  return coin_BxL, ~coin_BxL
