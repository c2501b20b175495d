# Two commands on a fresh machine:  `make demo` (train the default VAE) and `make test`.
# Each creates its own virtual environment in .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch from this machine's disk; the library itself accepts a range.
TORCH_PIN ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test test-slow docs clean
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/pyro-lvm fit

# the suite in two worker processes (pytest-xdist; a test file stays in one worker): ~7 min on 2 cores
test: $(VENV)/.installed
	$(PY) -m pytest -q --doctest-modules -n auto --maxprocesses 4 --dist loadfile pyro_lvm tests

# Long runs on full MNIST; data from ../shared/data unless PYRO_LVM_DATA says otherwise.
test-slow: $(VENV)/.installed
	PYRO_LVM_DATA=$${PYRO_LVM_DATA:-../shared/data} $(PY) -m pytest -q -m slow tests

docs: $(VENV)/.installed
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) docs/_build runs lightning_logs
