"""The GKD paper's central claims, tested on the offline arithmetic task (experiments/sweep.py reads this file).

The design below was fixed before any final run; the report (experiments/results/sweep/sweep.md) opens with
it and tests exactly these contrasts.

Base models (trained once per workdir, the demo's phases; the sweep stops before any arm when they miss
`base_bars` on validation, see experiments/sweep.py's check_base):
  task         "Add a+b+c" -> chain of additions; 10% of the train chains (SHUFFLE) add the operands in a
               random order, the rest in the prompt's: the teacher has a dominant mode (prompt order), minor
               modes (other orders) and, at τ=1, a tail of slips, where mean- and mode-seeking divergences part.
  teacher      4 layers x 128 (989K params), SFT 3000 steps
  student_sft  3 layers x 96 (308K params), SFT 3000 steps with label smoothing 0.02: a competent student
               that fails by sampling, as the paper's SFT students do

Why this teacher (500 test problems; greedy / τ=1 accuracy / valid chains and minor-mode share among 1024
τ=1 samples): 1500 steps at SHUFFLE 0.05 gave 0.998 / 0.828 / 0.824 in the previous sweep but 0.924 / 0.760
/ 0.713 / 0.0 when retrained (the copy jump again, see below), and no minor modes at all; 3000 steps:
  SHUFFLE 0.05                                         1.000 / 0.856 / 0.863 / 0.000
  SHUFFLE 0.10 (used)                                  1.000 / 0.890 / 0.876 / 0.012
Earlier measurements at 1500 steps: SHUFFLE 1.0 0.974 / 0.872 / 0.246 valid (digits swapped between
operands), 0.5 0.926 / 0.504 / 0.306, 0.3 0.998 / 0.600 / 0.502.

Why this student (500 test problems, greedy / τ=1 accuracy; seeds s = data order, i = init; SHUFFLE 0.05
unless noted):
  3x96, 515 steps, no smoothing (the previous sweep)   0.460 / 0.168 on its first copy "jump": 510 steps gave
                                                       0.196, 530 gave 0.898, and 510 pinned to one core 0.650
  3x96, 650 / 800 / 800 steps (s0 / s0 / s1)           0.986 / 0.756 / 0.892 greedy: copying is learned in a
                                                       sudden jump whose timing is a lottery (0.756: 25% of
                                                       answers copy an operand wrong)
  2x96, 1200 steps (s0 / s1)                           1.000 / 0.822 and 0.484 / 0.194
  2x80 / 3x64, 1200 steps                              0.932 / 0.734 and 0.200 / 0.076
  2x96, 1200 steps, weight decay 0.3 / 1.0 (s0)       0.998 / 0.780 and 0.214 / 0.076
  Once copying is learned, SFT students sample as well as the teacher (τ=1 0.73-0.82): they are not "failing
  by sampling". Label smoothing ε (targets (1-ε)·one-hot + ε·uniform) keeps the converged student's
  distribution wide without touching its argmax:
  3x96, 1500 steps, ε = 0.01 / 0.02 (s0)               1.000 / 0.652 and 1.000 / 0.492
  3x96, 1500 steps, ε = 0.015 (s1:i3, s2:i4)           1.000 / 0.568 and 0.998 / 0.570, but s0:i2 on two
                                                       threads 0.116 / 0.068: stuck before the jump
  3x96, 3000 steps, ε = 0.015, SHUFFLE 0.10 (s0:i2)   1.000 / 0.608 (validation τ=1 0.602: over the bar)
  3x96, 3000 steps, ε = 0.02, SHUFFLE 0.10 (used)      s0:i2 (the sweep's own, two threads) 0.998 / 0.514;
                                                       s1:i3 1.000 / 0.512; s2:i4 1.000 / 0.558 (one core):
                                                       greedy within 0.2 points over 3 seeds

Arms (each `steps` optimizer steps of batch 64 from the initial student; warmup, cosine decay, AdamW; τ=1 for
on-policy samples and the loss):
  sft                  continued SFT on the dataset's chains
  seqkd                SeqKD: SFT on the teacher's τ=1 samples for the train prompts, generated once
  <div>_l<λ>           GKD with divergence div ∈ {fkl (β=0), jsd (JSD(0.5)), rkl (β=1)} and student-data
                       fraction λ ∈ {0 (supervised KD), 0.5 (mixed), 1 (on-policy)}: 9 arms
  rkl_l1_5pct          on-policy reverse KL on 5% of the train prompts. Its control is rkl_l0 (supervised KD,
                       same divergence, all prompts): the paper's data-efficiency comparison. Reverse KL is
                       fixed here, not selected: the paper recommends mode-seeking divergences on-policy.

Metrics (test split, 500 problems): primary τ=1 sampling accuracy (the student's own distribution, where the
arms differ; greedy saturates for every arm that copies the dominant chain); secondary greedy accuracy.
Diversity: the share of minor modes (an operand order other than the prompt's) among the valid chains of
`eval.diversity_problems` x `eval.num_samples` τ=1 samples. It is conditioned on being valid, so an arm is not
scored "diverse" for being wrong: the old measure (distinct completions, right or wrong) tracked the
valid-chain rate at r = -0.96. Every run also stores its greedy validation accuracy every `eval_every` steps
and an error breakdown (format / operand copy / running sum / carry / sum / answer) of its test completions.

Planned contrasts (A - B per test seed; direction = the paper's; two-sided paired t-test over the 5 test
seeds; Holm's correction over the 7; "reproduced" = the paper's sign with corrected p < 0.05). "on-policy",
"mixed" and "supervised" below are the mean over the three divergences of the λ=1, 0.5 and 0 arms, so no
divergence is chosen after the fact:
  P1  on-policy  > supervised KD               τ=1      the paper's headline
  P2  mixed      > supervised KD               τ=1
  P3  on-policy  > SeqKD                       τ=1
  P4  on-policy  > continued SFT               τ=1
  P5  rkl_l1     > fkl_l1                      τ=1      mode-seeking: better sampled quality on-policy
  P6  rkl_l1     < fkl_l1                      minor-mode share   mode-seeking: less diversity
  P7  rkl_l1_5pct > rkl_l0                     τ=1      on-policy on 5% of prompts beats supervised on 100%
Everything else in the report (greedy, single divergences, JSD, curves, error shares) is exploratory.

Learning rates: each arm trains on the selection seeds (never test seeds) at each rate of `lr_grid`, scored by
τ=1 validation accuracy averaged over those seeds (validation split, never test). When the best rate is an
edge of the grid, the grid widens by its ratio on that side (up to `lr_widen` times) and the new rate runs;
the arm's test seeds then train at the chosen rate.

    python experiments/sweep.py --config=configs/sweep.py --workdir=/tmp/gkd_sweep --workers=2 \\
        --results_dir=experiments/results/sweep
    python experiments/sweep.py --config=configs/sweep.py --workdir=/tmp/gkd_sweep --report   # tables + PNGs
    python experiments/sweep.py --config=configs/sweep.py:runlocal --workdir=/tmp/gkd_sweep_tiny  # ~1 min

Args: "" or "runlocal" (tiny models, 4 steps, a few arms x 2 seeds: checks the machinery, not the findings).
"""

