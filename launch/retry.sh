#!/usr/bin/env bash
# Re-run a launch command until training has finished, i.e. until WORKDIR/done.json exists.
#
#   launch/retry.sh [--max-attempts N] [--max-failures N] [--sleep S] WORKDIR -- COMMAND [ARG ...]
#
#   launch/retry.sh gs://BUCKET/runs/voc -- \
#       launch/tpu_pod.sh my-tpu us-central2-b configs/voc.py gs://BUCKET/runs/voc
#   launch/retry.sh /tmp/rsepm_mh -- launch/local_processes.sh 2 configs/demo.py:smoke /tmp/rsepm_mh
#
# Every launcher here resumes from the latest checkpoint in WORKDIR when re-run, so re-running the
# same command after a preemption, a maintenance event or a lost host continues the run. Process 0
# writes WORKDIR/done.json when training completes; this loop checks it before each attempt and
# after it (`test -f`, or `gcloud storage ls` / `gsutil -q stat` for gs:// paths).
#
# Attempts:   exit 0 without done.json (the run was preempted and saved) or exit 75 (tpu_pod.sh:
#             the TPU went away) count as interruptions; any other exit status counts as a failure.
#             Retrying stops after --max-attempts attempts in all (default 20) or --max-failures
#             failures in a row (default 3: a crash that repeats is a bug, not bad luck).
# --sleep S:  seconds between attempts (default 60).
# Logs:       this loop prints one line per attempt; the launch command writes its own logs.
# Ctrl-C / SIGTERM to this script: forwarded as SIGTERM to the command (local_processes.sh then
#             stops every process with a checkpoint; tpu_pod.sh stops watching, the pod keeps
#             training) and no further attempt is made.
set -euo pipefail

max_attempts=20; max_failures=3; pause=60
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --max-attempts) max_attempts="${2:?}"; shift 2 ;;
    --max-attempts=*) max_attempts="${1#*=}"; shift ;;
    --max-failures) max_failures="${2:?}"; shift 2 ;;
    --max-failures=*) max_failures="${1#*=}"; shift ;;
    --sleep) pause="${2:?}"; shift 2 ;;
    --sleep=*) pause="${1#*=}"; shift ;;
    -h|--help) usage ;;
    -*) echo "retry.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[[ $# -ge 3 && $2 == "--" ]] || usage
workdir="${1%/}"; shift 2
done_file="$workdir/done.json"

is_done() {
  case "$workdir" in
    gs://*)
      if command -v gcloud >/dev/null 2>&1; then
        gcloud storage ls "$done_file" >/dev/null 2>&1
      else
        gsutil -q stat "$done_file" 2>/dev/null
      fi ;;
    *://*) echo "retry.sh: cannot check $done_file (only local paths and gs:// are supported)" >&2
      return 1 ;;
    *) test -f "$done_file" ;;
  esac
}

child=""
stop=0
on_signal() {
  stop=1
  echo "retry.sh: $1 received; stopping after the current attempt." >&2
  if [[ -n $child ]]; then kill -TERM "$child" 2>/dev/null || true; fi
}
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # wait_for

attempt=0; failures=0
while true; do
  if is_done; then
    echo "retry.sh: $done_file exists: training has finished." >&2
    exit 0
  fi
  if ((attempt >= max_attempts)); then
    echo "retry.sh: giving up after $attempt attempts; $done_file does not exist." >&2
    exit 1
  fi
  attempt=$((attempt + 1))
  echo "retry.sh: attempt $attempt/$max_attempts ($(date -u '+%Y-%m-%d %H:%M:%S UTC')): $*" >&2
  "$@" &
  child=$!
  rc=0
  wait_for "$child" || rc=$?
  child=""
  if ((stop)); then
    echo "retry.sh: stopped by a signal (the command exited with status $rc)." >&2
    exit "$(( rc == 0 ? 130 : rc ))"
  fi
  if is_done; then
    echo "retry.sh: $done_file exists: training has finished." >&2
    exit 0
  fi
  if ((rc == 0 || rc == 75)); then
    failures=0
    echo "retry.sh: the run stopped before the end (status $rc, no done.json): interrupted;" \
      "restarting in $pause s." >&2
  else
    failures=$((failures + 1))
    echo "retry.sh: the command failed with status $rc ($failures failure(s) in a row)." >&2
    if ((failures >= max_failures)); then
      echo "retry.sh: $failures failures in a row; not retrying. Fix the cause, then re-run." >&2
      exit "$rc"
    fi
    echo "retry.sh: restarting in $pause s." >&2
  fi
  sleep "$pause" &
  sleeper=$!
  wait "$sleeper" 2>/dev/null || true
  kill "$sleeper" 2>/dev/null || true
  if ((stop)); then exit 130; fi
done
