# Sourced by the bench scripts, from the repository root: what they need to
# run servers on loopback. free_port prints a free port of 127.0.0.1;
# wait_url URL [TRIES] waits until URL answers (TRIES tenths of a second at
# most, 1200 unless given); wait_ready URL waits for URL/health; stop PID
# ends a process the script started, and waits for it.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_url() { # URL [TRIES]
  for _ in $(seq 1 "${2:-1200}"); do
    curl -fs "$1" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "nothing answers at $1" >&2; exit 1
}
wait_ready() { wait_url "$1/health"; } # URL
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
