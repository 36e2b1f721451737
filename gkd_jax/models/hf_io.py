"""HuggingFace checkpoints ⇄ CausalLM: from_pretrained, save_pretrained, load_tokenizer.

Each parameter maps to one HF tensor through a reshape + transpose (both free views), so the loader can
slice a memory-mapped tensor per device shard and build each array directly in its target sharding. A stacked
parameter of a scanned model ("layers.attn.q.kernel", [L, ...]) maps to the L per-layer HF tensors
("model.layers.<i>.self_attn.q_proj.weight"), stacked on load and split on export.

An InternVL checkpoint (model_type "internvl", transformers' "-hf" layout) loads as `internvl.InternVL`: its
language model's tensors under "language_model.model." / "language_model.lm_head.", the tower's under
"vision_tower.", the projector's under "multi_modal_projector." (transformers' in-memory "model.*" names are
read too).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gkd_jax import sharding as shd
from gkd_jax import storage
from gkd_jax.models import safetensors_io as st
from gkd_jax.models.config import MULTIMODAL_MODEL_TYPES, ModelConfig
from gkd_jax.models.internvl import InternVL, InternVLConfig
from gkd_jax.models.transformer import CausalLM
from gkd_jax.models.vision import VisionConfig

_HUB_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt"]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Our array == hf_tensor.reshape(view_shape).transpose(perm); hf_shape is the checkpoint's shape."""

  name: str
  hf_shape: tuple[int, ...]
  view_shape: tuple[int, ...]
  perm: tuple[int, ...]


# Our norm -> HF name (Llama style, Gemma sandwich style). HF's "post_attention_layernorm" is the pre-MLP norm
# in Llama but the attention-output norm in Gemma.
_NORMS = {
    "attn_norm": ("input_layernorm", "input_layernorm"),
    "mlp_norm": ("post_attention_layernorm", "pre_feedforward_layernorm"),
    "attn_out_norm": (None, "post_attention_layernorm"),
    "mlp_out_norm": (None, "post_feedforward_layernorm"),
}


def _layout(path: tuple, cfg: ModelConfig) -> Layout:
  h, v, m = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
  n, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  same = lambda name, shape: Layout(name, shape, shape, tuple(range(len(shape))))
  transposed = lambda name, out, inp: Layout(name, (out, inp), (out, inp), (1, 0))
  if path == ("embed", "embedding"):
    return same("model.embed_tokens.weight", (v, h))
  if path == ("final_norm", "scale"):
    return same("model.norm.weight", (h,))
  if path == ("lm_head", "kernel"):
    return transposed("lm_head.weight", v, h)
  if path[0] != "layers":
    raise KeyError(path)
  i, module, rest = path[1], path[2], path[3:]
  prefix = f"model.layers.{i}"
  if module in _NORMS:
    hf = _NORMS[module][1 if cfg.sandwich_norm else 0]
    return same(f"{prefix}.{hf}.weight", (h,))
  if module == "mlp":
    proj, kind = rest
    out, inp = (h, m) if proj == "down" else (m, h)
    name = f"{prefix}.mlp.{proj}_proj.{'weight' if kind == 'kernel' else 'bias'}"
    return transposed(name, out, inp) if kind == "kernel" else same(name, (out,))
  if module == "attn":
    proj, kind = rest
    if proj in ("q_norm", "k_norm"):
      return same(f"{prefix}.self_attn.{proj}.weight", (d,))
    base = f"{prefix}.self_attn.{proj}_proj"
    if proj == "o":
      if kind == "bias":
        return same(f"{base}.bias", (h,))
      return Layout(f"{base}.weight", (h, n * d), (h, n, d), (1, 2, 0))  # -> [n, d, h]
    heads = n if proj == "q" else kv
    if kind == "bias":
      return Layout(f"{base}.bias", (heads * d,), (heads, d), (0, 1))
    return Layout(f"{base}.weight", (heads * d, h), (heads, d, h), (2, 0, 1))  # -> [h, heads, d]
  raise KeyError(path)


def _layouts(path: tuple, cfg: ModelConfig) -> list[Layout] | None:
  """The per-layer layouts of a stacked (scanned) parameter, None for any other parameter."""
  if path[0] != "layers" or isinstance(path[1], int):
    return None
  return [_layout(("layers", i, *path[1:]), cfg) for i in range(cfg.num_hidden_layers)]


