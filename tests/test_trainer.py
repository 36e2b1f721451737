"""The training loop end to end on the offline arithmetic task with tiny HF checkpoints built here."""

import json
import os

import jax

import numpy as np
import pytest
import torch
import transformers

from gkd_jax import config as config_lib
from gkd_jax import resume, rollout, sampling, sharding, trainer
from gkd_jax.tasks import arithmetic
import tiny_runs


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  root = tmp_path_factory.mktemp("gkd_trainer")
  paths = arithmetic.make_task(str(root / "task"), seed=0, num_train=64, num_test=8)
  tok = transformers.AutoTokenizer.from_pretrained(paths["tokenizer"])
  checkpoints = {}
  # One layer each: every test here compiles its own train step and samplers (most of its time), and the layer
  # stack itself is covered by test_models.
  for name, (hidden, vocab) in {"student": (32, len(tok)), "teacher": (48, len(tok) + 3)}.items():
    torch.manual_seed(len(name))
    cfg = tiny_runs.qwen2_config(tok, hidden, vocab, tied=name == "student")
    path = str(root / name)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    checkpoints[name] = path
  # A teacher over exactly the tokenizer's vocabulary, sharper than a random init, for the server test.
  torch.manual_seed(3)
  cfg = tiny_runs.qwen2_config(tok, 48, len(tok), tied=False)
  sharp = transformers.Qwen2ForCausalLM(cfg)
  with torch.no_grad():
    sharp.lm_head.weight.mul_(20.0)
  sharp.save_pretrained(root / "sharp_teacher")
  tok.save_pretrained(root / "sharp_teacher")
  checkpoints["sharp_teacher"] = str(root / "sharp_teacher")
  return dict(paths, **checkpoints, root=root)


def make_config(task, **overrides):
  c = config_lib.base_config()
  c.model, c.teacher_model, c.dataset = task["student"], task["teacher"], task["data"]
  c.batch_size, c.total_steps, c.learning_rate, c.log_every = 4, 6, 1e-3, 2
  c.peak_flops = 1e11  # skip measuring the matmul ceiling in every test
  c.max_length, c.max_prompt_length, c.max_completion_length = 96, 32, 24
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2  # the 8 virtual CPU devices
  for k, v in overrides.items():
    c[k] = v
  config_lib.validate(c)
  return c


