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
# for the run (the chroot itself is made a mount point) and unmounted again
# however it ends.
set -euo pipefail

name="run-tests-debian13"
root="${TORCHLORA_DEBIAN13_DIR:-/var/cache/torchlora/debian13}"
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
# shellcheck source=scripts/chroot-lib.sh
. "$source_dir/scripts/chroot-lib.sh"
chroot_lib_init "$name" "$root"

if [ "$fresh" -eq 1 ] && [ -e "$root" ]; then
  if grep -q " $root/" /proc/mounts; then
    echo "$name: $root still has mounts (another run?); not removing it" >&2
    exit 1
  fi
  echo "$name: --fresh: removing $root"
  rm -rf "$root"
fi
chroot_make trixie "" || exit 1

# Name resolution for apt inside, as on the host.
cp -L /etc/resolv.conf "$root/etc/resolv.conf"

# A fresh copy of the tree: tracked and untracked files, no build output.
work=/root/torchlora
rm -rf "${root:?}$work"
mkdir -p "$root$work"
tar -C "$source_dir" --exclude=./build --exclude=./.git --exclude='./runs' -cf - . |
  tar -C "$root$work" -xf -

# The chroot's / a mount point of its own, as `ip netns exec` (the tests
# between network namespaces) needs for "mount --make-rslave /"; unmounting
# it last also removes what those tests mount below it (/run/netns).
chroot_mount bind "$root" /
chroot_mount proc proc /proc
chroot_mount bind /sys /sys
chroot_mount bind /dev /dev

status=0
chroot_run /bin/bash -c "cd $work && scripts/run-tests.sh" || status=$?

version_of() {
  chroot_run dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo "not installed"
}
gcc_version="$(chroot_run g++ -dumpfullversion 2>/dev/null || echo "not installed")"
echo "$name: tested on Debian $(cat "$root/etc/debian_version")," \
  "LibTorch $(version_of libtorch-dev), GCC $gcc_version," \
  "GoogleTest $(version_of libgtest-dev), CMake $(version_of cmake)"
if [ "$status" -ne 0 ]; then
  echo "$name: the tests FAILED on Debian 13 (exit $status)" >&2
else
  echo "$name: all tests passed on Debian 13"
fi
exit "$status"