def _same(name, shape):
  return Layout(name, shape, shape, tuple(range(len(shape))))


def _vision_layout(path: tuple, cfg: VisionConfig) -> Layout:
  d, m, n, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim
  c, p = cfg.num_channels, cfg.patch_size
  kind = "weight" if path[-1] in ("kernel", "scale") else "bias"
  if path == ("patch_embed", "kernel"):  # conv [D, C, p, p] -> [C, p, p, D]
    return Layout(
        "vision_tower.embeddings.patch_embeddings.projection.weight", (d, c, p, p), (d, c, p, p), (1, 2, 3, 0)
    )
  if path == ("patch_embed", "bias"):
    return _same("vision_tower.embeddings.patch_embeddings.projection.bias", (d,))
  if path == ("cls_token",):
    return Layout("vision_tower.embeddings.cls_token", (1, 1, d), (d,), (0,))
  if path == ("position_embeddings",):
    return Layout("vision_tower.embeddings.position_embeddings", (1, 1 + cfg.grid**2, d), (1 + cfg.grid**2, d), (0, 1))
  if path[0] == "final_norm":
    return _same(f"vision_tower.layernorm.{kind}", (d,))
  if path[0] != "layers":
    raise KeyError(path)
  i, module, rest = path[1], path[2], path[3:]
  prefix = f"vision_tower.encoder.layer.{i}"
  if module in ("lambda_1", "lambda_2"):
    return _same(f"{prefix}.{module}", (d,))
  if module in ("attn_norm", "mlp_norm"):
    return _same(f"{prefix}.{'layernorm_before' if module == 'attn_norm' else 'layernorm_after'}.{kind}", (d,))
  if module in ("fc1", "fc2"):
    out, inp = (m, d) if module == "fc1" else (d, m)
    name = f"{prefix}.mlp.{module}.{kind}"
    return Layout(name, (out, inp), (out, inp), (1, 0)) if kind == "weight" else _same(name, (out,))
  if module == "attn":
    proj = rest[0]
    if proj in ("q_norm", "k_norm"):
      return _same(f"{prefix}.attention.{proj}.weight", (d,))
    if proj == "o":
      name = f"{prefix}.attention.projection_layer.{kind}"
      return Layout(name, (d, d), (d, n, hd), (1, 2, 0)) if kind == "weight" else _same(name, (d,))
    name = f"{prefix}.attention.{proj}_proj.{kind}"
    if kind == "bias":
      return Layout(name, (d,), (n, hd), (0, 1))
    return Layout(name, (d, d), (n, hd, d), (2, 0, 1))
  raise KeyError(path)


def _projector_layout(path: tuple, cfg: InternVLConfig) -> Layout:
  d, h = cfg.vision.hidden_size * cfg.shuffle_scale**2, cfg.text.hidden_size
  module, kind = path
  if module == "norm":
    return _same(f"multi_modal_projector.layer_norm.{'weight' if kind == 'scale' else 'bias'}", (d,))
  inp = d if module == "linear_1" else h
  name = f"multi_modal_projector.{module}.{'weight' if kind == 'kernel' else 'bias'}"
  return Layout(name, (h, inp), (h, inp), (1, 0)) if kind == "kernel" else _same(name, (h,))


def _lm_name(name: str) -> str:
  """A CausalLM tensor name as the InternVL checkpoint spells it."""
  return f"language_model.{name}"


# transformers' in-memory (v5) names of the same tensors; read when the file uses them.
_ALIASES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def _alias(name: str) -> str | None:
  for ours, theirs in _ALIASES:
    if name.startswith(ours):
      return theirs + name[len(ours) :]
  return None


def _param_layouts(path: tuple, model_cfg) -> tuple[list[Layout], bool]:
  """(the HF layouts of one parameter, whether it is a stacked [L, ...] parameter) for a CausalLM
  (model_cfg: ModelConfig) or an InternVL (InternVLConfig)."""
  if isinstance(model_cfg, ModelConfig):
    stacked = _layouts(path, model_cfg)
    return (stacked, True) if stacked else ([_layout(path, model_cfg)], False)
  part, rest = path[0], path[1:]
  if part == "language_model":
    lays, stacked = _param_layouts(rest, model_cfg.text)
    return [dataclasses.replace(lay, name=_lm_name(lay.name)) for lay in lays], stacked
  if part == "vision_tower":
    return [_vision_layout(rest, model_cfg.vision)], False
  if part == "projector":
    return [_projector_layout(rest, model_cfg)], False
  raise KeyError(path)


