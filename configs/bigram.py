"""GKD between two bigram language models, no network, seconds on a CPU.

The smallest real job the package runs: Algorithm 1 of the GKD paper with bigram LMs
(a token's next-token distribution is one row of a logits table). Each step draws the λ coin from
(seed, step): the student samples the batch (on-policy), else the teacher does when seq_kd is on, else
a fixed dataset sampled once from the teacher is used. The generalized JSD(β) between the two models'
next-token distributions on those sequences is minimized with optax.
(The README's main command, configs/default.py, runs the full transformer pipeline.)

    python -m gkd_jax.main --config=configs/bigram.py --workdir=/tmp/gkd_bigram
    python -m gkd_jax.main --config=configs/bigram.py --workdir=/tmp/gkd_bigram --config.beta=1.0 --config.lmbda=1.0

Expected: about 10 s on 2 CPU cores; the JSD falls by more than 10x and top-1 agreement reaches ~1.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.job = "bigram"
  c.seed = 0
  c.vocab_size = 48
  c.seq_len = 24
  c.batch_size = 32
  c.dataset_size = 512
  c.steps = 300
  c.learning_rate = 0.1
  c.beta = 0.5  # 0 = forward KL(teacher‖student), 1 = reverse KL(student‖teacher)
  c.lmbda = 0.5  # probability of an on-policy (student-sampled) step
  c.seq_kd = False  # off-policy steps use teacher samples instead of the dataset
  c.temperature = 0.9  # sampling temperature, and the loss temperature unless loss_temperature is set
  c.loss_temperature = None
  c.teacher_sharpness = 4.0
  c.log_every = 50
  if arg == "runlocal":
    c.steps = 60
  return c
