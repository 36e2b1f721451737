"""The GKD losses against a float64 NumPy reference written from the paper's formulas, and against TRL."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gkd_jax import fused_losses as F
from gkd_jax import losses as L

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [0.5, 1.0, 2.0]
B, T, V = 3, 6, 17


# ------------------------------------------------------------------------------------ float64 reference


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_kl(p, q):
  """Σ p log(p/q) with 0 log 0 = 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0), axis=-1)


def ref_jsd(student_logits, teacher_logits, beta, temperature):
  """Paper, eq. (1) and the β endpoints: per-token divergence in float64."""
  ps = np.exp(np_log_softmax(np.asarray(student_logits, np.float64) / temperature))
  pt = np.exp(np_log_softmax(np.asarray(teacher_logits, np.float64) / temperature))
  if beta == 0.0:
    return np_kl(pt, ps)
  if beta == 1.0:
    return np_kl(ps, pt)
  m = beta * pt + (1 - beta) * ps
  return beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m)


def ref_reduce(per_token, mask, reduction, num_items=None):
  per_token = np.where(mask, per_token, 0.0)
  if reduction == "none":
    return per_token
  if reduction == "sum":
    return per_token.sum()
  if reduction == "mean":
    return per_token.sum() / max(num_items if num_items is not None else mask.sum(), 1)
  lengths = mask.sum(-1)
  per_seq = per_token.sum(-1) / np.maximum(lengths, 1)
  return per_seq.sum() / max((lengths > 0).sum(), 1)


def random_inputs(seed, shape=(B, T, V), scale=3.0):
  rng = np.random.default_rng(seed)
  s = (rng.normal(size=shape) * scale).astype(np.float32)
  t = (rng.normal(size=shape) * scale).astype(np.float32)
  mask = rng.random(shape[:-1]) < 0.7
  mask[0] = False  # a fully masked row
  mask[1, :2] = True
  return s, t, mask


@functools.lru_cache(maxsize=None)
def jitted(fn, **static):
  return jax.jit(functools.partial(fn, **static))


@pytest.fixture(params=["jit", "eager"])
def variant(request):
  """`variant(fn, **static)`: fn with its static settings bound, under jax.jit or run eagerly (the checks and
  the math must agree either way)."""
  return jitted if request.param == "jit" else functools.partial


# ---------------------------------------------------------------------------------- values vs reference


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_matches_float64_reference(beta, temperature, variant):
  s, t, mask = random_inputs(seed=int(beta * 10 + temperature * 100))
  expected = ref_jsd(s, t, beta, temperature)
  per_token = variant(L.generalized_jsd_loss, beta=beta, temperature=temperature, reduction="none")(s, t, mask)
  np.testing.assert_allclose(per_token, np.where(mask, expected, 0.0), rtol=2e-5, atol=2e-6)
  assert np.all(np.asarray(per_token)[0] == 0.0)  # the fully masked row
  for reduction in ("mean", "sum", "seq_mean"):
    got = variant(L.generalized_jsd_loss, beta=beta, temperature=temperature, reduction=reduction)(s, t, mask)
    np.testing.assert_allclose(got, ref_reduce(expected, mask, reduction), rtol=2e-5, err_msg=reduction)


def test_mean_divides_by_num_items_when_given():
  s, t, mask = random_inputs(0)
  got = L.generalized_jsd_loss(s, t, mask, beta=0.5, num_items=37)
  np.testing.assert_allclose(got, ref_reduce(ref_jsd(s, t, 0.5, 1.0), mask, "mean", 37), rtol=2e-5)


def test_gradient_accumulation_with_global_count_equals_full_batch():
  s, t, mask = random_inputs(1, shape=(4, T, V))
  full = L.generalized_jsd_loss(s, t, mask, beta=0.9)
  total = int(mask.sum())
  micro = sum(
      L.generalized_jsd_loss(s[i : i + 2], t[i : i + 2], mask[i : i + 2], beta=0.9, num_items=total) for i in (0, 2)
  )
  np.testing.assert_allclose(micro, full, rtol=1e-6)
  g_full = jax.grad(lambda x: L.generalized_jsd_loss(x, t, mask, beta=0.9))(s)
  g_micro = jnp.concatenate(
      [
          jax.grad(lambda x: L.generalized_jsd_loss(x, t[i : i + 2], mask[i : i + 2], beta=0.9, num_items=total))(
              s[i : i + 2]
          )
          for i in (0, 2)
      ]
  )
  np.testing.assert_allclose(g_micro, g_full, rtol=1e-5, atol=1e-8)


