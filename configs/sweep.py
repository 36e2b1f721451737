"""The GKD paper's comparisons on the offline arithmetic task (experiments/sweep.py reads this file).

Base models (trained once per workdir, the demo's phases):
  task         "Add a+b+c" -> chain of additions; a fraction SHUFFLE of the train chains add the operands
               in a random order, the rest in the prompt's. The teacher learns a dominant mode (prompt
               order) that it copies exactly, minor modes (other orders) and at τ=1 a tail of one-digit
               slips: a distribution with modes of different quality, the setting where mean- and
               mode-seeking divergences part.
  teacher      4 layers x 128 (989K params), SFT 1500 steps
  student_sft  3 layers x 96 (308K params), SFT 515 steps: stopped midway through learning to copy operands

Why these (500 problems each, 2-core CPU; teacher greedy / τ=1 accuracy / τ=1 valid chains):
  SHUFFLE 1.0 (every chain in random order)   0.974 / 0.872 / 0.246  units digits swapped between operands
  SHUFFLE 0.5, 1200 steps                      0.926 / 0.504 / 0.306
  SHUFFLE 0.3, 1200 steps                      0.998 / 0.600 / 0.502
  SHUFFLE 0.1, 1500 steps                      0.998 / 0.682 / 0.672  failures: one-digit copy slips
  SHUFFLE 0.05, 1500 steps (used)              0.998 / 0.828 / 0.824
  Longer training or a 3.9x wider teacher did not fix SHUFFLE 1.0 (0.256 / 0.282 valid chains at τ=1).
  Student SFT steps (3 x 96; test greedy accuracy of the sweep's own student_sft phase): 510: 0.196,
  515: 0.460 (used), 530: 0.898, 540: 0.838, 550: 0.676; 2 x 64 (76K) after 1000 steps: 0.092. Copying is
  learned in a sudden jump, and where it falls depends on float rounding (the same 510 steps gave 0.650
  pinned to one core): the step count is chosen for this pipeline on a 2-core host; results.json records
  the initial student's accuracy that every arm starts from.

Arms, each trained `steps` optimizer steps from that student (warmup, cosine decay, τ=1 sampling):
  sft                 continued SFT on the dataset's chains
  seqkd               SeqKD: SFT on the teacher's samples (τ=1) for the train prompts, generated once
  supkd               supervised KD: λ=0, forward KL on the dataset's chains
  onpolicy_<div>      on-policy GKD, λ=1, div ∈ fkl (β=0), jsd01, jsd05, jsd09 (β=0.1, 0.5, 0.9), rkl (β=1)
  lambda_<100λ>       λ ∈ {0.25, 0.5, 0.75}, forward KL (λ=0 is supkd, λ=1 is onpolicy_fkl)
  best_lambda_<100λ>  λ ∈ {0, 0.25, 0.5, 0.75} with the best on-policy divergence (λ=1 is onpolicy_<best>)
  onpolicy_best_5pct  on-policy GKD with the best divergence on 5% of the train prompts

Steps and rates: 400 steps, lr ∈ {3e-4, 1e-3, 3e-3}. At 200 steps with {3e-4, 1e-3} every arm kept the top
rate and the supervised arms stood at 72-80% greedy, still climbing (experiments/results/sweep/
steps200_results.json); at 400 they reach 99.5%, and 12 of 16 arms keep 1e-3, the grid's middle (on-policy
FKL, λ=0.5 and 0.75 FKL and the 5%-prompt arm keep 3e-3).

"best" is the on-policy divergence with the highest validation accuracy (seed `grid_seed`, each at its best
learning rate); an arm that resolves to the same settings as another (best = fkl) reuses its runs.
Learning rates: every arm trains on seed `grid_seed` at each rate of `lr_grid`, and keeps the rate with the
highest greedy accuracy on the validation split (never the test split); its other seeds train at that rate.
Evaluation on the test split: greedy accuracy and chain accuracy; sampling accuracy at τ ∈ eval.temperatures;
diversity = distinct completions (right or wrong: what Self-BLEU measures) and distinct valid chains (operand
orders) among eval.num_samples samples per problem; greedy accuracy on 4-operand problems (longer than any
trained on). The report tests each of the paper's claims with a paired t-test over the seeds.

    python experiments/sweep.py --config=configs/sweep.py --workdir=/tmp/gkd_sweep --workers=2 \
        --results_dir=experiments/results/sweep
    python experiments/sweep.py --config=configs/sweep.py --workdir=/tmp/gkd_sweep --report   # table + PNGs
    python experiments/sweep.py --config=configs/sweep.py:runlocal --workdir=/tmp/gkd_sweep_tiny  # ~1 min

Args: "" or "runlocal" (tiny models, 4 steps, a few arms x 2 seeds: checks the machinery, not the findings).
"""

