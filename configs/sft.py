"""Supervised fine-tuning (NLL only, no teacher): how GKD students and teachers are initialized.

The paper starts its students from SFT checkpoints; this recipe trains one with the same loop, data
pipeline, checkpoints and export as the distillation recipes.

Local smoke run on CPU (offline):

  python experiments/fixture.py /tmp/gkd_fixture
  python -m gkd_jax.main --config=configs/sft.py:runlocal --workdir=/tmp/gkd_sft_local

One GPU node:

  pip install -e ".[cuda12]"
  python -m gkd_jax.main --config=configs/sft.py --workdir=/tmp/gkd_sft --config.dtype=bfloat16

A TPU pod slice, v5e-8 or larger (every worker runs the same command; the batch is split over all chips).
The workdir must be on GCS: every worker reads and writes it. On spot / queued-resource TPU VMs the trainer
saves a checkpoint and exits with status 75 (EX_TEMPFAIL) when it is preempted: the loop reruns it (it
resumes from the workdir) and stops on any other exit status.

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="cd gkd_jax && \\
    pip install -e '.[tpu]' && until python -m gkd_jax.main --config=configs/sft.py \\
    --workdir=gs://$BUCKET/gkd_sft --distributed --config.dtype=bfloat16; do s=\\$?; [ \\$s -eq 75 ] || exit \\$s; done"

Args: "", "lora" (rank-16 adapters on every projection), "runlocal[=FIXTURE_DIR]".
Expected: runlocal well under a minute on 2 CPU cores. The trained model is written to WORKDIR/export.
TPU memory, measured by compiling the step for the slice on a CPU host (experiments/aot_compile.py;
experiments/results/aot.md): as shipped (remat="dots") with --config.dtype=bfloat16 the full fine-tune needs
8.7 GiB per chip on v5e-8 (16 GiB); roofline 48 ms per step.
"""

from gkd_jax import config as config_lib


def get_config(arg=None):
  name, value = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.job = "train"
  c.objective, c.lmbda = "sft", 0.0
  c.model = "Qwen/Qwen2.5-0.5B"
  c.dataset, c.dataset_config = "openai/gsm8k", "main"
  c.dataset_columns = {"question": "prompt", "answer": "completion"}
  c.max_length, c.max_prompt_length, c.max_completion_length = 768, 256, 512
  c.batch_size, c.total_steps, c.learning_rate, c.warmup_steps = 32, 1000, 2e-5, 50
  if name == "lora":
    c.lora_rank, c.lora_alpha, c.learning_rate = 16, 32.0, 2e-4
  if name == "runlocal":
    config_lib.use_local_fixture(c, value)
  return c
