"""The GKD train state and the pure train step `(state, batch) -> (state, metrics)`.

A batch holds left-padded prompts [B, P] and right-padded completions [B, C] (from the dataset, or
filled in by the sampler for on-policy / seq_kd steps). The model reads `prompt ++ completion`; since the
completion always starts at column P, the loss only ever looks at the C completion columns, aligned with
`losses.shift_for_next_token(..., first_target=P)`, and the LM head never sees a prompt position. The
teacher may read a different prompt (OPSD's `teacher_prompt`, width Pt): its completion columns start at
Pt, so the two line up token for token.

Batch keys: prompt_ids, prompt_mask [B, P]; completion_ids, completion_mask [B, C]; student_generated
(bool scalar: the sft term applies only when False); optional teacher_prompt_ids/_mask [B, Pt]; optional
teacher_topk_values/_indices [B, C, k] (a teacher server's log-probs, aligned to completion columns).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gkd_jax import fused_losses, lora, losses
from gkd_jax.models import transformer

DIVERGENCES = ("full", "topk", "fused")
TEACHERS = ("model", "self", "server", "none")
OBJECTIVES = ("gkd", "sft")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the train step (hashable: a change compiles a new step)."""

  objective: str = "gkd"  # "gkd": divergence (+ sft_alpha·NLL); "sft": NLL only, no teacher
  teacher: str = "model"  # "model" (own params), "self" (OPSD dynamic: the student's params),
  # "server" (top-k log-probs in the batch), "none" (sft)
  divergence: str = "full"  # "full" vocabulary, "topk" (teacher's top-k), "fused" (chunked from hidden)
  beta: float = 0.5
  temperature: float = 0.9  # loss temperature (divides both logits)
  topk: int | None = None
  sft_alpha: float = 0.0
  label_smoothing: float = 0.0  # of the SFT term in training (evaluation reports the plain NLL)
  vocab_size: int | None = None  # the tokenizer's vocabulary: both heads are cut to it
  chunk_size: int | None = None  # fused path
  grad_accum_steps: int = 1
  offload_teacher: bool = False  # teacher params live in host memory; brought to the device for its forward

  def __post_init__(self):
    for name, value, allowed in (
        ("objective", self.objective, OBJECTIVES),
        ("teacher", self.teacher, TEACHERS),
        ("divergence", self.divergence, DIVERGENCES),
    ):
      if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if (self.objective == "sft") != (self.teacher == "none"):
      raise ValueError(
          f"objective={self.objective!r} needs teacher={'none' if self.objective == 'sft' else 'a teacher'}"
          f", got teacher={self.teacher!r}"
      )
    if self.divergence == "topk" and not (isinstance(self.topk, int) and self.topk >= 1):
      raise ValueError(f"divergence='topk' needs topk ≥ 1, got {self.topk!r}")
    if self.teacher == "server" and self.divergence != "topk":
      raise ValueError("a teacher server returns top-k log-probs: it needs divergence='topk' (gkd_logits_topk)")
    if self.sft_alpha < 0:
      raise ValueError(f"sft_alpha must be ≥ 0, got {self.sft_alpha}")
    if not (isinstance(self.grad_accum_steps, int) and self.grad_accum_steps >= 1):
      raise ValueError(f"grad_accum_steps must be an int ≥ 1, got {self.grad_accum_steps!r}")

  @classmethod
  def from_run_config(cls, config, vocab_size: int, offload_teacher: bool) -> StepConfig:
    """The step settings of a run config (`gkd_jax.config`). `offload_teacher`: whether the host can hold
    the teacher's params; they are offloaded only when the config asks for it and the teacher is a model."""
    kind = teacher_kind(config)
    if config.gkd_logits_topk:
      divergence = "topk"
    else:
      divergence = "fused" if config.fused_loss else "full"
    return cls(
        objective=config.objective,
        teacher=kind,
        divergence=divergence,
        beta=config.beta,
        temperature=config.temperature if config.loss_temperature is None else config.loss_temperature,
        topk=config.gkd_logits_topk or None,
        sft_alpha=config.sft_alpha,
        label_smoothing=config.label_smoothing,
        vocab_size=vocab_size,
        chunk_size=config.get("loss_chunk_size"),
        grad_accum_steps=config.grad_accum_steps,
        offload_teacher=bool(config.offload_teacher_model) and kind == "model" and offload_teacher,
    )


