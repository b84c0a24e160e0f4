"""In-batch losses against pytorch-metric-learning (PML 2.9) and a dense naive reference.

Every in-batch loss, with and without a reference set (PML's ``ref_emb``), on several seeds
with irregular label counts and singleton classes; values and gradients; float32 and
float64. PML's per-pair/per-triplet losses come back unreduced (``DoNothingReducer``) and
are averaged per anchor here, which is siamjax's reduction. Conventions: PML's default
``LpDistance`` normalizes, so the Euclidean cases use ``LpDistance(normalize_embeddings=
False)`` (``power=2`` for ``squared_euclidean``); with cosine, siamjax's margins apply to
``d = 1 - cos``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from siamjax import distances as D
from siamjax import losses as L

pml = pytest.importorskip("pytorch_metric_learning")
torch = pytest.importorskip("torch")
from pytorch_metric_learning import distances as pd  # noqa: E402
from pytorch_metric_learning import losses as pl  # noqa: E402
from pytorch_metric_learning import miners as pm  # noqa: E402
from pytorch_metric_learning import reducers as pr  # noqa: E402

# irregular class sizes with singletons (classes 3 and 5 have one member each)
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4, 5, 1])
REF_LABELS = np.array([0, 1, 1, 2, 4, 6, 6, 0, 2, 1])  # class 3 absent, class 6 ref-only


def _data(seed, dtype):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(len(LABELS), 5)).astype(dtype)
  ref = rng.normal(size=(len(REF_LABELS), 5)).astype(dtype)
  return emb, ref


# -------------------------------------------------------------------------------------
# PML side: per-anchor values as torch tensors (so the gradient comes from autograd)
# -------------------------------------------------------------------------------------


def _pml_distance(distance):
  if distance == "cosine":
    return pd.CosineSimilarity()
  return pd.LpDistance(normalize_embeddings=False, p=2,
                       power=2 if distance == "squared_euclidean" else 1)


def _per_anchor(values, anchors, n):
  total = torch.zeros(n, dtype=values.dtype).index_add(0, anchors, values)
  count = torch.zeros(n, dtype=values.dtype).index_add(0, anchors, torch.ones_like(values))
  return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _pml_loss(name, kw, distance, e, lab, ref, ref_lab):
  """PML's value for each anchor of ``e`` (a torch tensor of shape [B])."""
  return _pml_loss_raw(name, kw, distance, e, lab, ref, ref_lab).reshape(-1)


def _pml_loss_raw(name, kw, distance, e, lab, ref, ref_lab):
  n = e.shape[0]
  refs = {} if ref is None else {"ref_emb": ref, "ref_labels": ref_lab}
  dist = _pml_distance(distance)
  nothing = pr.DoNothingReducer()
  if name == "batch_all":
    fn = pl.TripletMarginLoss(margin=kw["margin"], distance=dist, reducer=nothing)
    out = fn(e, lab, **refs)["loss"]
    return _per_anchor(out["losses"], out["indices"][0], n)
  if name == "batch_hard":
    miner = pm.BatchHardMiner(distance=dist)
    trip = miner(e, lab, **refs)
    margin = 0.0 if kw.get("soft") else kw["margin"]
    fn = pl.TripletMarginLoss(margin=margin, distance=dist, reducer=nothing,
                              smooth_loss=kw.get("soft", False))
    out = fn(e, lab, indices_tuple=trip, **refs)["loss"]
    return _per_anchor(out["losses"], out["indices"][0], n)
  if name == "all_pairs":
    fn = pl.ContrastiveLoss(pos_margin=0.0, neg_margin=kw["margin"], distance=dist,
                            reducer=nothing)
    out = fn(e, lab, **refs)
    # PML's pair terms are d and relu(m - d); siamjax's are their halved squares
    vals = torch.cat([0.5 * out["pos_loss"]["losses"] ** 2, 0.5 * out["neg_loss"]["losses"] ** 2])
    anchors = torch.cat([out["pos_loss"]["indices"][0], out["neg_loss"]["indices"][0]])
    return _per_anchor(vals, anchors, n)
  if name == "ntxent":
    fn = pl.NTXentLoss(temperature=kw["temperature"], reducer=nothing)
    out = fn(e, lab, **refs)["loss"]
    return _per_anchor(out["losses"], out["indices"][0], n)
  if name == "softmax":  # SupCon on negative distances is the in-batch softmax
    fn = pl.SupConLoss(temperature=kw["temperature"], distance=dist, reducer=nothing)
    return fn(e, lab, **refs)["loss"]["losses"]
  if name == "multi_similarity":
    fn = pl.MultiSimilarityLoss(distance=dist, reducer=nothing, **kw)
    return fn(e, lab, **refs)["loss"]["losses"]
  if name == "circle":
    fn = pl.CircleLoss(m=kw["margin"], gamma=kw["gamma"], reducer=nothing)
    return fn(e, lab, **refs)["loss"]["losses"]
  if name == "lifted":
    pos_m, neg_m = kw["pos_margin"], kw["neg_margin"]
    if distance == "cosine":  # PML's margins act on the similarity: move them to 1 - cos
      pos_m, neg_m = 1.0 - pos_m, 1.0 - neg_m
    fn = pl.GeneralizedLiftedStructureLoss(neg_margin=neg_m, pos_margin=pos_m, distance=dist,
                                           reducer=nothing)
    return fn(e, lab, **refs)["loss"]["losses"]
  raise AssertionError(name)


