"""A faithful PyTorch reference of the Koch et al. (2015) Siamese network.

Same layers, shapes and initialisation as :func:`siamjax.models.koch_siamese`
(38,951,745 parameters): ``conv 64@10 -> pool -> conv 128@7 -> pool -> conv 128@4 ->
pool -> conv 256@4 -> flatten -> dense 4096, sigmoid`` per tower, one shared tower for
both inputs run as one ``2B`` batch, and the weighted-L1 head ``sum_j a_j |h1_j - h2_j|
+ b`` (a logit). Flatten order is NHWC like the Flax model, so with
:func:`load_flax_params` both give the same logits.

Used only by ``benchmarks/pairs_per_sec.py``; needs ``torch`` (the ``bench`` extra).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class KochTower(nn.Module):
  """One tower: ``[B, 1, 105, 105] -> [B, 4096]`` in (0, 1)."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(1, 64, 10)
    self.conv2 = nn.Conv2d(64, 128, 7)
    self.conv3 = nn.Conv2d(128, 128, 4)
    self.conv4 = nn.Conv2d(128, 256, 4)
    self.dense = nn.Linear(9216, 4096)
    for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
      nn.init.normal_(conv.weight, 0.0, 1e-2)
      nn.init.normal_(conv.bias, 0.5, 1e-2)
    nn.init.normal_(self.dense.weight, 0.0, 2e-1)
    nn.init.normal_(self.dense.bias, 0.5, 1e-2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    pool = nn.functional.max_pool2d
    relu = nn.functional.relu
    x = pool(relu(self.conv1(x)), 2)
    x = pool(relu(self.conv2(x)), 2)
    x = pool(relu(self.conv3(x)), 2)
    x = relu(self.conv4(x))
    x = x.permute(0, 2, 3, 1).flatten(1)  # NHWC flatten order, as in Flax
    return torch.sigmoid(self.dense(x))


class KochSiamese(nn.Module):
  """Shared tower + weighted-L1 head; ``forward(x1, x2) -> [B]`` logits."""

  def __init__(self):
    super().__init__()
    self.tower = KochTower()
    self.head = nn.Linear(4096, 1)
    nn.init.normal_(self.head.weight, 0.0, 2e-1)
    nn.init.normal_(self.head.bias, 0.5, 1e-2)

  def embed(self, x: torch.Tensor) -> torch.Tensor:
    return self.tower(x)

  def score(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    return self.head((h1 - h2).abs()).squeeze(-1)

  def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    b = x1.shape[0]
    h = self.tower(torch.cat([x1, x2], 0))  # one 2B batch, as siamjax
    return self.score(h[:b], h[b:])


def num_params(model: nn.Module) -> int:
  """Total number of parameters of ``model``."""
  return sum(p.numel() for p in model.parameters())


def load_flax_params(model: KochSiamese, params) -> KochSiamese:
  """Copies a ``koch_siamese()`` parameter tree into ``model`` (for equivalence tests)."""
  p = params["params"]
  enc = p["encoder"]
  with torch.no_grad():
    for name in ("conv1", "conv2", "conv3", "conv4"):
      conv = getattr(model.tower, name)
      kernel = np.array(enc[name]["kernel"]).transpose(3, 2, 0, 1)
      conv.weight.copy_(torch.from_numpy(kernel.copy()))
      conv.bias.copy_(torch.from_numpy(np.array(enc[name]["bias"])))
    model.tower.dense.weight.copy_(torch.from_numpy(np.array(enc["dense"]["kernel"]).T.copy()))
    model.tower.dense.bias.copy_(torch.from_numpy(np.array(enc["dense"]["bias"])))
    model.head.weight.copy_(torch.from_numpy(np.array(p["head"]["kernel"]).T.copy()))
    model.head.bias.copy_(torch.from_numpy(np.array(p["head"]["bias"])))
  return model
