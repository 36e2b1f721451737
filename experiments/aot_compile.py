"""Ahead-of-time compile of a recipe's train step and sampler for a TPU topology, on a CPU host.

libtpu (the `test` extra) can compile for TPU slices that are not attached: the topology's devices are
compile-only, the train state is built abstractly (shapes, dtypes and the trainer's shardings; no weights
are read or allocated), and XLA's TPU compiler reports what one chip would hold and compute:

    python experiments/aot_compile.py --config=configs/gsm8k_qwen2_5.py --topology=v5e-8 --set dtype=bfloat16
    python experiments/aot_compile.py --config=configs/gsm8k_qwen2_5.py:7b --topology=v5e-64 \\
        --set dtype=bfloat16 --set fused_loss=True --json=/tmp/aot.json

Per compiled program it prints the per-chip HBM (arguments, outputs, temporaries, total, against the chip's
capacity), XLA's FLOPs and bytes per chip, a roofline step time (max of FLOPs / peak bf16 FLOP/s and bytes /
HBM bandwidth) and the compile time. The train step is the trainer's own (StepConfig.from_run_config,
train_step.make_steps, the state's logical shardings); the sampler is sampling's generate program at the
recipe's batch, prompt and completion widths.

Hub models cannot be read here, so the architectures of the recipes' hub ids are written out below (from
their config.json); a local checkpoint directory is read from its config.json. XLA counts a while loop's body
once (its trip count is unknown when compiling), so FLOPs of scanned layers and of the decode loop are also
given analytically (gkd_jax.metrics).

Vision-language recipes (InternVL: configs/mllm_internvl.py) compile the same programs with the model the trainer
loads (`InternVL`: vision tower, projector and language model; the student's tower / projector frozen or not
as train_vision_tower / train_projector say, the optimizer wrapped by `optim.freeze` like
`resume.initial_state` does, so frozen parts hold no optimizer state), a batch that also carries pixel_values
[B, P, 3, S, S] at the largest tile count a row can have (P = images.bucket_tiles(image_max_tiles + 1): the
tiles plus the thumbnail, rounded up as the loader pads), and a sampler whose prefill reads them.
metrics.step_flops counts the language models only: the towers' and projectors' forward FLOPs over the P
tiles of every row (`vision_forward_flops`; forward only, as they are frozen) are added to the model FLOPs of
the train step (student and teacher) and of the sampler's prefill.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs on CPU; TPU devices are compile-only
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip is claimed: several compiles may run at once

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gkd_jax import images, lora, metrics, models, optim, sampling, sharding, trainer
from gkd_jax import rows as rows_lib
from gkd_jax import train_step as ts

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float  # HBM per chip
  bf16_tflops: float  # peak dense bf16 matmul throughput per chip
  hbm_gbps: float  # HBM bandwidth per chip, GB/s


# Cloud TPU's published per-chip figures.
CHIPS = {
    "v4": Chip(32, 275, 1228),
    "v5e": Chip(16, 197, 819),
    "v5p": Chip(95, 459, 2765),
    "v6e": Chip(32, 918, 1640),
}

# name → (generation, libtpu topology name, chip config). v4 / v5p count TensorCores (2 per chip,
# megacore), v5e / v6e count chips.
TOPOLOGIES = {
    "v5e-4": ("v5e", "v5e:2x2", "default"),
    "v5e-8": ("v5e", "v5e:2x4", "default"),
    "v5e-16": ("v5e", "v5e:4x4", "default"),
    "v5e-32": ("v5e", "v5e:4x8", "default"),
    "v5e-64": ("v5e", "v5e:8x8", "default"),
    "v5e-256": ("v5e", "v5e:16x16", "default"),
    "v6e-4": ("v6e", "v6e:2x2", "default"),
    "v6e-8": ("v6e", "v6e:2x4", "default"),
    "v6e-64": ("v6e", "v6e:8x8", "default"),
    "v4-8": ("v4", "v4:2x2x1", "megacore"),
    "v4-16": ("v4", "v4:2x2x2", "megacore"),
    "v4-32": ("v4", "v4:2x2x4", "megacore"),
    "v5p-8": ("v5p", "v5:2x2x1", "megacore"),
    "v5p-16": ("v5p", "v5:2x2x2", "megacore"),
    "v5p-32": ("v5p", "v5:2x2x4", "megacore"),
}

# The architectures the recipes name (config.json of each hub repo; Instruct and base share them).
_QWEN2_5 = dict(
    model_type="qwen2",
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=32768,
    use_sliding_window=False,
    bos_token_id=151643,
    eos_token_id=151645,
)
HUB_CONFIGS = {
    "Qwen2.5-0.5B": dict(
        _QWEN2_5,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "Qwen2.5-1.5B": dict(
        _QWEN2_5,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "Qwen2.5-3B": dict(
        _QWEN2_5,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "Qwen2.5-7B": dict(
        _QWEN2_5,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
QWEN2_5_TOKENIZER_SIZE = 151665  # len(tokenizer) of every Qwen2.5 model (the embeddings are padded past it)

# InternVL3 "-hf" checkpoints (transformers' InternVLForConditionalGeneration layout): the InternViT-300M-448px-V2_5
# tower, a LayerNorm -> Linear -> GELU -> Linear projector, and a Qwen2.5 language model (1.5B widths for 2B, 7B
# widths for 8B) whose vocabulary holds the image tokens. Whether these checkpoints tie the LM head cannot be
# read offline: untied is assumed (a separate head: the larger, conservative case).
_INTERNVIT_300M = dict(
    model_type="internvl_vision",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=[448, 448],
    patch_size=[14, 14],
    num_channels=3,
    hidden_act="gelu",
    norm_type="layer_norm",
    layer_norm_eps=1e-6,
    attention_bias=True,
    use_qk_norm=False,
    use_mean_pooling=True,
    use_absolute_position_embeddings=True,
)
_INTERNVL3 = dict(
    model_type="internvl",
    vision_config=_INTERNVIT_300M,
    downsample_ratio=0.5,
    image_seq_length=256,
    image_token_id=151667,
    projector_hidden_act="gelu",
    vision_feature_layer=-1,
    vision_feature_select_strategy="default",
    tie_word_embeddings=False,
)
_INTERNVL3_TEXT = dict(_QWEN2_5, vocab_size=151674, tie_word_embeddings=False)
VL_HUB_CONFIGS = {
    "InternVL3-2B-hf": dict(
        _INTERNVL3,
        text_config=dict(
            _INTERNVL3_TEXT,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
        ),
    ),
    "InternVL3-8B-hf": dict(
        _INTERNVL3,
        text_config=dict(
            _INTERNVL3_TEXT,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
        ),
    ),
}
INTERNVL3_TOKENIZER_SIZE = 151674  # len(tokenizer) of InternVL3's Qwen2.5 tokenizer with its image tokens
INTERNVL_DEFAULT_MAX_TILES = 12  # InternVL3's image processor (max_patches) when image_max_tiles is None


# ------------------------------------------------------------------------------------------ inputs


def load_config(spec: str, overrides: list[str]):
  """`path.py[:arg]` as --config takes it, then `field=value` overrides (dotted paths, Python literals)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("aot_recipe", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  for item in overrides:
    field, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected field=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a bare string
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"--set {item!r}: the config has no field {field!r}")
    node[leaf] = value
  return config


