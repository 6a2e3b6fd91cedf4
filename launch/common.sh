# Shell helpers shared by the launch scripts (sourced, not run).

# The exit status of child $1, even when a trapped signal interrupts `wait`.
wait_for() {
  local pid="$1" rc
  while true; do
    wait "$pid" && rc=0 || rc=$?
    if ((rc <= 128)) || ! kill -0 "$pid" 2>/dev/null; then break; fi
  done
  if ((rc > 128)); then wait "$pid" && rc=0 || rc=$?; fi
  return "$rc"
}