def _check(reader, lay: Layout, directory: str) -> None:
  if lay.name not in reader:
    raise ValueError(f"missing tensor {lay.name!r} (expected shape {lay.hf_shape}) in {directory}")
  found = reader.shape(lay.name)
  if found != lay.hf_shape:
    raise ValueError(f"tensor {lay.name!r} has shape {found}, expected {lay.hf_shape} from config.json")


class _Stacked:
  """Lazy [L, ...] view over L per-layer views: indexing reads only the requested layers and slices."""

  def __init__(self, views):
    self.views = views

  def __getitem__(self, idx):
    idx = idx if isinstance(idx, tuple) else (idx,)
    layers = range(len(self.views))[idx[0]] if idx else range(len(self.views))
    return np.stack([np.asarray(self.views[i][idx[1:]]) for i in layers])

  def __array__(self, dtype=None, copy=None):
    return self[(slice(None),)]


def _flat_params(state: nnx.State):
  return [(tuple(p), var) for p, var in nnx.to_flat_state(state)]


def _resolve(path_or_id: str, model: bool = True) -> str:
  """A local directory holding `path_or_id`'s files: the directory itself, a local copy of a gs:// prefix, or
  a hub snapshot. For a model (not a tokenizer alone) a URL prefix must hold config.json, the commit marker of
  an export on object storage (gkd_jax.files)."""
  if storage.is_url(path_or_id):  # gs://...: downloaded once into the local cache (storage.local_copy)
    directory = storage.local_copy(path_or_id)
    if not os.path.isdir(directory) or (model and not os.path.exists(os.path.join(directory, "config.json"))):
      raise FileNotFoundError(
          f"{path_or_id} is not a checkpoint directory: it holds no config.json (on object storage an HF "
          f"checkpoint is complete only once its config.json is written)"
      )
    return directory
  if os.path.isdir(path_or_id):
    return path_or_id
  if os.path.exists(path_or_id) or path_or_id.startswith((".", "/")):
    raise FileNotFoundError(f"{path_or_id} is not a checkpoint directory")
  from huggingface_hub import snapshot_download  # hub IDs only: local directories never touch the network

  directory = snapshot_download(path_or_id, allow_patterns=_HUB_PATTERNS)
  # Only the weights transformers would load (repos may also carry e.g. consolidated.safetensors).
  index = os.path.join(directory, st.INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weights = sorted(set(json.load(f)["weight_map"].values()))
  else:
    weights = [st.SINGLE_FILE]
  return snapshot_download(path_or_id, allow_patterns=_HUB_PATTERNS + weights)


def load_config(path_or_hub_id: str) -> ModelConfig:
  """The ModelConfig of a checkpoint (directory, gs:// URL or hub ID) from its config.json alone, resolved as
  from_pretrained resolves it (files fetched, no weight read): for checks that must run before weights load.
  For a vision-language checkpoint it is its language model's config (see load_vl_config)."""
  return ModelConfig.from_hf_config(_resolve(path_or_hub_id))


def _config_dict(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    try:
      d = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path} is not valid JSON ({e}): the model's config.json is corrupt or truncated") from e
  if not isinstance(d, dict):
    raise ValueError(f"{path} holds a JSON {type(d).__name__}, not the model config's object")
  return d


def config_from_hf_dict(d: dict) -> ModelConfig | InternVLConfig:
  """The architecture an HF config.json describes: an InternVLConfig for a vision-language checkpoint, else the
  ModelConfig of a decoder."""
  return (
      InternVLConfig.from_hf_dict(d) if d.get("model_type") in MULTIMODAL_MODEL_TYPES else ModelConfig.from_hf_dict(d)
  )


def build_model(cfg: ModelConfig | InternVLConfig, **kwargs) -> CausalLM | InternVL:
  """CausalLM(cfg, **kwargs) or InternVL(cfg, **kwargs), as the config's type says (under nnx.eval_shape: an
  abstract model)."""
  return (InternVL if isinstance(cfg, InternVLConfig) else CausalLM)(cfg, **kwargs)


def checkpoint_dir(path_or_hub_id: str) -> str:
  """A local directory holding a checkpoint's files, resolved as from_pretrained resolves it (a gs:// prefix
  copied into the local cache, a hub id downloaded): for readers of its other files (the image processor's)."""
  return _resolve(path_or_hub_id)


def load_vl_config(path_or_hub_id: str) -> InternVLConfig | None:
  """The InternVLConfig of a vision-language checkpoint (its image_token_id, image_seq_length, tower ...),
  None for a text-only one; from config.json alone, like load_config."""
  d = _config_dict(_resolve(path_or_hub_id))
  return InternVLConfig.from_hf_dict(d) if d.get("model_type") in MULTIMODAL_MODEL_TYPES else None


def model_options(config) -> dict:
  """from_pretrained's execution options from a run config (gkd_jax.config): scan_layers, remat, attention."""
  return {
      "scan_layers": bool(config.get("scan_layers", False)),
      "remat": config.get("remat", "none"),
      "attention": config.get("attention", "xla"),
  }


def from_pretrained(
    path_or_hub_id: str,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    mesh: Mesh | None = None,
    rngs: nnx.Rngs | None = None,
    *,
    remat: bool | str = False,
    rules=None,
    scan_layers: bool = False,
    attention: str = "xla",
    train_vision_tower: bool = False,
    train_projector: bool = False,
) -> CausalLM | InternVL:
  """Loads an HF safetensors checkpoint (directory or hub ID) into a CausalLM, or an InternVL for a
  model_type "internvl" checkpoint.

  With a mesh, every parameter is built with `jax.make_array_from_callback` in the sharding its logical
  names give: each device receives only its slice, read from the memory-mapped file.
  `rngs` is accepted for symmetry with CausalLM(...) and unused. `remat`, `rules`, `scan_layers` and
  `attention` go to CausalLM (scan_layers=True stacks the per-layer tensors on a leading layer axis); for
  InternVL they configure its language model (and remat its tower's layers too); `train_vision_tower` /
  `train_projector` set InternVL's static flags (False: no gradient into that part), and must stay False for
  a text-only checkpoint.
  """
  directory = _resolve(path_or_hub_id)
  d = _config_dict(directory)
  options = dict(
      dtype=dtype,
      param_dtype=param_dtype,
      remat=remat,
      mesh=mesh,
      rules=rules,
      scan_layers=scan_layers,
      attention=attention,
  )
  cfg = config_from_hf_dict(d)
  if isinstance(cfg, InternVLConfig):
    options.update(train_vision_tower=train_vision_tower, train_projector=train_projector)
    head_names = {"language_model.lm_head.weight", "lm_head.weight"}
  elif train_vision_tower or train_projector:
    raise ValueError(f"{path_or_hub_id} is a text-only checkpoint: it has no vision tower or projector to train")
  else:
    head_names = {"lm_head.weight"}  # tied checkpoints may still carry the head
  reader = st.CheckpointReader(directory)
  del rngs  # every weight comes from the checkpoint; the abstract init below needs no real randomness
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0), **options)))
  np_dtype = np.dtype(param_dtype)
  used = set()
  for path, var in _flat_params(state):
    lays, stacked = _param_layouts(path, cfg)
    for i, lay in enumerate(lays):
      if lay.name not in reader and _alias(lay.name) in reader:
        lays[i] = lay = dataclasses.replace(lay, name=_alias(lay.name))
      used.add(lay.name)
      _check(reader, lay, directory)
    views = [reader.view(lay.name).reshape(lay.view_shape).transpose(lay.perm) for lay in lays]
    view = _Stacked(views) if stacked else views[0]
    shape = tuple(var.get_value().shape)
    if mesh is None:
      value = jnp.asarray(np.asarray(view).astype(np_dtype))
    else:
      sharding = shd.named_sharding(shd.variable_names(var), shape, mesh, rules)
      value = jax.make_array_from_callback(
          shape, sharding, lambda idx, view=view: np.ascontiguousarray(view[idx]).astype(np_dtype)
      )
    var.set_value(value)
  unused = set(reader.keys()) - used - head_names
  if unused:
    logging.warning(
        "from_pretrained(%s): %d checkpoint tensors not used by %s, e.g. %s",
        path_or_hub_id,
        len(unused),
        d.get("model_type"),
        sorted(unused)[:5],
    )
  return nnx.merge(graphdef, state)