def vl_config(name: str) -> models.InternVLConfig | None:
  """The InternVLConfig of a vision-language model (a local checkpoint's config.json, through the loader's
  load_vl_config, or a written-out hub architecture through InternVLConfig.from_hf_dict); None if text-only."""
  if os.path.isdir(name):
    return models.load_vl_config(name)
  key = name.split("/")[-1]
  return models.InternVLConfig.from_hf_dict(VL_HUB_CONFIGS[key]) if key in VL_HUB_CONFIGS else None


def model_config(name: str) -> models.ModelConfig:
  """A local checkpoint's config.json, or the written-out architecture of a hub id (a vision-language
  model's: its language model's)."""
  vl = vl_config(name)
  if vl is not None:
    return vl.text
  if os.path.isdir(name) or name.endswith(".json"):
    return models.ModelConfig.from_hf_config(name)
  key = name.split("/")[-1].removesuffix("-Instruct")
  if key not in HUB_CONFIGS:
    known = sorted(HUB_CONFIGS) + sorted(VL_HUB_CONFIGS)
    raise ValueError(
        f"model {name!r}: not a local directory and no architecture is written out for it here "
        f"(known: {', '.join(known)}); pass a directory holding its config.json"
    )
  return models.ModelConfig.from_hf_dict(HUB_CONFIGS[key])


