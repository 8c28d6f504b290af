# rtface — quick start: `make engine && make serve`, then (another shell) `make test`.
# Variables (environment or command line) are read by tools/settings.py, which holds the defaults:
#   engine: MODEL (mnet025, mnv2) BACKEND INPUT_SIZE MAX_BATCH TOPK MAX_DET PRECISION ONNX ONNX_INPUT OVERLOAD_KEEP
#           MAX_QUEUE QUEUE_TIMEOUT_MS
#           GPU_INSTANCES GPUS TORCH_COMPILE CUDNN_ALGORITHMS CUDA_WAITS POSTPROCESS_INSTANCES PREPROCESS
#           PREPROCESS_INSTANCES MAX_IMAGE_PIXELS
#   serve:  HOST GRPC_PORT HTTP_PORT METRICS_PORT METRICS_HOST SHM_TOKEN CUDA_POOL_MB TRACE_FILE
#   perf:   MODEL CONCURRENCY SHM BATCH URL      bench: BENCH_SIZES BENCH_IMAGES BENCH_REPEATS
#   bench-video: VIDEO VIDEO_SIZE VIDEO_FRAMES CONCURRENCY URL
#   eval:   DATA (WIDER-format folder) URL       soak: URL SOAK_SECONDS SERVER_PID    caps: CAPS
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install engine serve test perf perf-deps bench eval eval-selfie parity caps bench-video soak overload trace-report clean help

help:
	@sed -n '1,10p' Makefile

install: $(STAMP)

# A system-wide TensorRT (NVIDIA's TensorRT container) stays visible to the venv
VENV_FLAGS := $(shell $(PYTHON) -c 'import tensorrt' >/dev/null 2>&1 && echo --system-site-packages)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[server,tools,test,perf]'
	touch $@

# BACKEND=torch brings PyTorch into the venv (the optional `gpu` extra) before the build;
# BACKEND=tensorrt the pinned TensorRT (`trt` extra) unless the venv already sees one
GPU_STAMP := $(VENV)/.gpu-stamp
TRT_STAMP := $(VENV)/.trt-stamp

# MODEL names the network for engine, serve and the accuracy targets (perf's MODEL is a Triton model)
NETWORK_ENV := $(if $(MODEL),NETWORK=$(MODEL))

engine: install $(if $(filter torch,$(BACKEND)),$(GPU_STAMP)) $(if $(filter tensorrt,$(BACKEND)),$(TRT_STAMP))
	$(NETWORK_ENV) $(PY) -m tools.engine.build

$(GPU_STAMP): $(STAMP)
	$(VENV)/bin/pip install -q -e '.[server,tools,test,perf,gpu]'
	touch $@

$(TRT_STAMP): $(STAMP)
	$(PY) -c 'import tensorrt' 2>/dev/null || $(VENV)/bin/pip install -q -e '.[server,tools,test,perf,trt]'
	touch $@

serve: install
	$(NETWORK_ENV) $(PY) -m tools.serve

test: install
	$(PY) -m pytest

# perf_analyzer (inside the tritonclient wheel) links libb64; install it where apt can
perf-deps:
	@ldconfig -p | grep -q libb64.so.0d || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && apt-get install -y -qq libb64-0d >/dev/null); } || true

perf: install perf-deps
	$(PY) -m tools.bench.perf

bench: install
	$(PY) -m tools.bench.side_by_side

# where each request's time went, from the trace a `TRACE_FILE=... make serve` wrote when it stopped
trace-report: install
	@test -n "$(TRACE_FILE)" || { echo "make trace-report: set TRACE_FILE=<the file TRACE_FILE=... make serve wrote>"; exit 1; }
	$(PY) -m tools.bench.trace_report "$(TRACE_FILE)"

# `rtface detect` on a clip (VIDEO=..., or a VIDEO_SIZE clip written once) against the SDK on its frames
bench-video: install
	$(PY) -m tools.bench.video

eval: install
	@test -n "$(DATA)" || { echo "make eval: set DATA=<WIDER-format folder> (<event>/<name>.jpg + the official wider_*_val.mat)"; exit 1; }
	$(NETWORK_ENV) $(PY) -m tools.evaluation.cli wider --data "$(DATA)" $(if $(URL),--url $(URL))

eval-selfie: install
	$(NETWORK_ENV) $(PY) -m tools.evaluation.cli selfie $(if $(URL),--url $(URL))

parity: install
	$(NETWORK_ENV) $(PY) -m tools.evaluation.cli parity $(if $(URL),--url $(URL))

# TOPK/MAX_DET settings side by side: selfie AP, postprocess and ensemble speed (CAPS=1000/750,...)
caps: install perf-deps
	$(NETWORK_ENV) $(PY) -m tools.evaluation.caps

# against a running server (`make serve`): 8 mixed clients for SECONDS, and a 10x burst
soak: install
	$(PY) -m tools.operations.soak --url $(or $(URL),127.0.0.1:8001) --seconds $(or $(SOAK_SECONDS),120) \
	  $(if $(SERVER_PID),--server-pid $(SERVER_PID))

overload: install
	$(PY) -m tools.operations.overload --url $(or $(URL),127.0.0.1:8001)

clean:
	rm -rf build results
	rm -f model_repository/*/config.pbtxt model_repository/*/1/model.onnx \
	      model_repository/*/1/model.plan model_repository/*/1/model.pt \
	      model_repository/*/1/build.json
