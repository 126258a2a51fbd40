# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo loss-demo test plot clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

# The tests also exercise the nemo-run launcher, lint the Dockerfile, and run SGLang's own
# (pure-Python) code for the contract tests: sglang without its GPU dependencies.
$(VENV)/.installed-test: $(VENV)/.installed tests/requirements-sglang-cpu.txt tests/requirements-sglang-nodeps.txt
	$(PY) -m pip install -q -e ".[dev,launch,lint,triton]"
	$(PY) -m pip install -q -r tests/requirements-sglang-cpu.txt
	$(PY) -m pip install -q --no-deps -r tests/requirements-sglang-nodeps.txt
	touch $@

setup: $(VENV)/.installed

# The main job on the embedded default: tiny Qwen2-shaped model, arithmetic task, data parallel on 2 CPU
# processes of 1 thread each (the fastest layout measured on 2 cores; README "Layout of the demo").
demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 examples/train_dgpo.py --config examples/configs/embedded_cpu.yaml --overwrite

loss-demo: setup
	$(PY) examples/loss_demo.py

test: $(VENV)/.installed-test
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q tests

plot: setup
	$(PY) tools/plot_gradient_weights.py --out docs/gradient_weights.png

clean:
	rm -rf $(VENV) outputs .pytest_cache
