# Sourced by the bench scripts, from the repository root: what they need to
# run servers on loopback. free_port prints a free port of 127.0.0.1;
# wait_ready URL waits (2 minutes at most) until URL/health answers; stop
# PID ends a process the script started, and waits for it.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { # URL
  for _ in $(seq 1 1200); do
    curl -fs "$1/health" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "nothing ready at $1" >&2; exit 1
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
