#!/usr/bin/env python3
"""Single-stream latency through HTTP: time to first token and decode speed.

Usage: single_stream.py BASE_URL MODEL [--runs N] [--max-tokens N] [--prompt TEXT]
                        [--extra JSON]

Sends streamed chat requests one after another (`temperature: 0`,
`ignore_eos`, `stream_options.include_usage`) and reports, as the median over
the runs: time to first token (request sent to first content chunk) and
decode tokens/s ((completion tokens - 1) / time from first to last chunk).
Works against any OpenAI-compatible server that honours `ignore_eos`
(neocloud, vLLM, llama.cpp's llama-server). `--extra` merges fields into
every request body: `--extra '{"cache_prompt": false}'` keeps llama-server
from reusing the previous run's prompt, so that every run pays its prefill
as neocloud's do. Standard library only.
"""

import argparse
import json
import statistics
import time
import urllib.request


def one_run(base_url, model, prompt, max_tokens, extra):
    body = json.dumps({
        **extra,
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    req = urllib.request.Request(
        base_url.rstrip("/") + "/chat/completions", data=body,
        headers={"content-type": "application/json"})
    start = time.perf_counter()
    first = last = None
    usage = None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
    tokens = usage["completion_tokens"] if usage else None
    decode = (tokens - 1) / (last - first) if tokens and last > first else float("nan")
    return first - start, decode, tokens


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base_url")
    p.add_argument("model")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    p.add_argument("--extra", type=json.loads, default={})
    a = p.parse_args()
    one_run(a.base_url, a.model, a.prompt, 8, a.extra)  # warm-up
    runs = [one_run(a.base_url, a.model, a.prompt, a.max_tokens, a.extra) for _ in range(a.runs)]
    ttft = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    print(json.dumps({
        "base_url": a.base_url, "model": a.model, "runs": a.runs,
        "completion_tokens": runs[-1][2],
        "ttft_ms_p50": round(ttft * 1000, 1),
        "decode_tokens_per_s_p50": round(decode, 1),
    }))


if __name__ == "__main__":
    main()
