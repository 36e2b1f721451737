"""The pure GKD train step on tiny random models: divergence paths agree, sharding and accumulation are
exact, the teacher is never touched, sft_alpha adds exactly α·NLL, OPSD aligns on completion tokens."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gkd_jax import config as config_lib
from gkd_jax import optim, sharding
from gkd_jax import train_step as ts
from gkd_jax.models import CausalLM, ModelConfig
import helpers

B, P, C = 8, 6, 5


def model_config(hidden, heads, kv, vocab, tie):
  return ModelConfig(
      model_type="qwen2",
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=2 * hidden,
      num_hidden_layers=2,
      num_attention_heads=heads,
      num_key_value_heads=kv,
      head_dim=hidden // heads,
      qkv_bias=True,
      tie_word_embeddings=tie,
  )


@pytest.fixture(scope="module")
def models():
  # Different widths, heads and padded embedding sizes over one 90-token "tokenizer".
  student = CausalLM(model_config(32, 4, 2, vocab=96, tie=True), rngs=nnx.Rngs(0))
  teacher = CausalLM(model_config(48, 4, 4, vocab=100, tie=False), rngs=nnx.Rngs(1))
  return student, teacher


def make_batch(seed=0, student_generated=False, batch=B):
  rng = np.random.default_rng(seed)
  out = dict(
      prompt_ids=rng.integers(3, 90, (batch, P)).astype(np.int32),
      prompt_mask=np.ones((batch, P), bool),
      completion_ids=rng.integers(3, 90, (batch, C)).astype(np.int32),
      completion_mask=np.ones((batch, C), bool),
      student_generated=np.array(student_generated),
  )
  out["prompt_mask"][0, :2] = False  # left padding
  out["prompt_ids"][0, :2] = 0
  out["completion_mask"][1, 3:] = False  # right padding after a stop
  return out


_STEPS = {}  # compiled steps shared across tests: (models, config, lr, optimizer) -> (tx, jitted step)


def grad_capture():
  """An optimizer that leaves the params as they are and keeps the step's gradients as its state: the
  gradients the train step computed, with no optimizer arithmetic on top."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


def compiled_step(models, cfg, lr, optimizer="adamw"):
  key = (id(models[0]), id(models[1]), cfg, lr, optimizer)
  if key not in _STEPS:
    tx, schedule = optim.make_optimizer(lr, 100, schedule="constant", max_grad_norm=None)
    if optimizer == "grads":
      tx = grad_capture()
    _STEPS[key] = tx, jax.jit(ts.make_steps(models[0], tx, schedule, cfg, teacher=models[1])[0])
  return _STEPS[key]


def run(models, cfg, batch, steps=1, lr=1e-2, shard=None, optimizer="adamw"):
  student, teacher = models
  tx, step = compiled_step(models, cfg, lr, optimizer)
  params, teacher_params = nnx.state(student), nnx.state(teacher) if cfg.teacher == "model" else None
  if shard is not None:
    mesh = sharding.make_mesh(*shard)
    params = helpers.shard_state(params, mesh)
    teacher_params = None if teacher_params is None else helpers.shard_state(teacher_params, mesh)
    batch = {
        k: jax.device_put(v, NamedSharding(mesh, PartitionSpec(*(("data", "fsdp"),) if np.ndim(v) else ())))
        for k, v in batch.items()
    }
  state = ts.create_train_state(params, tx, teacher_params=teacher_params, rng=jax.random.key(0))
  history = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


