"""experiments/aot_compile.py: the fixture models' train step compiled for a TPU v5e 2x2 slice on the CPU host."""

import json
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import aot_compile  # noqa: E402
import fixture  # noqa: E402

VOCAB = 32768


def param_count(d: dict) -> int:
  """Parameters of a Qwen2 config, from the architecture (embedding, q/k/v with bias, o, gated MLP, norms)."""
  h, i, layers = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"]
  head_dim = h // d["num_attention_heads"]
  q, kv = d["num_attention_heads"] * head_dim, d["num_key_value_heads"] * head_dim
  per_layer = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * i + 2 * h
  return VOCAB * h * (1 if d["tie_word_embeddings"] else 2) + layers * per_layer + h


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  root = tmp_path_factory.mktemp("aot")
  for name, sizes in fixture.SIZES.items():  # only config.json: nothing is loaded, so no weights are needed
    os.makedirs(root / name)
    with open(root / name / "config.json", "w") as f:
      json.dump(dict(model_type="qwen2", vocab_size=VOCAB, max_position_embeddings=2048, eos_token_id=2, **sizes), f)
  overrides = [
      f"model={root / 'student'}",
      f"teacher_model={root / 'teacher'}",
      "batch_size=8",
      "max_length=96",
      "max_prompt_length=32",
      "max_completion_length=64",
  ]
  config = aot_compile.load_config("configs/gsm8k_qwen2_5.py", overrides)
  return aot_compile.run(config, "v5e-4", programs=("train_step",))


def test_still_on_cpu(report):
  assert jax.default_backend() == "cpu"  # the TPU devices are compile-only


def test_train_step_hbm_is_reported_and_sane(report):
  assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  (step,) = report["programs"]
  gib = aot_compile.GIB
  # f32 student weights + two Adam moments, f32 teacher weights: at least a quarter of them on each chip.
  student, teacher = (param_count(fixture.SIZES[k]) for k in ("student", "teacher"))
  state_bytes = 4 * (3 * student + teacher)
  assert step["state_gib"] * gib >= state_bytes / 4
  assert step["state_gib"] * gib < state_bytes / 2  # sharded: weights and moments are not replicated
  assert step["arguments_gib"] >= step["state_gib"]
  assert step["param_gib"] * gib >= 4 * student / 4
  for key in ("arguments_gib", "outputs_gib", "total_gib", "flops", "bytes_accessed", "compile_s", "roofline_s"):
    assert step[key] > 0, key
  # The donated state is updated in place (TPU tiling pads some buffers a little past their element bytes).
  assert step["state_gib"] <= step["aliased_gib"] <= 1.1 * step["state_gib"]
  assert step["total_gib"] < step["capacity_gib"] == 16
  assert step["fits"]


def test_internvl_recipe_state_and_batch_are_built_abstractly():
  """configs/mllm_internvl.py from the written-out hub architectures: InternVL student and teacher, pixel values
  at the bucketed tile count, and no optimizer state for the frozen vision tower and projector."""
  config = aot_compile.load_config("configs/mllm_internvl.py", ["dtype=bfloat16"])
  mesh, _ = aot_compile.topology_mesh("v5e-4", config)
  a = aot_compile.build_abstract(config, mesh)
  assert type(a.student).__name__ == type(a.teacher).__name__ == "InternVL"
  assert a.step_cfg.vocab_size == aot_compile.INTERNVL3_TOKENIZER_SIZE
  assert a.batch["pixel_values"].shape == (16, 8, 3, 448, 448)  # 6 tiles + the thumbnail, padded to 8
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  params, frozen = count(a.state.params), count(a.state.params["vision_tower"]) + count(a.state.params["projector"])
  assert 2.0e9 < params < 2.2e9 and 7.8e9 < count(a.state.teacher_params) < 8.1e9  # InternVL3-2B / -8B
  assert 0.3e9 < frozen < 0.32e9  # InternViT-300M + the projector
  moments = 2 * (params - frozen)  # Adam's two moments of the language model only (plus a few step counts)
  assert moments <= count(a.state.opt_state) < moments + 100
  assert aot_compile.vision_forward_flops(a.student, 1) > 2 * 0.3e9 * 1025  # every tile's 1,025 tokens