def test_train_runs_the_three_modes(task, tmp_path):
  config = make_config(
      task,
      lmbda=0.5,
      seq_kd=True,
      sft_alpha=0.1,
      sample_every=1,
      eval_split="test",
      eval_metric="arithmetic",
      eval_rows=8,
      eval_batch_size=4,
      eval_max_new_tokens=24,
      eval_every=3,
  )
  final = trainer.train(config, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == list(range(1, 7))
  expected = [rollout.mode_for_step(0, s, 0.5, True) for s in range(6)]
  assert [r["mode"] for r in records] == expected
  assert set(expected) == {"on_policy", "seq_kd"}
  for r in records:
    assert np.isfinite(r["loss"]) and r["tokens"] > 0
    if r["mode"] == "on_policy":  # sft_alpha applies only to sequences the student did not generate
      assert r["loss"] == pytest.approx(r["distill_loss"], rel=1e-6)
    else:
      assert r["loss"] == pytest.approx(r["distill_loss"] + 0.1 * r["sft_loss"], rel=1e-5)
  assert final["step"] == 6
  for r in records:  # throughput: measured times, FLOP-based split and MFU
    assert r["step_s"] >= r["generation_s"] >= 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    assert (r["generation_s"] > 0) == (r["mode"] != "dataset")
  samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
  assert len(samples) == 2 * 6 and all("Add" in s["prompt"] for s in samples)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
  # Held-out evaluation at steps 3 and 6: teacher-forced divergences and NLL, generation accuracy of the
  # student each time and of the teacher once (cached).
  evals = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
  assert [e["step"] for e in evals] == [3, 6]
  for e in evals:
    assert e["tokens"] > 0 and e["forward_kl"] > 0 and e["reverse_kl"] > 0 and e["nll"] > 0
    assert 0 <= e["student_accuracy"] <= 1 and 0 <= e["teacher_chain_accuracy"] <= 1
  assert json.load(open(tmp_path / "teacher_eval.json"))["accuracy"] == evals[0]["teacher_accuracy"]
  # --mode=eval on the finished run reproduces the final evaluation.
  from gkd_jax import main as gkd_main

  again = gkd_main.run(config, str(tmp_path), mode="eval")
  assert again["step"] == 6
  for name in ("forward_kl", "nll", "distill_loss", "student_accuracy"):
    assert again[name] == pytest.approx(evals[-1][name], rel=1e-5), name


def test_on_policy_batch_masks_exactly_the_generated_tokens(task):
  setup, state = trainer.build(make_config(task, lmbda=1.0, temperature=1.0))
  batch, mode, _ = rollout.prepare_batch(setup, state, step=0)
  assert mode == "on_policy" and bool(batch["student_generated"])
  ids, mask = batch["completion_ids"], batch["completion_mask"]
  assert ids.shape == (4, 24)
  np.testing.assert_array_equal(mask, np.asarray(sampling.completion_mask_from_stops(ids, setup.stop_ids)))
  # Different steps sample differently (the key folds in the step).
  again, _, _ = rollout.prepare_batch(setup, state, step=1)
  assert not np.array_equal(again["completion_ids"], ids) or not np.array_equal(
      again["prompt_ids"], batch["prompt_ids"]
  )


def test_off_policy_step_on_prompt_only_rows_fails_clearly(task, tmp_path):
  rows = arithmetic.prompt_only(arithmetic.load_task(str(task["root"] / "task"))["train"])
  path = str(tmp_path / "prompts.jsonl")
  rows.to_json(path)
  # Off-policy steps can happen (lmbda < 1, no seq_kd): caught at start-up, naming the row and column.
  with pytest.raises(ValueError, match=r"row 0, column 'messages': no completion, but this run needs dataset"):
    trainer.build(make_config(task, dataset=path, lmbda=0.5))
  # lmbda=1 trains on prompts alone.
  setup, state = trainer.build(make_config(task, dataset=path, lmbda=1.0))
  batch, mode, _ = rollout.prepare_batch(setup, state, step=0)
  assert mode == "on_policy" and batch["completion_mask"].any()


def test_mode_draws_follow_lambda_and_survive_restarts():
  for lmbda in (0.0, 0.5, 1.0):
    draws = [rollout.mode_for_step(3, s, lmbda, False) for s in range(2000)]
    assert draws == [rollout.mode_for_step(3, s, lmbda, False) for s in range(2000)]  # a restart redraws the same
    assert abs(draws.count("on_policy") / 2000 - lmbda) < 0.03
    assert set(draws) <= {"on_policy", "dataset"}
  with_seq_kd = [rollout.mode_for_step(3, s, 0.5, True) for s in range(200)]
  assert set(with_seq_kd) == {"on_policy", "seq_kd"}  # seq_kd replaces the dataset on off-policy steps


def test_different_tokenizers_are_an_error(task, tmp_path):
  tok = transformers.AutoTokenizer.from_pretrained(task["tokenizer"])
  tok.add_tokens(["<extra>"])
  other = tmp_path / "teacher"
  transformers.Qwen2ForCausalLM.from_pretrained(task["teacher"]).save_pretrained(other)
  tok.save_pretrained(other)
  with pytest.raises(ValueError, match=r"different tokenizer \(30 tokens\) than the student \(29 tokens\)"):
    trainer.build(make_config(task, teacher_model=str(other)))


def test_offloaded_teacher_stays_in_host_memory_and_changes_nothing(task, tmp_path):
  results = {}
  for offload in (False, True):
    setup, state = trainer.build(make_config(task, lmbda=0.0, offload_teacher_model=offload, total_steps=2))
    state, results[offload] = trainer.run(setup, state, str(tmp_path / str(offload)))
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.teacher_params)}
    assert kinds == ({"pinned_host"} if offload else {"device"})
  assert results[True]["loss"] == pytest.approx(results[False]["loss"], rel=1e-6)


