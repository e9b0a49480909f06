"""Job configs: YAML or JSON files give the same config, errors name the layer, --print-config shows each value's source."""

from __future__ import annotations

import json

import pytest
import yaml

from jobs.cli import main
from jobs.config import load_job_config

TRAIN = {
    "interactions": "data/interactions.parquet",
    "valid": "data/valid.parquet",
    "model": {"d_model": 64, "num_heads": 4, "head_dim": 16},
    "train": {"epochs": 2, "learning_rate": 3e-3, "batch_size": 32},
    "storage": {"root": "s3://bucket/prefix"},
}
RECODE = {"items": "a.parquet", "interactions": "b.parquet", "tokenizer": {"method": "tiger", "rqvae": {"epochs": 7}}}


@pytest.mark.parametrize("job, data", [("train-retriever", TRAIN), ("recode", RECODE)])
def test_yaml_and_json_files_give_the_same_config(tmp_path, job, data):
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    # YAML as people write it: a float without a dot (YAML 1.1 would read "3e-3" as a string).
    (tmp_path / "c.yml").write_text(yaml.safe_dump(data).replace("0.003", "3e-3"))
    from_json = load_job_config(job, str(tmp_path / "c.json"), ["storage.root=s3://other/p"])
    assert from_json == load_job_config(job, str(tmp_path / "c.yaml"), ["storage.root=s3://other/p"])
    assert from_json == load_job_config(job, str(tmp_path / "c.yml"), ["storage.root=s3://other/p"])
    assert from_json.storage.root == "s3://other/p"  # --set beats the file
    if job == "train-retriever":
        assert "3e-3" in (tmp_path / "c.yml").read_text() and from_json.train.learning_rate == 0.003


def test_config_file_errors_name_the_file_and_the_rule(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {epochs: 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: not valid YAML"):
        load_job_config("train-retriever", str(bad_yaml), [])
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list.yaml: a config file must hold a mapping of sections and fields, got list"):
        load_job_config("train-retriever", str(listing), [])
    toml = tmp_path / "c.toml"
    toml.write_text("x = 1")
    with pytest.raises(ValueError, match=r"c.toml: a config file is YAML \(.yaml, .yml\) or JSON \(.json\), not .toml"):
        load_job_config("train-retriever", str(toml), [])
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({**TRAIN, "train": {"epochz": 2}}))
    with pytest.raises(ValueError, match=r"unknown config field\(s\): train.epochz; known: .*train.epochs.* \(config: defaults < .*typo.yaml\)"):
        load_job_config("train-retriever", str(typo), [])
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(TRAIN))
    with pytest.raises(ValueError, match=r"retriever schedule must be one of \('constant', 'cosine', 'stable-decay'\), got 'linear' \(config: defaults < .*good.yaml < --set\)"):
        load_job_config("train-retriever", str(good), ["train.schedule=linear"])


def test_print_config_shows_each_values_source_and_reads_back_as_the_same_config(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(TRAIN))
    assert main(["train-retriever", "--config", str(path), "--set", "train.epochs=5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    lines = {line.strip().split(":")[0]: line for line in printed.splitlines() if ":" in line and not line.startswith("#")}
    assert lines["epochs"].endswith("# --set") and ": 5" in lines["epochs"]
    assert lines["learning_rate"].endswith(f"# {path}") and lines["d_model"].endswith(f"# {path}")
    assert lines["warmup_steps"].endswith("# default") and lines["dense_negatives"].endswith("# default")
    # A relative path the config made absolute is the file's value; a default it resolved is "derived".
    assert lines["interactions"].endswith(f"# {path}") and '"/' in lines["interactions"]
    echoed = tmp_path / "echoed.yaml"
    echoed.write_text(printed)
    assert load_job_config("train-retriever", str(echoed), []) == load_job_config("train-retriever", str(path), ["train.epochs=5"])


def test_print_config_names_a_tokenizer_method_presets_values(tmp_path, capsys):
    path = tmp_path / "recode.json"
    path.write_text(json.dumps(RECODE))
    assert main(["recode", "--config", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    levels = next(line for line in printed.splitlines() if line.strip().startswith("always_digit:"))
    assert levels.endswith("# preset tiger")  # tiger's preset sets it; the file does not
    epochs = next(line for line in printed.splitlines() if line.strip().startswith("epochs: 7"))
    assert epochs.endswith(f"# {path}")


@pytest.mark.parametrize("job, data", [("train-retriever", TRAIN), ("recode", RECODE)])
def test_the_ray_section_sizes_the_train_group_restarts_included(tmp_path, job, data):
    from ray_workers.training import TrainRun

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    config = load_job_config(job, str(tmp_path / "c.yaml"), ["ray.train_workers=3", "ray.train_max_failures=0"])
    run = TrainRun(name="run", storage_path="runs", **config.ray.train_group)
    assert (run.workers, run.max_failures) == (3, 0)
    assert load_job_config(job, str(tmp_path / "c.yaml"), []).ray.train_max_failures == 2
    with pytest.raises(ValueError, match=r"ray.train_max_failures must be >= 0"):
        load_job_config(job, str(tmp_path / "c.yaml"), ["ray.train_max_failures=-1"])
