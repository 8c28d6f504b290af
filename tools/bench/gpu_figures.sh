#!/usr/bin/env bash
# The GPU section of docs/benchmarks.md, on one host with a CUDA GPU where the project runs
# (PyTorch, tritonserver and perf_analyzer found as `make perf` finds them). Each phase is one
# argument, run in the order given; figures, logs and tables land in $GPU_OUT (results/gpu):
#
#   served   BACKEND=torch build (default settings) and an onnxruntime build on the same host;
#            perf_analyzer over CUDA shm against each: one-image requests at concurrency 1 and
#            8..64, 16-image requests
#   pool     the torch build again with Triton's default CUDA pool (64 MiB)
#   variants the same perf_analyzer runs on builds with other settings (VARIANTS: build_scratch
#            arguments, default one, two and four detector instances)
#   trace    one-image requests at concurrency 1 with Triton's trace on, against the torch build, the
#            onnxruntime build `served` wrote (when it is there) and each one's floor (the same
#            repository with steps that answer at once): where each request's time goes;
#            TRACE_REPOS adds built repositories to trace after those (e.g. other code on the same build)
#   tests    the GPU pytest (`-m gpu`)
#   parity   `make parity`: served torch and served onnxruntime against the in-process graph
#   soak     a 60 s soak against the torch server (8 clients, CUDA shm and gRPC)
#   video    `make bench-video` on $VIDEO (an H.264 clip; default: the one it writes) at
#            concurrency 4 and 16
#   bench    `make bench` at 1280x960 (CPU and GPU rows side by side)
#   sdk      `make bench`'s in-process rows (forward, a, b) and its GPU rows (f, g, i) alone at 1280x960,
#            without the served CPU rows and the transport table (minutes of CPU detector time)
#   encoded  the encoded ensemble beside the pixel one on one torch server: JPEG decoding alone
#            (tools/bench/jpeg_decode.py), perf_analyzer on retinaface_encoded (JPEG frames, gRPC) and on
#            retinaface (the same frames' pixels, gRPC and CUDA shm), one-image and 16-image requests,
#            then `make bench`'s GPU rows f, g, i (the SDK: pixels over CUDA shm and gRPC, JPEG over gRPC)
#   processes  the SDK's encoded row from 1, 2 and 3 client processes at once
#   coldstart  the default torch build (compiled at make engine) beside TORCH_COMPILE=load with cuDNN's
#            benchmark (LOAD_CUDNN; the torch build before 2026-12-03): time to ready on an empty
#            Inductor cache, each instance's loading steps, one-image and 16-image perf_analyzer runs
#   alone    the default torch build's detector alone at batch 1 and 16, its program compiled at load
#            beside its AOTInductor packages (tools/bench/gpu_detector.py, variant served); then its
#            packages captured with each cuDNN choice of BENCH_CUDNN (tools/bench/capture_cost.py)
#   cudnn    how cuDNN picks the torch detector's convolution algorithms (CUDNN_ALGORITHMS): the default
#            build's packages captured with each of BENCH_CUDNN (tools/bench/capture_cost.py), then that
#            build served with each of CUDNN_SERVE (copies of model_repository/ differing in that
#            parameter only), each on an empty Inductor cache: time to ready, each instance's loading
#            steps, one-image and 16-image perf_analyzer runs
#   preprocess  perf_analyzer on retinaface_encoded for builds with PRE_INSTANCES (default "2 4 8") torch
#            preprocess instances per GPU (PREPROCESS=torch), and the SDK rows against the build with SDK_WITH
#            (4) of them
#   decode   where encoded images are decoded, side by side on one build: inside the torch detector's
#            process (the default, PREPROCESS=detector) and in a GPU step of its own (PREPROCESS=torch, the
#            same build's configs rewritten, build/step): perf_analyzer on retinaface_encoded, one-image
#            (DEC_B1) and 16-image (DEC_B16) requests, and on retinaface over CUDA shm (the pixel path)
#            against the default; then the SDK rows (f, g, i, j) against the default unless DEC_SDK=0
#   instances  the default build's configs rewritten for each of INSTANCES (default "4 6 8") detector
#            instances and each of WAITS (default "block spin", CUDA_WAITS), served in turn: perf_analyzer on
#            retinaface_encoded at ENC_SPECS (BATCH:CONCURRENCY:REQUESTS, default "16:16:120 1:64:800")
#            through tools/bench/cpu_cost.py (CPU ms per image by process), `nvidia-smi dmon -s u` (SM and
#            JPEG-engine utilisation) beside each run, then the pixel path over CUDA shm; one table
#   builds   the builds of BUILDS (default "default mnv2 base"), compiled side by side: this tree's default
#            torch build in model_repository/, its MODEL=mnv2 build in build/net-mnv2 (ONNX=$MNV2_ONNX
#            when set) and BASE's in build/base-repo; later phases find them up to date
#   networks each network's torch build (model_repository/, build/net-mnv2) served in turn: time to ready,
#            one-image requests at c=64 and 16-image requests at c=8, pixels over CUDA shm
#   profile  one request through the default build's graph in-process, phase by phase, beside the network
#            alone, the GPU postprocess eager beside torch.compile, a crowd's numpy fallback and
#            torch.profiler's kernel table (tools/bench/execute_profile.py; BENCH_BATCHES, BENCH_REPEATS)
#   mps      the default build served twice on one host: as is (each detector instance and the server a CUDA
#            context of its own, which the GPU time-slices), then with CUDA's Multi-Process Service
#            (nvidia-cuda-mps-control, started for the run with its pipe and log folders under build/mps and
#            stopped after it; every process started meanwhile shares one context): the goal rows at c=1,
#            c=$COST_C and 16 images, and Triton's statistics of each
#   hop      the default build served once (build/hop: its detector's inputs made required, since
#            perf_analyzer refuses optional inputs over shared memory; tools/bench/ensemble_hop.py): the goal
#            rows of pixels over CUDA shm against the ensemble `retinaface` and against its one step
#            `retinaface_detector` directly, interleaved, two rounds
#            (what the ensemble's hand-over costs: inside it, each response's outputs are copied into the
#            client's CUDA region on one stream that all the ensemble's requests share, with a wait each)
#   cost     per-request cost, before and after: BASE's model code (default build/base, a checkout of an
#            earlier commit; built by its own tools into build/base-repo) and this tree's, served in turn:
#            perf_analyzer at concurrency 1 (pixels over CUDA shm, JPEG over
#            gRPC), one-image requests at COST_C (64), 16-image requests (pixels at c=8, JPEG at c=16),
#            the SDK's Client.detect one frame at a time (tools/bench/sdk_latency.py, BASE's SDK for BASE)
#            and a burst of 512 requests (tools/operations/overload.py); then the same perf_analyzer rows
#            for this tree's build with each of COST_INSTANCES detector instances (configs rewritten);
#            COST_REPOS (default "build/base-repo model_repository") picks what is served
#
# Usage: bash tools/bench/gpu_figures.sh builds profile tests trace hop mps cost networks, or served trace pool variants tests parity soak video bench encoded
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${GPU_OUT:-results/gpu}
PY=${PY:-python3}
export PYTHONPATH="$PWD/client:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the SDK and tools where the project is not installed
mkdir -p "$OUT_DIR"
source tools/bench/serving.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT_DIR/card.txt" 2>&1
nproc >> "$OUT_DIR/card.txt"

