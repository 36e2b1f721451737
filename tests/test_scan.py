"""Scanned layer stack (stacked params under lax.scan) == the per-layer loop, for every family: logits, grads,
greedy decoding, HF round trip, LoRA, a train step, orbax checkpoints, sharding; remat policies; attention
kernels (xla vs dot_product) with padding and GQA; the one LM-head owner."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from gkd_jax import checkpoints, lora, optim, sampling
from gkd_jax import config as config_lib
from gkd_jax import sharding as shd
from gkd_jax import train_step as ts
from gkd_jax.models import CausalLM, ModelConfig, from_pretrained, model_options, save_pretrained
from gkd_jax.models import safetensors_io as st
from gkd_jax.models import transformer
from gkd_jax.models.transformer import remat_policy
import helpers
from test_models import build_hf, left_padded_batch

# One tiny checkpoint per family (test_models' cases): sliding windows on some / all layers, GQA, q/k norm,
# Gemma 2's softcaps and window alternation, Gemma 3's local RoPE base on its sliding layers.
FAMILIES = {
    "llama": "llama_gqa2_tied",
    "mistral": "mistral_sliding",
    "qwen2": "qwen2_sliding_untied",
    "qwen3": "qwen3_qknorm_headdim",
    "gemma2": "gemma2_softcap",
    "gemma3": "gemma3_local_rope",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  cache = {}

  def get(family):
    if family not in cache:
      directory = str(tmp_path_factory.mktemp(family))
      build_hf(FAMILIES[family], directory)
      cache[family] = directory
    return cache[family]

  return get


def loop_layout(state) -> dict:
  """A scanned model's pure param dict in the loop layout (layers.<i>.*), for comparisons."""
  d = nnx.to_pure_dict(state)
  stacked = d.pop("layers")
  n = jax.tree.leaves(stacked)[0].shape[0]
  d["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
  return d


def assert_trees_close(a, b, **tol):
  a, b = (a if isinstance(a, dict) else nnx.to_pure_dict(a)), (b if isinstance(b, dict) else nnx.to_pure_dict(b))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def nll(model, ids, mask):
  logits = model(ids, mask).logits[:, :-1].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, -1)
  tok = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
  return -jnp.sum(tok * mask[:, 1:]) / jnp.sum(mask[:, 1:])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scanned_equals_loop(family, checkpoint):
  directory = checkpoint(family)
  loop = from_pretrained(directory)
  scanned = from_pretrained(directory, scan_layers=True)
  assert scanned.scan_layers and not loop.scan_layers
  layers = loop.config.num_hidden_layers
  q = nnx.state(scanned, nnx.Param)["layers"]["attn"]["q"]["kernel"]
  assert q.get_value().shape[0] == layers and shd.variable_names(q) == ("layers", "embed", "heads", "head_dim")
  assert_trees_close(loop_layout(nnx.state(scanned, nnx.Param)), nnx.state(loop, nnx.Param), rtol=0, atol=0)

  ids, mask = map(jnp.asarray, left_padded_batch())
  want = loop(ids, mask)
  got = scanned(ids, mask)
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.hidden_states, want.hidden_states, rtol=1e-5, atol=1e-5)

  grads = nnx.grad(nll)(scanned, ids, mask)
  assert_trees_close(loop_layout(grads), nnx.grad(nll)(loop, ids, mask), rtol=1e-4, atol=1e-6)

  # Greedy decoding through the stacked [L, B, S, K, D] cache; the left-padded prompts are the batch's.
  kw = dict(key=jax.random.key(0), max_new_tokens=6, temperature=0.0, return_logprobs=True)
  prompt, prompt_mask = ids[:, :8], mask[:, :8].at[:, -1].set(1)
  want = sampling.generate(loop, prompt, prompt_mask, **kw)
  got = sampling.generate(scanned, prompt, prompt_mask, **kw)
  np.testing.assert_array_equal(got.completion_ids, want.completion_ids)
  cache = scanned.init_cache(3, 14)
  assert cache["k"].shape == (layers, 3, 14, loop.config.num_key_value_heads, loop.config.head_dim)


