#!/usr/bin/env bash
# Installs what qkd needs to build and run, idempotently: Debian packages that are missing, and a check that
# the CUDA toolkit is where the build expects it. Safe to run again; it installs nothing that is present.
set -euo pipefail

# clang, libclang-rt-dev (libFuzzer and the sanitizer runtimes: only recommended by clang, so named here) and
# libomp-dev (OpenMP for clang) build the fuzz harnesses of tools/ci-hardening.sh.
packages=(build-essential cmake ninja-build pkg-config libsentencepiece-dev libfmt-dev doctest-dev
          nlohmann-json3-dev python3 python3-pip clang libclang-rt-dev libomp-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "qkd setup: installing ${missing[*]}" >&2
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null 2>&1; then
  echo "qkd setup: the CUDA toolkit was not found (expected /usr/local/cuda/bin/nvcc)." >&2
  echo "qkd setup: install the CUDA Toolkit (12.4 or newer) into /usr/local/cuda and run this again." >&2
  exit 1
fi
