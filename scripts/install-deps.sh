#!/usr/bin/env bash
# Installs the Debian packages that torchlora's build, tests, examples and
# benchmarks need, and only those that are missing. Safe to run again.
#
#   scripts/install-deps.sh          # as root, or with sudo available
#
# OpenBLAS comes as its OpenMP build (libopenblas0-openmp), which shares
# LibTorch's OpenMP threads. The pthread build starts a pool of its own that
# competes with LibTorch's for the cores: on Debian 13 the example fine-tune
# ran 6 to 13 times slower with it. Where another build is installed too
# (Debian prefers the pthread one), this script selects the OpenMP one with
# update-alternatives.
set -euo pipefail

packages=(
  g++ cmake make              # the compiler and the build
  libtorch-dev                # LibTorch (CPU), C++ headers and CMake config
  libgloo-dev                 # Gloo's headers, for c10d (torchlora/distributed.h)
  libopenblas0-openmp         # a fast BLAS (~12x the reference one), on
                              # OpenMP like LibTorch (see above)
  nlohmann-json3-dev          # JSON for safetensors headers and adapter configs
  libgtest-dev googletest     # GoogleTest, installed and as sources
  libbenchmark-dev            # Google Benchmark
  clang libclang-rt-dev       # libFuzzer with ASan/UBSan, for the fuzz test
  libcli11-dev                # flags of the fine-tune example
  wamerican wfrench           # its English and French word lists
  dataset-fashion-mnist       # the images of the vision example
  zlib1g-dev                  # which it reads, gzipped, with zlib
  python3                     # runs the peft interop check (tests/interop)
  python3-torch               # PyTorch: makes the TorchScript fixtures and
                              # runs the TorchScript example's Python side
  iproute2                    # ip: the network namespaces of the multi-machine tests
  doxygen                     # the API reference, checked by the tests
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

# The alternatives (libblas.so.3, liblapack.so.3, libopenblas.so.0, ...)
# whose OpenMP OpenBLAS is installed but not selected: "name path" lines.
openblas_openmp_unselected() {
  local name openmp current
  while read -r name _; do
    case "$name" in
      libblas.so* | liblapack.so* | libopenblas.so*) ;;
      *) continue ;;
    esac
    openmp="$(update-alternatives --list "$name" 2>/dev/null | grep '/openblas-openmp/' | head -n 1)" || true
    current="$(update-alternatives --query "$name" 2>/dev/null | sed -n 's/^Value: //p')"
    if [ -n "$openmp" ] && [ "$current" != "$openmp" ]; then
      echo "$name $openmp"
    fi
  done < <(update-alternatives --get-selections 2>/dev/null)
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "install-deps: needs root for: $*" >&2
    return 1
  fi
}

select_openblas_openmp() {
  local name path
  while read -r name path; do
    [ -n "$name" ] || continue
    echo "install-deps: selecting the OpenMP build of OpenBLAS for $name"
    as_root update-alternatives --quiet --set "$name" "$path"
  done < <(openblas_openmp_unselected)
}

if [ ${#missing[@]} -eq 0 ]; then
  select_openblas_openmp
  echo "install-deps: all ${#packages[@]} Debian packages are already installed."
  exit 0
fi

if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run as root: apt-get install ${missing[*]}" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
as_root apt-get update -q
as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
select_openblas_openmp
echo "install-deps: done."
