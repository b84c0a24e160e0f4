"""benchmarks/device_suite.py: data preparation, the output checks, the dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

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


# Blocks Pillow and matplotlib (absent on some lent machines) in the suite's stages. torch
# is absent too, except that the bench's import of it for its torch rows (in harness.run,
# after siamjax's rows) hangs, as a slow compile would: the bench overruns its limit.
_BLOCKERS = {
    "PIL/__init__.py": "raise ImportError('Pillow blocked by the test')\n",
    "matplotlib/__init__.py": "raise ImportError('matplotlib blocked by the test')\n",
    "torch/__init__.py": (
        "import sys, time\n"
        "f = sys._getframe(1)\n"
        "while f is not None and not f.f_code.co_filename.endswith('harness.py'):\n"
        "  f = f.f_back\n"
        "if f is not None and f.f_code.co_name == 'run':\n"
        "  time.sleep(600)\n"
        "raise ImportError('torch blocked by the test')\n"),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Omniglot's prepared arrays (what --prepare-data writes), made once."""
  if not HAS_DATA:
    pytest.skip("needs the Omniglot zips in $SIAMJAX_DATA_DIR")
  dest = tmp_path_factory.mktemp("device_data")
  suite.prepare_data(dest, exclude=False)
  return dest


def _blocked_env(tmp_path) -> dict:
  blockers = tmp_path / "blockers"
  for rel, text in _BLOCKERS.items():
    (blockers / rel).parent.mkdir(parents=True, exist_ok=True)
    (blockers / rel).write_text(text)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blockers), str(ROOT)]))
  env.pop("SIAMJAX_DATA_DIR", None)
  return env


def _suite_cmd(out, data, *extra):
  return [sys.executable, str(ROOT / "benchmarks" / "device_suite.py"), "--dry-run",
          "--out", str(out), "--data-dir", str(data), "--commit", "abc123", *extra]


@pytest.mark.slow
def test_prepare_data_writes_arrays_that_load_without_pillow(prepared, tmp_path):
  files = [prepared / "omniglot" / f for f in suite.PREPARED_FILES]
  assert sum(f.stat().st_size for f in files) < 16 * 2**20  # well under the carry limit
  code = ("import sys; from siamjax.data import omniglot as o; "
          "s = o.load_omniglot('evaluation', data_dir=sys.argv[1]); "
          "r = o.load_lake_runs(data_dir=sys.argv[1]); "
          "assert s.images.shape == (659, 20, 105, 105) and s.images.max() == 255; "
          "assert r.support.shape == (20, 20, 105, 105) and r.answers.shape == (20, 20); "
          # what paper_fast imports, with Pillow and matplotlib absent (its plots are skipped)
          "import siamjax.recipes.cli, siamjax.recipes.omniglot_koch; "
          "print('ok')")
  proc = subprocess.run([sys.executable, "-c", code, str(prepared)], capture_output=True,
                        text=True, env=_blocked_env(tmp_path), timeout=120)
  assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


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
def test_dry_run_over_budget_without_optional_packages_keeps_the_bench_rows(prepared, tmp_path):
  """The bench overruns its limit (torch's import hangs): the rows it finished are kept.
  paper_fast is left out by its own limit; the plain dry run (tests/test_smoke_runs.py) runs
  it."""
  out = tmp_path / "out"
  proc = subprocess.run(_suite_cmd(out, prepared, "--bench-limit-s", "20",
                                   "--paper-fast-limit-s", "100"),
                        capture_output=True, text=True, timeout=600, env=_blocked_env(tmp_path))
  log = proc.stdout + proc.stderr
  summary = json.loads((out / "summary.json").read_text())
  status = {s["stage"]: s["status"] for s in summary["stages"]}
  assert status == {"preflight": "ok", "bench": "timed_out"}, log[-3000:]
  assert summary["finished"] == ["preflight"] and summary["running"] is None
  assert proc.returncode == 1 and summary["commit"] == "abc123"
  assert any(w.startswith("paper_fast skipped: its limit of 100 s") for w in summary["warnings"])
  optional = summary["preflight"]["optional"]
  assert all(optional[k].startswith("absent") for k in ("pillow", "matplotlib", "torch"))
  bench = json.loads((out / "bench.json").read_text())
  rows = [r for r in bench["rows"] if not r.get("skipped")]
  assert bench["complete"] is False and bench["git_commit"] == "abc123"
  # The rows finished within the budget are kept, in order: how many depends on the CPU and
  # its load (all three on an idle AVX-512 machine, one on an idle AVX2 one, none under load).
  order = [("siamjax", "train"), ("siamjax", "infer"), ("siamjax", "lake")]
  got = [(r["impl"], r["mode"]) for r in rows]
  assert got == order[:len(got)], got
  # The time plan counts what the dry run compiled: one program per row of a block.
  counts = suite.planned_compiles(batches=1, modes=3, dtypes=1, torch_compile=False)
  compiled = len([r for r in rows if r["compile_and_first_s"] is not None])
  assert compiled == counts["xla"] - 4 if got == order else compiled <= counts["xla"] - 4
  assert summary["bench_first_calls"]["count"] == len(rows)
  assert suite.check_outputs(out) == ["bench.png was not written",  # no matplotlib
                                      "paper_fast.json was not written",
                                      "paper_fast_metrics.jsonl was not written"]


