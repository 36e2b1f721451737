"""InternVL vs transformers' InternVLForConditionalGeneration on tiny random checkpoints: image features, logits
with images (one per row and several per row, left padded), greedy decoding, bf16, export, gradients, errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gkd_jax import sampling
from gkd_jax import sharding as shd
from gkd_jax.models import (
    InternVL,
    InternVLConfig,
    check_image_tokens,
    from_pretrained,
    load_config,
    load_vl_config,
    save_pretrained,
)
import helpers

V, IMG, PAD = 160, 150, 0
IMAGE = 56  # 4 x 4 patches of 14 -> pixel shuffle 0.5 -> 4 features per tile
SEQ = 4
VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=IMAGE, patch_size=14
)
TEXT = dict(
    model_type="qwen2",
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
# base: layer_norm tower with a final LayerNorm, attention biases, untied head, last layer's features.
# rms_qk: the 6B towers' rms_norm + q/k norm, an earlier layer's features (-2), tied head.
CASES = {
    "base": (dict(use_mean_pooling=False, attention_bias=True), dict(tie_word_embeddings=False)),
    "rms_qk": (
        dict(norm_type="rms_norm", use_qk_norm=True),
        dict(tie_word_embeddings=True, vision_feature_layer=-2),
    ),
}


def build_hf(name, directory):
  vision, top = CASES[name]
  torch.manual_seed(0)
  config = transformers.InternVLConfig(
      vision_config={**VISION, **vision},
      text_config=dict(TEXT),
      image_token_id=IMG,
      image_seq_length=SEQ,
      **top,
  )
  model = transformers.InternVLForConditionalGeneration(config).eval()
  model.set_attn_implementation("eager")
  with torch.no_grad():  # HF zero-inits cls/pos embeddings and sets layer scales to 0.1: make them matter
    for pname, p in model.named_parameters():
      if "lambda" in pname:
        p.copy_(0.5 + 0.3 * torch.randn_like(p))
      elif any(k in pname for k in ("norm", "bias", "cls_token", "position_embeddings")):
        p.add_(0.3 * torch.randn_like(p))
      elif "language_model" in pname or "lm_head" in pname:
        p.mul_(4.0)  # confident next-token predictions: greedy decoding compares tokens, not near-ties
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (directory, HF model), built on first use."""
  return helpers.checkpoint_cache(tmp_path_factory, build_hf)


def pixels(num_tiles, seed=0):
  return np.random.RandomState(seed).randn(num_tiles, 3, IMAGE, IMAGE).astype(np.float32)


def image_batch(images_per_row, length=24, tiles=None, seed=0):
  """Left-padded rows of text with `images_per_row[b]` images (one tile each, SEQ tokens apiece, spread out),
  their pixels [B, P, 3, S, S] with P = tiles (zero padding tiles) and the flat [sum, 3, S, S] HF takes."""
  rng = np.random.RandomState(seed)
  b = len(images_per_row)
  ids = np.full((b, length), PAD, np.int64)
  mask = np.zeros((b, length), np.int32)
  p = tiles or max(max(images_per_row), 1)
  batch = np.zeros((b, p, 3, IMAGE, IMAGE), np.float32)
  flat = []
  for row, n in enumerate(images_per_row):
    tokens = []
    for k in range(n):
      tokens += list(rng.randint(3, IMG, 2)) + [IMG] * SEQ
      batch[row, k] = pixels(1, seed=100 * seed + 10 * row + k)[0]
      flat.append(batch[row, k])
    tokens += list(rng.randint(3, IMG, 3 + row))
    ids[row, length - len(tokens) :] = tokens
    mask[row, length - len(tokens) :] = 1
  return ids, mask, batch, np.stack(flat)


def positions_of(mask):
  return np.maximum(np.cumsum(mask, 1) - 1, 0)


def hf_logits(model, ids, mask, flat_pixels):
  with torch.no_grad():
    out = model(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        position_ids=torch.tensor(positions_of(mask)),
        pixel_values=torch.tensor(flat_pixels),
    )
  return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask, pixel_values):
  return nnx.merge(graphdef, state)(ids, mask, pixel_values=pixel_values).logits


def logits_of(model, ids, mask, batch=None):
  """Jitted forward (eager op-by-op dispatch is the slow part at these sizes)."""
  graphdef, state = nnx.split(model)
  return _forward(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), None if batch is None else jnp.asarray(batch))


def max_diff_real(a, b, mask):
  return float((np.abs(np.asarray(a, np.float32) - b) * mask[..., None]).max())


