"""Bad input: each case fails with one clear message naming the field / file / row and the rule, before any
model loads where it can, and loses nothing that was on disk."""

import asyncio
import dataclasses
import errno
import json
import logging
import math
import os
import re
import shutil
import threading

import pytest

from gkd_jax import checkpoints, data, export, files, models, resume, serve, sharding, trainer
from gkd_jax import rows as rows_lib
from gkd_jax import config as config_lib
from gkd_jax import metrics as metrics_lib
from test_checkpoints import abstract, assert_bitwise, sft_state
from test_config import good
from test_data import ids, make_tokenizer
from test_serve import ckpt, engine  # noqa: F401  (module-scope fixtures: a tiny served teacher)
from test_trainer import make_config, task  # noqa: F401  (module-scope fixture: tiny models and task data)

# ------------------------------------------------------------------------------------------------ config

BAD_CONFIG = [
    ({"max_grad_norm": -1.0}, r"config.max_grad_norm=-1.0 is invalid: must be ≥ 0 and finite \(0 = no clip"),
    ({"weight_decay": -0.01}, r"config.weight_decay=-0.01 is invalid: must be ≥ 0 and finite"),
    ({"learning_rate": math.nan}, r"config.learning_rate=nan is invalid: must be ≥ 0 and finite"),
    ({"learning_rate": math.inf}, r"config.learning_rate=inf is invalid: must be ≥ 0 and finite"),
    ({"learning_rate": 1e39}, r"config.learning_rate=1e\+39 is invalid: must be finite in float32, the dtype it is "),
    ({"weight_decay": 1e39}, r"config.weight_decay=1e\+39 is invalid: must be finite in float32"),
    ({"max_grad_norm": 3.5e38}, r"config.max_grad_norm=3.5e\+38 is invalid: must be finite in float32"),
    ({"temperature": 1e-50}, r"config.temperature=1e-50 is invalid: is 0 in float32, the dtype it is used in"),
    ({"loss_temperature": 1e39}, r"config.loss_temperature=1e\+39 is invalid: must be finite in float32"),
    ({"sft_alpha": 1e39}, r"config.sft_alpha=1e\+39 is invalid: must be finite in float32"),
    ({"resume_step": 0}, r"config.resume_step=0 is invalid: must be a checkpoint step ≥ 1"),
    ({"keep_period": 750}, r"config.keep_period=750 is invalid: must be a multiple of save_every=500"),
    ({"stop_on_zero_grad_steps": -1}, r"config.stop_on_zero_grad_steps=-1 is invalid: must be an int ≥ 0"),
    ({"mesh.data": 0}, r"config.mesh.data=0 is invalid: must be a positive int, or -1 for the devices"),
    ({"mesh.tensor": -2}, r"config.mesh.tensor=-2 is invalid: must be a positive int, or -1"),
    ({"mesh.data": -1}, r"config.mesh=\{'data': -1, 'fsdp': -1, 'tensor': 1\} is invalid: at most one axis may be -1"),
    (  # files carry no split names: any eval_split of them would be the training rows
        {"eval_split": "test"},
        r"config.eval_split='test' is invalid: config.dataset='/data/train.jsonl' is data files, which carry no "
        r"split names .*set config.eval_dataset to the held-out file\(s\)",
    ),
    ({"eval_split": "test", "dataset": "gs://b/d/*.parquet"}, r"config.eval_split='test' is invalid: .*eval_dataset"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIG, ids=[str(i) for i in range(len(BAD_CONFIG))])
def test_bad_config_values(overrides, message):
  c = good()
  for k, v in overrides.items():
    if k.startswith("mesh."):
      c.mesh[k[5:]] = v
    else:
      c[k] = v
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_mesh_of_zero_is_refused_by_make_mesh_too():
  with pytest.raises(ValueError, match=r"mesh axis fsdp=0 is invalid: must be a positive int, or -1"):
    sharding.make_mesh(1, 0, -1)


def test_seq_kd_with_lmbda_one_warns(caplog):
  c = good()
  c.seq_kd, c.lmbda, c.teacher_model = True, 1.0, "/models/t"
  with caplog.at_level(logging.WARNING, logger="gkd_jax.config"):
    config_lib.validate(c)
  assert "config.seq_kd=True never takes effect with config.lmbda=1.0" in caplog.text
  caplog.clear()
  c.lmbda = 0.5
  with caplog.at_level(logging.WARNING, logger="gkd_jax.config"):
    config_lib.validate(c)
  assert "seq_kd" not in caplog.text


def no_model_loads(monkeypatch):
  def refuse(path, *a, **kw):
    raise AssertionError(f"a model was loaded ({path}) before the bad input was reported")

  monkeypatch.setattr(models, "from_pretrained", refuse)


def test_topk_larger_than_the_vocabulary_fails_before_models_load(task, monkeypatch):
  no_model_loads(monkeypatch)
  with pytest.raises(
      ValueError, match=r"config.gkd_logits_topk=64 is invalid: must be at most the tokenizer's " r"vocabulary size 29"
  ):
    trainer.build(make_config(task, gkd_logits_topk=64))


def test_eval_split_is_accepted_with_held_out_files_or_a_dataset_with_splits():
  c = good()
  c.eval_split, c.eval_dataset = "test", "/data/test.jsonl"
  config_lib.validate(c)
  c.eval_dataset, c.dataset = None, "openai/gsm8k"
  config_lib.validate(c)


def test_sequences_beyond_max_position_embeddings_fail_before_models_load(task, monkeypatch):
  no_model_loads(monkeypatch)  # the tiny models have max_position_embeddings=256
  config = make_config(task, max_length=300, max_prompt_length=32, max_completion_length=240)
  with pytest.raises(
      ValueError,
      match=r"config.max_length=300, max_prompt_length=32 and max_completion_length=240 allow sequences of 272 "
      rf"tokens .*beyond config.model={re.escape(repr(task['student']))}'s limit: its config.json has "
      r"max_position_embeddings=256",
  ):
    trainer.build(config)
  # A local teacher is checked too.
  config = make_config(task, max_length=300, max_prompt_length=32, max_completion_length=200)  # 232 fit 256
  load_config = models.load_config
  monkeypatch.setattr(
      models,
      "load_config",
      lambda p: dataclasses.replace(load_config(p), max_position_embeddings=128)
      if p == task["teacher"]
      else load_config(p),
  )
  with pytest.raises(ValueError, match=r"beyond config.teacher_model=.*max_position_embeddings=128"):
    trainer.build(config)


def test_tensor_axis_not_dividing_the_heads_fails_before_models_load(task, monkeypatch):
  no_model_loads(monkeypatch)
  config = make_config(task)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 8  # the tiny models: 4 heads, 2 KV heads
  with pytest.raises(
      ValueError,
      match=rf"config.mesh.tensor=8 does not fit config.model={re.escape(repr(task['student']))}: it has "
      r"num_attention_heads=4 and num_key_value_heads=2, and mesh.tensor must divide the attention heads .*"
      r"tensor sizes that fit: \[1, 2, 4\]",
  ):
    trainer.build(config)


@pytest.mark.parametrize(
    "tensor,heads,kv,fits", [(4, 4, 2, True), (2, 4, 2, True), (8, 16, 2, True), (4, 12, 6, False), (4, 6, 6, False)]
)
def test_kv_heads_fewer_than_the_tensor_axis_are_replicated_if_it_is_a_multiple(tensor, heads, kv, fits):
  config = make_config({"student": "s", "teacher": "t", "data": "d.jsonl"})
  mesh = sharding.make_mesh(8 // tensor, 1, tensor)
  cfg = models.ModelConfig(
      model_type="qwen2",
      vocab_size=32,
      hidden_size=8 * heads,
      intermediate_size=8,
      num_hidden_layers=1,
      num_attention_heads=heads,
      num_key_value_heads=kv,
      head_dim=8,
  )
  if fits:
    trainer.check_model_fits(config, "model", cfg, mesh)
  else:
    with pytest.raises(ValueError, match=rf"config.mesh.tensor={tensor} does not fit config.model='s'"):
      trainer.check_model_fits(config, "model", cfg, mesh)


@pytest.mark.parametrize("field", ["dataset_split", "eval_split"])
def test_missing_split_of_a_saved_dataset_dict_names_the_splits_before_models_load(task, monkeypatch, field):
  no_model_loads(monkeypatch)
  with pytest.raises(
      ValueError,
      match=rf"split 'validation' is not in the dataset {re.escape(task['data'])}: its splits are \['test', 'train'\]",
  ):
    trainer.build(make_config(task, **{field: "validation"}))


# ------------------------------------------------------------------------------------ model directories


def copy_model(src, dst, skip=()):
  dst.mkdir()
  for name in os.listdir(src):
    if name not in skip:
      shutil.copy(os.path.join(src, name), dst / name)
  return dst


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), r"tensor '.*' ends at byte \d+ but the file has \d+ bytes"),
        (lambda p: p.write_bytes(p.read_bytes()[:5]), r"5 bytes, shorter than the 8-byte header length"),
        (
            lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage-not-json" + b"\0" * 64),
            r"the header is not JSON",
        ),
        (lambda p: p.write_bytes(os.urandom(4096)), r"its header claims \d+ bytes but the file has 4096"),
    ],
    ids=["truncated", "stub", "garbage-header", "random"],
)
def test_corrupt_safetensors_names_the_file(task, tmp_path, damage, message):
  directory = copy_model(task["student"], tmp_path / "model")
  weights = directory / "model.safetensors"
  damage(weights)
  before = weights.read_bytes()
  with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} is not a valid safetensors file \({message}"):
    models.from_pretrained(str(directory))
  assert weights.read_bytes() == before  # only read


@pytest.mark.parametrize("text", ['{"model_type": "qwen2", "hidden_si', "<html>not json</html>"])
def test_corrupt_model_config_names_the_file(task, tmp_path, text):
  directory = copy_model(task["student"], tmp_path / "model")
  (directory / "config.json").write_text(text)
  with pytest.raises(ValueError, match=rf"{re.escape(str(directory / 'config.json'))} is not valid JSON .*corrupt"):
    models.from_pretrained(str(directory))
  assert (directory / "config.json").read_text() == text


def test_teacher_without_tokenizer_files_says_so(task, tmp_path, caplog, monkeypatch):
  bare = copy_model(task["teacher"], tmp_path / "teacher", skip=TOKENIZER_FILES)
  with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(bare))} holds no tokenizer files"):
    models.load_tokenizer(str(bare))
  tok = models.load_tokenizer(task["student"])
  with caplog.at_level(logging.WARNING, logger="gkd_jax.trainer"):
    trainer._check_same_tokenizer(tok, str(bare))
  assert "cannot check that teacher_model shares the student's tokenizer" in caplog.text
  assert "holds no tokenizer files" in caplog.text and "different tokenizer" not in caplog.text
  # The same teacher with another tokenizer is still refused, before any model loads.
  other = copy_model(task["teacher"], tmp_path / "other", skip=TOKENIZER_FILES)
  tok2 = models.load_tokenizer(task["student"])
  tok2.add_tokens(["<extra>"])
  tok2.save_pretrained(other)
  no_model_loads(monkeypatch)
  with pytest.raises(ValueError, match=r"different tokenizer \(30 tokens\) than the student \(29 tokens\)"):
    trainer.build(make_config(task, teacher_model=str(other)))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jsonl", b"", r"dataset file .*empty.jsonl is empty \(0 bytes\): it holds no rows"),
        ("blank.json", b"\n  \n", r"dataset file .*blank.json is empty \(4 bytes\)"),
        ("rows.txt", b'{"prompt": "a"}\n', r"dataset file .*rows.txt has the unsupported extension '.txt': allowed"),
        ("rows", b'{"prompt": "a"}\n', r"dataset file .*rows has the unsupported extension '\(none\)'"),
    ],
)
def test_bad_dataset_files_name_the_file(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message):
    rows_lib.load_rows(str(path))
  assert path.read_bytes() == content


