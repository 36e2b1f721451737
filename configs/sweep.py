"""The paper-replication sweeps on the offline arithmetic task (experiments/sweep.py reads this file).

Base models as in configs/default.py (teacher 989K params, SFT to high accuracy; student 308K params, SFT to a
mediocre start), trained once per workdir. Every run below starts from that student and trains `steps`
optimizer steps of batch 64, once per seed (the seed changes the data order, the λ coin and the samples; the
base models are shared, so the spread is the training noise the paper's seeds measure too):

  sft               continued SFT on the dataset's chains
  seqkd             SeqKD: SFT on the teacher's samples (τ=1) for the train prompts, generated once
  supkd             supervised KD: λ=0, forward KL on the dataset's chains
  onpolicy_<div>    on-policy GKD, λ=1, with div ∈ fkl (β=0), jsd01, jsd05, jsd09 (β=0.1, 0.5, 0.9), rkl (β=1)
  lambda_<100λ>     λ ∈ {0.25, 0.5, 0.75}, forward KL (λ=0 is supkd, λ=1 is onpolicy_fkl)
  onpolicy_fkl_5pct on-policy GKD with forward KL on 5% of the train prompts (data efficiency vs supkd's 100%)

Evaluation of each product (and of the teacher and the initial student): greedy accuracy and chain accuracy on
`eval.num_test` test problems; sampling accuracy at τ ∈ eval.temperatures; diversity = distinct valid chains
among eval.num_samples samples at each τ for eval.diversity_problems problems; greedy accuracy on longer
problems (4 operands) than any trained on.

    python experiments/sweep.py --config=configs/sweep.py --workdir=/tmp/gkd_sweep --workers=2
    python experiments/sweep.py --config=configs/sweep.py --workdir=/tmp/gkd_sweep --report   # table + PNGs
    python experiments/sweep.py --config=configs/sweep.py:runlocal --workdir=/tmp/gkd_sweep_tiny  # ~1 min

Args: "" or "runlocal" (tiny models, 4 steps, 2 runs x 2 seeds: checks the machinery, not the findings).
"""

import importlib.util
import os

import ml_collections

# The base phases are exactly the demo's: one definition of the teacher and the initial student.
_spec = importlib.util.spec_from_file_location("_default_config", os.path.join(os.path.dirname(__file__), "default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)

# Run-name suffix -> β (names avoid dots: they are ConfigDict keys and --config.runs.NAME.x flags).
DIVERGENCES = {"fkl": 0.0, "jsd01": 0.1, "jsd05": 0.5, "jsd09": 0.9, "rkl": 1.0}


def get_config(arg=None):
  c = _default.get_config("runlocal" if arg == "runlocal" else None)
  c.job = "sweep"
  # Problems with 4 operands test length generalization (train and test have 3).
  c.task.update(num_test_long=200, long_num_operands=(4, 4))
  # Room for the long problems' prompts (32-token bucket) and 48 new tokens at evaluation.
  for phase in (c.teacher, c.student_sft):
    phase.arch.max_position_embeddings = 128
  c.seeds = (0, 1, 2)
  c.steps = 300
  c.data_fraction = 0.05
  c.seqkd = dict(temperature=1.0, batch_size=500)
  gkd = dict(
      objective="gkd",
      temperature=1.0,
      batch_size=64,
      learning_rate=3e-3,
      warmup_steps=0,
      weight_decay=0.01,
      lmbda=0.0,
      beta=0.0,
  )
  sft = dict(gkd, objective="sft")
  runs = {"sft": dict(sft), "seqkd": dict(sft, data="seqkd"), "supkd": dict(gkd)}
  for name, beta in DIVERGENCES.items():
    runs[f"onpolicy_{name}"] = dict(gkd, lmbda=1.0, beta=beta)
  for lmbda in (0.25, 0.5, 0.75):
    runs[f"lambda_{round(100 * lmbda):03d}"] = dict(gkd, lmbda=lmbda)
  runs["onpolicy_fkl_5pct"] = dict(gkd, lmbda=1.0, data="fraction")
  c.runs = runs
  c.eval.update(
      num_test=500,
      batch_size=256,
      max_new_tokens=48,
      temperatures=(0.1, 0.5, 1.0),
      num_samples=8,
      diversity_problems=64,
      num_test_long=200,
  )

  if arg == "runlocal":
    c.task.update(num_test_long=8)
    c.seeds = (0, 1)
    c.steps = 4
    c.data_fraction = 0.25
    c.seqkd.batch_size = 64
    c.runs = {k: c.runs[k] for k in ("seqkd", "onpolicy_fkl_5pct")}
    for run in c.runs.values():
      run.batch_size = 8
    c.eval.update(num_test=16, batch_size=16, diversity_problems=4, num_samples=4, num_test_long=8)
  elif arg:
    raise ValueError(f"configs/sweep.py takes '' or 'runlocal', got {arg!r}")
  return c