def tokenizer_size(config, student: models.ModelConfig) -> int:
  """len(tokenizer): both heads are cut to it (a checkpoint directory without tokenizer files: the vocab)."""
  path = config.tokenizer or config.model
  if os.path.isdir(path):
    try:
      return len(models.load_tokenizer(path))
    except (OSError, ValueError):
      return student.vocab_size
  if path.split("/")[-1] in VL_HUB_CONFIGS:
    return INTERNVL3_TOKENIZER_SIZE
  return QWEN2_5_TOKENIZER_SIZE if path.split("/")[-1].startswith("Qwen2.5") else student.vocab_size


def topology_mesh(name: str, config) -> tuple[jax.sharding.Mesh, Chip]:
  """The config's (data, fsdp, tensor) mesh over the compile-only devices of a TPU slice."""
  if name not in TOPOLOGIES:
    raise ValueError(f"--topology={name!r}: unknown; known: {', '.join(TOPOLOGIES)}")
  from jax.experimental import topologies

  generation, topology, chip_config = TOPOLOGIES[name]
  devices = topologies.get_topology_desc(
      platform="tpu",
      topology_name=topology,
      chip_config_name=chip_config,
      chips_per_host_bounds=(2, 2, 1),
      num_slices=1,
  ).devices
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
  return mesh, CHIPS[generation]


def abstract_model(cfg, config, mesh, student: bool = True) -> tuple[nnx.Module, nnx.State]:
  """(module, state): the module without weights, and its params as ShapeDtypeStructs in the shardings
  their logical axis names give (the layout from_pretrained loads into). `cfg`: a ModelConfig (CausalLM) or
  an InternVLConfig (InternVL; a student's tower / projector train as the config says, a teacher's never)."""
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, **models.model_options(config))
  if student and isinstance(cfg, models.InternVLConfig):
    kw.update(train_vision_tower=bool(config.train_vision_tower), train_projector=bool(config.train_projector))
  module = nnx.eval_shape(lambda: models.build_model(cfg, rngs=nnx.Rngs(0), **kw))
  state = nnx.state(module)
  shardings = sharding.state_shardings(state, mesh)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  return module, params


def _replicated(mesh, x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _with_out_shardings(mesh, fn, *args):
  """Shapes of fn(*args) with the shardings XLA gives them (how the trainer's jit(tx.init) places them);
  values that depend on no input (counts) go on the mesh replicated, as the trainer puts them."""
  shapes = jax.eval_shape(fn, *args)
  compiled = jax.jit(fn).lower(*args).compile()
  replicated = NamedSharding(mesh, PartitionSpec())
  on_mesh = lambda sh: isinstance(sh, NamedSharding) and sh.mesh == mesh
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh if on_mesh(sh) else replicated),
      shapes,
      compiled.output_shardings,
  )