build_default() {  # the default torch build in model_repository/ (a no-op when it is there)
  BACKEND=torch "$PY" -m tools.engine.build > "$OUT_DIR/build-torch.log" 2>&1 || { tail -5 "$OUT_DIR/build-torch.log"; return 1; }
  grep -E '^(backend|postprocess|validation|detector|up to date)' "$OUT_DIR/build-torch.log"
}

served() {  # SWEEP_B1 / SWEEP_B16: concurrency ranges of the one-image and 16-image sweeps
  time build_default || return 1
  "$PY" -c "from pathlib import Path; from tools.engine.build import build_scratch; build_scratch(Path('build/gpu-cpu'), backend='onnxruntime')" \
    > "$OUT_DIR/build-cpu.log" 2>&1 || { tail -5 "$OUT_DIR/build-cpu.log"; return 1; }
  echo "== torch detector at the defaults"
  serve model_repository 9100 && {
    perf 9100 torch-c1 1 1:1:1 500
    perf 9100 torch-b1 1 "${SWEEP_B1:-8:64:8}" 800
    perf 9100 torch-b16 16 "${SWEEP_B16:-1:8:1}" 100
    statistics 9100 torch
    stop 9100
  }
  echo "== onnxruntime detector on this host's CPU cores, same transport"
  serve build/gpu-cpu 9120 && {
    STABILITY=50 perf 9120 cpu-b1 1 1:2:1 30  # the CPU detector sheds past OVERLOAD_KEEP (2) at once
    STABILITY=50 perf 9120 cpu-b16 16 1:2:1 6
    stop 9120
  }
}

