# Set-up and the two everyday commands: `make demo` (real CT) and `make test`; `make demo-phantom` is a quicker
# walk-through on generated data.
# Both create (or reuse) a virtual environment in .venv/ and install fsseg into it.
#
#   TORCH        pip requirement for PyTorch, installed first (default: the CPU build torch==2.13.0).
#   TORCH_INDEX  optional package index for TORCH, e.g. https://download.pytorch.org/whl/cu124 for CUDA.
#   PYTHON       interpreter used to create the environment (default: python3).
#   DEMO_DIR     where the demo writes its data and runs (default: demo_out; demo-phantom: DEMO_PHANTOM_DIR,
#                default demo_phantom_out).
#   DEMO_PHANTOM_ARGS / DEMO_PRETRAIN_ARGS / DEMO_ADAPT_ARGS
#                extra arguments of the demos' steps (the tests run reduced demos with them).
#   TEST_WORKERS pytest-xdist workers of `make test` (default: auto, one a core; 0 runs the tests in one process).
#   PYTEST_ARGS  extra pytest arguments, e.g. PYTEST_ARGS="tests/test_adapt.py -k resume".

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR ?= demo_out
DEMO_PHANTOM_DIR ?= demo_phantom_out
DEMO_PHANTOM_ARGS ?=
DEMO_PRETRAIN_ARGS ?=
DEMO_ADAPT_ARGS ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= auto

BIN := $(VENV)/bin
STAMP := $(VENV)/.fsseg-installed
# The adapter file fsseg-adapt named best in its run folder $(1).
best_adapter = $$($(BIN)/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["best"]["adapter"])' $(1)/results.json)

.PHONY: setup demo demo-phantom lint test clean-demo

setup: $(STAMP)

# A different TORCH requirement than the one installed forces a re-install.
$(shell test "$$(cat $(STAMP) 2>/dev/null)" = "$(TORCH)" || rm -f $(STAMP))

# Re-installs only when the package metadata or the torch requirement changed.
$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev,viz,dicom,bundle,astra,docs,peft]"
	$(BIN)/python -m pip install -q --no-deps "dynamic-network-architectures>=0.4"  # the nnunet extra without timm
	@echo "$(TORCH)" > $@

# The demo on the sample CT: a tiny UNet pretrained on subject TS-A with the liver never supervised, adapted to the
# liver from 1 and 2 scans of two other subjects (TS-B, LIDC-0001) and scored on a fourth (LITS-117).
demo: $(STAMP)
	@echo "== 1/6 Writing the sample CT (5 real scans of 4 subjects) and its data lists -> $(DEMO_DIR)/data"
	$(BIN)/fsseg-sample-data --out $(DEMO_DIR)/data
	@echo "== 2/6 Checking every data list"
	$(BIN)/fsseg-check-data --no-progress $(DEMO_DIR)/data/sample_ct_*.json
	@echo "== 3/6 Pretraining a tiny UNet on subject TS-A, its liver never supervised -> $(DEMO_DIR)/pretrain"
	$(BIN)/fsseg-pretrain --config configs/pretrain/demo_ct.yaml --out $(DEMO_DIR)/pretrain --resume auto --no-progress \
		--data-list $(DEMO_DIR)/data/sample_ct_liver_pretrain.json $(DEMO_PRETRAIN_ARGS)
	@echo "== 4/6 Adapting it to the liver from K = 1 and 2 scans of TS-B and LIDC-0001, scored on LITS-117 -> $(DEMO_DIR)/adapt"
	$(BIN)/fsseg-adapt --checkpoint $(DEMO_DIR)/pretrain/model.pt \
		--data-list $(DEMO_DIR)/data/sample_ct_liver_fewshot.json --organ liver --shots 1 2 \
		--method lp adapter affine-ln ft-last ft --seeds 1 --out $(DEMO_DIR)/adapt \
		--set method_configs=configs/adapt/demo --no-progress $(DEMO_ADAPT_ARGS)
	@echo "== 5/6 Predicting LITS-117 with the best adapter -> $(DEMO_DIR)/predict"
	$(BIN)/fsseg-predict -i $(DEMO_DIR)/data/sample_ct_liver_fewshot.json --split test -o $(DEMO_DIR)/predict \
		-m $(DEMO_DIR)/pretrain/model.pt --preview --no-progress \
		--adapter "$(call best_adapter,$(DEMO_DIR)/adapt)"
	@echo "== 6/6 Scoring the prediction in LITS-117's native space -> $(DEMO_DIR)/evaluate"
	$(BIN)/fsseg-evaluate --pred $(DEMO_DIR)/predict --data-list $(DEMO_DIR)/data/sample_ct_liver_fewshot.json \
		-o $(DEMO_DIR)/evaluate --no-progress
	@echo "Done. Pictures: $(DEMO_DIR)/adapt/pictures/, $(DEMO_DIR)/adapt/dice_vs_shots.png, $(DEMO_DIR)/predict/*.png," \
		"$(DEMO_DIR)/evaluate/dice_boxplot.png. What the run measured:"
	@cat $(DEMO_DIR)/adapt/summary.txt

