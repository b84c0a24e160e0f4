"""The command line every ``experiments/`` script shares: read one, and you know them all.

``python experiments/<recipe>.py [--preset P | --smoke] [--workdir W] [--devices N]
[--data-dir D] [--eval-only] [--no-progress] [--<any-config-field> V]``

:func:`main` runs a recipe module (``NAME``, ``Config``, ``PRESETS``, ``RESUMABLE``,
``train_and_evaluate``, ``summary``, and optionally ``FAST_CPU``) the same way for every
script:

1. for a recipe whose ``FAST_CPU`` is true (those whose training step was measured faster
   with them: ``benchmarks/results/xla-flags-*.json``), adds
   :data:`siamjax.xla.FAST_CPU_FLAGS` to ``XLA_FLAGS`` before JAX starts (CPU installs;
   ``SIAMJAX_NO_XLA_FLAGS=1`` skips it); every other recipe runs on XLA's own flags. It
   turns on JAX's persistent compilation cache, so a resumed or repeated run loads the
   programs it compiled before (:func:`siamjax.xla.enable_compilation_cache`;
   ``SIAMJAX_NO_COMPILATION_CACHE=1`` skips it), and starts multi-host JAX when a
   cluster is detected
   (:func:`siamjax.parallel.initialize_distributed`);
2. builds the config: the preset (``--smoke`` is ``--preset smoke``), then every flag
   named after a ``Config`` field (``--num-steps 2000``, ``--learning-rate 3e-4``;
   booleans as ``--grayscale`` / ``--no-grayscale``, tuples as ``--train-drawers 0,1,2``);
3. holds the work directory (:func:`siamjax.train.lock_workdir`: a second process on it
   is refused at once, naming the holder's pid) and checks it: a directory that holds a
   trained run of another config is refused before anything is written, naming the
   differing fields (the ``RESUMABLE`` ones, such as the number of steps, may change);
   a directory whose ``results.json`` was written for this very config is a finished
   run: its results are printed again and nothing is trained (``--eval-only``
   re-evaluates its checkpoints instead);
4. writes ``config.json``, calls ``train_and_evaluate`` (which trains through
   :func:`siamjax.train.fit`: checkpoints, ``metrics.jsonl``, the progress bar, the
   transfer guard, ``--devices``), and writes ``results.json`` with
   :func:`siamjax.results.write_results` (the command, the git commit, the machine with
   its ``XLA_FLAGS``, ``fast_cpu_flags``: whether this script set them, and
   ``compilation_cache``: whether programs compiled by an earlier run could load from
   :func:`siamjax.xla.enable_compilation_cache`'s directory);
5. turns user errors (bad data, a locked or mismatched work directory) into one line,
   ``error: ...``, and exit status 2, and Ctrl-C or SIGTERM into one line and status
   130 (143) after a checkpoint is saved. ``SIAMJAX_TRACEBACK=1`` shows tracebacks.

Re-running a command resumes it where it stopped; a killed run and its re-run end with
the parameters and results of an uninterrupted one (``tests/test_scripts.py``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

__all__ = ["main", "config_diff", "config_from_dict"]

# Work-directory protocol fields every recipe's config may change between runs of one
# directory: they change how long or how verbosely it runs, not what it computes.
ALWAYS_RESUMABLE = frozenset({"data_dir", "cache_dir", "download", "log_every", "devices"})


def _value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _kind(f: dataclasses.Field) -> str:
  return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _is_str_field(f: dataclasses.Field) -> bool:
  return "str" in [p.strip() for p in _kind(f).split("|")]


def _as_tuple(text: str):
  """A tuple flag: ``0,1,2``, ``semi_hard,batch_all`` or a single value.

  >>> _as_tuple("semi_hard"), _as_tuple("0,1,2"), _as_tuple("(0.8, 1.2)")
  (('semi_hard',), (0, 1, 2), (0.8, 1.2))
  """
  value = _value(text)
  if isinstance(value, (tuple, list)):
    return tuple(value)
  if isinstance(value, str) and "," in value:
    return tuple(_value(v.strip()) for v in value.split(","))
  return (value,)


def _parser_of(f: dataclasses.Field):
  if _kind(f).startswith("tuple"):
    return _as_tuple
  return str if _is_str_field(f) else _value


def _normal(obj):
  """``obj`` as JSON sees it (tuples become lists), for comparisons with saved configs."""
  return json.loads(json.dumps(obj))


def config_diff(saved: Mapping, wanted: Mapping, resumable=frozenset(),
                added: Mapping | None = None) -> list[str]:
  """The fields, other than ``resumable`` ones, on which two config dicts differ.

  ``added`` maps fields to their ``Config`` defaults: a field the workdir's config lacks
  (added to ``Config`` after that run) is no difference while it keeps its default.

  >>> config_diff({"channels": 32, "num_steps": 10}, {"channels": 16, "num_steps": 20},
  ...             {"num_steps"})
  ['channels: 32 in the workdir, 16 now']
  >>> config_diff({"channels": 32}, {"channels": 32, "header": None}, added={"header": None})
  []
  """
  saved, wanted = _normal(dict(saved)), _normal(dict(wanted))
  added = _normal(dict(added or {}))
  out = []
  for k in sorted(set(saved) | set(wanted)):
    if k in resumable or saved.get(k) == wanted.get(k):
      continue
    if k not in saved and k in added and wanted.get(k) == added[k]:
      continue
    out.append(f"{k}: {saved.get(k, '(absent)')!r} in the workdir, "
               f"{wanted.get(k, '(absent)')!r} now".replace("'", ""))
  return out


def config_from_dict(config_cls, saved: Mapping):
  """The ``Config`` a work directory's ``config.json`` holds (:func:`main` writes it).

  JSON lists become tuples where the field is a tuple; fields added to ``Config`` since
  the run keep their defaults.

  Raises:
    ValueError: a field this version of the recipe does not know.

  >>> import dataclasses
  >>> @dataclasses.dataclass
  ... class C:
  ...   drawers: tuple[int, ...] = (0,)
  ...   lr: float = 1.0
  >>> config_from_dict(C, {"drawers": [1, 2]})
  C(drawers=(1, 2), lr=1.0)
  """
  fields = {f.name: f for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(saved) - set(fields))
  if unknown:
    raise ValueError(f"config.json holds fields this version of siamjax does not know "
                     f"({', '.join(unknown)}): it was written by another version")
  return config_cls(**{k: tuple(v) if _kind(fields[k]).startswith("tuple") and
                       isinstance(v, list) else v for k, v in saved.items()})


def _trained(workdir: Path) -> bool:
  return any(workdir.rglob("_CHECKPOINT_METADATA")) or (workdir / "results.json").exists()


def _check_workdir(workdir: Path, name: str, cfg_dict: dict, resumable, added=None) -> None:
  from siamjax import train
  path = workdir / "config.json"
  if not path.exists() or not _trained(workdir):
    return
  try:
    saved = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    raise train.RunError(f"{path} is unreadable; delete {workdir} or pass another "
                         f"--workdir") from None
  if saved.get("recipe") != name:
    raise train.RunError(f"workdir {workdir} holds a run of {saved.get('recipe')!r}, not "
                         f"{name!r}; pass another --workdir")
  diffs = config_diff(saved.get("config", {}), cfg_dict, resumable, added)
  if diffs:
    raise train.RunError(f"workdir {workdir} holds a run with another config ("
                         f"{'; '.join(diffs)}); pass another --workdir, or delete it to "
                         f"start over")


def main(recipe, argv: list[str] | None = None, *, presets: Mapping[str, Callable] | None = None,
         default_preset: str | Callable[[], str] | None = None, hooks=(),
         description: str | None = None) -> int:
  """Runs ``recipe`` from the command line; returns the exit status (see module docstring).

  Args:
    recipe: a recipe module (``siamjax.recipes.mnist`` ...).
    argv: the arguments (default ``sys.argv[1:]``).
    presets: ``{name: () -> Config}`` (default ``recipe.PRESETS``).
    default_preset: the preset without ``--preset`` (a name, or a function called after
      JAX starts, e.g. to pick by device); default ``"default"``.
    hooks: passed to :func:`siamjax.train.fit` (tests use them to kill a run).
    description: ``--help`` text.
  """
  t0 = time.perf_counter()
  from siamjax import results as results_lib
  load_at_start = results_lib.load_average()
  import siamjax.xla
  # Before JAX starts; only for the recipes the flags were measured to help (siamjax/xla.py).
  if getattr(recipe, "FAST_CPU", False) and siamjax.xla.enable_fast_cpu():
    print(f"set XLA_FLAGS={os.environ['XLA_FLAGS']} (faster CPU convolutions; "
          f"SIAMJAX_NO_XLA_FLAGS=1 to skip)", file=sys.stderr)
  compilation_cache = siamjax.xla.enable_compilation_cache() is not None
  from siamjax import parallel, train
  parallel.initialize_distributed()  # multi-host: before any other JAX call; else no-op
  presets = dict(recipe.PRESETS if presets is None else presets)
  p = argparse.ArgumentParser(description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  if len(presets) > 1:
    p.add_argument("--preset", choices=sorted(presets), default=None,
                   help="a named configuration (default: %s)" % (
                       default_preset if isinstance(default_preset, str) else
                       "chosen by device" if default_preset else "default"))
  p.add_argument("--smoke", action="store_true", help="the smoke preset: seconds, for CI")
  p.add_argument("--workdir", default=None,
                 help=f"checkpoints, metrics.jsonl, plots, results.json (default: "
                      f"runs/{recipe.NAME}_<preset>); re-run a command to resume it")
  p.add_argument("--eval-only", action="store_true",
                 help="evaluate the checkpoints in --workdir again; train nothing")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  for f in dataclasses.fields(recipe.Config):
    flag, help_ = "--" + f.name.replace("_", "-"), f"Config.{f.name} (preset default)"
    if f.name == "preset":
      continue
    if _kind(f) in ("bool", "bool | None"):  # --grayscale / --no-grayscale; None: neither
      p.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                     help=help_)
    else:
      p.add_argument(flag, dest=f.name, default=None, metavar="V", type=_parser_of(f),
                     help=help_)
  args = p.parse_args(argv)
  preset = "smoke" if args.smoke else getattr(args, "preset", None)
  if preset is None:
    preset = (default_preset() if callable(default_preset) else default_preset) or "default"
    if callable(default_preset):
      print(f"no --preset given: chose {preset!r} for this machine's devices",
            file=sys.stderr)
  if preset not in presets:
    p.error(f"{recipe.NAME} has no preset {preset!r} (presets: {', '.join(sorted(presets))})")
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(recipe.Config)
               if f.name != "preset" and getattr(args, f.name) is not None}
  command = results_lib.command_line([sys.argv[0]] + list(
      sys.argv[1:] if argv is None else argv))
  workdir = Path(args.workdir or f"runs/{recipe.NAME}_{preset}")
  try:
    cfg = dataclasses.replace(presets[preset](), **overrides)
    cfg_dict = dataclasses.asdict(cfg)
    with train.lock_workdir(workdir):
      _check_workdir(workdir, recipe.NAME, cfg_dict,
                     ALWAYS_RESUMABLE | getattr(recipe, "RESUMABLE", frozenset()),
                     {f.name: f.default for f in dataclasses.fields(recipe.Config)
                      if f.default is not dataclasses.MISSING})
      done = results_lib.read_results(workdir)
      if (not args.eval_only and done is not None
          and _normal(done.get("config")) == _normal(cfg_dict)):
        print(f"{workdir} holds a finished run of this config (nothing to train; "
              f"--eval-only evaluates it again):", file=sys.stderr)
        print(recipe.summary(done))
        return 0
      results_lib.write_json(workdir / "config.json", {"recipe": recipe.NAME,
                                                       "config": cfg_dict})
      if not args.eval_only:
        print(f"{recipe.NAME} ({preset}) -> {workdir}", file=sys.stderr)
      out = recipe.train_and_evaluate(cfg, workdir, progress=not args.no_progress,
                                      hooks=hooks, eval_only=args.eval_only)
      out = {"recipe": recipe.NAME, "preset": preset, **out,
             "wall_time_s": time.perf_counter() - t0, "config": cfg_dict,
             "fast_cpu_flags": siamjax.xla.fast_cpu_enabled(),
             "compilation_cache": compilation_cache}
      path = results_lib.write_results(workdir, out, command=command,
                                       load_average_at_start=load_at_start)
  except train.Interrupted as e:
    print(str(e), file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:
    print(f"interrupted; re-run the same command to resume from the last checkpoint in "
          f"{workdir}", file=sys.stderr)
    return 130
  except (ValueError, OSError, train.RunError) as e:
    if os.environ.get("SIAMJAX_TRACEBACK"):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(recipe.summary(results_lib.read_results(workdir) or out))
  print(f"-> {path}", file=sys.stderr)
  return 0
