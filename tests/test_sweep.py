"""The sweep's bookkeeping (experiments/sweep.py, sweep_report.py): job order, run claims, the report's numbers.

The sweep's training path is the demo's (tests/test_demo.py runs it); these are the parts only the sweep has."""

import json
import os
import sys

import numpy as np
import pytest

from recipe_configs import load_config

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
      "onpolicy_fkl_5pct",
  }
  assert len(c.seeds) >= 3
  assert [c.runs[a].beta for a, _ in sweep_report.DIVERGENCE_ARMS] == [b for _, b in sweep_report.DIVERGENCE_ARMS]
  assert [c.runs[a].lmbda for a, _ in sweep_report.LAMBDA_ARMS] == [lam for _, lam in sweep_report.LAMBDA_ARMS]
  assert all(c.runs[a].beta == 0.0 for a, _ in sweep_report.LAMBDA_ARMS)  # the λ sweep is forward KL throughout
  assert c.runs.sft.objective == c.runs.seqkd.objective == "sft" and c.runs.seqkd.data == "seqkd"
  assert c.runs.onpolicy_fkl_5pct.data == "fraction" and c.data_fraction == 0.05


def test_jobs_are_seed_major_and_only_checks_names():
  c = load_config("sweep")
  order = sweep.jobs(c)
  assert len(order) == len(c.runs) * len(c.seeds)
  assert [s for _, s in order] == sorted(s for _, s in order)
  assert sweep.jobs(c, ["sft"]) == [("sft", s) for s in c.seeds]
  with pytest.raises(ValueError, match="unknown runs \\['nope'\\]"):
    sweep.jobs(c, ["sft", "nope"])


def test_a_claimed_run_is_not_claimed_twice(tmp_path):
  path = str(tmp_path / "locks" / "sft.seed0")
  with sweep._claim(path) as first:
    assert first
    with sweep._claim(path) as second:  # another open file description: excluded like another process
      assert not second
  with sweep._claim(path) as again:  # released on exit
    assert again


def test_report_table_and_figures(tmp_path):
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
              f"valid_{t}": list(rng.random(n)),
          }
      )
    return m

  results = {"teacher": metrics(1), "initial": metrics(1)}
  results.update({arm: dict(metrics(3), train_seconds=[10.0, 12.0, 14.0]) for arm in c.runs})
  results["sft"]["greedy"] = [0.5, 0.6, 0.7]
  sweep_report.write(c, results, str(tmp_path))
  md = (tmp_path / "sweep.md").read_text()
  assert "| continued SFT | 3 | 60.0 ± 10.0 |" in md  # mean ± sample std, in %
  assert "| teacher | 1 |" in md and md.count("\n| ") == len(results) + 1
  assert json.loads((tmp_path / "results.json").read_text())["sft"]["greedy"] == [0.5, 0.6, 0.7]
  for name in ("fig1_methods", "fig4_quality_diversity", "fig7_lambda", "fig8_divergence", "fig_data_efficiency"):
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