# -------------------------------------------------------------------------------------
# Naive side: dense [A, R] masks, every pair/triplet explicit
# -------------------------------------------------------------------------------------

DIST = {"euclidean": D.euclidean, "squared_euclidean": D.squared_euclidean,
        "cosine": D.cosine_distance}


def _lse(x, mask):
  """logsumexp over the mask; 0 for an empty row."""
  m = jnp.any(mask, axis=1)
  v = jax.nn.logsumexp(jnp.where(mask, x, -jnp.inf), axis=1)
  return jnp.where(m, v, 0.0)


def _naive(name, kw, distance, emb, labels, ref, ref_labels):
  if ref is None:
    ref, ref_labels, not_self = emb, labels, ~jnp.eye(emb.shape[0], dtype=bool)
  else:
    not_self = jnp.ones((emb.shape[0], ref.shape[0]), dtype=bool)
  d = DIST[distance](emb[:, None, :], ref[None, :, :])
  same = labels[:, None] == ref_labels[None, :]
  pos, neg = same & not_self, ~same & not_self

  def mean_over(mask, vals, axes):
    count = jnp.sum(mask, axis=axes)
    return jnp.where(count > 0, jnp.sum(jnp.where(mask, vals, 0.0), axis=axes)
                     / jnp.maximum(count, 1), 0.0)

  if name == "batch_all":
    t = jnp.maximum(d[:, :, None] - d[:, None, :] + kw["margin"], 0.0)
    return mean_over(pos[:, :, None] & neg[:, None, :], t, (1, 2))
  if name == "batch_hard":
    ok = jnp.any(pos, 1) & jnp.any(neg, 1)
    gap = jnp.max(jnp.where(pos, d, -jnp.inf), 1) - jnp.min(jnp.where(neg, d, jnp.inf), 1)
    gap = jnp.where(ok, gap, 0.0)
    per = jax.nn.softplus(gap) if kw.get("soft") else jnp.maximum(gap + kw["margin"], 0.0)
    return jnp.where(ok, per, 0.0)
  if name == "semi_hard":
    d_ap, d_an = d[:, :, None], d[:, None, :]
    semi = neg[:, None, :] & (d_an > d_ap)
    closest = jnp.min(jnp.where(semi, d_an, jnp.inf), axis=2)
    farthest = jnp.max(jnp.where(neg, d, -jnp.inf), axis=1)[:, None]
    chosen = jnp.where(jnp.any(semi, axis=2), closest, farthest)
    ok = pos & jnp.any(neg, axis=1)[:, None]
    return mean_over(ok, jnp.maximum(d - jnp.where(ok, chosen, 0.0) + kw["margin"], 0.0), 1)
  if name == "all_pairs":
    per = jnp.where(pos, 0.5 * d**2, 0.5 * jnp.maximum(kw["margin"] - d, 0.0) ** 2)
    return mean_over(pos | neg, per, 1)
  if name == "ntxent":
    s = (1.0 - d) / kw["temperature"]
    neg_sum = jnp.sum(jnp.where(neg, jnp.exp(s), 0.0), axis=1, keepdims=True)
    return mean_over(pos, -s + jnp.log(jnp.exp(s) + neg_sum), 1)
  if name == "softmax":
    logits = -d / kw["temperature"]
    log_p = logits - _lse(logits, pos | neg)[:, None]
    return mean_over(pos, -log_p, 1)
  if name == "multi_similarity":
    a, b, base = kw["alpha"], kw["beta"], kw["base"]
    if distance == "cosine":
      s = 1.0 - d
      p_x, n_x = -a * (s - base), b * (s - base)
    else:
      p_x, n_x = a * (d - base), b * (base - d)
    zero = jnp.zeros((d.shape[0], 1), bool)
    p = jnp.concatenate([pos, ~zero], 1)  # the "+1" inside the log as one more exp(0) term
    n_ = jnp.concatenate([neg, ~zero], 1)
    z = jnp.zeros_like(d[:, :1])
    return (_lse(jnp.concatenate([p_x, z], 1), p) / a
            + _lse(jnp.concatenate([n_x, z], 1), n_) / b)
  if name == "circle":
    m, g = kw["margin"], kw["gamma"]
    s = 1.0 - d
    sc = jax.lax.stop_gradient(s)
    lp = -g * jnp.maximum(1 + m - sc, 0.0) * (s - (1 - m))
    ln = g * jnp.maximum(sc + m, 0.0) * (s - m)
    ok = jnp.any(pos, 1) & jnp.any(neg, 1)
    return jnp.where(ok, jax.nn.softplus(_lse(lp, pos) + _lse(ln, neg)), 0.0)
  if name == "lifted":
    z = _lse(d - kw["pos_margin"], pos) + _lse(kw["neg_margin"] - d, neg)
    return jnp.maximum(z, 0.0)
  raise AssertionError(name)


