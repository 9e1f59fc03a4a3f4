# The two commands of the README: `make demo` (the main job) and `make test`.
# Each creates .venv on first use: torch (the pinned CPU build of constraints.txt, unless a
# torch is already installed system-wide, as on a GPU machine) and vmem in editable mode.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

demo: $(STAMP)
	$(PY) -m vmem demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check vmem tests bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -c constraints.txt torch
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