# The walk-through on generated phantoms: a quicker look at every step, not evidence for the method.
demo-phantom: $(STAMP)
	@echo "== 1/6 Generating phantom CT data sets in $(DEMO_PHANTOM_DIR)/data"
	$(BIN)/fsseg-phantom --out $(DEMO_PHANTOM_DIR)/data --no-progress $(DEMO_PHANTOM_ARGS)
	@echo "== 2/6 Checking every data list"
	$(BIN)/fsseg-check-data --no-progress $(DEMO_PHANTOM_DIR)/data/phantom_*.json
	@echo "== 3/6 Pretraining a tiny model on the partially labelled source data sets -> $(DEMO_PHANTOM_DIR)/pretrain"
	$(BIN)/fsseg-pretrain --config configs/pretrain/tiny.yaml --out $(DEMO_PHANTOM_DIR)/pretrain --resume auto --no-progress \
		--data-list $(DEMO_PHANTOM_DIR)/data/phantom_source_a.json $(DEMO_PHANTOM_DIR)/data/phantom_source_b.json \
		$(DEMO_PHANTOM_DIR)/data/phantom_source_c.json $(DEMO_PRETRAIN_ARGS)
	@echo "== 4/6 Adapting to the gallbladder, which no source annotates (1 and 5 shots, 2 seeds) -> $(DEMO_PHANTOM_DIR)/adapt"
	$(BIN)/fsseg-adapt --checkpoint $(DEMO_PHANTOM_DIR)/pretrain/checkpoint_latest.pt --data-list $(DEMO_PHANTOM_DIR)/data/phantom_target.json \
		--organ gallbladder --shots 1 5 --method lp adapter ft --seeds 2 --out $(DEMO_PHANTOM_DIR)/adapt \
		--set method_configs=configs/adapt/demo --no-progress $(DEMO_ADAPT_ARGS)
	@echo "== 5/6 Predicting the target test scans with the best adapter -> $(DEMO_PHANTOM_DIR)/predict"
	$(BIN)/fsseg-predict -i $(DEMO_PHANTOM_DIR)/data/phantom_target.json --split test -o $(DEMO_PHANTOM_DIR)/predict \
		-m $(DEMO_PHANTOM_DIR)/pretrain/checkpoint_latest.pt --preview --no-progress \
		--adapter "$(call best_adapter,$(DEMO_PHANTOM_DIR)/adapt)"
	@echo "== 6/6 Scoring the predictions in native space -> $(DEMO_PHANTOM_DIR)/evaluate"
	$(BIN)/fsseg-evaluate --pred $(DEMO_PHANTOM_DIR)/predict --data-list $(DEMO_PHANTOM_DIR)/data/phantom_target.json \
		-o $(DEMO_PHANTOM_DIR)/evaluate --no-progress
	@echo "Done. Data: $(DEMO_PHANTOM_DIR)/data  model: $(DEMO_PHANTOM_DIR)/pretrain  adaptation: $(DEMO_PHANTOM_DIR)/adapt/results.csv" \
		" masks: $(DEMO_PHANTOM_DIR)/predict  scores: $(DEMO_PHANTOM_DIR)/evaluate/summary.json"

# pytest exits 5 when it collected no tests, so an empty run fails here too. tests/test_installed.py builds the
# wheel and installs it into .venv-installed/ with the same PyTorch requirement. The workers split the cores: torch in
# each keeps to its share, one thread with one worker a core (tests/conftest.py).
# ruff (lint and format) and mypy, the checks .pre-commit-config.yaml runs before each commit; `make test` runs
# them first.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) lint
	FSSEG_TORCH="$(TORCH)" FSSEG_TORCH_INDEX="$(TORCH_INDEX)" $(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR) $(DEMO_PHANTOM_DIR)