pool() {  # the default build with Triton's default CUDA pool (64 MiB) instead of the one sized for it
  build_default || return 1
  serve model_repository 9110 CUDA_POOL_MB=64 && {
    perf 9110 torch-pool64-b1 1 16:48:16 800
    perf 9110 torch-pool64-b16 16 2:6:2 100
    stop 9110
  }
}

trace() {  # each build beside its floor (tools/bench/step_floor.py: the same steps answering at once)
  build_default || return 1
  local out repo port=9150 requests
  out=$(realpath -m "$OUT_DIR")
  "$PY" -m tools.bench.step_floor model_repository build/floor-torch > /dev/null || return 1
  [ -d build/gpu-cpu ] && { "$PY" -m tools.bench.step_floor build/gpu-cpu build/floor-cpu > /dev/null || return 1; }
  for repo in model_repository build/floor-torch build/gpu-cpu build/floor-cpu ${TRACE_REPOS:-}; do
    [ -d "$repo" ] || continue
    port=$((port + 10))
    requests=$([ "$repo" = build/gpu-cpu ] && echo 30 || echo 500)
    rm -f "$out/trace-$port.json"
    echo "== trace, concurrency 1, $repo"
    serve "$repo" "$port" TRACE_FILE="$out/trace-$port.json" && {
      STABILITY=${STABILITY:-25} perf "$port" "trace-$port" 1 1:1:1 "$requests" | grep '^| cuda'
      stop "$port"
      "$PY" -m tools.bench.trace_report "$out/trace-$port.json" | tee "$out/trace-$port.md"
    }
  done
}

coldstart() {  # the default build (compiled at make engine) beside TORCH_COMPILE=load, each served on an empty
  # Inductor cache: time to ready, each instance's loading steps, perf_analyzer one-image and 16-image requests
  local started run
  started=$(date +%s)
  build_default || return 1
  echo "make engine BACKEND=torch: $(( $(date +%s) - started )) s"
  grep -E '^(compiled batch|validation: compiled)' "$OUT_DIR/build-torch.log"
  "$PY" -c "from pathlib import Path; from tools.engine.build import build_scratch; build_scratch(Path('build/gpu-load'), backend='torch', torch_compile='load', cudnn_algorithms='${LOAD_CUDNN:-benchmark}')" \
    > "$OUT_DIR/build-load.log" 2>&1 || { tail -5 "$OUT_DIR/build-load.log"; return 1; }
  for run in "engine model_repository 9300" "load build/gpu-load 9320"; do
    set -- $run
    echo "== TORCH_COMPILE=$1"
    serve "$2" "$3" TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" && {
      grep -oE '(retinaface_detector[^:]*: (loaded in|compiling at load).*)' "$OUT_DIR/server-$3.log"
      perf "$3" "$1-b1" 1 "${SWEEP_B1:-64:64:1}" 800
      perf "$3" "$1-b16" 16 "${SWEEP_B16:-4:4:1}" 100
      stop "$3"
    }
  done
}

