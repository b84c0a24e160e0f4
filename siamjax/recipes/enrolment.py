"""Attendance with one enrolled example per person, on classes the model never saw.

:func:`train_and_evaluate` trains nothing: it loads a finished run
(:func:`siamjax.inference.load`) and measures what an attendance system built on it would
do. Each class is a "person": one example of each "staff" class is enrolled into a
gallery (:class:`siamjax.index.Index`); probes are other examples of the staff classes
and examples of "stranger" classes that were never enrolled. For every probe the gallery
answers its nearest enrolled class; the system accepts that answer when the match is
within a threshold, else says "unknown".

* ``dataset="omniglot"``: the classes are characters of the evaluation alphabets, none of
  them seen in training. The scored group is the 10 alphabets of Lake's runs; the
  calibration group is the other 10 (the validation alphabets). In each alphabet a
  seeded ``staff_fraction`` of the characters are staff, the rest strangers; the staff
  enrol drawer ``enrol_drawer``, and every character's ``probe_drawers`` are the probes.
* ``dataset="mnist"``: the classes are digits, from an ``mnist_triplet`` run. The staff
  are ``staff_digits``, enrolled with the first training image of each; the other digits
  are strangers. The calibration probes are the run's validation images, the scored
  probes the test images (the model saw every digit in training: the strangers are
  unenrolled, not unseen).

The thresholds are calibrated for false-accept rates ``target_fars`` (strangers accepted,
:func:`siamjax.inference.calibrate`'s open-set protocol) on the calibration group only,
then applied once to the scored group, which reports: closed-set identification accuracy
(every staff probe answered, no threshold), and per target the detection-and-identification
rate (staff probes accepted with their right class), the measured false-accept rate and
the strangers' rejection rate, with 95% Wilson intervals; ``dir_far.png`` plots both
groups' detection-and-identification rate against the false-accept rate.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np

from siamjax import inference
from siamjax.evaluation import verification
from siamjax.recipes import cli

__all__ = ["NAME", "Config", "PRESETS", "RESUMABLE", "train_and_evaluate", "summary"]

NAME = "enrolment"
# Embeds with a trained Koch tower by default (a convolutional network, inference): the
# convolutional recipes' setting, siamjax.xla.FAST_CPU_FLAGS (recipes/cli.py).
FAST_CPU = True
RESUMABLE = frozenset()


@dataclasses.dataclass
class Config:
  """Every knob of the protocol."""

  preset: str = "custom"
  dataset: str = "omniglot"  # or "mnist"
  model_workdir: str | None = None  # a finished omniglot_koch (or mnist_triplet) run
  which: str = "best"  # its checkpoint (siamjax.inference.load)
  variant: str | None = None  # mnist_triplet: the mining rule (default: the run's choice)
  seed: int = 0  # which characters are staff
  staff_fraction: float = 0.5  # omniglot: of each alphabet's characters
  enrol_drawer: int = 0  # omniglot: the one drawing enrolled per staff character
  probe_drawers: tuple[int, ...] = tuple(range(1, 20))  # omniglot: the probes
  max_characters: int = 0  # omniglot: at most this many characters per group (0: all)
  staff_digits: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)  # mnist
  target_fars: tuple[float, ...] = (0.01, 0.001)
  data_dir: str | None = None  # default: $SIAMJAX_DATA_DIR


PRESETS = {
    "default": lambda: Config(preset="default"),
    "mnist": lambda: Config(preset="mnist", dataset="mnist"),
    # Seconds: a few characters per group, three probes each.
    "smoke": lambda: Config(preset="smoke", max_characters=24, probe_drawers=(1, 2, 3),
                            target_fars=(0.1,)),
}


def _omniglot_groups(cfg: Config):
  """``{group: (gallery images, gallery labels, probe images, probe labels, about)}``."""
  from siamjax.data import omniglot
  load = dict(data_dir=cfg.data_dir)
  evaluation = omniglot.load_omniglot("evaluation", **load)
  lake = omniglot.lake_alphabets(evaluation, omniglot.load_lake_runs(**load))
  drawers = list(cfg.probe_drawers)
  if cfg.enrol_drawer in drawers or not set(drawers) | {cfg.enrol_drawer} <= set(range(20)):
    raise ValueError(f"enrol_drawer and probe_drawers must be distinct drawers in [0, 20), got "
                     f"{cfg.enrol_drawer} and {tuple(drawers)}")
  rng = np.random.default_rng(cfg.seed)
  groups = {}
  for group, in_group in (("calibration", lambda a: a not in lake), ("scored", lambda a: a in lake)):
    staff, chars = [], []
    alphabets = [a for a in range(len(evaluation.alphabets)) if in_group(a)]
    for a in alphabets:
      ids = np.flatnonzero(evaluation.alphabet_ids == a)
      ids = ids[rng.permutation(ids.size)]
      staff.append(ids[:max(1, int(round(cfg.staff_fraction * ids.size)))])
      chars.append(ids)
    staff, chars = np.concatenate(staff), np.concatenate(chars)
    if cfg.max_characters:
      keep = rng.permutation(chars.size)[:cfg.max_characters]
      chars = chars[np.sort(keep)]
      staff = staff[np.isin(staff, chars)]
    names = np.asarray(evaluation.characters)
    gallery = evaluation.images[staff, cfg.enrol_drawer]
    probes = evaluation.images[chars][:, drawers].reshape((-1,) + gallery.shape[1:])
    about = {"alphabets": [evaluation.alphabets[a] for a in alphabets],
             "characters": int(chars.size), "staff": int(staff.size),
             "strangers": int(chars.size - staff.size)}
    groups[group] = (gallery, names[staff], probes, np.repeat(names[chars], len(drawers)), about)
  return groups


def _mnist_groups(cfg: Config):
  from siamjax.recipes import mnist
  run = json.loads((Path(cfg.model_workdir) / "config.json").read_text())["config"]
  run_cfg = cli.config_from_dict(mnist.TripletConfig, run)
  if cfg.data_dir is not None:
    run_cfg = dataclasses.replace(run_cfg, data_dir=cfg.data_dir)
  d = mnist.load_data(run_cfg)
  if d.x_val is None:
    raise ValueError("model_workdir: the run kept no validation images to calibrate on "
                     "(val_fraction 0)")
  staff = sorted(set(int(v) for v in cfg.staff_digits))
  if not staff or not set(staff) < set(range(10)):
    raise ValueError(f"staff_digits must be some, not all, of the digits 0-9, got "
                     f"{cfg.staff_digits}")
  first = [int(np.flatnonzero(d.y_train == digit)[0]) for digit in staff]
  gallery, labels = d.x_train[first], np.asarray([str(v) for v in staff])
  groups = {}
  for group, x, y in (("calibration", d.x_val, d.y_val), ("scored", d.x_test, d.y_test)):
    about = {"probes_from": "validation images" if group == "calibration" else "test images",
             "staff_digits": staff, "stranger_digits": sorted(set(range(10)) - set(staff))}
    groups[group] = (gallery, labels, x, np.asarray([str(v) for v in y]), about)
  return groups


def _plot(path: Path, curves: dict, marks: list, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.6, 3.8))
  for (label, (far, dir_)), style in zip(curves.items(), ("-", "--")):
    ax.plot(np.maximum(far, 1e-4), dir_, style, label=label)
  for far, dir_, name in marks:
    ax.plot(max(far, 1e-4), dir_, "o", color="black")
    ax.annotate(name, (max(far, 1e-4), dir_), textcoords="offset points", xytext=(5, -10),
                fontsize=8)
  ax.set(xscale="log", xlim=(1e-4, 1), ylim=(0, 1), xlabel="false-accept rate (strangers "
         "accepted)", ylabel="detection and identification rate", title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def train_and_evaluate(cfg: Config, workdir, *, progress: bool = True, hooks=(),
                       eval_only: bool = False) -> dict:
  """Enrols, calibrates on the calibration group, scores the scored group (see module)."""
  del hooks, eval_only  # nothing is trained
  t0 = time.perf_counter()
  if not cfg.model_workdir:
    raise ValueError("model_workdir: pass --model-workdir W, a finished "
                     + ("omniglot_koch" if cfg.dataset == "omniglot" else "mnist_triplet")
                     + " run")
  want = {"omniglot": ("omniglot_koch",), "mnist": ("mnist_triplet",)}.get(cfg.dataset)
  if want is None:
    raise ValueError(f"dataset must be 'omniglot' or 'mnist', got {cfg.dataset!r}")
  if any(not 0 < f < 1 for f in cfg.target_fars) or not 0 < cfg.staff_fraction < 1:
    raise ValueError(f"target_fars and staff_fraction must be in (0, 1), got "
                     f"{cfg.target_fars} and {cfg.staff_fraction}")
  model = inference.load(cfg.model_workdir, which=cfg.which, variant=cfg.variant)
  if model.recipe not in want:
    raise ValueError(f"model_workdir holds a {model.recipe} run; the {cfg.dataset} protocol "
                     f"needs a {' or '.join(want)} run")
  groups = _omniglot_groups(cfg) if cfg.dataset == "omniglot" else _mnist_groups(cfg)
  outcomes, about = {}, {}
  for group, (gallery, labels, probes, probe_labels, info) in groups.items():
    index = model.enroll(gallery, labels, progress=progress)
    emb = model.embed(probes, progress=progress)
    outcomes[group] = inference.open_set_outcomes(model, index, emb, probe_labels)
    about[group] = {**info, "gallery": len(index), "probes": int(len(probe_labels)),
                    "enrolled_probes": int((~outcomes[group][2]).sum()),
                    "stranger_probes": int(outcomes[group][2].sum())}
  targets = [{"far": float(f)} for f in cfg.target_fars]
  calibration = inference.choose_thresholds(model, outcomes["calibration"], targets,
                                            protocol="open_set")
  points = {g: verification.operating_points(*o) for g, o in outcomes.items()}
  scored = points["scored"]
  closed = inference.operating_record(model, scored, len(scored["thresholds"]) - 1)
  at = {}
  for name, rec in calibration.items():
    r = inference.operating_record(model, scored, verification.point_at(
        scored, rec["score_threshold"]))
    at[name] = {"threshold": rec["threshold"], "calibration_far": rec["far"],
                "calibration_dir": rec["recall"],
                "dir": r["recall"], "dir_ci95": r["recall_ci95"], "far": r["far"],
                "far_ci95": r["far_ci95"], "stranger_rejection": 1.0 - r["far"],
                "stranger_rejection_ci95": [1.0 - r["far_ci95"][1], 1.0 - r["far_ci95"][0]],
                "precision": r["precision"], "precision_ci95": r["precision_ci95"]}
  plots = []
  if jax.process_index() == 0:
    curves = {}
    for group, p in points.items():
      c = verification.operating_curves(p)
      curves[f"{group} ({about[group]['gallery']} enrolled)"] = (c["far"], c["recall"])
    marks = [(r["far"], r["dir"], name) for name, r in at.items()]
    try:
      _plot(Path(workdir) / "dir_far.png", curves, marks,
            f"{cfg.dataset}: one enrolled example per class")
      plots.append("dir_far.png")
    except ImportError:
      pass
  return {"dataset": cfg.dataset, "model": model.describe() | {"thresholds": None},
          "closed_set_accuracy": closed["recall"], "closed_set_ci95": closed["recall_ci95"],
          "at_far": at, "calibration": calibration, "groups": about,
          "protocol": ("one enrolled example per staff class; probes: the staff classes' "
                       "other examples and never-enrolled stranger classes; thresholds for "
                       "the false-accept rates (strangers accepted) chosen on the calibration "
                       "group, applied once to the scored group"),
          "session_time_s": time.perf_counter() - t0, "plots": plots,
          "device": str(jax.devices()[0])}


def summary(results: dict) -> str:
  """One line: closed-set accuracy, and per target the DIR and measured FAR."""
  return json.dumps({
      "preset": results.get("preset"), "dataset": results["dataset"],
      "closed_set_accuracy": round(results["closed_set_accuracy"], 4),
      "at_far": {k: {"dir": round(v["dir"], 4), "far": round(v["far"], 4)}
                 for k, v in results["at_far"].items()},
      "wall_time_s": round(results.get("wall_time_s") or 0.0, 1)})
