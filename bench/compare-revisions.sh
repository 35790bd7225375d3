#!/usr/bin/env bash
# neocloud at two revisions of this repository, served the same way on the
# same machine and measured by the same client (`neocloud bench` of the
# working tree), alternating which goes first round by round, to tell
# whether a change moved the numbers through `neocloud serve`:
#   1. single stream: 32-token prompts, 128 output tokens, output tokens/s
#   2. a 1,024-token prompt: TTFT p50
#   3. 32 concurrent streams: 128-token prompts, 128 output tokens,
#      output tokens/s
# Each binary serves from a fresh start for each round (no prefix cache
# carries over), and every round uses its own seed.
#
#   bench/compare-revisions.sh BASE [--model gemma-3-270m] [--threads 2]
#                              [--rounds 3] [--requests 8]
#                              [--out target/compare-revisions]
#
# BASE (a commit) is built in a worktree under target/ with its own target
# directory; the working tree is built as it is. Servers listen on
# 127.0.0.1 only and are stopped by their PIDs on exit.
set -euo pipefail

base=${1:?usage: bench/compare-revisions.sh BASE [options]}
shift
model=gemma-3-270m
threads=2
rounds=3
requests=8
out=target/compare-revisions
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
root=$(pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)

cargo build --release --quiet -p neocloud
head_bin=$root/target/release/neocloud
base_tree=$root/target/revision-$base
if [[ ! -d $base_tree ]]; then
  git worktree add --detach "$base_tree" "$base" > /dev/null
fi
(cd "$base_tree" && CARGO_TARGET_DIR=$root/target/revision-build cargo build --release --quiet -p neocloud)
base_bin=$root/target/revision-build/release/neocloud
"$head_bin" pull "$model" > /dev/null

# shellcheck source=bench/loopback.sh
source bench/loopback.sh

pid=
cleanup() { [[ -n $pid ]] && kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT

measure() { # NAME BINARY ROUND
  local name=$1 bin=$2 round=$3 port url seed
  port=$(free_port)
  "$bin" --threads "$threads" serve --model "$model" --port "$port" --kv-cache-mb 512 \
    > "$out/$name-$round.log" 2>&1 &
  pid=$!
  url="http://127.0.0.1:$port"
  wait_ready "$url"
  seed=$((round * 100))
  "$head_bin" bench --url "$url/v1" --model "$model" --seed "$seed" --concurrency 1 \
    --requests "$requests" --input-tokens 32 --output-tokens 128 \
    --out "$out/$name-$round-single.json" > /dev/null 2>&1
  "$head_bin" bench --url "$url/v1" --model "$model" --seed $((seed + 1)) --concurrency 1 \
    --requests "$requests" --input-tokens 1024 --output-tokens 8 \
    --out "$out/$name-$round-long.json" > /dev/null 2>&1
  "$head_bin" bench --url "$url/v1" --model "$model" --seed $((seed + 2)) --concurrency 32 \
    --requests $((requests * 8)) --input-tokens 128 --output-tokens 128 \
    --out "$out/$name-$round-streams32.json" > /dev/null 2>&1
  stop "$pid"
  pid=
}

for ((round = 1; round <= rounds; round++)); do
  if ((round % 2)); then order=(base head); else order=(head base); fi
  for name in "${order[@]}"; do
    echo "== round $round: $name"
    if [[ $name == base ]]; then measure base "$base_bin" "$round"; else measure head "$head_bin" "$round"; fi
  done
done

python3 - "$out" "$rounds" "$base" <<'PY'
import json, os, statistics, sys
out, rounds, base = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def value(name, rnd, level, pick):
    report = json.load(open(os.path.join(out, f"{name}-{rnd}-{level}.json")))
    return pick(report["levels"][0])
rows = [
    ("single stream, output tok/s", "single", lambda l: l["output_throughput"]),
    ("1,024-token prompt, TTFT p50 s", "long", lambda l: l["ttft_s"]["p50"]),
    ("32 streams, output tok/s", "streams32", lambda l: l["output_throughput"]),
]
print(f"| line | base {base} (rounds) | head (rounds) | head / base of medians |")
print("| --- | --- | --- | --- |")
for label, level, pick in rows:
    b = [value("base", r, level, pick) for r in range(1, rounds + 1)]
    h = [value("head", r, level, pick) for r in range(1, rounds + 1)]
    fmt = lambda xs: ", ".join(f"{x:.3g}" for x in xs)
    ratio = statistics.median(h) / statistics.median(b)
    print(f"| {label} | {fmt(b)} | {fmt(h)} | {ratio:.3f} |")
PY