cudnn() {
  local how name port=9400
  build_default || return 1
  BENCH_CUDNN=${BENCH_CUDNN:-benchmark heuristics heuristics_b benchmark:2 benchmark} "$PY" -m tools.bench.capture_cost
  for how in ${CUDNN_SERVE:-benchmark heuristics_b benchmark}; do
    name=build/cudnn-${how/:/-}
    mkdir -p build && rm -rf "$name" && cp -r model_repository "$name"
    sed -i "s/key: \"cudnn_algorithms\" value: { string_value: \"[^\"]*\"/key: \"cudnn_algorithms\" value: { string_value: \"$how\"/" \
      "$name/retinaface_detector/config.pbtxt"
    grep -q "string_value: \"$how\"" "$name/retinaface_detector/config.pbtxt" || { echo "no cudnn_algorithms in the build"; return 1; }
    port=$((port + 10))
    echo "== CUDNN_ALGORITHMS=$how"
    serve "$name" "$port" TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" && {
      grep -oE '(retinaface_detector[^:]*: loaded in.*)' "$OUT_DIR/server-$port.log"
      perf "$port" "cudnn-$how-b1" 1 "${SWEEP_B1:-64:64:1}" 800
      perf "$port" "cudnn-$how-b16" 16 "${SWEEP_B16:-4:4:1}" 100
      stop "$port"
    }
  done
}

alone() {
  build_default || return 1
  BENCH_VARIANTS=served BENCH_BATCHES=1,16 "$PY" -m tools.bench.gpu_detector
  "$PY" -m tools.bench.capture_cost
}

parity() {
  time "$PY" -m tools.evaluation.cli parity 2>&1 | tee "$OUT_DIR/parity.log" | tail -25
}

tests() {  # GPU_TESTS: which test files (default: every GPU test)
  time "$PY" -m pytest -m gpu -q -p no:cacheprovider ${GPU_TESTS:-tests/test_gpu_detections.py tests/test_gpu_detector.py tests/test_gpu_encoded.py} 2>&1 \
    | tee "$OUT_DIR/pytest-gpu.log" | tail -15
}

soak() {
  build_default || return 1
  serve model_repository 9130 && {
    time "$PY" -m tools.operations.soak --url 127.0.0.1:9130 --seconds 60 --server-pid "$(cat "$OUT_DIR/server-9130.pid")" 2>&1 \
      | tee "$OUT_DIR/soak.log" | tail -12
    stop 9130
  }
}

variants() {  # builds of the default settings plus these changes, each served and measured like `served`
  for variant in ${VARIANTS:-"gpu_instances=1" "gpu_instances=2" "gpu_instances=4"}; do
    name=$(echo "$variant" | tr -dc 'a-z0-9=_' | tr '=' '-')
    echo "== torch detector, $variant"
    "$PY" -c "from pathlib import Path; from tools.engine.build import build_scratch; build_scratch(Path('build/$name'), backend='torch', $variant)" \
      > "$OUT_DIR/build-$name.log" 2>&1 || { tail -5 "$OUT_DIR/build-$name.log"; continue; }
    serve "build/$name" 9150 && {
      perf 9150 "$name-c1" 1 1:1:1 500
      perf 9150 "$name-b1" 1 16:64:16 800
      perf 9150 "$name-b16" 16 2:8:2 100
      statistics 9150 "$name"
      stop 9150
    }
  done
}

video() {
  build_default || return 1
  serve model_repository 9140 && {
    for c in 4 16; do
      CONCURRENCY=$c URL=127.0.0.1:9140 "$PY" -m tools.bench.video 2>&1 | tee -a "$OUT_DIR/video.log" | tail -8
    done
    stop 9140
  }
}

