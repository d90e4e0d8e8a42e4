# Sourced by the interrupt tests: how many processes run with MARKER as the
# first word of their command line (read from /proc: no procps needed).
#
#   count_processes_named MARKER
count_processes_named() {
  local count=0 file
  for file in /proc/[0-9]*/cmdline; do
    if { tr '\0' ' ' <"$file"; } 2>/dev/null | grep -q "^$1 "; then
      count=$((count + 1))
    fi
  done
  echo "$count"
}
