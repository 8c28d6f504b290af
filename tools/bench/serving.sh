# Sourced by the benchmark scripts (gpu_figures.sh, cpu_ab.sh) from the project root, with OUT_DIR (where
# logs and perf results go) and PY (the project's Python) set: build an earlier commit's repository with
# its own tools, serve a repository on given ports, stop it, run one perf_analyzer sweep against it, save
# Triton's statistics.

build_checkout() {  # build_checkout CHECKOUT DEST BACKEND LOG: CHECKOUT (git archive <commit> model_repository
  # tools client) built by its own tools and SDK into DEST (relative to the project root), as its make engine would
  local checkout=$1 dest=$2 backend=$3 log=$4
  [ -d "$checkout/model_repository" ] || { echo "$checkout holds no checkout (git archive <commit> model_repository tools client)"; return 1; }
  [ -d "$dest" ] || cp -r "$checkout/model_repository" "$dest" || return 1
  (cd "$checkout" && BACKEND=$backend MODEL_REPOSITORY="$OLDPWD/$dest" PYTHONPATH=.:client "$PY" -m tools.engine.build) \
    > "$log" 2>&1 || { tail -5 "$log"; return 1; }
}

serve() {  # serve REPOSITORY PORT [VAR=value...]: `make serve` in the background, ready when this returns
  local repo=$1 port=$2 started; shift 2
  started=$(date +%s.%N)
  env "$@" MODEL_REPOSITORY="$repo" GRPC_PORT="$port" HTTP_PORT=$((port + 1)) METRICS_PORT=$((port + 2)) \
    "$PY" -m tools.serve > "$OUT_DIR/server-$port.log" 2>&1 &
  echo $! > "$OUT_DIR/server-$port.pid"
  for _ in $(seq 3000); do
    if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      "http://127.0.0.1:$((port + 1))/v2/health/ready" 2>/dev/null; then
      echo "$repo ready $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $started }") s after start"
      return 0
    fi
    kill -0 "$(cat "$OUT_DIR/server-$port.pid")" 2>/dev/null || { tail -20 "$OUT_DIR/server-$port.log"; return 1; }
    sleep 0.2
  done
  return 1
}

stop() { kill -TERM "$(cat "$OUT_DIR/server-$1.pid")" 2>/dev/null; wait "$(cat "$OUT_DIR/server-$1.pid")" 2>/dev/null; }

perf() {  # perf PORT NAME BATCH CONCURRENCY REQUESTS: one perf_analyzer sweep of $MODEL (retinaface, CUDA shm)
  URL=127.0.0.1:$1 MODEL=${MODEL:-retinaface} SHM=${SHM:-cuda} BATCH=$3 CONCURRENCY=$4 PERF_REQUESTS=$5 PERF_STABILITY=${STABILITY:-25} \
    PERF_DIR="$OUT_DIR/perf-$2" "$PY" -m tools.bench.perf 2>&1 | grep -v '^perf_analyzer:' | grep -v '^written'
}

statistics() {  # statistics PORT NAME: Triton's per-model statistics after the runs
  "$PY" - "$1" > "$OUT_DIR/statistics-$2.json" <<'EOF'
import json, sys
import tritonclient.grpc as grpcclient
client = grpcclient.InferenceServerClient(f"127.0.0.1:{sys.argv[1]}")
print(json.dumps(client.get_inference_statistics(as_json=True), indent=1))
EOF
}