def assert_trees_close(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


BASE = ts.StepConfig(beta=0.5, temperature=0.9, vocab_size=90, sft_alpha=0.1)


@pytest.fixture(scope="module")
def reference(models):
  return run(models, BASE, make_batch(), steps=2)


@pytest.mark.parametrize("variant", ["fused", "topk_full_vocab"])
def test_divergence_paths_agree(models, reference, variant):
  cfg = (
      dataclasses.replace(BASE, divergence="fused", chunk_size=7)
      if variant == "fused"
      else dataclasses.replace(BASE, divergence="topk", topk=90)
  )
  state, history = run(models, cfg, make_batch(), steps=2)
  ref_state, ref_history = reference
  for name in history[-1]:
    np.testing.assert_allclose(history[-1][name], ref_history[-1][name], rtol=2e-5, atol=1e-7, err_msg=name)
  assert_trees_close(state.params, ref_state.params, rtol=1e-4, atol=3e-5)  # Adam amplifies float noise


@pytest.fixture(scope="module")
def reference_grads(models):
  return run(models, BASE, make_batch(), optimizer="grads")


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_equals_single_device(models, reference_grads, mesh):
  """Sharding must preserve the loss and the gradients; it only changes the order of float32 sums.

  Not the params after an Adam step: Adam divides by sqrt(v), so an element whose gradient is near 0 turns
  a last-bit difference into an update of the order of the learning rate (seen on AVX-512 Xeons: 3.65e-5
  off, relative 8.8e-4). The gradients come out of the same jitted train step (a grad-capturing optimizer).

  Tolerance: a float32 sum of n terms reordered differs by at most ~n·eps·Σ|terms| (eps = 6e-8), in
  practice ~sqrt(n)·eps·max|term|. The sums here (tokens B·(P+C) = 88, widths ≤ 96, vocab ≤ 100) are short,
  so each element's error is well under 1e-5 of the tensor's largest gradient: atol = 1e-5·max|g| per
  tensor (an element near 0 is judged against its tensor's scale, not its own), rtol 1e-5 for the rest.
  The scalar metrics are single reductions of the same kind: rtol 1e-5."""
  state, history = run(models, BASE, make_batch(), shard=mesh, optimizer="grads")
  ref_state, ref_history = reference_grads
  for name in ("loss", "distill_loss", "sft_loss", "grad_norm", "forward_kl"):
    np.testing.assert_allclose(history[-1][name], ref_history[-1][name], rtol=1e-5, err_msg=name)
  grads, ref_grads = jax.tree.leaves(state.opt_state), jax.tree.leaves(ref_state.opt_state)
  assert len(grads) == len(ref_grads) == len(jax.tree.leaves(state.params))
  for g, ref in zip(grads, ref_grads):
    ref = np.asarray(ref)
    assert np.abs(ref).max() > 0  # every tensor gets a gradient: the comparison is not vacuous
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  embedding = state.params["embed"]["embedding"][...]
  assert len(embedding.sharding.device_set) == 8  # the step really ran sharded


def test_gradient_accumulation_equals_one_big_batch(models, reference):
  state, history = run(models, dataclasses.replace(BASE, grad_accum_steps=4), make_batch(), steps=2)
  ref_state, ref_history = reference
  for name in ("loss", "distill_loss", "sft_loss", "grad_norm", "forward_kl", "tokens"):
    np.testing.assert_allclose(history[-1][name], ref_history[-1][name], rtol=1e-5, err_msg=name)
  assert_trees_close(state.params, ref_state.params, rtol=1e-4, atol=3e-5)  # Adam amplifies float noise


def test_remat_under_gradient_accumulation_keeps_the_gradients(models):
  """A per-layer-checkpointed unrolled stack inside the accumulation scan (nnx.remat once failed to trace
  there: "Cannot mutate Param from a different trace level") gives the plain step's gradients."""
  student, teacher = models
  # The same weights as `models`; the teacher too, whose forward runs inside the scan on params from outside it.
  remat = [CausalLM(m.config, rngs=nnx.Rngs(seed), remat="dots") for m, seed in ((student, 0), (teacher, 1))]
  state, _ = run(remat, dataclasses.replace(BASE, grad_accum_steps=2), make_batch(), optimizer="grads")
  ref_state, _ = run(models, BASE, make_batch(), optimizer="grads")
  assert_trees_close(state.opt_state, ref_state.opt_state, rtol=1e-5, atol=1e-7)


def test_only_the_student_changes(models, reference):
  student, teacher = models
  state, _ = reference
  for x, y in zip(jax.tree.leaves(state.teacher_params), jax.tree.leaves(nnx.state(teacher))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  changed = [
      not np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(nnx.state(student)))
  ]
  assert all(changed)
  assert int(state.step) == 2


def test_sft_alpha_adds_exactly_alpha_nll_on_non_student_batches(models):
  alpha = BASE.sft_alpha
  cfg = BASE
  _, (dataset_step,) = run(models, cfg, make_batch(), lr=0.0)
  np.testing.assert_allclose(
      dataset_step["loss"], dataset_step["distill_loss"] + alpha * dataset_step["sft_loss"], rtol=1e-6
  )
  _, (plain,) = run(models, dataclasses.replace(BASE, sft_alpha=0.0), make_batch(), lr=0.0)
  assert "sft_loss" not in plain
  np.testing.assert_allclose(plain["loss"], plain["distill_loss"], rtol=1e-6)
  np.testing.assert_allclose(dataset_step["distill_loss"], plain["distill_loss"], rtol=1e-6)
  _, (student_step,) = run(models, cfg, make_batch(student_generated=True), lr=0.0)
  np.testing.assert_allclose(student_step["loss"], student_step["distill_loss"], rtol=1e-6)


def test_opsd_teacher_prompt_aligns_on_completion_tokens(models):
  """Self-distillation where the teacher's prompt is the student's with 3 more pad columns: the two
  distributions at every completion token are the same, so the divergence is 0. A one-column misalignment
  of the teacher side would make it large."""
  cfg = dataclasses.replace(BASE, teacher="self")
  batch = make_batch()
  pad = np.zeros((B, 3), np.int32)
  batch.update(
      teacher_prompt_ids=np.concatenate([pad, batch["prompt_ids"]], 1),
      teacher_prompt_mask=np.concatenate([pad.astype(bool), batch["prompt_mask"]], 1),
  )
  _, (same,) = run(models, cfg, batch, lr=0.0)
  assert same["distill_loss"] < 1e-6
  assert same["top1_agreement"] == 1.0
  # A privileged teacher prompt (a different context) gives a real signal.
  batch["teacher_prompt_ids"] = np.concatenate([np.full((B, 3), 7, np.int32), batch["prompt_ids"]], 1)
  batch["teacher_prompt_mask"] = np.ones((B, P + 3), bool)
  _, (privileged,) = run(models, cfg, batch, lr=0.0)
  assert privileged["distill_loss"] > 1e-4


def test_loss_falls_when_the_student_can_match(models):
  student, teacher = models
  sharp = nnx.clone(teacher)  # a random teacher is near uniform: sharpen it so there is something to learn
  sharp.lm_head["kernel"][...] = 40.0 * sharp.lm_head["kernel"][...]
  _, history = run((student, sharp), dataclasses.replace(BASE, divergence="fused"), make_batch(), steps=25, lr=1e-2)
  assert history[0]["distill_loss"] > 0.1
  assert history[-1]["distill_loss"] < 0.5 * history[0]["distill_loss"]


def test_sft_objective_is_plain_nll(models):
  cfg = ts.StepConfig(objective="sft", teacher="none", vocab_size=90)
  _, history = run(models, cfg, make_batch(), steps=15, lr=1e-2)
  assert history[0]["loss"] == history[0]["sft_loss"] and "distill_loss" not in history[0]
  assert history[-1]["loss"] < 0.7 * history[0]["loss"]


def test_label_smoothing_smooths_the_training_term_only(models):
  """Smoothed SFT keeps mass off the targets (higher plain NLL after the same steps); the eval step of either
  config reports the plain NLL."""
  batch = make_batch()
  plain = ts.StepConfig(objective="sft", teacher="none", vocab_size=90)
  smooth = ts.StepConfig(objective="sft", teacher="none", vocab_size=90, label_smoothing=0.3)
  student, _ = models
  tx = optax.sgd(0.0)
  nll = {}
  for name, cfg in (("plain", plain), ("smooth", smooth)):
    state, history = run(models, cfg, batch, steps=15, lr=1e-2)
    evals = [ts.make_steps(student, tx, lambda s: 0.0, c)[1](state, batch)["nll"] for c in (plain, smooth)]
    assert float(evals[0]) == float(evals[1])  # evaluation ignores the smoothing
    nll[name] = float(evals[0])
    assert history[-1]["loss"] < history[0]["loss"]
  assert nll["smooth"] > nll["plain"] + 0.05


def test_step_config_errors():
  with pytest.raises(ValueError, match=r"divergence must be one of .* got 'kl'"):
    ts.StepConfig(divergence="kl")
  with pytest.raises(ValueError, match=r"divergence='topk' needs topk ≥ 1, got None"):
    ts.StepConfig(divergence="topk")
  with pytest.raises(ValueError, match=r"teacher server .* needs divergence='topk'"):
    ts.StepConfig(teacher="server")
  with pytest.raises(ValueError, match=r"objective='sft' needs teacher=none"):
    ts.StepConfig(objective="sft")
  with pytest.raises(ValueError, match=r"sft_alpha must be ≥ 0, got -1"):
    ts.StepConfig(sft_alpha=-1)


def run_config(**changes):
  config = config_lib.base_config()
  config.update({"model": "student", "teacher_model": "teacher", **changes})
  return config


def test_step_config_from_run_config():
  cfg = ts.StepConfig.from_run_config(run_config(beta=0.3, sft_alpha=0.1), 90, offload_teacher=True)
  assert cfg == ts.StepConfig(
      teacher="model", divergence="full", beta=0.3, temperature=0.9, sft_alpha=0.1, vocab_size=90
  )
  fused = ts.StepConfig.from_run_config(run_config(fused_loss=True, loss_chunk_size=64), 90, offload_teacher=False)
  assert (fused.divergence, fused.chunk_size) == ("fused", 64)
  topk = ts.StepConfig.from_run_config(run_config(gkd_logits_topk=8, fused_loss=True), 90, offload_teacher=False)
  assert (topk.divergence, topk.topk) == ("topk", 8)  # top-k wins over fused
  server = run_config(teacher_model=None, teacher_model_server="http://teacher:8000", gkd_logits_topk=4)
  assert ts.teacher_kind(server) == "server" and ts.StepConfig.from_run_config(server, 90, False).teacher == "server"
  assert ts.StepConfig.from_run_config(run_config(loss_temperature=2.0), 90, False).temperature == 2.0
  sft = ts.StepConfig.from_run_config(run_config(objective="sft"), 90, False)
  assert (sft.objective, sft.teacher) == ("sft", "none")
  assert ts.teacher_kind(run_config(teacher_model=None)) == "self"
  # The teacher's params are offloaded only when asked for, the teacher is a model and the host can hold them.
  offload = lambda **kw: ts.StepConfig.from_run_config(run_config(offload_teacher_model=True, **kw), 90, True)
  assert offload().offload_teacher and not offload(teacher_model=None).offload_teacher
  assert not ts.StepConfig.from_run_config(run_config(offload_teacher_model=True), 90, False).offload_teacher
  assert not ts.StepConfig.from_run_config(run_config(), 90, True).offload_teacher


def test_optimizer_state_is_sharded_like_the_params():
  """ZeRO: the Adam moments take their params' shardings (jit(tx.init) alone leaves them on one device)."""
  mesh = sharding.make_mesh(1, -1, 1)
  params = {
      "w": jax.device_put(jnp.ones((16, 4)), NamedSharding(mesh, PartitionSpec("fsdp"))),
      "b": jax.device_put(jnp.ones((4,)), NamedSharding(mesh, PartitionSpec())),
  }
  tx, _ = optim.make_optimizer(1e-3, 10, weight_decay=0.1)
  state = ts.create_train_state(params, tx, rng=jax.random.key(0))
  shapes = {l.shape: l.sharding for l in jax.tree.leaves(state.opt_state)}
  assert shapes[(16, 4)].spec == PartitionSpec("fsdp") and shapes[(16, 4)].mesh == mesh
  assert shapes[(4,)].spec == PartitionSpec() and shapes[(4,)].mesh == mesh
  assert shapes[()].mesh == mesh  # step counts: replicated on the mesh
  moments = [l for l in jax.tree.leaves(state.opt_state) if l.shape == (16, 4)]
  assert len(moments) == 2 and all(m.addressable_shards[0].data.shape == (16 // mesh.size, 4) for m in moments)
