"""benchmarks/device_suite.py: data preparation, the output checks, the dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_DATA = bool(os.environ.get("SIAMJAX_DATA_DIR"))
_spec = importlib.util.spec_from_file_location("device_suite",
                                               ROOT / "benchmarks" / "device_suite.py")
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)


def _fake_source(tmp_path, link: bool):
  real = tmp_path / "real"
  real.mkdir()
  src = tmp_path / "src" / "omniglot"
  src.mkdir(parents=True)
  for i, name in enumerate(suite.DATA_FILES):
    (real / name).write_bytes(bytes([i]) * (10 + i))
    if link:
      (src / name).symlink_to(real / name)
    else:
      (src / name).write_bytes((real / name).read_bytes())
  return tmp_path / "src"


def test_prepare_data_copies_links_as_files(tmp_path):
  dest = suite.prepare_data(tmp_path / "device_data", _fake_source(tmp_path, link=True))
  for i, name in enumerate(suite.DATA_FILES):
    f = dest / "omniglot" / name
    assert f.is_file() and not f.is_symlink()  # links would not travel to the device
    assert f.read_bytes() == bytes([i]) * (10 + i)
  suite.prepare_data(dest, tmp_path / "src")  # again: nothing to do, no error


def test_prepare_data_errors_name_the_source(tmp_path, monkeypatch):
  monkeypatch.delenv("SIAMJAX_DATA_DIR", raising=False)
  with pytest.raises(ValueError, match="source"):
    suite.prepare_data(tmp_path / "d")
  src = _fake_source(tmp_path, link=False)
  (src / "omniglot" / "all_runs.zip").unlink()
  with pytest.raises(ValueError, match="all_runs.zip"):
    suite.prepare_data(tmp_path / "d", src)


def test_check_outputs(tmp_path):
  assert suite.check_outputs(tmp_path, ("a.json",)) == ["a.json was not written"]
  (tmp_path / "a.json").write_text("{}")
  assert suite.check_outputs(tmp_path, ("a.json",)) == []
  deep = tmp_path / "x" / "y" / "z"
  deep.mkdir(parents=True)
  (deep / "f").write_text("")
  with open(tmp_path / "big", "wb") as f:
    f.truncate(suite.MAX_BYTES)  # sparse: no 16 MiB written
  problems = suite.check_outputs(tmp_path, ("a.json",))
  assert any("folders down" in p for p in problems)
  assert any(p.startswith("big is") for p in problems)
  for i in range(suite.MAX_FILES):
    (tmp_path / f"n{i}").write_text("")
  assert any("more than" in p for p in suite.check_outputs(tmp_path, ()))


def test_bad_arguments_exit_2(capsys):
  assert suite.main(["--dry-run"]) == 2
  assert "error: out:" in capsys.readouterr().err
  assert suite.main(["--out", "x", "--train-time-limit-s", "0"]) == 2
  assert "train-time-limit-s" in capsys.readouterr().err


def test_dry_run_data_error_is_one_line(tmp_path, monkeypatch):
  monkeypatch.delenv("SIAMJAX_DATA_DIR", raising=False)
  rc = suite.main(["--dry-run", "--out", str(tmp_path / "o"), "--data-dir",
                   str(tmp_path / "none")])
  assert rc == 2
  assert "error: source:" in (tmp_path / "o" / "suite.log").read_text()


def test_preflight_refuses_a_cpu_backend_unless_dry_run():
  rec = suite.preflight(dry_run=False)
  assert rec["versions"]["jax"] and rec["jax_backend"] == "cpu"
  assert "not 'gpu'" in rec["abort"]
  assert suite.preflight(dry_run=True)["abort"] is None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DATA, reason="needs the Omniglot zips in $SIAMJAX_DATA_DIR")
def test_dry_run_writes_every_output(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_suite.py"),
                         "--dry-run", "--out", str(out), "--commit", "abc123"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert suite.check_outputs(out) == []
  assert sorted(p.name for p in out.iterdir()) == sorted(suite.OUT_FILES)
  summary = json.loads((out / "summary.json").read_text())
  assert [s["status"] for s in summary["stages"]] == ["ok", "ok", "ok"]
  assert summary["commit"] == "abc123"
  res = json.loads((out / "paper_fast.json").read_text())
  assert res["preset"] == "paper_fast" and res["lake_trials"] == 400
  assert res["device_suite"]["commit"] == "abc123"
  assert "figure: paper_fast Lake 20-way" in proc.stdout
