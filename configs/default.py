"""The README's main command: a whole GKD pipeline on the offline arithmetic task, offline, on a CPU.

Teacher SFT → student SFT init → GKD (on-policy mixture λ=0.5, JSD β=0.5) → greedy test accuracy of the
three. See gkd_jax/demos/arithmetic.py for the phases.

    python -m gkd_jax.main --config=configs/default.py --workdir=/tmp/gkd_demo

TODO(timings/results)
"""
import ml_collections


def _arch(hidden, layers, heads, kv_heads, intermediate):
  return ml_collections.ConfigDict(dict(
      hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
      head_dim=hidden // heads, intermediate_size=intermediate, max_position_embeddings=64))


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.job = "demo"
  c.seed = 0
  c.log_every = 10
  # Three 2-digit operands: 6 equally correct chains per problem in train (a multimodal teacher).
  c.task = dict(seed=0, num_train=20000, num_test=500, num_operands=(3, 3), digits=(2, 2))
  # Prompts are 18 tokens and completions at most 28: tight widths, no padding to the default 64-buckets.
  c.lengths = dict(max_length=52, max_prompt_length=20, max_completion_length=32)

  c.teacher = dict(arch=_arch(128, 4, 4, 2, 512), init_seed=1, objective="sft", lmbda=0.0,
                   batch_size=64, total_steps=600, learning_rate=3e-3, warmup_steps=30, weight_decay=0.01)
  c.student_sft = dict(arch=_arch(96, 3, 4, 2, 256), init_seed=2, objective="sft", lmbda=0.0,
                       batch_size=64, total_steps=150, learning_rate=3e-3, warmup_steps=15, weight_decay=0.01)
  c.gkd = dict(objective="gkd", lmbda=0.5, beta=0.5, temperature=1.0, batch_size=64, total_steps=300,
               learning_rate=1e-3, warmup_steps=0, weight_decay=0.01)
  c.eval = dict(split="test", num_examples=0, batch_size=250, max_new_tokens=32)

  if arg == "runlocal":
    c.task.update(num_train=256, num_test=16)
    c.teacher.arch = _arch(32, 1, 2, 1, 64)
    c.student_sft.arch = _arch(16, 1, 2, 1, 32)
    for phase in (c.teacher, c.student_sft, c.gkd):
      phase.update(batch_size=8, total_steps=4, warmup_steps=0)
    c.log_every = 2
    c.eval.update(batch_size=8, max_new_tokens=32)
  return c