def test_endpoints_are_exactly_the_two_kls():
  s, t, mask = random_inputs(2)
  stats = L.token_stats(s, t)
  fkl = L.generalized_jsd_loss(s, t, beta=0.0, reduction="none")
  rkl = L.generalized_jsd_loss(s, t, beta=1.0, reduction="none")
  np.testing.assert_array_equal(fkl, stats["forward_kl"])
  np.testing.assert_array_equal(rkl, stats["reverse_kl"])
  ps, pt = np.exp(np_log_softmax(s)), np.exp(np_log_softmax(t))
  np.testing.assert_allclose(fkl, np_kl(pt, ps), rtol=2e-5)  # KL(teacher ‖ student)
  np.testing.assert_allclose(rkl, np_kl(ps, pt), rtol=2e-5)  # KL(student ‖ teacher)
  # Near (not at) the endpoints the mixture vanishes like β·FKL and (1−β)·RKL.
  eps = 1e-3
  small = L.generalized_jsd_loss(s.astype(np.float64), t.astype(np.float64), beta=eps, reduction="none")
  assert np.all(np.asarray(small) < 1.01 * eps * np_kl(pt, ps) + 1e-12)


@pytest.mark.parametrize("beta", BETAS)
def test_zero_for_identical_inputs(beta):
  s, _, mask = random_inputs(3)
  np.testing.assert_allclose(L.generalized_jsd_loss(s, s, mask, beta=beta, reduction="none"), 0.0, atol=1e-6)


def test_symmetric_at_half():
  s, t, mask = random_inputs(4)
  a = L.generalized_jsd_loss(s, t, mask, beta=0.5, reduction="none")
  b = L.generalized_jsd_loss(t, s, mask, beta=0.5, reduction="none")
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # and the β ↔ 1−β swap holds for every β
  np.testing.assert_allclose(
      L.generalized_jsd_loss(s, t, beta=0.1, reduction="none"),
      L.generalized_jsd_loss(t, s, beta=0.9, reduction="none"),
      rtol=1e-5,
      atol=1e-7,
  )


@pytest.mark.parametrize("beta", BETAS)
def test_neg_inf_vocab_entries_stay_finite(beta):
  s, t, mask = random_inputs(5)
  blocked = np.zeros(V, bool)
  blocked[[2, 7, 16]] = True  # masked vocabulary entries in both models
  s[..., blocked] = -np.inf
  t[..., blocked] = -np.inf
  s[0] = np.nan  # garbage at a fully masked row must not leak either
  s[0, :, 3] = -np.inf
  fn = lambda x, y: L.generalized_jsd_loss(x, y, mask, beta=beta, temperature=0.7)
  value, grads = jax.value_and_grad(fn, argnums=(0, 1))(s, t)
  assert np.isfinite(value)
  for g in grads:
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[..., blocked], 0.0)
    np.testing.assert_array_equal(np.asarray(g)[0], 0.0)
  keep = ~blocked
  expected = ref_reduce(ref_jsd(s[..., keep], t[..., keep], beta, 0.7), mask, "mean")
  np.testing.assert_allclose(value, expected, rtol=2e-5)


def test_fully_masked_is_zero_with_zero_gradients():
  s, t, _ = random_inputs(6)
  mask = np.zeros((B, T), bool)
  for reduction in ("mean", "sum", "seq_mean"):
    fn = lambda x: L.generalized_jsd_loss(x, t, mask, reduction=reduction)
    value, g = jax.value_and_grad(fn)(s)
    assert value == 0.0
    np.testing.assert_array_equal(g, 0.0)


