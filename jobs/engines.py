"""Engine lifecycles for one job: Spark, Ray, and the staging of parquet between Spark and object storage.

Each is started by the job that needs it (embedded defaults on one machine) or attached to a
cluster, and every hand-off between engines is parquet on storage, never driver memory.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pyarrow.fs as pafs

from jobs.config import RayConfig, SparkConfig
from sa2crq.progress import progress_mode
from sa2crq.storage.filesystem import resolve_filesystem

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from sa2crq.storage.published import PublishedVersion

log = logging.getLogger(__name__)


@contextmanager
def spark_session(config: SparkConfig, app: str) -> Iterator["SparkSession"]:
    """The job's Spark session; an already running one (a test's, or spark-submit's) is reused and left running."""
    if config.master.startswith("local"):
        # An embedded Spark talks to itself only; a cluster driver needs its real address.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    # A Spark already running in this process (a test's, spark-submit's, another job thread's) is
    # shared and left running. getActiveSession() alone is per thread: a job on a second thread
    # would "create" the running session again and stop it under the first.
    if SparkContext._active_spark_context is not None:
        yield SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
        return
    session = (
        SparkSession.builder.master(config.master)
        .appName(f"sa2crq-{app}")
        .config("spark.sql.shuffle.partitions", str(config.shuffle_partitions))
        .config("spark.driver.memory", config.driver_memory)
        # Spark's own stage bar where progress is drawn as bars (a terminal); its log lines otherwise.
        .config("spark.ui.showConsoleProgress", str(progress_mode() == "bar").lower())
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("WARN")
    try:
        yield session
    finally:
        session.stop()


@contextmanager
def ray_runtime(config: RayConfig) -> Iterator[None]:
    """Ray for the job: the cluster at ``address`` / RAY_ADDRESS, or a local one. A Ray that is
    already up (a test's) is reused and left running."""
    import ray
    import ray.data

    if ray.is_initialized():
        yield
        return
    # Workers inherit this process's environment (AWS_ENDPOINT_URL, credentials) on a local Ray.
    ray.init(address=config.address, num_cpus=config.num_cpus if config.address is None else None,
             include_dashboard=False, configure_logging=False, log_to_driver=True)  # workers' progress lines
    # Ray Data draws its own per-operator bars: on a terminal only (its periodic progress logging
    # covers the rest), and none when progress is off.
    ray.data.DataContext.get_current().enable_progress_bars = progress_mode() == "bar"
    try:
        yield
    finally:
        ray.shutdown()


# A write the local disk refuses: no space, over quota, or past the process's file-size limit.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class StagingDiskFull(RuntimeError):
    """The local staging directory (``spark.staging_dir``) took no more data; the job publishes nothing."""


class SparkStaging:
    """Where Spark reads and writes the parquet of a job.

    With ``direct_object_store`` Spark uses the storage URLs itself (``s3://`` becomes ``s3a://``).
    Otherwise a local directory stands in: inputs are copied down before Spark reads them and
    outputs copied up after Spark writes them, so the embedded Spark needs no S3 connector. A copy
    down that finds the local disk full raises :class:`StagingDiskFull`, naming the directory.
    """

    def __init__(self, config: SparkConfig) -> None:
        self.direct = config.direct_object_store
        self.local_root = Path(config.staging_dir) / uuid.uuid4().hex
        self._local_dirs = itertools.count()
        if not self.direct and not config.master.startswith("local"):
            log.warning("spark.direct_object_store is off with the cluster master %s: executors write the staged parquet under %s "
                        "on their own disks, which is correct only where they share the driver's disk (one machine)",
                        config.master, config.staging_dir)  # fmt: skip

    def read(self, spark: "SparkSession", url: str) -> "DataFrame":
        return spark.read.parquet(self._readable(url))

    def read_published(self, spark: "SparkSession", version: "PublishedVersion", part: str) -> "DataFrame":
        """A part of a published version: exactly its listed parquet files, each checked against the
        manifest (copied down through the check, or checked before Spark reads them where it reaches them)."""
        if self._spark_reaches(version.url):
            return spark.read.parquet(*(_spark_url(url) for url in version.checked_urls(part)))
        local = self._local_dir()
        with self._local_disk():
            version.copy(part, str(local))
        return spark.read.parquet(str(local))

    def write(self, frame: "DataFrame", url: str) -> None:
        """Replace whatever is at ``url`` with ``frame`` as parquet: the files of an earlier,
        interrupted write (a killed recode's, which its rerun redoes) must not stay beside the new ones."""
        if self._spark_reaches(url):
            frame.write.mode("overwrite").parquet(_spark_url(url))
            return
        local = self._local_dir()
        frame.write.mode("overwrite").parquet(str(local))
        remove_tree(url)
        copy_tree(str(local), url)

    def cleanup(self) -> None:
        shutil.rmtree(self.local_root, ignore_errors=True)

    def _readable(self, url: str) -> str:
        if self._spark_reaches(url):
            return _spark_url(url)
        local = self._local_dir()
        with self._local_disk():
            copy_tree(url, str(local))
        return str(local)

    def _spark_reaches(self, url: str) -> bool:
        return self.direct or "://" not in url or url.startswith("file://")

    def _local_dir(self) -> Path:
        return self.local_root / f"{next(self._local_dirs):03d}"

    @contextmanager
    def _local_disk(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            if err.errno not in _DISK_FULL:
                raise
            raise StagingDiskFull(
                f"the local disk under the Spark staging directory {self.local_root.parent} (spark.staging_dir) is full "
                f"({os.strerror(err.errno)}): free space there or set spark.staging_dir to a larger disk, then run the job again",
            ) from err


def _spark_url(url: str) -> str:
    return "s3a://" + url[len("s3://") :] if url.startswith("s3://") else url


def copy_tree(src: str, dst: str) -> None:
    """Copy a file or a directory of files between any two locations (local paths or URLs),
    skipping Spark's marker files (_SUCCESS, .crc)."""
    src_fs, src_path = resolve_filesystem(src)
    dst_fs, dst_path = resolve_filesystem(dst)
    info = src_fs.get_file_info(src_path)
    if info.type == pafs.FileType.File:
        files = [info]
        base = src_path.rsplit("/", 1)[0]
    else:
        files = [f for f in src_fs.get_file_info(pafs.FileSelector(src_path, recursive=True)) if f.type == pafs.FileType.File]
        base = src_path
    dst_fs.create_dir(dst_path, recursive=True)
    for f in files:
        relative = f.path[len(base) + 1 :]
        name = relative.rsplit("/", 1)[-1]
        if name.startswith(("_", ".")) or name.endswith(".crc"):
            continue
        target = f"{dst_path}/{relative}"
        if "/" in relative:
            dst_fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(f.path, target, source_filesystem=src_fs, destination_filesystem=dst_fs)
    log.debug("copied %d files from %s to %s", len(files), src, dst)


def remove_tree(url: str) -> None:
    """Delete a directory (local path or URL) if it exists."""
    fs, path = resolve_filesystem(url)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
