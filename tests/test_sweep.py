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


def test_config_has_the_planned_arms_and_contrasts():
  c = load_config("sweep")
  grid = {f"{d}_{l}" for d in ("fkl", "jsd", "rkl") for l in ("l0", "l05", "l1")}
  assert set(c.runs) == grid | {"sft", "seqkd", "rkl_l1_5pct"}
  for name in grid:
    div, lam = name.split("_")
    assert c.runs[name].lmbda == {"l0": 0.0, "l05": 0.5, "l1": 1.0}[lam] and c.runs[name].data == "full"
    assert sweep.settings(c, name)["beta"] == {"fkl": 0.0, "jsd": 0.5, "rkl": 1.0}[div]
  assert c.runs.sft.objective == c.runs.seqkd.objective == "sft" and c.runs.seqkd.data == "seqkd"
  five = c.runs.rkl_l1_5pct
  assert (five.lmbda, five.divergence, five.data, c.data_fraction) == (1.0, "rkl", "fraction", 0.05)
  # Test seeds and selection seeds are disjoint; at least 5 test seeds; at least 2 selection seeds.
  assert len(c.seeds) >= 5 and len(c.selection_seeds) >= 2 and not set(c.seeds) & set(c.selection_seeds)
  assert len(c.lr_grid) >= 3 and c.lr_widen >= 1 and c.train.warmup_steps > 0 and c.train.temperature == 1.0
  assert c.task.num_validation == c.eval.num_validation > 0 and 0 < c.task.shuffle_train < 1
  # Every planned contrast names arms of the sweep, a stored metric and a direction; τ=1 is the primary metric.
  assert 5 <= len(c.contrasts) <= 8
  for name, k in c.contrasts.items():
    assert set(k.a) <= set(c.runs) and set(k.b) <= set(c.runs) and k.direction in (1, -1), name
    assert k.metric in ("sample_1.0", "minor_1.0"), name
  assert c.contrasts.P1.a == ("fkl_l1", "jsd_l1", "rkl_l1") and c.contrasts.P1.b == ("fkl_l0", "jsd_l0", "rkl_l0")
  assert 1.0 in c.eval.temperatures


def _validation(workdir, c, arm, scores):
  """Writes selection results: scores[lr] = τ=1 validation accuracy per selection seed."""
  for lr, per_seed in scores.items():
    for seed, acc in zip(c.selection_seeds, per_seed):
      d = sweep.run_dir(workdir, arm, lr, seed)
      os.makedirs(d, exist_ok=True)
      with open(os.path.join(d, "validation.json"), "w") as f:
        json.dump({"sample_1.0": acc, "greedy": acc, "sweep": sweep.sweep_key(c, workdir)}, f)


def test_jobs_grid_on_selection_seeds_then_test_seeds_seed_major(tmp_path):
  c, w = load_config("sweep"), str(tmp_path)
  order = sweep.jobs(c, w)
  grid = [j for j in order if j[0] == "grid"]
  final = [j for j in order if j[0] == "final"]
  assert order == grid + final and len(grid) == len(c.runs) * len(c.lr_grid) * len(c.selection_seeds)
  assert {seed for *_, (lr, seed) in grid} == set(c.selection_seeds)
  assert len(final) == len(c.runs) * len(c.seeds) and [s for *_, s in final] == sorted(s for *_, s in final)
  assert sweep._job_dir(c, w, ("final", "sft", c.seeds[0])) is None  # waits for its rate
  only = sweep.jobs(c, w, ["sft"])
  assert {n for _, n, _ in only} == {"sft"}
  with pytest.raises(ValueError, match="unknown runs \\['nope'\\]"):
    sweep.jobs(c, w, ["sft", "nope"])


