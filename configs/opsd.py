"""OPSD: on-policy self-distillation. The student is its own teacher, given privileged context.

The teacher reads a `teacher_prompt` (here built from each row's question and reference answer with
`teacher_prompt_template`) plus the student's own completion; the student reads the plain prompt. "dynamic"
(default): the teacher is the student's current weights (no teacher_model). "fixed": teacher_model equals
model, a frozen copy of the initial student.

Local smoke run on CPU (offline):

  python experiments/fixture.py /tmp/gkd_fixture
  python -m gkd_jax.main --config=configs/opsd.py:runlocal --workdir=/tmp/gkd_opsd_local

One GPU node (fixed teacher):

  pip install -e ".[cuda12]"
  python -m gkd_jax.main --config=configs/opsd.py:fixed --workdir=/tmp/gkd_opsd --config.dtype=bfloat16

A TPU pod slice, v5e-8 or larger (every worker runs the same command; the batch is split over all chips).
The workdir must be on GCS: every worker reads and writes it. On spot / queued-resource TPU VMs the trainer
saves a checkpoint and exits with status 75 (EX_TEMPFAIL) when it is preempted: the loop reruns it (it
resumes from the workdir) and stops on any other exit status.

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="cd gkd_jax && \\
    pip install -e '.[tpu]' && until python -m gkd_jax.main --config=configs/opsd.py \\
    --workdir=gs://$BUCKET/gkd_opsd --distributed --config.dtype=bfloat16; \\
    do s=\\$?; [ \\$s -eq 75 ] || exit \\$s; done"

Args: "" (dynamic), "fixed", "runlocal[=FIXTURE_DIR]", "runlocal_fixed[=FIXTURE_DIR]".
Expected: runlocal about a minute on 2 CPU cores. Full run not measured here; one model in memory (two
for "fixed"). TPU memory, measured by compiling the step for the slice on a CPU host
(experiments/aot_compile.py; experiments/results/aot.md): the dynamic step as shipped (remat="dots") with
--config.dtype=bfloat16 needs 14.6 GiB per chip on v5e-8 (16 GiB), the sampler 2.2 GiB next to the 3.6 GiB
train state (roofline 266 ms per step, 556 ms per generation). For more headroom, --config.remat=full
(7.5 GiB, roofline 320 ms) or --config.fused_loss=True (no [B, C, V] logits).
"""

from gkd_jax import config as config_lib


def get_config(arg=None):
  name, value = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.job = "train"
  c.model = "Qwen/Qwen2.5-1.5B-Instruct"
  c.teacher_model = c.model if name in ("fixed", "runlocal_fixed") else None
  c.dataset, c.dataset_config = "openai/gsm8k", "main"
  c.dataset_columns = {"question": "prompt", "answer": "completion"}
  c.teacher_prompt_template = "{prompt}\n\nReference solution:\n{completion}\n\n" "Now articulate your own reasoning."
  c.lmbda, c.beta, c.temperature = 1.0, 0.5, 0.9
  c.max_length, c.max_prompt_length, c.max_completion_length = 1024, 512, 512
  c.batch_size, c.total_steps, c.learning_rate, c.warmup_steps = 32, 500, 5e-6, 25
  if name in ("runlocal", "runlocal_fixed"):
    config_lib.use_local_fixture(c, value)
    c.max_length, c.max_prompt_length = 192, 128  # the teacher prompt carries the reference answer
  return c
