"""Functional LoRA over a model's nnx.State: the base weights stay a frozen input, only adapters train.

    spec = LoraSpec(rank=8, alpha=16, target_modules=("q", "k", "v", "o", "gate", "up", "down"))
    adapters = init_adapters(nnx.state(model), spec, key)          # the only trainable params
    merged = merge(params, adapters, spec)                           # jittable; nnx.merge(graphdef, merged)
    save_pretrained(nnx.merge(graphdef, merged), out_dir)              # a plain HF checkpoint

A kernel W of shape [*in, *out] (e.g. q: [embed | heads, head_dim], o: [heads, head_dim | embed]) gets
A [*in, r] and B [r, *out]; the merged weight is W + s·A·B with s = alpha/rank (or alpha/sqrt(rank), rsLoRA).
A and B keep W's structured dims so they carry W's logical axis names (rank replicated) and shard like it: the
delta is formed shard-locally with no reshape of a sharded dim. B starts at zero, so the initial model is the
base model exactly. Same semantics as PEFT's LoRA on HF Linear layers (A: Kaiming-uniform, B: zeros; no
bias training, no LoRA dropout).

Stacked kernels of scanned models ([layers, *in, *out], first logical name "layers") get per-layer adapters
stacked the same way: A [layers, *in, r], B [layers, r, *out].

Adapters are an nnx.State {kernel path ("layers.0.attn.q.kernel"): {"a": LoRAParam, "b": LoRAParam}}; they are
ordinary pytrees for jax.grad and optax, and `adapter_shardings` places them on a mesh.

Cost note: merging inside the train step materializes each targeted kernel once more (and its full-size
gradient transiently), like a full fine-tune's per-layer gradient, but the optimizer state is adapter-sized.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gkd_jax import sharding as shd

ALL_LINEAR = "all-linear"  # every projection kernel except the LM head (PEFT's spelling)
_KERNEL = "kernel"
_LM_HEAD = "lm_head"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which kernels get adapters and how they scale. Frozen, so it can be a static jit argument.

  target_modules: names of the modules that own the kernels, as they appear in the param paths
  ("q", "k", "v", "o", "gate", "up", "down", "lm_head"), or ("all-linear",).
  use_rslora: scale by alpha/sqrt(rank) (rank-stabilized LoRA, Kalajdzievski 2023) instead of alpha/rank.
  dtype: the adapters' dtype (float32 master weights by default, whatever the base dtype).
  """

  rank: int = 8
  alpha: float = 16.0
  target_modules: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
  use_rslora: bool = False
  dtype: Any = jnp.float32

  def __post_init__(self):
    if isinstance(self.target_modules, str):  # ("q") is a common typo for ("q",)
      object.__setattr__(self, "target_modules", (self.target_modules,))
    object.__setattr__(self, "target_modules", tuple(self.target_modules))
    if not (isinstance(self.rank, int) and self.rank >= 1):
      raise ValueError(f"LoRA rank must be an int ≥ 1, got {self.rank!r}")
    if not self.target_modules:
      raise ValueError("LoRA target_modules is empty")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def spec_from_config(config) -> LoraSpec | None:
  """The LoraSpec of a run's config (lora_rank, lora_alpha, lora_rslora, lora_target_modules: a list or a
  comma-separated string); None when lora_rank is 0 (full fine-tuning)."""
  if not config.lora_rank:
    return None
  targets = config.lora_target_modules
  return LoraSpec(
      rank=config.lora_rank,
      alpha=float(config.lora_alpha),
      use_rslora=config.lora_rslora,
      target_modules=tuple(t.strip() for t in targets.split(",")) if isinstance(targets, str) else tuple(targets),
  )


# ------------------------------------------------------------------------------------------------ paths


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _path(keys) -> tuple[str, ...]:
  """A pytree path as its key names ("layers", "0", "attn", "q", "kernel")."""
  return tuple(jax.tree_util.keystr((k,), simple=True) for k in keys)


def _value(leaf):
  return leaf.get_value() if _is_var(leaf) else leaf


def _names(leaf) -> tuple[str | None, ...]:
  """Logical axis names of a param (all None for a bare array)."""
  return shd.variable_names(leaf) if _is_var(leaf) else (None,) * np.ndim(leaf)


# A vision-language model's vision tower and projector: LoRA adapts its language model only (as ms-swift does
# with a frozen ViT and aligner).
_NOT_ADAPTED = ("vision_tower", "projector")


