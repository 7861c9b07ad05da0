# Set-up and the two everyday commands: `make demo` and `make test`.
# Both create (or reuse) a virtual environment in .venv/ and install fsseg into it.
#
#   TORCH        pip requirement for PyTorch, installed first (default: the CPU build torch==2.13.0).
#   TORCH_INDEX  optional package index for TORCH, e.g. https://download.pytorch.org/whl/cu124 for CUDA.
#   PYTHON       interpreter used to create the environment (default: python3).
#   DEMO_DIR     where the demo writes its data and runs (default: demo_out).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.fsseg-installed

.PHONY: setup demo test clean-demo

setup: $(STAMP)

# A different TORCH requirement than the one installed forces a re-install.
$(shell test "$$(cat $(STAMP) 2>/dev/null)" = "$(TORCH)" || rm -f $(STAMP))

# Re-installs only when the package metadata or the torch requirement changed.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev,viz]"
	@echo "$(TORCH)" > $@

demo: $(STAMP)
	@echo "== 1/3 Generating phantom CT data sets in $(DEMO_DIR)/data"
	$(BIN)/fsseg-phantom --out $(DEMO_DIR)/data
	@echo "== 2/3 Checking every data list"
	$(BIN)/fsseg-check-data --no-progress $(DEMO_DIR)/data/*.json
	@echo "== 3/3 Pretraining a tiny model on the partially labelled source data sets"
	$(BIN)/fsseg-pretrain --config configs/pretrain/tiny.yaml --out $(DEMO_DIR)/pretrain --resume auto \
		--data-list $(DEMO_DIR)/data/phantom_source_a.json $(DEMO_DIR)/data/phantom_source_b.json \
		$(DEMO_DIR)/data/phantom_source_c.json
	@echo "Data and lists: $(DEMO_DIR)/data; pretrained model: $(DEMO_DIR)/pretrain/checkpoint_latest.pt"

# pytest exits 5 when it collected no tests, so an empty run fails here too.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)
