"""siamjax.inference on small hand-built models: embedding buckets, scores, calibration
against brute force, decisions, the calibration file, and bad input."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from siamjax import index as index_lib
from siamjax import inference


def _model(tmp_path, *, kind="squared_euclidean", dim=6, width=4, seed=0, batch_size=64,
           bias=0.5):
  """A linear embedding of ``dim``-vectors, under ``kind``."""
  w = np.random.default_rng(seed).normal(size=(dim, width)).astype(np.float32)
  variables = {"params": {"w": w}}
  metric = (index_lib.Metric("weighted_l1", weights=-np.ones(width, np.float32), bias=bias)
            if kind == "weighted_l1" else index_lib.Metric(kind))
  return inference.Model(
      recipe="toy", workdir=tmp_path, step=7, checkpoint="best", variables=variables,
      apply=lambda v, x: x @ v["params"]["w"], metric=metric,
      inputs=inference.Inputs("vectors", (dim,), "float32", {"input": "toy"}),
      prepare=lambda raw: np.asarray(raw, np.float32), batch_size=batch_size)


def test_embed_matches_apply_and_compiles_once_per_bucket(tmp_path):
  m = _model(tmp_path, batch_size=64)
  x = np.random.default_rng(1).normal(size=(200, 6)).astype(np.float32)
  want = x @ np.asarray(m.variables["params"]["w"])
  for n in (1, 3, 8, 9, 16, 50, 64, 65, 200):
    np.testing.assert_allclose(np.asarray(m.embed(x[:n])), want[:n], rtol=1e-5, atol=1e-5)
  devices = jax.local_device_count()
  buckets = {m._bucket(n) for n in range(1, 201)}
  assert all(b % devices == 0 and b <= m.batch_size for b in buckets)
  assert m._embed_jit._cache_size() <= len(buckets)
  before = m._embed_jit._cache_size()
  for n in (2, 5, 7, 33, 61):  # sizes of buckets already compiled
    m.embed(x[:n])
  assert m._embed_jit._cache_size() == before


def test_embed_is_sharded_over_the_local_devices(tmp_path):
  m = _model(tmp_path)
  h = m._embed_jit(m.variables, jax.device_put(
      np.ones((m._bucket(40), 6), np.float32),
      jax.sharding.NamedSharding(m._mesh, jax.sharding.PartitionSpec("data"))))
  assert len(h.sharding.device_set) == jax.local_device_count()


@pytest.mark.parametrize("kind", ["squared_euclidean", "euclidean", "cosine", "weighted_l1"])
def test_score_is_the_metric_in_its_units(tmp_path, kind):
  m = _model(tmp_path, kind=kind)
  rng = np.random.default_rng(2)
  a, b = (rng.normal(size=(9, 6)).astype(np.float32) for _ in range(2))
  ha, hb = (x @ np.asarray(m.variables["params"]["w"], np.float64) for x in (a, b))
  d2 = ((ha - hb) ** 2).sum(1)
  want = {"squared_euclidean": d2, "euclidean": np.sqrt(d2),
          "cosine": (ha * hb).sum(1) / np.linalg.norm(ha, axis=1) / np.linalg.norm(hb, axis=1),
          "weighted_l1": 1 / (1 + np.exp(-(0.5 - np.abs(ha - hb).sum(1))))}[kind]
  np.testing.assert_allclose(m.score(a, b), want, rtol=2e-4, atol=2e-4)
  assert m.same_when == ("lower" if "euclidean" in kind else "higher")


def test_bad_inputs_name_the_argument(tmp_path):
  m = _model(tmp_path)
  with pytest.raises(ValueError, match=r"x must be \[N, 6\]"):
    m.embed(np.zeros((3, 5), np.float32))
  with pytest.raises(ValueError, match="x is empty"):
    m.embed(np.zeros((0, 6), np.float32))
  with pytest.raises(ValueError, match="dtype float32"):
    m.embed(np.zeros((3, 6), np.int32))
  with pytest.raises(ValueError, match="same number of inputs"):
    m.score(np.zeros((3, 6), np.float32), np.zeros((2, 6), np.float32))
  with pytest.raises(ValueError, match="not been calibrated"):
    inference.verify(m, np.zeros((1, 6), np.float32), np.ones((1, 6), np.float32))


def test_a_checkpoint_that_does_not_fit_the_network_is_refused_in_one_line(tmp_path):
  with pytest.raises(ValueError, match="does not fit the network its config.json describes"):
    inference.Model(
        recipe="toy", workdir=tmp_path, step=0, checkpoint="best",
        variables={"params": {"w": np.ones((5, 4), np.float32)}},
        apply=lambda v, x: x @ v["params"]["w"], metric=index_lib.Metric("euclidean"),
        inputs=inference.Inputs("vectors", (6,), "float32", {}), prepare=np.asarray)


def _brute_force(scores, correct, impostor, kind, value):
  """The threshold a target asks for, by trying every score (accept when >= t)."""
  best = None
  for t in sorted(set(scores.tolist()) | {np.inf}, reverse=True):
    acc = scores >= t
    far = (acc & impostor).sum() / impostor.sum()
    rec = (acc & correct).sum() / (~impostor).sum()
    prec = (acc & correct).sum() / max(acc.sum(), 1) if acc.any() else np.nan
    accuracy = ((acc & correct).sum() + (~acc & impostor).sum()) / scores.size
    if kind == "far":
      key = (far <= value, -t)
    elif kind == "precision":
      key = (bool(prec >= value), -t)
    elif kind == "eer":
      key = (-abs(far - (1 - rec)), t)
    else:
      key = (accuracy, t)
    if best is None or key > best[0]:
      best = (key, t)
  return best[1]


@pytest.mark.parametrize("target", [{"far": 0.05}, {"far": 0.0}, {"precision": 0.5}, "eer",
                                    "best_accuracy"])
def test_pair_calibration_matches_brute_force(tmp_path, target):
  m = _model(tmp_path, kind="euclidean", dim=4, width=4)
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 6, 60)
  centres = rng.normal(size=(6, 4)) * 2.0
  x = (centres[labels] + rng.normal(size=(60, 4))).astype(np.float32)
  out = inference.calibrate(m, x, labels, target)
  (name, rec), = out.items()
  # The same pairs by hand: every i < j, score = -distance.
  h = x @ np.asarray(m.variables["params"]["w"], np.float64)
  i, j = np.triu_indices(60, 1)
  scores = -np.linalg.norm(h[i] - h[j], axis=1)
  same = labels[i] == labels[j]
  kind, value = inference.parse_target(target)[1:]
  t = _brute_force(np.float32(scores).astype(np.float64), same, ~same, kind, value)
  assert rec["score_threshold"] == pytest.approx(t, abs=1e-5)
  assert rec["pairs"] == i.size and rec["genuine"] == same.sum()
  acc = scores >= rec["score_threshold"] - 1e-6
  assert rec["far"] == pytest.approx((acc & ~same).sum() / (~same).sum(), abs=0.02)
  assert rec["far_ci95"][0] <= rec["far"] <= rec["far_ci95"][1]
  assert rec["threshold"] == pytest.approx(-rec["score_threshold"], abs=1e-6)
  assert rec["same_when"] == "lower" and rec["units"] == "distance"


def test_open_set_calibration_counts_strangers_and_misidentifications(tmp_path):
  m = _model(tmp_path, kind="squared_euclidean", dim=3, width=3)
  m.variables = jax.device_put({"params": {"w": np.eye(3, dtype=np.float32)}})
  gallery = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0]], np.float32)
  index = m.enroll(gallery, ["a", "b", "c"])
  probes = np.array([[0.1, 0, 0],      # a, right, score -0.01
                     [9, 0, 0],        # b, right, -1
                     [0, 7, 0],        # c, but nearer... right: c at 9 vs a 49 -> -9
                     [4, 0, 0],        # labelled b, nearest a (16 vs 36): wrong, -16
                     [0, 0, 3],        # stranger, -9
                     [0, 0, 6]], np.float32)  # stranger, -36
  labels = ["a", "b", "c", "b", "z", "z"]
  out = inference.calibrate(m, probes, labels, [{"far": 0.0}, {"far": 0.5}, "best_accuracy"],
                            index=index)
  # far=0: accept down to -1 (a and b identified); the next score, -9, lets a stranger in.
  assert out["far=0"]["score_threshold"] == pytest.approx(-1.0, abs=1e-4)
  assert out["far=0"]["recall"] == pytest.approx(2 / 4)  # of the 4 enrolled probes
  # far=0.5: down to -16; the misidentified probe (-16) is no stranger, so FAR stays 0.5.
  assert out["far=0.5"]["score_threshold"] == pytest.approx(-16.0, abs=1e-4)
  assert out["far=0.5"]["far"] == 0.5 and out["far=0.5"]["recall"] == pytest.approx(3 / 4)
  assert out["far=0.5"]["precision"] == pytest.approx(3 / 5)  # 5 accepted, 3 right
  assert out["best_accuracy"]["score_threshold"] == pytest.approx(-1.0, abs=1e-4)
  assert out["far=0"]["protocol"] == "open_set" and out["far=0"]["strangers"] == 2
  r = inference.identify(m, index, probes, threshold="far=0.5")
  assert r.label == ["a", "b", "c", "a", "a", "unknown"]
  assert r.nearest == ["a", "b", "c", "a", "a", "a"]
  assert r.accepted.tolist() == [True, True, True, True, True, False]
  np.testing.assert_allclose(r.score, [0.01, 1, 9, 16, 9, 36], rtol=1e-4)  # squared distances


def test_calibration_is_saved_and_dropped_for_other_parameters(tmp_path):
  m = _model(tmp_path, kind="euclidean")
  rng = np.random.default_rng(4)
  x = rng.normal(size=(30, 6)).astype(np.float32)
  labels = np.repeat(np.arange(10), 3)
  inference.calibrate(m, x, labels, ["eer", "far=0.1"])
  saved = json.loads((tmp_path / inference.CALIBRATION_FILE).read_text())
  assert set(saved[""]["thresholds"]) == {"eer", "far=0.1"}
  again = _model(tmp_path, kind="euclidean")
  assert set(again.thresholds) == {"eer", "far=0.1"}
  assert again.threshold()["target"] == "far=0.1"  # the last calibrated
  other = _model(tmp_path, kind="euclidean", seed=9)  # other parameters: not its thresholds
  assert other.thresholds == {}
  v = inference.verify(again, x[:3], x[3:6])
  assert v.threshold == "far=0.1" and v.same.shape == (3,)
  np.testing.assert_allclose(v.score, again.score(x[:3], x[3:6]), rtol=1e-6)
  assert (v.same == (v.score <= again.threshold()["threshold"] + 1e-6)).all()


def test_calibration_on_given_pairs_and_bad_targets(tmp_path):
  m = _model(tmp_path, kind="cosine")
  rng = np.random.default_rng(5)
  a = rng.normal(size=(40, 6)).astype(np.float32)
  b = np.where(np.arange(40)[:, None] < 20, a + 0.1 * rng.normal(size=(40, 6)),
               rng.normal(size=(40, 6))).astype(np.float32)
  same = (np.arange(40) < 20).astype(int)
  rec = inference.calibrate(m, pairs=(a, b, same), target="eer")["eer"]
  assert rec["pairs"] == 40 and rec["same_when"] == "higher"
  for bad in ({"far": 2.0}, "median", {"recall": 0.9}, "far=x"):
    with pytest.raises(ValueError, match="target"):
      inference.calibrate(m, pairs=(a, b, same), target=bad)
  with pytest.raises(ValueError, match="both genuine"):
    inference.calibrate(m, pairs=(a, b, np.ones(40, int)), target="eer")
  b[25] = a[25]  # an impostor pair that scores highest: no threshold is always right
  with pytest.raises(ValueError, match="no threshold reaches precision 1"):
    inference.calibrate(m, pairs=(a, b, same), target={"precision": 1.0})
  with pytest.raises(ValueError, match="not both"):
    inference.calibrate(m, a, same, pairs=(a, b, same))


def test_an_index_of_another_model_is_refused(tmp_path):
  m, other = _model(tmp_path, seed=0), _model(tmp_path, seed=1)
  index = other.enroll(np.ones((2, 6), np.float32), ["a", "b"])
  with pytest.raises(index_lib.IndexMismatch, match="another model"):
    inference.identify(m, index, np.ones((1, 6), np.float32), threshold=1.0)
