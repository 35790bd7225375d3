#!/usr/bin/env bash
# Teacher-forced agreement with llama.cpp beyond the reference folder's
# prompts: llama-server (on this machine, same GGUF) writes greedy
# continuations of 50 other prompts (bench/held_out_reference.py; two of
# them long, from ../shared), then the engine's ignored test
# `on_held_out_prompts_the_default_precision_agrees_as_well_as_16_bits`
# counts where each activation precision breaks the reference rule on them.
#
#   bench/held-out-reference.sh [--model gemma-3-270m] [--threads 2]
#                               [--out target/held-out]
set -euo pipefail

model=gemma-3-270m
threads=2
out=target/held-out
while [[ $# -gt 0 ]]; do
  case $1 in
    --model) model=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
cargo build --release --quiet -p neocloud
gguf=$(target/release/neocloud pull "$model" | tail -1)
# shellcheck source=bench/llamacpp-env.sh
source bench/llamacpp-env.sh

port=$(free_port)
"$bindir/llama-server" -m "$gguf" -t "$threads" -np 1 -c 4096 \
  --host 127.0.0.1 --port "$port" > "$out/llama-server.log" 2>&1 &
llama_pid=$!
trap 'kill "$llama_pid" 2> /dev/null || true' EXIT
wait_ready "http://127.0.0.1:$port"
python3 bench/held_out_reference.py "http://127.0.0.1:$port" "$out/$model.jsonl" \
  ../shared/DESIGN.md ../shared/RELIABILITY.md
stop "$llama_pid"

NEOCLOUD_HELD_OUT_REFERENCE="$out/$model.jsonl" NEOCLOUD_HELD_OUT_MODEL="$model" \
  cargo test --release -q -p neocloud-engine --test reference_logprobs -- \
  --ignored --exact on_held_out_prompts_the_default_precision_agrees_as_well_as_16_bits --nocapture \
  2>&1 | grep -E "rule broken|top-1|mean difference|test result|panicked"