def teacher_kind(config) -> str:
  """Which teacher a run config asks for: "none" (SFT), "server", "self" (OPSD dynamic), or "model"."""
  if config.objective == "sft":
    return "none"
  if config.teacher_model_server:
    return "server"
  if not config.teacher_model:
    return "self"
  return "model"  # includes OPSD fixed: teacher_model == model gives a frozen copy of the initial student


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # the student's trainable params (nnx.State)
  opt_state: Any  # optax state of the student only
  teacher_params: Any  # frozen teacher params (nnx.State), or None (server / OPSD dynamic / sft)
  rng: jax.Array  # root key; per-step keys are fold_in(rng, step)
  base_params: Any = None  # with LoRA: the student's frozen weights (params then holds the adapters)


def create_train_state(student_params, tx, *, teacher_params=None, rng, base_params=None) -> TrainState:
  """A fresh state; the optimizer state is built under jit so it inherits the params' shardings.

  student_params are the trainable params: the whole student, or its LoRA adapters (then base_params
  holds the frozen weights they are merged into)."""
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=student_params,
      opt_state=jax.jit(tx.init, out_shardings=opt_state_shardings(tx, student_params))(student_params),
      teacher_params=teacher_params,
      rng=rng,
      base_params=base_params,
  )


def opt_state_shardings(tx, params):
  """Shardings of tx.init(params): each moment as its param (ZeRO: sharded like the weights), the rest
  (step counts) replicated on the params' mesh; None when the params are not on a mesh. jit(tx.init) by
  itself would put the whole state on one device: its zeros depend on no input, so no sharding reaches them."""
  on_mesh = [x.sharding for x in jax.tree.leaves(params) if isinstance(getattr(x, "sharding", None), NamedSharding)]
  if not on_mesh:
    return None
  replicated = NamedSharding(on_mesh[0].mesh, PartitionSpec())
  # A moment's key path ends with its param's path (also inside optax.masked / multi_transform states, whose
  # moment trees leave out the frozen params, so they do not have the params' structure).
  by_path = {tuple(path): x.sharding for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}

  def sharding(path, _):
    path = tuple(path)
    return next((by_path[path[i:]] for i in range(len(path)) if path[i:] in by_path), replicated)

  return jax.tree_util.tree_map_with_path(sharding, jax.eval_shape(tx.init, params))


# --------------------------------------------------------------------------------------------- forwards


def _sequence(prompt_ids, prompt_mask, completion_ids, completion_mask):
  """prompt ++ completion, its attention mask, and the loss mask (completion tokens only)."""
  ids = jnp.concatenate([prompt_ids, completion_ids], axis=1).astype(jnp.int32)
  completion_mask = completion_mask.astype(bool)
  mask = jnp.concatenate([prompt_mask.astype(bool), completion_mask], axis=1)
  loss_mask = jnp.concatenate([jnp.zeros(prompt_mask.shape, bool), completion_mask], axis=1)
  return ids, mask, loss_mask


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask, pixel_values=None):
  """The model's final hidden states at the C columns that predict the completion tokens, with the targets
  and target mask: ([B, C] targets, [B, C] mask, [B, C, H] hidden). `pixel_values` [B, P, 3, S, S]: the
  images of a vision-language model's prompts (their image tokens sit in prompt_ids)."""
  ids, mask, loss_mask = _sequence(prompt_ids, prompt_mask, completion_ids, completion_mask)
  images = {} if pixel_values is None else {"pixel_values": pixel_values}
  out = model(ids, attention_mask=mask, **images)
  return losses.shift_for_next_token(ids, loss_mask, out.hidden_states, first_target=prompt_ids.shape[1])


