"""What a published version holds: the names of its parts, relative to the version's directory.

SID versions live under ``ROOT/sids/versions/<v>/``, retriever versions under
``ROOT/retrievers/versions/<v>/`` (see :class:`sa2crq.storage.publish.Publisher`).
"""

from __future__ import annotations

# --- SID versions, written by recode and ingest -------------------------------------------------
CATALOG = "catalog"  # catalog split: item_id, popularity, segment, shard
EMBEDDINGS = "embeddings"  # item_id, popularity, segment, shard, embedding (fixed_size_list<float32>)
CODES = "codes"  # item_id, popularity, segment, shard, codes (full depth)
SID_TABLE = "sid_table"  # item_id, sid, sid_len, code_depth, digit, bucket_size, segment, popularity, codes
TOKENIZER = "tokenizer"  # safetensors + JSON
TRIE = "trie"  # parquet nodes/ and rows/ + JSON (sa2crq.ids.trie), rows in item-id order
REMAP = "remap"  # item_id, old_sid, new_sid, change: every SID that changed since the parent version
DELTA = "delta"  # ingest only: the SID rows this version added
REJECTS = "rejects"  # items.parquet, interactions.parquet: quarantined input rows with a reason
REPORT = "report.json"
REPORT_PAGE = "report.html"  # the report as a page with plots (sa2crq.metrics.html_report), beside the JSON
WORK = "_work"  # the job's scratch inside the version; removed before the manifest is written
STAGES = "_stages"  # recode's run key and a record per completed stage (jobs.recode_attempts); removed likewise

# --- retriever versions, written by train-retriever ---------------------------------------------
RETRIEVER = "retriever"  # safetensors + JSON, records the SID version it was trained on
TRAIN_REPORT = "train_report.json"
TRAIN_REPORT_PAGE = "train_report.html"

# The SID table's columns, in order (:meth:`sa2crq.ids.sid_table.SIDTable.to_arrow`).
SID_TABLE_COLUMNS = ("item_id", "sid", "sid_len", "code_depth", "digit", "bucket_size", "segment", "popularity", "codes")