def test_truncated_prompts_are_counted_and_logged_once(caplog):
  tok = make_tokenizer()
  long_prompt = "What is " + " plus ".join(str(i) for i in range(12)) + "?"
  n = len(ids(long_prompt))
  rows = [{"prompt": long_prompt if i % 3 == 0 else "What is 1?", "completion": " 2"} for i in range(12)]
  with caplog.at_level(logging.WARNING, logger="gkd_jax.data"):
    loader = data.DataLoader(
        rows,
        tok,
        batch_size=4,
        max_length=40,
        max_prompt_length=20,
        max_completion_length=8,
        process_index=0,
        process_count=1,
    )
  assert loader.num_truncated_prompts == 4
  warnings = [r.getMessage() for r in caplog.records if "prompt budget" in r.getMessage()]
  assert len(warnings) == 1
  assert warnings[0] == (
      "4 of 12 rows have prompts longer than the prompt budget of 20 tokens (max_prompt_length=20 and "
      f"max_length - max_completion_length = 40 - 8): each keeps its last 20 tokens (the longest had {n})"
  )
  batch = loader.batch(0)
  assert batch["prompt_mask"].sum(1).max() == 20  # still truncated as before: the last 20 tokens


# ------------------------------------------------------------------------------------------- metrics


def test_metrics_resume_drops_a_partial_last_line(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  good_lines = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4))
  path.write_text(good_lines + '{"step": 5, "loss": 0.')  # the process died mid-write
  with caplog.at_level(logging.WARNING, logger="gkd_jax.metrics"):
    writer = metrics_lib.MetricsWriter(str(tmp_path), resumed_step=3)
    writer.write({"step": 4, "loss": 0.5})
    writer.close()
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert records == [
      {"step": 1, "loss": 1.0},
      {"step": 2, "loss": 0.5},
      {"step": 3, "loss": 1 / 3},
      {"step": 4, "loss": 0.5},
  ]
  assert "dropped 1 unreadable line(s) (line 5" in caplog.text
  assert (tmp_path / "metrics.jsonl.dropped").read_text() == '{"step": 5, "loss": 0.\n'  # kept, not lost


