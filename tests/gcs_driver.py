"""Runs one gs:// scenario of tests/test_gcs.py against a local Cloud Storage emulator, as a pod would: each
"host" is a process with its own cwd, HOME, TMPDIR, HF and compilation caches, and the hosts meet only in
the emulated bucket. The test runs this script in a network namespace that holds nothing but loopback,
under strace, and checks that every connection went to 127.0.0.1.

    python tests/gcs_driver.py SCENARIO WORK TASK_JSON      # writes WORK/result.json

Scenarios: bucket_run (models, data and workdir in the bucket; export and serve from it), two_hosts (two
jax.distributed processes, killed with kill -9 and restarted, vs one 8-device process; per-host local
workdirs refused), emulator_stops (storage vanishes mid-run; the rerun on the same host resumes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gcs_emulator  # noqa: E402  (sibling helpers, not a package)
import tiny_runs  # noqa: E402

BUCKET = "bkt"


class Driver:

  def __init__(self, work: str, task: dict):
    self.work, self.task = work, task
    self.emulator = gcs_emulator.Emulator(os.path.join(work, "gcs")).start()
    self.emulator.create_bucket(BUCKET)
    os.environ.update(gcs_emulator.client_env(self.emulator.url))
    import fsspec

    self.fs = fsspec.filesystem("gs")
    self.result: dict = {"emulator": self.emulator.url}
    self._seen: dict = {}

  # ---------------------------------------------------------------------------------------------- bucket

  def upload_dir(self, local: str, prefix: str) -> str:
    for root, _, names in os.walk(local):
      for name in names:
        path = os.path.join(root, name)
        self.fs.put_file(path, f"{BUCKET}/{prefix}/{os.path.relpath(path, local)}")
    return f"gs://{BUCKET}/{prefix}"

  def upload_inputs(self) -> dict:
    """The task's models and data files, in the bucket; returns their gs:// URLs."""
    urls = {name: self.upload_dir(self.task[name], f"models/{name}") for name in ("student", "teacher")}
    for name in ("train-00000.jsonl", "train-00001.jsonl", "test.jsonl"):
      self.fs.put_file(os.path.join(self.task["data_dir"], name), f"{BUCKET}/data/{name}")
    urls["train"], urls["test"] = f"gs://{BUCKET}/data/train-*.jsonl", f"gs://{BUCKET}/data/test.jsonl"
    return urls

  def download(self, url: str, local: str) -> str:
    os.makedirs(local, exist_ok=True)
    path = url.removeprefix("gs://").rstrip("/")
    for name in self.fs.find(path):
      dest = os.path.join(local, os.path.relpath(name, path))
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      self.fs.get_file(name, dest)
    return local

  def objects(self, url: str) -> list[str]:
    path = url.removeprefix("gs://").rstrip("/")
    self.fs.invalidate_cache()
    return sorted(os.path.relpath(n, path) for n in self.fs.find(path))

  def committed(self, url: str, step: int) -> bool:
    self.fs.invalidate_cache()
    return self.fs.exists(f"{url.removeprefix('gs://')}/checkpoints/{step}/commit_success.txt")

  # ----------------------------------------------------------------------------------------------- hosts

  def config(self, name: str, **fields) -> str:
    base = dict(
        batch_size=8,
        learning_rate=1e-3,
        log_every=1,
        max_length=96,
        max_prompt_length=32,
        max_completion_length=24,
        peak_flops=1e11,
        lmbda=0.5,
    )
    path = os.path.join(self.work, f"{name}.py")
    with open(path, "w") as f:
      f.write(tiny_runs.CONFIG_FILE.format(overrides=json.dumps({**base, **fields})))
    return path

  def host_env(self, host: str, devices: int) -> tuple[dict, str]:
    """(env, cwd) of one host: nothing on disk shared with any other host."""
    root = os.path.join(self.work, "hosts", host)
    dirs = {k: os.path.join(root, k) for k in ("cwd", "home", "tmp", "hf", "jit")}
    for d in dirs.values():
      os.makedirs(d, exist_ok=True)
    env = dict(
        os.environ,
        HOME=dirs["home"],
        TMPDIR=dirs["tmp"],
        HF_HOME=dirs["hf"],
        HF_DATASETS_CACHE=os.path.join(dirs["hf"], "datasets"),
        XDG_CACHE_HOME=os.path.join(dirs["home"], ".cache"),
        JAX_COMPILATION_CACHE_DIR=dirs["jit"],
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    env.pop("GKD_JAX_CACHE", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    return env, dirs["cwd"]

  def start(
      self, host: str, args: list[str], devices: int = 8, module: str = "gkd_jax.main", disk: str | None = None
  ) -> subprocess.Popen:
    """Runs `module` as `host` (its log: WORK/HOST.log) on the disk of host `disk` (default: its own)."""
    env, cwd = self.host_env(disk or host, devices)
    log = open(os.path.join(self.work, f"{host}.log"), "ab")
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=cwd, stdout=log, stderr=log)

  def log(self, host: str) -> str:
    with open(os.path.join(self.work, f"{host}.log"), "rb") as f:
      return f.read().decode("utf-8", errors="replace")

  def finish(self, procs: dict, timeout: float = 900) -> dict:
    codes = {}
    for host, proc in procs.items():
      try:
        codes[host] = proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        proc.kill()
        codes[host] = "timeout"
    return codes

  def pod(self, workdir: str, config: str, processes: int = 2, devices: int = 4) -> dict:
    """Starts one jax.distributed run on hosts h0, h1, ...; returns {host: Popen}. A host keeps its own disk
    (cwd, caches) from one run to the next, as a real one does."""
    port = gcs_emulator.free_port()
    common = [f"--config={config}", f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}"]
    return {
        f"h{i}": self.start(f"h{i}", common + [f"--num_processes={processes}", f"--process_id={i}"], devices)
        for i in range(processes)
    }

  def logs(self, tag: str) -> dict:
    """The hosts' logs so far, under `tag` (each host's log file collects all of its runs)."""
    out = {}
    for host in ("h0", "h1"):
      text = self.log(host)
      out[f"{tag}{host[1:]}"] = text[self._seen.get(host, 0) :][-3000:]
      self._seen[host] = len(text)
    return out

  def records(self, url: str, name: str) -> list[dict]:
    """The JSON-lines records of the run's file `name` in the bucket (metrics.jsonl, samples.jsonl, ...)."""
    return [json.loads(line) for line in self.fs.cat_file(f"{url.removeprefix('gs://')}/{name}").decode().splitlines()]

  def losses(self, url: str) -> dict:
    return {str(r["step"]): r["loss"] for r in self.records(url, "metrics.jsonl")}

  # ------------------------------------------------------------------------------------------- scenarios

  def bucket_run(self):
    urls = self.upload_inputs()
    common = dict(
        total_steps=4, save_every=2, sample_every=1, eval_split="test", eval_every=2, eval_rows=8, eval_batch_size=8
    )
    remote = self.config(
        "remote",
        model=urls["student"],
        teacher_model=urls["teacher"],
        dataset=urls["train"],
        eval_dataset=urls["test"],
        **common,
    )
    local = self.config(
        "local",
        model=self.task["student"],
        teacher_model=self.task["teacher"],
        dataset=os.path.join(self.task["data_dir"], "train-*.jsonl"),
        eval_dataset=os.path.join(self.task["data_dir"], "test.jsonl"),
        **common,
    )
    run, local_run = f"gs://{BUCKET}/run", os.path.join(self.work, "local_run")
    codes = self.finish({"remote": self.start("h0", [f"--config={remote}", f"--workdir={run}"])})
    codes.update(self.finish({"local": self.start("h0", [f"--config={local}", f"--workdir={local_run}"])}))
    out = os.path.join(self.work, "out")
    # The export CLI, from the bucket's workdir into the bucket; then the serve CLI's loader on a gs:// model.
    cli = self.start("export", [f"--workdir={run}", f"--out=gs://{BUCKET}/exported"], module="gkd_jax.export")
    codes.update(self.finish({"export": cli}))
    serve = os.path.join(out, "serve.json")
    probe = (
        "import json, sys, numpy as np; from gkd_jax import serve;"
        "e = serve.build_engine(sys.argv[1], dtype='float32', tokenizer=None, max_logprobs=4, max_seq_len=64,"
        " max_batch_size=2);"
        "json.dump({'vocab': int(e.vocab_size)}, open(sys.argv[2], 'w'))"
    )
    env, cwd = self.host_env("serve", 1)
    os.makedirs(out, exist_ok=True)
    codes["serve"] = subprocess.run(
        [sys.executable, "-c", probe, urls["teacher"], serve], env=env, cwd=cwd, capture_output=True, timeout=600
    ).returncode
    self.result.update(
        codes=codes,
        logs={h: self.log(h)[-3000:] for h in ("h0", "export")},
        objects=self.objects(run),
        exported=self.objects(f"gs://{BUCKET}/exported"),
        run_export=self.download(f"{run}/export", os.path.join(out, "run_export")),
        cli_export=self.download(f"gs://{BUCKET}/exported", os.path.join(out, "cli_export")),
        remote_metrics=self.fs.cat_file(f"{BUCKET}/run/metrics.jsonl").decode(),
        remote_eval=self.fs.cat_file(f"{BUCKET}/run/eval.jsonl").decode(),
        remote_samples=self.fs.cat_file(f"{BUCKET}/run/samples.jsonl").decode(),
        local_run=local_run,
        stray=sorted(os.listdir(os.path.join(self.work, "hosts", "h0", "cwd"))),
        serve=json.load(open(serve)) if os.path.exists(serve) else None,
    )

  def two_hosts(self):
    urls = self.upload_inputs()
    fields = dict(total_steps=6, save_every=2, sample_every=1, model=urls["student"], teacher_model=urls["teacher"])
    fields.update(dataset=urls["train"], mesh=dict(data=2, fsdp=4, tensor=1))
    config = self.config("pod", **fields)
    one = f"gs://{BUCKET}/one"
    codes = self.finish({"one": self.start("one", [f"--config={config}", f"--workdir={one}"], devices=8)})
    logs = {"one": self.log("one")[-3000:]}
    # The pod run, killed (kill -9 of both hosts) once step 2 is committed, then restarted on the same hosts.
    pod = f"gs://{BUCKET}/pod"
    procs = self.pod(pod, config)
    deadline = time.time() + 900
    while not self.committed(pod, 2) and time.time() < deadline and all(p.poll() is None for p in procs.values()):
      time.sleep(0.2)
    for p in procs.values():
      p.send_signal(signal.SIGKILL)
    killed_at = {h: p.wait() for h, p in procs.items()}
    steps_at_kill = [n for n in self.objects(f"{pod}/checkpoints") if re.fullmatch(r"\d+/commit_success.txt", n)]
    logs.update(self.logs("kill"))
    codes.update({f"pod{h[1:]}": c for h, c in self.finish(self.pod(pod, config)).items()})
    logs.update(self.logs("pod"))
    # Each host its own local workdir: refused at start-up, by every host.
    codes.update({f"local{h[1:]}": c for h, c in self.finish(self.pod("run", config)).items()})
    logs.update(self.logs("local"))
    samples = lambda url: [(r["step"], r["prompt"]) for r in self.records(url, "samples.jsonl")]
    self.result.update(
        codes=codes,
        killed_at=killed_at,
        steps_at_kill=steps_at_kill,
        logs=logs,
        one=self.losses(one),
        pod=self.losses(pod),
        samples={"one": samples(one), "pod": samples(pod)},
        weights={
            name: self.download(f"{url}/export", os.path.join(self.work, "out", name))
            for name, url in (("one", one), ("pod", pod))
        },
        pod_lines=len(self.records(pod, "metrics.jsonl")),
        local_files={h: _files(os.path.join(self.work, "hosts", h, "cwd")) for h in ("h0", "h1")},
    )

  def emulator_stops(self):
    urls = self.upload_inputs()
    fields = dict(save_every=2, lmbda=0.0, model=urls["student"], teacher_model=urls["teacher"], dataset=urls["train"])
    config = self.config("run", total_steps=400, **fields)
    run = f"gs://{BUCKET}/run"
    proc = self.start("run", [f"--config={config}", f"--workdir={run}"])
    deadline = time.time() + 900
    while not self.committed(run, 4) and time.time() < deadline and proc.poll() is None:
      time.sleep(0.2)
    self.emulator.stop()
    t0 = time.time()
    codes = self.finish({"run": proc})
    self.result["seconds_to_fail"] = round(time.time() - t0, 1)
    self.emulator.start()
    self.fs.invalidate_cache()
    committed = sorted(
        int(n.split("/")[0]) for n in self.objects(f"{run}/checkpoints") if re.fullmatch(r"\d+/commit_success.txt", n)
    )
    # The last committed checkpoint restores: rerun on the same host, two more steps.
    resume = self.config("resume", total_steps=committed[-1] + 2, **fields)
    rerun = self.start("resume", [f"--config={resume}", f"--workdir={run}"], disk="run")
    codes.update(self.finish({"resume": rerun}))
    self.result.update(
        codes=codes,
        committed=committed,
        logs={h: self.log(h)[-4000:] for h in ("run", "resume")},
        losses=self.losses(run),
    )


def _files(directory: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(r, n), directory) for r, _, names in os.walk(directory) for n in names)


def main():
  scenario, work, task_json = sys.argv[1:4]
  with open(task_json) as f:
    task = json.load(f)
  driver = Driver(work, task)
  try:
    getattr(driver, scenario)()
  finally:
    driver.emulator.stop()
    with open(os.path.join(work, "result.json"), "w") as f:
      json.dump(driver.result, f, indent=1)


if __name__ == "__main__":
  main()
