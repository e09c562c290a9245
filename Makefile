# Two commands on a fresh clone (Python 3.11; torch is pinned):
#   make demo   install once, then train the smoke demo on tiny generated data
#   make test   install once, then run the test suite
# Installation is stamped in $(VENV)/.installed and reruns only when setup.py or requirements/ change.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SMOKE_DATA := build/smoke

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): setup.py $(wildcard requirements/*.txt)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install setuptools wheel
	# basicsr's sdist would pull a second torch into an isolated build env, and its metadata pulls tb-nightly
	$(PIP) install --no-build-isolation --no-deps basicsr==1.4.2
	$(PIP) install -r requirements/runtime.txt -r requirements/test.txt
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

$(SMOKE_DATA): $(STAMP) scripts/make_smoke_data.py
	$(PY) scripts/make_smoke_data.py --out $(SMOKE_DATA)

demo: $(STAMP) $(SMOKE_DATA)
	$(PY) -m datprl_arch.train -opt options/demo/smoke.yml

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(SMOKE_DATA) experiments/datprl_smoke*