def test_remat_policies_match_and_bad_values_fail(checkpoint):
  """Gemma 3 (per-layer windows and RoPE tables as scanned arrays): every remat policy config.remat allows,
  scanned and looped, gives the plain loop's loss and gradients."""
  directory = checkpoint("gemma3")
  ids, mask = map(jnp.asarray, left_padded_batch())
  ref_loss, ref = nnx.value_and_grad(nll)(from_pretrained(directory), ids, mask)
  assert set(config_lib.REMAT) == set(transformer.REMAT_KINDS) == {"none", "full", "dots", "offload"}
  for remat in config_lib.REMAT:
    loss, grads = nnx.value_and_grad(nll)(from_pretrained(directory, remat=remat), ids, mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert_trees_close(grads, ref, rtol=1e-4, atol=1e-6)
    scanned = from_pretrained(directory, remat=remat, scan_layers=True)
    loss, grads = nnx.value_and_grad(nll)(scanned, ids, mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_trees_close(loop_layout(grads), ref, rtol=1e-4, atol=1e-6)
  assert remat_policy("none") == (False, None) and remat_policy("full") == (True, None)
  assert remat_policy("dots") == (True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  assert remat_policy("offload")[0]
  with pytest.raises(ValueError, match="remat='everything'"):
    remat_policy("everything")
  with pytest.raises(ValueError, match="attention='flash'"):
    from_pretrained(directory, attention="flash")


def test_scanned_stack_saves_one_copy_of_each_residual():
  """The scanned stack without remat keeps, per layer, what the unrolled program keeps after XLA's fusion:
  the float32 attention probabilities once (no masked-scores, exp or bf16 copies), gate, up and their product
  (not the activation's intermediates), no float32 copy of a norm's input, and one flattened input shared
  by q/k/v and by gate/up (experiments/results/aot.md: 10.9 → 6.6 GiB of residuals for Qwen2.5-0.5B)."""
  from jax._src.ad_checkpoint import saved_residuals

  cfg = tiny_config()
  b, t, layers = 2, 12, cfg.num_hidden_layers  # B·T differs from every weight dimension
  model = CausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), scan_layers=True)
  graphdef, state = nnx.split(model)

  def loss(state, ids):
    return nnx.merge(graphdef, state)(ids).hidden_states.astype(jnp.float32).sum()

  ids = jnp.zeros((b, t), jnp.int32)
  stacked = [
      aval for aval, src in saved_residuals(loss, state, ids) if aval.shape[:1] == (layers,) and "argument" not in src
  ]

  def count(shape, dtype):  # [L, B, T, X] also counts as its flattened [L, B·T, X]
    shapes = (shape, (layers, b * t, shape[-1])) if len(shape) == 4 else (shape,)
    return sum(a.shape in shapes and a.dtype == dtype for a in stacked)

  k, g = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
  assert count((layers, b, k, g, t, t), jnp.float32) == 1 and count((layers, b, k, g, t, t), jnp.bfloat16) == 0
  assert count((layers, b, t, cfg.intermediate_size), jnp.bfloat16) == 3
  assert count((layers, b, t, cfg.hidden_size), jnp.float32) == 0
  assert count((layers, b, t, cfg.hidden_size), jnp.bfloat16) <= 5  # 2 layer inputs, 2 norm outputs, attention out


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_hf_round_trip_from_scanned(family, checkpoint, tmp_path):
  directory = checkpoint(family)
  save_pretrained(from_pretrained(directory, scan_layers=True), str(tmp_path))
  original, again = st.CheckpointReader(directory), st.CheckpointReader(str(tmp_path))
  names = set(original.keys()) - ({"lm_head.weight"} if from_pretrained(directory).lm_head is None else set())
  assert set(again.keys()) == names
  for name in names:
    np.testing.assert_array_equal(np.asarray(again.view(name)), np.asarray(original.view(name)), err_msg=name)


def test_scanned_model_loads_sharded_with_the_layer_axis_whole(checkpoint):
  directory = checkpoint("llama")
  mesh = shd.make_mesh(2, 2, 2)
  model = from_pretrained(directory, mesh=mesh, scan_layers=True)
  kernel = nnx.state(model, nnx.Param)["layers"]["mlp"]["gate"]["kernel"].get_value()
  assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  ids, mask = map(jnp.asarray, left_padded_batch(lengths=(12, 8, 5, 3)))
  want = from_pretrained(directory)(ids, mask).logits
  np.testing.assert_allclose(model(ids, mask).logits, want, rtol=1e-5, atol=1e-5)


def test_lora_on_stacked_kernels(checkpoint, tmp_path):
  directory = checkpoint("qwen2")
  loop, scanned = from_pretrained(directory), from_pretrained(directory, scan_layers=True)
  spec = lora.LoraSpec(rank=4, alpha=8.0, target_modules=("all-linear",))
  loop_adapters = lora.init_adapters(nnx.state(loop), spec, jax.random.key(0))
  stacked = lora.init_adapters(nnx.state(scanned), spec, jax.random.key(0))
  a = stacked["layers.attn.q.kernel"]["a"]
  assert a.get_value().shape == (2, 32, 4) and shd.variable_names(a) == ("layers", "embed", None)
  b = stacked["layers.mlp.down.kernel"]["b"]
  assert b.get_value().shape == (2, 4, 32) and shd.variable_names(b) == ("layers", None, "embed")
  assert lora.count(stacked) == lora.count(loop_adapters)

  # The loop's adapters (B made non-zero), stacked per kernel, must give the scanned model the same function.
  key = jax.random.key(1)
  trained = {}
  for name in loop_adapters:
    key, sub = jax.random.split(key)
    entry = loop_adapters[name]
    trained[name] = {"a": entry["a"][...], "b": 0.05 * jax.random.normal(sub, entry["b"][...].shape)}
  as_stacked = {}
  for name in stacked:
    per_layer = [trained[name.replace("layers.", f"layers.{i}.", 1)] for i in range(2)]
    as_stacked[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)

  ids, mask = map(jnp.asarray, left_padded_batch())

  def loss(adapters, model):
    graphdef, state = nnx.split(model)
    return nll(nnx.merge(graphdef, lora.merge(state, adapters, spec)), ids, mask)

  want, want_grads = jax.value_and_grad(loss)(trained, loop)
  got, got_grads = jax.value_and_grad(loss)(as_stacked, scanned)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for name in as_stacked:
    for i in range(2):
      for part in ("a", "b"):
        np.testing.assert_allclose(
            got_grads[name][part][i],
            want_grads[name.replace("layers.", f"layers.{i}.", 1)][part],
            rtol=1e-4,
            atol=1e-7,
            err_msg=f"{name} {part} layer {i}",
        )
  # The merged scanned model exports the same HF tensors as the merged loop model.
  ours = helpers.merged_model(scanned, as_stacked, spec)
  save_pretrained(ours, str(tmp_path / "scanned"))
  save_pretrained(helpers.merged_model(loop, trained, spec), str(tmp_path / "loop"))
  x, y = st.CheckpointReader(str(tmp_path / "scanned")), st.CheckpointReader(str(tmp_path / "loop"))
  for name in y.keys():
    np.testing.assert_allclose(np.asarray(x.view(name)), np.asarray(y.view(name)), rtol=1e-6, atol=1e-7)


def tiny_config(model_type="qwen2", **kw):
  return ModelConfig(
      model_type=model_type,
      vocab_size=96,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
      qkv_bias=True,
      **kw,
  )


def step_batch(seed=0, batch=4, p=6, c=5):
  rng = np.random.default_rng(seed)
  out = dict(
      prompt_ids=rng.integers(3, 90, (batch, p)).astype(np.int32),
      prompt_mask=np.ones((batch, p), bool),
      completion_ids=rng.integers(3, 90, (batch, c)).astype(np.int32),
      completion_mask=np.ones((batch, c), bool),
      student_generated=np.array(False),
  )
  out["prompt_mask"][0, :2] = False
  out["completion_mask"][1, 3:] = False
  return out


def test_train_step_and_checkpoint_on_scanned(tmp_path):
  """Two GKD steps (full and fused divergence) on a scanned student + teacher == the loop models', and the
  stacked train state survives an orbax save/restore bitwise."""
  results = {}
  for divergence in ("full", "fused"):
    cfg = ts.StepConfig(beta=0.5, vocab_size=90, sft_alpha=0.1, divergence=divergence)
    for scan in (False, True):
      student = CausalLM(tiny_config(), rngs=nnx.Rngs(0), scan_layers=scan, remat="full" if scan else "none")
      teacher = CausalLM(tiny_config(), rngs=nnx.Rngs(1), scan_layers=scan)
      tx, schedule = optim.make_optimizer(1e-2, 100, schedule="constant", max_grad_norm=None)
      step = jax.jit(ts.make_steps(student, tx, schedule, cfg, teacher=teacher)[0])
      state = ts.create_train_state(nnx.state(student), tx, teacher_params=nnx.state(teacher), rng=jax.random.key(0))
      for i in range(2):
        state, metrics = step(state, step_batch(i))
      results[divergence, scan] = state, jax.device_get(metrics)
    (want, want_m), (got, got_m) = results[divergence, False], results[divergence, True]
    for name in want_m:
      np.testing.assert_allclose(got_m[name], want_m[name], rtol=2e-5, atol=1e-7, err_msg=name)
    assert_trees_close(loop_layout(got.params), want.params, rtol=1e-4, atol=3e-5)

  state = results["full", True][0]
  with checkpoints.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    ckpt.save(2, state, {"fingerprint": "x"}, force=True)
  with checkpoints.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, _ = ckpt.restore(target, fingerprint="x")
  for x, y in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize(
    "kw, scan",
    [
        (dict(), False),  # GQA 2:1, full attention, loop
        (dict(sliding_window=3, layer_types=("sliding_attention", "full_attention", "sliding_attention")), True),
    ],
    ids=["gqa_loop", "gqa_sliding_scanned"],
)
def test_dot_product_attention_matches_xla(kw, scan):
  cfg = tiny_config(**kw)
  xla = CausalLM(cfg, rngs=nnx.Rngs(0), scan_layers=scan)
  fused = CausalLM(cfg, rngs=nnx.Rngs(0), scan_layers=scan, attention="dot_product")
  ids, mask = map(jnp.asarray, left_padded_batch(lengths=(12, 8, 5, 1)))
  ids = ids % 96
  full = xla(ids, mask)
  np.testing.assert_allclose(fused(ids, mask).logits, full.logits, rtol=1e-5, atol=1e-5)
  assert_trees_close(nnx.grad(nll)(fused, ids, mask), nnx.grad(nll)(xla, ids, mask), rtol=1e-4, atol=1e-6)
  kw = dict(key=jax.random.key(0), max_new_tokens=5, temperature=0.0)
  np.testing.assert_array_equal(
      sampling.generate(fused, ids[:, :8], mask[:, :8].at[:, -1].set(1), **kw).completion_ids,
      sampling.generate(xla, ids[:, :8], mask[:, :8].at[:, -1].set(1), **kw).completion_ids,
  )


def test_softcapped_attention_keeps_the_einsum(checkpoint):
  """Gemma 2's attention softcap has no fused kernel: every attention setting runs the einsum there."""
  directory = checkpoint("gemma2")
  ids, mask = map(jnp.asarray, left_padded_batch())
  want = from_pretrained(directory)(ids, mask).logits
  got = from_pretrained(directory, attention="dot_product", scan_layers=True)(ids, mask).logits
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_splash_needs_a_tpu():
  model = CausalLM(tiny_config(), rngs=nnx.Rngs(0), attention="splash")
  with pytest.raises(ValueError, match="attention='splash' needs a TPU"):
    model(jnp.ones((1, 8), jnp.int32))
  with pytest.raises(ValueError, match="static per-layer windows"):
    CausalLM(tiny_config(sliding_window=3), rngs=nnx.Rngs(0), attention="splash", scan_layers=True)


# ------------------------------------------------------------------------------------------ LM head, config


def test_one_lm_head_owner():
  cfg = dataclasses.replace(tiny_config(), final_logit_softcapping=0.5, vocab_size=96)
  model = CausalLM(cfg, rngs=nnx.Rngs(0), scan_layers=True)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 90, (2, 7)))
  out = model(ids)
  h = np.asarray(out.hidden_states, np.float64)
  w, cap = model.head()
  assert cap == 0.5 and w.shape == (32, 96)
  ref = cap * np.tanh(h @ np.asarray(w, np.float64) / cap)
  np.testing.assert_allclose(out.logits, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.logits(out.hidden_states, 40), ref[..., :40], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      model.logits(out.hidden_states, 40, dtype=jnp.float32), ref[..., :40], rtol=1e-5, atol=1e-6
  )