def test_bf16_inputs_close_to_float32():
  s, t, mask = random_inputs(7)
  f32 = L.generalized_jsd_loss(s, t, mask, beta=0.5)
  bf = L.generalized_jsd_loss(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), mask, beta=0.5)
  assert bf.dtype == jnp.float32
  np.testing.assert_allclose(bf, f32, rtol=2e-2)


def test_vmap_matches_batched_call():
  s, t, mask = random_inputs(8)
  fn = functools.partial(L.generalized_jsd_loss, beta=0.3, temperature=1.5, reduction="sum")
  np.testing.assert_allclose(jax.vmap(fn)(s, t, mask), [fn(s[i], t[i], mask[i]) for i in range(B)], rtol=1e-6)


# -------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("beta", BETAS)
def test_check_grads_float64(beta):
  with jax.enable_x64(True):
    s, t, mask = random_inputs(9, shape=(2, 3, 7), scale=1.0)
    s, t = s.astype(np.float64), t.astype(np.float64)
    fn = lambda x, y: L.generalized_jsd_loss(x, y, mask, beta=beta, temperature=0.8)
    check_grads(fn, (s, t), order=2, modes=("rev",), eps=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradient_matches_reference_finite_differences(beta):
  s, t, mask = random_inputs(10, shape=(2, 3, 9))
  grad = jax.grad(lambda x: L.generalized_jsd_loss(x, t, mask, beta=beta, temperature=2.0))(s)
  ref = lambda x: ref_reduce(ref_jsd(x, t, beta, 2.0), mask, "mean")
  x0, h = s.astype(np.float64), 1e-6
  fd = np.zeros_like(x0)
  for idx in np.ndindex(x0.shape):
    e = np.zeros_like(x0)
    e[idx] = h
    fd[idx] = (ref(x0 + e) - ref(x0 - e)) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=2e-6)


# ------------------------------------------------------------------------------------------------ top-k


def ref_topk_jsd(s, t_values, t_idx, beta, temperature):
  s_k = np.take_along_axis(np.asarray(s, np.float64), t_idx, axis=-1)
  s_k = np.where(np.isfinite(t_values), s_k, -np.inf)  # unfilled slots drop out of both
  return ref_jsd(s_k, t_values, beta, temperature)


def test_topk_with_k_equal_vocab_is_the_full_loss():
  s, t, mask = random_inputs(11)
  values, idx = L.teacher_topk(jnp.asarray(t), V)
  for beta in BETAS:
    full = L.generalized_jsd_loss(s, t, mask, beta=beta, temperature=0.9)
    topk = L.topk_generalized_jsd_loss(s, values, idx, mask, beta=beta, temperature=0.9)
    np.testing.assert_allclose(topk, full, rtol=1e-5)


@pytest.mark.parametrize("beta", BETAS)
def test_topk_renormalizes_over_the_teachers_k(beta, variant):
  s, t, mask = random_inputs(12)
  values, idx = variant(L.teacher_topk, k=5)(jnp.asarray(t))
  assert np.all(np.asarray(values) == np.sort(t, axis=-1)[..., ::-1][..., :5])
  got = variant(L.topk_generalized_jsd_loss, beta=beta, temperature=2.0, reduction="none")(s, values, idx, mask)
  expected = ref_topk_jsd(s, np.asarray(values), np.asarray(idx), beta, 2.0)
  np.testing.assert_allclose(got, np.where(mask, expected, 0.0), rtol=2e-5, atol=2e-7)


def test_topk_server_logprobs_and_unfilled_slots(variant):
  s, t, mask = random_inputs(13)
  values, idx = L.teacher_topk(jnp.asarray(t), 6)
  logprobs = np.asarray(values) - np.log(np.sum(np.exp(t.astype(np.float64)), -1, keepdims=True))
  logprobs = logprobs.astype(np.float32)
  logprobs[:, :, 4:] = -np.inf  # the server returned only 4 entries
  idx = np.asarray(idx).copy()
  idx[:, :, 4:] = 0  # and the ids there are placeholders
  loss = variant(L.topk_generalized_jsd_loss, beta=0.5, temperature=0.9, reduction="none")
  got = loss(s, logprobs, idx, mask)
  first4 = loss(s, logprobs[..., :4], idx[..., :4], mask)
  np.testing.assert_allclose(got, first4, rtol=1e-6, atol=1e-8)
  expected = ref_topk_jsd(s, logprobs[..., :4], idx[..., :4], 0.5, 0.9)
  np.testing.assert_allclose(got, np.where(mask, expected, 0.0), rtol=2e-5, atol=2e-7)
  g = jax.grad(lambda x: L.topk_generalized_jsd_loss(x, logprobs, idx, mask, beta=0.5))(s)
  assert np.all(np.isfinite(g))