def _with_shardings(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


@dataclasses.dataclass
class Abstract:
  """The trainer's setup, without data or weights."""

  config: object
  mesh: jax.sharding.Mesh
  student: nnx.Module
  teacher: nnx.Module | None
  step_cfg: ts.StepConfig
  tx: object
  schedule: object
  lora_spec: object
  state: ts.TrainState  # ShapeDtypeStructs with shardings
  batch: dict  # ShapeDtypeStructs with shardings
  student_params: object  # the weights the sampler reads (LoRA merged)


def build_abstract(config, mesh) -> Abstract:
  """trainer.build's state and step inputs, as shapes: models from their configs, the optimizer, LoRA, the
  teacher, the train state and a worst-case batch (every width at its limit)."""
  student_cfg = model_config(config.model)
  student_vl = vl_config(config.model)
  student, params = abstract_model(student_vl or student_cfg, config, mesh)
  kind = ts.teacher_kind(config)
  teacher = teacher_params = None
  if kind == "model":
    teacher_cfg = vl_config(config.teacher_model) or model_config(config.teacher_model)
    teacher, teacher_params = abstract_model(teacher_cfg, config, mesh, student=False)
  vocab = tokenizer_size(config, student_cfg)
  offload = bool(config.offload_teacher_model) and kind == "model" and trainer.host_memory_available()
  cfg = ts.StepConfig.from_run_config(config, vocab, offload_teacher=offload)
  if cfg.offload_teacher:
    teacher_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding.with_memory_kind("pinned_host")),
        teacher_params,
    )
  tx, schedule = optim.from_config(config)
  base_params, lora_spec = None, lora.spec_from_config(config)
  if lora_spec is None:  # as resume.initial_state: a frozen tower / projector gets no optimizer state
    tx = optim.freeze(tx, params, optim.frozen_parts(config))
  key = jax.eval_shape(lambda: jax.random.key(config.seed))
  if lora_spec is not None:
    base_params = params
    shapes = jax.eval_shape(lambda b, k: lora.init_adapters(b, lora_spec, k), base_params, key)
    shards = lora.adapter_shardings(shapes, mesh)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shards)
  state = ts.TrainState(
      step=_replicated(mesh, jnp.zeros((), jnp.int32)),
      params=params,
      opt_state=_with_shardings(jax.eval_shape(tx.init, params), ts.opt_state_shardings(tx, params)),
      teacher_params=teacher_params,
      rng=_replicated(mesh, key),
      base_params=base_params,
  )
  b = config.batch_size
  limits = rows_lib.Limits(config.max_length, config.max_prompt_length, config.max_completion_length)
  p = limits.prompt_budget
  c = min(x for x in (config.max_completion_length, config.max_length) if x is not None)
  rows = sharding.batch_sharding(mesh)
  arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
  batch = {
      "prompt_ids": arr((b, p), jnp.int32),
      "prompt_mask": arr((b, p), jnp.bool_),
      "completion_ids": arr((b, c), jnp.int32),
      "completion_mask": arr((b, c), jnp.bool_),
      "student_generated": _replicated(mesh, jnp.zeros((), jnp.bool_)),
  }
  if cfg.teacher in ("model", "self") and config.teacher_prompt_template:
    pt = limits.teacher_prompt_budget
    batch.update(teacher_prompt_ids=arr((b, pt), jnp.int32), teacher_prompt_mask=arr((b, pt), jnp.bool_))
  if cfg.teacher == "server":
    batch.update(
        teacher_topk_values=arr((b, c, cfg.topk), jnp.float32), teacher_topk_indices=arr((b, c, cfg.topk), jnp.int32)
    )
  if student_vl is not None:  # every row at the most tiles a picture gives: image_max_tiles + the thumbnail
    tiles = images.bucket_tiles(max_image_tiles(config) + 1)
    s = student_vl.vision.image_size
    batch["pixel_values"] = arr((b, tiles, student_vl.vision.num_channels, s, s), jnp.float32)
  return Abstract(config, mesh, student, teacher, cfg, tx, schedule, lora_spec, state, batch, base_params or params)


def max_image_tiles(config) -> int:
  """The most tiles (before the thumbnail) a picture is cut into: config.image_max_tiles, or the processor's."""
  return config.image_max_tiles if config.image_max_tiles is not None else INTERNVL_DEFAULT_MAX_TILES


def vision_forward_flops(model: nnx.Module, tiles: int) -> float:
  """Matmul FLOPs of an InternVL's vision tower + projector forward over `tiles` tiles (0 for a CausalLM):
  metrics.vision_flops_per_tile, the trainer's own count."""
  vl = getattr(model, "vl_config", None)
  return 0.0 if vl is None else float(tiles) * metrics.vision_flops_per_tile(vl)