def test_lora_trains_only_the_adapters(task, tmp_path):
  setup, state = trainer.build(make_config(task, lmbda=0.5, lora_rank=4, lora_target_modules="q,v,up", total_steps=3))
  base_before = jax.tree.map(np.asarray, state.base_params)
  adapters_before = jax.tree.map(np.asarray, state.params)
  state, record = trainer.run(setup, state, str(tmp_path))
  assert np.isfinite(record["loss"])
  for x, y in zip(jax.tree.leaves(state.base_params), jax.tree.leaves(base_before)):
    np.testing.assert_array_equal(np.asarray(x), y)
  keys = {".".join(map(str, path)) for path, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  assert keys and all(any(f".{m}." in k for m in ("q", "v", "up")) for k in keys)
  assert any(
      not np.array_equal(np.asarray(x), y)
      for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(adapters_before))
  )

  # The run exported the merged student; transformers reads it and computes the same logits, and the
  # export CLI rebuilds the same model from the workdir's checkpoint.
  from gkd_jax import export
  from gkd_jax.models import from_pretrained

  ids = np.array([[1, 9, 12, 7, 5, 2, 30 % 29]])
  torch_logits = (
      transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export")(torch.from_numpy(ids))
      .logits.detach()
      .numpy()
  )
  ours = np.asarray(setup.student(ids).logits)
  np.testing.assert_allclose(torch_logits, ours, atol=1e-4)
  again = export.export(str(tmp_path), str(tmp_path.parent / f"{tmp_path.name}-again"))  # not inside the workdir
  np.testing.assert_allclose(np.asarray(from_pretrained(again)(ids).logits), ours, atol=1e-5)


def write_config(task, path, mesh=(2, 2, 2), **overrides):
  c = make_config(task, **overrides)
  fields = {
      k: c[k]
      for k in (
          "model",
          "teacher_model",
          "dataset",
          "batch_size",
          "total_steps",
          "learning_rate",
          "log_every",
          "max_length",
          "max_prompt_length",
          "max_completion_length",
          "lmbda",
          "seq_kd",
          "save_every",
          "peak_flops",
          "sample_every",
      )
  }
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  fields["mesh"] = c.mesh.to_dict()
  path.write_text(tiny_runs.CONFIG_FILE.format(overrides=json.dumps(fields)))
  return str(path)


def losses_by_step(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))}


def test_killed_run_resumes_bitwise_identically(task, tmp_path):
  """A run killed (SIGKILL) after its step-4 checkpoint, then restarted, logs exactly the losses of an
  uninterrupted run — the real CLI in subprocesses, as on a preempted machine."""
  import os
  import signal
  import subprocess
  import sys
  import time

  config = write_config(task, tmp_path / "cfg.py", total_steps=7, save_every=2, lmbda=0.5, seq_kd=True)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cmd = lambda workdir: [sys.executable, "-m", "gkd_jax.main", f"--config={config}", f"--workdir={workdir}"]
  full = tmp_path / "full"
  subprocess.run(cmd(full), env=env, check=True, capture_output=True, timeout=600)

  killed = tmp_path / "killed"
  proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not (killed / "checkpoints" / "4").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert (killed / "checkpoints" / "4").exists()
  subprocess.run(cmd(killed), env=env, check=True, capture_output=True, timeout=600)

  want, got = losses_by_step(full), losses_by_step(killed)
  assert sorted(got) == list(range(1, 8))
  assert got == want  # bitwise: the same floats


