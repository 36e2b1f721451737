"""The sweep's report: results.json, sweep.md (mean ± std over seeds) and the figures (experiments/sweep.py).

Figures, each the toy counterpart of a figure of the GKD paper (arXiv 2306.13649):
  fig1_methods.png          on-policy GKD against the baselines (continued SFT, SeqKD, supervised KD)
  fig4_quality_diversity.png  accuracy against diversity (distinct valid chains) across sampling temperatures,
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
    "onpolicy_fkl_5pct": "on-policy FKL, 5% prompts",
}
DIVERGENCE_ARMS = (
    ("onpolicy_fkl", 0.0),
    ("onpolicy_jsd01", 0.1),
    ("onpolicy_jsd05", 0.5),
    ("onpolicy_jsd09", 0.9),
    ("onpolicy_rkl", 1.0),
)
LAMBDA_ARMS = (("supkd", 0.0), ("lambda_025", 0.25), ("lambda_050", 0.5), ("lambda_075", 0.75), ("onpolicy_fkl", 1.0))


def stats(values) -> tuple[float, float, int]:
  """Mean, sample standard deviation (0 for one value) and count."""
  v = np.asarray(values, dtype=float)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def fmt(values, scale: float = 100.0, digits: int = 1) -> str:
  if not values:
    return "–"
  mean, std, n = stats(values)
  return f"{scale * mean:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if n > 1 else "")


def table(results: dict, temperatures) -> str:
  cols = [("greedy", "greedy acc"), ("greedy_chain", "greedy chain")]
  cols += [(f"sample_{t}", f"acc τ={t}") for t in temperatures]
  cols += [
      (f"distinct_{temperatures[-1]}", f"distinct chains τ={temperatures[-1]}"),
      (f"valid_{temperatures[-1]}", f"valid chains τ={temperatures[-1]}"),
      ("long", "long acc (4 ops)"),
  ]
  head = "| run | seeds | " + " | ".join(c[1] for c in cols) + " | train s |"
  lines = [head, "|" + "---|" * (len(cols) + 3)]
  for arm, metrics in results.items():
    n = len(metrics.get("greedy", []))
    cells = [
        fmt(metrics.get(k, []), scale=1.0, digits=2) if k.startswith("distinct") else fmt(metrics.get(k, []))
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


def figures(results: dict, temperatures, out_dir: str) -> list[str]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  hot = f"sample_{temperatures[-1]}"
  written = []

  def save(fig, name):
    for ax in fig.axes:
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    written.append(name)

  onpolicy = [a for a, _ in DIVERGENCE_ARMS if a in results]
  best = max(onpolicy, key=lambda a: stats(results[a]["greedy"])[0]) if onpolicy else None
  fig, ax = plt.subplots(figsize=(8, 4.2))
  _bar(
      ax,
      results,
      ["initial", "sft", "seqkd", "supkd"] + ([best] if best else []),
      ["greedy", hot],
      ["greedy", f"sampled τ={temperatures[-1]}"],
  )
  ax.set_title("GKD vs baselines (student from its SFT checkpoint; best on-policy divergence shown)")
  save(fig, "fig1_methods.png")

  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for arm, _ in (("supkd", None),) + DIVERGENCE_ARMS:
    if arm not in results:
      continue
    xs = [stats(results[arm][f"distinct_{t}"])[0] for t in temperatures]
    ys = [100 * stats(results[arm][f"sample_{t}"])[0] for t in temperatures]
    ax.plot(xs, ys, marker="o", label=LABELS[arm])
    for t, x, y in zip(temperatures, xs, ys):
      ax.annotate(f"τ={t}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
  ax.set_xlabel("diversity: distinct valid chains among 8 samples")
  ax.set_ylabel("sampling accuracy (%)")
  ax.set_title("Quality vs diversity across temperatures")
  save(fig, "fig4_quality_diversity.png")

  fig, ax = plt.subplots(figsize=(6, 4))
  _curve(ax, results, LAMBDA_ARMS, "greedy", "greedy")
  _curve(ax, results, LAMBDA_ARMS, hot, f"sampled τ={temperatures[-1]}")
  ax.set_xlabel("student data fraction λ (forward KL)")
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
  _bar(
      ax,
      results,
      ["initial", "supkd", "onpolicy_fkl_5pct", "onpolicy_fkl"],
      ["greedy", hot],
      ["greedy", f"sampled τ={temperatures[-1]}"],
  )
  ax.set_title("Data efficiency: on-policy on 5% of the prompts")
  save(fig, "fig_data_efficiency.png")
  return written


def write(config, results: dict, out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  order = list(LABELS) + sorted(set(results) - set(LABELS))  # baselines, divergences, λ, data efficiency
  results = {arm: results[arm] for arm in order if arm in results}
  temperatures = tuple(config.eval.temperatures)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  md = table(results, temperatures)
  with open(os.path.join(out_dir, "sweep.md"), "w") as f:
    f.write(
        f"{config.steps} steps of batch 64 per run from the initial student; accuracy in %, mean ± std "
        f"over seeds ({config.eval.num_test} test problems, {config.eval.num_test_long} long ones; diversity on "
        f"{config.eval.diversity_problems} problems x {config.eval.num_samples} samples).\n\n{md}\n"
    )
  names = figures(results, temperatures, out_dir) if results else []
  print(md, flush=True)
  print(f"report: {out_dir}/sweep.md, results.json, " + ", ".join(names), flush=True)
