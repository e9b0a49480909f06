"""Clusters on loopback for the cluster tests: a Ray cluster (a head and a worker node) and a Spark
standalone cluster (a master and a worker), each node a separate process tree.

Every process is started in a session of its own and stopped by killing that process group (never
``ray stop``, which would stop every Ray on the machine); Ray workers that a raylet started in
sessions of their own are found by the cluster's private temp dir in their command line. Ports are
picked free at start, so other Rays and Sparks on the machine are left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_environment() -> dict[str, str]:
    """What a node of a cluster sees: the venv first on PATH (its python, ray, spark-class), no S3
    endpoint or credentials (those reach jobs through their runtime environment), no Ray address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "SPARK_", "PYSPARK_"))}
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    env["HF_HUB_OFFLINE"] = "1"
    # Loopback only, so no token: otherwise Ray 2.60 turns token auth on by default and every client
    # needs the machine-wide ~/.ray/auth_token (a real cluster keeps it on; infra/README.md).
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def _wait_for_port(host: str, port: int, process: subprocess.Popen, log: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{log.name} exited ({process.returncode}) before port {port} opened:\n{_tail(log)}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"port {port} did not open in {timeout_s} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def _kill_group(process: subprocess.Popen | None) -> None:
    if process is None:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _kill_processes_naming(marker: str) -> None:
    """SIGKILL every process whose command line contains ``marker`` (this cluster's private temp dir)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


class RayCluster:
    """``ray start --head`` and ``ray start --address`` on loopback. As in the KubeRay manifests, the
    head runs the job drivers and no tasks (0 CPUs); the worker node has the machine's 2 CPUs, so a
    lost worker node loses every task and actor until its replacement joins."""

    def __init__(self, logs: Path, worker_cpus: int = 2) -> None:
        self.logs = logs
        self.worker_cpus = worker_cpus
        # Short: Ray's Unix socket paths live under it and must stay under 108 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="sa2crq-ray-", dir="/tmp")
        # Ray turns 127.0.0.1 into the machine's network address (so other machines can join);
        # another address of the loopback block keeps every node on loopback.
        self.node_ip = "127.0.0.2"
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        """The GCS address (``ray.address`` / RAY_ADDRESS)."""
        return f"{self.node_ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Where ``ray job submit --address`` goes."""
        return f"http://{self.node_ip}:{self.dashboard_port}"

    def _node_ports(self) -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]  # fmt: skip

    def _start(self, name: str, cpus: int, args: list[str]) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        command = [str(BIN / "ray"), "start", "--block", "--node-ip-address", self.node_ip, "--num-cpus", str(cpus),
                   "--disable-usage-stats", "--object-store-memory", str(300 * 2**20), *self._node_ports(), *args]  # fmt: skip
        with open(log, "ab") as out:
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=base_environment(), cwd=self.temp_dir, start_new_session=True)  # fmt: skip

    def start(self) -> None:
        self.head = self._start("ray-head", 0, ["--head", "--port", str(self.gcs_port), "--temp-dir", self.temp_dir,
                                             "--include-dashboard", "true", "--dashboard-host", self.node_ip,
                                             "--dashboard-port", str(self.dashboard_port)])  # fmt: skip
        _wait_for_port(self.node_ip, self.gcs_port, self.head, self.logs / "ray-head.log")
        self._wait_for_job_server()
        self.add_worker()

    def add_worker(self) -> None:
        """Start a worker node and wait until the head counts it alive."""
        before = self.worker_nodes()
        worker = self._start(f"ray-worker-{len(self.workers)}", self.worker_cpus, ["--address", self.address])
        self.workers.append(worker)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.worker_nodes() - before:
            if worker.poll() is not None:
                raise RuntimeError(f"the Ray worker node exited ({worker.returncode}):\n{_tail(self.logs / f'ray-worker-{len(self.workers) - 1}.log')}")
            if time.monotonic() > deadline:
                raise TimeoutError("the Ray worker node did not join the cluster")
            time.sleep(0.5)

    def kill_worker(self) -> set[str]:
        """Kill the newest worker node outright (raylet, its workers and their objects), as a lost
        machine; returns the node ids it had. The head notices only when its health checks fail."""
        lost = self.worker_nodes()
        _kill_group(self.workers[-1])
        return lost

    def worker_nodes(self, state: str = "ALIVE") -> set[str]:
        """Ids of the worker nodes the head reports in ``state`` (none before it answers)."""
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.dashboard_url, timeout=10, raise_on_missing_output=False)
        except Exception:  # the head not answering yet: no nodes known
            return set()
        return {node.node_id for node in nodes if node.state == state and not node.is_head_node}

    def _wait_for_job_server(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.head.poll() is not None:
                raise RuntimeError(f"the Ray head exited ({self.head.returncode}):\n{_tail(self.logs / 'ray-head.log')}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"Ray's job server did not answer at {self.dashboard_url}")

    def stop(self) -> None:
        for process in [*self.workers, self.head]:
            _kill_group(process)
        _kill_processes_naming(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class SparkCluster:
    """A Spark standalone master and one worker (pyspark's spark-class launchers) on 127.0.0.1."""

    def __init__(self, logs: Path, worker_cores: int = 1, worker_memory: str = "2g") -> None:
        self.logs = logs
        self.worker_cores = worker_cores
        self.worker_memory = worker_memory
        self.port = free_port()
        self.work_dir = tempfile.mkdtemp(prefix="sa2crq-spark-", dir="/tmp")
        self.master: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        env = base_environment()
        # Its own logs, pid files and worker scratch: nothing shared with another Spark on the machine.
        env.update(SPARK_LOG_DIR=self.work_dir, SPARK_PID_DIR=self.work_dir, SPARK_WORKER_DIR=f"{self.work_dir}/work",
                   SPARK_NO_DAEMONIZE="1")  # fmt: skip
        with open(self.logs / f"{name}.log", "ab") as out:
            return subprocess.Popen([str(BIN / "spark-class"), *args], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd=self.work_dir, start_new_session=True)  # fmt: skip

    def start(self) -> None:
        self.master = self._start("spark-master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                                   "--port", str(self.port), "--webui-port", str(free_port())])  # fmt: skip
        _wait_for_port("127.0.0.1", self.port, self.master, self.logs / "spark-master.log")
        worker_ui = free_port()
        self.worker = self._start("spark-worker", ["org.apache.spark.deploy.worker.Worker", self.url, "--host", "127.0.0.1",
                                                   "--port", str(free_port()), "--webui-port", str(worker_ui),
                                                   "--cores", str(self.worker_cores), "--memory", self.worker_memory,
                                                   "--work-dir", f"{self.work_dir}/work"])  # fmt: skip
        _wait_for_port("127.0.0.1", worker_ui, self.worker, self.logs / "spark-worker.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Successfully registered with master" not in (self.logs / "spark-worker.log").read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Spark worker did not register:\n{_tail(self.logs / 'spark-worker.log')}")
            time.sleep(0.3)

    def stop(self) -> None:
        _kill_group(self.worker)
        _kill_group(self.master)
        _kill_processes_naming(self.work_dir)  # executors the worker started
        shutil.rmtree(self.work_dir, ignore_errors=True)