def signal_after_the_first_step(cmd, env, workdir, sig) -> tuple[int, str]:
  """Starts the CLI `cmd`, sends `sig` once its first step is logged; returns (exit status, stderr)."""
  import subprocess
  import time

  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while (
      (not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text().strip())
      and proc.poll() is None
      and time.time() < deadline
  ):
    time.sleep(0.02)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=600)
  return proc.returncode, err.decode()


def test_sigterm_saves_exits_75_and_the_rerun_resumes_bitwise(task, tmp_path):
  """SIGTERM (a preempted spot VM): the run saves at the step it reached and exits with status 75, "rerun
  me"; rerunning the same command resumes there and logs exactly the losses of an uninterrupted run."""
  import os
  import signal
  import subprocess
  import sys
  from gkd_jax import checkpoints

  config = write_config(task, tmp_path / "cfg.py", total_steps=50, save_every=1000, lmbda=0.0)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cmd = lambda workdir: [sys.executable, "-m", "gkd_jax.main", f"--config={config}", f"--workdir={workdir}"]
  subprocess.run(cmd(tmp_path / "full"), env=env, check=True, capture_output=True, timeout=600)
  workdir = tmp_path / "run"
  code, err = signal_after_the_first_step(cmd(workdir), env, workdir, signal.SIGTERM)
  assert code == checkpoints.PREEMPTED_EXIT_CODE == 75, err[-2000:]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  logged = max(losses_by_step(workdir))
  assert steps == [logged] and 0 < logged < 50  # saved off-interval at the step it stopped
  assert f"preempted: saved step {logged}" in err and "rerun the same command" in err
  subprocess.run(cmd(workdir), env=env, check=True, capture_output=True, timeout=600)
  assert losses_by_step(workdir) == losses_by_step(tmp_path / "full")  # bitwise, every step once


def test_ctrl_c_saves_exits_130_says_where_to_resume_and_the_rerun_resumes(task, tmp_path):
  """One Ctrl-C (SIGINT): the run saves at the step it reached, releases the workdir, prints where it can resume
  and exits with status 130; rerunning the same command continues from there."""
  import os
  import signal
  import subprocess
  import sys

  config = write_config(task, tmp_path / "cfg.py", total_steps=30, save_every=1000, lmbda=0.0)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "gkd_jax.main", f"--config={config}", f"--workdir={workdir}"]
  code, err = signal_after_the_first_step(cmd, env, workdir, signal.SIGINT)
  assert code == 130, err[-2000:]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  logged = max(losses_by_step(workdir))
  assert steps == [logged] and 0 < logged < 30
  assert f"interrupted: saved step {logged} in {workdir}; rerun the same command to resume" in err
  assert not (workdir / ".lock").exists()
  subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
  assert sorted(losses_by_step(workdir)) == list(range(1, 31))


def test_teacher_server_matches_the_local_topk_teacher(task, tmp_path):
  """The same teacher served over HTTP (top-k log-probs) or loaded locally (top-k of its logits) gives the
  same losses; dataset steps prefetch the next step's request while the current one trains."""
  from gkd_jax import serve

  engine = serve.build_engine(
      task["sharp_teacher"], dtype="float32", tokenizer=None, max_logprobs=8, max_seq_len=128, max_batch_size=8
  )
  with serve.ServerThread(serve.make_app(engine, "teacher")) as server:
    remote = make_config(
        task, teacher_model=None, teacher_model_server=server.url, gkd_logits_topk=4, lmbda=0.0, total_steps=3
    )
    _, got = trainer.run(*trainer.build(remote), str(tmp_path / "remote"))
    local = make_config(task, teacher_model=task["sharp_teacher"], gkd_logits_topk=4, lmbda=0.0, total_steps=3)
    _, want = trainer.run(*trainer.build(local), str(tmp_path / "local"))
  remote_losses, local_losses = losses_by_step(tmp_path / "remote"), losses_by_step(tmp_path / "local")
  assert sorted(remote_losses) == [1, 2, 3]
  assert remote_losses[1] > 0.05  # a real signal, not a student matching itself
  for step in remote_losses:
    assert remote_losses[step] == pytest.approx(local_losses[step], rel=1e-5)
  assert got["top1_agreement"] == pytest.approx(want["top1_agreement"])


