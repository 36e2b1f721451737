"""On-policy distillation: λ=1 (the student always samples), β=1 (reverse KL, mode-seeking).

The setting the Thinking Machines write-up and ms-swift's on-policy recipe use: every step the student
generates completions for the prompts and is trained on the teacher's reverse-KL signal on exactly those
tokens. Prompt-only datasets work (no completions are read).

Local smoke run on CPU (offline):

  python experiments/fixture.py /tmp/gkd_fixture
  python -m gkd_jax.main --config=configs/on_policy_distillation.py:runlocal --workdir=/tmp/gkd_opd_local

One GPU node:

  pip install -e ".[cuda12]"
  python -m gkd_jax.main --config=configs/on_policy_distillation.py --workdir=/tmp/gkd_opd --config.dtype=bfloat16

A TPU pod slice, v5e-8 or larger (every worker runs the same command; the batch is split over all chips).
The workdir must be on GCS: every worker reads and writes it. On spot / queued-resource TPU VMs the trainer
saves a checkpoint and exits with status 75 (EX_TEMPFAIL) when it is preempted: the loop reruns it (it
resumes from the workdir) and stops on any other exit status.

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="cd gkd_jax && \\
    pip install -e '.[tpu]' && until python -m gkd_jax.main --config=configs/on_policy_distillation.py \\
    --workdir=gs://$BUCKET/gkd_opd --distributed --config.dtype=bfloat16; do s=\\$?; [ \\$s -eq 75 ] || exit \\$s; done"

Args: "" or "runlocal[=FIXTURE_DIR]".
Expected: runlocal about a minute on 2 CPU cores (generation dominates: 32 new tokens per step). Full run
not measured here; generation is most of the step time, so it scales with max_completion_length.
TPU memory, measured by compiling the step for the slice on a CPU host (experiments/aot_compile.py;
experiments/results/aot.md), as shipped (remat="dots") with --config.dtype=bfloat16: the same models, batch
and widths as configs/gsm8k_qwen2_5.py, 9.0 GiB per chip on v5e-8 (16 GiB); the sampler 0.75 GiB next to the
1.9 GiB train state (roofline 97 ms per step, 178 ms per 512-token generation).
"""

from gkd_jax import config as config_lib


def get_config(arg=None):
  name, value = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.job = "train"
  c.model = "Qwen/Qwen2.5-0.5B-Instruct"
  c.teacher_model = "Qwen/Qwen2.5-1.5B-Instruct"
  c.dataset, c.dataset_config = "openai/gsm8k", "main"
  c.dataset_columns = {"question": "prompt", "answer": "completion"}
  c.lmbda, c.beta, c.temperature = 1.0, 1.0, 0.9
  c.max_length, c.max_prompt_length, c.max_completion_length = 768, 256, 512
  c.batch_size, c.total_steps, c.learning_rate, c.warmup_steps = 32, 500, 1e-5, 25
  if name == "runlocal":
    config_lib.use_local_fixture(c, value)
  return c
