"""The sweep's report: results.json, sweep.md (mean ± std over seeds) and the figures (experiments/sweep.py).

Figures, each the toy counterpart of a figure of the GKD paper (arXiv 2306.13649):
  fig1_methods.png          on-policy GKD against the baselines (continued SFT, SeqKD, supervised KD)
  fig4_quality_diversity.png  accuracy against diversity (distinct completions) across sampling temperatures,
                            one curve per divergence: mode-seeking divergences trade diversity for quality
  fig7_lambda.png           accuracy against the student data fraction λ (forward KL)
  fig8_divergence.png       on-policy GKD (λ=1) per divergence, greedy and at each sampling temperature
  fig_data_efficiency.png   on-policy GKD on 5% of the prompts against supervised KD on all of them
"""

from __future__ import annotations

import json
import os

import numpy as np

LABELS = {
    "teacher": "teacher",
    "initial": "initial student",
    "sft": "continued SFT",
    "seqkd": "SeqKD",
    "supkd": "supervised KD (λ=0, FKL)",
    "onpolicy_fkl": "on-policy FKL",
    "onpolicy_jsd01": "on-policy JSD(0.1)",
    "onpolicy_jsd05": "on-policy JSD(0.5)",
    "onpolicy_jsd09": "on-policy JSD(0.9)",
    "onpolicy_rkl": "on-policy RKL",
    "lambda_025": "λ=0.25, FKL",
    "lambda_050": "λ=0.5, FKL",
    "lambda_075": "λ=0.75, FKL",
    "best_lambda_000": "λ=0, best div.",
    "best_lambda_025": "λ=0.25, best div.",
    "best_lambda_050": "λ=0.5, best div.",
    "best_lambda_075": "λ=0.75, best div.",
    "onpolicy_best_5pct": "on-policy best div., 5% prompts",
}
DIVERGENCE_ARMS = (
    ("onpolicy_fkl", 0.0),
    ("onpolicy_jsd01", 0.1),
    ("onpolicy_jsd05", 0.5),
    ("onpolicy_jsd09", 0.9),
    ("onpolicy_rkl", 1.0),
)
LAMBDA_ARMS = (("supkd", 0.0), ("lambda_025", 0.25), ("lambda_050", 0.5), ("lambda_075", 0.75), ("onpolicy_fkl", 1.0))
BEST_LAMBDA_ARMS = (
    ("best_lambda_000", 0.0),
    ("best_lambda_025", 0.25),
    ("best_lambda_050", 0.5),
    ("best_lambda_075", 0.75),
)


def best_lambda_arms(best: str | None) -> tuple:
  """The λ sweep of the best divergence, λ=1 being that divergence's on-policy arm."""
  return BEST_LAMBDA_ARMS + ((f"onpolicy_{best}", 1.0),) if best else ()


def stats(values) -> tuple[float, float, int]:
  """Mean, sample standard deviation (0 for one value) and count."""
  v = np.asarray(values, dtype=float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def fmt(values, scale: float = 100.0, digits: int = 1) -> str:
  if not values:
    return "–"
  mean, std, n = stats(values)
  return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if n > 1 else "")


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


def verdict(diff: float, p: float, direction: int, alpha: float = 0.05) -> str:
  """Whether a claim that A - B has sign `direction` holds: agrees (right sign, p < alpha), disagrees
  (wrong sign, p < alpha), or the sign it leans to when the test does not separate the arms."""
  significant = p == p and p < alpha
  if diff * direction > 0:
    return "**agrees**" if significant else "same direction, not significant"
  if diff == 0:
    return "no difference"
  return "**disagrees**" if significant else "opposite direction, not significant"


def claim_rows(best: str | None, temperatures) -> list[tuple[str, str, str, str, int]]:
  """(claim, arm A, arm B, metric, sign of A - B the paper reports) for every comparison of the report."""
  hot, unique, distinct = (f"{m}_{temperatures[-1]}" for m in ("sample", "unique", "distinct"))
  # Greedy accuracy can saturate (every arm that learns the task copies the dominant chain): τ=1 still separates.
  both = ("greedy", hot)
  on = f"onpolicy_{best}" if best else None
  pairs = []  # (claim, A, B, metrics, sign)
  if best:
    pairs += [
        ("on-policy > mixed", on, "best_lambda_050", both, 1),
        ("mixed > supervised KD", "best_lambda_050", "supkd", both, 1),
        ("supervised KD > SeqKD", "supkd", "seqkd", both, 1),
        ("on-policy (λ=1) > supervised (λ=0), best divergence", on, "best_lambda_000", both, 1),
    ]
  pairs.append(("on-policy (λ=1) > supervised (λ=0), forward KL", "onpolicy_fkl", "supkd", both, 1))
  for mode_seeking in ("onpolicy_rkl", "onpolicy_jsd09"):
    pairs += [
        ("mode-seeking: better sampled quality", mode_seeking, "onpolicy_fkl", (hot,), 1),
        ("mode-seeking: lower diversity", mode_seeking, "onpolicy_fkl", (unique,), -1),
        ("mode-seeking: fewer valid modes", mode_seeking, "onpolicy_fkl", (distinct,), -1),
    ]
  if best and best != "fkl":
    # The divergence comparison again on the dataset's chains (λ=0): the two arms differ only in β.
    pairs += [
        ("larger β at λ=0: better sampled quality", "best_lambda_000", "supkd", (hot,), 1),
        ("larger β at λ=0: lower diversity", "best_lambda_000", "supkd", (unique,), -1),
    ]
  if best:
    pairs.append(("on-policy on 5% of prompts > supervised KD on 100%", "onpolicy_best_5pct", "supkd", both, 1))
  return [(claim, a, b, metric, sign) for claim, a, b, metrics, sign in pairs for metric in metrics]