# ------------------------------------------------------------------------------------------ disk full


def enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_checkpoint_save_is_one_clear_error_and_the_last_checkpoint_restores(tmp_path, monkeypatch):
  state = sft_state(step=1)
  ckpt = checkpoints.Checkpointer(tmp_path, save_every=1)
  assert ckpt.save(1, state, {"data": 1})
  ckpt.wait()
  monkeypatch.setattr(ckpt._manager, "save", enospc)
  with pytest.raises(
      files.DiskFullError,
      match=rf"no space left on the device while writing checkpoint step 2 to "
      rf"{re.escape(str(tmp_path / '2'))}; stopped here; the last complete checkpoint, step 1, is intact",
  ):
    ckpt.save(2, state, {"data": 2})
  monkeypatch.undo()
  ckpt.close()
  with checkpoints.Checkpointer(tmp_path) as again:
    assert again.all_steps() == [1]
    restored, extra = again.restore(abstract(state))
  assert extra == {"data": 1}
  assert_bitwise(restored, state)


def test_disk_full_in_a_background_save_surfaces_naming_the_directory(tmp_path, monkeypatch):
  ckpt = checkpoints.Checkpointer(tmp_path, save_every=1)

  def wrapped(*a, **kw):  # orbax re-raises its writer thread's failure wrapped in another exception
    try:
      enospc()
    except OSError as e:
      raise RuntimeError("async save failed") from e

  monkeypatch.setattr(ckpt._manager, "wait_until_finished", wrapped)
  with pytest.raises(
      files.DiskFullError,
      match=rf"writing a checkpoint to {re.escape(str(tmp_path))}; stopped " r"here; no checkpoint was complete yet",
  ):
    ckpt.wait()
  monkeypatch.undo()
  ckpt.close()


