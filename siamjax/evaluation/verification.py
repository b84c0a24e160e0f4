"""Verification metrics: accept or reject a pair by thresholding its score.

A verification system says "same" when a pair's *score* is at least a threshold
(higher = more similar). For distances pass ``-distance`` as the score, or use
:func:`verification_report`, which takes distances and reports thresholds in distance
units ("same" when ``distance <= threshold``).

* :func:`roc_curve` (false-accept rate, true-accept rate, thresholds), :func:`auc`;
* :func:`equal_error_rate`: where false accepts equal false rejects;
* :func:`threshold_at_far`: the threshold for a target false-accept rate;
* :func:`best_threshold_accuracy`: the threshold with the highest pair accuracy (choose
  it on validation pairs, then apply it to test pairs with :func:`accuracy_at`);
* :func:`hardest_mistakes`: the worst-judged pairs (drawn by
  :func:`siamjax.plotting.contact_sheet`).

These run once after training, on the host in NumPy (the ROC needs one sort). The
retrieval metrics, :func:`siamjax.evaluation.retrieval.recall_at_1` among them, live in
:mod:`siamjax.evaluation.retrieval`; the plots in :mod:`siamjax.plotting`.
Labels: ``similar = 1`` for a same-class pair, 0 otherwise.
"""

from __future__ import annotations


import numpy as np


__all__ = [
    "roc_curve", "auc", "equal_error_rate", "threshold_at_far", "best_threshold_accuracy",
    "accuracy_at", "operating_points", "operating_rates", "operating_curves",
    "choose_operating_point", "point_at",
    "verification_report", "hardest_mistakes",
]


def _scores_labels(scores, similar) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, dtype=np.float64)
  similar = np.asarray(similar)
  if scores.ndim != 1 or scores.size == 0:
    raise ValueError(f"scores must be a non-empty [P] array, got shape {scores.shape}")
  if similar.shape != scores.shape:
    raise ValueError(f"similar must have the shape of scores {scores.shape}, got {similar.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"scores must be finite: {int(np.sum(~np.isfinite(scores)))} of "
                     f"{scores.size} are NaN or inf")
  bad = np.setdiff1d(np.unique(similar), [0, 1])
  if bad.size:
    raise ValueError(f"similar must hold only 0 and 1 (1 = same class), found {bad[:5].tolist()}")
  similar = similar.astype(bool)
  if similar.all() or not similar.any():
    raise ValueError("similar must contain both same (1) and different (0) pairs")
  return scores, similar


def _roc(far, tar, thresholds=None):
  """Checks ROC arrays (as :func:`roc_curve` returns them); ``(far, tar, thresholds)``."""
  far, tar = np.asarray(far, np.float64), np.asarray(tar, np.float64)
  for name, v in (("far", far), ("tar", tar)):
    if v.ndim != 1 or v.size < 2:
      raise ValueError(f"{name} must be a [T] ROC array with T >= 2 points (from roc_curve), "
                       f"got shape {v.shape}")
    if not np.all((v >= 0) & (v <= 1)):
      raise ValueError(f"{name} must hold rates in [0, 1] (NaN is not one), found "
                       f"{v[~((v >= 0) & (v <= 1))][:3].tolist()}")
    if np.any(np.diff(v) < 0):
      raise ValueError(f"{name} must be non-decreasing along the curve, as roc_curve "
                       f"returns it")
  if tar.shape != far.shape:
    raise ValueError(f"far and tar must have the same shape, got {far.shape} and {tar.shape}")
  if thresholds is not None:
    thresholds = np.asarray(thresholds, np.float64)
    if thresholds.shape != far.shape:
      raise ValueError(f"thresholds must have the shape of far {far.shape}, got "
                       f"{thresholds.shape}")
  return far, tar, thresholds