# -------------------------------------------------------------------------------------
# The cases
# -------------------------------------------------------------------------------------

FNS = {
    "batch_all": L.batch_all_triplet_loss, "batch_hard": L.batch_hard_triplet_loss,
    "semi_hard": L.semi_hard_triplet_loss, "all_pairs": L.all_pairs_contrastive_loss,
    "ntxent": L.ntxent_loss, "softmax": L.in_batch_softmax_loss,
    "multi_similarity": L.multi_similarity_loss, "circle": L.circle_loss,
    "lifted": L.lifted_structure_loss,
}
KW = {
    "batch_all": {"margin": 0.7}, "batch_hard": {"margin": 0.7}, "semi_hard": {"margin": 0.7},
    "all_pairs": {"margin": 1.5}, "ntxent": {"temperature": 0.5},
    "softmax": {"temperature": 0.8},
    "multi_similarity": {"alpha": 2.0, "beta": 10.0, "base": 0.5},
    "circle": {"margin": 0.4, "gamma": 16.0},
    "lifted": {"pos_margin": 0.2, "neg_margin": 2.0},
}
TRIPLET_LIKE = ("batch_all", "batch_hard", "semi_hard", "all_pairs", "lifted")
# (loss, distance, extra keywords): PML has no FaceNet semi-hard loss (naive only), and
# PML's contrastive loss on cosine similarity is not siamjax's contrastive on 1 - cos.
CASES = (
    [(n, d, {}) for n in TRIPLET_LIKE for d in ("euclidean", "squared_euclidean", "cosine")]
    + [("batch_hard", "euclidean", {"soft": True}), ("ntxent", "cosine", {}),
       ("softmax", "squared_euclidean", {}), ("softmax", "euclidean", {}),
       ("softmax", "cosine", {}), ("multi_similarity", "cosine", {}),
       ("multi_similarity", "euclidean", {}), ("circle", "cosine", {})])
NO_PML = {("semi_hard", d) for d in DIST} | {("all_pairs", "cosine")}


def _ours(name, kw, distance, emb, labels, ref, ref_labels, chunk_size=4):
  kw = dict(kw)
  if name not in ("ntxent", "circle"):
    kw["distance"] = distance
  refs = {} if ref is None else {"ref_embeddings": ref, "ref_labels": ref_labels}
  return FNS[name](emb, labels, chunk_size=chunk_size, **kw, **refs)


def _case_id(case):
  name, distance, extra = case
  return "-".join([name, distance] + [k for k in extra])