def test_learning_rate_is_chosen_on_selection_seeds_and_the_grid_widens_at_edges(tmp_path):
  c, w = load_config("sweep"), str(tmp_path)
  lo, mid, hi = sorted(c.lr_grid)
  assert sweep.lr_grid(c, w, "sft") == ([lo, mid, hi], None)
  _validation(w, c, "sft", {lo: (0.5, 0.5), mid: (0.6, 0.7), hi: (0.8,)})
  assert sweep.chosen_lr(c, w, "sft") is None  # the second selection seed is missing at one rate...
  _validation(w, c, "sft", {lo: (0.5, 0.5), mid: (0.6, 0.7), hi: (0.8, 0.4)})
  assert sweep.lr_grid(c, w, "sft") == ([lo, mid, hi], mid)  # ...the mean over seeds decides: 0.65 > 0.6
  # An edge that wins widens the grid; the arm waits for the new rate, then may widen again (lr_widen times).
  _validation(w, c, "seqkd", {lo: (0.5, 0.5), mid: (0.6, 0.6), hi: (0.7, 0.7)})
  grid, lr = sweep.lr_grid(c, w, "seqkd")
  assert lr is None and grid[:3] == [lo, mid, hi] and grid[3] == pytest.approx(hi * mid / lo)
  assert ("grid", "seqkd", (grid[3], c.selection_seeds[0])) in sweep.jobs(c, w, ["seqkd"])
  _validation(w, c, "seqkd", {grid[3]: (0.8, 0.8)})
  grid, lr = sweep.lr_grid(c, w, "seqkd")
  assert lr is None and len(grid) == 5
  _validation(w, c, "seqkd", {grid[4]: (0.9, 0.9)})
  assert sweep.lr_grid(c, w, "seqkd") == (grid, grid[4])  # widened lr_widen=2 times: the edge stands
  # The low edge widens downwards; a rate inside the grid that wins stands; ties go to the smaller rate.
  _validation(w, c, "fkl_l0", {lo: (0.7, 0.7), mid: (0.6, 0.6), hi: (0.6, 0.6)})
  grid, _ = sweep.lr_grid(c, w, "fkl_l0")
  assert grid[0] == pytest.approx(lo * lo / mid)
  _validation(w, c, "fkl_l0", {grid[0]: (0.65, 0.65)})
  assert sweep.chosen_lr(c, w, "fkl_l0") == lo
  _validation(w, c, "jsd_l0", {lo: (0.6, 0.6), mid: (0.7, 0.7), hi: (0.7, 0.7)})
  assert sweep.chosen_lr(c, w, "jsd_l0") == mid
  assert sweep._job_dir(c, w, ("final", "sft", 3)) == sweep.run_dir(w, "sft", mid, 3)
  # Results of other settings (another config, other base models) are stale: their jobs run again.
  c2 = load_config("sweep")
  c2.steps += 1
  assert sweep.chosen_lr(c2, w, "sft") is None
  c3 = load_config("sweep")
  c3.seeds = (0, 1, 2, 3, 4, 5)  # more test seeds keep the selection
  assert sweep.chosen_lr(c3, w, "sft") == mid


def test_base_models_outside_the_design_stop_the_sweep():
  c = load_config("sweep")
  good = {"teacher": {"greedy": 0.99, "sample_1.0": 0.8}, "initial": {"greedy": 0.95, "sample_1.0": 0.55}}
  sweep.check_base(c, good)
  for name, metric, value, bar in (
      ("teacher", "greedy", 0.92, ">= 0.95"),
      ("initial", "greedy", 0.12, ">= 0.85"),
      ("initial", "sample_1.0", 0.75, "<= 0.6"),
  ):
    bad = {k: dict(v) for k, v in good.items()}
    bad[name][metric] = value
    with pytest.raises(RuntimeError, match=f"{name} validation {metric} = {value:.3f} \\(needs {bar}\\)"):
      sweep.check_base(c, bad)
  sweep.check_base(load_config("sweep", "runlocal"), {})  # runlocal sets no bars


def test_a_claimed_run_is_not_claimed_twice(tmp_path):
  path = str(tmp_path / "locks" / "sft.seed0")
  with sweep._claim(path) as first:
    assert first
    with sweep._claim(path) as second:  # another open file description: excluded like another process
      assert not second
  with sweep._claim(path) as again:  # released on exit
    assert again


def test_paired_t_test_holm_and_verdicts():
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
  # Holm: sorted p (0.01, 0.02, 0.03, 0.5) x (4, 3, 2, 1) = (0.04, 0.06, 0.06, 0.5), kept monotone.
  adjusted = sweep_report.holm({"a": 0.03, "b": 0.01, "c": 0.5, "d": 0.02})
  assert adjusted == pytest.approx({"a": 0.06, "b": 0.04, "c": 0.5, "d": 0.06})
  assert sweep_report.holm({"a": 0.4, "b": 0.3})["a"] == pytest.approx(0.6)  # monotone: max(0.6, 0.4)
  nan = sweep_report.holm({"a": 0.01, "b": float("nan")})
  assert nan["a"] == pytest.approx(0.02) and np.isnan(nan["b"])  # an undefined p still counts in the family
  assert sweep_report.verdict(2.2, 0.004, +1) == "**reproduced**"
  assert "significant, opposite" in sweep_report.verdict(2.2, 0.004, -1)
  assert sweep_report.verdict(2.2, 0.2, +1) == "not reproduced (paper's direction, not significant)"
  assert sweep_report.verdict(-2.2, float("nan"), +1) == "not reproduced (opposite direction)"
  # The 95% interval of a mean, clipped to the metric's range.
  lo, hi = sweep_report.ci95([0.9, 1.0, 1.0])
  assert hi == 1.0 and lo == pytest.approx(
      0.9667 - sps.t.ppf(0.975, 2) * np.std([0.9, 1, 1], ddof=1) / np.sqrt(3), 1e-3
  )