def test_teacher_server_lost_mid_run_stops_with_the_checkpoint_intact(task, tmp_path):
  import threading
  import time
  from gkd_jax import checkpoints, serve
  from gkd_jax.teacher_client import TeacherServerError

  engine = serve.build_engine(
      task["sharp_teacher"], dtype="float32", tokenizer=None, max_logprobs=8, max_seq_len=128, max_batch_size=8
  )
  server = serve.ServerThread(serve.make_app(engine, "teacher")).start()
  config = make_config(
      task,
      teacher_model=None,
      teacher_model_server=server.url,
      gkd_logits_topk=4,
      lmbda=0.0,
      total_steps=40,
      save_every=2,
  )
  setup, state = trainer.build(config)
  setup.teacher_client.backoff = 0.05

  def stop_after_first_checkpoint():
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "2").exists() and time.time() < deadline:
      time.sleep(0.05)
    server.stop()

  threading.Thread(target=stop_after_first_checkpoint, daemon=True).start()
  with pytest.raises(TeacherServerError, match=r"teacher server http://127\.0\.0\.1:\d+"):
    trainer.run(setup, state, str(tmp_path))
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
  last = ckpt.latest_step()
  assert last is not None and last % 2 == 0 and last < 40
  state, extra = ckpt.restore(resume.abstract_state(state), fingerprint=resume.fingerprint(config))
  assert int(state.step) == last and extra["data"]["step"] == last
  ckpt.close()


# ------------------------------------------------------------------------------------ on-device batches


def host_round_trip_batch(setup, state, step):
  """The batch as the trainer built it before batches stayed on device: the sampled completions gathered to
  every host (process_allgather), this host's rows cut out, masked on the host, then made global again."""
  from jax.experimental import multihost_utils

  host = setup.loader.batch(step)
  mode = rollout.step_mode(setup.config, step)
  glob = lambda x: rollout.to_global(setup.batch_sharding, x)
  if mode != "dataset":
    prompts = {k: glob(v) for k, v in host.items() if k.startswith(("prompt_", "teacher_prompt_"))}
    ids, mask = rollout.sample_completions(setup, state, mode, prompts, step)
    lo, b = jax.process_index() * setup.loader.local_batch_size, setup.loader.local_batch_size
    host["completion_ids"] = np.asarray(multihost_utils.process_allgather(ids, tiled=True))[lo : lo + b]
    host["completion_mask"] = np.asarray(multihost_utils.process_allgather(mask, tiled=True))[lo : lo + b]
  host["completion_mask"] = host["completion_mask"] & host["row_mask"][:, None]
  host["student_generated"] = np.array(mode == "on_policy")
  return {k: glob(v) for k, v in rollout.model_inputs(setup, host).items()}, mode


@pytest.fixture(scope="module")
def mixed_setup(task):
  """(setup, initial state): lmbda 0.5 with seq_kd on a (data 2, fsdp 2, tensor 2) mesh: steps 0-3 are seq_kd,
  seq_kd, on_policy, seq_kd."""
  return trainer.build(make_config(task, lmbda=0.5, seq_kd=True, sft_alpha=0.1))


