"""Optimizer and learning-rate schedule from config values (optax)."""

from __future__ import annotations

from typing import Sequence

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(
    learning_rate: float, total_steps: int, *, warmup_steps: int = 0, schedule: str = "cosine", end_factor: float = 0.0
) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine/linear decay to end_factor·lr, or constant."""
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  if learning_rate < 0 or total_steps < 1 or not 0 <= warmup_steps <= total_steps:
    raise ValueError(
        f"need learning_rate ≥ 0, total_steps ≥ 1 and 0 ≤ warmup_steps ≤ total_steps, got "
        f"learning_rate={learning_rate}, total_steps={total_steps}, warmup_steps={warmup_steps}"
    )
  decay_steps = max(total_steps - warmup_steps, 1)
  end = learning_rate * end_factor
  if schedule == "cosine":
    decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_factor)
  elif schedule == "linear":
    decay = optax.linear_schedule(learning_rate, end, decay_steps)
  else:
    decay = optax.constant_schedule(learning_rate)
  if warmup_steps == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW behind global-norm clipping. Weight decay skips 1-D params (norm scales, biases)."""
  lr = learning_rate_schedule(learning_rate, total_steps, warmup_steps=warmup_steps, schedule=schedule)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  tx = adamw if not max_grad_norm else optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)
  return tx, lr


def from_config(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, lr schedule) of a run config (gkd_jax.config): the trainer's and the AOT tool's one mapping."""
  return make_optimizer(
      config.learning_rate,
      config.total_steps,
      warmup_steps=config.warmup_steps,
      schedule=config.lr_schedule,
      weight_decay=config.weight_decay,
      max_grad_norm=config.max_grad_norm,
  )


def frozen_parts(config) -> tuple[str, ...]:
  """The top-level parts of a vision-language model that a run keeps frozen (config.train_vision_tower,
  config.train_projector); a text-only model has neither."""
  return tuple(
      part
      for part, field in (("vision_tower", "train_vision_tower"), ("projector", "train_projector"))
      if not config.get(field, False)
  )


def freeze(tx: optax.GradientTransformation, params, parts: Sequence[str]) -> optax.GradientTransformation:
  """`tx` on every param except those under the top-level `parts` of `params`, whose updates are zero (no
  weight decay, and no optimizer state: Adam's moments for a frozen 300M-param vision tower would cost 2.4 GB).
  `tx` itself when params have none of those parts (text models: their optimizer state is unchanged)."""
  top = lambda path: jax.tree_util.keystr(path[:1], simple=True)
  found = {top(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  if not found & set(parts):
    return tx
  labels = lambda ps: jax.tree_util.tree_map_with_path(lambda p, _: "frozen" if top(p) in parts else "train", ps)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