bench() {
  time BENCH_SIZES=1280x960 BENCH_REPEATS=${BENCH_REPEATS:-3} "$PY" -m tools.bench.side_by_side 2>&1 | tee "$OUT_DIR/bench.log" | tail -45
  cp results/bench/bench.md "$OUT_DIR/" 2>/dev/null
}

sdk() {
  time "$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/sdk.log" | tail -12
from tools.bench import side_by_side as bench
images, repeats = bench._images(24), 3
rows = bench._in_process_rows(1280, 960, images, repeats) + bench._gpu_rows(1280, 960, repeats)
print(bench._table("1280x960", rows))
EOF
}

encoded() {  # ENC_B1 / ENC_B16: concurrency ranges of the one-image and 16-image sweeps
  build_default || return 1
  "$PY" -m tools.bench.jpeg_decode 2>&1 | tee "$OUT_DIR/jpeg-decode.md"
  serve model_repository 9200 && {
    for model in retinaface_encoded retinaface; do
      for shm in none $([ $model = retinaface ] && echo cuda); do
        echo "== $model over ${shm/none/gRPC}"
        MODEL=$model SHM=$shm perf 9200 "$model-$shm-b1" 1 "${ENC_B1:-16:64:16}" 800
        MODEL=$model SHM=$shm perf 9200 "$model-$shm-b16" 16 "${ENC_B16:-2:8:2}" 100
      done
    done
    statistics 9200 encoded
    sdk_rows 9200 encoded
    stop 9200
  }
}

sdk_rows() {  # sdk_rows PORT NAME: make bench's GPU rows f, g, i against the server on PORT, beside row a
  echo "== the SDK: make bench's GPU rows against the server on $1"
  "$PY" - "$1" <<'EOF' 2>&1 | tee "$OUT_DIR/sdk-$2.log" | tail -11
import sys
from tools.bench import side_by_side as bench
reference = bench._in_process_rows(1280, 960, bench._images(4), 1)[1:2]
print(bench._table("1280x960", reference + bench.gpu_rows(f"127.0.0.1:{sys.argv[1]}", 1280, 960, 3)))
EOF
}

processes() {  # the SDK's encoded rows from 1, 2 and 3 client processes at once (is one Python client the limit?)
  build_default || return 1
  serve model_repository 9260 && {
    "$PY" - 9260 <<'EOF' 2>&1 | tee "$OUT_DIR/sdk-processes.log" | tail -5
import sys, time
from concurrent.futures import ProcessPoolExecutor
from rtface_client import Client
from tools.bench import side_by_side as bench
url = f"127.0.0.1:{sys.argv[1]}"
_, jpegs, _ = bench._gpu_frames(1280, 960, 960)

def stream(_):
    with Client(url, transport="encoded") as client:
        list(client.detect_stream(jpegs[:96], concurrency=32))  # warm
        start = time.perf_counter()
        list(client.detect_stream(jpegs, concurrency=32))
        return len(jpegs), start, time.perf_counter()

for n in (1, 2, 3):
    with ProcessPoolExecutor(n) as pool:
        runs = list(pool.map(stream, range(n)))
    span = max(r[2] for r in runs) - min(r[1] for r in runs)
    print(f"{n} SDK process(es), encoded, concurrency 32 each: {sum(r[0] for r in runs) / span:,.0f} images/s")
EOF
    stop 9260
  }
}

preprocess() {
  for count in ${PRE_INSTANCES:-2 4 8}; do
    echo "== torch preprocess, $count instances"
    "$PY" -c "from pathlib import Path; from tools.engine.build import build_scratch; build_scratch(Path('build/pre$count'), backend='torch', preprocess='torch', preprocess_instances=$count)" \
      > "$OUT_DIR/build-pre$count.log" 2>&1 || { tail -5 "$OUT_DIR/build-pre$count.log"; continue; }
    serve "build/pre$count" 9250 && {
      MODEL=retinaface_encoded SHM=none perf 9250 "pre$count-b1" 1 "${ENC_B1:-32:64:32}" 800
      MODEL=retinaface_encoded SHM=none perf 9250 "pre$count-b16" 16 "${ENC_B16:-4:8:4}" 100
      statistics 9250 "pre$count"
      [ "$count" = "${SDK_WITH:-4}" ] && sdk_rows 9250 "pre$count"
      stop 9250
    }
  done
}