def _model_config(model):
  """What names a model's tensors: the InternVLConfig of an InternVL, else the ModelConfig."""
  return model.vl_config if isinstance(model, InternVL) else model.config


def export_tensors(model: CausalLM | InternVL, dtype=None) -> dict[str, np.ndarray]:
  """HF name -> numpy array for every parameter (gathered to host), optionally cast to `dtype`."""
  params = nnx.state(model, nnx.Param)
  cfg = _model_config(model)
  tensors = {}
  for path, var in _flat_params(params):
    array = np.asarray(jax.device_get(var.get_value()))
    if dtype is not None:
      array = array.astype(np.dtype(dtype))
    lays, stacked = _param_layouts(path, cfg)
    for lay, layer_array in zip(lays, array) if stacked else [(lays[0], array)]:
      inverse = tuple(np.argsort(lay.perm))
      tensors[lay.name] = np.ascontiguousarray(layer_array.transpose(inverse).reshape(lay.hf_shape))
  return tensors


def save_pretrained(
    model: CausalLM | InternVL,
    out_dir: str,
    tokenizer=None,
    *,
    dtype=None,
    max_shard_size="5GB",
    merge_fn: Callable[[CausalLM], CausalLM] | None = None,
) -> str:
  """Writes config.json + safetensors (+ tokenizer files) that transformers' AutoModelForCausalLM loads
  (InternVLForConditionalGeneration for an InternVL).

  LoRA hook: a model carrying adapters (nnx.LoRAParam) must be merged first; pass `merge_fn` (model ->
  model with dense, merged weights). Exporting adapters silently dropped would be a wrong checkpoint.
  """
  if merge_fn is not None:
    model = merge_fn(model)
  if jax.tree.leaves(nnx.state(model, nnx.LoRAParam)):
    raise ValueError("model has LoRA parameters: pass merge_fn to fold them into the base weights")
  os.makedirs(out_dir, exist_ok=True)
  tensors = export_tensors(model, dtype)
  st.write_checkpoint(out_dir, tensors, max_shard_size)
  config = _model_config(model).to_hf_dict()
  # transformers v5 calls it "dtype", v4 (and older vLLM) "torch_dtype": keep the source's spelling.
  config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(np.dtype(dtype or model.param_dtype))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
)