# ------------------------------------------------------------------------------------------ compile


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += math.prod(shape) * x.dtype.itemsize  # key dtypes carry their own itemsize
  return total


def _report(name, compiled, lower_s, compile_s, chip: Chip) -> dict:
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {
      "program": name,
      "arguments_gib": mem.argument_size_in_bytes / GIB,
      "outputs_gib": mem.output_size_in_bytes / GIB,
      "aliased_gib": mem.alias_size_in_bytes / GIB,
      "temps_gib": mem.temp_size_in_bytes / GIB,
      "code_gib": mem.generated_code_size_in_bytes / GIB,
      "host_arguments_gib": mem.host_argument_size_in_bytes / GIB,
      "host_temps_gib": getattr(mem, "host_temp_size_in_bytes", 0) / GIB,  # e.g. remat="offload"'s residuals
      "flops": float(cost.get("flops", 0.0)),
      "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "lower_s": lower_s,
      "compile_s": compile_s,
  }
  # Peak HBM: live arguments, outputs not written in place of a donated argument, temporaries, code.
  out["total_gib"] = out["arguments_gib"] + out["outputs_gib"] - out["aliased_gib"] + out["temps_gib"] + out["code_gib"]
  out["capacity_gib"] = chip.hbm_gib
  out["fits"] = out["total_gib"] <= chip.hbm_gib
  out["compute_s"] = out["flops"] / (chip.bf16_tflops * 1e12)
  out["memory_s"] = out["bytes_accessed"] / (chip.hbm_gbps * 1e9)
  out["roofline_s"] = max(out["compute_s"], out["memory_s"])
  return out


def _compile(fn, *args):
  """(compiled, lower seconds, compile seconds); compile CPU seconds (all threads, steadier than wall time on
  a busy host) are attached to the compiled object's report by the caller."""
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  t1, c1 = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t1, time.process_time() - c1


def remat_recompute_flops(cfg: models.ModelConfig, remat: str, batch: int, seq_len: int) -> float:
  """Matmul FLOPs the student's backward pass recomputes under a remat policy: "full" runs each layer's
  forward again; "dots" / "offload" keep the weight matmuls' outputs and recompute the attention products
  (QKᵀ and AV, which have batch dimensions); "none" recomputes no matmul. Elementwise work is left out."""
  if remat in (None, False, "none"):
    return 0.0
  if remat in (True, "full"):
    head = 2.0 * cfg.hidden_size * cfg.vocab_size
    return batch * seq_len * (metrics.forward_flops_per_token(cfg, seq_len / 2) - head)
  q = cfg.num_attention_heads * cfg.head_dim
  return batch * seq_len * cfg.num_hidden_layers * 4.0 * q * seq_len / 2


def compile_train_step(a: Abstract, chip: Chip) -> dict:
  """The trainer's jitted step (same shardings, donation) compiled for the topology."""
  step_fn, _ = ts.make_steps(a.student, a.tx, a.schedule, a.step_cfg, teacher=a.teacher, lora_spec=a.lora_spec)
  state_sharding = jax.tree.map(lambda x: x.sharding, a.state)
  replicated = NamedSharding(a.mesh, PartitionSpec())
  jitted = jax.jit(
      step_fn, in_shardings=(state_sharding, None), out_shardings=(state_sharding, replicated), donate_argnums=0
  )
  compiled, lower_s, compile_s, compile_cpu_s = _compile(jitted, a.state, a.batch)
  out = _report("train_step", compiled, lower_s, compile_s, chip)
  out["compile_cpu_s"] = compile_cpu_s
  config = a.config
  teacher_cfg = (
      a.teacher.config if a.teacher is not None else (a.student.config if a.step_cfg.teacher == "self" else None)
  )
  p, c = a.batch["prompt_ids"].shape[1], a.batch["completion_ids"].shape[1]
  model = metrics.step_flops(a.student.config, teacher_cfg, config.batch_size, p + c, c)
  out["recompute_flops"] = remat_recompute_flops(a.student.config, config.remat, config.batch_size, p + c) / a.mesh.size
  # Image inputs: each model's tower + projector forward over every row's tiles (frozen: no backward; a
  # trained tower or projector's backward is not counted).
  tiles = config.batch_size * a.batch["pixel_values"].shape[1] if "pixel_values" in a.batch else 0
  vision = vision_forward_flops(a.student, tiles)
  if a.teacher is not None:
    vision += vision_forward_flops(a.teacher, tiles)
  out["vision_flops"] = vision / a.mesh.size
  out["model_flops"] = (
      (model["student"] + model["teacher"]) / a.mesh.size + out["recompute_flops"] + out["vision_flops"]
  )
  # XLA counts a scanned layer stack's body once: the compute bound takes the larger of its count and the
  # model's (with remat's recomputation in the backward pass).
  out["compute_s"] = max(out["flops"], out["model_flops"]) / (chip.bf16_tflops * 1e12)
  out["roofline_s"] = max(out["compute_s"], out["memory_s"])
  out["state_gib"] = per_chip_bytes(a.state) / GIB
  out["param_gib"] = per_chip_bytes(a.state.params) / GIB
  return out