import importlib.util
import os

# The base phases are the demo's: one definition of the teacher, the task and the training fields.
_spec = importlib.util.spec_from_file_location("_default_config", os.path.join(os.path.dirname(__file__), "default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)

# Run-name prefix -> β (names avoid dots: they are ConfigDict keys and --config.runs.NAME.x flags).
DIVERGENCES = {"fkl": 0.0, "jsd": 0.5, "rkl": 1.0}
LAMBDAS = {"l0": 0.0, "l05": 0.5, "l1": 1.0}
SHUFFLE = 0.1


def _contrast(a, b, metric, direction, claim):
  """A planned contrast: A and B are tuples of arm names (their per-seed mean), direction the sign of A - B
  the paper reports."""
  return dict(a=a, b=b, metric=metric, direction=direction, claim=claim)


def arms_at(lmbda_key):
  return tuple(f"{div}_{lmbda_key}" for div in DIVERGENCES)


def get_config(arg=None):
  if (arg or "") not in ("", "runlocal"):
    raise ValueError(f"configs/sweep.py takes '' or 'runlocal', got {arg!r}")
  c = _default.get_config("runlocal" if arg == "runlocal" else None)
  c.job = "sweep"
  # Problems with 4 operands test length generalization (train and test have 3); validation picks the lr.
  c.task.update(shuffle_train=SHUFFLE, num_validation=500, num_test_long=200, long_num_operands=(4, 4))
  c.teacher.total_steps = 3000
  # Label smoothing keeps the converged student unsure at τ=1 (see the docstring): competent, failing by sampling.
  c.student_sft.update(total_steps=3000, warmup_steps=25, label_smoothing=0.02)
  # The regime the design needs, checked on validation before any arm runs (experiments/sweep.py stops).
  c.base_bars = dict(teacher_greedy_min=0.95, student_greedy_min=0.85, student_sample_max=0.60)
  c.divergences = dict(DIVERGENCES)
  c.seeds = (0, 1, 2, 3, 4)  # test seeds
  c.selection_seeds = (100, 101)
  c.lr_grid = (3e-4, 1e-3, 3e-3)
  c.lr_widen = 2
  c.steps = 200
  c.eval_every = 50
  c.data_fraction = 0.05
  c.seqkd = dict(temperature=1.0, batch_size=500)
  # Fields every arm shares (the demo's trainer fields); each run adds objective, lmbda, divergence, data.
  c.train = dict(temperature=1.0, batch_size=64, warmup_steps=20, weight_decay=0.01)
  gkd = dict(objective="gkd", lmbda=0.0, divergence="fkl", data="full")
  sft = dict(gkd, objective="sft", divergence="none")
  runs = {"sft": dict(sft), "seqkd": dict(sft, data="seqkd")}
  for lkey, lmbda in LAMBDAS.items():
    for div in DIVERGENCES:
      runs[f"{div}_{lkey}"] = dict(gkd, lmbda=lmbda, divergence=div)
  runs["rkl_l1_5pct"] = dict(gkd, lmbda=1.0, divergence="rkl", data="fraction")
  c.runs = runs
  hot = "sample_1.0"
  c.contrasts = dict(
      P1=_contrast(arms_at("l1"), arms_at("l0"), hot, 1, "on-policy GKD beats supervised KD"),
      P2=_contrast(arms_at("l05"), arms_at("l0"), hot, 1, "mixed GKD beats supervised KD"),
      P3=_contrast(arms_at("l1"), ("seqkd",), hot, 1, "on-policy GKD beats SeqKD"),
      P4=_contrast(arms_at("l1"), ("sft",), hot, 1, "on-policy GKD beats continued SFT"),
      P5=_contrast(("rkl_l1",), ("fkl_l1",), hot, 1, "on-policy, reverse KL samples better than forward KL"),
      P6=_contrast(("rkl_l1",), ("fkl_l1",), "minor_1.0", -1, "on-policy, reverse KL covers fewer modes"),
      P7=_contrast(("rkl_l1_5pct",), ("rkl_l0",), hot, 1, "on-policy on 5% of prompts beats supervised on all"),
  )
  c.eval.update(
      num_test=500,
      num_validation=500,
      batch_size=256,
      max_new_tokens=48,
      temperatures=(0.5, 1.0),
      num_samples=8,
      diversity_problems=128,
      num_test_long=200,
  )

  if arg == "runlocal":
    c.task.update(num_test_long=8, num_validation=8)
    c.seeds = (0, 1)
    c.selection_seeds = (100,)
    c.lr_grid = (1e-3, 3e-3)
    c.lr_widen = 0  # the tiny models tie at 0%: widening is tested in tests/test_sweep.py, not run here
    c.steps = 4
    c.eval_every = 4  # one trainer evaluation per run, at its last step
    c.data_fraction = 0.25
    c.seqkd.batch_size = 64
    c.student_sft.arch = _default._arch(16, 1, 2, 1, 32)
    c.teacher.total_steps = 4
    c.student_sft.update(total_steps=4, warmup_steps=0)
    c.train.update(batch_size=8, warmup_steps=1)
    c.runs = {k: c.runs[k] for k in ("seqkd", "rkl_l1")}  # one GKD arm, one SFT arm on another data source
    c.base_bars = {}  # tiny models learn nothing in 4 steps
    c.contrasts = dict(P3=_contrast(("rkl_l1",), ("seqkd",), hot, 1, "on-policy GKD beats SeqKD"))
    c.eval.update(num_test=16, num_validation=8, batch_size=16, diversity_problems=4, num_samples=4, num_test_long=8)
    c.eval.temperatures = (1.0,)
  # Room for the long problems' prompts (32-token bucket) and 48 new tokens at evaluation.
  for phase in (c.teacher, c.student_sft):
    phase.arch.max_position_embeddings = 128
  return c
