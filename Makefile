# Two commands do all set-up on a fresh machine:  `make demo`  (main job)  and  `make test`.
# torch is installed first and pinned (`TORCH_SPEC`): on a machine with a local CPU wheel of that version
# pip takes it (fast, no multi-GB CUDA download); on a GPU machine the same pin resolves to PyPI's CUDA
# build. Override with e.g. `make TORCH_SPEC="torch==2.13.0 --index-url <your wheel index>" test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,lora,face]"
	touch $(STAMP)

install: $(STAMP)

# Main job on the embedded default: GRPO post-training of the shipped base model on Shapes T2I prompts
# (recipes/t2i.yaml, about 9 minutes on 2 CPU cores), with the validation oracle score before and after.
# Each `make demo` starts afresh in runs/demo (its own folder); `qirl grpo ... --resume` continues one.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/qirl grpo recipes/t2i.yaml run.out_dir=runs/demo

test: $(STAMP)
	$(BIN)/pytest -q

test-all: $(STAMP)
	$(BIN)/pytest -q -m "not gpu"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) runs .pytest_cache