# ------------------------------------------------------------------------------------------- the step


def make_steps(student, tx, lr_schedule, cfg: StepConfig, teacher=None, lora_spec=None):
  """(train_step, eval_step) for these models (only their graphs and configs are kept; the params live in the
  state). train_step(state, batch) -> (state, metrics); eval_step(state, batch) -> metrics computes the same
  teacher-forced losses and diagnostics (plus the student's NLL) without a gradient or an update. With a
  `lora_spec` the state's params are LoRA adapters merged into `state.base_params` for every forward."""
  if cfg.teacher == "model" and teacher is None:
    raise ValueError("teacher='model' needs a teacher model")
  teacher = teacher if cfg.teacher == "model" else student
  sizes = [student.config.vocab_size] + ([teacher.config.vocab_size] if cfg.teacher != "none" else [])
  vocab = cfg.vocab_size or min(sizes)
  if vocab > min(sizes):
    raise ValueError(
        f"vocab_size {vocab} exceeds a model's embedding size {min(sizes)}: the models do not share " f"the tokenizer"
    )
  ctx = _Step(
      cfg,
      nnx.graphdef(student),
      nnx.graphdef(teacher),
      vocab,
      teacher.logit_softcap,  # static: the head is traced
      lora_spec,
  )

  def train_step(state: TrainState, batch: dict):
    return _train_step(ctx, tx, lr_schedule, state, batch)

  eval_ctx = dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, label_smoothing=0.0))

  def eval_step(state: TrainState, batch: dict):
    return _eval_step(eval_ctx, state, batch)

  return train_step, eval_step


@dataclasses.dataclass(frozen=True)
class _Step:
  """What the step functions know besides the state: the settings and the models' graphs."""

  cfg: StepConfig
  student_def: Any
  teacher_def: Any  # the student's graph for teacher="self" (and unused without a teacher)
  vocab: int  # both heads are cut to it
  teacher_cap: float | None  # the teacher's final-logit softcap
  lora_spec: Any

  @property
  def with_nll(self) -> bool:
    """Whether the train step computes the NLL: it costs a pass over [B, C, V], so only when used."""
    return self.cfg.objective == "sft" or self.cfg.sft_alpha > 0


def _student_weights(ctx: _Step, params, base_params):
  return params if ctx.lora_spec is None else lora.merge(base_params, params, ctx.lora_spec)


def _teacher_side(ctx: _Step, teacher_params, params, mb):
  """Everything the loss needs from the teacher, outside the gradient (no teacher activations are kept
  for the backward pass). `params` are the student's merged weights (the teacher of OPSD dynamic)."""
  cfg, vocab = ctx.cfg, ctx.vocab
  if cfg.teacher == "server":
    return {"values": mb["teacher_topk_values"], "indices": mb["teacher_topk_indices"]}
  if cfg.teacher == "model" and cfg.offload_teacher:
    teacher_params = jax.device_put(teacher_params, jax.memory.Space.Device)
  teacher = nnx.merge(ctx.teacher_def, teacher_params if cfg.teacher == "model" else params)
  prompt_ids = mb.get("teacher_prompt_ids", mb["prompt_ids"])
  prompt_mask = mb.get("teacher_prompt_mask", mb["prompt_mask"])
  _, _, hidden = completion_hidden(
      teacher, prompt_ids, prompt_mask, mb["completion_ids"], mb["completion_mask"], mb.get("pixel_values")
  )
  if cfg.divergence == "fused":
    return jax.lax.stop_gradient({"hidden": hidden, "head": teacher.head(vocab)[0]})
  logits = jax.lax.stop_gradient(teacher.logits(hidden, vocab, dtype=jnp.float32))
  if cfg.divergence == "topk":
    values, indices = losses.teacher_topk(logits, cfg.topk)
    return {"values": values, "indices": indices}
  return {"logits": logits}


