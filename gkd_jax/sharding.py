"""Logical axis names → mesh axes (data, fsdp, tensor).

Models annotate every parameter with logical axis names (nnx `out_sharding` metadata, e.g.
("vocab", "embed")) and constrain the main activations the same way. The rules below say which mesh axes
each logical name is split over; `None` means replicated. A dimension whose size is not divisible by the
mesh axes it maps to is replicated instead (e.g. 2 KV heads on a tensor axis of 4), so one rule set works
for every model size.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (str), axes (tuple) or None. Batch is split over data and fsdp (FSDP shards the
# batch too), weights' embed dim over fsdp (ZeRO-3 style), and the wide dims over tensor (Megatron style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("layers", None),  # the stacked layer axis of scanned models: every device holds every layer's slice
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("embed", "fsdp"),
    ("act_embed", None),  # hidden activations: replicated across tensor, split only by batch
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one of the sizes may be -1 to take the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  for axis, size in zip(MESH_AXES, sizes):
    if not (isinstance(size, int) and (size >= 1 or size == -1)):
      raise ValueError(f"mesh axis {axis}={size!r} is invalid: must be a positive int, or -1 for the rest")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices are not divisible by data*tensor*fsdp={known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, " f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def _mesh_axes(name: str | None, rules: Iterable[tuple[str, Any]]) -> tuple[str, ...]:
  if name is None:
    return ()
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  raise ValueError(f"no sharding rule for logical axis {name!r}; rules: {[r[0] for r in rules]}")


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Iterable[tuple[str, Any]] | None = None
) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dims carry logical `names`.

  Mesh axes of size 1, axes already used by an earlier dim, and axes that do not divide the dim are dropped.
  """
  rules = DEFAULT_RULES if rules is None else tuple(rules)
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = []
    for ax in _mesh_axes(name, rules):
      if ax not in mesh.shape or ax in used or mesh.shape[ax] == 1:
        continue
      if size % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[ax]) == 0:
        axes.append(ax)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec)


def named_sharding(names, shape, mesh, rules=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
  """The sharding of batch arrays (any rank): the leading dim by the "batch" rule, the rest replicated.
  Divisibility is the caller's to check (the trainer refuses a batch_size the batch axes do not divide)."""
  axes = _mesh_axes("batch", DEFAULT_RULES if rules is None else tuple(rules))
  return NamedSharding(mesh, PartitionSpec(axes or None))


def _current_mesh(mesh: Mesh | None):
  if mesh is not None:
    return mesh
  abstract = jax.sharding.get_abstract_mesh()
  return None if abstract.empty else abstract


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None = None, rules=None) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op without a mesh (given or set by `jax.set_mesh`)."""
  mesh = _current_mesh(mesh)
  if mesh is None or math.prod(mesh.shape.values()) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def variable_names(var: nnx.Variable) -> tuple[str | None, ...]:
  """The logical axis names of a variable (all None when it carries none)."""
  names = var.get_metadata().get("out_sharding")
  return tuple(names) if names else (None,) * np.ndim(var.get_value())


def state_shardings(state: nnx.State, mesh: Mesh, rules=None) -> nnx.State:
  """A pytree of NamedShardings matching `state` (from nnx.split / nnx.state), from each variable's names."""

  def one(var):
    value = var.get_value()
    return var.replace(NamedSharding(mesh, logical_to_spec(variable_names(var), np.shape(value), mesh, rules)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def host_rows(x: jax.Array, limit: int | None = None) -> np.ndarray:
  """This host's rows of a global array sharded over the batch (`to_global`'s inverse), as host numpy, in
  this host's row order; with `limit`, only the shards holding the first `limit` of them are fetched.

  Reads the addressable shards only: no collective, nothing from other hosts. `make_array_from_process_local_data`
  puts a host's rows on its devices in increasing global position, so the shards sorted by their first
  row give them back in order."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)[:limit]
  starts, shards = set(), []
  for shard in sorted(x.addressable_shards, key=lambda s: s.index[0].indices(x.shape[0])[0]):
    start = shard.index[0].indices(x.shape[0])[0]
    if start not in starts:  # replicas (e.g. over the tensor axis) hold the same rows
      starts.add(start)
      shards.append(shard.data)
  rows = sum(s.shape[0] for s in shards)
  if rows * jax.process_count() != x.shape[0]:
    raise ValueError(
        f"this host addresses {rows} of the {x.shape[0]} rows of a {x.sharding} array, not 1/{jax.process_count()} "
        f"of them: the batch sharding does not give each host its own rows"
    )
  if limit is not None:
    shards = shards[: next(i + 1 for i, n in enumerate(np.cumsum([s.shape[0] for s in shards])) if n >= limit)]
  return np.concatenate(jax.device_get(shards))[:limit]