def test_disk_full_metrics_write_names_the_file_and_keeps_earlier_lines(tmp_path, monkeypatch):
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  writer.write({"step": 1, "loss": 2.0})
  path = tmp_path / "metrics.jsonl"
  before = path.read_text()

  class Full:

    def __init__(self, path):
      self.path = path

    def write(self, text):
      enospc()

  writer.files["train"] = Full(str(path))
  with pytest.raises(
      files.DiskFullError,
      match=rf"writing metrics to {re.escape(str(path))}; stopped here; the " r"lines before this record are on disk",
  ):
    writer.write({"step": 2, "loss": 1.0})
  writer.files.clear()
  writer.close()
  assert path.read_text() == before


def test_replace_directory_failing_midway_leaves_the_old_content(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "model.safetensors").write_bytes(b"old model")

  def half_written(d):
    open(os.path.join(d, "config.json"), "w").write("{}")
    enospc()

  with pytest.raises(files.DiskFullError, match=rf"writing --out to {re.escape(str(out))}"):
    files.replace_directory(str(out), half_written, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["model.safetensors"]
  assert (out / "model.safetensors").read_bytes() == b"old model"


# --------------------------------------------------------------------------------------- teacher server


class GatedEngine:
  """The real engine whose forward waits for `gate`; records every prompt it scores."""

  def __init__(self, engine):
    self.engine, self.gate, self.started, self.scored = engine, threading.Event(), threading.Event(), []

  def __getattr__(self, name):
    return getattr(self.engine, name)

  def score(self, prompts):
    self.started.set()
    assert self.gate.wait(30)
    self.scored.extend(prompts)
    return self.engine.score(prompts)


def test_server_cancels_the_queued_work_of_a_client_that_disconnects(engine):
  import aiohttp

  gated = GatedEngine(engine)
  url_of = lambda server: server.url + "/v1/completions"

  async def scenario(server):
    async with aiohttp.ClientSession() as session:
      first = asyncio.ensure_future(session.post(url_of(server), json={"prompt": [1, 2, 3], "prompt_logprobs": 1}))
      await asyncio.get_running_loop().run_in_executor(None, gated.started.wait, 30)  # its forward is running
      gone = [[4, 5, 6], [7, 8, 9, 10]]
      async with aiohttp.ClientSession() as other:  # a second client queues two prompts, then goes away
        leaving = asyncio.ensure_future(other.post(url_of(server), json={"prompt": gone, "prompt_logprobs": 1}))
        for _ in range(500):
          async with session.get(server.url + "/stats") as r:
            if (await r.json())["queued"] == 2:
              break
          await asyncio.sleep(0.01)
        leaving.cancel()
      for _ in range(500):
        async with session.get(server.url + "/stats") as r:
          stats = await r.json()
        if stats["cancelled"]:
          break
        await asyncio.sleep(0.01)
      gated.gate.set()
      async with await first as r:
        assert r.status == 200
      # A later request is answered at once: nothing of the gone client's is computed before it.
      async with session.post(url_of(server), json={"prompt": [11, 12], "prompt_logprobs": 1}) as r:
        assert r.status == 200
      return stats, gone

  with serve.ServerThread(serve.make_app(gated, "gated", batch_wait_s=0.0)) as server:
    stats, gone = asyncio.run(scenario(server))
  assert stats["cancelled"] == 2 and stats["queued"] == 0
  assert gated.scored == [[1, 2, 3], [11, 12]]  # the gone client's prompts never reached the forward
  assert not any(p in gated.scored for p in gone)


# ------------------------------------------------------------------------------- workdirs and exports


@pytest.fixture(scope="module")
def finished_run(task, tmp_path_factory):
  """A 2-step run (checkpoint at step 2, metrics, config.json, export) to rerun, resume and export from."""
  workdir = tmp_path_factory.mktemp("run") / "workdir"
  config = make_config(task, lmbda=0.0, total_steps=2)
  trainer.train(config, str(workdir))
  return workdir, config


def snapshot(directory):
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = open(path, "rb").read()
  return out


def test_workdir_that_is_a_file_fails_before_loading(task, tmp_path, monkeypatch):
  path = tmp_path / "workdir"
  path.write_text("notes")
  no_model_loads(monkeypatch)
  with pytest.raises(NotADirectoryError, match=rf"--workdir={re.escape(str(path))} is a file, not a directory"):
    trainer.train(make_config(task), str(path))
  with pytest.raises(NotADirectoryError, match=r"--workdir=.* is a file"):
    export.export(str(path), str(tmp_path / "out"))
  assert path.read_text() == "notes"


def test_rerun_with_a_changed_method_is_refused_before_loading(task, finished_run, monkeypatch):
  workdir, _ = finished_run
  before = snapshot(workdir)
  no_model_loads(monkeypatch)
  changed = make_config(task, lmbda=0.0, total_steps=2, beta=0.9, learning_rate=2e-3)
  message = (
      rf"cannot resume the run in {re.escape(str(workdir))} with a changed method: beta: 0.5 → 0.9; "
      r"learning_rate: 0.001 → 0.002 \(saved config.json → this config\). Restore those values, use a new "
      r"workdir, or set allow_config_change=True"
  )
  with pytest.raises(ValueError, match=message):
    trainer.train(changed, str(workdir))
  with pytest.raises(ValueError, match=message):  # also when the run is started from a built setup
    config_lib.write_run_config(str(workdir), changed, resume.FINGERPRINT_FIELDS)
  with pytest.raises(ValueError, match=r"with seed: 0 → 1: these fields fix the checkpoint's state or the data order"):
    trainer.train(make_config(task, lmbda=0.0, total_steps=2, seed=1, allow_config_change=True), str(workdir))
  assert snapshot(workdir) == before  # config.json, checkpoints, metrics and export untouched


def test_allow_config_change_accepts_and_keeps_the_old_config(task, finished_run, tmp_path, caplog):
  workdir = tmp_path / "workdir"
  shutil.copytree(finished_run[0], workdir)
  old = (workdir / "config.json").read_text()
  changed = make_config(task, lmbda=0.0, total_steps=2, beta=0.9, allow_config_change=True)
  with caplog.at_level(logging.WARNING, logger="gkd_jax.config"):
    changes = config_lib.write_run_config(str(workdir), changed, resume.FINGERPRINT_FIELDS)
  assert changes == {"allow_config_change": (False, True), "beta": (0.5, 0.9)}
  assert "resuming the run in" in caplog.text and "beta: 0.5 → 0.9" in caplog.text
  assert json.loads((workdir / "config.json").read_text())["beta"] == 0.9
  (kept,) = [p for p in os.listdir(workdir) if p.startswith("config.replaced-")]
  assert (workdir / kept).read_text() == old


def test_rerun_with_safe_changes_resumes_and_tolerates_a_partial_metrics_line(task, finished_run, tmp_path, caplog):
  workdir = tmp_path / "workdir"
  shutil.copytree(finished_run[0], workdir)
  metrics = workdir / "metrics.jsonl"
  logged = metrics.read_text()
  metrics.write_text(logged + '{"step": 3, "loss": 0.1')  # a crash mid-write after the last checkpoint
  config = make_config(task, lmbda=0.0, total_steps=3, log_every=1)
  with caplog.at_level(logging.WARNING):
    trainer.train(config, str(workdir))
  assert "log_every: 2 → 1; total_steps: 2 → 3 (the learning-rate schedule now spans the new total)" in caplog.text
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3] and metrics.read_text().startswith(logged)
  assert (workdir / "metrics.jsonl.dropped").read_text() == '{"step": 3, "loss": 0.1\n'
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 3
  with checkpoints.Checkpointer(workdir / "checkpoints") as ckpt:
    assert ckpt.all_steps() == [2, 3]


