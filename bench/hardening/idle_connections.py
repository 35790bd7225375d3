"""Connections held open by idle clients: opens 50 silent connections and
50 that send half a request head to a `neocloud serve` on 127.0.0.1:PORT,
waits WAIT seconds, and prints how many the server still holds open.

    python3 bench/hardening/idle_connections.py PORT [WAIT=60]
"""
import socket
import sys
import time

port = int(sys.argv[1])
wait = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
socks = []
for _ in range(50):
    socks.append(socket.create_connection(("127.0.0.1", port)))
for _ in range(50):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    socks.append(s)
time.sleep(wait)
held = 0
for s in socks:
    s.setblocking(False)
    try:
        if s.recv(1) != b"":
            held += 1
    except BlockingIOError:
        held += 1
    except ConnectionResetError:
        pass
print(f"held open after {wait:.0f} s: {held} of {len(socks)}")