def claims(results: dict, best: str | None, temperatures) -> str:
  """The paper's claims as a markdown table: both arms' mean ± std, the paired difference and test, verdict."""
  head = "| claim | A | B | metric | A | B | A − B | paired t-test p | verdict |"
  lines = [head, "|" + "---|" * 9]
  for claim, a, b, metric, direction in claim_rows(best, temperatures):
    if a not in results or b not in results or metric not in results[a] or metric not in results[b]:
      continue
    va, vb = results[a][metric], results[b][metric]
    scale, digits = (1.0, 2) if metric.startswith(("distinct", "unique")) else (100.0, 1)
    n = min(len(va), len(vb))
    diff, std, p = paired(va[:n], vb[:n])
    lines.append(
        f"| {claim} | {LABELS.get(a, a)} | {LABELS.get(b, b)} | {metric} | {fmt(va, scale, digits)} | "
        f"{fmt(vb, scale, digits)} | {scale * diff:+.{digits}f} ± {scale * std:.{digits}f} | "
        + (f"{p:.3f}" if p == p else "–")
        + f" | {verdict(diff, p, direction)} |"
    )
  return "\n".join(lines)


def selection_table(selection: dict, lr_grid) -> str:
  """Validation greedy accuracy (seed grid_seed) per arm and rate, and the rate each arm kept."""
  head = "| arm | " + " | ".join(f"val. acc lr={lr:g}" for lr in lr_grid) + " | chosen lr |"
  lines = [head, "|" + "---|" * (len(lr_grid) + 2)]
  for arm, scores in selection.get("validation", {}).items():
    cells = [("–" if scores.get(f"{lr:g}") is None else f"{100 * scores[f'{lr:g}']:.1f}") for lr in lr_grid]
    chosen = selection.get("learning_rate", {}).get(arm)
    same = selection.get("same_runs_as", {}).get(arm)
    label = LABELS.get(arm, arm) + (f" (= {LABELS.get(same, same)})" if same else "")
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {'–' if chosen is None else f'{chosen:g}'} |")
  return "\n".join(lines)


def table(results: dict, temperatures) -> str:
  cols = [("greedy", "greedy acc"), ("greedy_chain", "greedy chain")]
  cols += [(f"sample_{t}", f"acc τ={t}") for t in temperatures]
  cols += [
      (f"unique_{temperatures[-1]}", f"distinct completions τ={temperatures[-1]}"),
      (f"distinct_{temperatures[-1]}", f"distinct valid chains τ={temperatures[-1]}"),
      (f"valid_{temperatures[-1]}", f"valid chains τ={temperatures[-1]}"),
      ("long", "long acc (4 ops)"),
  ]
  head = "| run | seeds | " + " | ".join(c[1] for c in cols) + " | train s |"
  lines = [head, "|" + "---|" * (len(cols) + 3)]
  for arm, metrics in results.items():
    n = len(metrics.get("greedy", []))
    cells = [
        fmt(metrics.get(k, []), scale=1.0, digits=2)
        if k.startswith(("distinct", "unique"))
        else fmt(metrics.get(k, []))
        for k, _ in cols
    ]
    seconds = f"{np.mean(metrics['train_seconds']):.0f}" if "train_seconds" in metrics else "–"
    lines.append(f"| {LABELS.get(arm, arm)} | {n} | " + " | ".join(cells) + f" | {seconds} |")
  return "\n".join(lines)