def compile_sampler(a: Abstract, chip: Chip) -> dict:
  """The student's on-policy generation (prefill + decode loop over max_completion_length tokens)."""
  config = a.config
  graphdef = nnx.graphdef(a.student)
  b, p = a.batch["prompt_ids"].shape
  n = config.max_completion_length
  scfg = sampling.SamplingConfig(
      max_new_tokens=n,
      temperature=float(config.temperature),
      top_k=int(config.get("top_k", 0)),
      top_p=float(config.get("top_p", 1.0)),
      eos_token_ids=sampling.normalize_stop_ids(a.student.config.eos_token_id),
      vocab_size=a.step_cfg.vocab_size,
  )
  # The cache as generate allocates it: its shapes, and the shardings its allocation program gives.
  init = lambda params: sampling._init_cache(graphdef, params, b, p + n, a.mesh)
  cache = _with_out_shardings(a.mesh, init, a.student_params)
  key = _replicated(a.mesh, jax.eval_shape(lambda: jax.random.key(0)))
  program = sampling._generate_program
  args = (graphdef, scfg, a.student_params, cache, a.batch["prompt_ids"], a.batch["prompt_mask"], key)
  if "pixel_values" in a.batch:  # the prefill reads the images (generate's pixel_values)
    args += (a.batch["pixel_values"],)
  compiled, lower_s, compile_s, compile_cpu_s = _compile(program, *args)
  out = _report("sampler", compiled, lower_s, compile_s, chip)
  out["compile_cpu_s"] = compile_cpu_s
  # The train state stays in HBM while the student samples; the sampler's own arguments hold its params.
  out["with_state_gib"] = out["total_gib"] - per_chip_bytes(a.student_params) / GIB + per_chip_bytes(a.state) / GIB
  out["fits"] = out["with_state_gib"] <= chip.hbm_gib
  # Decode is bandwidth bound: every token reads the (language model's) params and the KV cache once.
  lm_params = a.student_params["language_model"] if "pixel_values" in a.batch else a.student_params
  decode_bytes = n * (per_chip_bytes(lm_params) + per_chip_bytes(cache))
  gen = metrics.step_flops(a.student.config, None, b, p + n, n, generated=n)["generation"] / a.mesh.size
  if "pixel_values" in a.batch:  # the prefill's tower + projector over every row's tiles
    out["vision_flops"] = vision_forward_flops(a.student, b * a.batch["pixel_values"].shape[1]) / a.mesh.size
    gen += out["vision_flops"]
  out["model_flops"] = gen
  out["roofline_s"] = max(decode_bytes / (chip.hbm_gbps * 1e9), gen / (chip.bf16_tflops * 1e12))
  return out


# ------------------------------------------------------------------------------------------ main


