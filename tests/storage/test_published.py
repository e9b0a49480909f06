"""Reading a published version through its manifest: listed files only, each checked for size and sha256."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from sa2crq.storage import layout
from sa2crq.storage.filesystem import resolve_filesystem, write_parquet
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import ManifestMismatchError, PublishedVersion
from sa2crq.storage.versions import format_version_detail, show_version, verify_version

FIRST, SECOND = f"{layout.SID_TABLE}/part-00000.parquet", f"{layout.SID_TABLE}/part-00001.parquet"


@pytest.fixture
def published(root):
    """A published version with a two-file SID table (and Spark's marker), a report and a tokenizer."""
    publisher = Publisher(root)
    version = publisher.new_version()
    url = publisher.version_url(version)
    write_parquet(pa.table({"item_id": [1, 2], "sid": [[3, 4], [3, 5]]}), f"{url}/{FIRST}")
    write_parquet(pa.table({"item_id": [7], "sid": [[6, 4]]}), f"{url}/{SECOND}")
    for name, data in {f"{layout.SID_TABLE}/_SUCCESS": b"", layout.REPORT: b'{"items": 3}',
                       f"{layout.TOKENIZER}/checkpoint.json": b"{}", f"{layout.TOKENIZER}/model.safetensors": b"tensors"}.items():  # fmt: skip
        _write(f"{url}/{name}", data)
    publisher.publish(version, parent=None)
    return publisher, version


def _write(url: str, data: bytes) -> None:
    fs, path = resolve_filesystem(url)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read(url: str) -> bytes:
    fs, path = resolve_filesystem(url)
    with fs.open_input_stream(path) as f:
        return f.read()


def _same_size_change(url: str) -> None:
    data = bytearray(_read(url))
    data[-10] ^= 0xFF  # inside the footer's metadata: the size stays, the sha256 changes
    _write(url, bytes(data))


def test_an_untouched_version_reads_its_listed_files(published):
    publisher, version = published
    files = PublishedVersion.open(publisher, version)
    assert files.read_parquet(layout.SID_TABLE).to_pydict() == {"item_id": [1, 2, 7], "sid": [[3, 4], [3, 5], [6, 4]]}
    assert files.read_parquet(layout.SID_TABLE, columns=["item_id"]).column_names == ["item_id"]
    assert files.parquet_schema(layout.SID_TABLE).names == ["item_id", "sid"]
    assert files.read_json(layout.REPORT) == {"items": 3}
    assert files.checked_urls(layout.SID_TABLE) == [files.file_url(FIRST), files.file_url(SECOND)]
    # A reader crosses to Ray workers pickled, and reads there as here.
    assert pickle.loads(pickle.dumps(files)).read_parquet(layout.SID_TABLE).num_rows == 3


KINDS = {"same size": "sha256", "other size": "size", "deleted": "missing"}


@pytest.mark.fault_scenario(7)
@pytest.mark.parametrize("change", list(KINDS))
def test_a_file_changed_after_publish_is_an_error_naming_version_file_and_both_values(published, change):
    publisher, version = published
    url = f"{publisher.version_url(version)}/{SECOND}"
    before = _read(url)
    if change == "same size":
        _same_size_change(url)
        found = "sha256 .* \\(same size\\)"
    elif change == "other size":
        _write(url, before + b"appended")
        found = f"{len(before) + 8:,} bytes"
    else:
        publisher.fs.rm(publisher.version_path(version) + f"/{SECOND}")
        found = "no such file"
    expected = f"sha256 {publisher.manifest(version).files[SECOND]['sha256']}" if change == "same size" else f"{len(before):,} bytes"
    message = f"published version {version}: {SECOND} does not match its manifest: expected {expected}, found {found}"
    for read in (lambda f: f.read_parquet(layout.SID_TABLE), lambda f: f.checked_urls(layout.SID_TABLE)):
        with pytest.raises(ManifestMismatchError, match=message) as raised:
            read(PublishedVersion.open(publisher, version))
        assert (raised.value.version, raised.value.path, raised.value.kind) == (version, SECOND, KINDS[change])
    # The error survives the trip back from a Ray worker.
    assert str(pickle.loads(pickle.dumps(raised.value))) == str(raised.value)


@pytest.mark.fault_scenario(7)
def test_a_copy_checks_every_file_and_leaves_markers_out(published, tmp_path):
    publisher, version = published
    PublishedVersion.open(publisher, version).copy(layout.SID_TABLE, str(tmp_path / "copy"))
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    _write(f"{publisher.version_url(version)}/{layout.TOKENIZER}/model.safetensors", b"TENSORS")
    with pytest.raises(ManifestMismatchError, match=f"{layout.TOKENIZER}/model.safetensors does not match"):
        PublishedVersion.open(publisher, version).copy(layout.TOKENIZER, str(tmp_path / "tokenizer"))


def test_a_file_added_after_publish_is_never_read(published):
    publisher, version = published
    url = publisher.version_url(version)
    write_parquet(pa.table({"item_id": [99], "sid": [[9, 9]]}), f"{url}/{layout.SID_TABLE}/part-00002.parquet")
    files = PublishedVersion.open(publisher, version)
    assert files.read_parquet(layout.SID_TABLE).column("item_id").to_pylist() == [1, 2, 7]
    assert len(files.checked_urls(layout.SID_TABLE)) == 2
    with pytest.raises(FileNotFoundError, match=f"{version} does not list {layout.SID_TABLE}/part-00002.parquet"):
        files.read_bytes(f"{layout.SID_TABLE}/part-00002.parquet")


def test_an_unpublished_version_has_no_reader(root):
    publisher = Publisher(root)
    with pytest.raises(FileNotFoundError, match="is not published"):
        PublishedVersion.open(publisher, publisher.new_version())


def test_a_delta_version_reads_the_files_it_references_from_the_version_that_holds_them(published):
    """An ingest's delta lists its parent's files without copying them; a delta of a delta names the
    version that holds each file, and a reference is checked like any listed file."""
    publisher, first = published
    tokenizer = f"{layout.TOKENIZER}/model.safetensors"
    versions = [first]
    for k in range(2):
        parent = PublishedVersion.open(publisher, versions[-1])
        version = publisher.new_version()
        write_parquet(pa.table({"item_id": [10 + k], "sid": [[9, k]]}), f"{publisher.version_url(version)}/{FIRST}")
        publisher.publish(version, parent=versions[-1], references=parent.references(layout.TOKENIZER))
        versions.append(version)
    second, third = versions[1:]
    files = PublishedVersion.open(publisher, third)
    assert files.listed(layout.TOKENIZER) == [f"{layout.TOKENIZER}/checkpoint.json", tokenizer]
    assert {files.files[p]["version"] for p in files.listed(layout.TOKENIZER)} == {first}  # the holder, not the delta between
    assert files.read_bytes(tokenizer) == b"tensors" and not files.holds(tokenizer) and files.holds(FIRST)
    assert files.file_url(tokenizer) == f"{publisher.version_url(first)}/{tokenizer}"
    assert files.read_parquet(layout.SID_TABLE).to_pydict() == {"item_id": [11], "sid": [[9, 1]]}
    assert not publisher.fs.exists(f"{publisher.version_path(third)}/{layout.TOKENIZER}")  # nothing copied
    assert verify_version(publisher, third).ok and verify_version(publisher, second).ok
    assert f"{tokenizer} (held by {first})" in format_version_detail(show_version(publisher, third), every_file=True)

    # The holder's file changed after its commit: every version that lists it sees the mismatch.
    _write(f"{publisher.version_url(first)}/{tokenizer}", b"tensorz")
    with pytest.raises(ManifestMismatchError, match=f"{third}: {tokenizer} does not match its manifest"):
        PublishedVersion.open(publisher, third).read_bytes(tokenizer)
    assert [p.kind for p in verify_version(publisher, third).problems] == ["sha256"]


def test_a_reference_must_name_a_published_version_and_no_written_file(published):
    publisher, first = published
    parent = PublishedVersion.open(publisher, first)
    version = publisher.new_version()
    _write(f"{publisher.version_url(version)}/{FIRST}", b"rows")
    with pytest.raises(ValueError, match=f"writes {FIRST} and also references it from version {first}"):
        publisher.publish(version, parent=first, references=parent.references(layout.SID_TABLE))
    unpublished = {path: {**entry, "version": version} for path, entry in parent.references(layout.TOKENIZER).items()}
    with pytest.raises(ValueError, match=f"references version '{version}', which is not published"):
        publisher.publish(version, parent=first, references=unpublished)
    assert publisher.latest() == first
    # A file written into a delta's directory under a referenced path is not part of it.
    publisher.publish(version, parent=first, references=parent.references(layout.TOKENIZER))
    _write(f"{publisher.version_url(version)}/{layout.TOKENIZER}/checkpoint.json", b"{}")
    assert [(p.path, p.kind) for p in verify_version(publisher, version).problems] == [(f"{layout.TOKENIZER}/checkpoint.json", "unlisted")]
