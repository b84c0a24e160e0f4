"""Verification metrics against scikit-learn and hand-computed cases."""

import numpy as np
import pytest

from siamjax.evaluation import verification as v

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _random_pairs(seed, n=500, ties=False):
  rng = np.random.default_rng(seed)
  similar = rng.integers(0, 2, n)
  scores = rng.normal(similar * 1.0, 1.0)
  if ties:
    scores = np.round(scores, 1)
  return scores, similar


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_roc_and_auc_match_sklearn(seed, ties):
  scores, similar = _random_pairs(seed, ties=ties)
  far, tar, thr = v.roc_curve(scores, similar)
  sk_far, sk_tar, sk_thr = sklearn_metrics.roc_curve(similar, scores, drop_intermediate=False)
  np.testing.assert_allclose(far, sk_far)
  np.testing.assert_allclose(tar, sk_tar)
  np.testing.assert_allclose(thr[1:], sk_thr[1:])
  assert v.auc(far, tar) == pytest.approx(sklearn_metrics.roc_auc_score(similar, scores))


def test_best_threshold_accuracy_is_the_brute_force_maximum():
  scores, similar = _random_pairs(3, n=200, ties=True)
  acc, t = v.best_threshold_accuracy(scores, similar)
  brute = max(np.mean((scores >= c) == similar) for c in np.r_[np.unique(scores), np.inf])
  assert acc == pytest.approx(brute)
  assert v.accuracy_at(scores, similar, t) == pytest.approx(acc)


def test_eer_where_far_equals_frr():
  scores, similar = _random_pairs(4, n=4000)
  far, tar, thr = v.roc_curve(scores, similar)
  eer, t = v.equal_error_rate(far, tar, thr)
  pred = scores >= t
  far_t = np.mean(pred[similar == 0])
  frr_t = np.mean(~pred[similar == 1])
  assert abs(far_t - eer) < 0.01 and abs(frr_t - eer) < 0.01
  # Two unit Gaussians one apart: EER = Phi(-0.5) = 0.3085.
  assert eer == pytest.approx(0.3085, abs=0.03)


def test_threshold_at_far_respects_the_target():
  scores, similar = _random_pairs(5, n=3000)
  far, tar, thr = v.roc_curve(scores, similar)
  for target in (0.0, 0.01, 0.1, 0.5):
    r = v.threshold_at_far(far, tar, thr, target)
    pred = scores >= r["threshold"]
    assert np.mean(pred[similar == 0]) <= target + 1e-12
    assert np.mean(pred[similar == 1]) == pytest.approx(r["tar"])
  with pytest.raises(ValueError, match="target_far"):
    v.threshold_at_far(far, tar, thr, 1.5)


def test_report_thresholds_are_distances():
  rng = np.random.default_rng(6)
  similar = rng.integers(0, 2, 1000)
  dist = np.abs(rng.normal(1.0 - 0.6 * similar, 0.3))
  r = v.verification_report(dist, similar, target_fars=(0.05,), roc_points=20)
  assert r["auc"] > 0.8
  assert np.mean((dist <= r["best_threshold"]) == similar) == pytest.approx(r["best_accuracy"])
  assert np.mean(dist[similar == 0] <= r["at_far"][0]["threshold"]) <= 0.05
  assert len(r["roc_far"]) <= 20


def test_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="similar must hold only 0 and 1"):
    v.roc_curve([0.1, 0.2], [0, 2])
  with pytest.raises(ValueError, match="both same"):
    v.roc_curve([0.1, 0.2], [1, 1])
  with pytest.raises(ValueError, match="similar must have the shape"):
    v.roc_curve([0.1, 0.2], [1, 0, 1])
  with pytest.raises(ValueError, match="scores must be finite"):
    v.roc_curve([np.nan, 0.2], [1, 0])


def test_hardest_mistakes_worst_first_each_pair_once():
  rng = np.random.default_rng(9)
  pairs = rng.integers(0, 6, (300, 2))
  scores, similar = _random_pairs(9, n=300)
  got = v.hardest_mistakes(pairs, scores, similar, threshold=0.5)
  seen, want = set(), []
  for i in sorted(range(300), key=lambda i: -abs(scores[i] - 0.5)):
    key = tuple(sorted(pairs[i]))
    if ((scores[i] >= 0.5) != similar[i]) and key not in seen:
      seen.add(key)
      want.append(i)
  assert got.tolist() == want
  with pytest.raises(ValueError, match="pairs"):
    v.hardest_mistakes(pairs[:3], scores, similar)


