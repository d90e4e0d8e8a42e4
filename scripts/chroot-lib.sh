# Shared by the scripts that run something inside a Debian chroot
# (run-tests-debian13.sh, run-peft-interop.sh); source it, do not run it.
#
#   chroot_lib_init NAME ROOT   # message prefix and chroot folder
#   chroot_make SUITE PACKAGES  # debootstrap ROOT once (PACKAGES: a,b,c or "")
#   chroot_mount TYPE SRC DEST  # mount (TYPE "bind" for a bind mount) at
#                               # ROOT/DEST; undone on exit, Ctrl-C included
#   chroot_run CMD...           # runs CMD in ROOT with a clean environment
#
# The archive comes from this machine's apt sources (debian-mirror.sh) or
# $TORCHLORA_DEBIAN_MIRROR: no archive is named in this repository.

chroot_lib_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
chroot_name=""
chroot_root=""
chroot_mounted=()

chroot_lib_init() {
  chroot_name="$1"
  chroot_root="$2"
  trap chroot_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

chroot_cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # Last mounted, first unmounted; lazily if something still holds it.
  local index
  for ((index = ${#chroot_mounted[@]} - 1; index >= 0; index--)); do
    umount -R "${chroot_mounted[index]}" 2>/dev/null ||
      umount -R -l "${chroot_mounted[index]}" || true
  done
  chroot_mounted=()
  if declare -F chroot_on_exit >/dev/null; then
    chroot_on_exit || true
  fi
  exit "$status"
}

chroot_mount() { # <type or bind> <source> <target below the chroot>
  local target="$chroot_root$3"
  mkdir -p "$target"
  if [ "$1" = bind ]; then
    mount --rbind "$2" "$target"
    chroot_mounted+=("$target") # before anything else can fail
    mount --make-rslave "$target"
  else
    mount -t "$1" "$2" "$target"
    chroot_mounted+=("$target")
  fi
}

chroot_run() {
  chroot "$chroot_root" /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 "$@"
}

# Makes the chroot with debootstrap unless a complete one is there; returns
# non-zero (after saying why) when it cannot.
chroot_make() { # <suite> <comma-separated packages, or "">
  local suite="$1" packages="$2"
  # The stamp holds the package list the chroot was made with: another list
  # makes it anew.
  if [ -x "$chroot_root/usr/bin/apt-get" ] && [ -e "$chroot_root/.torchlora-complete" ] &&
    [ "$(cat "$chroot_root/.torchlora-complete")" = "$packages" ]; then
    echo "$chroot_name: reusing the Debian $suite chroot in $chroot_root"
    return 0
  fi
  if grep -q " $chroot_root/" /proc/mounts; then
    echo "$chroot_name: $chroot_root still has mounts (another run?); not remaking it" >&2
    return 1
  fi
  local mirror="${TORCHLORA_DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    mirror="$("$chroot_lib_dir/debian-mirror.sh")" || {
      echo "$chroot_name: set TORCHLORA_DEBIAN_MIRROR to a Debian archive to make the chroot from" >&2
      return 1
    }
  fi
  if ! command -v debootstrap >/dev/null 2>&1; then
    echo "$chroot_name: installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      debootstrap >/dev/null || {
      apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends debootstrap >/dev/null
    } || {
      echo "$chroot_name: cannot install debootstrap" >&2
      return 1
    }
  fi
  echo "$chroot_name: creating a Debian $suite chroot in $chroot_root (debootstrap, a few minutes)"
  rm -rf "$chroot_root"
  mkdir -p "$chroot_root"
  local started=$SECONDS
  local include=()
  [ -n "$packages" ] && include=("--include=$packages")
  debootstrap --variant=minbase "${include[@]}" "$suite" "$chroot_root" "$mirror" \
    >"$chroot_root.debootstrap.log" 2>&1 || {
    echo "$chroot_name: debootstrap failed; the last lines of $chroot_root.debootstrap.log:" >&2
    tail -n 20 "$chroot_root.debootstrap.log" >&2
    return 1
  }
  printf '%s' "$packages" >"$chroot_root/.torchlora-complete"
  echo "$chroot_name: chroot ready in $((SECONDS - started)) s"
}
