"""Plots and picture sheets that the recipes write beside their results (PNG files).

* :func:`save_roc_png`: ROC curves with their AUC and EER;
* :func:`contact_sheet`: pairs side by side with a caption (e.g. the hardest mistakes of
  :func:`siamjax.evaluation.verification.hardest_mistakes`);
* :func:`save_confusion_png`: a row-normalised confusion matrix;
* :func:`save_training_png`: training loss and validation accuracy of one run;
* :func:`save_oneshot_task_png`: one N-way one-shot task with the prediction marked;
* :func:`save_learning_curves_png`: validation accuracy and loss of several runs.

matplotlib draws with its Agg backend (no display needed) and Pillow draws the sheets.
"""

from __future__ import annotations

import os

import numpy as np

from siamjax.evaluation import verification as _verification

__all__ = ["save_roc_png", "contact_sheet", "save_confusion_png", "save_training_png",
           "save_oneshot_task_png", "save_learning_curves_png"]


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_roc_png(path: str | os.PathLike, curves: dict, *, title: str = "ROC") -> None:
  """Writes ROC curves to a small PNG (matplotlib, Agg backend).

  Args:
    path: the ``.png`` file to write.
    curves: ``label -> (distance [P], similar [P])``; each curve's legend shows its AUC
      and EER, and its EER point is marked.
    title: the figure title.
  """
  plt = _pyplot()

  if not curves:
    raise ValueError("curves must name at least one (distance, similar) pair")
  fig, ax = plt.subplots(figsize=(4.5, 4.0), dpi=90)
  for label, (dist, similar) in curves.items():
    far, tar, thresholds = _verification.roc_curve(-np.asarray(dist, np.float64), similar)
    eer, _ = _verification.equal_error_rate(far, tar, thresholds)
    area = _verification.auc(far, tar)
    ax.plot(far, tar, lw=1.5, label=f"{label} (AUC {area:.4f}, EER {eer:.3f})")
    ax.plot([eer], [1.0 - eer], "o", ms=4, color=ax.lines[-1].get_color())
  ax.plot([0, 1], [1, 0], ":", lw=0.8, color="grey")
  ax.set_xlabel("false-accept rate")
  ax.set_ylabel("true-accept rate")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_title(title)
  ax.legend(loc="lower right", fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def contact_sheet(path: str | os.PathLike, images: np.ndarray, pairs, similar, p_same, *,
                  class_names: list[str] | None = None, labels: np.ndarray | None = None,
                  max_pairs: int = 12, cell: int = 64) -> int:
  """Writes a PNG of pairs, one row each: the two images and a caption (Pillow).

  Args:
    path: the PNG to write.
    images: ``[N, H, W, C]`` uint8 images (``C`` 1 or 3).
    pairs: ``[K, 2]`` positions into ``images``, e.g. ``pairs[hardest_mistakes(...)]``.
    similar: ``[K]`` 0/1 labels.
    p_same: ``[K]`` the model's probability that each pair shows one class.
    class_names, labels: caption each image with ``class_names[labels[position]]``.
    max_pairs: rows drawn (the first ones).
    cell: pixel size of each image on the sheet.

  Returns:
    The number of pairs drawn (a sheet without pairs says "no mistakes").
  """
  from PIL import Image, ImageDraw  # Pillow: optional, only needed for the sheet

  pairs = np.asarray(pairs).reshape(-1, 2)[:max_pairs]
  similar, p_same = np.asarray(similar)[:max_pairs], np.asarray(p_same)[:max_pairs]
  if not similar.shape == p_same.shape == pairs.shape[:1]:
    raise ValueError(f"pairs, similar and p_same must describe the same pairs, got "
                     f"{pairs.shape}, {similar.shape} and {p_same.shape}")
  named = class_names is not None and labels is not None
  text_w = 190
  sheet = Image.new("RGB", (2 * cell + text_w, max(1, len(pairs)) * cell), "white")
  draw = ImageDraw.Draw(sheet)
  if not len(pairs):
    draw.text((4, 4), "no mistakes", fill="black")
  for r, ((i, j), same, p) in enumerate(zip(pairs, similar, p_same)):  # <= max_pairs rows
    for k, idx in enumerate((i, j)):
      im = np.asarray(images[idx])
      im = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("RGB")
      sheet.paste(im.resize((cell, cell)), (k * cell, r * cell))
    names = (f"\n{class_names[labels[i]][:14]} | {class_names[labels[j]][:14]}" if named
             else "")
    draw.text((2 * cell + 6, r * cell + 6),
              f"{'same' if same else 'different'}, p(same)={float(p):.2f}{names}", fill="black")
  sheet.save(path)
  return len(pairs)


def save_confusion_png(confusion, class_names, path, *, title: str = "") -> None:
  """Writes a row-normalised confusion matrix (rows = true class) as a PNG."""
  plt = _pyplot()

  confusion = np.asarray(confusion, np.float64)
  rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1.0)
  fig, ax = plt.subplots(figsize=(8, 7))
  im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
  ax.set_xticks(np.arange(len(class_names)), class_names, rotation=60, ha="right")
  ax.set_yticks(np.arange(len(class_names)), class_names)
  for i, j in zip(*np.nonzero(rates >= 0.005)):
    ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=7,
            color="white" if rates[i, j] > 0.5 else "black")
  ax.set(xlabel="predicted class", ylabel="true class", title=title)
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def save_training_png(path: str | os.PathLike, train_records: list[dict], history: list[dict],
                      *, title: str = "", metric: str = "val_accuracy",
                      metric_label: str = "validation 20-way accuracy") -> None:
  """Training loss (log scale) and a validation metric against the step, side by side.

  Args:
    path: the PNG to write.
    train_records: ``{"step", "loss"}`` records, e.g.
      ``siamjax.train.read_metrics(workdir, kind="train")``.
    history: ``{"step", metric}`` validation records (``fit``'s history).
    title: the figure title.
    metric, metric_label: the validation value to plot and its axis label.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
  ax[0].plot([r["step"] for r in train_records], [r["loss"] for r in train_records])
  ax[0].set(xlabel="step", ylabel="training loss", yscale="log")
  ax[1].plot([h["step"] for h in history], [h[metric] for h in history], "o-")
  ax[1].set(xlabel="step", ylabel=metric_label, ylim=(0, 1))
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def save_oneshot_task_png(path: str | os.PathLike, query: np.ndarray, support: np.ndarray,
                          predicted: int, answer: int, *, title: str = "") -> None:
  """One N-way one-shot task: the query, then the N candidates, the prediction and answer marked.

  Args:
    path: the PNG to write.
    query: ``[H, W]`` uint8 image (dark strokes on light are drawn inverted).
    support: ``[N, H, W]`` uint8 candidate images (``N = 20`` for Lake's runs).
    predicted, answer: the candidate the model chose and the right one.
    title: the figure title.
  """
  plt = _pyplot()
  n = len(support)
  cols = (n + 1) // 2
  fig, axes = plt.subplots(2, cols + 1, figsize=(cols + 1, 2.4))
  axes[0, 0].imshow(255 - query, cmap="gray")
  axes[0, 0].set_title("query", fontsize=7)
  for j in range(n):
    a = axes[(j // cols), 1 + j % cols]
    a.imshow(255 - support[j], cmap="gray")
    mark = ("pred" if j == predicted else "") + (" true" if j == answer else "")
    a.set_title(mark.strip(), fontsize=7, color="green" if j == answer else "red")
  for a in axes.ravel():
    a.set_xticks([]), a.set_yticks([])
  axes[1, 0].axis("off")
  fig.suptitle(title, fontsize=8)
  fig.savefig(path, dpi=70)
  plt.close(fig)


def save_learning_curves_png(runs: list[dict], png: str | os.PathLike, *,
                             x: str = "pairs_seen", xlabel: str = "training pairs seen",
                             loss_label: str = "training pair BCE",
                             title: str = "Koch net (38.9M parameters), 105x105, pair BCE, "
                                          "CPU; chance 0.05") -> None:
  """Validation accuracy and training loss against training progress, one line per run.

  Args:
    runs: each ``{"name", "validation": [{x, "val_accuracy"}], "train_loss": [{x,
      "loss"}]}``.
    png: the PNG to write.
    x: the progress key of the records (``"pairs_seen"``, ``"step"``).
    xlabel, loss_label, title: the axes' and the figure's labels.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
  for r in runs:
    ax[0].plot([v[x] for v in r["validation"]],
               [v["val_accuracy"] for v in r["validation"]], "o-", ms=3, label=r["name"])
    ax[1].plot([v[x] for v in r["train_loss"]], [v["loss"] for v in r["train_loss"]],
               label=r["name"])
  ax[0].axhline(0.05, color="grey", lw=0.8, ls=":")
  ax[0].set(xlabel=xlabel, ylabel="validation 20-way accuracy", ylim=(0, 1))
  ax[1].set(xlabel=xlabel, ylabel=loss_label)
  ax[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(png, dpi=90)
  plt.close(fig)
