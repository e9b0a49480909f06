"""The jobs' local S3 server (SeaweedFS) with real processes: directory in use, log, stopping on signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli
from jobs.object_store import _LOCAL_SERVER_ENV, LocalS3Server, LocalS3ServerInUse

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
# A job as far as the server is concerned: an s3:// root with no endpoint, so object_store starts
# the local server; it prints the endpoint once the bucket exists, then works until killed.
JOB = """
import sys, time
from jobs.config import StorageConfig
from jobs.object_store import object_store
with object_store(StorageConfig(root="s3://sa2crq-test/catalog", local_server_dir=sys.argv[1])) as endpoint:
    print(endpoint, flush=True)
    time.sleep(600)
"""


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan may wait for a reaper that never comes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def start_job():
    """Starts a job process over a directory, with its server up; returns it and the server's pid (from
    the lock file's record). A job a failed test leaves is killed (and its server with it)."""
    started = []

    def start(data_dir: Path) -> tuple[subprocess.Popen, int]:
        env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
        started.append(subprocess.Popen([sys.executable, "-c", JOB, str(data_dir)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True))
        return started[-1], _server_pid(started[-1], data_dir)

    yield start
    for job in started:
        if job.poll() is None:
            job.kill()
        job.wait()
        job.stdout.close()


def _server_pid(job: subprocess.Popen, data_dir: Path) -> int:
    endpoint = job.stdout.readline().strip()
    assert endpoint.startswith("http://127.0.0.1:"), f"the job did not start its server (exit {job.poll()})"
    holder = json.loads((data_dir / "local-s3-server.lock").read_text())
    assert holder["job_pid"] == job.pid and holder["endpoint"] == endpoint
    assert _running(holder["server_pid"])
    return holder["server_pid"]


def test_second_server_on_a_directory_in_use_is_refused_naming_the_holder(tmp_path):
    first = LocalS3Server(tmp_path)
    endpoint = first.start()
    try:
        with pytest.raises(LocalS3ServerInUse) as refused:
            LocalS3Server(tmp_path).start()
        message = str(refused.value)
        assert str(tmp_path) in message and endpoint in message
        assert f"pid {first._process.pid}" in message and f"job pid {os.getpid()}, still running" in message
        assert "wait for that job" in message
        assert _running(first._process.pid)  # the refused start touched nothing of the running server
    finally:
        first.stop()
    log = first.log_path.read_text()
    assert log.count(f"job pid {os.getpid()}:") == 1  # one start logged: the refused one never began
    assert "Starting SeaweedFS Mini" in log and f"-s3.port={endpoint.rsplit(':', 1)[1]}" in log  # SeaweedFS's own output is kept
    second = LocalS3Server(tmp_path)  # once stopped, the directory is free again
    second.start()
    second.stop()


def test_a_job_on_a_directory_in_use_exits_with_the_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    # What object_store would set for the local server, set here so that it is undone afterwards (a
    # session server started later would take these credentials for its own).
    for name, value in _LOCAL_SERVER_ENV.items():
        monkeypatch.setenv(name, value)
    holder = LocalS3Server(tmp_path)
    endpoint = holder.start()
    try:
        code = cli.main(["versions", "list", "--root", "s3://sa2crq-test/catalog", "--local-server-dir", str(tmp_path)])
    finally:
        holder.stop()
    assert code == cli.LOCAL_SERVER_DIR_IN_USE
    error = capsys.readouterr().err
    assert error.startswith(f"error: the local S3 server's directory {tmp_path} is in use") and endpoint in error
    assert "Traceback" not in error


def test_failed_start_shows_the_end_of_the_server_log(tmp_path):
    (tmp_path / "filerldb2").write_text("not the filer's store directory")
    with pytest.raises(RuntimeError, match="did not start") as failed:
        LocalS3Server(tmp_path).start()
    assert str(tmp_path / "local-s3-server.log") in str(failed.value)
    assert "filerldb2" in str(failed.value)  # SeaweedFS's reason, from the log
    with pytest.raises(RuntimeError, match="did not start"):  # not "in use": the failed start freed the directory
        LocalS3Server(tmp_path).start()


def test_sigterm_to_the_job_stops_its_server_before_the_job_exits(tmp_path, start_job):
    job, server_pid = start_job(tmp_path)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=60) == -signal.SIGTERM  # died of the signal, as without the handler
    assert not _running(server_pid)  # at once: the job stopped and reaped it before dying
    assert "sa2crq-local" not in (tmp_path / "local-s3-server.log").read_text()  # the dummy credentials are not logged


def test_sigint_to_the_job_stops_its_server(tmp_path, start_job):
    job, server_pid = start_job(tmp_path)
    job.send_signal(signal.SIGINT)
    assert job.wait(timeout=60) == -signal.SIGINT  # KeyboardInterrupt unhandled: Python dies of SIGINT
    assert not _running(server_pid)


def test_a_sigkilled_job_leaves_no_server_and_its_stale_record_does_not_block(tmp_path, start_job):
    job, server_pid = start_job(tmp_path)
    job.kill()
    job.wait(timeout=30)
    server = LocalS3Server(tmp_path)  # waits for the server the kernel is stopping, then starts
    server.start()
    try:
        assert not _running(server_pid)
        assert json.loads(server.lock_path.read_text())["job_pid"] == os.getpid()
    finally:
        server.stop()