def _fake_results(c, rng):
  temps = tuple(c.eval.temperatures)

  def metrics(n, level=0.6):
    m = {k: list(rng.random(n)) for k in ("greedy_chain", "long", "long_chain")}
    m["greedy"] = list(np.clip(level + 0.3 + 0.02 * rng.standard_normal(n), 0, 1))
    for t in temps:
      m.update({f"{k}_{t}": list(rng.random(n)) for k in ("sample_chain", "valid", "minor")})
      m.update({f"distinct_{t}": list(6 * rng.random(n)), f"unique_{t}": list(8 * rng.random(n))})
      m[f"sample_{t}"] = list(np.clip(level + 0.02 * rng.standard_normal(n), 0, 1))
      m[f"errors_{t}"] = [dict(valid=0.5, format=0.1, operand=0.2, running_sum=0.0, carry=0.1, sum=0.1, answer=0.0)] * n
    m["errors_greedy"] = m[f"errors_{temps[-1]}"]
    m["validation"] = [{"greedy": 0.8, "sample_1.0": 0.5}] * n
    return m

  results = {"teacher": metrics(1, 0.8), "initial": metrics(1, 0.5)}
  for arm in c.runs:
    level = 0.7 if c.runs[arm].lmbda == 1.0 else 0.6
    results[arm] = dict(metrics(5, level), train_seconds=[10.0] * 5, learning_rate=[1e-3] * 5)
    results[arm]["curve"] = [{"50": 0.7, "100": 0.8}] * 5
  results["rkl_l1"]["minor_1.0"] = [0.01, 0.02, 0.01, 0.03, 0.02]
  results["fkl_l1"]["minor_1.0"] = [0.05, 0.06, 0.04, 0.05, 0.07]
  selection = {
      "metric": "sample_1.0",
      "seeds": list(c.selection_seeds),
      "score": {arm: {f"{lr:g}": 0.5 for lr in c.lr_grid} for arm in c.runs},
      "runs": {},
      "learning_rate": {arm: c.lr_grid[1] for arm in c.runs},
  }
  return {"selection": selection, **results}


def test_report_planned_contrasts_tables_and_figures(tmp_path):
  c = load_config("sweep")
  results = _fake_results(c, np.random.default_rng(0))
  sweep_report.write(c, results, str(tmp_path))
  md = (tmp_path / "sweep.md").read_text()
  assert md.index("## Design") < md.index("## Planned contrasts") < md.index("## Exploratory")
  for name in c.contrasts:
    assert f"| {name} |" in md
  # P1: the on-policy arms sit 10 points above the supervised ones on every seed; the row shows the test.
  rows = {r["name"]: r for r in sweep_report.planned(c, {a: m for a, m in results.items() if a in c.runs})}
  p1 = rows["P1"]
  a = np.mean([results[f"{d}_l1"]["sample_1.0"] for d in ("fkl", "jsd", "rkl")], axis=0)
  b = np.mean([results[f"{d}_l0"]["sample_1.0"] for d in ("fkl", "jsd", "rkl")], axis=0)
  assert p1["A"] == pytest.approx(list(a)) and p1["diff"] == pytest.approx(float(np.mean(a - b)))
  assert p1["p"] == pytest.approx(sweep_report.paired(list(a), list(b))[2])
  assert p1["p_holm"] >= p1["p"] and p1["verdict"] == "**reproduced**"
  assert rows["P6"]["verdict"] == "**reproduced**"  # fewer minor modes with reverse KL, as the paper says
  line = next(x for x in md.splitlines() if x.startswith("| P1 |"))
  assert "on-policy, mean of 3 divergences" in line and "supervised KD, mean of 3 divergences" in line
  assert "not testable at this scale" in md and "(not corrected for multiple tests)" in md
  assert "| on-policy (λ=1), reverse KL | 5 | 0.001 |" in md  # readable arm names, seeds, chosen rate
  assert "| continued SFT | 50.0 | 50.0 | 50.0 | 0.001 |" in md  # the selection table
  stored = json.loads((tmp_path / "results.json").read_text())
  assert stored["sft"]["sample_1.0"] == results["sft"]["sample_1.0"] and stored["selection"]["metric"] == "sample_1.0"
  for name in ("arms", "lambda", "diversity", "data_efficiency", "curves", "errors"):
    assert (tmp_path / f"fig_{name}.png").stat().st_size > 10_000, name


def test_runlocal_sweep_end_to_end(tmp_path):
  """configs/sweep.py:runlocal through both stages with two workers: the grid on the selection seeds (it widens
  at an edge), the chosen rates, the test seeds with their curves and error shares, the report."""
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
  assert set(sel["learning_rate"]) == set(c.runs) and sel["seeds"] == list(c.selection_seeds)
  for arm in c.runs:
    m = stored[arm]
    assert len(m["greedy"]) == len(m["sample_1.0"]) == len(m["minor_1.0"]) == len(c.seeds), arm
    grid = sel["score"][arm]
    assert {f"{lr:g}" for lr in c.lr_grid} <= set(grid) and len(grid) <= len(c.lr_grid) + 2 * c.lr_widen
    assert f"{sel['learning_rate'][arm]:g}" in grid and None not in grid.values()
    # The trainer's greedy validation accuracy every eval_every steps, the last at the final step.
    assert all(set(curve) == {str(s) for s in range(c.eval_every, c.steps + 1, c.eval_every)} for curve in m["curve"])
    assert all(sum(e.values()) == pytest.approx(1.0) for e in m["errors_1.0"] + m["errors_greedy"])
  assert "sample_1.0" in stored["initial"] and "validation" in stored["initial"]
  md = open(os.path.join(workdir, "report", "sweep.md")).read()
  assert "## Planned contrasts" in md and "| P3 |" in md and "Holm p" in md


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