# ------------------------------------------------------------------------------------------------ fused


def _fused_case(seed, n_tokens_shape, hs_dim, ht_dim, vs, vt, dtype=np.float32, extras=False):
  rng = np.random.default_rng(seed)
  d = dict(
      student_hidden=rng.normal(size=(*n_tokens_shape, hs_dim)).astype(dtype),
      student_head=(rng.normal(size=(hs_dim, vs)) / np.sqrt(hs_dim) * 3).astype(dtype),
      teacher_hidden=rng.normal(size=(*n_tokens_shape, ht_dim)).astype(dtype),
      teacher_head=(rng.normal(size=(ht_dim, vt)) / np.sqrt(ht_dim) * 3).astype(dtype),
      mask=rng.random(n_tokens_shape) < 0.8,
  )
  kw = dict(student_softcap=5.0, teacher_softcap=4.0) if extras else {}
  return d, kw


def _unfused_from_hidden(d, kw, vocab_size, **loss_kw):
  def head(h, w, cap):
    z = h @ w
    return z if cap is None else cap * jnp.tanh(z / cap)

  def fn(hs, ws):
    s = head(hs, ws, kw.get("student_softcap"))
    t = head(d["teacher_hidden"], d["teacher_head"], kw.get("teacher_softcap"))
    s, t = L.align_vocab(s, t, vocab_size)
    return L.generalized_jsd_loss(s, t, d["mask"], **loss_kw)

  return fn


@pytest.mark.parametrize("chunk_size", [4, 7, 64])  # divides 2*14=28, does not, larger than all tokens
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_equals_unfused_values_and_gradients(chunk_size, reduction):
  d, kw = _fused_case(14, (2, 14), hs_dim=8, ht_dim=12, vs=24, vt=21, extras=(chunk_size == 7))
  loss_kw = dict(beta=0.3, temperature=0.9, reduction=reduction)
  unfused = _unfused_from_hidden(d, kw, 20, **loss_kw)

  def fused(hs, ws):
    return F.fused_generalized_jsd_loss(
        hs, ws, d["teacher_hidden"], d["teacher_head"], d["mask"], chunk_size=chunk_size, vocab_size=20, **loss_kw, **kw
    )

  args = (d["student_hidden"], d["student_head"])
  np.testing.assert_allclose(jax.jit(fused)(*args), unfused(*args), rtol=2e-5, atol=1e-7)
  scalar = (
      (lambda f: f) if reduction != "none" else (lambda f: lambda *a: jnp.sum(f(*a) * np.arange(28).reshape(2, 14)))
  )
  g_fused = jax.jit(jax.grad(scalar(fused), (0, 1)))(*args)
  g_unfused = jax.grad(scalar(unfused), (0, 1))(*args)
  chex.assert_trees_all_close(g_fused, g_unfused, rtol=2e-4, atol=1e-6)
  # Rows of the head past the shared vocabulary get exactly zero gradient.
  np.testing.assert_array_equal(np.asarray(g_fused[1])[:, 20:], 0.0)


@pytest.mark.parametrize("beta", BETAS)
def test_fused_float64_and_num_items(beta, variant):
  with jax.enable_x64(True):
    d, kw = _fused_case(15, (3, 5), hs_dim=6, ht_dim=6, vs=11, vt=11, dtype=np.float64)
    loss = variant(F.fused_generalized_jsd_loss, beta=beta, temperature=1.7, chunk_size=4, num_items=40)
    fn = lambda hs, ws: loss(hs, ws, d["teacher_hidden"], d["teacher_head"], d["mask"])
    unfused = _unfused_from_hidden(d, kw, None, beta=beta, temperature=1.7, num_items=40)
    np.testing.assert_allclose(
        fn(d["student_hidden"], d["student_head"]), unfused(d["student_hidden"], d["student_head"]), rtol=1e-12
    )
    check_grads(fn, (d["student_hidden"], d["student_head"]), order=1, modes=("rev",), eps=1e-5)