def loss_fn(ctx: _Step, params, mb, teacher, num_items, sft_weight, base_params, with_nll: bool):
  """(loss, aux) of one micro-batch: the divergence (+ sft_weight·NLL), or the NLL alone for sft; aux holds
  the loss terms and the token sums of the diagnostics (no gradient)."""
  cfg = ctx.cfg
  student = nnx.merge(ctx.student_def, _student_weights(ctx, params, base_params))
  targets, mask, hidden = completion_hidden(
      student, mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"], mb["completion_mask"], mb.get("pixel_values")
  )
  terms = _fused_terms if cfg.divergence == "fused" else _logit_terms
  distill, nll, sums = terms(ctx, student, hidden, targets, mask, teacher, num_items, with_nll)
  if cfg.objective == "sft":
    return nll, {"sft_loss": nll}
  loss = distill if nll is None else distill + sft_weight * nll
  aux = {"distill_loss": distill, **jax.lax.stop_gradient(sums)}
  return loss, aux if nll is None else {**aux, "sft_loss": nll}


def _fused_terms(ctx: _Step, student, hidden, targets, mask, teacher, num_items, with_nll):
  """(divergence, NLL, diagnostic sums) from hidden states, chunk by chunk (None / {} when not computed)."""
  cfg, vocab = ctx.cfg, ctx.vocab
  kw = dict(mask=mask, num_items=num_items)
  head, student_cap = student.head(vocab)
  nll = (
      fused_losses.fused_nll_loss(
          hidden,
          head,
          targets,
          softcap=student_cap,
          vocab_size=vocab,
          chunk_size=cfg.chunk_size,
          label_smoothing=cfg.label_smoothing,
          **kw,
      )
      if with_nll
      else None
  )
  if cfg.objective != "gkd":
    return None, nll, {}
  distill = fused_losses.fused_generalized_jsd_loss(
      hidden,
      head,
      teacher["hidden"],
      teacher["head"],
      beta=cfg.beta,
      temperature=cfg.temperature,
      chunk_size=cfg.chunk_size,
      vocab_size=vocab,
      student_softcap=student_cap,
      teacher_softcap=ctx.teacher_cap,
      **kw,
  )
  sums = _fused_stats(
      hidden, head, student_cap, teacher["hidden"], teacher["head"], ctx.teacher_cap, mask, vocab, cfg.temperature
  )
  return distill, nll, sums


def _logit_terms(ctx: _Step, student, hidden, targets, mask, teacher, num_items, with_nll):
  """(divergence, NLL, diagnostic sums) from the [B, C, V] logits (None / {} when not computed)."""
  cfg = ctx.cfg
  kw = dict(mask=mask, num_items=num_items)
  logits = student.logits(hidden, ctx.vocab, dtype=jnp.float32)
  nll = losses.nll_loss(logits, targets, label_smoothing=cfg.label_smoothing, **kw) if with_nll else None
  if cfg.objective != "gkd":
    return None, nll, {}
  if cfg.divergence == "full":
    distill, stats = losses.jsd_loss_and_stats(
        logits, teacher["logits"], beta=cfg.beta, temperature=cfg.temperature, **kw
    )
    return distill, nll, _token_sums(stats, mask)
  distill = losses.topk_generalized_jsd_loss(
      logits, teacher["values"], teacher["indices"], beta=cfg.beta, temperature=cfg.temperature, **kw
  )
  top1 = jnp.argmax(logits, -1) == teacher["indices"][..., 0]
  return distill, nll, {"top1_agreement": jnp.sum(jnp.where(mask, top1, False))}


