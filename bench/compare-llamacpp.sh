#!/usr/bin/env bash
# neocloud against llama.cpp's llama-server on the same GGUF, the same
# threads and the same machine, measured with `neocloud bench`, and the
# ratios issue "engine throughput" asks for:
#   1. single-stream generation (short prompt, 128 output tokens)
#   2. time to first token for a 1,024-token prompt
#   3. total output tokens/s with 8 and with 32 concurrent streams
#      (llama-server started with -np 8 and -np 32), TTFT p50 at 8
#   4. TTFT of requests sharing a 1,000-token prefix, second vs first
#   5. peak resident memory of both servers, the model file's size, and the
#      bound the issue sets: file + neocloud's KV budget + 200 MB
#
#   bench/compare-llamacpp.sh [--model gemma-3-270m] [--threads 2]
#                             [--requests 8] [--kv-cache-mb 512]
#                             [--activation-bits mixed]
#                             [--out target/compare-llamacpp]
#                             [--levels single-stream,long-prompt,...]
#
# --activation-bits picks neocloud's activation precision: mixed (the
# default: int8, int16 in the feed-forward down projection), 16 or 8.
# --levels runs only the named levels (single-stream, long-prompt,
# shared-prefix, streams-8, streams-32) and prints the ratios they give;
# the memory lines need streams-32.
#
# llama-server comes from bench/llamacpp-env.sh (installed on first use).
# Servers listen on 127.0.0.1 only and are stopped by their PIDs on exit.
set -euo pipefail

model=gemma-3-270m
threads=2
requests=8
kv_cache_mb=512
activation_bits=mixed
out=target/compare-llamacpp
levels=single-stream,long-prompt,shared-prefix,streams-8,streams-32
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --kv-cache-mb) kv_cache_mb=$2; shift 2 ;;
    --activation-bits) activation_bits=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --levels) levels=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
cargo build --release --quiet -p neocloud
neocloud=target/release/neocloud
gguf=$("$neocloud" pull "$model" | tail -1)

# shellcheck source=bench/llamacpp-env.sh
source bench/llamacpp-env.sh

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
peak_rss_mb() { # PID: the process's peak resident memory so far, in MB
  awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo "?"
}

port=$(free_port)
"$neocloud" --threads "$threads" serve --model "$model" --port "$port" \
  --kv-cache-mb "$kv_cache_mb" --activation-bits "$activation_bits" > "$out/neocloud.log" 2>&1 &
neocloud_pid=$!
pids+=($neocloud_pid)
ours="http://127.0.0.1:$port"
wait_ready "$ours"

start_llama() { # PARALLEL
  local p
  p=$(free_port)
  "$bindir/llama-server" -m "$gguf" -t "$threads" -np "$1" -c $((4096 * $1)) \
    --host 127.0.0.1 --port "$p" > "$out/llama-server-np$1.log" 2>&1 &
  llama_pid=$!
  pids+=($llama_pid)
  llama="http://127.0.0.1:$p"
  wait_ready "$llama"
}

wanted() { [[ ",$levels," == *",$1,"* ]]; }
run() { # NAME, then bench arguments
  local name=$1; shift
  wanted "$name" || return 0
  echo "== $name"
  "$neocloud" bench --target "neocloud=$ours/v1" --target "llama-server=$llama/v1" \
    --model "$model" --out "$out/$name.json" "$@" 2> /dev/null
}

echo "neocloud resident after loading: $(awk '/^VmRSS:/ { printf "%.0f", $2 / 1024 }' "/proc/$neocloud_pid/status") MB" \
  | tee "$out/memory.txt"
if wanted single-stream || wanted long-prompt || wanted shared-prefix; then
start_llama 1
run single-stream --concurrency 1 --requests "$requests" --input-tokens 32 --output-tokens 128
run long-prompt --concurrency 1 --requests "$requests" --input-tokens 1024 --output-tokens 8
# Another seed than the levels before: their prompts must not already
# hold this level's prefix in either server's cache.
run shared-prefix --concurrency 1 --requests "$requests" --warmup 0 --prefix-tokens 1000 \
  --input-tokens 1016 --output-tokens 8 --seed 1009
stop "$llama_pid"
fi
if wanted streams-8; then
start_llama 8
run streams-8 --concurrency 8 --requests $((requests * 4)) --input-tokens 128 --output-tokens 128
stop "$llama_pid"
fi
if wanted streams-32; then
start_llama 32
run streams-32 --concurrency 32 --requests $((requests * 8)) --input-tokens 128 --output-tokens 128
{
  echo "neocloud peak resident: $(peak_rss_mb "$neocloud_pid") MB"
  echo "llama-server -np 32 peak resident: $(peak_rss_mb "$llama_pid") MB"
  file_mb=$(( $(stat -c %s "$gguf") / 1000000 ))
  echo "model file: $file_mb MB"
  echo "bound (file + KV budget $kv_cache_mb MiB + 200 MB): $(( file_mb + kv_cache_mb * 1048576 / 1000000 + 200 )) MB"
} | tee -a "$out/memory.txt"
stop "$llama_pid"
fi

python3 - "$out" "$levels" <<'PY'
import json, os, sys
out, wanted = sys.argv[1], sys.argv[2].split(",")
def level(name, target):
    report = json.load(open(os.path.join(out, name + ".json")))
    names = [t["name"] for t in report["targets"]]
    return next(l for l in report["levels"] if names[l["target"]] == target)
def ratio(name, metric, pick):
    ours, theirs = pick(level(name, "neocloud")), pick(level(name, "llama-server"))
    return ours, theirs, ours / theirs if theirs else float("nan")
rows = [
    ("single stream, output tok/s (goal >= 1.25)", "single-stream", lambda l: l["output_throughput"]),
    ("1,024-token prompt, TTFT p50 s (goal <= 0.8)", "long-prompt", lambda l: l["ttft_s"]["p50"]),
    ("8 streams, output tok/s (goal >= 2.5)", "streams-8", lambda l: l["output_throughput"]),
    ("8 streams, TTFT p50 s (goal <= 1)", "streams-8", lambda l: l["ttft_s"]["p50"]),
    ("32 streams, output tok/s (goal >= 3)", "streams-32", lambda l: l["output_throughput"]),
]
print(f"{'figure':48} {'neocloud':>10} {'llama-server':>13} {'ratio':>7}")
for label, name, pick in rows:
    if name not in wanted:
        continue
    ours, theirs, r = ratio(name, None, pick)
    print(f"{label:48} {ours:10.3f} {theirs:13.3f} {r:7.2f}")
for target in ("neocloud", "llama-server") if "shared-prefix" in wanted else ():
    samples = level("shared-prefix", target)["samples"]["ttft_s"]
    rest = sorted(samples[1:])
    median = rest[len(rest) // 2] if rest else float("nan")
    print(f"shared 1,000-token prefix, {target}: first TTFT {samples[0]:.3f} s, "
          f"later median {median:.3f} s, ratio {median / samples[0]:.2f} (goal <= 0.2)")
PY