def test_fused_bf16_close_to_f32():
  d, _ = _fused_case(16, (2, 9), hs_dim=16, ht_dim=16, vs=32, vt=32)
  call = lambda cast: F.fused_generalized_jsd_loss(
      *(cast(d[k]) for k in ("student_hidden", "student_head", "teacher_hidden", "teacher_head")),
      d["mask"],
      beta=0.5,
      chunk_size=5
  )
  np.testing.assert_allclose(call(lambda x: jnp.asarray(x, jnp.bfloat16)), call(jnp.asarray), rtol=3e-2)


def test_fused_never_materializes_full_logits():
  """The compiled fused fwd+bwd has no [tokens, V] buffer; the unfused one does."""
  n, h, v, chunk = 2048, 32, 4096, 64
  hs = jax.ShapeDtypeStruct((n, h), jnp.float32)
  w = jax.ShapeDtypeStruct((h, v), jnp.float32)
  mask = jax.ShapeDtypeStruct((n,), jnp.bool_)
  fused = jax.jit(
      jax.grad(lambda a, b, c, e, m: F.fused_generalized_jsd_loss(a, b, c, e, m, chunk_size=chunk), argnums=(0, 1))
  )
  unfused = jax.jit(jax.grad(lambda a, b, c, e, m: L.generalized_jsd_loss(a @ b, c @ e, m), argnums=(0, 1)))
  temp = lambda f: f.lower(hs, w, hs, w, mask).compile().memory_analysis().temp_size_in_bytes
  full_logits = n * v * 4
  assert temp(unfused) >= full_logits
  assert temp(fused) < full_logits / 4


# ------------------------------------------------------------------------------------------ TRL parity


@pytest.fixture(scope="module")
def trl_loss():
  torch = pytest.importorskip("torch")
  import os

  os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
  from trl.experimental.gkd import GKDTrainer

  return torch, GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", BETAS)
