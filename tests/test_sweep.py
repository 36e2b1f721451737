"""The sweep's bookkeeping (experiments/sweep.py, sweep_report.py): job order, run claims, the report's numbers.

The sweep's training path is the demo's (tests/test_demo.py runs it); these are the parts only the sweep has."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from recipe_configs import ROOT, load_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import sweep  # noqa: E402
import sweep_report  # noqa: E402


def test_config_has_every_arm_of_the_issue():
  c = load_config("sweep")
  assert set(c.runs) == {
      "sft",
      "seqkd",
      "supkd",
      "onpolicy_fkl",
      "onpolicy_jsd01",
      "onpolicy_jsd05",
      "onpolicy_jsd09",
      "onpolicy_rkl",
      "lambda_025",
      "lambda_050",
      "lambda_075",
      "best_lambda_000",
      "best_lambda_025",
      "best_lambda_050",
      "best_lambda_075",
      "onpolicy_best_5pct",
  }
  assert len(c.seeds) == 5 and len(c.lr_grid) >= 2 and c.train.warmup_steps > 0 and c.train.temperature == 1.0
  beta = lambda arm: c.divergences[c.runs[arm].divergence]
  assert [beta(a) for a, _ in sweep_report.DIVERGENCE_ARMS] == [b for _, b in sweep_report.DIVERGENCE_ARMS]
  assert all(c.runs[a].lmbda == lam for a, lam in sweep_report.LAMBDA_ARMS + sweep_report.BEST_LAMBDA_ARMS)
  assert all(c.runs[a].divergence == "fkl" for a, _ in sweep_report.LAMBDA_ARMS)  # the FKL λ sweep
  assert all(c.runs[a].divergence == "best" for a, _ in sweep_report.BEST_LAMBDA_ARMS)
  assert c.runs.sft.objective == c.runs.seqkd.objective == "sft" and c.runs.seqkd.data == "seqkd"
  assert c.runs.onpolicy_best_5pct.data == "fraction" and c.data_fraction == 0.05
  assert c.task.num_validation == c.eval.num_validation > 0 and 0 < c.task.shuffle_train < 1


def _validation(tmp_path, c, scores):
  """Writes grid results: scores[arm] = (accuracy at lr_grid[0], at lr_grid[1])."""
  for arm, accs in scores.items():
    for lr, acc in zip(c.lr_grid, accs):
      d = sweep.run_dir(str(tmp_path), arm, lr, c.grid_seed)
      os.makedirs(d, exist_ok=True)
      with open(os.path.join(d, "validation.json"), "w") as f:
        json.dump({"greedy": acc, "sweep": sweep.sweep_key(c, str(tmp_path))}, f)


def test_jobs_grid_first_then_best_arms_then_seed_major():
  c = load_config("sweep")
  order = sweep.jobs(c)
  grid = [j for j in order if j[0] == "grid"]
  final = [j for j in order if j[0] == "final"]
  assert order == grid + final and len(grid) == len(c.runs) * len(c.lr_grid)
  assert len(final) == len(c.runs) * len(c.seeds) and [s for *_, s in final] == sorted(s for *_, s in final)
  needs_best = [c.runs[n].divergence == "best" for _, n, _ in grid]
  assert needs_best == sorted(needs_best)  # the arms that wait for "best" come last
  only = sweep.jobs(c, ["best_lambda_050"])  # brings the on-policy arms' grid: they decide "best"
  assert {n for k, n, _ in only if k == "grid"} == {"best_lambda_050"} | set(sweep.onpolicy_arms(c))
  assert {n for k, n, _ in only if k == "final"} == {"best_lambda_050"}
  with pytest.raises(ValueError, match="unknown runs \\['nope'\\]"):
    sweep.jobs(c, ["sft", "nope"])


def test_best_divergence_learning_rate_and_shared_runs(tmp_path):
  c = load_config("sweep")
  c.lr_grid = (3e-4, 1e-3)  # two rates: the scores below are (lower, higher)
  w = str(tmp_path)
  assert sweep.best_divergence(c, w) is None and sweep.chosen_lr(c, w, "best_lambda_050") is None
  assert sweep._job_dir(c, w, ("grid", "best_lambda_050", c.lr_grid[0])) is None  # waits for "best"
  _validation(tmp_path, c, {"onpolicy_fkl": (0.5, 0.6), "onpolicy_jsd01": (0.4, 0.4), "onpolicy_jsd05": (0.1, 0.2)})
  _validation(tmp_path, c, {"onpolicy_jsd09": (0.7, 0.2)})
  assert sweep.best_divergence(c, w) is None  # rkl's grid is missing
  _validation(tmp_path, c, {"onpolicy_rkl": (0.65, 0.7)})
  assert sweep.best_divergence(c, w) == "jsd09"  # a tie (0.7) goes to the smaller β
  _validation(tmp_path, c, {"onpolicy_rkl": (0.65, 0.75)})
  assert sweep.best_divergence(c, w) == "rkl"
  assert (
      sweep.chosen_lr(c, w, "onpolicy_rkl") == c.lr_grid[1] and sweep.chosen_lr(c, w, "onpolicy_jsd09") == c.lr_grid[0]
  )
  assert sweep.chosen_lr(c, w, "onpolicy_jsd01") == min(c.lr_grid)  # ties go to the smaller rate
  assert sweep.settings(c, "onpolicy_best_5pct", "rkl")["beta"] == 1.0
  assert sweep.canonical(c, "best_lambda_050", "rkl") == "best_lambda_050"
  # When forward KL wins, the best-divergence arms are the forward-KL arms: same runs, no retraining.
  assert sweep.canonical(c, "best_lambda_050", "fkl") == "lambda_050"
  assert sweep.canonical(c, "best_lambda_000", "fkl") == "supkd"
  assert sweep.canonical(c, "onpolicy_best_5pct", "fkl") == "onpolicy_best_5pct"  # its data differ
  # Results of other settings (another config, other base models) are stale: their jobs run again.
  c2 = load_config("sweep")
  c2.steps += 1
  assert sweep.best_divergence(c2, w) is None and sweep.chosen_lr(c2, w, "onpolicy_rkl") is None
  c3 = load_config("sweep")
  c3.seeds, c3.lr_grid = (0, 1, 2, 3, 4, 5), tuple(c.lr_grid)  # more seeds keep the grid
  assert sweep.best_divergence(c3, w) == "rkl"


def test_a_claimed_run_is_not_claimed_twice(tmp_path):
  path = str(tmp_path / "locks" / "sft.seed0")
  with sweep._claim(path) as first:
    assert first
    with sweep._claim(path) as second:  # another open file description: excluded like another process
      assert not second
  with sweep._claim(path) as again:  # released on exit
    assert again


def test_paired_t_test_and_verdicts():
  a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 1.0, 1.0, 2.0]
  diff, std, p = sweep_report.paired(a, b)
  d = np.subtract(a, b)
  t = d.mean() / (d.std(ddof=1) / np.sqrt(5))  # 5.88 on 4 degrees of freedom
  from scipy import stats as sps

  assert diff == pytest.approx(2.2) and std == pytest.approx(d.std(ddof=1))
  assert p == pytest.approx(2 * sps.t.sf(t, 4)) and 0.004 < p < 0.005
  assert np.isnan(sweep_report.paired([0.8, 0.9], [0.5, 0.6])[2])  # equal differences (up to rounding): no test
  with pytest.raises(ValueError, match="one per seed"):
    sweep_report.paired([1.0], [1.0, 2.0])
  assert sweep_report.verdict(2.2, 0.004, +1) == "**agrees**"
  assert sweep_report.verdict(2.2, 0.004, -1) == "**disagrees**"
  assert sweep_report.verdict(2.2, 0.2, +1) == "same direction, not significant"
  assert sweep_report.verdict(-2.2, float("nan"), +1) == "opposite direction, not significant"


def test_report_table_claims_and_figures(tmp_path):
  c = load_config("sweep")
  temps = tuple(c.eval.temperatures)
  rng = np.random.default_rng(0)

  def metrics(n):
    m = {k: list(rng.random(n)) for k in ("greedy", "greedy_chain", "long", "long_chain")}
    for t in temps:
      m.update(
          {
              f"sample_{t}": list(rng.random(n)),
              f"sample_chain_{t}": list(rng.random(n)),
              f"distinct_{t}": list(6 * rng.random(n)),
              f"unique_{t}": list(8 * rng.random(n)),
              f"valid_{t}": list(rng.random(n)),
          }
      )
    return m

  results = {"teacher": metrics(1), "initial": metrics(1)}
  results.update({arm: dict(metrics(5), train_seconds=[10.0] * 5) for arm in c.runs})
  results["sft"]["greedy"] = [0.5, 0.6, 0.7, 0.6, 0.6]
  results["onpolicy_rkl"]["greedy"] = [0.8, 0.9, 0.85, 0.8, 0.9]
  results["best_lambda_050"]["greedy"] = [0.5, 0.6, 0.55, 0.55, 0.6]
  selection = {
      "best_divergence": "rkl",
      "validation": {arm: {f"{lr:g}": 0.5 for lr in c.lr_grid} for arm in c.runs},
      "learning_rate": {arm: c.lr_grid[0] for arm in c.runs},
      "same_runs_as": {},
  }
  sweep_report.write(c, {"selection": selection, **results}, str(tmp_path))
  md = (tmp_path / "sweep.md").read_text()
  assert "| continued SFT | 5 | 60.0 ± 7.1 |" in md  # mean ± sample std, in %
  assert "| teacher | 1 |" in md
  # On-policy RKL beats the mixed arm by 25-30 points on every seed: the claim row says so with its test.
  row = next(line for line in md.splitlines() if line.startswith("| on-policy > mixed") and "| greedy |" in line)
  p = sweep_report.paired(results["onpolicy_rkl"]["greedy"], results["best_lambda_050"]["greedy"])[2]
  assert f"| on-policy RKL | λ=0.5, best div. | greedy | 85.0 ± 5.0 | 56.0 ± 4.2 | +29.0 ± 2.2 | {p:.3f} |" in row
  assert row.endswith("| **agrees** |") and p < 1e-4
  assert "Best on-policy divergence on validation: rkl" in md and "| continued SFT | 50.0 | 50.0 |" in md
  stored = json.loads((tmp_path / "results.json").read_text())
  assert stored["sft"]["greedy"] == results["sft"]["greedy"] and stored["selection"]["best_divergence"] == "rkl"
  for name in ("fig1_methods", "fig4_quality_diversity", "fig7_lambda", "fig8_divergence", "fig_data_efficiency"):
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_claims_are_tested_greedy_and_sampled():
  """Greedy accuracy saturates once the task is learned: the λ and 5%-prompt claims also run at the top τ."""
  rows = sweep_report.claim_rows("jsd01", (0.1, 1.0))
  metrics = lambda claim: {m for c, *_, m, _ in rows if c == claim}
  for claim in ("on-policy on 5% of prompts > supervised KD on 100%", "on-policy (λ=1) > supervised (λ=0), forward KL"):
    assert metrics(claim) == {"greedy", "sample_1.0"}, claim
  assert ("larger β at λ=0: lower diversity", "best_lambda_000", "supkd", "unique_1.0", -1) in rows
  # With forward KL best, λ=0 at the best divergence is supervised KD itself: no self-comparison.
  assert not [r for r in sweep_report.claim_rows("fkl", (1.0,)) if r[0].startswith("larger β")]


def test_runlocal_sweep_end_to_end(tmp_path):
  """configs/sweep.py:runlocal through both stages with two workers: grid, "best", chosen rates, report."""
  workdir = str(tmp_path / "sweep")
  out = subprocess.run(
      [
          sys.executable,
          "experiments/sweep.py",
          "--config=configs/sweep.py:runlocal",
          f"--workdir={workdir}",
          "--workers=2",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  c = load_config("sweep", "runlocal")
  stored = json.loads(open(os.path.join(workdir, "report", "results.json")).read())
  sel = stored["selection"]
  assert sel["best_divergence"] in ("fkl", "rkl") and set(sel["learning_rate"]) == set(c.runs)
  for arm in c.runs:
    assert len(stored[arm]["greedy"]) == len(c.seeds), arm
    assert set(sel["validation"][arm]) == {f"{lr:g}" for lr in c.lr_grid}
  md = open(os.path.join(workdir, "report", "sweep.md")).read()
  assert "## The paper's claims" in md and "| on-policy > mixed |" in md


def test_workers_are_pinned_to_their_share_of_the_cpus():
  script = (
      "import os, sys; sys.path.insert(0, 'experiments'); import sweep; "
      "cores = sorted(os.sched_getaffinity(0)); sweep._pin(int(sys.argv[1]), int(sys.argv[2])); "
      "print(len(cores), sorted(os.sched_getaffinity(0)))"
  )
  run = lambda index, count: subprocess.run(
      [sys.executable, "-c", script, str(index), str(count)], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.split(" ", 1)
  n, alone = run(0, 1)
  assert len(json.loads(alone)) == int(n)  # one worker: untouched
  if int(n) >= 2:
    first, second = (json.loads(run(i, 2)[1]) for i in (0, 1))
    assert first and second and not set(first) & set(second) and len(first) == len(second) == int(n) // 2