def _print(rows: list[dict], header: str):
  print(header)
  for r in rows:
    extra = f"  (+ train state: {r['with_state_gib']:.2f} GiB)" if "with_state_gib" in r else ""
    print(
        f"  {r['program']:<10} HBM/chip: args {r['arguments_gib']:.2f} + out {r['outputs_gib']:.2f} "
        f"- aliased {r['aliased_gib']:.2f} + temps {r['temps_gib']:.2f} = {r['total_gib']:.2f} GiB "
        f"of {r['capacity_gib']:.0f}{extra} [{'fits' if r['fits'] else 'DOES NOT FIT'}]"
        + (f"; host memory: {r['host_temps_gib']:.2f} GiB" if r.get("host_temps_gib") else "")
    )
    print(
        f"  {'':<10} FLOPs/chip: XLA {r['flops']:.3e}, model {r['model_flops']:.3e}; bytes {r['bytes_accessed']:.3e}; "
        f"roofline {r['roofline_s'] * 1e3:.1f} ms; lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s "
        f"({r['compile_cpu_s']:.0f} CPU s)"
    )


def run(config, topology: str, programs=("train_step", "sampler")) -> dict:
  mesh, chip = topology_mesh(topology, config)
  t0 = time.perf_counter()
  a = build_abstract(config, mesh)
  result = {
      "topology": topology,
      "mesh": dict(mesh.shape),
      "chip": dataclasses.asdict(chip),
      "build_s": time.perf_counter() - t0,
      "programs": [],
  }
  if "train_step" in programs:
    result["programs"].append(compile_train_step(a, chip))
  if "sampler" in programs:
    result["programs"].append(compile_sampler(a, chip))
  return result


def markdown_table(results: list[dict]) -> str:
  """One row per compiled program of --json results."""
  lines = [
      "| config | topology (mesh) | settings | program | args GiB | temps GiB | total GiB / chip | fits | "
      "XLA FLOPs/chip | model FLOPs/chip | roofline ms | compile s (CPU s) |",
      "|" + "---|" * 12,
  ]
  for r in results:
    mesh = "×".join(str(v) for v in r["mesh"].values())
    for p in r["programs"]:
      chip = r["chip"]
      if p["program"] == "train_step":  # older results: the compute bound from the larger FLOP count
        compute = max(p["flops"], p["model_flops"]) / (chip["bf16_tflops"] * 1e12)
        p["roofline_s"] = max(compute, p["bytes_accessed"] / (chip["hbm_gbps"] * 1e9))
      total = f"{p['total_gib']:.2f}" + (f" (+state {p['with_state_gib']:.2f})" if "with_state_gib" in p else "")
      total += f" (+host {p['host_temps_gib']:.2f})" if p.get("host_temps_gib") else ""
      cpu = f" ({p['compile_cpu_s']:.0f})" if "compile_cpu_s" in p else ""
      lines.append(
          f"| {r['config']} | {r['topology']} ({mesh}) | {' '.join(r['overrides'])} | {p['program']} | "
          f"{p['arguments_gib']:.2f} | {p['temps_gib']:.2f} | {total} / {chip['hbm_gib']:.0f} | "
          f"{'fits' if p['fits'] else '**no**'} | {p['flops']:.2e} | {p['model_flops']:.2e} | "
          f"{p['roofline_s'] * 1e3:.0f} | {p['compile_s']:.0f}{cpu} |"
      )
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--table", nargs="+", metavar="JSON", help="print a markdown table of --json results and exit")
  ap.add_argument("--config", help="configs/NAME.py[:arg]")
  ap.add_argument("--topology", help=f"one of {', '.join(TOPOLOGIES)}")
  ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override (repeatable)")
  ap.add_argument("--programs", default="train_step,sampler", help="comma-separated: train_step, sampler")
  ap.add_argument("--json", help="also write the numbers to this file")
  args = ap.parse_args(argv)
  if args.table:
    results = []
    for path in args.table:
      with open(path) as f:
        results.append(json.load(f))
    print(markdown_table(results))
    return {}
  if not (args.config and args.topology):
    ap.error("--config and --topology are required")
  config = load_config(args.config, args.set)
  result = run(config, args.topology, tuple(args.programs.split(",")))
  result.update(config=args.config, overrides=args.set)
  _print(result["programs"], f"{args.config} on {args.topology} (mesh {result['mesh']}), {' '.join(args.set)}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
