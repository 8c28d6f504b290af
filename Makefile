# rtface — quick start: `make engine && make serve`, then (another shell) `make test`.
# Variables (environment or command line) are read by tools/settings.py, which holds the defaults:
#   engine: BACKEND INPUT_SIZE MAX_BATCH TOPK MAX_DET PRECISION ONNX
#   serve:  HOST GRPC_PORT HTTP_PORT METRICS_PORT
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install engine serve test perf bench eval clean help

help:
	@sed -n '1,5p' Makefile

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[server,tools,test,perf]'
	touch $@

engine: install
	$(PY) -m tools.build_engine

serve: install
	$(PY) -m tools.serve

test: install
	$(PY) -m pytest

clean:
	rm -rf build results
	rm -f model_repository/*/config.pbtxt model_repository/*/1/model.onnx \
	      model_repository/*/1/model.plan model_repository/*/1/build.json
