"""Small helpers the tests share that the package itself does not need."""

import jax
import numpy as np
from flax import nnx

from gkd_jax import lora, sharding
from gkd_jax.models import safetensors_io as st


def shard_state(state: nnx.State, mesh, rules=None) -> nnx.State:
  """device_put every array of `state` into the sharding its logical names give."""
  return jax.device_put(state, sharding.state_shardings(state, mesh, rules))


def merged_model(model: nnx.Module, adapters, spec: lora.LoraSpec) -> nnx.Module:
  """A copy of `model` with the adapters folded into its kernels (the model itself is left unchanged)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, lora.merge(state, adapters, spec))


def checkpoint_cache(tmp_path_factory, build):
  """name -> (directory, build(name, directory)), each built on first use (a module fixture's body)."""
  cache = {}

  def get(name):
    if name not in cache:
      directory = str(tmp_path_factory.mktemp(name))
      cache[name] = (directory, build(name, directory))
    return cache[name]

  return get


def assert_same_tensors(a: str, b: str) -> None:
  """Two HF checkpoint directories hold the same tensor names with bitwise equal values."""
  x, y = st.CheckpointReader(a), st.CheckpointReader(b)
  assert sorted(x.keys()) == sorted(y.keys())
  for name in x.keys():
    np.testing.assert_array_equal(np.asarray(x.view(name)), np.asarray(y.view(name)), err_msg=name)
