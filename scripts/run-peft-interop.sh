#!/usr/bin/env bash
# Checks torchlora's adapter files against the real Python peft, both ways
# (tests/interop/peft_interop.py), with peft's own source unpacked from a
# tarball, in a Debian sid chroot that has the Python stack peft needs
# (torch, safetensors, transformers, ...; Debian 12 and 13 lack some).
#
#   scripts/run-peft-interop.sh [--build DIR] [--keep DIR] TARBALL...  # as root
#   TORCHLORA_PEFT_SRC=peft-0.20.0-src.tar.gz scripts/run-peft-interop.sh
#
# The C++ side (tests/torchlora_interop) is built on this machine in DIR
# (default build/default, as scripts/run-tests.sh builds it) and runs here;
# Python runs in the chroot, on a work folder bind-mounted at the same path.
# --keep DIR copies each tarball's files (models' base weights, inputs,
# both sides' adapters and outputs) to DIR/<tarball name> for a closer look.
# The chroot is made with debootstrap the first time (about 5 minutes,
# 2 GB), from the archive in this machine's apt sources (or
# $TORCHLORA_DEBIAN_MIRROR), and kept in $TORCHLORA_SID_DIR (default
# /var/cache/torchlora/sid-peft). Every mount is undone on exit.
#
# Exit status: 0 when every check passed with every tarball, 1 on any
# mismatch, 77 (after a loud SKIPPED line) when the chroot cannot be made
# or its Python stack does not import, 2 on bad arguments.
set -euo pipefail

name="run-peft-interop"
root="${TORCHLORA_SID_DIR:-/var/cache/torchlora/sid-peft}"
source_dir="$(cd "$(dirname "$0")/.." && pwd)"
build="$source_dir/build/default"
keep=""
tarballs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build)
      [ $# -ge 2 ] || { echo "$name: --build needs a folder" >&2; exit 2; }
      build="$(cd "$2" && pwd)"
      shift 2
      ;;
    --keep)
      [ $# -ge 2 ] || { echo "$name: --keep needs a folder" >&2; exit 2; }
      mkdir -p "$2"
      keep="$(cd "$2" && pwd)"
      shift 2
      ;;
    -h | --help)
      sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    -*)
      echo "$name: unknown option '$1' (expected --build DIR, --keep DIR or --help)" >&2
      exit 2
      ;;
    *)
      tarballs+=("$1")
      shift
      ;;
  esac
done
if [ ${#tarballs[@]} -eq 0 ] && [ -n "${TORCHLORA_PEFT_SRC:-}" ]; then
  tarballs+=("$TORCHLORA_PEFT_SRC")
fi
if [ ${#tarballs[@]} -eq 0 ]; then
  echo "$name: give a peft source tarball (or set TORCHLORA_PEFT_SRC)" >&2
  exit 2
fi
for tarball in "${tarballs[@]}"; do
  [ -f "$tarball" ] || { echo "$name: no file '$tarball'" >&2; exit 2; }
done
if [ "$(id -u)" -ne 0 ]; then
  echo "$name: must run as root (debootstrap, chroot and mount need it); got uid $(id -u)." >&2
  exit 2
fi

skip() {
  echo "$name: SKIPPED: $* -- the real peft was NOT checked" >&2
  exit 77
}

# shellcheck source=scripts/chroot-lib.sh
. "$source_dir/scripts/chroot-lib.sh"
chroot_lib_init "$name" "$root"
work="$(mktemp -d /tmp/torchlora-peft.XXXXXX)"
chroot_on_exit() {
  rmdir "$root$work" 2>/dev/null || true # the mount point, unmounted by now
  rm -rf "$work"
}

packages=python3-torch,python3-safetensors,python3-transformers,python3-huggingface-hub
packages+=,python3-accelerate,python3-tokenizers,python3-numpy,python3-yaml
packages+=,python3-packaging,python3-psutil,python3-tqdm,ca-certificates
started=$SECONDS
chroot_make sid "$packages" || skip "could not make the Debian sid chroot"
chroot_mount proc proc /proc
chroot_mount bind /dev /dev
stack="$(chroot_run python3 -c 'import torch, safetensors, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1)" ||
  skip "the chroot's Python stack does not import: $stack"
echo "$name: chroot ready after $((SECONDS - started)) s: $stack"

if [ ! -x "$build/tests/torchlora_interop" ]; then
  echo "$name: building torchlora_interop in $build"
  [ -f "$build/CMakeCache.txt" ] ||
    (cd "$source_dir" && cmake --preset default -B "$build" >/dev/null)
  cmake --build "$build" --target torchlora_interop
fi
program="$build/tests/torchlora_interop"

cp "$source_dir/tests/interop/peft_interop.py" \
  "$source_dir/tests/interop/interop_models.py" "$work/"
chroot_mount bind "$work" "$work"
status=0
for tarball in "${tarballs[@]}"; do
  label="$(basename "$tarball" .tar.gz)"
  peft_dir="$work/$label"
  files="$work/$label-files"
  mkdir -p "$peft_dir" "$files"
  tar -C "$peft_dir" -xzf "$tarball"
  src="$(find "$peft_dir" -maxdepth 3 -type d -path '*/src/peft' | head -n 1)"
  [ -n "$src" ] || { echo "$name: $tarball has no src/peft folder" >&2; status=1; continue; }
  echo "$name: === $label"
  one=0
  "$program" export "$files" || one=1
  if [ "$one" -eq 0 ]; then
    chroot_run HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$(dirname "$src")" \
      python3 "$work/peft_interop.py" --phase python --dir "$files" || one=1
  fi
  if [ "$one" -eq 0 ]; then
    "$program" check "$files" || one=1
  fi
  if [ -n "$keep" ]; then
    rm -rf "${keep:?}/$label"
    cp -r "$files" "$keep/$label"
  fi
  if [ "$one" -eq 0 ]; then
    echo "$name: $label: every check passed"
  else
    echo "$name: $label: FAILED" >&2
    status=1
  fi
done
echo "$name: done in $((SECONDS - started)) s"
exit "$status"
