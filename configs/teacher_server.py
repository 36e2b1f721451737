"""GKD against a teacher served over HTTP: the teacher's top-k log-probs per token (gkd_logits_topk).

The teacher runs outside the training job, either on our JAX server or on a vLLM server you already run;
both speak the `/v1/completions` API with `prompt_logprobs: k`. The trainer sends every training sequence
(prompt + completion ids), gets the teacher's top-k log-probs at each position, and trains on the top-k
JSD (both distributions renormalized over the teacher's k). Requests for the next dataset step overlap
the current step.

1. Serve the teacher (either one):

  python -m gkd_jax.serve --model Qwen/Qwen2.5-7B-Instruct --port 8000 --max-logprobs 64 --dtype bfloat16
  vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000 --max-logprobs 64

2. Train (one GPU node; the student only):

  python -m gkd_jax.main --config=configs/teacher_server.py --workdir=/tmp/gkd_server \\
    --config.teacher_model_server=http://127.0.0.1:8000 --config.dtype=bfloat16

On a TPU pod slice (v5e-8 or larger), serve the teacher on another slice or host and pass its address.
The workdir must be on GCS: every worker reads and writes it. On spot / queued-resource TPU VMs the trainer
saves a checkpoint and exits with status 75 (EX_TEMPFAIL) when it is preempted: the loop reruns it (it
resumes from the workdir) and stops on any other exit status.

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="cd gkd_jax && \\
    pip install -e '.[tpu]' && until python -m gkd_jax.main --config=configs/teacher_server.py \\
    --workdir=gs://$BUCKET/gkd_server --distributed --config.dtype=bfloat16 \\
    --config.teacher_model_server=http://$TEACHER_HOST:8000; do s=\\$?; [ \\$s -eq 75 ] || exit \\$s; done"

A teacher that other hosts reach (`--host 0.0.0.0`) should need a key: start it with GKD_JAX_API_KEY=KEY in its
environment (or --api-key KEY), and give the trainer the same variable (or --config.teacher_model_server_api_key,
which config.json stores redacted).

Local smoke run on CPU (offline): serve the fixture's teacher, then train against it:

  python experiments/fixture.py /tmp/gkd_fixture
  python -m gkd_jax.serve --model /tmp/gkd_fixture/teacher --tokenizer /tmp/gkd_fixture/tokenizer \\
    --port 8000 --max-logprobs 16 --dtype float32 &
  python -m gkd_jax.main --config=configs/teacher_server.py:runlocal --workdir=/tmp/gkd_server_local

Args: "" or "runlocal[=FIXTURE_DIR]". gkd_logits_topk must not exceed the server's --max-logprobs.
Expected: runlocal about a minute on 2 CPU cores. TPU memory of the training side (the student only),
measured by compiling its step for the slice on a CPU host (experiments/aot_compile.py;
experiments/results/aot.md), as shipped (remat="dots") with --config.dtype=bfloat16: 6.5 GiB per chip on
v5e-8 (16 GiB), the sampler 0.75 GiB next to the 1.2 GiB train state.
"""

from gkd_jax import config as config_lib


def get_config(arg=None):
  name, value = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.job = "train"
  c.model = "Qwen/Qwen2.5-0.5B-Instruct"
  c.teacher_model = None
  c.teacher_model_server = "http://127.0.0.1:8000"
  c.gkd_logits_topk = 64
  c.dataset, c.dataset_config = "openai/gsm8k", "main"
  c.dataset_columns = {"question": "prompt", "answer": "completion"}
  c.lmbda, c.beta = 0.5, 0.5
  c.max_length, c.max_prompt_length, c.max_completion_length = 768, 256, 512
  c.batch_size, c.total_steps, c.learning_rate = 32, 1000, 1e-5
  if name == "runlocal":
    config_lib.use_local_fixture(c, value)
    c.gkd_logits_topk = 16
  return c
