"""Functional LoRA on a tiny Qwen2: exact identity at init, merge math, adapter-only training, HF export of the
merged weights, sharded adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec

from gkd_jax import lora
from gkd_jax import sharding as shd
from gkd_jax.models import from_pretrained, save_pretrained
import helpers

V, H, M, L, N, KV = 64, 32, 48, 2, 4, 2
D = H // N
B, T = 4, 10
ATTN_MLP = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random Qwen2 saved by transformers' PyTorch classes (the real loading path is exercised)."""
  torch.manual_seed(0)
  config = transformers.Qwen2Config(
      vocab_size=V,
      hidden_size=H,
      intermediate_size=M,
      num_hidden_layers=L,
      num_attention_heads=N,
      num_key_value_heads=KV,
      max_position_embeddings=64,
      tie_word_embeddings=False,
  )
  directory = str(tmp_path_factory.mktemp("qwen2"))
  transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").save_pretrained(directory)
  return directory


@pytest.fixture(scope="module")
def model(hf_dir):
  return from_pretrained(hf_dir)


def batch(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, V, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[0, :3] = 0  # left padding
  return jnp.asarray(ids), jnp.asarray(mask)


def randomize_b(adapters, seed=1, std=0.05):
  """Non-zero B (a trained adapter), so merged weights really differ from the base."""
  key = jax.random.key(seed)
  out = {}
  for i, name in enumerate(sorted(adapters)):
    a, b = adapters[name]["a"], adapters[name]["b"]
    out[name] = {"a": a, "b": b.replace(std * jax.random.normal(jax.random.fold_in(key, i), b.shape))}
  return nnx.State(out)


def expected_count(rank, modules=ATTN_MLP):
  per_layer = {
      "q": H + N * D,
      "k": H + KV * D,
      "v": H + KV * D,
      "o": N * D + H,
      "gate": H + M,
      "up": H + M,
      "down": M + H,
  }
  return L * rank * sum(per_layer[m] for m in modules)


def test_zero_b_merge_is_the_base_exactly(model):
  params = nnx.state(model)
  spec = lora.LoraSpec(rank=4, alpha=8)
  adapters = lora.init_adapters(params, spec, jax.random.key(0))
  assert sorted(adapters) == sorted(
      f"layers.{i}.{blk}.{m}.kernel"
      for i in range(L)
      for blk, mods in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
      for m in mods
  )
  q = adapters["layers.0.attn.q.kernel"]
  assert q["a"].shape == (H, 4) and q["b"].shape == (4, N, D)
  assert adapters["layers.1.attn.o.kernel"]["a"].shape == (N, D, 4)  # o reads [heads, head_dim]
  assert float(jnp.abs(q["a"][...]).max()) > 0 and float(jnp.abs(q["b"][...]).max()) == 0
  assert lora.count(adapters) == expected_count(4)

  merged = lora.merge(params, adapters, spec)
  assert jax.tree.structure(merged, is_leaf=lambda x: isinstance(x, nnx.Variable)) == jax.tree.structure(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Works under jit with the spec static, and gives a usable model.
  jitted = jax.jit(lora.merge, static_argnums=2)(params, adapters, spec)
  graphdef = nnx.graphdef(model)
  ids, mask = batch()
  np.testing.assert_array_equal(nnx.merge(graphdef, jitted)(ids, mask).logits, model(ids, mask).logits)


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_math_matches_numpy(model, rslora):
  params = nnx.state(model)
  spec = lora.LoraSpec(rank=3, alpha=5.0, target_modules=("o", "q"), use_rslora=rslora)
  adapters = randomize_b(lora.init_adapters(params, spec, jax.random.key(1)))
  merged = lora.merge(params, adapters, spec)
  scale = 5.0 / (np.sqrt(3) if rslora else 3)
  assert spec.scale == pytest.approx(scale)
  for name, (n_in, shape) in {
      "layers.1.attn.o.kernel": (2, (N, D, H)),
      "layers.0.attn.q.kernel": (1, (H, N, D)),
  }.items():
    path = name.split(".")
    w = np.asarray(params["layers"][int(path[1])]["attn"][path[3]]["kernel"][...], np.float64)
    a = np.asarray(adapters[name]["a"][...], np.float64)
    b = np.asarray(adapters[name]["b"][...], np.float64)
    assert w.shape == shape
    fan_in = int(np.prod(shape[:n_in]))
    want = (w.reshape(fan_in, -1) + scale * a.reshape(fan_in, 3) @ b.reshape(3, -1)).reshape(shape)
    got = merged["layers"][int(path[1])]["attn"][path[3]]["kernel"][...]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    assert np.abs(want - w).max() > 1e-3  # the delta is not negligible
  # Untargeted kernels pass through untouched.
  np.testing.assert_array_equal(
      merged["layers"][0]["attn"]["k"]["kernel"][...], params["layers"][0]["attn"]["k"]["kernel"][...]
  )

  # bf16 base weights: the sum is formed in f32 and cast back, so the merged kernel keeps W's dtype.
  w16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  m16 = lora.merge(w16, adapters, spec)["layers"][1]["attn"]["o"]["kernel"][...]
  assert m16.dtype == jnp.bfloat16


def test_target_module_validation(model):
  params = nnx.state(model)
  with pytest.raises(ValueError) as err:
    lora.init_adapters(params, lora.LoraSpec(target_modules=("q_proj", "v")), jax.random.key(0))
  message = str(err.value)
  assert "q_proj" in message and "targetable names" in message
  for name in ATTN_MLP + ("lm_head",):
    assert repr(name) in message
  with pytest.raises(ValueError, match="rank"):
    lora.LoraSpec(rank=0)
  assert lora.targetable_modules(model) == sorted(ATTN_MLP + ("lm_head",))
  # "all-linear" = every projection but the LM head; a bare string is one module, not its letters.
  all_linear = lora.init_adapters(params, lora.LoraSpec(rank=2, target_modules=("all-linear",)), jax.random.key(0))
  assert lora.count(all_linear) == expected_count(2)
  head = lora.init_adapters(params, lora.LoraSpec(rank=2, target_modules="lm_head"), jax.random.key(0))
  assert list(head) == ["lm_head.kernel"] and lora.count(head) == 2 * (H + V)
  # Adapters that do not fit the params (another rank, another model) are an error, not a silent no-op.
  with pytest.raises(ValueError, match="does not fit"):
    lora.merge(params, head, lora.LoraSpec(rank=3, target_modules="lm_head"))
  with pytest.raises(ValueError, match="not in params"):
    lora.merge(nnx.state(model.layers[0]), head, lora.LoraSpec(rank=2, target_modules="lm_head"))


def test_training_updates_only_the_adapters(model):
  graphdef, params = nnx.split(model)
  base_before = jax.tree.map(np.array, params)
  spec = lora.LoraSpec(rank=4, alpha=8, target_modules=("q", "v", "down", "lm_head"))
  adapters = lora.init_adapters(params, spec, jax.random.key(2))
  assert lora.count(adapters) == expected_count(4, ("q", "v", "down")) + 4 * (H + V)
  tx = optax.adam(3e-2)
  opt_state = tx.init(adapters)
  ids, mask = batch(3)

  def loss_fn(adapters, params):
    logits = nnx.merge(graphdef, lora.merge(params, adapters, spec))(ids, mask).logits[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

  @jax.jit
  def step(adapters, opt_state, params):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, params)  # w.r.t. the adapters only
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss, grads

  losses = []
  for i in range(25):
    adapters, opt_state, loss, grads = step(adapters, opt_state, params)
    if i == 0:  # B = 0: only B gets a gradient at first (dL/dA = s·dW·Bᵀ = 0)
      assert all(float(jnp.abs(g["a"][...]).max()) == 0 for g in grads.values())
      assert all(float(jnp.abs(g["b"][...]).max()) > 0 for g in grads.values())
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
  for x, y in zip(jax.tree.leaves(base_before), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, np.asarray(y))
  # The optimizer state is adapter-sized (Adam: two moments per adapter param, plus a step count).
  assert sum(np.size(x) for x in jax.tree.leaves(opt_state)) == 2 * lora.count(adapters) + 1


def test_merged_export_loads_in_transformers(model, hf_dir, tmp_path):
  spec = lora.LoraSpec(rank=4, alpha=8, target_modules=ATTN_MLP + ("lm_head",))
  adapters = randomize_b(lora.init_adapters(model, spec, jax.random.key(3)))
  before = jax.tree.map(np.array, nnx.state(model))
  merged = helpers.merged_model(model, adapters, spec)
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(model))):  # the base model is not modified
    np.testing.assert_array_equal(x, np.asarray(y))
  save_pretrained(merged, str(tmp_path))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  ids, mask = batch(4)
  with torch.no_grad():
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    hf_logits = hf(
        input_ids=torch.tensor(np.asarray(ids)),
        attention_mask=torch.tensor(np.asarray(mask)),
        position_ids=torch.tensor(positions),
    ).logits.numpy()
  jax_logits = np.asarray(merged(ids, mask).logits)
  real = np.asarray(mask)[..., None].astype(bool)
  assert np.abs(np.where(real, jax_logits - hf_logits, 0)).max() <= 1e-4
  base_logits = np.asarray(model(ids, mask).logits)
  assert np.abs(np.where(real, jax_logits - base_logits, 0)).max() > 1e-2  # the adapters changed the model