@pytest.mark.parametrize("name", list(CASES))
def test_image_features_logits_and_export_match_transformers(name, checkpoints, tmp_path):
  directory, hf = checkpoints(name)
  model = from_pretrained(directory)
  assert isinstance(model, InternVL) and model.config == load_config(directory)
  assert load_vl_config(directory) == model.vl_config and model.vl_config.image_seq_length == SEQ

  tiles = pixels(3)
  with torch.no_grad():
    ref = hf.get_image_features(pixel_values=torch.tensor(tiles)).pooler_output.numpy()  # [3, SEQ, H]
  ours = model.image_features(jnp.asarray(tiles).reshape(1, 3, 3, IMAGE, IMAGE))
  assert ours.shape == (1, 3 * SEQ, 32)
  np.testing.assert_allclose(np.asarray(ours).reshape(3, SEQ, 32), ref, atol=1e-5)

  # One row with three images, one with one, a text-only row; P = 4 (a zero padding tile everybody has).
  ids, mask, batch, flat = image_batch([1, 3, 0], tiles=4)
  ref = hf_logits(hf, ids, mask, flat)
  assert max_diff_real(logits_of(model, ids, mask, batch), ref, mask) <= 1e-4
  # The images matter: without them the logits differ.
  assert max_diff_real(logits_of(model, ids, mask), ref, mask) > 1e-2

  save_pretrained(model, str(tmp_path))
  reloaded = transformers.InternVLForConditionalGeneration.from_pretrained(
      str(tmp_path), attn_implementation="eager"
  ).eval()
  assert max_diff_real(hf_logits(reloaded, ids, mask, flat), ref, mask) <= 1e-5
  assert load_vl_config(str(tmp_path)) == model.vl_config


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_generate_with_images_matches_transformers(scan_layers, checkpoints):
  directory, hf = checkpoints("base")
  model = from_pretrained(directory, scan_layers=scan_layers)
  ids, mask, batch, flat = image_batch([2, 1], length=16, seed=1)
  new = 6
  with torch.no_grad():
    ref = hf.generate(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        pixel_values=torch.tensor(flat),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
    )[:, ids.shape[1] :].numpy()
  out = sampling.generate(
      model, ids, mask, key=jax.random.key(0), max_new_tokens=new, temperature=0.0, pixel_values=jnp.asarray(batch)
  )
  np.testing.assert_array_equal(np.asarray(out.completion_ids), ref)
  text_only = sampling.generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=new, temperature=0.0)
  assert not np.array_equal(np.asarray(text_only.completion_ids), ref)  # the prefill saw the images


def test_bf16_compute_close_to_float32(checkpoints):
  directory, _ = checkpoints("base")
  ids, mask, batch, _ = image_batch([2, 1], seed=2)
  f32 = np.asarray(logits_of(from_pretrained(directory), ids, mask, batch))
  model = from_pretrained(directory, dtype=jnp.bfloat16)
  logits = logits_of(model, ids, mask, batch)
  assert logits.dtype == jnp.bfloat16 and model.vision_tower.layers[0].fc1.kernel[...].dtype == jnp.float32
  spread = float(np.abs(f32 * mask[..., None]).max())
  assert max_diff_real(logits, f32, mask) <= 0.05 * spread
  # Confident positions (top-1 ahead by a margin bf16 cannot close) keep their argmax.
  top2 = np.sort(f32, -1)[..., -2:]
  confident = (top2[..., 1] - top2[..., 0] > 0.1 * spread) & (mask == 1)
  assert confident.sum() >= 5
  np.testing.assert_array_equal(np.argmax(np.asarray(logits, np.float32), -1)[confident], f32.argmax(-1)[confident])


def test_sharded_load_matches_single_device(checkpoints):
  directory, _ = checkpoints("base")
  ids, mask, batch, _ = image_batch([1, 2, 0, 1], seed=3)
  model = from_pretrained(directory, mesh=shd.make_mesh(2, 2, 2))
  q = model.vision_tower.layers[0].attn.q.kernel[...]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  logits = logits_of(model, ids, mask, batch)
  # Row 1 has two images: XLA's partitioner once swapped batch rows inside the projector.
  single = logits_of(from_pretrained(directory), ids, mask, batch)
  assert max_diff_real(logits, np.asarray(single), mask) <= 1e-5


@pytest.mark.parametrize("tower, projector", [(False, False), (True, False), (False, True)])
def test_frozen_parts_get_no_gradient(tower, projector, checkpoints):
  directory, _ = checkpoints("rms_qk")
  # remat on when the tower trains: its layers are checkpointed too.
  model = from_pretrained(directory, train_vision_tower=tower, train_projector=projector, remat=tower)
  ids, mask, batch, _ = image_batch([1, 2], seed=4)
  weights = jnp.asarray(np.random.RandomState(0).randn(*ids.shape, V), jnp.float32)

  def loss(m):
    return jnp.sum(m(jnp.asarray(ids), jnp.asarray(mask), pixel_values=jnp.asarray(batch)).logits * weights)

  grads = nnx.jit(nnx.grad(loss))(model)
  norm = lambda part: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads[part])))
  assert (norm("vision_tower") > 0) == tower
  assert (norm("projector") > 0) == projector
  assert norm("language_model") > 0


def test_image_token_errors(checkpoints):
  directory, _ = checkpoints("base")
  model = from_pretrained(directory)
  ids, mask, batch, _ = image_batch([1, 2], seed=5)
  check_image_tokens(ids, [1, 2], SEQ, IMG)
  with pytest.raises(
      ValueError, match=r"row 1 holds 8 image tokens \(id 150\) but its 1 tile\(s\) give 4 image features"
  ):
    check_image_tokens(ids, [1, 1], SEQ, IMG)
  with pytest.raises(ValueError, match="row 1 holds 8 image tokens but pixel_values give at most 4"):
    model(jnp.asarray(ids), jnp.asarray(mask), pixel_values=jnp.asarray(batch[:, :1]))
  with pytest.raises(ValueError, match="pixel_values tiles are"):
    model.image_features(jnp.zeros((1, 1, 3, 28, 28)))


def test_config_validation(checkpoints):
  cfg = load_vl_config(checkpoints("base")[0])
  with pytest.raises(ValueError, match="'full' is not supported"):
    dataclasses.replace(cfg, vision_feature_select_strategy="full")
  with pytest.raises(ValueError, match="image_seq_length=16, but a tile gives"):
    dataclasses.replace(cfg, image_seq_length=16)
  with pytest.raises(ValueError, match="out of range"):
    dataclasses.replace(cfg, vision_feature_layer=5)
  assert InternVLConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
  assert load_vl_config(checkpoints("base")[0]).text.tie_word_embeddings is False