def test_parity_with_trl(trl_loss, beta):
  torch, trl_jsd = trl_loss
  s, t, mask = random_inputs(17, shape=(3, 8, 50))
  mask[0, 0] = True
  labels = torch.where(torch.from_numpy(mask), 1, -100)
  ts, tt = torch.from_numpy(s), torch.from_numpy(t)
  for temperature in (1.0, 0.9):
    kw = dict(beta=beta, temperature=temperature)
    ours = functools.partial(L.generalized_jsd_loss, s, t, mask, **kw)
    trl = lambda reduction, **extra: trl_jsd(ts, tt, labels=labels, reduction=reduction, **kw, **extra).numpy()
    rel = dict(rtol=1e-5, atol=0)
    np.testing.assert_allclose(ours(reduction="mean"), trl("batchmean"), **rel)
    np.testing.assert_allclose(ours(reduction="sum"), trl("sum"), **rel)
    np.testing.assert_allclose(ours(reduction="mean", num_items=50), trl("batchmean", num_items_in_batch=50), **rel)
    # TRL's "mean" averages over every (token, vocab) element; "none" keeps them per element.
    np.testing.assert_allclose(ours(reduction="sum") / (mask.sum() * 50), trl("mean"), **rel)
    np.testing.assert_allclose(np.asarray(ours(reduction="none"))[mask], trl("none").sum(-1), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ NLL, shift, stats


def test_nll_matches_reference(variant):
  s, _, mask = random_inputs(18)
  targets = np.random.default_rng(0).integers(0, V, size=(B, T))
  expected = -np.take_along_axis(np_log_softmax(s), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(
      variant(L.nll_loss, reduction="none")(s, targets, mask), np.where(mask, expected, 0.0), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(variant(L.nll_loss)(s, targets, mask), ref_reduce(expected, mask, "mean"), rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [4, 7, None])
def test_fused_nll_equals_nll_on_logits(chunk_size, variant):
  d, kw = _fused_case(21, (2, 9), hs_dim=8, ht_dim=8, vs=24, vt=24, extras=True)
  targets = np.random.default_rng(0).integers(0, 20, size=(2, 9))

  def unfused(h, w):
    z = h @ w
    z = kw["student_softcap"] * jnp.tanh(z / kw["student_softcap"])
    return L.nll_loss(z[..., :20], targets, d["mask"], num_items=11)

  loss = variant(F.fused_nll_loss, chunk_size=chunk_size, softcap=kw["student_softcap"], vocab_size=20, num_items=11)
  fused = lambda h, w: loss(h, w, targets, d["mask"])
  args = (d["student_hidden"], d["student_head"])
  np.testing.assert_allclose(fused(*args), unfused(*args), rtol=1e-5)
  chex.assert_trees_all_close(jax.grad(fused, (0, 1))(*args), jax.grad(unfused, (0, 1))(*args), rtol=1e-4, atol=1e-7)


def test_label_smoothing_matches_the_smoothed_cross_entropy_reference(variant):
  """(1 - ε)·NLL + ε·mean_v(-log p_v) in float64 (transformers' LabelSmoother), plain and fused; ε = 0 is NLL;
  the gradient w.r.t. the logits is softmax - ((1 - ε)·one-hot + ε/V)."""
  s, _, mask = random_inputs(19)
  targets = np.random.default_rng(1).integers(0, V, size=(B, T))
  logp = np_log_softmax(s.astype(np.float64))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  eps = 0.1
  expected = (1 - eps) * nll - eps * logp.mean(-1)
  got = variant(L.nll_loss, reduction="none", label_smoothing=eps)(s, targets, mask)
  np.testing.assert_allclose(got, np.where(mask, expected, 0.0), rtol=1e-5, atol=1e-6)
  loss = lambda x: L.nll_loss(x, targets, mask, reduction="sum", label_smoothing=eps)
  p = np.exp(logp)
  target = (1 - eps) * np.eye(V)[targets] + eps / V
  np.testing.assert_allclose(jax.grad(loss)(s), np.where(mask[..., None], p - target, 0.0), atol=1e-6)
  np.testing.assert_allclose(
      L.nll_loss(s, targets, mask, label_smoothing=0.0), L.nll_loss(s, targets, mask), rtol=0, atol=0
  )
  d, kw = _fused_case(21, (2, 9), hs_dim=8, ht_dim=8, vs=24, vt=24, extras=True)
  t2 = np.random.default_rng(0).integers(0, 20, size=(2, 9))
  z = d["student_hidden"] @ d["student_head"]
  z = kw["student_softcap"] * jnp.tanh(z / kw["student_softcap"])
  fused = F.fused_nll_loss(
      d["student_hidden"],
      d["student_head"],
      t2,
      d["mask"],
      softcap=kw["student_softcap"],
      vocab_size=20,
      chunk_size=4,
      label_smoothing=eps,
  )
  np.testing.assert_allclose(fused, L.nll_loss(z[..., :20], t2, d["mask"], label_smoothing=eps), rtol=1e-5)
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match="label_smoothing must be in \\[0, 1\\)"):
      L.nll_loss(s, targets, mask, label_smoothing=bad)


def test_shift_pairs_each_position_with_the_next_token():
  # Prompt [5, 6, 7], completion [8, 9, 2] then padding: the first target is 8, predicted at position 2.
  input_ids = np.array([[5, 6, 7, 8, 9, 2, 0]])
  completion = np.array([[0, 0, 0, 1, 1, 1, 0]], bool)
  # A "model" that is perfect on the completion only when aligned: position t puts all mass on
  # input_ids[t + 1] for completion targets, and on a wrong token (1) elsewhere.
  logits = np.full((1, 7, 10), -30.0, np.float32)
  logits[0, :, 1] = 30.0
  logits[0, 2:5] = -30.0
  logits[0, np.arange(2, 5), input_ids[0, 3:6]] = 30.0
  targets, target_mask, shifted = L.shift_for_next_token(input_ids, completion, logits)
  np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 2, 0]])
  np.testing.assert_array_equal(target_mask, [[0, 0, 1, 1, 1, 0]])
  assert float(L.nll_loss(shifted, targets, target_mask)) < 1e-6
  # An off-by-one alignment in either direction is caught by a large loss.
  assert float(L.nll_loss(logits[:, 1:], targets, target_mask)) > 10
  assert float(L.nll_loss(shifted, targets, completion[:, :-1])) > 10
  assert int(target_mask.sum()) == int(completion.sum())
  # Cutting at the first completion column (the static prompt width) keeps exactly the same pairs.
  cut_targets, cut_mask, cut = L.shift_for_next_token(input_ids, completion, logits, first_target=3)
  np.testing.assert_array_equal(cut_targets, targets[:, 2:])
  np.testing.assert_array_equal(cut_mask, target_mask[:, 2:])
  np.testing.assert_array_equal(cut, shifted[:, 2:])
  assert float(L.nll_loss(cut, cut_targets, cut_mask)) < 1e-6
  with pytest.raises(ValueError, match=r"first_target must be an int in \[1, 6\], got 7"):
    L.shift_for_next_token(input_ids, completion, first_target=7)


