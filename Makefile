# The two commands of the README. Each sets itself up: a virtual environment in .venv with this
# project installed (torch pinned to the builds this environment has on disk; override TORCH for
# a CUDA build, e.g. `make TORCH=torch test`).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test check bench-label clean

demo: $(STAMP)  ## the main job on the bundled demo, on an embedded local Ray
	$(VENV)/bin/raydar run --spec datasets/demo_cells.yaml

test: $(STAMP)  ## the test suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

check: $(STAMP)  ## the suite without the tests marked slow: the inner loop, a few minutes
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench-label: $(STAMP)
	$(PY) bench/label_throughput.py

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
