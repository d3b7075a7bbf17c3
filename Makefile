# The README's two commands: `make demo` (the main job) and `make test`. Both set themselves up.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)

.PHONY: setup test demo reproduce bench mutation clean

setup: $(STAMP)

# torch is pinned to 2.13.0 in setup.py and installed first, so pip takes the local CPU wheel and
# nothing can pull another torch build; fairseq-fixed compiles once (~5 min), then pip's cache is used.
$(STAMP): setup.py
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: install Python 3.11, or pass PYTHON=/path/to/python3.11 (make demo PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,plot,baselines]"
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	rm -f $(VENV)/.installed-* && touch $@

# The tests whose numbers depend on the CPU's int8 and vector kernels run twice: as this CPU is, then as an AVX2-only
# CPU without VNNI (7-bit activations on the int8 kernel), through the switches int8_linear.AVX2_WITHOUT_VNNI names
CPU_CLASS_TESTS := tests/test_int8_activations.py tests/test_inference_compute.py tests/test_lut.py \
	tests/test_safety_and_fallbacks.py::test_a_saturating_cpu_gets_7_bit_activations_and_no_kernel_when_even_those_saturate
AVX2_ENV = $(BIN)/python -c "from quant_noise_plugin.int8_linear import AVX2_WITHOUT_VNNI as e; print(*(f'{k}={v}' for k, v in e.items()))"

test: setup
	$(BIN)/python -m pytest -q
	env $$($(AVX2_ENV)) $(BIN)/python -m pytest -q $(CPU_CLASS_TESTS)

demo: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python scripts/demo.py

# extra flags: make reproduce ARGS="--device cuda" (or --preset quick, --experiment demo, --lm-modes ..., --render-only);
# the grid (presets, rows, columns) is configs/experiments/*.yaml; `scripts/reproduce.py --help` lists it
reproduce: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python scripts/reproduce.py $(ARGS)

bench: setup
	$(BIN)/python benchmarks/bench_kmeans.py
	$(BIN)/python benchmarks/bench_noise_throughput.py
	$(BIN)/python benchmarks/bench_eval_memory.py

# do the fast tests fail when sizes, schedule, pq, scalar, bitpack, gptq or integrity is grossly wrong? results/mutation.md
# (every mutant, ~5 min on 2 cores; ARGS="--per-module 40" for a sample)
mutation: setup
	$(BIN)/python benchmarks/mutation.py $(ARGS)

clean:
	rm -rf checkpoints work_dirs
