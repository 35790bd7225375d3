#!/usr/bin/env bash
# What the fleet gateway costs: `neocloud bench` against a fast mock
# upstream (4 tokens per answer, streamed), directly and through
# `neocloud serve --config` with one pool, at the same open-loop rates;
# optionally LiteLLM's proxy in front of the same mock under the same load;
# then a soak at one rate with the gateway's resident memory before and after.
#
#   bench/gateway-cost.sh [--rates 1000,2000,3000 (empty: none)] [--duration 20]
#                         [--soak 600] [--soak-rate 1000]
#                         [--litellm] [--litellm-rates 10,25,50]
#                         [--litellm-workers 1] [--out DIR]
#
# Everything listens on 127.0.0.1 only; every process started here is
# stopped by its PID on exit. --litellm installs `litellm[proxy]` into a
# virtual environment under the output directory on first use.
set -euo pipefail

rates=1000,2000,3000
duration=20
soak=600
soak_rate=1000
litellm=0
litellm_rates=10,25,50
litellm_workers=1
out=target/gateway-cost
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rates) rates=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --soak) soak=$2; shift 2 ;;
    --soak-rate) soak_rate=$2; shift 2 ;;
    --litellm) litellm=1; shift ;;
    --litellm-rates) litellm_rates=$2; shift 2 ;;
    --litellm-workers) litellm_workers=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
cargo build --release --quiet -p neocloud -p neocloud-testkit --bins
bin=target/release

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# shellcheck source=bench/loopback.sh
source bench/loopback.sh
wait_for() { wait_url "$1" 600; } # URL: a minute at most

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

"$bin/mock-upstream" 4 > "$out/mock.url" &
pids+=($!)
sleep 0.3
mock=$(head -1 "$out/mock.url")
wait_for "$mock/models"

cat > "$out/fleet.toml" <<TOML
[[pool]]
name = "mock"
model = "mock"
accelerator = "cpu"
upstreams = ["$mock"]
TOML
NEOCLOUD_LOG=warn "$bin/neocloud" serve --config "$out/fleet.toml" --port 0 > "$out/gateway.out" 2> "$out/gateway.err" &
gateway_pid=$!
pids+=($gateway_pid)
for _ in $(seq 1 100); do grep -q listening "$out/gateway.out" 2>/dev/null && break; sleep 0.1; done
gateway=$(sed -n 's#.*listening on \(http://[^ ]*\).*#\1/v1#p' "$out/gateway.out")
wait_for "$gateway/models"

if [[ -n $rates ]]; then
echo "== direct to the mock and through the gateway: rates $rates, $duration s each"
"$bin/neocloud" bench --target "direct=$mock,model=mock" --target "gateway=$gateway,model=mock" \
  --rate "$rates" --duration "$duration" --input-tokens 16 --output-tokens 4 \
  --out "$out/gateway.json" 2> /dev/null
python3 - "$out/gateway.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
names = [t["name"] for t in report["targets"]]
by_load = {}
for level in report["levels"]:
    load = f"{level['load']['mode']} {level['load']['value']:g}"
    by_load.setdefault(load, {})[names[level["target"]]] = level
print(f"{'load':>12} {'direct ttft p50/p99 ms':>23} {'added ttft p50/p99 ms':>23} {'added e2e p50/p99 ms':>22} {'ok':>7} {'errors':>7}")
for load, by in by_load.items():
    d, g = by["direct"], by["gateway"]
    added = lambda m, q: (g[m][q] - d[m][q]) * 1e3
    print(f"{load:>12} {d['ttft_s']['p50']*1e3:11.3f}/{d['ttft_s']['p99']*1e3:<11.3f}"
          f" {added('ttft_s','p50'):11.3f}/{added('ttft_s','p99'):<11.3f}"
          f" {added('e2e_s','p50'):10.3f}/{added('e2e_s','p99'):<11.3f}"
          f" {g['completed']:7} {sum(g['errors'].values()):7}")
PY
fi

if [[ $litellm == 1 ]]; then
  venv="$out/litellm-venv"
  if [[ ! -x $venv/bin/litellm ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'litellm[proxy]'
  fi
  cat > "$out/litellm.yaml" <<YAML
model_list:
  - model_name: mock
    litellm_params:
      model: openai/mock
      api_base: $mock
      api_key: not-needed
YAML
  port=$(free_port)
  LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true LITELLM_LOG=ERROR \
    "$venv/bin/litellm" --config "$out/litellm.yaml" --host 127.0.0.1 --port "$port" \
    --num_workers "$litellm_workers" > "$out/litellm.log" 2>&1 &
  litellm_pid=$!
  pids+=($litellm_pid)
  wait_for "http://127.0.0.1:$port/health/liveliness"
  echo "== LiteLLM proxy ($litellm_workers worker(s)) in front of the same mock: rates $litellm_rates"
  "$bin/neocloud" bench --target "litellm=http://127.0.0.1:$port/v1,model=mock" \
    --rate "$litellm_rates" --duration "$duration" --input-tokens 16 --output-tokens 4 \
    --out "$out/litellm.json"
  echo "LiteLLM resident memory after its runs: $(rss_kb "$litellm_pid") kB"
  kill "$litellm_pid" 2>/dev/null || true
fi

if [[ $soak -gt 0 ]]; then
  echo "== soak: gateway at $soak_rate/s for $soak s (resident memory sampled every 30 s)"
  before=$(rss_kb "$gateway_pid")
  "$bin/neocloud" bench --target "gateway=$gateway,model=mock" --rate "$soak_rate" \
    --duration "$soak" --warmup 0 --input-tokens 16 --output-tokens 4 \
    --out "$out/soak.json" &
  bench_pid=$!
  pids+=($bench_pid)
  echo -e "seconds\trss_kb" > "$out/soak-rss.tsv"
  start=$SECONDS
  while kill -0 "$bench_pid" 2>/dev/null; do
    echo -e "$((SECONDS - start))\t$(rss_kb "$gateway_pid")" >> "$out/soak-rss.tsv"
    sleep 30
  done
  wait "$bench_pid"
  after=$(rss_kb "$gateway_pid")
  echo "gateway resident memory: $before kB before the soak, $after kB after; samples in $out/soak-rss.tsv:"
  column -t "$out/soak-rss.tsv" | paste -sd ' ' | fold -w 120
fi