@pytest.mark.slow
def test_a_kill_during_a_stage_leaves_a_summary_naming_what_finished(prepared, tmp_path):
  out = tmp_path / "out"
  proc = subprocess.Popen(_suite_cmd(out, prepared), stdout=subprocess.DEVNULL,
                          stderr=subprocess.STDOUT, env=_blocked_env(tmp_path))
  deadline = time.monotonic() + 400
  running = None
  try:
    while time.monotonic() < deadline and proc.poll() is None:
      try:
        running = json.loads((out / "summary.json").read_text())["running"]
      except (OSError, json.JSONDecodeError) as e:  # written atomically: never half a file
        assert isinstance(e, OSError), e
      if running and running["stage"] == "paper_fast":  # the first stage past preflight
        break
      time.sleep(0.5)
    assert running and running["stage"] == "paper_fast", "paper_fast never started"
    os.kill(proc.pid, signal.SIGTERM)  # what the run tool sends at its command limit
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
  finally:
    if proc.poll() is None:
      proc.kill()
  with pytest.raises(ProcessLookupError):  # the stage's process group went with it
    os.killpg(running["pid"], 0)
  summary = json.loads((out / "summary.json").read_text())
  assert summary["finished"] == ["preflight"] and summary["preflight"]["abort"] is None
  assert summary["stopped_by"] == "SIGTERM" and summary["running"]["stage"] == "paper_fast"
  assert not (out / "paper_fast.json").exists()  # (a finished stage's file: the test above)


def test_the_time_plan_counts_the_bench_compiles():
  real = suite.REAL_BENCH
  batches = real[real.index("--batches") + 1:real.index("--modes")]
  modes = real[real.index("--modes") + 1:real.index("--dtypes")]
  dtypes = real[real.index("--dtypes") + 1:real.index("--repeats")]
  counts = suite.planned_compiles(len(batches), len(modes), len(dtypes), torch_compile=True)
  assert counts == {"xla": 14, "torch_compile": 10}
  doc = " ".join(suite.__doc__.split())
  assert f"{counts['xla']} XLA programs and {counts['torch_compile']} torch.compile graphs" in doc
  assert "compiles counted" in doc and "scaled" in doc


def test_watcher_skips_a_cut_line():
  text = ('{"kind": "train", "step": 2, "loss": 0.7}\n{"kind": "eval", "step": 2}\n'
          '{"kind": "train", "step": 4, "lo')
  assert [r["step"] for r in suite._train_records(text)] == [2]


def test_real_runs_pin_jax_to_cuda(monkeypatch):
  monkeypatch.setenv("SIAMJAX_DATA_DIR", "/x")
  env = suite._env(None, dry_run=False)
  assert env["JAX_PLATFORMS"] == "cuda" and "SIAMJAX_DATA_DIR" not in env