decode() {
  build_default || return 1
  rm -rf build/step && mkdir -p build && cp -r model_repository build/step
  PREPROCESS=torch MODEL_REPOSITORY=build/step BACKEND=torch "$PY" -m tools.engine.build > "$OUT_DIR/build-step.log" 2>&1 \
    || { tail -5 "$OUT_DIR/build-step.log"; return 1; }
  grep -E '^(preprocess|configs rewritten|up to date)' "$OUT_DIR/build-step.log"
  local port=9300 repo
  for repo in model_repository build/step; do
    port=$((port + 10))
    echo "== retinaface_encoded, $repo"
    serve "$repo" "$port" && {
      MODEL=retinaface_encoded SHM=none perf "$port" "decode-$port-b1" 1 "${DEC_B1:-32:64:32}" 800
      MODEL=retinaface_encoded SHM=none perf "$port" "decode-$port-b16" 16 "${DEC_B16:-4:8:4}" 100
      if [ "$repo" = model_repository ]; then
        echo "== retinaface over CUDA shm (the pixel path), $repo"
        perf "$port" "decode-$port-pixels-b1" 1 64:64:1 800
        perf "$port" "decode-$port-pixels-b16" 16 4:4:1 100
      fi
      statistics "$port" "decode-$port"
      [ "$repo" = model_repository ] && [ "${DEC_SDK:-1}" = 1 ] && sdk_rows "$port" decode
      stop "$port"
    }
  done
}