def has_tokenizer_files(directory: str) -> bool:
  """Whether a local directory holds any file a transformers tokenizer loads from."""
  names = os.listdir(directory)
  return any(n in _TOKENIZER_FILES or n.endswith(".tiktoken") for n in names)


def load_tokenizer(path_or_hub_id: str, **kwargs):
  """transformers.AutoTokenizer from the same directory / hub ID as the model.

  A tokenizer saved as a generic fast tokenizer (tokenizer_class TokenizersBackend / PreTrainedTokenizerFast)
  is loaded as exactly that: transformers v5's AutoTokenizer would otherwise pick the class of the
  model_type in config.json (e.g. Qwen2Tokenizer), which rebuilds the pre-tokenizer and changes the ids.
  """
  import transformers

  directory = _resolve(path_or_hub_id, model=False)
  if not has_tokenizer_files(directory):
    raise FileNotFoundError(
        f"{directory} holds no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}, *.tiktoken): save the "
        f"tokenizer there (tokenizer.save_pretrained) or point config.tokenizer at one"
    )
  config_file = os.path.join(directory, "tokenizer_config.json")
  if os.path.exists(config_file):
    with open(config_file) as f:
      try:
        tokenizer_class = json.load(f).get("tokenizer_class")
      except (ValueError, AttributeError) as e:
        raise ValueError(f"{config_file} is corrupt or truncated: expected a JSON object ({e!r})") from e
    if tokenizer_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
      return transformers.PreTrainedTokenizerFast.from_pretrained(directory, **kwargs)
  return transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
