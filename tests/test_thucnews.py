"""Tests for siamjax.data.thucnews: dedup, few-shot draws, vocabulary, encoding."""

import csv
import os

import numpy as np
import pytest

from siamjax.data import thucnews


def _write(path, header, rows):
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


@pytest.fixture
def fake_dir(tmp_path):
  folder = tmp_path / "thucnews_titles" / "thucnews14_titles"
  folder.mkdir(parents=True)
  _write(folder / "client1_nonEQ.csv", ["Label", "Title"],
         [[0, "股市大涨"], [0, "股市大涨"], [1, "彩票中奖"], [2, "两个标签"]])
  _write(folder / "client2_nonEQ.csv", ["Label", "Title"], [[0, "股市大涨"], [3, "新楼盘"]])
  _write(folder / "client3_nonIID.csv", ["Label", "Title"], [[5, "两个标签"], [1, "再中奖"]])
  _write(folder / "thucnews_test_data.csv", ["", "Label", "Title"], [[7, 3, "新楼盘"]])
  return str(tmp_path)


def test_load_dedups_and_drops_double_labels(fake_dir):
  titles, labels = thucnews.load_thucnews14(fake_dir)
  assert sorted(zip(titles, labels.tolist())) == [
      ("再中奖", 1), ("彩票中奖", 1), ("新楼盘", 3), ("股市大涨", 0)]
  assert labels.dtype == np.int32


def test_load_uses_env_and_rejects_missing(fake_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("SIAMJAX_DATA_DIR", fake_dir)
  assert len(thucnews.load_thucnews14()[0]) == 4
  with pytest.raises(ValueError, match="data_dir"):
    thucnews.load_thucnews14(str(tmp_path / "nowhere"))
  monkeypatch.delenv("SIAMJAX_DATA_DIR")
  with pytest.raises(ValueError, match="data_dir"):
    thucnews.load_thucnews14()


def test_draw_split_disjoint_sizes_and_seeded():
  labels = np.repeat(np.arange(3), [100, 60, 30]).astype(np.int32)
  s = thucnews.draw_split(labels, 3, shots=5, max_test=50, val_per_class=10)
  parts = [s.train, s.val, s.test, s.unlabelled]
  assert sum(map(len, parts)) == len(labels)
  assert len(np.unique(np.concatenate(parts))) == len(labels)
  assert np.bincount(labels[s.train]).tolist() == [5, 5, 5]
  assert np.bincount(labels[s.test]).tolist() == [50, 50, 25]  # small class: all the rest
  assert np.bincount(labels[s.val], minlength=3).tolist() == [10, 5, 0]
  again = thucnews.draw_split(labels, 3, shots=5, max_test=50, val_per_class=10)
  other = thucnews.draw_split(labels, 4, shots=5, max_test=50, val_per_class=10)
  np.testing.assert_array_equal(s.test, again.test)
  assert not np.array_equal(s.train, other.train)


@pytest.mark.parametrize("kwargs,match", [
    (dict(shots=0), "shots"), (dict(max_test=0), "max_test"),
    (dict(val_per_class=-1), "val_per_class"), (dict(shots=40), "shots=40")])
def test_draw_split_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    thucnews.draw_split(np.repeat(np.arange(2), 30), 0, **kwargs)


def test_draw_split_rejects_float_labels():
  with pytest.raises(ValueError, match="labels"):
    thucnews.draw_split(np.zeros(10), 0)


def test_vocab_from_given_text_only_and_encode_drops_unseen():
  vocab = thucnews.build_vocab(["股市大涨", "股市下跌"], min_count=2)
  assert "股市" in vocab.ids and "大涨" not in vocab.ids and "大" in vocab.ids
  assert sorted(vocab.ids.values()) == list(range(1, vocab.size))
  tok = thucnews.encode(["股市暴涨", "猫"], vocab, max_len=6)
  assert tok.shape == (2, 6) and tok.dtype == np.int32
  ids = [vocab.ids[g] for g in ("股", "市", "涨", "股市")]
  assert tok[0].tolist() == ids + [0, 0]
  assert tok[1].tolist() == [0] * 6  # nothing of an unseen title survives
  chars = thucnews.build_vocab(["股市大涨"], min_count=1, chars_only=True)
  assert set(chars.ids) == set("股市大涨")
  assert thucnews.encode(["股市"], vocab, max_len=4, chars_only=True)[0].tolist() == ids[:2] + [0, 0]


def test_vocab_and_encode_reject_bad_arguments():
  with pytest.raises(ValueError, match="min_count"):
    thucnews.build_vocab(["a"], min_count=0)
  with pytest.raises(ValueError, match="max_len"):
    thucnews.encode(["a"], thucnews.build_vocab(["a"]), max_len=0)


def test_synthetic_titles_are_learnable_by_a_bag_of_chars():
  titles, labels = thucnews.synthetic_titles(num_classes=4, per_class=30)
  vocab = thucnews.build_vocab(titles, chars_only=True)
  x = np.zeros((len(titles), vocab.size))
  np.add.at(x, (np.arange(len(titles))[:, None], thucnews.encode(titles, vocab, max_len=20)), 1)
  x[:, 0] = 0
  centroid = np.stack([x[labels == c].mean(0) for c in range(4)])
  assert np.mean(np.argmax(x @ centroid.T, axis=1) == labels) > 0.9


@pytest.mark.skipif(not os.environ.get("SIAMJAX_DATA_DIR"), reason="SIAMJAX_DATA_DIR unset")
def test_real_pool_counts():
  titles, labels = thucnews.load_thucnews14()
  assert len(titles) == 152_666 == len(set(titles))
  counts = np.bincount(labels)
  assert counts.shape == (14,) and counts[11] == 1427 and counts.min() == 1427
  s = thucnews.draw_split(labels, 0)
  assert len(s.train) == 700 and np.bincount(labels[s.test])[11] == 1427 - 50
  assert np.bincount(labels[s.test]).max() == 3000