def test_sampled_batches_stay_on_device_with_bitwise_equal_losses(mixed_setup, monkeypatch):
  """Sampled completions go from the sampler into the train step as global arrays: the per-step metrics are
  bitwise those of the old host round trip, and the new path neither gathers nor copies anything to the host."""
  from jax._src.array import ArrayImpl as array_impl
  from jax.experimental import multihost_utils

  (setup, state0), steps = mixed_setup, 4
  modes = [rollout.step_mode(setup.config, s) for s in range(steps)]
  assert set(modes) == {"on_policy", "seq_kd"}
  initial = jax.tree.map(lambda x: x.copy(), state0)  # each path trains its own copy (the step donates)
  records = {}
  for path in ("round_trip", "on_device"):
    state, records[path] = jax.tree.map(lambda x: x.copy(), initial), []
    for step in range(steps):
      if path == "round_trip":
        batch, mode = host_round_trip_batch(setup, state, step)
      else:
        # No gather, and no device → host copy: the transfer guard catches any on accelerators; on CPU, where it
        # does not fire (and np.asarray is a zero-copy view), reads through _value (device_get, float, item) fail.
        with monkeypatch.context() as m, jax.transfer_guard_device_to_host("disallow_explicit"):
          m.setattr(multihost_utils, "process_allgather", lambda *a, **k: pytest.fail("process_allgather called"))
          m.setattr(array_impl, "_value", property(lambda self: pytest.fail(f"host copy of a {self.shape} array")))
          batch, mode, gen = rollout.prepare_batch(setup, state, step)
          for k in ("completion_ids", "completion_mask"):  # the train step's layout, nothing to move
            assert batch[k].sharding.is_equivalent_to(setup.batch_sharding, 2), k
        assert gen.result() > 0
        assert batch["completion_ids"].shape == (setup.config.batch_size, setup.config.max_completion_length)
      state, metrics = setup.train_step(state, batch)
      records[path].append((mode, jax.device_get(metrics)))
  assert [m for m, _ in records["on_device"]] == modes
  for (mode, want), (_, got) in zip(records["round_trip"], records["on_device"]):
    assert want.keys() == got.keys()
    for name in want:
      assert np.asarray(got[name]).tobytes() == np.asarray(want[name]).tobytes(), (mode, name, got[name], want[name])


def test_host_rows_are_this_hosts_rows_in_order(mixed_setup):
  """host_rows inverts to_global over the batch sharding (rows replicated over tensor fetched once), and with
  `limit` reads only the leading shards."""
  setup, _ = mixed_setup
  local = np.arange(4 * 6, dtype=np.int32).reshape(4, 6)
  x = rollout.to_global(setup.batch_sharding, local)
  assert len(x.addressable_shards) == 8  # 4 row blocks, each on 2 tensor replicas
  np.testing.assert_array_equal(sharding.host_rows(x), local)
  np.testing.assert_array_equal(sharding.host_rows(x, limit=3), local[:3])
  np.testing.assert_array_equal(sharding.host_rows(local, limit=2), local[:2])


def test_teacher_server_request_gets_this_hosts_sampled_rows(mixed_setup):
  """On generating steps the teacher server's request is built from the completions' addressable rows (the
  loader's prompts, the sampled completions), and its answer joins the global batch."""
  import concurrent.futures
  import dataclasses

  class Client:

    def submit(self, ids, mask):
      self.sent = (ids, mask)
      future = concurrent.futures.Future()
      future.set_result((np.ones(ids.shape + (2,), np.float32), np.zeros(ids.shape + (2,), np.int32)))
      return future

  client = Client()
  setup, state = mixed_setup
  source = rollout.BatchSource(dataclasses.replace(setup, teacher_client=client))
  for step in (0, 2):  # seq_kd, on_policy
    batch, mode, _ = source.get(step, state)
    assert mode != "dataset"
    row = lambda k: np.asarray(batch[k])  # one process: all rows are this host's
    np.testing.assert_array_equal(client.sent[0], np.concatenate([row("prompt_ids"), row("completion_ids")], 1))
    np.testing.assert_array_equal(client.sent[1], np.concatenate([row("prompt_mask"), row("completion_mask")], 1))
    assert batch["teacher_topk_values"].shape == batch["completion_ids"].shape + (2,)
    assert batch["teacher_topk_values"].sharding.is_equivalent_to(setup.batch_sharding, 3)
