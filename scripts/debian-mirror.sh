#!/usr/bin/env bash
# Prints the Debian archive that this machine's apt sources use (the first
# "URIs:" of a deb822 .sources file, or the first "deb" line of a
# sources.list, that is not the security archive), for debootstrap. No
# archive is named in this repository: each machine uses its own.
#
#   scripts/debian-mirror.sh        # e.g. prints http://<archive>/debian
set -euo pipefail

candidates() {
  local file
  for file in /etc/apt/sources.list.d/*.sources; do
    [ -f "$file" ] || continue
    # deb822: "URIs: <uri> [<uri> ...]" in each stanza.
    awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$file"
  done
  for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$file" ] || continue
    # one-line style: deb [options] <uri> <suite> <components>
    awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/ && $i !~ /=/) { print $i; break } }' "$file"
  done
}

mirror="$(candidates | grep -v -e 'security' -e '^cdrom:' | grep -E '^(https?|file)://' | head -n 1)" || true
if [ -z "$mirror" ]; then
  echo "debian-mirror: no Debian archive found in /etc/apt/sources.list or /etc/apt/sources.list.d/" >&2
  exit 1
fi
echo "${mirror%/}"