def test_export_refuses_a_file_or_another_model_and_replaces_whole_with_overwrite(finished_run, tmp_path, monkeypatch):
  workdir, _ = finished_run
  as_file = tmp_path / "model.bin"
  as_file.write_bytes(b"x")
  other = tmp_path / "other"
  other.mkdir()
  (other / "model.safetensors").write_bytes(b"another model")
  (other / "notes.txt").write_text("keep me")
  with monkeypatch.context() as m:
    no_model_loads(m)
    with pytest.raises(NotADirectoryError, match=rf"--out={re.escape(str(as_file))} is a file, not a directory"):
      export.main(["--workdir", str(workdir), "--out", str(as_file)])
    with pytest.raises(
        FileExistsError,
        match=rf"--out={re.escape(str(other))} already holds files \(model.safetensors, "
        r"notes.txt\); pass overwrite \(--overwrite\) to replace them",
    ):
      export.main(["--workdir", str(workdir), "--out", str(other)])
  assert as_file.read_bytes() == b"x" and snapshot(other) == {
      "model.safetensors": b"another model",
      "notes.txt": b"keep me",
  }
  export.main(["--workdir", str(workdir), "--out", str(other), "--overwrite"])
  assert snapshot(other) == snapshot(workdir / "export")  # exactly the run's model: nothing of the old one left
  assert sorted(os.listdir(tmp_path)) == ["model.bin", "other"]  # no temporaries left beside