def _kernels(params) -> list[tuple[tuple[str, ...], Any]]:
  """(path, leaf) of every projection kernel of the language model: a ≥2-D param named "kernel" (embeddings
  and norms are not), outside a vision tower or projector."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)[0]
  return [
      (_path(keys), leaf)
      for keys, leaf in leaves
      if _path(keys)[-1] == _KERNEL
      and len(_path(keys)) >= 2
      and np.ndim(_value(leaf)) >= 2
      and _path(keys)[0] not in _NOT_ADAPTED
  ]


def _num_lead_dims(names) -> int:
  """1 for a stacked (scanned) kernel, whose first dim is the layer axis, else 0."""
  return 1 if names and names[0] == "layers" else 0


def _num_in_dims(names, shape) -> int:
  """How many leading dims of a kernel are its input. A projection either reads the residual stream
  (first dim "embed": q/k/v/gate/up/lm_head) or writes it (last dim "embed": o [heads, head_dim | embed],
  down); 2-D kernels are always [in, out]."""
  if len(shape) == 2 or names[0] == "embed":
    return 1
  if names[-1] == "embed":
    return len(shape) - 1
  raise ValueError(
      f"cannot tell the input dims of a kernel with logical names {names}: LoRA needs [in..., out...] "
      f"kernels that read or write the 'embed' dim"
  )


def targetable_modules(params) -> list[str]:
  """Module names LoRA can target in these params (the owners of projection kernels), sorted."""
  return sorted({path[-2] for path, _ in _kernels(params)})


def _targets(params, spec: LoraSpec) -> list[tuple[tuple[str, ...], Any]]:
  found = targetable_modules(params)
  wanted = set(spec.target_modules)
  if ALL_LINEAR in wanted:
    wanted = (wanted - {ALL_LINEAR}) | (set(found) - {_LM_HEAD})
  unknown = sorted(wanted - set(found))
  if unknown:
    raise ValueError(
        f"LoRA target_modules {unknown} not found in the model; targetable names: {found} " f"(or '{ALL_LINEAR}')"
    )
  return [(path, leaf) for path, leaf in _kernels(params) if path[-2] in wanted]


# ----------------------------------------------------------------------------------------------- the API


def init_adapters(params, spec: LoraSpec, key: jax.Array) -> nnx.State:
  """Adapters for every targeted kernel of `params` (nnx.state(model), its Param filter, or the model).

  A [*in, r] ~ U(±1/sqrt(fan_in)) (PEFT's Kaiming-uniform with a=sqrt(5)), B [r, *out] = 0. Each carries
  the kernel's logical names on its non-rank dims, so `adapter_shardings` shards it like the kernel.
  Built on the default device: place them with jax.device_put(adapters, adapter_shardings(adapters, mesh)).
  """
  targets = _targets(params, spec)
  keys = jax.random.split(key, len(targets))
  adapters = {}
  for (path, leaf), k in zip(targets, keys):
    shape, names = tuple(np.shape(_value(leaf))), _names(leaf)
    lead = _num_lead_dims(names)
    n_in = lead + _num_in_dims(names[lead:], shape[lead:])
    fan_in = math.prod(shape[lead:n_in])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(k, (*shape[:n_in], spec.rank), jnp.float32, -bound, bound).astype(spec.dtype)
    b = jnp.zeros((*shape[:lead], spec.rank, *shape[n_in:]), spec.dtype)
    adapters[".".join(path)] = {
        "a": nnx.LoRAParam(a, out_sharding=(*names[:n_in], None), eager_sharding=False),
        "b": nnx.LoRAParam(b, out_sharding=(*names[:lead], None, *names[n_in:]), eager_sharding=False),
    }
  return nnx.State(adapters)


def delta(a: jax.Array, b: jax.Array, scale: float, lead: int = 0) -> jax.Array:
  """scale · A·B in float32 with W's structured shape [*lead, *in, *out] (no reshape: sharded dims stay
  put). `lead` leading dims (the layer axis of a stacked kernel) are batch dims of A and B."""
  n_in, n_out = a.ndim - 1 - lead, b.ndim - 1 - lead
  letters = string.ascii_letters
  ls, ins, outs = letters[:lead], letters[lead : lead + n_in], letters[lead + n_in : lead + n_in + n_out]
  # HIGHEST: on TPU a default-precision f32 einsum runs in bf16; the contraction is only rank-long, so cheap.
  ab = jnp.einsum(
      f"{ls}{ins}z,{ls}z{outs}->{ls}{ins}{outs}",
      a.astype(jnp.float32),
      b.astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
  )
  return scale * ab


def merge(params, adapters, spec: LoraSpec):
  """params with W ← W + s·A·B on every adapted kernel, computed in float32 and cast back to W's dtype.

  Pure and jittable; returns the same pytree structure and leaf types as `params`, so
  nnx.merge(graphdef, merge(params, adapters, spec)) is the adapted model. Gradients reach `adapters` (and
  `params`, if the caller differentiates w.r.t. them: keep them a non-differentiated input to freeze them).
  """
  flat = {path: ab for path, ab in _adapter_items(adapters)}
  used = set()

  def one(keys, leaf):
    name = jax.tree_util.keystr(keys, simple=True, separator=".")
    if name not in flat:
      return leaf
    used.add(name)
    a, b = flat[name]
    w = _value(leaf)
    lead = a.ndim + b.ndim - 2 - w.ndim  # shared leading (layer) dims
    if lead < 0 or a.shape[-1] != spec.rank or w.shape != a.shape[:-1] + b.shape[lead + 1 :]:
      raise ValueError(f"adapter {name}: A {a.shape} · B {b.shape} does not fit kernel {w.shape} at rank {spec.rank}")
    merged = (w.astype(jnp.float32) + delta(a, b, spec.scale, lead)).astype(w.dtype)
    return leaf.replace(merged) if _is_var(leaf) else merged

  out = jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_var)
  missing = sorted(set(flat) - used)
  if missing:
    raise ValueError(f"adapters for kernels not in params: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  return out


def adapter_shardings(adapters, mesh: Mesh, rules=None):
  """NamedShardings for the adapters (same pytree), from the logical names they inherited from their kernels."""
  return shd.state_shardings(adapters, mesh, rules)


def count(adapters) -> int:
  """Number of trainable (adapter) parameters."""
  return int(sum(np.size(x) for x in jax.tree.leaves(adapters)))


def _adapter_items(adapters):
  """(kernel path, (A, B)) pairs as arrays, from an adapters State / dict."""
  for name in adapters:
    entry = adapters[name]
    yield name, (_value(entry["a"]), _value(entry["b"]))
