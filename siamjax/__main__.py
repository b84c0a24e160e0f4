"""``python -m siamjax``: use a trained model from the shell.

    python -m siamjax enroll    --workdir W --gallery DIR --index I [--add] [--per-class N]
    python -m siamjax calibrate --workdir W --data DIR --target far=0.001 [--target eer]
                                [--index I]          # open-set: DIR's unenrolled classes
                                                     # are strangers
    python -m siamjax calibrate --workdir W --pairs FILE --target eer
    python -m siamjax identify  --index I ITEM [ITEM ...] [--threshold NAME|VALUE]
    python -m siamjax verify    --workdir W A B [A B ...] | --pairs FILE
    python -m siamjax export    --workdir W --out DIR

``W`` is a work directory of any ``experiments/`` script (:func:`siamjax.inference.load`;
``--variant`` and ``--which`` choose among its models and checkpoints). ``DIR`` holds one
folder per class (the class is the folder's name) of files: images for image models,
UTF-8 text files (one text per line) for text models, CSV or ``.npy`` files (one vector
per row) for vector models. ``ITEM``, ``A``, ``B`` are such files. An index remembers the
work directory that built it; ``identify`` loads that model and refuses an index built by
another.

Results are JSON lines on standard output; a progress bar goes to standard error when it
is a terminal. Bad input is one line, ``error: ...``, and exit status 2; nothing already
saved is changed by a command that fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

__all__ = ["main"]

SOURCE_FILE = "siamjax_model.json"  # inside an index folder: the model that built it


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m siamjax", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
  sub = p.add_subparsers(dest="command", required=True)

  def model_args(q, required=True):
    q.add_argument("--workdir", required=required, help="a trained work directory")
    q.add_argument("--which", choices=("best", "latest"), default=None,
                   help="the checkpoint (default: best, the one the recipe evaluated)")
    q.add_argument("--variant", default=None,
                   help="which model of a work directory that holds several")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")

  q = sub.add_parser("enroll", help="embed a gallery of labelled items into an index")
  model_args(q)
  q.add_argument("--gallery", required=True, help="a folder of class folders of items")
  q.add_argument("--index", required=True, help="the index folder to write")
  q.add_argument("--add", action="store_true", help="add to an existing index")
  q.add_argument("--per-class", type=int, default=0, metavar="N",
                 help="enrol only the first N files of each class folder (0: all)")

  q = sub.add_parser("calibrate", help="choose thresholds on labelled data")
  model_args(q)
  group = q.add_mutually_exclusive_group(required=True)
  group.add_argument("--data", help="a folder of class folders of items")
  group.add_argument("--pairs", help="a CSV of labelled pairs (a,b,same)")
  q.add_argument("--target", action="append", required=True,
                 help="far=X, precision=X, eer or best_accuracy (repeatable)")
  q.add_argument("--index", default=None,
                 help="calibrate open-set identification against this gallery")

  q = sub.add_parser("identify", help="the gallery label of each item, or unknown")
  model_args(q, required=False)
  q.add_argument("--index", required=True, help="an index written by enroll")
  q.add_argument("--threshold", default=None,
                 help="a calibrated threshold's name, or a value in the model's units "
                      "(default: the last one calibrated)")
  q.add_argument("items", nargs="+", help="files of items to identify")

  q = sub.add_parser("verify", help="same or different, for pairs of items")
  model_args(q)
  q.add_argument("--threshold", default=None, help="as for identify")
  q.add_argument("--pairs", default=None, help="a CSV of pairs (a,b[,same])")
  q.add_argument("items", nargs="*", help="files A B [A B ...] (one item each)")

  q = sub.add_parser("export", help="write jax.export artefacts that run without siamjax")
  model_args(q)
  q.add_argument("--out", required=True, help="the folder to write")
  return p


def _emit(record: dict) -> None:
  print(json.dumps(record, ensure_ascii=False), flush=True)


def _number(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


def _load(args, workdir=None, variant=None, which=None):
  from siamjax import inference
  return inference.load(workdir or args.workdir, which=which or args.which or "best",
                        variant=variant if variant is not None else args.variant)


def _classes(folder: str, kind: str, per_class: int = 0) -> tuple[list, list[str], list[str]]:
  """``(items, labels, names)`` of a folder of class folders of item files (the first
  ``per_class`` files of each, sorted by name; 0: all)."""
  from siamjax import inference
  root = Path(folder)
  if not root.is_dir():
    raise ValueError(f"{root} is not a folder")
  classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
  if not classes:
    raise ValueError(f"{root} holds no class folders (expected {root}/<class>/<files>)")
  items, labels, names = [], [], []
  for d in classes:
    files = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
      raise ValueError(f"class folder {d} holds no files")
    files = files[:per_class or None]
    got, where = inference.read_items(files, kind)
    if not got:
      raise ValueError(f"class folder {d} holds no items")
    items += got
    labels += [d.name] * len(got)
    names += [str(Path(w).relative_to(root)) if ":" not in Path(w).name else w for w in where]
  return items, labels, names


def _prepare(model, items, progress: bool, chunk: int = 256):
  """``model.preprocess`` over ``items`` in chunks, with a progress bar."""
  import numpy as np
  from siamjax import _progress
  if model.inputs.kind == "vectors":
    return model.preprocess(np.stack(items))
  starts = range(0, len(items), chunk)
  bar = _progress.bar(len(items), "read", "item") if progress and len(starts) > 1 else None
  out = []
  for s in starts:
    out.append(model.preprocess(items[s:s + chunk]))
    if bar is not None:
      bar.update(min(chunk, len(items) - s))
  if bar is not None:
    bar.close()
  return np.concatenate(out)


def _source(index_dir: Path) -> dict:
  path = index_dir / SOURCE_FILE
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    raise ValueError(f"{index_dir} is not an index written by python -m siamjax enroll (no "
                     f"readable {SOURCE_FILE}); pass --workdir to name its model") from None


def _enroll(args) -> None:
  from siamjax import index as index_lib
  from siamjax import results
  model = _load(args)
  progress = not args.no_progress
  out = Path(args.index)
  if out.exists() and not args.add:
    raise ValueError(f"{out} exists; pass --add to add to it, or another --index")
  if args.per_class < 0:
    raise ValueError(f"--per-class must be >= 0, got {args.per_class}")
  items, labels, names = _classes(args.gallery, model.inputs.kind, args.per_class)
  x = _prepare(model, items, progress)
  if args.add and out.exists():
    index = index_lib.Index.load(out, fingerprint=model.fingerprint)
    index = index.add(model.embed(x, progress=progress), labels, names)
  else:
    index = model.enroll(x, labels, names, progress=progress)
  index.save(out)
  results.write_json(out / SOURCE_FILE, {"workdir": str(model.workdir.resolve()),
                                         "variant": model.variant, "which": model.checkpoint,
                                         "fingerprint": model.fingerprint})
  _emit({"index": str(out), "items": len(index), "classes": len(index.label_names),
         "added": len(items), "model": repr(model), "metric": model.metric.kind})


def _calibrate(args) -> None:
  from siamjax import inference
  from siamjax import index as index_lib
  model = _load(args)
  progress = not args.no_progress
  if args.pairs:
    a, b, same = model.read_pairs(args.pairs)
    if same is None:
      raise ValueError(f"{args.pairs}: calibration needs labelled pairs (a,b,same)")
    out = inference.calibrate(model, pairs=(a, b, same), target=args.target, progress=progress)
  else:
    items, labels, _ = _classes(args.data, model.inputs.kind)
    index = (None if args.index is None else
             index_lib.Index.load(args.index, fingerprint=model.fingerprint))
    out = inference.calibrate(model, _prepare(model, items, progress), labels,
                              target=args.target, index=index, progress=progress)
  for name, rec in out.items():
    _emit({"name": name, **{k: _number(v) if isinstance(v, float) else v
                            for k, v in rec.items() if k != "order"},
           "saved": str(model.workdir / inference.CALIBRATION_FILE)})


def _identify(args) -> None:
  from siamjax import index as index_lib
  from siamjax import inference
  where = Path(args.index)
  source = {} if args.workdir else _source(where)
  model = _load(args, source.get("workdir"), source.get("variant"), source.get("which"))
  index = index_lib.Index.load(where, fingerprint=model.fingerprint)
  threshold = _threshold_arg(args.threshold)
  items, names = inference.read_items(args.items, model.inputs.kind)
  r = inference.identify(model, index, _prepare(model, items, not args.no_progress),
                         threshold=threshold, progress=not args.no_progress)
  for i, name in enumerate(names):
    _emit({"input": name, "label": r.label[i], "nearest": r.nearest[i], "id": r.id[i],
           model.units: _number(r.score[i]), "accepted": bool(r.accepted[i]),
           "threshold": r.threshold})


def _threshold_arg(text):
  if text is None:
    return None
  try:
    return float(text)
  except ValueError:
    return text


def _verify(args) -> None:
  from siamjax import inference
  model = _load(args)
  threshold = _threshold_arg(args.threshold)
  if args.pairs:
    if args.items:
      raise ValueError("pass --pairs FILE or files A B [A B ...], not both")
    a, b, _ = model.read_pairs(args.pairs)
    names = [f"{args.pairs}:{i}" for i in range(1, a.shape[0] + 1)]
    pairs = [(n, n) for n in names]
  else:
    if not args.items or len(args.items) % 2:
      raise ValueError(f"verify needs pairs of files A B [A B ...] or --pairs FILE, got "
                       f"{len(args.items)} file(s)")
    items, names = inference.read_items(args.items, model.inputs.kind)
    if len(items) != len(args.items):
      raise ValueError("verify compares files of one item each; use --pairs for files of "
                       "several items")
    x = model.preprocess(items)
    a, b = x[0::2], x[1::2]
    pairs = list(zip(names[0::2], names[1::2]))
  r = inference.verify(model, a, b, threshold=threshold)
  for (na, nb), same, score in zip(pairs, r.same, r.score):
    _emit({"a": na, "b": nb, "same": bool(same), model.units: _number(score),
           "threshold": r.threshold})


def _export(args) -> None:
  from siamjax import export
  model = _load(args)
  path = export.export_model(model, args.out)
  _emit({"out": str(path.parent), "files": sorted(p.name for p in path.parent.iterdir()
                                                  if not p.name.startswith(".")),
         "model": repr(model), "thresholds": sorted(model.thresholds)})


def main(argv: list[str] | None = None) -> int:
  """Runs the command line; returns the exit status (0, or 2 for bad input)."""
  args = _parser().parse_args(argv)
  from siamjax import xla
  xla.enable_compilation_cache()  # each command on the same model compiles it once
  from siamjax import train
  try:
    {"enroll": _enroll, "calibrate": _calibrate, "identify": _identify, "verify": _verify,
     "export": _export}[args.command](args)
  except (ValueError, OSError, train.RunError) as e:
    if os.environ.get("SIAMJAX_TRACEBACK"):
      raise
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