def test_sharded_adapters_match_single_device(model):
  graphdef, params = nnx.split(model)
  spec = lora.LoraSpec(rank=4, alpha=8, target_modules=ATTN_MLP + ("lm_head",))
  adapters = randomize_b(lora.init_adapters(params, spec, jax.random.key(4)))
  ids, mask = batch(5)

  @jax.jit
  def forward(params, adapters, ids, mask):
    return nnx.merge(graphdef, lora.merge(params, adapters, spec))(ids, mask).logits

  reference = np.asarray(forward(params, adapters, ids, mask))
  mesh = shd.make_mesh(2, 2, 2)
  shardings = lora.adapter_shardings(adapters, mesh)
  # Adapters shard like their kernels: A over the kernel's input names, B over its output names, rank replicated.
  assert shardings["layers.0.attn.q.kernel"]["a"].get_value().spec == PartitionSpec("fsdp", None)
  assert shardings["layers.0.attn.q.kernel"]["b"].get_value().spec == PartitionSpec(None, "tensor", None)
  assert shardings["layers.0.attn.o.kernel"]["a"].get_value().spec == PartitionSpec("tensor", None, None)
  assert shardings["layers.0.mlp.down.kernel"]["b"].get_value().spec == PartitionSpec(None, "fsdp")
  sharded_adapters = jax.device_put(adapters, shardings)
  sharded_params = helpers.shard_state(params, mesh)
  data = jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  out = forward(sharded_params, sharded_adapters, jax.device_put(ids, data), jax.device_put(mask, data))
  np.testing.assert_allclose(np.asarray(out), reference, rtol=1e-5, atol=1e-5)