@pytest.mark.parametrize("use_ref", [False, True], ids=["batch", "ref"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_pml_and_naive_values_and_grads(case, use_ref):
  name, distance, extra = case
  kw = {**KW[name], **extra}
  w = jnp.asarray(np.random.default_rng(10).uniform(0.5, 1.5, len(LABELS)), jnp.float32)
  labels = jnp.asarray(LABELS)
  ref_labels = jnp.asarray(REF_LABELS) if use_ref else None
  argnums = (0, 1) if use_ref else 0

  def value_and_grad(impl):
    def total(e, r):
      per = impl(name, kw, distance, e, labels, r, ref_labels)
      return jnp.sum(w * per), per
    return jax.jit(jax.value_and_grad(total, argnums, has_aux=True))

  ours_vg, naive_vg = value_and_grad(_ours), value_and_grad(_naive)
  for seed in (0, 1):  # same shapes: compiled once
    emb_np, ref_np = _data(seed, np.float32)
    emb, ref = jnp.asarray(emb_np), (jnp.asarray(ref_np) if use_ref else None)
    (_, out), g = ours_vg(emb, ref)
    (_, out_naive), g_naive = naive_vg(emb, ref)
    np.testing.assert_allclose(out, out_naive, rtol=2e-4, atol=2e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_naive)):
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
    if (name, distance) in NO_PML:
      continue
    e_t = torch.tensor(emb_np, requires_grad=True)
    r_t = torch.tensor(ref_np, requires_grad=True) if use_ref else None
    ref_lab_t = torch.tensor(REF_LABELS) if use_ref else None
    per = _pml_loss(name, kw, distance, e_t, torch.tensor(LABELS), r_t, ref_lab_t)
    np.testing.assert_allclose(out, per.detach().numpy(), rtol=2e-4, atol=2e-5)
    (torch.tensor(np.asarray(w)) * per).sum().backward()
    g_pml = [e_t.grad.numpy()] + ([r_t.grad.numpy()] if use_ref else [])
    for a, b in zip(jax.tree.leaves(g), g_pml):
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("name", ["batch_all", "batch_hard", "all_pairs", "ntxent", "softmax",
                                  "multi_similarity", "circle", "lifted"])
def test_matches_pml_in_float64(name):
  distance = {"ntxent": "cosine", "circle": "cosine", "multi_similarity": "cosine"}.get(
      name, "euclidean")
  kw = KW[name]
  emb_np, ref_np = _data(2, np.float64)
  with jax.enable_x64(True):
    for use_ref in (False, True):
      ref, ref_lab = (jnp.asarray(ref_np), jnp.asarray(REF_LABELS)) if use_ref else (None, None)
      out = _ours(name, kw, distance, jnp.asarray(emb_np), jnp.asarray(LABELS), ref, ref_lab)
      assert out.dtype == jnp.float64
      per = _pml_loss(name, kw, distance, torch.tensor(emb_np), torch.tensor(LABELS),
                      torch.tensor(ref_np) if use_ref else None,
                      torch.tensor(REF_LABELS) if use_ref else None)
      np.testing.assert_allclose(out, per.numpy(), rtol=1e-9, atol=1e-11)


def test_reductions_match_pml_defaults():
  # what the docstrings promise: jnp.mean equals PML's default reducer for multi-similarity
  # and lifted structure; circle's per-anchor values averaged over the nonzero ones.
  emb_np, _ = _data(3, np.float32)
  emb, labels = jnp.asarray(emb_np), jnp.asarray(LABELS)
  e_t, l_t = torch.tensor(emb_np), torch.tensor(LABELS)
  ms = pl.MultiSimilarityLoss(alpha=2.0, beta=10.0, base=0.5)(e_t, l_t)
  np.testing.assert_allclose(jnp.mean(L.multi_similarity_loss(emb, labels, beta=10.0)),
                             ms.item(), rtol=1e-5)
  lifted = pl.GeneralizedLiftedStructureLoss(
      neg_margin=2.0, pos_margin=0.2, distance=pd.LpDistance(normalize_embeddings=False))
  np.testing.assert_allclose(
      jnp.mean(L.lifted_structure_loss(emb, labels, pos_margin=0.2, neg_margin=2.0)),
      lifted(e_t, l_t).item(), rtol=1e-5)
  c = L.circle_loss(emb, labels, gamma=16.0)
  np.testing.assert_allclose(jnp.sum(c) / jnp.sum(c > 0),
                             pl.CircleLoss(m=0.4, gamma=16.0)(e_t, l_t).item(), rtol=1e-5)


# -------------------------------------------------------------------------------------
# The new losses: jit, vmap, check_grads, distance 0, valid masks, hand-computed values
# -------------------------------------------------------------------------------------

NEW = ["multi_similarity", "circle", "lifted"]


@pytest.mark.parametrize("name", NEW)
def test_new_losses_jit_vmap_and_check_grads(name):
  emb_np, ref_np = _data(4, np.float32)
  emb, labels = jnp.asarray(emb_np), jnp.asarray(LABELS)
  f = lambda e: _ours(name, KW[name], "euclidean" if name == "lifted" else "cosine", e,  # noqa
                      labels, None, None)
  np.testing.assert_allclose(jax.jit(f)(emb), f(emb), rtol=1e-6, atol=1e-7)
  stacked = jnp.stack([emb, 2.0 * emb])
  np.testing.assert_allclose(jax.vmap(f)(stacked)[1], f(2.0 * emb), rtol=1e-5, atol=1e-6)
  if name == "circle":
    return  # its weights are stop_gradient constants: no finite difference sees that gradient
  with jax.enable_x64(True):
    e64 = jnp.asarray(emb_np.astype(np.float64))
    check_grads(jax.jit(f), (e64,), order=1, eps=1e-6, modes=("rev",))


@pytest.mark.parametrize("name", NEW)
def test_new_losses_finite_at_distance_zero(name):
  emb = jnp.concatenate([jnp.asarray(_data(5, np.float32)[0][:4])] * 2)
  labels = jnp.asarray([0, 1, 0, 1, 0, 1, 0, 1])
  for distance in (["cosine"] if name == "circle" else list(DIST)):
    kw = dict(KW[name])
    if name != "circle":
      kw["distance"] = distance
    def total(e, kw=kw):
      return (jnp.sum(FNS[name](e, labels, **kw))
              + jnp.sum(FNS[name](e, labels, ref_embeddings=e, ref_labels=labels, **kw)))
    assert np.all(np.isfinite(jax.jit(jax.grad(total))(emb)))


@pytest.mark.parametrize("name", NEW)
def test_new_losses_valid_mask_equals_dropping_the_rows(name):
  emb_np, _ = _data(6, np.float32)
  emb, labels = jnp.asarray(emb_np), jnp.asarray(LABELS)
  valid = jnp.asarray(np.arange(len(LABELS)) % 3 != 1)
  keep = np.flatnonzero(np.asarray(valid))
  out = FNS[name](emb, labels, valid=valid)
  np.testing.assert_allclose(out[keep], FNS[name](emb[keep], labels[keep]), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(out[~np.asarray(valid)], 0.0)


def test_new_losses_hand_computed():
  # multi-similarity, anchor 0 of [e, e, f] (e, f orthogonal, labels 0 0 1): s_p = 1, s_n = 0
  want = np.log1p(np.exp(-2.0 * 0.5)) / 2.0 + np.log1p(np.exp(50.0 * -0.5)) / 50.0
  emb = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(L.multi_similarity_loss(emb, jnp.array([0, 0, 1]))[0], want,
                             rtol=1e-6)
  # anchor 2 has no positive but keeps its negative terms (PML's element loss)
  want2 = np.log1p(2 * np.exp(50.0 * -0.5)) / 50.0
  np.testing.assert_allclose(L.multi_similarity_loss(emb, jnp.array([0, 0, 1]))[2], want2,
                             rtol=1e-5)
  # lifted structure on a line: anchor 0 of [0, 0.5 | 1.0]: relu(0.5 - 0 + 1 - 1.0) = 0.5
  line = jnp.array([[0.0], [0.5], [1.0]])
  np.testing.assert_allclose(L.lifted_structure_loss(line, jnp.array([0, 0, 1])),
                             [0.5, 1.0, np.log(np.exp(0.0) + np.exp(0.5))], rtol=1e-6)
  # circle: s_p = 1, s_n = 0, m = 0.4, gamma = 1: softplus(-0.4 * 0.4 + 0.4 * -0.4)
  np.testing.assert_allclose(
      L.circle_loss(emb, jnp.array([0, 0, 1]), gamma=1.0)[0], np.log1p(np.exp(-0.32)),
      rtol=1e-6)
  np.testing.assert_allclose(L.circle_loss(emb, jnp.array([0, 0, 1]))[2], 0.0)  # no positive
