"""Start-up validation: each bad value or combination fails with one message naming field, value and rule."""

import pytest

from gkd_jax import config as config_lib


def good():
  c = config_lib.base_config()
  c.model, c.dataset = "/models/student", "/data/train.jsonl"
  return c


BAD = [
    ({"objective": "dpo"}, r"config.objective='dpo' is invalid: must be one of \('gkd', 'sft'\)"),
    ({"model": ""}, r"config.model='' is invalid: set a local HF checkpoint"),
    ({"dataset": ""}, r"config.dataset='' is invalid"),
    ({"beta": 1.5}, r"config.beta=1.5 is invalid: must be in \[0, 1\]"),
    ({"beta": -0.1}, r"config.beta=-0.1 is invalid: must be in \[0, 1\]"),
    ({"lmbda": 2.0}, r"config.lmbda=2.0 is invalid: must be in \[0, 1\]"),
    ({"temperature": 0.0}, r"config.temperature=0.0 is invalid: must be > 0"),
    ({"loss_temperature": -1.0}, r"config.loss_temperature=-1.0 is invalid: must be > 0"),
    ({"sft_alpha": -0.5}, r"config.sft_alpha=-0.5 is invalid: must be ≥ 0"),
    ({"label_smoothing": 1.0, "objective": "sft"}, r"config.label_smoothing=1.0 is invalid: must be in \[0, 1\)"),
    ({"label_smoothing": 0.1}, r"config.label_smoothing=0.1 is invalid: smooths the SFT term: it needs objective="),
    ({"gkd_logits_topk": 0}, r"config.gkd_logits_topk=0 is invalid: must be a positive int"),
    (
        {"teacher_model_server": "http://127.0.0.1:8000"},
        r"config.gkd_logits_topk=None is invalid: must be set with teacher_model_server",
    ),
    (
        {"teacher_model_server": "http://127.0.0.1:8000", "gkd_logits_topk": 8, "teacher_model": "/models/t"},
        r"config.teacher_model='/models/t' is invalid: give either teacher_model or teacher_model_server",
    ),
    (
        {"teacher_model_server": "http://127.0.0.1:8000", "gkd_logits_topk": 8, "seq_kd": True},
        r"config.seq_kd=True is invalid: needs a local teacher",
    ),
    ({"fused_loss": True, "gkd_logits_topk": 4}, r"config.fused_loss=True is invalid: cannot be combined"),
    (
        {"objective": "sft", "teacher_model": "/models/t", "lmbda": 0.0},
        r"config.objective='sft' is invalid: SFT uses no teacher",
    ),
    ({"objective": "sft"}, r"config.objective='sft' is invalid: SFT uses no teacher"),  # lmbda 0.5 default
    ({"dtype": "float8"}, r"config.dtype='float8' is invalid: must be one of"),
    ({"max_completion_length": 0}, r"config.max_completion_length=0 is invalid: must be a positive int"),
    ({"batch_size": 6, "grad_accum_steps": 4}, r"config.grad_accum_steps=4 is invalid: must divide batch_size=6"),
    ({"max_prompt_length": 512}, r"config.max_prompt_length=512 is invalid: must leave room for a completion"),
    ({"learning_rate": -1e-3}, r"config.learning_rate=-0.001 is invalid: must be ≥ 0"),
    ({"warmup_steps": 2000}, r"config.warmup_steps=2000 is invalid: must be in \[0, total_steps=1000\]"),
    ({"lr_schedule": "step"}, r"config.lr_schedule='step' is invalid: must be one of"),
    ({"top_p": 0.0}, r"config.top_p=0.0 is invalid: must be in \(0, 1\]"),
    ({"top_k": -2}, r"config.top_k=-2 is invalid: must be ≥ 0"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_values_are_rejected_with_a_clear_message(overrides, message):
  c = good()
  for k, v in overrides.items():
    c[k] = v
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_good_config_passes():
  config_lib.validate(good())
  c = good()
  c.teacher_model_server, c.gkd_logits_topk, c.teacher_model = "http://127.0.0.1:8000", 64, None
  config_lib.validate(c)


def test_run_config_redacts_the_api_key_and_resuming_ignores_it(tmp_path):
  from gkd_jax import resume

  workdir = str(tmp_path)
  c = good()
  c.teacher_model_server, c.gkd_logits_topk, c.teacher_model_server_api_key = "http://teacher:8000", 8, "s3cret"
  assert config_lib.write_run_config(workdir, c, resume.FINGERPRINT_FIELDS) == {}
  text = (tmp_path / "config.json").read_text()
  assert "s3cret" not in text and '"teacher_model_server_api_key": "<redacted>"' in text
  assert "teacher_model_server_api_key" not in resume.FINGERPRINT_FIELDS  # the checkpoint's fingerprint
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)  # a run to resume
  for key in ("s3cret", "rotated", None):  # the same key, another one, or $GKD_JAX_API_KEY: no change
    c.teacher_model_server_api_key = key
    assert config_lib.write_run_config(workdir, c, resume.FINGERPRINT_FIELDS) == {}
  assert not [p for p in tmp_path.iterdir() if p.name.startswith("config.replaced-")]
  c.teacher_model_server_api_key, c.beta = "s3cret", 0.9
  with pytest.raises(ValueError, match="changed method: beta: 0.5 → 0.9 ") as e:
    config_lib.write_run_config(workdir, c, resume.FINGERPRINT_FIELDS)
  assert "s3cret" not in str(e.value)
