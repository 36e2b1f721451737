"""Flax models vs transformers (PyTorch) on tiny random checkpoints: logits, KV cache, export, sharding."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gkd_jax import sharding as shd
from gkd_jax.models import CausalLM, ModelConfig, from_pretrained, save_pretrained
from gkd_jax.models import safetensors_io as st
import helpers

V, H, T = 128, 32, 12
BASE = dict(
    vocab_size=V,
    hidden_size=H,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    eos_token_id=2,
    pad_token_id=0,
    bos_token_id=1,
)

# name -> (HF config class, overrides). Together: each family, tied/untied, GQA 1:1 / 2:1 / 4:1, every rope
# scaling type, qkv (+o, mlp) bias, q/k norm, decoupled head_dim, sliding window on some or all layers.
CASES = {
    "llama_gqa2_tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3_rope_untied": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "llama_linear_bias_mha": (
        "LlamaConfig",
        dict(
            num_key_value_heads=4, attention_bias=True, mlp_bias=True, rope_scaling=dict(rope_type="linear", factor=2.0)
        ),
    ),
    "llama_dynamic": (
        "LlamaConfig",
        dict(num_key_value_heads=1, max_position_embeddings=8, rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    ),
    "llama_yarn": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2, rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16)
        ),
    ),
    "qwen2_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_sliding_untied": (
        "Qwen2Config",
        dict(
            num_key_value_heads=1,
            use_sliding_window=True,
            sliding_window=3,
            max_window_layers=1,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3_qknorm_headdim": ("Qwen3Config", dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)),
    "qwen3_bias_tied": (
        "Qwen3Config",
        dict(num_key_value_heads=2, head_dim=8, attention_bias=True, tie_word_embeddings=True),
    ),
    "mistral_sliding": ("MistralConfig", dict(num_key_value_heads=2, head_dim=16, sliding_window=4)),
    "mistral_full_tied": ("MistralConfig", dict(num_key_value_heads=4, sliding_window=None, tie_word_embeddings=True)),
    # Softcaps small enough that tanh really bends these tiny random scores and logits.
    "gemma2_softcap": (
        "Gemma2Config",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=12,
            sliding_window=4,
            attn_logit_softcapping=0.05,
            final_logit_softcapping=0.1,
        ),
    ),
    "gemma3_local_rope": (
        "Gemma3TextConfig",
        dict(
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                "sliding_attention": dict(rope_type="default", rope_theta=1e4),
            },
        ),
    ),
}
DECODE_CASES = [
    "qwen2_sliding_untied",
    "llama3_rope_untied",
    "qwen3_qknorm_headdim",
    "mistral_sliding",
    "gemma3_local_rope",
]


def build_hf(name, directory, **save_kw):
  cls_name, kw = CASES[name]
  torch.manual_seed(0)
  config = getattr(transformers, cls_name)(**{**BASE, **kw})
  config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
  with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomize so they are really tested
    for pname, p in model.named_parameters():
      if "norm" in pname or "bias" in pname:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, **save_kw)
  return model


def left_padded_batch(lengths=(T, 8, 5), seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, V, (len(lengths), T))
  mask = np.zeros((len(lengths), T), np.int32)
  for row, n in enumerate(lengths):
    mask[row, T - n :] = 1
    ids[row, : T - n] = 0
  return ids, mask


def positions_of(mask):
  return np.maximum(np.cumsum(mask, 1) - 1, 0)


def hf_logits(model, ids, mask):
  with torch.no_grad():
    out = model(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions_of(mask))
    )
  return out.logits.float().numpy()


def max_diff_real(a, b, mask):
  return float((np.abs(np.asarray(a, np.float32) - b) * mask[..., None]).max())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """name -> (directory, HF model), built on first use."""
  return helpers.checkpoint_cache(tmp_path_factory, build_hf)


@pytest.mark.parametrize("name", list(CASES))
def test_logit_parity_and_export(name, checkpoints, tmp_path):
  directory, hf = checkpoints(name)
  ids, mask = left_padded_batch()
  ref = hf_logits(hf, ids, mask)
  model = from_pretrained(directory)
  out = model(jnp.asarray(ids), jnp.asarray(mask))
  assert out.logits.dtype == jnp.float32 and out.logits.shape == (3, T, V)
  assert max_diff_real(out.logits, ref, mask) <= 1e-4
  # The fused loss relies on this.
  recomputed = jnp.einsum("bth,hv->btv", out.hidden_states, model.lm_head_weight())
  if cap := model.config.final_logit_softcapping:
    recomputed = jnp.tanh(recomputed / cap) * cap
  np.testing.assert_allclose(recomputed, out.logits, atol=1e-5)
  assert np.isfinite(np.asarray(out.logits)).all()  # padded rows included

  # Export -> transformers load -> same logits; and our own reload keeps the config.
  save_pretrained(model, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  assert type(reloaded) is type(hf)
  assert max_diff_real(hf_logits(reloaded, ids, mask), ref, mask) <= 1e-5
  assert ModelConfig.from_hf_config(str(tmp_path)) == model.config


def _decode_fns(model):
  graphdef, state = nnx.split(model)

  def step(state, cache, ids, mask, index, positions):
    out = nnx.merge(graphdef, state)(ids, mask, positions=positions, cache=cache, cache_index=index)
    return out.logits, out.cache

  return state, jax.jit(step, donate_argnums=1)


@pytest.mark.parametrize("name", DECODE_CASES)
def test_kv_cache_prefill_and_decode_match_full_forward(name, checkpoints):
  directory, _ = checkpoints(name)
  model = from_pretrained(directory)
  ids, mask = left_padded_batch()
  full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)
  prompt_len, slots = 7, T + 2  # two spare slots stay empty
  state, step = _decode_fns(model)
  cache = model.init_cache(3, slots)
  slot_mask = np.zeros((3, slots), np.int32)
  slot_mask[:, :prompt_len] = mask[:, :prompt_len]
  # Prefill derives positions from the mask; decode passes them like the sampler does.
  logits, cache = step(state, cache, ids[:, :prompt_len], slot_mask, jnp.int32(0), None)
  assert max_diff_real(logits, full[:, :prompt_len], mask[:, :prompt_len]) <= 1e-4
  pos = positions_of(mask)
  for i in range(prompt_len, T):
    slot_mask[:, i] = 1
    logits, cache = step(state, cache, ids[:, i : i + 1], slot_mask, jnp.int32(i), pos[:, i : i + 1])
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-4)


def test_cache_is_functional_and_positions_derivable(checkpoints):
  model = from_pretrained(checkpoints("qwen2_tied")[0])
  ids, mask = left_padded_batch()
  cache = model.init_cache(3, T)
  before = jax.tree.map(np.asarray, cache)
  with_pos = model(
      jnp.asarray(ids), jnp.asarray(mask), positions=jnp.asarray(positions_of(mask)), cache=cache, cache_index=0
  )
  without = model(jnp.asarray(ids), jnp.asarray(mask), cache=cache, cache_index=0)
  np.testing.assert_array_equal(with_pos.logits, without.logits)
  chex.assert_trees_all_equal(before, cache)  # input untouched
  assert len(with_pos.cache) == 2 and with_pos.cache[0]["k"].shape == (3, T, 2, 8)
  # Static structure hashes equal across loads, so jitted functions keyed on the graphdef compile once.
  assert nnx.graphdef(model) == nnx.graphdef(from_pretrained(checkpoints("qwen2_tied")[0]))


def test_sharded_index_load_and_save(checkpoints, tmp_path):
  name = "llama3_rope_untied"
  sharded = str(tmp_path / "hf_sharded")
  hf = build_hf(name, sharded, max_shard_size="20KB")
  assert os.path.exists(os.path.join(sharded, st.INDEX_FILE))
  ids, mask = left_padded_batch()
  model = from_pretrained(sharded)
  assert max_diff_real(model(jnp.asarray(ids), jnp.asarray(mask)).logits, hf_logits(hf, ids, mask), mask) <= 1e-4
  ours = str(tmp_path / "ours_sharded")
  save_pretrained(model, ours, max_shard_size="20KB")
  with open(os.path.join(ours, st.INDEX_FILE)) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours).eval()
  assert max_diff_real(hf_logits(reloaded, ids, mask), hf_logits(hf, ids, mask), mask) <= 1e-5


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 4, 2)])
def test_load_under_mesh_matches_single_device(mesh_shape, checkpoints):
  directory, hf = checkpoints("qwen2_tied")
  mesh = shd.make_mesh(*mesh_shape)
  ids, mask = left_padded_batch(lengths=(T, 8, 5, 10))
  model = from_pretrained(directory, mesh=mesh)
  q = model.layers[0].attn.q.kernel[...]  # [embed, heads, head_dim] -> (fsdp, tensor, None)
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (H // mesh_shape[1], 4 // 2, 8)
  emb = model.embed.embedding[...]
  assert emb.addressable_shards[0].data.shape == (V // 2, H // mesh_shape[1])
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m).logits)(state, jnp.asarray(ids), jnp.asarray(mask))
  single = from_pretrained(directory)(jnp.asarray(ids), jnp.asarray(mask)).logits
  assert max_diff_real(logits, np.asarray(single), mask) <= 1e-5
  assert max_diff_real(logits, hf_logits(hf, ids, mask), mask) <= 1e-4


def test_state_shardings_follow_rules():
  cfg = ModelConfig.from_hf_dict({**BASE, "model_type": "qwen2", "num_key_value_heads": 2})
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  mesh = shd.make_mesh(data=1, fsdp=2, tensor=4)
  state = helpers.shard_state(nnx.state(model), mesh)
  # 2 KV heads cannot split over tensor=4: replicated on that dim instead of failing.
  assert state["layers"][0]["attn"]["k"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None, None)
  assert state["layers"][0]["mlp"]["down"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    assert len(shd.variable_names(var)) == var[...].ndim and None not in shd.variable_names(var)
  # Activation constraints follow a mesh set with jax.set_mesh when the model holds none.
  constrained = jax.jit(lambda x: shd.constrain(x, ("batch", "length", "vocab")))
  with jax.set_mesh(mesh):
    assert constrained(jnp.ones((4, 3, V))).sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
  with pytest.raises(ValueError, match="not divisible"):
    shd.make_mesh(data=3, fsdp=-1)


def test_bf16_compute_and_remat_grads(checkpoints, tmp_path):
  directory, hf = checkpoints("qwen2_tied")
  ids, mask = left_padded_batch()
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  ref = from_pretrained(directory)
  bf16 = from_pretrained(directory, dtype=jnp.bfloat16)
  out = bf16(ids, mask)
  assert out.logits.dtype == jnp.bfloat16 and bf16.embed.embedding[...].dtype == jnp.float32
  assert max_diff_real(out.logits, np.asarray(ref(ids, mask).logits), np.asarray(mask)) < 0.05

  # bf16 params in and out: the exported checkpoint is bf16 and holds exactly the rounded weights.
  pure = from_pretrained(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert pure.layers[0].attn.q.kernel[...].dtype == jnp.bfloat16
  save_pretrained(pure, str(tmp_path), dtype=jnp.bfloat16)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  weight = reloaded.model.layers[0].self_attn.q_proj.weight
  assert weight.dtype == torch.bfloat16
  torch.testing.assert_close(weight, hf.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16))

  def loss(model):
    return jnp.sum((model(ids, mask).logits * mask[..., None]) ** 2)

  grads = nnx.grad(loss)(ref)
  for remat in (True, "nothing_saveable"):
    remat_grads = nnx.grad(loss)(from_pretrained(directory, remat=remat))
    chex.assert_trees_all_close(grads, remat_grads, rtol=1e-7, atol=1e-5)  # numpy's assert_allclose rtol


def test_errors(checkpoints, tmp_path):
  directory, _ = checkpoints("qwen2_tied")
  reader = st.CheckpointReader(directory)
  tensors = {k: np.array(reader.view(k)) for k in reader.keys()}

  missing = tmp_path / "missing"
  missing.mkdir()
  os.link(os.path.join(directory, "config.json"), missing / "config.json")
  st.write_checkpoint(str(missing), {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k})
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(64, 32\)"):
    from_pretrained(str(missing))

  config = json.load(open(os.path.join(directory, "config.json")))
  for sub, change, pattern in [
      ("shape", {"intermediate_size": 48}, r"mlp\.down_proj\.weight.*\(32, 64\).*\(32, 48\)"),
      ("arch", {"model_type": "gpt2"}, r"gpt2.*llama, mistral, qwen2, qwen3, gemma2"),
  ]:
    bad = tmp_path / sub
    bad.mkdir()
    json.dump({**config, **change}, open(bad / "config.json", "w"))
    st.write_checkpoint(str(bad), tensors)
    with pytest.raises(ValueError, match=pattern):
      from_pretrained(str(bad))


def _v4_style(config):
  """The same architecture written the transformers-v4 way (what most Hub checkpoints still carry)."""
  d = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
  rope = config["rope_parameters"]
  if "full_attention" in rope:  # Gemma 3
    d.update(
        rope_theta=rope["full_attention"]["rope_theta"],
        rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
        sliding_window_pattern=2,
    )
    rope = rope["full_attention"]
  else:
    d["rope_theta"] = rope["rope_theta"]
  scaling = {("type" if k == "rope_type" else k): v for k, v in rope.items() if k != "rope_theta"}
  d["rope_scaling"] = None if scaling["type"] == "default" else scaling
  return d


@pytest.mark.parametrize("name", ["llama3_rope_untied", "gemma3_local_rope", "qwen2_sliding_untied"])
def test_v4_style_config(name, checkpoints, tmp_path):
  directory, hf = checkpoints(name)
  v4 = tmp_path / "v4"
  v4.mkdir()
  os.link(os.path.join(directory, "model.safetensors"), v4 / "model.safetensors")
  config = _v4_style(json.load(open(os.path.join(directory, "config.json"))))
  if name.startswith("qwen2"):  # v4 Qwen2 marks sliding layers by max_window_layers only
    assert config["max_window_layers"] == 1
  json.dump(config, open(v4 / "config.json", "w"))
  model = from_pretrained(str(v4))
  assert model.config == from_pretrained(directory).config
  ids, mask = left_padded_batch()
  ref = hf_logits(hf, ids, mask)
  assert max_diff_real(model(jnp.asarray(ids), jnp.asarray(mask)).logits, ref, mask) <= 1e-4
  save_pretrained(model, str(tmp_path / "out"))
  exported = json.load(open(tmp_path / "out" / "config.json"))
  assert "rope_parameters" not in exported and "rope_theta" in exported  # keeps the source's style
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "out"), attn_implementation="eager"
  ).eval()
  assert max_diff_real(hf_logits(reloaded, ids, mask), ref, mask) <= 1e-5


def test_tokenizer_load_and_export(checkpoints, tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  from gkd_jax.models import load_tokenizer

  directory, _ = checkpoints("qwen2_tied")
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  backend.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
  tok.save_pretrained(str(tmp_path / "tok"))
  loaded = load_tokenizer(str(tmp_path / "tok"))
  assert loaded("w5 w7")["input_ids"] == [5, 7] and loaded.eos_token_id == 2
  save_pretrained(from_pretrained(directory), str(tmp_path / "out"), tokenizer=loaded)
  assert load_tokenizer(str(tmp_path / "out"))("w9")["input_ids"] == [9]


def test_hub_id_downloads_only_needed_files(checkpoints, tmp_path, monkeypatch):
  import fnmatch
  import shutil

  import huggingface_hub

  directory, _ = checkpoints("qwen2_tied")
  requested = []

  def fake_snapshot_download(repo_id, allow_patterns):  # a local stand-in for the Hub (tests are offline)
    requested.append(list(allow_patterns))
    out = tmp_path / "snapshot"
    out.mkdir(exist_ok=True)
    for name in os.listdir(directory) + ["consolidated.safetensors"]:
      if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
        shutil.copy(os.path.join(directory, name), out / name)
    return str(out)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  model = from_pretrained("someone/tiny-qwen2")
  assert model.config.model_type == "qwen2"
  assert "model.safetensors" in requested[-1] and not any("*.safetensors" in p for p in requested[-1])


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2"])
def test_random_init_exports_to_transformers(model_type, tmp_path):
  cfg = ModelConfig(
      model_type=model_type,
      vocab_size=V,
      hidden_size=H,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
      qk_norm=model_type == "qwen3",
      tie_word_embeddings=model_type == "gemma2",
      **(
          dict(
              norm_offset=True,
              embed_scale=True,
              sandwich_norm=True,
              hidden_act="gelu_pytorch_tanh",
              sliding_window=4,
              layer_types=("sliding_attention", "full_attention"),
              attn_logit_softcapping=0.05,
              final_logit_softcapping=0.1,
              query_pre_attn_scalar=8,
          )
          if model_type == "gemma2"
          else {}
      ),
  )
  model = CausalLM(cfg, rngs=nnx.Rngs(1))
  save_pretrained(model, str(tmp_path))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  ids, mask = left_padded_batch()
  assert max_diff_real(model(jnp.asarray(ids), jnp.asarray(mask)).logits, hf_logits(hf, ids, mask), mask) <= 1e-4
  assert ModelConfig.from_hf_config(str(tmp_path)) == cfg


def one_layer_model(**kw) -> CausalLM:
  """A one-layer Qwen2-style model over V rows, H wide (4 query / 2 KV heads of 8)."""
  cfg = ModelConfig(
      model_type="qwen2",
      vocab_size=V,
      hidden_size=H,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
      **kw,
  )
  return CausalLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_cut_to_vocabulary(tied):
  """lm_head_weight(vocab) drops the columns past the tokenizer when that removes ≥ 1/8 of them, and the
  logits it gives are the first `vocab` columns of the full head's."""
  model = one_layer_model(tie_word_embeddings=tied)
  full = model.lm_head_weight()
  assert full.shape == (H, V) and model.lm_head_weight(None).shape == (H, V)
  assert model.lm_head_weight(V * 7 // 8 + 1).shape == (H, V)  # barely padded: not worth a copy
  cut = model.lm_head_weight(V // 2)
  np.testing.assert_array_equal(cut, full[:, : V // 2])
  h = jax.random.normal(jax.random.key(0), (5, H))
  np.testing.assert_allclose(h @ cut, (h @ full)[:, : V // 2], rtol=1e-6, atol=1e-7)


def test_call_names_a_wrong_argument():
  model = one_layer_model()
  ids = jnp.ones((2, 5), jnp.int32)
  with pytest.raises(AssertionError, match=r"input_ids must be \[batch, time\] integers"):
    model(ids[0])
  with pytest.raises(AssertionError, match=r"input_ids must be \[batch, time\] integers"):
    nnx.jit(lambda m, x: m(x))(model, ids.astype(jnp.float32))  # raised while tracing
  with pytest.raises(AssertionError, match=r"positions must be \[batch, time\] integers"):
    model(ids, positions=jnp.arange(5))


@pytest.mark.parametrize("dtype", [None, jnp.float32])
def test_head_product_gradient_matches_autodiff(dtype):
  """The LM head's hand-written backward (dW as hidden^T @ dlogits) against autodiff of the plain product,
  for a tied head (the embedding's transpose) and for [..., H] hidden states with two leading axes."""
  from gkd_jax.models.transformer import head_product

  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  hidden, emb = jax.random.normal(k1, (2, 3, 8)), jax.random.normal(k2, (40, 8))
  weights = jax.random.normal(k3, (2, 3, 40))
  f = lambda h, e: jnp.sum(jnp.sin(head_product(h, e.T, dtype)) * weights)
  g = lambda h, e: jnp.sum(jnp.sin(jnp.einsum("...h,hv->...v", h, e.T)) * weights)
  for got, want in zip(jax.grad(f, (0, 1))(hidden, emb), jax.grad(g, (0, 1))(hidden, emb)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