instances() {
  build_default || return 1
  local count waits name port=9500 spec batch concurrency requests server dmon
  local table="$OUT_DIR/instances.md"
  : > "$table"
  for count in ${INSTANCES:-4 6 8}; do
    for waits in ${WAITS:-block spin}; do
      name=build/i$count-$waits
      rm -rf "$name" && mkdir -p build && cp -r model_repository "$name"
      GPU_INSTANCES=$count CUDA_WAITS=$waits MODEL_REPOSITORY="$name" BACKEND=torch "$PY" -m tools.engine.build \
        > "$OUT_DIR/build-i$count-$waits.log" 2>&1 || { tail -5 "$OUT_DIR/build-i$count-$waits.log"; return 1; }
      port=$((port + 10))
      echo "== $count detector instances, CUDA_WAITS=$waits" | tee -a "$table"
      serve "$name" "$port" || continue
      server=$(pgrep -P "$(cat "$OUT_DIR/server-$port.pid")" | head -1)
      for spec in ${ENC_SPECS:-16:16:120 1:64:800}; do
        IFS=: read -r batch concurrency requests <<< "$spec"
        nvidia-smi dmon -s u -d 1 > "$OUT_DIR/dmon-i$count-$waits-b$batch-c$concurrency.txt" 2>&1 &
        dmon=$!
        URL=127.0.0.1:$port SERVER_PID=$server BATCH=$batch CONCURRENCY=$concurrency PERF_REQUESTS=$requests \
          CPU_COST_ROUNDS=1 CPU_COST_MODELS=retinaface_encoded "$PY" -m tools.bench.cpu_cost \
          > "$OUT_DIR/cpu-i$count-$waits-b$batch-c$concurrency.md" 2>&1
        kill "$dmon" 2>/dev/null
        { echo "retinaface_encoded, $batch image(s) per request, concurrency $concurrency:"
          grep -E '^\|' "$OUT_DIR/cpu-i$count-$waits-b$batch-c$concurrency.md" || tail -3 "$OUT_DIR/cpu-i$count-$waits-b$batch-c$concurrency.md"
          awk '/^# gpu/ { for (i = 2; i < NF; i++) name[i] = $(i + 1) } !/^#/ && NF { n++; for (i = 2; i <= NF; i++) sum[i] += $i }
               END { printf "nvidia-smi dmon, mean %%:"; for (i = 2; i <= NF; i++) printf " %s %.0f", name[i], n ? sum[i] / n : 0; print "" }' \
            "$OUT_DIR/dmon-i$count-$waits-b$batch-c$concurrency.txt"; } | tee -a "$table"
      done
      echo "retinaface over CUDA shm (pixels):" | tee -a "$table"
      perf "$port" "i$count-$waits-pixels-b1" 1 64:64:1 800 | grep -E '^\| cuda' | tee -a "$table"
      perf "$port" "i$count-$waits-pixels-b16" 16 4:4:1 100 | grep -E '^\| cuda' | tee -a "$table"
      stop "$port"
    done
  done
}

base_repository() {  # build/base-repo: BASE's model code, built by BASE's own tools (make engine BACKEND=torch there)
  build_checkout "${BASE:-build/base}" build/base-repo torch "$OUT_DIR/build-base.log" || return 1
  grep -E '^(backend|detector|up to date)' "$OUT_DIR/build-base.log"
}

network_build() {  # build/net-mnv2: this tree's torch build of MODEL=mnv2 (ONNX=$MNV2_ONNX instead, when set)
  mkdir -p build && [ -d build/net-mnv2 ] || cp -r model_repository build/net-mnv2 || return 1
  env BACKEND=torch NETWORK=mnv2 ${MNV2_ONNX:+ONNX=$MNV2_ONNX} MODEL_REPOSITORY=build/net-mnv2 "$PY" -m tools.engine.build \
    > "$OUT_DIR/build-mnv2.log" 2>&1 || { tail -5 "$OUT_DIR/build-mnv2.log"; return 1; }
  grep -E '^(network|backend|detector|up to date)' "$OUT_DIR/build-mnv2.log"
}

builds() {  # BUILDS ("default mnv2 base" by default): the builds the later phases use, compiled at once side by side
  local what pids=() started
  started=$(date +%s)
  for what in ${BUILDS:-default mnv2 base}; do
    case $what in
      default) build_default & ;;
      mnv2) network_build & ;;
      base) base_repository & ;;
    esac
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  echo "builds ($BUILDS): $(( $(date +%s) - started )) s"
}