def test_export_refuses_an_out_that_is_in_or_holds_a_workdir_or_a_model(task, finished_run, tmp_path, monkeypatch):
  """--out colliding with a run (the --workdir given, or any workdir with checkpoints) or a model the run reads
  is refused before anything loads, even with --overwrite, naming --out, the directory and why."""
  workdir, _ = finished_run
  other = tmp_path / "other-run"
  shutil.copytree(workdir, other)  # another run's workdir, with checkpoints
  (tmp_path / "link").symlink_to(workdir)
  before, models_before = snapshot(workdir), snapshot(task["student"])
  wd = re.escape(str(workdir))
  cases = [
      (workdir, rf"is the workdir {wd} \(the --workdir given\)"),
      (tmp_path / "link", rf"is the workdir {wd} \(the --workdir given\)"),  # the same directory, by a symlink
      (workdir / "export", rf"lies inside the workdir {wd} \(the --workdir given\)"),
      (workdir / "checkpoints", rf"lies inside the workdir {wd} \(the --workdir given\)"),
      (workdir.parent, rf"contains the workdir {wd} \(the --workdir given\)"),
      (other / "hf", rf"lies inside the workdir {re.escape(str(other))} \(it holds a run's checkpoints\)"),
      (tmp_path, rf"contains the workdir {re.escape(str(other))} \(it holds a run's checkpoints\)"),
      (task["student"], rf"is the model directory {re.escape(task['student'])} \(config.model of this run\)"),
      (
          os.path.join(task["teacher"], "sub"),
          r"lies inside the model directory .*teacher \(config.teacher_model of this run\)",
      ),
  ]
  no_model_loads(monkeypatch)
  for out, where in cases:
    with pytest.raises(ValueError, match=rf"^--out={re.escape(str(out))} {where}: an export there would replace "):
      export.main(["--workdir", str(workdir), "--out", str(out), "--overwrite"])
  assert snapshot(workdir) == before and snapshot(task["student"]) == models_before
  assert sorted(os.listdir(tmp_path)) == ["link", "other-run"]


def test_paths_compare_normalized():
  from gkd_jax import storage

  assert storage.normalize("GS://bkt//run/./a/../") == "gs://bkt/run" == storage.normalize("gcs://bkt/run/")
  assert storage.within("gs://bkt/run/export", "gs://bkt/run/") and storage.within("gs://bkt/run", "gs://bkt//run")
  assert not storage.within("gs://bkt/run2", "gs://bkt/run") and not storage.within("/bkt/run", "gs://bkt/run")
  assert storage.parents("gs://bkt/a/b") == ["gs://bkt/a", "gs://bkt"]
  assert storage.within("/tmp/../tmp/x", "/tmp") and not storage.within("/tmpx", "/tmp")