import importlib.util
import os

import ml_collections

# The base phases are the demo's: one definition of the teacher, the task and the training fields.
_spec = importlib.util.spec_from_file_location("_default_config", os.path.join(os.path.dirname(__file__), "default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)

# Run-name suffix -> β (names avoid dots: they are ConfigDict keys and --config.runs.NAME.x flags).
DIVERGENCES = {"fkl": 0.0, "jsd01": 0.1, "jsd05": 0.5, "jsd09": 0.9, "rkl": 1.0}
SHUFFLE = 0.05


def get_config(arg=None):
  if (arg or "") not in ("", "runlocal"):
    raise ValueError(f"configs/sweep.py takes '' or 'runlocal', got {arg!r}")
  c = _default.get_config("runlocal" if arg == "runlocal" else None)
  c.job = "sweep"
  # Problems with 4 operands test length generalization (train and test have 3); validation picks the lr.
  c.task.update(shuffle_train=SHUFFLE, num_validation=500, num_test_long=200, long_num_operands=(4, 4))
  c.teacher.total_steps = 1500
  c.student_sft.update(total_steps=515, warmup_steps=25)
  c.divergences = dict(DIVERGENCES)
  c.seeds = (0, 1, 2, 3, 4)
  c.grid_seed = 0
  c.lr_grid = (3e-4, 1e-3, 3e-3)
  c.steps = 400
  c.data_fraction = 0.05
  c.seqkd = dict(temperature=1.0, batch_size=500)
  # Fields every arm shares (the demo's trainer fields); each run adds objective, lmbda, divergence, data.
  c.train = dict(temperature=1.0, batch_size=64, warmup_steps=20, weight_decay=0.01)
  gkd = dict(objective="gkd", lmbda=0.0, divergence="fkl", data="full")
  sft = dict(gkd, objective="sft", divergence="none")
  runs = {"sft": dict(sft), "seqkd": dict(sft, data="seqkd"), "supkd": dict(gkd)}
  for name in DIVERGENCES:
    runs[f"onpolicy_{name}"] = dict(gkd, lmbda=1.0, divergence=name)
  for lmbda in (0.25, 0.5, 0.75):
    runs[f"lambda_{round(100 * lmbda):03d}"] = dict(gkd, lmbda=lmbda)
  for lmbda in (0.0, 0.25, 0.5, 0.75):
    runs[f"best_lambda_{round(100 * lmbda):03d}"] = dict(gkd, lmbda=lmbda, divergence="best")
  runs["onpolicy_best_5pct"] = dict(gkd, lmbda=1.0, divergence="best", data="fraction")
  c.runs = runs
  c.eval.update(
      num_test=500,
      num_validation=500,
      batch_size=256,
      max_new_tokens=48,
      temperatures=(0.1, 0.5, 1.0),
      num_samples=8,
      diversity_problems=64,
      num_test_long=200,
  )

  if arg == "runlocal":
    c.task.update(num_test_long=8, num_validation=8)
    c.seeds = (0, 1)
    c.lr_grid = (1e-3, 3e-3)
    c.steps = 4
    c.data_fraction = 0.25
    c.seqkd.batch_size = 64
    c.student_sft.arch = _default._arch(16, 1, 2, 1, 32)
    c.teacher.total_steps = 4
    c.student_sft.update(total_steps=4, warmup_steps=0)
    c.train.update(batch_size=8, warmup_steps=1)
    c.runs = {k: c.runs[k] for k in ("seqkd", "onpolicy_fkl", "onpolicy_rkl", "best_lambda_050")}
    c.eval.update(num_test=16, num_validation=8, batch_size=16, diversity_problems=4, num_samples=4, num_test_long=8)
  # Room for the long problems' prompts (32-token bucket) and 48 new tokens at evaluation.
  for phase in (c.teacher, c.student_sft):
    phase.arch.max_position_embeddings = 128
  return c
