# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when missing.
# torch==2.13.0 is installed first, from the CPU index pip is configured for: the project's `torch>=2.4`
# is then satisfied and pip never pulls a second (CUDA) torch build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_DEMO := $(VENV)/.installed-demo
STAMP_TEST := $(VENV)/.installed-test
DEMO_OUT ?= out/demo

.PHONY: demo test install clean wheel

install: $(STAMP_TEST)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# the demo: export (torch), run on ONNX Runtime CPU (ort), build TensorRT-RTX engines (trt)
$(STAMP_DEMO): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[torch,ort,trt,text]"
	touch $(STAMP_DEMO)

# the tests: the demo's extras plus pytest, transformers (HF fidelity), polygraphy
$(STAMP_TEST): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[torch,ort,trt,text,test]"
	touch $(STAMP_DEMO) $(STAMP_TEST)

test: $(STAMP_TEST)
	$(PY) -m pytest -q

demo: $(STAMP_DEMO)
	$(VENV)/bin/armt demo --out $(DEMO_OUT)

wheel: $(STAMP_TEST)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .

clean:
	rm -rf $(VENV) out .pytest_cache build dist