def test_token_stats_values():
  s, t, _ = random_inputs(19)
  stats = L.token_stats(s, t, temperature=1.3)
  ls, lt = np_log_softmax(s / 1.3), np_log_softmax(t / 1.3)
  np.testing.assert_allclose(stats["student_entropy"], -np.sum(np.exp(ls) * ls, -1), rtol=1e-5)
  np.testing.assert_allclose(stats["teacher_entropy"], -np.sum(np.exp(lt) * lt, -1), rtol=1e-5)
  np.testing.assert_array_equal(stats["top1_agreement"], (s.argmax(-1) == t.argmax(-1)).astype(np.float32))
  np.testing.assert_allclose(
      L.reduce_tokens(stats["top1_agreement"], np.ones((B, T), bool)), (s.argmax(-1) == t.argmax(-1)).mean(), rtol=1e-6
  )


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_loss_and_stats_match_the_separate_functions(beta):
  s, t, mask = random_inputs(23)
  loss, stats = L.jsd_loss_and_stats(s, t, mask, beta=beta, temperature=0.8)
  np.testing.assert_allclose(loss, L.generalized_jsd_loss(s, t, mask, beta=beta, temperature=0.8), rtol=1e-6)
  ref = L.token_stats(s, t, temperature=0.8)
  masked = lambda tree: {name: np.where(mask, value, 0) for name, value in tree.items()}
  chex.assert_trees_all_close(masked(stats), masked(ref), rtol=1e-5, atol=1e-6)
  # The loss's gradient is the plain loss's; the stats carry none.
  g = jax.grad(lambda x: L.jsd_loss_and_stats(x, t, mask, beta=beta)[0])(s)
  np.testing.assert_allclose(g, jax.grad(lambda x: L.generalized_jsd_loss(x, t, mask, beta=beta))(s), rtol=1e-6)
  np.testing.assert_array_equal(jax.grad(stats_sum)(s, t, mask, beta), 0.0)


def test_jsd_loss_and_stats_top1_agreement_under_jit():
  """Seed 23 has a position where an argmax over the jitted, recomputed log-probs missed its own maximum."""
  s, t, mask = random_inputs(23)
  stats = jitted(L.jsd_loss_and_stats, beta=0.0, temperature=0.8)(s, t, mask)[1]
  want = L.token_stats(s, t, temperature=0.8)["top1_agreement"]
  np.testing.assert_array_equal(np.where(mask, stats["top1_agreement"], 0), np.where(mask, want, 0))


def stats_sum(s, t, mask, beta):
  return sum(jnp.sum(v) for v in L.jsd_loss_and_stats(s, t, mask, beta=beta)[1].values())


def test_first_argmax_is_argmax_with_ties_and_neg_inf():
  x = np.array([[1.0, 3.0, 3.0, 0.0], [-np.inf, -np.inf, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -3.0, -4.0]])
  np.testing.assert_array_equal(L.first_argmax(x), np.argmax(x, -1))
  r = np.random.default_rng(0).normal(size=(3, 5, 257)).astype(np.float32)
  np.testing.assert_array_equal(L.first_argmax(r), np.argmax(r, -1))


