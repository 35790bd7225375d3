"""The inter-token gaps of a running stream while a long prompt is scored
(`/v1/completions` with `echo`, `logprobs: 1`, `max_tokens: 0`), against a
`neocloud serve` on 127.0.0.1:PORT serving MODEL.

    python3 bench/hardening/scoring_beside_a_stream.py PORT MODEL [PROMPT_TOKENS=4000]
"""
import json
import statistics
import sys
import threading
import time
import urllib.request

port, model = int(sys.argv[1]), sys.argv[2]
n_prompt = int(sys.argv[3]) if len(sys.argv) > 3 else 4000


def post(path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    return urllib.request.urlopen(req, timeout=600)


stamps = []


def stream():
    r = post("/v1/completions", {"model": model, "prompt": "Once upon a time", "max_tokens": 600,
                                 "ignore_eos": True, "temperature": 0, "stream": True})
    for line in r:
        if line.startswith(b"data: {"):
            stamps.append(time.monotonic())


t = threading.Thread(target=stream)
t.start()
while len(stamps) < 20:
    time.sleep(0.01)
ids = [1000 + (i * 7919) % 20000 for i in range(n_prompt)]
s0 = time.monotonic()
scored = json.loads(post("/v1/completions", {"model": model, "prompt": ids, "echo": True,
                                              "logprobs": 1, "max_tokens": 0}).read())
s1 = time.monotonic()
t.join()
before = [b - a for a, b in zip(stamps, stamps[1:]) if b <= s0]
during = [b - a for a, b in zip(stamps, stamps[1:]) if b > s0 and a < s1]
print(f"scored {len(scored['choices'][0]['logprobs']['tokens'])} tokens in {s1 - s0:.2f} s; "
      f"stream gap before: median {statistics.median(before) * 1000:.1f} ms; while scoring: "
      f"median {statistics.median(during) * 1000:.1f} ms, longest {max(during) * 1000:.0f} ms, "
      f"{len(during)} tokens")
