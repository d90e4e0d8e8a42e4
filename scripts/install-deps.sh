#!/usr/bin/env bash
# Installs the Debian packages that torchlora's build, tests, examples and
# benchmarks need, and only those that are missing. Safe to run again.
#
#   scripts/install-deps.sh          # as root, or with sudo available
set -euo pipefail

packages=(
  g++ cmake make              # the compiler and the build
  libtorch-dev                # LibTorch (CPU), C++ headers and CMake config
  libgloo-dev                 # Gloo's headers, for c10d (torchlora/distributed.h)
  libopenblas0-pthread        # a fast BLAS: without it LibTorch is ~12x slower
  nlohmann-json3-dev          # JSON for safetensors headers and adapter configs
  libgtest-dev googletest     # GoogleTest, installed and as sources
  libbenchmark-dev            # Google Benchmark
  clang libclang-rt-dev       # libFuzzer with ASan/UBSan, for the fuzz test
  libcli11-dev                # flags of the fine-tune example
  wamerican wfrench           # its English and French word lists
  dataset-fashion-mnist       # the images of the vision example
  zlib1g-dev                  # which it reads, gzipped, with zlib
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} Debian packages are already installed."
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run as root: apt-get install ${missing[*]}" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps: done."