def test_align_vocab_cuts_padding():
  s, t = np.zeros((2, 3, 12)), np.ones((2, 3, 10))
  a, b = L.align_vocab(s, t)
  assert a.shape[-1] == b.shape[-1] == 10
  a, b = L.align_vocab(s, t, vocab_size=9)
  assert a.shape[-1] == b.shape[-1] == 9
  with pytest.raises(ValueError, match=r"vocab_size 11 must be in \[1, min\(student 12, teacher 10\)\]"):
    L.align_vocab(s, t, vocab_size=11)


# ---------------------------------------------------------------------------------------------- errors


def test_wrong_rank_or_dtype_names_the_argument(variant):
  s, t, _ = random_inputs(24)
  idx = np.zeros((B, T, 3), np.int32)
  targets = np.zeros((B, T), np.int32)
  cases = [
      (r"student_logits must be \[\.\.\., vocab\] floats", L.generalized_jsd_loss, (s[0, 0, 0], t[0, 0, 0])),
      (r"teacher_logits must be \[\.\.\., vocab\] floats", L.jsd_loss_and_stats, (s, np.zeros(t.shape, np.int32))),
      (r"teacher_topk_indices must be \[\.\.\., k\] integer", L.topk_generalized_jsd_loss, (s, t[..., :3], 1.0 * idx)),
      (r"targets must be \[\.\.\.\] integer token ids", L.nll_loss, (s, 1.0 * targets)),
      (
          r"student_hidden must be \[\.\.\., hidden\] floats",
          F.fused_generalized_jsd_loss,
          (s[0, 0, 0], np.zeros((1, 4)), t[0, 0], np.zeros((V, 4))),
      ),
      (r"hidden must be \[\.\.\., hidden\] floats", F.fused_nll_loss, (np.float32(1.0), np.zeros((1, 4)), targets)),
  ]
  for message, fn, args in cases:
    with pytest.raises(AssertionError, match=message):
      variant(fn)(*args)


def test_bad_arguments_fail_with_clear_messages():
  s, t, mask = random_inputs(20)
  with pytest.raises(ValueError, match=r"beta must be in \[0, 1\].*got 1.5"):
    L.generalized_jsd_loss(s, t, beta=1.5)
  with pytest.raises(ValueError, match=r"beta must be in \[0, 1\].*got -0.1"):
    L.topk_generalized_jsd_loss(s, t[..., :3], np.zeros((B, T, 3), np.int32), beta=-0.1)
  with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0.0"):
    L.generalized_jsd_loss(s, t, temperature=0.0)
  with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got -1.0"):
    F.fused_generalized_jsd_loss(s, np.zeros((V, 4)), t, np.zeros((V, 4)), temperature=-1)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 17\].*got 18"):
    L.teacher_topk(t, 18)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 17\].*got 0"):
    L.teacher_topk(t, 0)
  with pytest.raises(ValueError, match=r"same shape, got \(3, 6, 17\) and \(3, 6, 16\)"):
    L.generalized_jsd_loss(s, t[..., :16])
  with pytest.raises(ValueError, match=r"mask shape \(3, 5\) must equal the token shape of logits \(3, 6\)"):
    L.generalized_jsd_loss(s, t, mask[:, :5])
  with pytest.raises(ValueError, match=r"reduction must be one of .* got 'batchmean'"):
    L.generalized_jsd_loss(s, t, reduction="batchmean")
  with pytest.raises(ValueError, match=r"student_hidden width 17 != student_head rows 4"):
    F.fused_generalized_jsd_loss(s, np.zeros((4, 8)), t, np.zeros((17, 8)))
  with pytest.raises(TypeError, match=r"beta must be a static Python number"):
    jax.jit(lambda b: L.generalized_jsd_loss(s, t, beta=b))(0.5)
  with pytest.raises(ValueError, match=r"input_ids shape \(1, 4\) and loss_mask shape \(1, 3\)"):
    L.shift_for_next_token(np.zeros((1, 4)), np.zeros((1, 3)))