def _bar(ax, results, arms, keys, labels):
  width = 0.8 / len(keys)
  arms = [a for a in arms if a in results]
  x = np.arange(len(arms))
  for i, (key, label) in enumerate(zip(keys, labels)):
    means = [100 * stats(results[a][key])[0] for a in arms]
    stds = [100 * stats(results[a][key])[1] for a in arms]
    ax.bar(x + (i - (len(keys) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=label)
  ax.set_xticks(x, [LABELS.get(a, a) for a in arms], rotation=20, ha="right")
  ax.set_ylabel("accuracy (%)")


def _curve(ax, results, arms, key, label, **kw):
  pts = [(x, results[a][key]) for a, x in arms if a in results and key in results[a]]
  if pts:
    xs = [p[0] for p in pts]
    ax.errorbar(
        xs,
        [100 * stats(v)[0] for _, v in pts],
        yerr=[100 * stats(v)[1] for _, v in pts],
        marker="o",
        capsize=3,
        label=label,
        **kw,
    )


def figures(results: dict, best: str | None, temperatures, out_dir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  hot = f"sample_{temperatures[-1]}"
  on = f"onpolicy_{best}" if best else None
  written = []

  def save(fig, name):
    for ax in fig.axes:
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    written.append(name)

  fig, ax = plt.subplots(figsize=(8, 4.2))
  arms = ["teacher", "initial", "sft", "seqkd", "supkd", "best_lambda_050"] + ([on] if on else [])
  _bar(ax, results, arms, ["greedy", hot], ["greedy", f"sampled τ={temperatures[-1]}"])
  ax.set_title(f"GKD vs baselines (best divergence: {best})")
  save(fig, "fig1_methods.png")

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for arm, _ in (("supkd", None),) + DIVERGENCE_ARMS:
    if arm not in results:
      continue
    xs = [stats(results[arm][f"unique_{t}"])[0] for t in temperatures]
    ys = [100 * stats(results[arm][f"sample_{t}"])[0] for t in temperatures]
    ax.plot(xs, ys, marker="o", label=LABELS[arm])
    for t, x, y in zip(temperatures, xs, ys):
      ax.annotate(f"τ={t}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
  ax.set_xlabel("diversity: distinct completions among the samples of a problem")
  ax.set_ylabel("sampling accuracy (%)")
  ax.set_title("Quality vs diversity across temperatures")
  save(fig, "fig4_quality_diversity.png")

  fig, ax = plt.subplots(figsize=(6, 4))
  _curve(ax, results, LAMBDA_ARMS, "greedy", "FKL, greedy")
  _curve(ax, results, LAMBDA_ARMS, hot, f"FKL, τ={temperatures[-1]}", linestyle="--")
  _curve(ax, results, best_lambda_arms(best), "greedy", f"{best}, greedy")
  _curve(ax, results, best_lambda_arms(best), hot, f"{best}, τ={temperatures[-1]}", linestyle="--")
  ax.set_xlabel("student data fraction λ")
  ax.set_ylabel("accuracy (%)")
  ax.set_title("Effect of on-policy data")
  save(fig, "fig7_lambda.png")

  fig, ax = plt.subplots(figsize=(6, 4))
  _curve(ax, results, DIVERGENCE_ARMS, "greedy", "greedy")
  for t in temperatures:
    _curve(ax, results, DIVERGENCE_ARMS, f"sample_{t}", f"sampled τ={t}")
  ax.set_xlabel("β (0 = forward KL, 1 = reverse KL), on-policy λ=1")
  ax.set_ylabel("accuracy (%)")
  ax.set_title("Choice of divergence")
  save(fig, "fig8_divergence.png")

  fig, ax = plt.subplots(figsize=(7, 4))
  arms = ["initial", "supkd", "onpolicy_best_5pct"] + ([on] if on else [])
  _bar(ax, results, arms, ["greedy", hot], ["greedy", f"sampled τ={temperatures[-1]}"])
  ax.set_title("Data efficiency: on-policy on 5% of the prompts")
  save(fig, "fig_data_efficiency.png")
  return written


def write(config, results: dict, out_dir: str) -> None:
  """results: sweep.collect's dict (arms, 'teacher', 'initial' and 'selection')."""
  os.makedirs(out_dir, exist_ok=True)
  results = dict(results)
  selection = results.pop("selection", {})
  best = selection.get("best_divergence")
  order = list(LABELS) + sorted(set(results) - set(LABELS))  # baselines, divergences, λ, data efficiency
  results = {arm: results[arm] for arm in order if arm in results}
  temperatures = tuple(config.eval.temperatures)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump({"selection": selection, **results}, f, indent=1, sort_keys=True)
  md = table(results, temperatures)
  text = (
      f"{config.steps} steps of batch {config.train.batch_size} per run from the initial student; accuracy in %, "
      f"mean ± std over seeds {tuple(config.seeds)} ({config.eval.num_test} test problems, "
      f"{config.eval.num_test_long} long ones; diversity on {config.eval.diversity_problems} problems x "
      f"{config.eval.num_samples} samples).\n\n{md}\n\n"
      f"## The paper's claims\n\nBest on-policy divergence on validation: {best}. A − B is the mean ± std of the "
      f"per-seed differences; p is the two-sided paired t-test over seeds.\n\n"
      f"{claims(results, best, temperatures)}\n\n"
      f"## Learning rates (validation split, seed {config.grid_seed})\n\n"
      f"{selection_table(selection, tuple(config.lr_grid))}\n"
  )
  with open(os.path.join(out_dir, "sweep.md"), "w") as f:
    f.write(text)
  names = figures(results, best, temperatures, out_dir) if results else []
  print(text, flush=True)
  print(f"report: {out_dir}/sweep.md, results.json, " + ", ".join(names), flush=True)
