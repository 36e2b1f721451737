"""gkd_jax.storage and the writers above it on gs:// URLs, against the local emulator (tests/gcs_emulator.py,
127.0.0.1 only), and the same calls on local paths."""

import json
import os

import fsspec
import pytest

import gcs_emulator
from gkd_jax import config as config_lib
from gkd_jax import files, metrics, storage


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  with gcs_emulator.Emulator(str(tmp_path_factory.mktemp("gcs"))) as emu:
    emu.create_bucket("bkt")
    yield emu


@pytest.fixture
def gs(emulator, monkeypatch, tmp_path):
  """A fresh gs:// prefix with this process's clients pointed at the emulator."""
  for k, v in gcs_emulator.client_env(emulator.url).items():
    monkeypatch.setenv(k, v)
  monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
  monkeypatch.setenv("GKD_JAX_CACHE", str(tmp_path / "cache"))
  import gcsfs

  gcsfs.GCSFileSystem.clear_instance_cache()
  yield f"gs://bkt/{tmp_path.name}"
  gcsfs.GCSFileSystem.clear_instance_cache()


def test_paths_files_and_listing(gs, tmp_path):
  for base in (gs, str(tmp_path / "local")):
    storage.makedirs(base)
    assert storage.join(base, "a", "b.txt") == (f"{gs}/a/b.txt" if base == gs else os.path.join(base, "a", "b.txt"))
    storage.makedirs(storage.join(base, "a"))
    storage.write_text(storage.join(base, "a", "b.txt"), "one")
    storage.write_text(storage.join(base, "a", "b.txt"), "two")  # replaced whole
    assert storage.read_text(storage.join(base, "a", "b.txt")) == "two"
    assert storage.exists(storage.join(base, "a", "b.txt")) and storage.isfile(storage.join(base, "a", "b.txt"))
    assert storage.isdir(storage.join(base, "a")) and not storage.exists(storage.join(base, "nope"))
    assert storage.listdir(storage.join(base, "a")) == ["b.txt"] and storage.listdir(storage.join(base, "nope")) == []
    storage.remove(storage.join(base, "a", "b.txt"))
    assert not storage.exists(storage.join(base, "a", "b.txt"))
  assert not storage.is_url("/tmp/x") and not storage.is_url("Qwen/Qwen2.5-0.5B") and storage.is_url(gs)


def test_json_lines_on_a_bucket_are_rewritten_whole_at_flush(gs):
  path = f"{gs}/metrics.jsonl"
  log = storage.JsonLines(path, min_interval=3600)
  log.write(json.dumps({"step": 1}))
  assert not storage.exists(path)  # buffered: objects cannot be appended to
  log.flush()
  log.write(json.dumps({"step": 2}))
  assert storage.read_text(path) == '{"step": 1}\n'
  log.close()
  assert storage.read_text(path) == '{"step": 1}\n{"step": 2}\n'


def test_metrics_writer_on_a_bucket_resumes_dropping_later_records(gs):
  writer = metrics.MetricsWriter(gs)
  for step in (1, 2, 3):
    writer.write({"step": step, "loss": 1.0 / step})
  writer.write({"step": 2, "accuracy": 0.5}, prefix="eval")
  writer.close()
  names = storage.listdir(gs)
  assert {"metrics.jsonl", "eval.jsonl", "tensorboard"} <= set(names)
  assert storage.listdir(f"{gs}/tensorboard")[0].startswith("events.out.tfevents")
  again = metrics.MetricsWriter(gs, resumed_step=2)  # the run restarts from its step-2 checkpoint
  again.write({"step": 3, "loss": 0.25})
  again.close()
  steps = [json.loads(l)["step"] for l in storage.read_text(f"{gs}/metrics.jsonl").splitlines()]
  assert steps == [1, 2, 3]


def test_run_config_and_checkpoint_detection_on_a_bucket(gs):
  c = config_lib.base_config()
  c.model, c.dataset = "m", "d"
  config_lib.write_run_config(gs, c)
  assert json.loads(storage.read_text(f"{gs}/config.json"))["model"] == "m"
  assert not config_lib.has_checkpoints(gs)
  storage.write_text(f"{gs}/checkpoints/2/state/x", "partial")  # a save that never committed
  assert not config_lib.has_checkpoints(gs)
  storage.write_text(f"{gs}/checkpoints/2/commit_success.txt", "")
  assert config_lib.has_checkpoints(gs)