def roc_curve(scores, similar) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ROC curve of pair scores: one point per distinct score, plus the origin.

  Args:
    scores: ``[P]`` pair scores, higher = more similar (e.g. ``-distance`` or a logit).
    similar: ``[P]`` 0/1 labels, 1 for a same-class pair.

  Returns:
    ``(far [T], tar [T], thresholds [T])``: at threshold ``t`` (predict "same" when
    ``score >= t``), ``far`` is the false-accept rate (false positive rate) and ``tar``
    the true-accept rate (recall). The first threshold is ``+inf`` (accept nothing).
    Equal to ``sklearn.metrics.roc_curve(similar, scores, drop_intermediate=False)``.

  >>> far, tar, t = roc_curve([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])
  >>> far.tolist(), tar.tolist(), t[1:].tolist()
  ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0], [0.9, 0.8, 0.3, 0.1])
  """
  scores, similar = _scores_labels(scores, similar)
  order = np.argsort(-scores, kind="stable")
  s = scores[order]
  y = similar[order]
  last_of_value = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
  tps = np.cumsum(y)[last_of_value]
  fps = (last_of_value + 1) - tps
  far = np.r_[0.0, fps / (~similar).sum()]
  tar = np.r_[0.0, tps / similar.sum()]
  return far, tar, np.r_[np.inf, s[last_of_value]]


def auc(far: np.ndarray, tar: np.ndarray) -> float:
  """Area under a ROC curve (trapezoids), from :func:`roc_curve`'s ``far, tar``.

  Raises:
    ValueError: ``far`` / ``tar`` that are not one ROC curve: fewer than two points,
      different shapes, rates outside [0, 1], or decreasing.

  >>> auc(*roc_curve([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])[:2])
  0.75
  """
  far, tar, _ = _roc(far, tar)
  return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2.0))


def equal_error_rate(far, tar, thresholds) -> tuple[float, float]:
  """Equal error rate: where the false-accept rate equals the false-reject rate ``1 - tar``.

  Interpolates linearly between the two ROC points around the crossing.

  Args:
    far, tar, thresholds: from :func:`roc_curve`.

  Returns:
    ``(eer, threshold)``: the rate, and the score threshold of the first ROC point at
    or past the crossing.

  Raises:
    ValueError: arrays that are not one ROC curve (see :func:`auc`).

  >>> far, tar, t = roc_curve([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])
  >>> equal_error_rate(far, tar, t)
  (0.5, 0.8)
  """
  far, tar, thresholds = _roc(far, tar, thresholds)
  frr = 1.0 - tar
  gap = far - frr  # increases from -1 to +1 along the curve
  i = int(np.argmax(gap >= 0))
  if i == 0:
    return float(far[0]), float(thresholds[0])
  g0, g1 = gap[i - 1], gap[i]
  w = g0 / (g0 - g1) if g1 != g0 else 0.0
  eer = far[i - 1] + w * (far[i] - far[i - 1])
  return float(eer), float(thresholds[i])


def threshold_at_far(far, tar, thresholds, target_far: float) -> dict:
  """The threshold with the highest true-accept rate whose false-accept rate is ``<= target_far``.

  Args:
    far, tar, thresholds: from :func:`roc_curve`.
    target_far: the largest acceptable false-accept rate, in ``[0, 1]``.

  Returns:
    ``{"target_far", "threshold", "far", "tar"}`` (``threshold`` is a score; ``+inf``
    when even the strictest finite threshold accepts too many impostors).

  >>> far, tar, t = roc_curve([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])
  >>> threshold_at_far(far, tar, t, 0.0)
  {'target_far': 0.0, 'threshold': 0.9, 'far': 0.0, 'tar': 0.5}
  """
  if not 0.0 <= float(target_far) <= 1.0:
    raise ValueError(f"target_far must be in [0, 1], got {target_far}")
  far, tar, thresholds = _roc(far, tar, thresholds)
  i = int(np.flatnonzero(far <= target_far)[-1])
  return {"target_far": float(target_far), "threshold": float(thresholds[i]),
          "far": float(far[i]), "tar": float(tar[i])}


def best_threshold_accuracy(scores, similar) -> tuple[float, float]:
  """The score threshold with the highest pair accuracy on these pairs.

  Args:
    scores: ``[P]`` pair scores, higher = more similar.
    similar: ``[P]`` 0/1 labels.

  Returns:
    ``(accuracy, threshold)``: predict "same" when ``score >= threshold``. Pick the
    threshold on validation pairs; accuracy on the same pairs is optimistic.

  >>> best_threshold_accuracy([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0])
  (1.0, 0.8)
  """
  scores, y = _scores_labels(scores, similar)
  far, tar, thresholds = roc_curve(scores, y)
  n_pos, n_neg = y.sum(), (~y).sum()
  acc = (tar * n_pos + (1.0 - far) * n_neg) / y.size
  i = int(np.argmax(acc))
  return float(acc[i]), float(thresholds[i])


def accuracy_at(scores, similar, threshold: float) -> float:
  """Pair accuracy when "same" means ``score >= threshold``.

  >>> accuracy_at([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0], 0.5)
  0.5
  """
  scores, y = _scores_labels(scores, similar)
  return float(np.mean((scores >= threshold) == y))


def operating_points(scores, correct, impostor) -> dict:
  """Counts at every threshold of a decision rule "accept when ``score >= t``".

  The general form of :func:`roc_curve` for calibrating decisions: each item (a pair, or
  an identification probe with its nearest gallery match) is *correct* when accepting it
  is right, an *impostor* when accepting it is a false accept, or neither (an enrolled
  probe whose nearest match has another label: accepting it is wrong, but it is no
  stranger). For verification pairs, ``correct`` = same label and ``impostor`` = the rest.

  Args:
    scores: ``[P]`` finite scores, higher = more alike.
    correct: ``[P]`` bool.
    impostor: ``[P]`` bool, disjoint from ``correct``.

  Returns:
    ``{"thresholds" [T], "accepted" [T], "correct" [T], "impostor" [T]`` (counts of
    accepted items at each threshold, the first threshold ``+inf`` accepting nothing),
    ``"n"``, ``"genuine"`` (items that are not impostors), ``"impostors"``}``.

  >>> p = operating_points([0.9, 0.8, 0.3], [True, False, False], [False, True, True])
  >>> p["thresholds"].tolist(), p["correct"].tolist(), p["impostor"].tolist()
  ([inf, 0.9, 0.8, 0.3], [0, 1, 1, 1], [0, 0, 1, 2])
  """
  scores = np.asarray(scores, np.float64)
  correct, impostor = np.asarray(correct, bool), np.asarray(impostor, bool)
  if scores.ndim != 1 or scores.size == 0:
    raise ValueError(f"scores must be a non-empty [P] array, got shape {scores.shape}")
  if correct.shape != scores.shape or impostor.shape != scores.shape:
    raise ValueError(f"correct and impostor must have the shape of scores {scores.shape}, "
                     f"got {correct.shape} and {impostor.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"scores must be finite: {int(np.sum(~np.isfinite(scores)))} of "
                     f"{scores.size} are NaN or inf")
  if np.any(correct & impostor):
    raise ValueError("an item cannot be both correct and an impostor")
  order = np.argsort(-scores, kind="stable")
  s = scores[order]
  last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
  zero = np.zeros(1, np.int64)
  return {"thresholds": np.r_[np.inf, s[last]], "accepted": np.r_[zero, last + 1],
          "correct": np.r_[zero, np.cumsum(correct[order])[last]],
          "impostor": np.r_[zero, np.cumsum(impostor[order])[last]],
          "n": int(s.size), "genuine": int((~impostor).sum()), "impostors": int(impostor.sum())}


def _rate_counts(points: dict) -> dict:
  """``{rate: (numerator [T], denominator)}`` over every point of :func:`operating_points`."""
  c, f, a = (np.asarray(points[k], np.int64) for k in ("correct", "impostor", "accepted"))
  g, m, n = points["genuine"], points["impostors"], points["n"]
  return {"far": (f, m), "frr": (g - c, g), "recall": (c, g), "precision": (c, a),
          "accuracy": (c + m - f, n)}


def operating_curves(points: dict) -> dict:
  """Every rate of :func:`operating_rates` at every point, ``{rate: [T] float}`` (NaN where
  its denominator is 0, e.g. precision when nothing is accepted).

  >>> p = operating_points([0.9, 0.8, 0.3], [True, False, False], [False, True, True])
  >>> operating_curves(p)["far"].tolist()
  [0.0, 0.0, 0.5, 1.0]
  """
  with np.errstate(divide="ignore", invalid="ignore"):
    return {k: np.where(np.asarray(den) > 0, np.asarray(num, np.float64) /
                        np.maximum(den, 1), np.nan)
            for k, (num, den) in _rate_counts(points).items()}


def operating_rates(points: dict, i: int) -> dict:
  """The rates at point ``i`` of :func:`operating_points`, as ``{rate: (numerator,
  denominator)}``: ``far`` (impostors accepted), ``frr`` (genuine items not accepted
  correctly), ``recall`` (``1 - frr``), ``precision`` (accepted items that are correct)
  and ``accuracy`` (correct accepts plus impostor rejections, over all items).

  >>> p = operating_points([0.9, 0.8, 0.3], [True, False, False], [False, True, True])
  >>> operating_rates(p, 2)["far"], operating_rates(p, 2)["precision"]
  ((1, 2), (1, 2))
  """
  return {k: (int(np.asarray(num)[i]) if np.ndim(num) else int(num),
              int(np.asarray(den)[i]) if np.ndim(den) else int(den))
          for k, (num, den) in _rate_counts(points).items()}


def point_at(points: dict, threshold: float) -> int:
  """The index into :func:`operating_points` of the rule "accept when ``score >=
  threshold``", for any threshold (chosen on other data, say).

  >>> p = operating_points([0.9, 0.8, 0.3], [True, False, False], [False, True, True])
  >>> point_at(p, 0.85), point_at(p, 2.0), point_at(p, -1.0)
  (1, 0, 3)
  """
  return int(np.sum(np.asarray(points["thresholds"]) >= threshold)) - 1


def choose_operating_point(points: dict, kind: str, value: float | None = None) -> int:
  """The index into :func:`operating_points` that meets a calibration target.

  Args:
    points: from :func:`operating_points`.
    kind: ``"far"`` (the most accepting threshold with FAR <= ``value``),
      ``"precision"`` (the most accepting one with precision >= ``value``), ``"eer"``
      (where FAR and FRR are closest; ties: the strictest) or ``"best_accuracy"`` (the
      most correct decisions; ties: the strictest).
    value: the target rate for ``"far"`` and ``"precision"``.

  Raises:
    ValueError: an unknown kind, a rate outside [0, 1], or a precision no threshold reaches.

  >>> p = operating_points([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0], [0, 1, 0, 1])
  >>> [float(p["thresholds"][choose_operating_point(p, k, v)]) for k, v in
  ...  (("far", 0.0), ("precision", 0.6), ("eer", None), ("best_accuracy", None))]
  [0.9, 0.3, 0.8, 0.9]
  """
  if kind not in ("far", "precision", "eer", "best_accuracy"):
    raise ValueError(f"kind must be 'far', 'precision', 'eer' or 'best_accuracy', got "
                     f"{kind!r}")
  if kind in ("far", "precision") and (value is None or not 0.0 <= float(value) <= 1.0):
    raise ValueError(f"a {kind} target needs a rate in [0, 1], got {value!r}")
  rate = operating_curves(points)
  if kind == "far":
    return int(np.flatnonzero(rate["far"] <= value)[-1])  # the first point accepts nothing
  if kind == "precision":
    ok = np.flatnonzero(rate["precision"] >= value)
    if ok.size == 0:
      raise ValueError(f"no threshold reaches precision {value:g} on these data (the "
                       f"highest is {np.nanmax(rate['precision']):.4g}); lower the target or "
                       f"calibrate on more data")
    return int(ok[-1])
  if kind == "eer":
    return int(np.argmin(np.abs(rate["far"] - rate["frr"])))
  return int(np.argmax(rate["accuracy"]))


def verification_report(distance, similar, *, target_fars=(1e-1, 1e-2, 1e-3),
                        roc_points: int = 0) -> dict:
  """ROC-AUC, EER and thresholds of pairs scored by a *distance* (smaller = more similar).

  Args:
    distance: ``[P]`` pair distances.
    similar: ``[P]`` 0/1 labels, 1 for a same-class pair.
    target_fars: false-accept rates for which to report the threshold and accept rate.
    roc_points: when > 0, also return the ROC subsampled to about this many points
      (``roc_far``, ``roc_tar``) for plotting later.

  Returns:
    A JSON-ready dict: ``auc``, ``eer``, ``eer_threshold``, ``best_accuracy``,
    ``best_threshold``, and ``at_far`` (one entry per target); every threshold is a
    distance: predict "same" when ``distance <= threshold``.

  >>> r = verification_report([0.1, 0.2, 0.7, 0.9], [1, 1, 0, 0])
  >>> r["auc"], r["eer"], r["best_accuracy"], r["best_threshold"]
  (1.0, 0.0, 1.0, 0.2)
  """
  scores = -np.asarray(distance, np.float64)
  far, tar, thresholds = roc_curve(scores, similar)
  eer, eer_t = equal_error_rate(far, tar, thresholds)
  best_acc, best_t = best_threshold_accuracy(scores, similar)
  at_far = []
  for target in target_fars:
    r = threshold_at_far(far, tar, thresholds, target)
    r["threshold"] = -r["threshold"]
    at_far.append(r)
  report = {"auc": auc(far, tar), "eer": eer, "eer_threshold": -eer_t,
            "best_accuracy": best_acc, "best_threshold": -best_t, "at_far": at_far,
            "pairs": int(scores.size)}
  if roc_points > 0:
    keep = np.unique(np.linspace(0, far.size - 1, roc_points).astype(int))
    report["roc_far"] = far[keep].tolist()
    report["roc_tar"] = tar[keep].tolist()
  return report


def hardest_mistakes(pairs, scores, similar, *, threshold: float = 0.0) -> np.ndarray:
  """The rows of the wrongly judged pairs, worst first, each unordered pair once.

  A pair is judged "same" when ``score >= threshold``; a mistake is worse the farther
  its score lies from the threshold (for logits and ``threshold=0``: the highest pair
  BCE loss first). Sampled pairs may repeat: only the first row of each unordered pair
  of positions is kept.

  Args:
    pairs: ``[P, 2]`` integer positions of the two examples of each pair.
    scores: ``[P]`` pair scores, higher = more similar.
    similar: ``[P]`` 0/1 labels.
    threshold: the accept threshold.

  Returns:
    ``[K]`` int64 row indices into ``pairs``.

  >>> hardest_mistakes([[0, 1], [2, 3], [1, 0], [4, 5]], [0.5, -3.0, 0.9, 2.0], [0, 1, 0, 1])
  array([1, 2])
  """
  scores, y = _scores_labels(scores, similar)
  pairs = np.asarray(pairs)
  if pairs.shape != (scores.size, 2):
    raise ValueError(f"pairs must have shape [{scores.size}, 2], got {pairs.shape}")
  wrong = np.flatnonzero((scores >= threshold) != y)
  worst = wrong[np.argsort(-np.abs(scores[wrong] - threshold), kind="stable")]
  _, first = np.unique(np.sort(pairs[worst], axis=1), axis=0, return_index=True)
  return worst[np.sort(first)]
