"""Vision-language GKD: InternVL3-8B teaches InternVL3-2B, as in ms-swift's multimodal GKD example.

Rows are ms-swift's multimodal format: `messages` whose user turns hold `<image>` placeholders, and an `images`
column (paths — local or gs:// —, bytes, or datasets Image features), one image per placeholder, e.g.

  {"messages": [{"role": "user", "content": "<image>Describe the picture."},
                {"role": "assistant", "content": "A dog runs on the beach."}],
   "images": ["gs://my-bucket/coco/val2014/COCO_val2014_000000000042.jpg"]}

(ms-swift's `swift infer --val_dataset modelscope/coco_2014_caption:validation#5000 --result_path ...` writes rows of
this form, so its teacher-generated caption data can be read as is). Each image is cut into 448-px tiles by the
checkpoint's image processor (at most `image_max_tiles`, plus a thumbnail when there are several), each tile
becoming 256 image tokens. The vision tower and the projector stay frozen (train_vision_tower /
train_projector), the language model trains; the loss covers the completion's text tokens only.

Local smoke run on CPU (offline; the shapes task with a tiny random InternVL pair):

  python experiments/fixture.py /tmp/gkd_fixture_internvl --internvl
  python -m gkd_jax.main --config=configs/mllm_internvl.py:runlocal --workdir=/tmp/gkd_mllm_local

One GPU node:

  pip install -e ".[cuda12]"
  python -m gkd_jax.main --config=configs/mllm_internvl.py --workdir=/tmp/gkd_mllm \\
    --config.dataset=/data/coco_caption_train.jsonl --config.dtype=bfloat16

A TPU pod slice, v5e-16 or larger (every worker runs the same command; the batch is split over all chips).
The workdir must be on GCS: every worker reads and writes it. On spot / queued-resource TPU VMs the trainer
saves a checkpoint and exits with status 75 (EX_TEMPFAIL) when it is preempted: the loop reruns it (it
resumes from the workdir) and stops on any other exit status.

  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="cd gkd_jax && \\
    pip install -e '.[tpu]' && until python -m gkd_jax.main --config=configs/mllm_internvl.py \\
    --workdir=gs://$BUCKET/gkd_mllm --distributed --config.dataset=gs://$BUCKET/coco_caption_train.jsonl \\
    --config.dtype=bfloat16; do s=\\$?; [ \\$s -eq 75 ] || exit \\$s; done"

Args: "", "runlocal[=FIXTURE_DIR]" (λ=0.5: off-policy and on-policy steps), "runlocal_on_policy[=FIXTURE_DIR]"
(λ=1).
Expected: runlocal well under a minute on 2 CPU cores. TPU memory (experiments/results/aot.md, bf16 compute):
the train step takes 9.71 GiB per chip of v5e-16's 16 GiB (the sampler 2.31, 4.99 with the train state); on v5e-8
it needs 16.39 GiB per chip, which does not fit (--config.batch_size=8 does: 14.07 GiB).
"""

from gkd_jax import config as config_lib


def get_config(arg=None):
  name, value = config_lib.parse_arg(arg)
  c = config_lib.base_config()
  c.job = "train"
  c.model = "OpenGVLab/InternVL3-2B-hf"
  c.teacher_model = "OpenGVLab/InternVL3-8B-hf"
  c.dataset = "coco_caption_train.jsonl"  # ms-swift rows (see above); point it at yours
  c.lmbda, c.beta, c.temperature = 0.5, 0.5, 0.9
  c.image_max_tiles = 6  # + a thumbnail: at most 7 tiles = 1,792 image tokens per picture
  c.max_length, c.max_prompt_length, c.max_completion_length = 2304, 2048, 256
  c.batch_size, c.total_steps, c.learning_rate, c.warmup_steps = 16, 1000, 1e-5, 50
  if name in ("runlocal", "runlocal_on_policy"):
    fixture = value or "/tmp/gkd_fixture_internvl"
    config_lib.use_local_fixture(c, fixture)
    c.dataset, c.tokenizer = f"{fixture}/train.jsonl", None
    c.eval_dataset, c.eval_split, c.eval_metric = f"{fixture}/test.jsonl", "train", "shapes"
    c.eval_rows, c.eval_batch_size, c.eval_max_new_tokens = 32, 16, 4
    c.image_max_tiles = None  # the fixture's processor: one 56-px tile per picture
    c.max_length, c.max_prompt_length, c.max_completion_length = 96, 64, 8
    c.batch_size, c.total_steps, c.learning_rate = 8, 6, 1e-3
    c.lmbda = 1.0 if name == "runlocal_on_policy" else 0.5
  return c