def test_export_directory_replaced_with_config_json_last(gs, monkeypatch):
  out = f"{gs}/export"

  def model(text):
    def write(d):
      for name in ("model.safetensors", "config.json", "tokenizer.json"):
        with open(os.path.join(d, name), "w") as f:
          f.write(f"{text} {name}")

    return write

  files.replace_directory(out, model("old"), overwrite=False)
  with pytest.raises(FileExistsError, match=rf"{out} already holds files"):
    files.replace_directory(out, model("new"), overwrite=False)
  uploads = []
  real = storage.upload
  monkeypatch.setattr(storage, "upload", lambda local, url: (uploads.append(url), real(local, url)))
  files.replace_directory(out, model("new"), overwrite=True)
  assert uploads[-1] == f"{out}/config.json"  # the commit marker goes last
  assert storage.listdir(out) == ["config.json", "model.safetensors", "tokenizer.json"]
  assert storage.read_text(f"{out}/model.safetensors") == "new model.safetensors"
  # A write that fails midway leaves no config.json: loaders refuse the directory rather than read a mix.
  calls = []

  def failing(local, url):
    calls.append(url)
    if len(calls) == 2:
      raise storage.StorageError(f"could not write {url}: gone")
    real(local, url)

  monkeypatch.setattr(storage, "upload", failing)
  with pytest.raises(storage.StorageError, match="gone"):
    files.replace_directory(out, model("newer"), overwrite=True)
  assert "config.json" not in storage.listdir(out)
  from gkd_jax.models import hf_io

  with pytest.raises(FileNotFoundError, match=r"holds no config.json"):
    hf_io._resolve(out)
  # A tokenizer alone needs no config.json.
  storage.write_text(f"{gs}/tok/tokenizer_config.json", "{}")
  assert os.path.exists(os.path.join(hf_io._resolve(f"{gs}/tok", model=False), "tokenizer_config.json"))


def test_local_copy_downloads_once_and_again_when_the_object_changes(gs, tmp_path):
  storage.write_text(f"{gs}/data/train-0.jsonl", '{"a": 1}\n')
  storage.write_text(f"{gs}/data/train-1.jsonl", '{"a": 2}\n')
  storage.write_text(f"{gs}/data/test.jsonl", '{"a": 3}\n')
  one = storage.local_copy(f"{gs}/data/test.jsonl")
  assert open(one).read() == '{"a": 3}\n' and storage.local_copy(f"{gs}/data/test.jsonl") == one
  pattern = storage.local_copy(f"{gs}/data/train-*.jsonl")
  import glob

  assert [open(p).read() for p in sorted(glob.glob(pattern))] == ['{"a": 1}\n', '{"a": 2}\n']
  directory = storage.local_copy(f"{gs}/data")
  assert sorted(os.listdir(directory)) == ["test.jsonl", "train-0.jsonl", "train-1.jsonl"]
  storage.write_text(f"{gs}/data/test.jsonl", '{"a": 4}\n')  # a new version of the object
  assert open(storage.local_copy(f"{gs}/data/test.jsonl")).read() == '{"a": 4}\n'
  with pytest.raises(FileNotFoundError, match=rf"{gs}/nothing does not exist"):
    storage.local_copy(f"{gs}/nothing")
  assert storage.local_copy(str(tmp_path)) == str(tmp_path)  # local paths pass through


def test_a_failing_client_is_one_error_naming_the_url(monkeypatch):
  """Client errors (here a refused connection) become one StorageError naming the URL; a missing object
  stays FileNotFoundError. (The emulator really going away mid-run: tests/test_gcs.py's test (d).)"""

  class Refusing:

    def invalidate_cache(self, path=None):
      pass

    def pipe_file(self, path, data):
      raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")

    def cat_file(self, path):
      raise FileNotFoundError(path)

  monkeypatch.setattr(storage, "_fs_uncached", lambda url: (Refusing(), url.split("://")[1]))
  with pytest.raises(storage.StorageError, match=r"^could not write gs://bkt/x/config.json: ConnectionRefusedError"):
    storage.write_text("gs://bkt/x/config.json", "{}")
  with pytest.raises(FileNotFoundError):
    storage.read_text("gs://bkt/x/config.json")


def test_workdir_lock_on_a_bucket(gs, caplog):
  import socket
  import subprocess

  from gkd_jax import workdir_lock

  lock = workdir_lock.acquire(gs)
  assert json.loads(storage.read_text(f"{gs}/.lock"))["pid"] == os.getpid()
  with pytest.raises(workdir_lock.WorkdirLocked, match=rf"--workdir={gs} is in use by another run: host "):
    workdir_lock.acquire(gs)  # created only if absent: the second taker finds it
  lock.release()
  assert not storage.exists(f"{gs}/.lock")

  proc = subprocess.Popen(["true"])
  proc.wait()
  here = {"host": socket.gethostname(), "pid": proc.pid, "start_time": "2020-01-01T00:00:00+0000", "token": "x"}
  storage.write_text(f"{gs}/.lock", json.dumps(here))  # a run on this host killed with -9
  with caplog.at_level("WARNING", logger="gkd_jax.workdir_lock"):
    lock = workdir_lock.acquire(gs)
  assert f"taking over the stale lock {gs}/.lock of host {here['host']}, pid {proc.pid}" in caplog.text
  lock.release()

  elsewhere = dict(here, host="another-host")  # its pid cannot be checked from here: refused, with the way out
  storage.write_text(f"{gs}/.lock", json.dumps(elsewhere))
  with pytest.raises(workdir_lock.WorkdirLocked, match=rf"host another-host, pid {proc.pid}.*delete {gs}/.lock"):
    workdir_lock.acquire(gs)
