# Two commands: `make run` and `make test`. Both set up .venv first (idempotent: the stamp file
# is rebuilt only when the dependency files change).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the local CPU wheel. A GPU user runs `make setup TORCH_PIN=torch==2.13.0` (the
# registry's CUDA build of the same version; see README "GPU install").
TORCH_PIN ?= torch==2.13.0+cpu
EXP ?= synthetic_15_5_disjoint
ARGS ?=
export NO_ALBUMENTATIONS_UPDATE = 1
export PYTHONUNBUFFERED = 1

STAMP := $(VENV)/.setup-done
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip prints one harmless line per package missing from the machine's local indexes.
PIP_NOISE := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: setup run table fewshot dashboard data compare sweep sweep-setup bench test test-slow test-all clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup_torchvision.py scripts/_tv_cpu_shim.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt "$(TORCH_PIN)" -e '.[test]' 2>&1 | { $(PIP_NOISE); }
	$(PY) scripts/setup_torchvision.py
# SEAM's dense CRF (sdist only: built here with g++ and the Python headers); optional
	$(PY) -m pip install --quiet -c constraints.txt pydensecrf2==1.1 > $(VENV)/pydensecrf2-build.log 2>&1 \
		|| echo "pydensecrf2 did not build (needs g++ and the Python headers; $(VENV)/pydensecrf2-build.log): SEAM will stop with one line; every other method works"
	touch $@

run: setup
	$(PY) -m experiments.run $(EXP) $(ARGS) $(if $(METHODS),methods=[$(METHODS)])

# WILSON's Table 1 end to end (every method of it and MBS, 15-5 disjoint and overlap), resumable:
# on the embedded dataset by default, DATASET=voc on Pascal VOC with the paper settings and numbers.
table: setup
	$(PY) -m experiments.table $(if $(filter command line environment,$(origin DATASET)),--dataset $(DATASET)) $(ARGS)

# PIFS's few-shot benchmark on one fold (1, 2 and 5 shots), resumable: the embedded synthetic_5_0_fewshot
# by default, EXP=voc_fss_5_0 (or another iFSS file) otherwise.
fewshot: setup
	$(PY) -m experiments.fewshot_table $(if $(filter command line environment,$(origin EXP)),$(EXP)) $(ARGS)

# Seed-averaged paper-style table: of EXP when given, else of every experiment under runs/.
compare: setup
	$(PY) -m experiments.compare $(if $(filter command line environment,$(origin EXP)),$(EXP)) $(COMPARE_ARGS)

# Hyper-parameter sweep experiments/sweeps/$(SWEEP).yaml: on wandb when logged in, LOCAL=1 runs it here
# (COUNT=n runs at most; EXP= another experiment; ARGS= overrides appended to every run).
SWEEP ?= mib_kd
sweep: setup
	$(PY) -m experiments.sweep $(SWEEP) $(if $(LOCAL),--local) $(if $(COUNT),--count $(COUNT)) $(if $(filter command line environment,$(origin EXP)),--experiment $(EXP)) $(if $(ARGS),-- $(ARGS))

# Optional: wandb's search algorithms, for local bayes sweeps (sweeps declares numpy<2, hence --no-deps).
sweep-setup: setup
	$(PY) -m pip install --quiet --no-deps sweeps==0.3.0
	$(PY) -m pip install --quiet jsonschema==4.26.0 jsonref==1.1.0 scikit-learn==1.9.1

# The comparison dashboard as code (a wandb workspace over EXP's runs, or every experiment's), saved to
# the user's entity and project after `wandb login`; ARGS=--print shows it without saving.
dashboard: setup
	$(PY) -m experiments.dashboard $(if $(filter command line environment,$(origin EXP)),$(EXP)) $(ARGS)

# Download (resumable), verify, extract and prepare a benchmark under $DATA_ROOT (else ./data).
DATASET ?= voc
data: setup
	$(PY) -m datamodules.prepare $(DATASET) $(if $(DATA_ROOT),--root $(DATA_ROOT))

# Training throughput and peak memory of the suite against a bare PyTorch loop (a measurement, not
# a test). On a GPU: make bench BENCH_ARGS="--preset r101-512 --precision bf16-mixed --channels-last"
bench: setup
	$(PY) -m experiments.bench $(BENCH_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

clean-runs:
	rm -rf runs wandb
