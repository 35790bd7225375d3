"""Request time of the 400 for a chat body of 26,000 filler keys with two
mistyped sampling fields (`temperature`, `top_p`), about 260 KB, against a
`neocloud serve --model gemma-3-270m` on 127.0.0.1:PORT.

    python3 bench/hardening/field_at_fault.py PORT
"""
import json
import sys
import time
import urllib.error
import urllib.request

port = int(sys.argv[1])
body = '{"model":"gemma-3-270m","messages":[{"role":"user","content":"hi"}]'
body += "".join(f',"{i:05}":1' for i in range(26000)) + ',"temperature":"x","top_p":"y"}'
start = time.monotonic()
try:
    urllib.request.urlopen(
        urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=body.encode(),
            headers={"content-type": "application/json"},
        ),
        timeout=300,
    )
    raise SystemExit("the body was accepted")
except urllib.error.HTTPError as e:
    error, code = json.loads(e.read())["error"], e.code
print(f"{len(body)} bytes: {code} param={error['param']} in {time.monotonic() - start:.3f} s")
