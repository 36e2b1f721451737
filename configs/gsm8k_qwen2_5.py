"""GKD on GSM8K: Qwen2.5-0.5B-Instruct student, Qwen2.5-1.5B-Instruct (or 7B) teacher, λ=0.5, β=0.5.

The canonical setup of the seeds: a mixture of on-policy steps (the student samples, probability λ) and
dataset steps, generalized JSD with β=0.5, temperature 0.9 for sampling and in the loss.

Local smoke run on CPU (offline; the 12M/65M Qwen2 fixture stands in for the Qwen2.5 models):

  python experiments/fixture.py /tmp/gkd_fixture
  python -m gkd_jax.main --config=configs/gsm8k_qwen2_5.py:runlocal --workdir=/tmp/gkd_gsm8k_local

One GPU node (bf16 compute, f32 master weights):

  pip install -e ".[cuda12]"
  python -m gkd_jax.main --config=configs/gsm8k_qwen2_5.py --workdir=/tmp/gkd_gsm8k --config.dtype=bfloat16

A TPU pod slice, v5e-8 or larger (every worker runs the same command; the batch is split over all chips).
The workdir must be on GCS: every worker reads and writes it. On spot / queued-resource TPU VMs the trainer
saves a checkpoint and exits with status 75 (EX_TEMPFAIL) when it is preempted: the loop reruns it (it
resumes from the workdir) and stops on any other exit status.

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="cd gkd_jax && \\
    pip install -e '.[tpu]' && until python -m gkd_jax.main --config=configs/gsm8k_qwen2_5.py \\
    --workdir=gs://$BUCKET/gkd_gsm8k --distributed --config.dtype=bfloat16; \\
    do s=\\$?; [ \\$s -eq 75 ] || exit \\$s; done"

The 7B teacher (also v5e-8 or larger): the same command with --config=configs/gsm8k_qwen2_5.py:7b and
--workdir=gs://$BUCKET/gkd_gsm8k_7b.

Args: "" (1.5B teacher), "7b" (7B teacher), "runlocal[=FIXTURE_DIR]".
Expected: runlocal takes about a minute on 2 CPU cores and under 2 GiB of RAM (measured). The full run
(7,473 GSM8K train rows, 1,000 steps of 32) is not measured here: expect on the order of an hour on one
80 GB GPU with the 1.5B teacher, with the student's and teacher's weights (~8 GiB in f32/bf16) plus
activations well within memory; use the 7B teacher with offload_teacher_model or an FSDP mesh.
TPU memory, measured by compiling the step for the slice on a CPU host (experiments/aot_compile.py;
experiments/results/aot.md), as shipped (remat="dots") with --config.dtype=bfloat16: the 1.5B-teacher step
needs 8.9 GiB per chip on v5e-8 (16 GiB), the student's sampler 0.75 GiB next to the 1.9 GiB train state
(roofline 97 ms per step, 178 ms per 512-token generation); the 7B-teacher step 12.9 GiB per chip on v5e-8
(6.4 GiB on v5e-16), its sampler 0.75 GiB next to the 4.8 GiB train state.
"""

from gkd_jax import config as config_lib


def get_config(arg=None):
  name, value = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.job = "train"
  c.model = "Qwen/Qwen2.5-0.5B-Instruct"
  c.teacher_model = "Qwen/Qwen2.5-7B-Instruct" if name == "7b" else "Qwen/Qwen2.5-1.5B-Instruct"
  c.dataset, c.dataset_config, c.dataset_split = "openai/gsm8k", "main", "train"
  c.dataset_columns = {"question": "prompt", "answer": "completion"}
  c.beta, c.lmbda, c.temperature = 0.5, 0.5, 0.9
  c.max_length, c.max_prompt_length, c.max_completion_length = 768, 256, 512
  c.batch_size, c.total_steps, c.learning_rate, c.warmup_steps = 32, 1000, 1e-5, 50
  c.save_every = 200
  if name == "runlocal":
    config_lib.use_local_fixture(c, value)
  return c