def test_config_fields_reach_the_model():
  c = config_lib.base_config()
  assert (c.scan_layers, c.remat, c.attention) == (True, "dots", "xla")
  c.model, c.dataset = "m", "d"
  config_lib.validate(c)
  assert model_options(c) == {"scan_layers": True, "remat": "dots", "attention": "xla"}
  for field, bad, allowed in (("remat", "some", config_lib.REMAT), ("attention", "flash", config_lib.ATTENTION)):
    bad_config = config_lib.base_config()
    bad_config.model, bad_config.dataset = "m", "d"
    bad_config[field] = bad
    with pytest.raises(ValueError, match=f"config.{field}='{bad}' is invalid") as e:
      config_lib.validate(bad_config)
    assert str(allowed) in str(e.value)


@pytest.mark.parametrize("window", [None, 5])
def test_splash_kernel_matches_xla_in_interpret_mode(window):
  """The splash kernel (Pallas interpreter on CPU) vs the XLA einsum attention on real rows, with left
  padding, GQA 2:1 and an optional local window: outputs and gradients."""
  b, t, n, kv, d = 2, 128, 4, 2, 8
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, n, d))
  k, v = jax.random.normal(keys[1], (b, t, kv, d)), jax.random.normal(keys[2], (b, t, kv, d))
  mask = jnp.arange(t)[None] >= jnp.array([[0], [37]])  # row 1: 37 padding tokens
  weights = jax.random.normal(keys[3], (b, t, n, d)) * mask[:, :, None, None]  # real rows only
  slots = jnp.arange(t)
  allowed = (slots[None, :] <= slots[:, None]) & mask[:, None, :]
  if window is not None:
    allowed &= (slots[:, None] - slots[None, :]) < window
  cfg = tiny_config()
  attn = CausalLM(cfg, rngs=nnx.Rngs(0)).layers[0].attn

  def xla(q, k, v):
    return jnp.sum(attn._xla(q, k, v, allowed) * weights)

  def splash(q, k, v):
    return jnp.sum(transformer._splash(q, k, v, mask, window, attn.scale, interpret=True) * weights)

  want, want_grads = jax.value_and_grad(xla, (0, 1, 2))(q, k, v)
  got, got_grads = jax.value_and_grad(splash, (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for x, y in zip(got_grads, want_grads):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  if window is None:  # under a mesh: one kernel per device on its batch shard (shard_map)
    mesh = shd.make_mesh(2, 1, 4)
    out = jax.jit(lambda q, k, v: transformer._splash(q, k, v, mask, None, attn.scale, interpret=True, mesh=mesh))
    want = attn._xla(q, k, v, allowed) * mask[:, :, None, None]
    np.testing.assert_allclose(out(q, k, v) * mask[:, :, None, None], want, rtol=1e-5, atol=1e-5)
