"""Version bookkeeping the jobs share: which version to read, and publishing on top of LATEST."""

from __future__ import annotations

import json
from typing import Any

from sa2crq.storage.filesystem import resolve_filesystem
from sa2crq.storage.publish import ConcurrentPublishError, Manifest, Publisher
from sa2crq.storage.reports import dumps_report


def resolve_version(publisher: Publisher, requested: str | None, what: str, *, hint: str) -> str:
    """``requested`` if it is published, else LATEST; a clear error when there is none."""
    if requested is not None:
        publisher.manifest(requested)  # raises, naming it, when it is not published
        return requested
    latest = publisher.latest()
    if latest is None:
        raise ValueError(f"no {what} version is published under {publisher.root_url}: {hint}")
    return latest


def publish_on_latest(publisher: Publisher, version: str, *, meta: dict[str, Any], attempts: int = 5) -> Manifest:
    """Publish a version that does not build on its parent's contents (a retriever), whatever LATEST
    is now: a concurrent publish only means the parent to record has changed."""
    for _ in range(attempts):
        try:
            return publisher.publish(version, parent=publisher.latest(), meta=meta)
        except ConcurrentPublishError:
            continue
    raise ConcurrentPublishError(f"LATEST under {publisher.root_url} kept moving: {version} not published after {attempts} attempts")


def write_json(url: str, report: dict[str, Any]) -> None:
    write_text(url, dumps_report(report))


def write_text(url: str, text: str) -> None:
    fs, path = resolve_filesystem(url)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)  # a local directory must exist; on object stores a no-op
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_json(url: str) -> dict[str, Any]:
    fs, path = resolve_filesystem(url)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())
