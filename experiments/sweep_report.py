"""The sweep's report: results.json, sweep.md and the figures (experiments/sweep.py writes them).

sweep.md opens with the design fixed in configs/sweep.py (arms, metrics, planned contrasts), then tests the
planned contrasts (paired t-tests over the test seeds, Holm's correction, a verdict each), lists the findings
of the paper this scale cannot test, and then shows what is exploratory: every arm's numbers, comparisons
with uncorrected p-values, the error breakdown, the validation curves and the learning-rate selection.

Figures: a dot per test seed beside each mean; intervals are 95% t-intervals of the mean over seeds, clipped
to [0, 100]; no line joins the means of different arms.
  fig_arms.png             every arm, τ=1 accuracy (primary) and greedy accuracy
  fig_lambda.png           τ=1 and greedy accuracy against λ, per divergence
  fig_diversity.png        τ=1 accuracy against the minor-mode share of valid τ=1 chains
  fig_data_efficiency.png  on-policy reverse KL on 5% of prompts beside its control and the full-data arm
  fig_curves.png           greedy validation accuracy every eval_every steps, one line per seed
  fig_errors.png           the first fault of τ=1 test completions, per arm
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from gkd_jax.tasks import arithmetic

ALPHA = 0.05
PRIMARY = "sample_1.0"
ERROR_KINDS = arithmetic.ERROR_KINDS[1:]  # the faults ("valid" is the first kind)
# Findings of the paper that one task and one teacher-student pair cannot test, with the reason.
NOT_TESTABLE = (
    (
        "GKD's gains hold across student sizes (the paper's T5-small/base/large students)",
        "one student and one teacher here",
    ),
    (
        "On-policy GKD combines with RL fine-tuning (a reward alongside distillation)",
        "no reward model in the sweep",
    ),
    (
        "Task-agnostic distillation (instruction tuning) carries over to held-out tasks",
        "one task; the 4-operand split tests length, not tasks",
    ),
)


# ----------------------------------------------------------------------------------------------- statistics


def stats(values) -> tuple[float, float, int]:
  """Mean, sample standard deviation (0 for one value) and count."""
  v = np.asarray(values, dtype=float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def ci95(values, low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
  """The 95% t-interval of the mean, clipped to [low, high] (the metric's range); one value: (v, v)."""
  from scipy import stats as sps

  mean, std, n = stats(values)
  half = float(sps.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else 0.0
  return max(low, mean - half), min(high, mean + half)


def paired(a, b) -> tuple[float, float, float]:
  """Mean and sample std of the per-seed differences a - b, and the two-sided paired t-test's p-value
  (NaN when it is undefined: fewer than 2 pairs, or every difference equal)."""
  from scipy import stats as sps

  if len(a) != len(b):
    raise ValueError(f"paired values need one per seed on both sides; got {len(a)} and {len(b)}")
  d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
  std = float(d.std(ddof=1)) if len(d) > 1 else 0.0
  spread = std > 1e-9 * max(1.0, abs(float(d.mean())))  # rounding noise is not a spread
  p = float(sps.ttest_rel(a, b).pvalue) if len(d) > 1 and spread else float("nan")
  return float(d.mean()), std, p


def holm(pvalues: dict) -> dict:
  """Holm's step-down adjusted p-values (family-wise error control) for {name: p}. An undefined p (NaN) counts
  as 1 in the family and stays NaN."""
  names = sorted(pvalues, key=lambda k: (pvalues[k] != pvalues[k], pvalues[k]))
  m, running, out = len(names), 0.0, {}
  for i, name in enumerate(names):
    p = pvalues[name]
    running = max(running, min(1.0, (m - i) * (p if p == p else 1.0)))
    out[name] = running if p == p else float("nan")
  return out


def verdict(diff: float, p: float, direction: int, alpha: float = ALPHA) -> str:
  """A planned contrast's verdict under its (corrected) p-value: reproduced needs the paper's sign and
  p < alpha; otherwise not reproduced, saying whether the data point the other way."""
  significant = p == p and p < alpha
  if diff * direction > 0:
    return "**reproduced**" if significant else "not reproduced (paper's direction, not significant)"
  if diff == 0:
    return "not reproduced (no difference)"
  return (
      "not reproduced (**significant, opposite direction**)" if significant else "not reproduced (opposite direction)"
  )


# --------------------------------------------------------------------------------------------------- labels


def divergence_name(beta: float) -> str:
  return "forward KL" if beta == 0 else "reverse KL" if beta == 1 else f"JSD({beta:g})"


def label(config, arm: str) -> str:
  """A readable name for an arm (its settings, not its config key)."""
  if arm in ("teacher", "initial"):
    return {"teacher": "teacher", "initial": "initial student"}[arm]
  run = config.runs[arm]
  if run.objective == "sft":
    return "SeqKD" if run.data == "seqkd" else "continued SFT"
  kind = {0.0: "supervised KD", 1.0: "on-policy"}.get(run.lmbda, "mixed")
  text = f"{kind} (λ={run.lmbda:g}), {divergence_name(config.divergences[run.divergence])}"
  return text + (f", {100 * config.data_fraction:g}% of prompts" if run.data == "fraction" else "")


def side_label(config, arms) -> str:
  """The label of one side of a contrast: an arm, or the mean of several."""
  arms = tuple(arms)
  if len(arms) == 1:
    return label(config, arms[0])
  lams = {config.runs[a].lmbda for a in arms}
  if len(lams) == 1 and all(config.runs[a].objective == "gkd" for a in arms):
    kind = {0.0: "supervised KD", 1.0: "on-policy"}.get(lams.pop(), "mixed")
    return f"{kind}, mean of {len(arms)} divergences"
  return "mean of " + ", ".join(label(config, a) for a in arms)


METRIC_NAMES = {"greedy": "greedy acc.", "sample_1.0": "τ=1 acc.", "minor_1.0": "minor-mode share τ=1"}


# ---------------------------------------------------------------------------------------------------- tests


def side_values(results: dict, arms, metric: str) -> list[float] | None:
  """Per test seed, the mean of `metric` over `arms` (None when an arm lacks it)."""
  if any(a not in results or metric not in results[a] for a in arms):
    return None
  n = min(len(results[a][metric]) for a in arms)
  return [float(np.mean([results[a][metric][i] for a in arms])) for i in range(n)]


def contrast_row(config, results: dict, name: str, a, b, metric: str, direction: int) -> dict | None:
  va, vb = side_values(results, a, metric), side_values(results, b, metric)
  if va is None or vb is None:
    return None
  n = min(len(va), len(vb))
  va, vb = va[:n], vb[:n]
  diff, std, p = paired(va, vb)
  d = np.subtract(va, vb)
  return {
      "name": name,
      "a": side_label(config, a),
      "b": side_label(config, b),
      "metric": metric,
      "direction": direction,
      "A": va,
      "B": vb,
      "diff": diff,
      "std": std,
      "ci": ci95(d, -1.0, 1.0),
      "p": p,
      "seeds": n,
  }


def planned(config, results: dict) -> list[dict]:
  """The planned contrasts with their Holm-adjusted p-values and verdicts."""
  rows = []
  for name, k in config.contrasts.items():
    row = contrast_row(config, results, name, k.a, k.b, k.metric, k.direction)
    if row is not None:
      rows.append(dict(row, claim=k.claim))
  adjusted = holm({r["name"]: r["p"] for r in rows})
  for r in rows:
    r["p_holm"] = adjusted[r["name"]]
    r["verdict"] = verdict(r["diff"], r["p_holm"], r["direction"])
  return rows


def exploratory_pairs(config) -> list[tuple[str, tuple, tuple, str, int]]:
  """(name, A arms, B arms, metric, the paper's sign) of the comparisons reported without correction."""
  out = []
  for name, k in config.contrasts.items():  # the planned contrasts on the secondary metric
    if k.metric == PRIMARY:
      out.append((f"{name}, greedy", tuple(k.a), tuple(k.b), "greedy", k.direction))
  by = {(r.divergence, r.lmbda, r.data): n for n, r in config.runs.items() if r.objective == "gkd"}
  for div in config.divergences:
    supervised, mixed, onpolicy = (by.get((div, lam, "full")) for lam in (0.0, 0.5, 1.0))
    for a, tag in ((onpolicy, "λ=1"), (mixed, "λ=0.5")):
      if a and supervised:
        out.append((f"{tag} vs λ=0, {div}", (a,), (supervised,), PRIMARY, 1))
  for lam in (0.0, 1.0):
    fkl, rkl = by.get(("fkl", lam, "full")), by.get(("rkl", lam, "full"))
    if fkl and rkl and not (lam == 1.0 and "P5" in config.contrasts):
      out.append((f"rkl vs fkl at λ={lam:g}", (rkl,), (fkl,), PRIMARY, 1))
  five, full = by.get(("rkl", 1.0, "fraction")), by.get(("rkl", 1.0, "full"))
  if five and full:
    out.append(("5% vs 100% of prompts, on-policy rkl", (five,), (full,), PRIMARY, -1))
  return out


# --------------------------------------------------------------------------------------------------- tables


def pct(x: float, digits: int = 1) -> str:
  return "–" if x != x else f"{100 * x:.{digits}f}"


def fmt(values, scale: float = 100.0, digits: int = 1) -> str:
  if not values:
    return "–"
  mean, std, n = stats(values)
  if mean != mean:
    return "–"
  return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if n > 1 else "")


def pvalue(p: float) -> str:
  return "–" if p != p else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def signed(x: float, digits: int = 1) -> str:
  return f"{100 * x:+.{digits}f}"


def design_section(config) -> str:
  arms = "\n".join(f"- `{arm}`: {label(config, arm)}" for arm in config.runs)
  contrasts = "\n".join(
      f"| {name} | {k.claim} | {side_label(config, k.a)} | {side_label(config, k.b)} | "
      f"{METRIC_NAMES.get(k.metric, k.metric)} | {'A > B' if k.direction > 0 else 'A < B'} |"
      for name, k in config.contrasts.items()
  )
  grid = ", ".join(f"{lr:g}" for lr in config.lr_grid)
  return (
      "## Design (fixed in configs/sweep.py before the runs)\n\n"
      f"Arms ({len(config.runs)}), each {config.steps} steps of batch {config.train.batch_size} from the initial "
      f"student:\n\n{arms}\n\n"
      f"Primary metric: τ=1 sampling accuracy on {config.eval.num_test} test problems; secondary: greedy accuracy. "
      f"Diversity: the share of minor modes (an operand order other than the prompt's) among valid τ=1 chains "
      f"({config.eval.diversity_problems} problems × {config.eval.num_samples} samples). Test seeds "
      f"{tuple(config.seeds)}; learning rates chosen from {{{grid}}} (widened up to {config.lr_widen}× per edge) "
      f"by validation τ=1 accuracy averaged over selection seeds {tuple(config.selection_seeds)}.\n\n"
      "Planned contrasts (paired two-sided t-test over the test seeds; Holm's correction over all of them; "
      f"reproduced = the paper's direction with corrected p < {ALPHA}):\n\n"
      "| id | the paper's finding | A | B | metric | paper |\n|---|---|---|---|---|---|\n"
      f"{contrasts}\n"
  )


def _test_cells(r: dict) -> str:
  """A contrast row's shared cells: sides, metric, both means, the difference with its interval and p."""
  return (
      f"{r['a']} | {r['b']} | {METRIC_NAMES.get(r['metric'], r['metric'])} | {fmt(r['A'])} | {fmt(r['B'])} | "
      f"{signed(r['diff'])} [{signed(r['ci'][0])}, {signed(r['ci'][1])}] | {pvalue(r['p'])}"
  )


def planned_table(rows: list[dict]) -> str:
  head = "| id | finding | A | B | metric | A | B | A − B [95% CI] | p | Holm p | verdict |"
  lines = [head, "|" + "---|" * 11]
  for r in rows:
    lines.append(f"| {r['name']} | {r['claim']} | {_test_cells(r)} | {pvalue(r['p_holm'])} | {r['verdict']} |")
  return "\n".join(lines)


def exploratory_table(config, results: dict) -> str:
  head = "| comparison | A | B | metric | A | B | A − B [95% CI] | p (uncorrected) | paper's sign |"
  lines = [head, "|" + "---|" * 9]
  for name, a, b, metric, direction in exploratory_pairs(config):
    r = contrast_row(config, results, name, a, b, metric, direction)
    if r is not None:
      lines.append(f"| {name} | {_test_cells(r)} | {'A > B' if direction > 0 else 'A < B'} |")
  return "\n".join(lines)


def arms_table(config, results: dict) -> str:
  temps = tuple(config.eval.temperatures)
  cols = [("greedy", "greedy")] + [(f"sample_{t}", f"τ={t}") for t in temps]
  cols += [("minor_1.0", "minor modes τ=1"), ("valid_1.0", "valid chains τ=1"), ("long", "4 operands, greedy")]
  head = "| arm | seeds | lr | " + " | ".join(c[1] for c in cols) + " | distinct valid chains τ=1 | train s |"
  lines = [head, "|" + "---|" * (len(cols) + 5)]
  for arm, m in results.items():
    lr = f"{m['learning_rate'][0]:g}" if "learning_rate" in m else "–"
    seconds = f"{np.mean(m['train_seconds']):.0f}" if "train_seconds" in m else "–"
    cells = [fmt(m.get(k, [])) for k, _ in cols]
    lines.append(
        f"| {label(config, arm)} | {len(m.get('greedy', []))} | {lr} | "
        + " | ".join(cells)
        + f" | {fmt(m.get('distinct_1.0', []), 1.0, 2)} | {seconds} |"
    )
  return "\n".join(lines)


def error_table(config, results: dict, key: str) -> str:
  head = "| arm | wrong | " + " | ".join(k.replace("_", " ") for k in ERROR_KINDS) + " |"
  lines = [head, "|" + "---|" * (len(ERROR_KINDS) + 2)]
  for arm, m in results.items():
    if key not in m:
      continue
    shares = {k: float(np.mean([e[k] for e in m[key]])) for k in ("valid",) + ERROR_KINDS}
    lines.append(
        f"| {label(config, arm)} | {pct(1 - shares['valid'])} | "
        + " | ".join(pct(shares[k]) for k in ERROR_KINDS)
        + " |"
    )
  return "\n".join(lines)


def curve_steps(results: dict) -> list[int]:
  return sorted({int(s) for m in results.values() for c in m.get("curve", []) for s in c})


def curves_table(config, results: dict) -> str:
  steps = curve_steps(results)
  start = results.get("initial", {}).get("validation", [{}])[0].get("greedy")
  head = "| arm | " + " | ".join(f"step {s}" for s in [0] + steps) + " |"
  lines = [head, "|" + "---|" * (len(steps) + 2)]
  for arm, m in results.items():
    if "curve" not in m:
      continue
    cells = []
    for s in steps:
      v = [c[str(s)] for c in m["curve"] if str(s) in c]
      cells.append(f"{pct(float(np.mean(v)))} ({pct(min(v), 0)}–{pct(max(v), 0)})" if v else "–")
    lines.append(f"| {label(config, arm)} | {pct(start) if start is not None else '–'} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def selection_table(config, selection: dict) -> str:
  rates = sorted({float(lr) for scores in selection.get("score", {}).values() for lr in scores})
  head = "| arm | " + " | ".join(f"lr={lr:g}" for lr in rates) + " | chosen |"
  lines = [head, "|" + "---|" * (len(rates) + 2)]
  for arm, scores in selection.get("score", {}).items():
    cells = []
    for lr in rates:
      s = scores.get(f"{lr:g}")
      cells.append("" if f"{lr:g}" not in scores else "…" if s is None else pct(s))
    chosen = selection.get("learning_rate", {}).get(arm)
    edge = chosen is not None and chosen in (min(map(float, scores)), max(map(float, scores)))
    lines.append(
        f"| {label(config, arm)} | "
        + " | ".join(cells)
        + f" | {'–' if chosen is None else f'{chosen:g}'}"
        + (" (edge)" if edge else "")
        + " |"
    )
  return "\n".join(lines)


def initial_line(results: dict) -> str:
  parts = []
  for name in ("teacher", "initial"):
    m = results.get(name)
    if m:
      parts.append(
          f"{'teacher' if name == 'teacher' else 'initial student'}: greedy {fmt(m['greedy'])}, τ=1 "
          f"{fmt(m[PRIMARY])}, minor modes τ=1 {fmt(m.get('minor_1.0', []))}"
      )
  return "; ".join(parts)


# -------------------------------------------------------------------------------------------------- figures


def _dots(ax, x: float, values, color, scale: float = 100.0, width: float = 0.25, label=None):
  """Per-seed dots (jittered deterministically), the mean as a bar-free marker and its clipped 95% CI."""
  v = np.asarray(values, dtype=float)
  if not len(v) or np.isnan(v).all():
    return
  jitter = np.linspace(-width / 2, width / 2, len(v)) if len(v) > 1 else np.zeros(1)
  ax.scatter(x + jitter, scale * v, s=14, color=color, alpha=0.55, zorder=3, label=label)
  mean = float(np.nanmean(v))
  lo, hi = ci95(v[~np.isnan(v)])
  ax.errorbar(
      x,
      scale * mean,
      yerr=[[scale * (mean - lo)], [scale * (hi - mean)]],
      fmt="_",
      markersize=16,
      color="black",
      capsize=4,
      elinewidth=1.2,
      zorder=4,
  )


def _reference_lines(ax, results: dict, metric: str):
  for name, style in (("teacher", "--"), ("initial", ":")):
    if name in results and metric in results[name]:
      ax.axhline(100 * results[name][metric][0], color="grey", linestyle=style, linewidth=1, label=name)


def figures(config, results: dict, out_dir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  arms = [a for a in config.runs if a in results]
  colors = {div: c for div, c in zip(config.divergences, ("tab:blue", "tab:orange", "tab:red", "tab:green"))}

  def color(arm):
    run = config.runs[arm]
    return "tab:gray" if run.objective == "sft" else colors.get(run.divergence, "tab:purple")

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    written.append(name)

  ci_note = "dots: seeds; black: mean and 95% CI (clipped to [0, 100])"
  order = sorted(arms, key=lambda a: (config.runs[a].objective == "gkd", config.runs[a].lmbda, config.runs[a].data))
  fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=False)
  for ax, metric in zip(axes, (PRIMARY, "greedy")):
    for i, arm in enumerate(order):
      _dots(ax, i, results[arm][metric], color(arm))
    _reference_lines(ax, results, metric)
    ax.set_xticks(range(len(order)), [label(config, a) for a in order], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
    ax.set_title(f"{METRIC_NAMES[metric]}{' (primary)' if metric == PRIMARY else ''}: {ci_note}", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
  save(fig, "fig_arms.png")

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  by = {(r.divergence, r.lmbda): n for n, r in config.runs.items() if r.objective == "gkd" and r.data == "full"}
  for ax, metric in zip(axes, (PRIMARY, "greedy")):
    for j, div in enumerate(config.divergences):
      for lam in sorted({lam for d, lam in by if d == div}):
        arm = by[(div, lam)]
        if arm in results:
          _dots(
              ax,
              lam + 0.06 * (j - 1),
              results[arm][metric],
              colors[div],
              width=0.04,
              label=divergence_name(config.divergences[div]) if lam == 0 else None,
          )
    _reference_lines(ax, results, metric)
    ax.set_xlabel("λ (share of on-policy batches)")
    ax.set_ylabel(f"{METRIC_NAMES[metric]} (%)")
    ax.set_title(f"{METRIC_NAMES[metric]} against λ: {ci_note}", fontsize=8)
    ax.legend(fontsize=7)
  save(fig, "fig_lambda.png")

  fig, ax = plt.subplots(figsize=(7.5, 5))
  markers = {0.0: "o", 0.5: "s", 1.0: "^"}
  for arm in arms:
    m = results[arm]
    if "minor_1.0" not in m:
      continue
    run = config.runs[arm]
    ax.scatter(
        100 * np.asarray(m["minor_1.0"]),
        100 * np.asarray(m[PRIMARY]),
        color=color(arm),
        alpha=0.7,
        s=22,
        marker=markers.get(run.lmbda, "D") if run.objective == "gkd" else "x",
        label=label(config, arm),
    )
  for name, mk in (("teacher", "*"), ("initial", "P")):
    if name in results and "minor_1.0" in results[name]:
      ax.scatter(
          100 * results[name]["minor_1.0"][0],
          100 * results[name][PRIMARY][0],
          color="black",
          marker=mk,
          s=90,
          label=name,
      )
  ax.set_xlabel("minor-mode share of valid τ=1 chains (%): diversity")
  ax.set_ylabel("τ=1 accuracy (%)")
  ax.set_title("Quality and diversity, one point per seed (o λ=0, s λ=0.5, ^ λ=1, x SFT/SeqKD)", fontsize=8)
  ax.legend(fontsize=6, ncol=2)
  save(fig, "fig_diversity.png")

  five = [a for a in arms if config.runs[a].data == "fraction"]
  if five:
    run = config.runs[five[0]]
    same = [
        a
        for a in arms
        if config.runs[a].objective == "gkd"
        and config.runs[a].divergence == run.divergence
        and config.runs[a].data == "full"
        and config.runs[a].lmbda in (0.0, run.lmbda)
    ]
    group = five + sorted(same, key=lambda a: config.runs[a].lmbda)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, arm in enumerate(group):
      _dots(ax, i, results[arm][PRIMARY], color(arm))
    _reference_lines(ax, results, PRIMARY)
    ax.set_xticks(range(len(group)), [label(config, a) for a in group], rotation=15, ha="right", fontsize=7)
    ax.set_ylabel("τ=1 accuracy (%)")
    ax.set_title(f"Data efficiency: {ci_note}", fontsize=8)
    ax.legend(fontsize=7)
    save(fig, "fig_data_efficiency.png")

  with_curves = [a for a in order if "curve" in results[a]]
  if with_curves:
    cols = 4
    rows = math.ceil(len(with_curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), sharex=True, sharey=True, squeeze=False)
    start = results.get("initial", {}).get("validation", [{}])[0].get("greedy")
    for ax, arm in zip(axes.flat, with_curves):
      for c in results[arm]["curve"]:
        steps = ([0] if start is not None else []) + sorted(int(s) for s in c)
        values = ([start] if start is not None else []) + [c[str(s)] for s in sorted(int(s) for s in c)]
        ax.plot(steps, 100 * np.asarray(values), color=color(arm), alpha=0.6, linewidth=1)
      ax.set_title(label(config, arm), fontsize=7)
    for ax in axes.flat[len(with_curves) :]:
      ax.axis("off")
    for ax in axes[:, 0]:
      ax.set_ylabel("val. greedy acc. (%)", fontsize=7)
    for ax in axes[-1]:
      ax.set_xlabel("step", fontsize=7)
    fig.suptitle("Validation accuracy during training, one line per test seed", fontsize=9)
    save(fig, "fig_curves.png")

  with_errors = [a for a in ["teacher", "initial"] + order if a in results and "errors_1.0" in results[a]]
  if with_errors:
    fig, ax = plt.subplots(figsize=(11, 4.5))
    bottom = np.zeros(len(with_errors))
    for kind in ERROR_KINDS:
      share = np.array([100 * np.mean([e[kind] for e in results[a]["errors_1.0"]]) for a in with_errors])
      ax.bar(range(len(with_errors)), share, bottom=bottom, label=kind.replace("_", " "))
      bottom += share
    ax.set_xticks(range(len(with_errors)), [label(config, a) for a in with_errors], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("share of τ=1 test completions (%)")
    ax.set_title("First fault of the wrong τ=1 completions (mean over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, "fig_errors.png")
  return written


# --------------------------------------------------------------------------------------------------- report


def write(config, results: dict, out_dir: str) -> None:
  """results: sweep.collect's dict (arms, 'teacher', 'initial' and 'selection')."""
  os.makedirs(out_dir, exist_ok=True)
  results = dict(results)
  selection = results.pop("selection", {})
  order = ["teacher", "initial"] + [a for a in config.runs]
  results = {arm: results[arm] for arm in order if arm in results}
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump({"selection": selection, **results}, f, indent=1, sort_keys=True)
  arms_only = {a: m for a, m in results.items() if a in config.runs}
  rows = planned(config, arms_only)
  not_testable = "\n".join(f"| {finding} | not testable at this scale: {why} |" for finding, why in NOT_TESTABLE)
  text = (
      f"# The sweep's report\n\n{design_section(config)}\n"
      f"## Planned contrasts\n\n{initial_line(results)}.\n\n{planned_table(rows)}\n\n"
      "A − B: mean over test seeds with its 95% t-interval, in points. Findings this sweep cannot test:\n\n"
      f"| finding | verdict |\n|---|---|\n{not_testable}\n\n"
      "## Exploratory (not corrected for multiple tests)\n\n"
      f"### Every arm (mean ± std over test seeds, %)\n\n{arms_table(config, results)}\n\n"
      f"### Comparisons\n\n{exploratory_table(config, arms_only)}\n\n"
      f"### Errors: first fault of the test completions (% of all completions, mean over seeds)\n\n"
      f"τ = 1:\n\n{error_table(config, results, 'errors_1.0')}\n\n"
      f"Greedy:\n\n{error_table(config, results, 'errors_greedy')}\n\n"
      f"### Validation accuracy during training (greedy, %, mean over test seeds (min–max))\n\n"
      f"{curves_table(config, results)}\n\n"
      f"## Learning rates (validation τ=1 accuracy, mean over selection seeds {tuple(config.selection_seeds)})\n\n"
      f"{selection_table(config, selection)}\n"
  )
  with open(os.path.join(out_dir, "sweep.md"), "w") as f:
    f.write(text)
  names = figures(config, results, out_dir) if arms_only else []
  print(text, flush=True)
  print(f"report: {out_dir}/sweep.md, results.json, " + ", ".join(names), flush=True)