def _micro_step(ctx: _Step, state: TrainState, num_items, sft_weight, carry, mb):
  """One gradient-accumulation step: adds the micro-batch's gradients and aux to the carry."""
  grads_acc, aux_acc = carry
  teacher = (
      None
      if ctx.cfg.teacher == "none"
      else _teacher_side(ctx, state.teacher_params, _student_weights(ctx, state.params, state.base_params), mb)
  )
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, ctx), has_aux=True)
  (loss, aux), grads = grad_fn(state.params, mb, teacher, num_items, sft_weight, state.base_params, ctx.with_nll)
  aux = {"loss": loss, **aux}
  return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, aux_acc, aux)), None


def _train_step(ctx: _Step, tx, lr_schedule, state: TrainState, batch: dict):
  cfg = ctx.cfg
  num_items = jnp.sum(batch["completion_mask"].astype(jnp.int32))  # global: the batch is the global batch
  sft_weight = jnp.where(batch["student_generated"], 0.0, cfg.sft_alpha)
  per_row = {k: v for k, v in batch.items() if k != "student_generated"}
  k = cfg.grad_accum_steps
  micro_step = functools.partial(_micro_step, ctx, state, num_items, sft_weight)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  if k == 1:
    (grads, aux), _ = micro_step((zeros, _zero_aux(cfg)), per_row)
  else:
    # Rows b·k + i form micro-batch i: each device keeps its rows, no resharding.
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), per_row)
    (grads, aux), _ = jax.lax.scan(micro_step, (zeros, _zero_aux(cfg)), micro)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  denom = jnp.maximum(num_items, 1).astype(jnp.float32)
  metrics = {
      name: (value if name in ("loss", "distill_loss", "sft_loss") else value / denom) for name, value in aux.items()
  }
  metrics.update(grad_norm=optax.tree.norm(grads), lr=lr_schedule(state.step), tokens=num_items)
  new_state = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def _eval_step(ctx: _Step, state: TrainState, batch: dict):
  num_items = jnp.sum(batch["completion_mask"].astype(jnp.int32))
  weights = _student_weights(ctx, state.params, state.base_params)
  teacher = None if ctx.cfg.teacher == "none" else _teacher_side(ctx, state.teacher_params, weights, batch)
  loss, aux = loss_fn(ctx, state.params, batch, teacher, num_items, 0.0, state.base_params, with_nll=True)
  denom = jnp.maximum(num_items, 1).astype(jnp.float32)
  metrics = {name: (value if name in ("distill_loss", "sft_loss") else value / denom) for name, value in aux.items()}
  metrics["nll"] = metrics.pop("sft_loss")
  return {**metrics, "tokens": num_items}


def _zero_aux(cfg):
  if cfg.objective == "sft":
    names = ["loss", "sft_loss"]
  else:
    names = ["loss", "distill_loss"] + (["sft_loss"] if cfg.sft_alpha > 0 else [])
  if cfg.objective == "gkd" and cfg.divergence in ("full", "fused"):
    names += list(_STAT_NAMES)
  elif cfg.objective == "gkd":
    names += ["top1_agreement"]
  return {n: jnp.zeros((), jnp.float32) for n in names}


_STAT_NAMES = ("forward_kl", "reverse_kl", "student_entropy", "teacher_entropy", "top1_agreement")


def _token_sums(stats, mask):
  return {name: jnp.sum(jnp.where(mask, stats[name], 0.0)) for name in _STAT_NAMES}


def _fused_stats(hidden, head, cap, t_hidden, t_head, t_cap, mask, vocab, temperature):
  """Token sums of the diagnostics for the fused path, one sequence at a time ([C, V] logits at most)."""

  def row(xs):
    h, th, m = xs
    s_logits = transformer.apply_head(h, head, cap, vocab, dtype=jnp.float32)
    t_logits = transformer.apply_head(th, t_head, t_cap, vocab, dtype=jnp.float32)
    return _token_sums(losses.token_stats(s_logits, t_logits, temperature), m)

  per_row = jax.lax.map(row, jax.lax.stop_gradient((hidden, t_hidden, mask)))
  return jax.tree.map(jnp.sum, per_row)
