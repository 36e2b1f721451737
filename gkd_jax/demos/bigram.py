"""GKD between two bigram language models: Algorithm 1 in miniature, seconds on a CPU.

A bigram LM's next-token distribution is one row of a [V, V] logits table. Each step draws the λ coin
(rollout.mode_for_step): the student samples the batch (on-policy), else the teacher does when seq_kd is
on, else a fixed dataset sampled once from the teacher is used; the JSD(β) between the two tables' rows
on those sequences is minimized with optax.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gkd_jax import losses, rollout


def sample_bigram(logits, first_tokens, key, length, temperature):
  """Samples sequences [B, length] from a bigram table [V, V] starting at first_tokens [B]."""

  def step(tok, k):
    nxt = jax.random.categorical(k, logits[tok] / temperature)
    return nxt, nxt

  _, rest = jax.lax.scan(step, first_tokens, jax.random.split(key, length - 1))
  return jnp.concatenate([first_tokens[:, None], rest.T], axis=1)


def run(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  loss_temperature = config.loss_temperature or config.temperature
  root = jax.random.key(config.seed)
  k_teacher, k_student, k_data, k_loop = jax.random.split(root, 4)
  v = config.vocab_size
  teacher = config.teacher_sharpness * jax.random.normal(k_teacher, (v, v))
  student = 0.1 * jax.random.normal(k_student, (v, v))
  firsts = jax.random.randint(k_data, (config.dataset_size,), 0, v)
  dataset = sample_bigram(teacher, firsts, k_data, config.seq_len, config.temperature)

  opt = optax.adam(config.learning_rate)
  opt_state = opt.init(student)

  def loss_fn(student, seqs):
    s, t = student[seqs[:, :-1]], teacher[seqs[:, :-1]]
    return losses.generalized_jsd_loss(s, t, beta=config.beta, temperature=loss_temperature)

  @jax.jit
  def train_step(student, opt_state, seqs):
    loss, grads = jax.value_and_grad(loss_fn)(student, seqs)
    updates, opt_state = opt.update(grads, opt_state, student)
    return optax.apply_updates(student, updates), opt_state, loss

  @jax.jit
  def evaluate(student):
    stats = losses.token_stats(student, teacher, temperature=loss_temperature)
    return {
        "jsd": jnp.mean(
            losses.generalized_jsd_loss(
                student, teacher, beta=config.beta, temperature=loss_temperature, reduction="none"
            )
        ),
        **{k: jnp.mean(x) for k, x in stats.items()},
    }

  sample = jax.jit(sample_bigram, static_argnums=(3,))
  print(
      f"bigram GKD: V={v}, beta={config.beta}, lmbda={config.lmbda}, seq_kd={config.seq_kd}, "
      f"temperature={config.temperature}, loss_temperature={loss_temperature}"
  )
  first = {k: float(x) for k, x in evaluate(student).items()}
  print(f"step     0  eval {json.dumps({k: round(x, 4) for k, x in first.items()})}")
  counts = {"on_policy": 0, "seq_kd": 0, "dataset": 0}
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as log:
    for step in range(1, config.steps + 1):
      mode = rollout.mode_for_step(config.seed, step, config.lmbda, config.seq_kd)
      counts[mode] += 1
      key = jax.random.fold_in(k_loop, step)
      starts = jax.random.randint(key, (config.batch_size,), 0, v)
      if mode == "dataset":
        seqs = dataset[jax.random.randint(key, (config.batch_size,), 0, config.dataset_size)]
      else:
        source = student if mode == "on_policy" else teacher
        seqs = sample(source, starts, key, config.seq_len, config.temperature)
      student, opt_state, loss = train_step(student, opt_state, seqs)
      if not np.isfinite(float(loss)):
        raise FloatingPointError(f"loss is {float(loss)} at step {step} (mode {mode})")
      record = {"step": step, "mode": mode, "loss": float(loss)}
      if step % config.log_every == 0 or step == config.steps:
        record.update({k: float(x) for k, x in evaluate(student).items()})
        print(
            f"step {step:5d}  loss {float(loss):.4f}  eval jsd {record['jsd']:.4f}  "
            f"fkl {record['forward_kl']:.4f}  rkl {record['reverse_kl']:.4f}  "
            f"top1 {record['top1_agreement']:.3f}"
        )
      log.write(json.dumps(record) + "\n")
  print(f"modes: {counts}; eval JSD {first['jsd']:.4f} -> {record['jsd']:.4f}; metrics in {workdir}/metrics.jsonl")
  return record
