# Verbs a user types. `make setup` makes .venv/; every other verb uses it (and makes it if missing).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The data root holds one folder per dataset; beside a checkout with ../shared/ (tests, CI) use that.
export ANYMS_DATA_ROOT ?= $(if $(wildcard ../shared/dreambench),$(abspath ../shared),)
# The real-size check (about 17 min and 14 GiB here) runs as `make check-real-size`, not in `make test`: with it,
# CI would take an estimated ~40 min of its 45-min budget. PYTEST_ARGS='-m real_size' runs only it through pytest.
PYTEST_ARGS ?= -m "not real_size"

# Hydra overrides from make variables: `make generate benchmark=anyms11 model=tiny method=wo_local`.
# ARGS passes anything else through: `make generate ARGS="-m method=anyms,wo_local"`.
HYDRA_KEYS := model method benchmark generation run_dir data_root shard overwrite
OVERRIDES = $(foreach k,$(HYDRA_KEYS),$(if $(value $(k)),$(k)=$(value $(k))))
ARGS ?=

.PHONY: help setup test test-fast lint lint-imports generate evaluate report smoke benchmark paper-tables bench-perf check-real-size data clean-venv

setup: $(STAMP) ## install .venv/ (every other verb does it when missing); plain `make` runs this

$(STAMP): pyproject.toml constraints.txt scripts/setup_env.sh scripts/torchvision_cpu_ops.py
	bash scripts/setup_env.sh
	@touch $@

# pytest exits 5 when it collected no test: that is a failure here, not a pass
test: setup ## the test suite without the real-size check (PYTEST_ARGS=...)
	@$(PY) -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: setup ## the tests not marked slow
	@$(PY) -m pytest tests -m "not slow and not real_size"

# images of a benchmark into a run folder (default: the smoke benchmark on the tiny models)
generate: setup ## images into a run folder (default: smoke benchmark, tiny model; benchmark= model= method= ...)
	$(PY) scripts/generate.py $(OVERRIDES) $(ARGS)

# a run folder's metrics (default: the smoke run), scored by the tiny random evaluators like every verb's default
# (the tiny profile) whatever the run folder; eval=default for the real evaluators. Its first line names them.
RUN_DIR ?= runs/$(or $(value benchmark),smoke)-$(or $(value model),tiny)
EVAL ?= tiny
evaluate: setup ## a run folder's metrics (run_dir=, default the smoke run; eval=tiny unless eval=default)
	$(PY) scripts/evaluate.py run_dir=$(if $(value run_dir),$(value run_dir),$(RUN_DIR)) eval=$(if $(value eval),$(value eval),$(EVAL)) $(ARGS)

# Tables 1-2, Fig. 4, the comparison figures and index.html of a run folder into <run_dir>/report/
report: setup ## tables, figures and index.html of a run folder into <run_dir>/report/ (run_dir=)
	$(PY) scripts/report.py run_dir=$(if $(value run_dir),$(value run_dir),$(RUN_DIR)) $(ARGS)

# generate -> evaluate -> report on the smoke benchmark with the tiny models (about a minute)
smoke: generate evaluate report ## generate -> evaluate -> report on the smoke benchmark, tiny models (~1 min)

# The whole protocol: every method on the 11 combinations -> metrics -> Table 1, Table 2, Fig. 4.
#   PROFILE=tiny  (default) tiny random models, seeds 0-1: a plumbing check of everything, minutes here
#   PROFILE=paper SDXL + IP-Adapter Plus at 1024 px, seeds 0-99, the real evaluators: needs a GPU and the weights
PROFILE ?= tiny
PROFILE_MODEL_tiny := tiny
PROFILE_SEEDS_tiny := 0-1
PROFILE_EVAL_tiny := tiny
PROFILE_MODEL_paper := sdxl
PROFILE_SEEDS_paper := 0-99
PROFILE_EVAL_paper := default
B_MODEL = $(PROFILE_MODEL_$(PROFILE))
B_RUN ?= runs/anyms11-$(B_MODEL)
benchmark: setup ## the whole protocol: every method, 11 combinations -> tables, figures, report/index.html (PROFILE=tiny | paper)
	@[ -n "$(B_MODEL)" ] || { echo "make benchmark: PROFILE must be tiny or paper, got '$(PROFILE)'"; exit 2; }
	$(PY) scripts/generate.py -m +experiment=table1 model=$(B_MODEL) benchmark.seeds=$(PROFILE_SEEDS_$(PROFILE)) run_dir=$(B_RUN) $(ARGS)
	$(PY) scripts/evaluate.py run_dir=$(B_RUN) eval=$(PROFILE_EVAL_$(PROFILE))
	$(PY) scripts/report.py run_dir=$(B_RUN)

# the tables again from a run folder's existing metrics (no generation, no evaluation)
paper-tables: setup ## the tables again from a run folder's metrics (PROFILE=tiny | paper)
	@[ -n "$(B_MODEL)" ] || { echo "make paper-tables: PROFILE must be tiny or paper, got '$(PROFILE)'"; exit 2; }
	$(PY) scripts/report.py run_dir=$(B_RUN)

# Speed and memory (benchmarks/): AnyMS next to the stock IP-Adapter, evaluation next to generation; random
# weights at real size; about 11 minutes here. BENCH_ARGS=--sdxl adds the SDXL UNet step (about 20 min more).
BENCH_ARGS ?=
bench-perf: setup ## speed and memory benchmarks (benchmarks/, ~11 min; BENCH_ARGS=--sdxl)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# The paper's models at their real architectures with random weights (SDXL + IP-Adapter Plus ViT-H, MS-Diffusion
# with CLIP bigG/14, GroundingDINO SwinT, SAM ViT-H, CLIP, DINO, DreamSim) through generate -> evaluate at 1024 px,
# 2 steps, one image per method: every real shape and dtype path, before GPU hours. bf16 on CPU, fp16 on CUDA.
# Prints peak memory per stage; writes benchmarks/results/<date>-<device>-real_size.{md,json}.
REAL_SIZE_ARGS ?=
check-real-size: setup ## the paper's models at real size, random weights, generate -> evaluate (~17 min)
	$(PY) -m benchmarks.real_size $(REAL_SIZE_ARGS)

lint: setup ## ruff
	$(VENV)/bin/ruff check anyms eval runfolder scripts tests benchmarks

# the architecture rules (import-linter; contracts in pyproject.toml): anyms and eval never import each other,
# the method core imports nothing of the generation stage, no cycles
lint-imports: setup ## the architecture rules (import-linter)
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports

# DreamBench subject images into $$ANYMS_DATA_ROOT or data/
data: setup ## DreamBench and MS-Bench into $ANYMS_DATA_ROOT or data/
	$(PY) scripts/fetch_data.py

clean-venv: ## remove .venv/
	rm -rf $(VENV)

# One line per verb, from the `## ` note on its rule line; needs nothing installed.
help: ## this list
	@awk -F ':.*## ' '/^[a-z][a-z-]*:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
