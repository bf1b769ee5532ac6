# make demo: install (CPU torch if none) and run the CPU demo: train on built-in data, then sample.
# make test: install (with the optional W&B extra, for its offline test) and run the test suite (the command CI runs).
# Both install the versions in constraints.txt, the ones the suite is proven with.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/megassm_torch_extensions
export DS_BUILD_OPS := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==$(TORCH_VERSION) -c constraints.txt
	$(PIP) install -e ".[dev,wandb,remote]" -c constraints.txt  # wandb and remote (fsspec, s3fs, moto) pull no torch: the CPU build above stays

demo: install
	megassm train configs/smoke.yaml
	megassm sample runs/smoke --prompt "a red square at the top left" --prompt "a blue square at the bottom right" \
		--prompt "a green square at the top right" --prompt "a yellow square at the bottom left" \
		--prompt "a white square at the top left" --prompt "a red square at the bottom right" --out samples/demo.png

# Two workers, a test file each: the suite's processes (imports, gloo ranks waiting on each other) leave
# a core idle much of the time. Tests never share ports or directories (free_port, tmp_path).
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

lint:
	ruff check megassm tests tools benchmarks