networks() {  # each network's default torch build served in turn: time to ready, one-image and 16-image requests
  local port=9700 repo
  build_default && network_build || return 1
  for repo in model_repository build/net-mnv2; do
    port=$((port + 10))
    echo "== $repo: $(grep -m1 -oE '"network": "[^"]*"' "$repo/retinaface_detector/1/build.json")"
    serve "$repo" "$port" || continue
    perf "$port" "net-$port-b1" 1 "${NET_B1:-64:64:1}" 1600
    perf "$port" "net-$port-b16" 16 "${NET_B16:-8:8:1}" 130
    stop "$port"
  done
}

cost_rows() {  # cost_rows PORT NAME [full]: the goal rows against the server on PORT (full: the SDK and a burst too)
  local n=${COST_REQUESTS:-400}
  perf "$1" "$2-pixels-c1" 1 1:1:1 "$n"
  MODEL=retinaface_encoded SHM=none perf "$1" "$2-encoded-c1" 1 1:1:1 "$n"
  perf "$1" "$2-pixels-b1" 1 "${COST_C:-64}:${COST_C:-64}:1" $((n * 4))
  MODEL=retinaface_encoded SHM=none perf "$1" "$2-encoded-b1" 1 "${COST_C:-64}:${COST_C:-64}:1" $((n * 4))
  perf "$1" "$2-pixels-b16" 16 8:8:1 $((n / 3))
  MODEL=retinaface_encoded SHM=none perf "$1" "$2-encoded-b16" 16 16:16:1 $((n / 3))
  [ "${3:-}" = full ] || return 0
  PYTHONPATH=$SDK URL=127.0.0.1:$1 "$PY" -m tools.bench.sdk_latency 2>&1 | tee "$OUT_DIR/sdk-$2.md"
  "$PY" -m tools.operations.overload --url "127.0.0.1:$1" --burst 512 --rounds 2 > "$OUT_DIR/burst-$2.txt" 2>&1
  grep -E '"(burst|accepted|rejected|other_errors)"' "$OUT_DIR/burst-$2.txt" | tr -d '\n '; echo
}

cost() {  # COST_REPOS: the order to serve them in; COST_INSTANCES: instance counts to serve this tree's build with too
  local port=9600 repo name count base
  build_default || return 1
  case " ${COST_REPOS:-build/base-repo} " in *" build/base-repo "*) base_repository || return 1 ;; esac
  base=$(realpath "${BASE:-build/base}")
  for repo in ${COST_REPOS:-build/base-repo model_repository}; do
    port=$((port + 10))
    name=$(basename "$repo")
    echo "== $repo"
    serve "$repo" "$port" || continue
    SDK=$([ "$repo" = build/base-repo ] && echo "$base/client:$PWD" || echo "$PWD/client:$PWD") cost_rows "$port" "$name" full
    statistics "$port" "cost-$name"
    stop "$port"
  done
  for count in ${COST_INSTANCES:-}; do
    rm -rf "build/inst$count" && cp -r model_repository "build/inst$count"
    GPU_INSTANCES=$count MODEL_REPOSITORY="build/inst$count" BACKEND=torch "$PY" -m tools.engine.build > "$OUT_DIR/build-inst$count.log" 2>&1 \
      || { tail -5 "$OUT_DIR/build-inst$count.log"; continue; }
    port=$((port + 10))
    echo "== this tree, $count detector instances"
    serve "build/inst$count" "$port" || continue
    cost_rows "$port" "inst$count"
    stop "$port"
  done
}

profile() {
  build_default || return 1
  "$PY" -m tools.bench.execute_profile 2>&1 | tee "$OUT_DIR/profile.md"
}

hop() {  # the goal rows against the ensemble and against its one step, on one server
  local port=9900 round model
  build_default || return 1
  rm -rf build/hop && "$PY" -m tools.bench.ensemble_hop pixels-only model_repository build/hop > /dev/null || return 1
  serve build/hop "$port" || return 1
  for round in 1 2; do
    for model in retinaface retinaface_detector; do
      echo "== $model, round $round"
      MODEL=$model perf "$port" "hop-$model-c1-$round" 1 1:1:1 400
      MODEL=$model perf "$port" "hop-$model-b1-$round" 1 "${COST_C:-64}:${COST_C:-64}:1" 1600
      MODEL=$model perf "$port" "hop-$model-b16-$round" 16 8:8:1 130
    done
  done
  statistics "$port" hop
  stop "$port"
}

mps() {  # the default build without and with CUDA's Multi-Process Service, side by side
  local port=9800 dir
  build_default || return 1
  command -v nvidia-cuda-mps-control > /dev/null || { echo "mps: nvidia-cuda-mps-control is not on this host"; return 1; }
  echo "== without MPS"
  serve model_repository "$port" && { cost_rows "$port" no-mps; statistics "$port" no-mps; stop "$port"; }
  dir=$(realpath -m build/mps)
  mkdir -p "$dir/pipe" "$dir/log"
  export CUDA_MPS_PIPE_DIRECTORY=$dir/pipe CUDA_MPS_LOG_DIRECTORY=$dir/log
  nvidia-cuda-mps-control -d || { echo "mps: the control daemon did not start"; return 1; }
  echo "== with MPS"
  serve model_repository $((port + 10)) && { cost_rows $((port + 10)) mps; statistics $((port + 10)) mps; stop $((port + 10)); }
  echo quit | nvidia-cuda-mps-control
  tail -3 "$dir/log/control.log" 2>/dev/null
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}

for phase in "$@"; do
  echo "=== $phase"
  "$phase"
done
