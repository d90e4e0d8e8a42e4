#!/usr/bin/env bash
# Runs the README's test command (scripts/run-tests.sh) inside a Debian 13
# ("trixie": LibTorch 2.6, GCC 14, GoogleTest 1.16) chroot, so that every
# stop is checked against LibTorch 2.x as well as Debian 12's LibTorch 1.13.
#
#   scripts/run-tests-debian13.sh           # as root
#   scripts/run-tests-debian13.sh --fresh   # rebuild the chroot first
#
# The chroot is made with debootstrap the first time (a few minutes), from
# the Debian archive that this machine's apt sources name (or
# $TORCHLORA_DEBIAN_MIRROR), and kept in $TORCHLORA_DEBIAN13_DIR (default
# /var/cache/torchlora/debian13) for later runs. The source tree is copied
# into it afresh on every run (without build/), and scripts/run-tests.sh
# runs there, the install script included. /proc, /sys and /dev are mounted
# for the run and unmounted again however it ends.
set -euo pipefail

name="run-tests-debian13"
root="${TORCHLORA_DEBIAN13_DIR:-/var/cache/torchlora/debian13}"
mirror="${TORCHLORA_DEBIAN_MIRROR:-}"
fresh=0
for argument in "$@"; do
  case "$argument" in
    --fresh) fresh=1 ;;
    -h | --help)
      sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "$name: unknown argument '$argument' (expected --fresh or --help)" >&2
      exit 2
      ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "$name: must run as root (debootstrap, chroot and mount need it); got uid $(id -u)." >&2
  echo "$name: run it as: sudo $0 $*" >&2
  exit 1
fi

source_dir="$(cd "$(dirname "$0")/.." && pwd)"

if [ -z "$mirror" ]; then
  mirror="$("$source_dir/scripts/debian-mirror.sh")" || {
    echo "$name: set TORCHLORA_DEBIAN_MIRROR to a Debian archive to make the chroot from" >&2
    exit 1
  }
fi

mounted=()
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # Last mounted, first unmounted; lazily if something still holds it.
  local index
  for ((index = ${#mounted[@]} - 1; index >= 0; index--)); do
    umount -R "${mounted[index]}" 2>/dev/null || umount -R -l "${mounted[index]}" || true
  done
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mount_into_chroot() { # <type-or-bind> <source> <target below the chroot>
  local target="$root$3"
  mkdir -p "$target"
  if [ "$1" = bind ]; then
    mount --rbind "$2" "$target"
    mount --make-rslave "$target"
  else
    mount -t "$1" "$2" "$target"
  fi
  mounted+=("$target")
}

if [ "$fresh" -eq 1 ] && [ -e "$root" ]; then
  if grep -q " $root/" /proc/mounts; then
    echo "$name: $root still has mounts (another run?); not removing it" >&2
    exit 1
  fi
  echo "$name: --fresh: removing $root"
  rm -rf "$root"
fi

if [ ! -x "$root/usr/bin/apt-get" ] || [ ! -e "$root/.torchlora-complete" ]; then
  if ! command -v debootstrap >/dev/null 2>&1; then
    echo "$name: installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      debootstrap || {
      apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends debootstrap
    }
  fi
  echo "$name: creating a Debian 13 chroot in $root (debootstrap, a few minutes)"
  rm -rf "$root"
  mkdir -p "$root"
  started=$SECONDS
  debootstrap --variant=minbase trixie "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
    echo "$name: debootstrap failed; the last lines of $root.debootstrap.log:" >&2
    tail -n 20 "$root.debootstrap.log" >&2
    exit 1
  }
  touch "$root/.torchlora-complete"
  echo "$name: chroot ready in $((SECONDS - started)) s"
else
  echo "$name: reusing the Debian 13 chroot in $root (--fresh rebuilds it)"
fi

# Name resolution for apt inside, as on the host.
cp -L /etc/resolv.conf "$root/etc/resolv.conf"

# A fresh copy of the tree: tracked and untracked files, no build output.
work=/root/torchlora
rm -rf "${root:?}$work"
mkdir -p "$root$work"
tar -C "$source_dir" --exclude=./build --exclude=./.git --exclude='./runs' -cf - . |
  tar -C "$root$work" -xf -

mount_into_chroot proc proc /proc
mount_into_chroot bind /sys /sys
mount_into_chroot bind /dev /dev

in_chroot() {
  chroot "$root" /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 "$@"
}

status=0
in_chroot /bin/bash -c "cd $work && scripts/run-tests.sh" || status=$?

version_of() {
  in_chroot dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo "not installed"
}
gcc_version="$(in_chroot g++ -dumpfullversion 2>/dev/null || echo "not installed")"
echo "$name: tested on Debian $(cat "$root/etc/debian_version")," \
  "LibTorch $(version_of libtorch-dev), GCC $gcc_version," \
  "GoogleTest $(version_of libgtest-dev), CMake $(version_of cmake)"
if [ "$status" -ne 0 ]; then
  echo "$name: the tests FAILED on Debian 13 (exit $status)" >&2
else
  echo "$name: all tests passed on Debian 13"
fi
exit "$status"
