#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one worker or a pod): ship this checkout to every worker, install
# the pinned requirements in a venv there, start the same command on all workers, and watch them.
#
#   launch/tpu_pod.sh NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_pod.sh my-tpu us-central2-b configs/voc.py gs://BUCKET/runs/voc \
#       --config.data.name=array_record --config.data.root=gs://BUCKET/data
#
#   launch/tpu_pod.sh status NAME ZONE       state of the run on every worker
#   launch/tpu_pod.sh logs NAME ZONE [LINES] the end of every worker's log
#   launch/tpu_pod.sh stop NAME ZONE         SIGTERM to every worker: checkpoint, then exit
#
# Arguments after WORKDIR (`--config.x=y` overrides, `--mode=eval`, ...) reach every worker's
# `python -m rsepm_jax.main` unchanged. WORKDIR must be visible to every worker (a gs:// path, or
# a shared mount); main.py calls jax.distributed.initialize(), which finds the pod's workers by
# itself. The global batch (config.train.global_batch_size) is the config's, whatever the slice.
#
# Needs: gcloud on this machine (project set: `gcloud config set project P` or
# CLOUDSDK_CORE_PROJECT=P), and Python >= 3.11 on the workers (jax 0.10.2 and numpy 2.4 need it).
# If the workers' python3 is older (Ubuntu 22.04 images have 3.10), set RSEPM_SETUP_PYTHON=apt to
# let this script run `sudo apt-get install -y python3.11 python3.11-venv` on them, or set
# RSEPM_PYTHON to a Python >= 3.11 that exists at the same path on every worker.
#
# Logs: each worker appends to ~/rsepm_run/logs/worker_<i>.log on its VM, and when its process
#   ends (finished, preempted or failed) copies it to WORKDIR/logs/<run id>/worker_<i>.log
#   (<run id> = this launch's UTC start time). While it runs: `launch/tpu_pod.sh logs NAME ZONE`.
# Watching: this script polls the workers every POLL seconds (default 120) and returns when every
#   process has stopped: 0 if all exited 0 (finished, or preempted after saving), 1 if one failed
#   (its log's end is printed), 75 if the TPU went away (preempted / maintenance) or processes
#   vanished without an exit status. Ctrl-C stops only the watching; the pod keeps training.
#   DETACH=1 starts the run and returns at once.
# Preemption: a spot/preemptible TPU VM gets SIGTERM before it stops; every process saves a
#   checkpoint at the same step, logs "Preempted at step N: ..." and exits 0. The TPU is then
#   PREEMPTED and must be deleted and re-created: set TPU_CREATE_ARGS (below) and this script does
#   it. A VM restarted by a maintenance event or a host failure loses the steps since the last
#   periodic checkpoint (config.train.checkpoint_every).
# Resume: run the same command again; it re-ships, reinstalls only if requirements.txt changed,
#   and continues from the latest checkpoint in WORKDIR (data position included). If the previous
#   run is still alive on every worker it re-attaches instead of starting another. Until
#   WORKDIR/done.json exists (written by process 0 when training completes), retry with
#     launch/retry.sh gs://BUCKET/runs/voc -- env TPU_CREATE_ARGS="..." launch/tpu_pod.sh ...
#
# Environment:
#   TPU_CREATE_ARGS  when set, a missing or PREEMPTED TPU NAME is (re-)created with
#                    `gcloud compute tpus tpu-vm create NAME --zone=ZONE $TPU_CREATE_ARGS`,
#                    e.g. "--accelerator-type=v5p-32 --version=RUNTIME_VERSION --spot"
#   TPU_SSH_FLAGS    extra flags for `gcloud compute tpus tpu-vm ssh/scp`, e.g. --internal-ip
#   RSEPM_INIT_TIMEOUT, RSEPM_HEARTBEAT_TIMEOUT, RSEPM_SHUTDOWN_TIMEOUT, XLA_FLAGS,
#   LIBTPU_INIT_ARGS   passed on to the workers when set
#   POLL=120, DETACH=0 see "Watching"
set -euo pipefail

SRC_DIR=rsepm_jax_src   # on the workers, relative to $HOME: the shipped code
VENV_DIR=rsepm_venv     # the virtual environment
RUN_DIR=rsepm_run       # pid, exit status, run id and logs of the current run
PASS_ENV="RSEPM_INIT_TIMEOUT RSEPM_HEARTBEAT_TIMEOUT RSEPM_SHUTDOWN_TIMEOUT RSEPM_PYTHON
RSEPM_SETUP_PYTHON XLA_FLAGS LIBTPU_INIT_ARGS"

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # wait_for

# ---------------------------------------------------------------------------------------------
# Worker side: `bash ~/rsepm_jax_src/launch/tpu_pod.sh _setup|_start|_run|_status|_stop`, run on
# every TPU VM through ssh. Lines starting with "rsepm-" are read back by the launcher.
# ---------------------------------------------------------------------------------------------
SRC="$HOME/$SRC_DIR"; VENV="$HOME/$VENV_DIR"; RUN="$HOME/$RUN_DIR"

worker_index() {
  local i
  i=$(curl -fs -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null) || i=""
  [[ $i =~ ^[0-9]+$ ]] || i=$(hostname | sed -n 's/.*-w-\([0-9][0-9]*\)$/\1/p')
  echo "${i:-0}"
}

pid_runs() {  # pid_runs PIDFILE PATTERN: the process in PIDFILE is alive and runs PATTERN
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && grep -qa "$2" "/proc/$pid/cmdline" 2>/dev/null
}

run_alive() { pid_runs "$RUN/pid" rsepm_jax.main || pid_runs "$RUN/wrapper_pid" tpu_pod.sh; }

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

pick_python() {
  local py
  for py in ${RSEPM_PYTHON:-} python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && python_ok "$py"; then echo "$py"; return 0; fi
  done
  return 1
}

worker_setup() {
  local i py jaxver jaxspec want
  i=$(worker_index)
  cd "$SRC"
  if [[ ${RSEPM_SETUP_PYTHON:-} == apt ]] && ! pick_python >/dev/null; then
    echo "worker $i: installing python3.11 and python3.11-venv with apt-get"
    sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
      python3.11 python3.11-venv || true
  fi
  if ! py=$(pick_python); then
    echo "rsepm-setup-failed worker=$i: no Python >= 3.11 here (python3 is" \
      "$(python3 --version 2>&1 || echo missing)); requirements.txt (jax 0.10.2, numpy 2.4)" \
      "needs 3.11+. Re-run with RSEPM_SETUP_PYTHON=apt (installs python3.11 and" \
      "python3.11-venv with apt-get), or install a Python >= 3.11 on every worker yourself" \
      "(apt, pyenv or uv) and set RSEPM_PYTHON=/path/to/it, or create the TPU with a runtime" \
      "version whose image has Python >= 3.11."
    return 1
  fi
  if [[ -e $VENV ]] && ! python_ok "$VENV/bin/python"; then rm -rf "$VENV"; fi
  if [[ ! -e $VENV ]] && ! "$py" -m venv "$VENV"; then
    rm -rf "$VENV"
    echo "rsepm-setup-failed worker=$i: '$py -m venv' failed; install the venv module" \
      "(on Ubuntu: sudo apt-get install -y ${py##*/}-venv) or re-run with RSEPM_SETUP_PYTHON=apt."
    return 1
  fi
  jaxver=$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' requirements.txt)
  jaxspec="jax[tpu]${jaxver:+==$jaxver}"
  want="$(sha256sum requirements.txt | cut -d' ' -f1) $jaxspec gcsfs"
  if [[ $(cat "$VENV/.rsepm_installed" 2>/dev/null) != "$want" ]]; then
    echo "worker $i: installing requirements.txt, $jaxspec and gcsfs into ~/$VENV_DIR"
    if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
      "$VENV/bin/python" -m pip install -q -r requirements.txt "$jaxspec" gcsfs; }; then
      echo "rsepm-setup-failed worker=$i: pip install failed (output above)."
      return 1
    fi
    echo "$want" >"$VENV/.rsepm_installed"
  fi
  echo "rsepm-setup-ok worker=$i python=$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')"
}

worker_start() {  # worker_start RUN_ID WORKDIR CONFIG [ARG ...]
  local i
  i=$(worker_index)
  mkdir -p "$RUN/logs"
  if run_alive; then
    echo "rsepm-started worker=$i (already running: pid $(cat "$RUN/pid" 2>/dev/null))"
    return 0
  fi
  rm -f "$RUN/pid" "$RUN/wrapper_pid" "$RUN/exit_code"
  echo "$1" >"$RUN/run_id"
  nohup setsid bash "$SRC/launch/tpu_pod.sh" _run "$@" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 50); do
    if [[ -s $RUN/pid ]]; then break; fi
    sleep 0.2
  done
  if [[ -s $RUN/pid ]]; then
    echo "rsepm-started worker=$i pid=$(cat "$RUN/pid") log=~/$RUN_DIR/logs/worker_$i.log"
  else
    echo "rsepm-start-failed worker=$i; end of its log:"
    tail -n 20 "$RUN/logs/worker_$i.log" 2>/dev/null || true
    return 1
  fi
}

copy_log() {  # copy_log FILE DEST
  case "$2" in
    gs://*)
      if command -v gcloud >/dev/null 2>&1; then timeout 120 gcloud -q storage cp "$1" "$2"
      elif command -v gsutil >/dev/null 2>&1; then timeout 120 gsutil -q cp "$1" "$2"
      else echo "neither gcloud nor gsutil here: log not copied to $2"; return 1
      fi ;;
    *://*) echo "log not copied to $2 (only gs:// and file paths are supported)"; return 1 ;;
    *) mkdir -p "$(dirname "$2")" && cp "$1" "$2" ;;
  esac
}

worker_run() {  # worker_run RUN_ID WORKDIR CONFIG [ARG ...]: the training process and its log
  local run_id="$1" workdir="${2%/}" config="$3" i log rc=0 pid note
  shift 3
  i=$(worker_index)
  log="$RUN/logs/worker_$i.log"
  echo "$$" >"$RUN/wrapper_pid"
  cd "$SRC"
  export PATH="$VENV/bin:$PATH" RSEPM_DISTRIBUTED=1
  echo "=== $(date -u) run $run_id, worker $i: python -m rsepm_jax.main --config=$config" \
    "--workdir=$workdir $*" >>"$log"
  # The process gets its own SIGTERM on preemption; this wrapper only waits for it and notes it.
  trap 'echo "=== $(date -u): SIGTERM/SIGHUP" >>"$log"' TERM HUP
  python -m rsepm_jax.main --config="$config" --workdir="$workdir" "$@" </dev/null >>"$log" 2>&1 &
  pid=$!
  echo "$pid" >"$RUN/pid"
  wait_for "$pid" || rc=$?
  echo "=== $(date -u): exit status $rc; copying this log to $workdir/logs/$run_id/worker_$i.log" >>"$log"
  note=$(copy_log "$log" "$workdir/logs/$run_id/worker_$i.log" 2>&1) || true
  if [[ -n $note ]]; then echo "$note" >>"$log"; fi
  echo "$rc" >"$RUN/exit_code"
}

worker_status() {
  local i state last
  i=$(worker_index)
  if run_alive; then state=running
  elif [[ -s $RUN/exit_code ]]; then state="exited rc=$(cat "$RUN/exit_code")"
  elif [[ -e $RUN/run_id ]]; then state=lost   # started, but no exit status: VM restarted or killed
  else state=none
  fi
  echo "rsepm-status worker=$i state=$state"
  last=$(tail -n 1 "$RUN/logs/worker_$i.log" 2>/dev/null | cut -c1-240) || true
  if [[ -n $last ]]; then echo "rsepm-last worker=$i $last"; fi
}

worker_stop() {
  local i
  i=$(worker_index)
  if pid_runs "$RUN/pid" rsepm_jax.main; then
    kill -TERM "$(cat "$RUN/pid")"
    echo "rsepm-stop worker=$i: SIGTERM sent to pid $(cat "$RUN/pid")"
  else
    echo "rsepm-stop worker=$i: not running"
  fi
}

case "${1:-}" in
  _setup) worker_setup; exit ;;
  _start) shift; worker_start "$@"; exit ;;
  _run) shift; worker_run "$@"; exit ;;
  _status) worker_status; exit ;;
  _stop) worker_stop; exit ;;
esac

# ---------------------------------------------------------------------------------------------
# Launcher side (this machine). Meant to run under bash 3.2 too (macOS): no newer features.
# ---------------------------------------------------------------------------------------------
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { local rc="$1"; shift; echo "tpu_pod.sh: $*" >&2; exit "$rc"; }

quote_args() { local a; for a in "$@"; do printf '%q ' "$a"; done; }

env_prefix() {  # `env VAR=value ...` for the variables of PASS_ENV that are set here
  local v out=""
  for v in $PASS_ENV; do
    if [[ -n ${!v:-} ]]; then out="$out$(quote_args "$v=${!v}")"; fi
  done
  if [[ -n $out ]]; then echo "env $out"; fi
}

ssh_flags=()
if [[ -n ${TPU_SSH_FLAGS:-} ]]; then read -r -a ssh_flags <<<"$TPU_SSH_FLAGS"; fi

pod_ssh() {  # pod_ssh WORKER COMMAND
  gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker="$1" --quiet \
    --strict-host-key-checking=no ${ssh_flags[@]+"${ssh_flags[@]}"} --command="$2" 2>&1
}

run_all() {  # run_all COMMAND: on every worker; the output is shown and kept in $out
  local line
  out=""
  while IFS= read -r line; do
    line="${line%$'\r'}"
    echo "$line" >&2
    out="$out$line"$'\n'
  done < <(pod_ssh all "$1" || true)
}

remote_self() { echo "bash ~/$SRC_DIR/launch/tpu_pod.sh"; }

tpu_state() {
  gcloud compute tpus tpu-vm describe "$name" --zone="$zone" --format='value(state)' 2>/dev/null || true
}

count_workers() {
  gcloud compute tpus tpu-vm describe "$name" --zone="$zone" --format='json(networkEndpoints)' \
    2>/dev/null | grep -c '"ipAddress"' || true
}

ensure_tpu() {
  local state create_args=()
  state=$(tpu_state)
  case "$state" in
    READY) return 0 ;;
    "")
      [[ -n ${TPU_CREATE_ARGS:-} ]] || die 1 "no TPU $name in $zone (or gcloud cannot see it: check" \
        "the project); create it, or set TPU_CREATE_ARGS to let this script create it." ;;
    PREEMPTED|TERMINATED)
      [[ -n ${TPU_CREATE_ARGS:-} ]] || die 1 "TPU $name is $state: delete it" \
        "(gcloud compute tpus tpu-vm delete $name --zone=$zone) and create it again, or set" \
        "TPU_CREATE_ARGS to let this script do that."
      echo "tpu_pod.sh: TPU $name is $state; deleting it to create it again." >&2
      gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet ;;
    STOPPED) die 1 "TPU $name is STOPPED: gcloud compute tpus tpu-vm start $name --zone=$zone" ;;
    *) die 75 "TPU $name is $state; run again when it is READY." ;;
  esac
  read -r -a create_args <<<"$TPU_CREATE_ARGS"
  echo "tpu_pod.sh: gcloud compute tpus tpu-vm create $name --zone=$zone $TPU_CREATE_ARGS" >&2
  gcloud compute tpus tpu-vm create "$name" --zone="$zone" ${create_args[@]+"${create_args[@]}"} ||
    die 75 "could not create TPU $name (no capacity right now?); run again later."
}

# poll_status: asks every worker; sets reported, running, ok, failed ("W(rc) ..."), lost, last0.
poll_status() {
  local out line w state
  out=$(pod_ssh all "$(remote_self) _status" | tr -d '\r') || true
  reported=0; running=0; ok=0; failed=""; lost=""; last0=""
  while IFS= read -r line; do
    case "$line" in
      *"rsepm-status worker="*)
        line="${line#*rsepm-status worker=}"; w="${line%% *}"; state="${line#* state=}"
        reported=$((reported + 1))
        case "$state" in
          running) running=$((running + 1)) ;;
          "exited rc=0") ok=$((ok + 1)) ;;
          exited*) failed="$failed $w(${state#exited rc=})" ;;
          lost) lost="$lost $w" ;;
        esac ;;
      *"rsepm-last worker=0 "*) last0="${line#*rsepm-last worker=0 }" ;;
    esac
  done <<<"$out"
}

pause() {  # pause SECONDS, interruptible by the traps
  local s
  sleep "$1" &
  s=$!
  wait "$s" 2>/dev/null || true
  kill "$s" 2>/dev/null || true
}

is_done() {
  case "$workdir" in
    gs://*) gcloud storage ls "$workdir/done.json" >/dev/null 2>&1 ;;
    *) false ;;  # a shared mount on the workers need not exist here
  esac
}

watch_run() {
  local fails=0 w line state
  trap 'echo >&2; echo "tpu_pod.sh: stopped watching; the run goes on on $name." \
    "Watch again: launch/tpu_pod.sh $(quote_args "$name" "$zone" "$config" "$workdir" ${extra[@]+"${extra[@]}"})" \
    "(re-attaches); stop it (with a checkpoint): launch/tpu_pod.sh stop $name $zone" >&2; exit 130' INT TERM
  while true; do
    pause "${POLL:-120}"
    poll_status
    if ((reported < nworkers)); then
      fails=$((fails + 1))
      state=$(tpu_state)
      if [[ $state != READY ]]; then
        echo "tpu_pod.sh: TPU $name is ${state:-gone} (preempted or under maintenance)." \
          "Run the same command again to resume from the last checkpoint." >&2
        return 75
      fi
      ((fails < 10)) || die 1 "only $reported of $nworkers workers answered, $fails polls in a row."
      echo "tpu_pod.sh: only $reported of $nworkers workers answered; asking again." >&2
      continue
    fi
    fails=0
    if ((running > 0)); then
      echo "$(date -u +%H:%M:%S) running on $running/$nworkers workers | worker 0: $last0" >&2
      continue
    fi
    break
  done
  trap - INT TERM
  if [[ -n $failed ]]; then
    echo "tpu_pod.sh: failed on worker(s):$failed (worker(exit status)); ends of their logs:" >&2
    for w in $failed; do
      w="${w%%(*}"
      pod_ssh "$w" "tail -n 30 ~/$RUN_DIR/logs/worker_$w.log" | sed "s/^/  worker $w | /" >&2 || true
    done
    echo "tpu_pod.sh: whole logs in $workdir/logs/$run_id/. Run the same command again to resume" \
      "from the last checkpoint once the cause is fixed." >&2
    return 1
  fi
  if [[ -n $lost ]]; then
    echo "tpu_pod.sh: worker(s)$lost stopped without an exit status (VM restarted or process" \
      "killed). Run the same command again to resume from the last checkpoint." >&2
    return 75
  fi
  if is_done; then
    echo "tpu_pod.sh: training finished: $workdir/done.json exists. Logs: $workdir/logs/$run_id/" >&2
  else
    echo "tpu_pod.sh: every worker exited 0 (finished, or preempted after saving a checkpoint)." \
      "Logs: $workdir/logs/$run_id/. If $workdir/done.json is missing, run the same command" \
      "again to continue." >&2
  fi
  return 0
}

launch() {
  local n started
  [[ $workdir == gs://* ]] || echo "tpu_pod.sh: note: $workdir must be the same shared storage on" \
    "every worker (checkpoints are written by all of them); a gs:// path is the usual choice." >&2
  ensure_tpu
  nworkers=$(count_workers)
  ((nworkers > 0)) || die 1 "cannot list the workers of TPU $name in $zone."

  poll_status
  if ((running > 0 && running == nworkers)); then
    run_id=$(pod_ssh 0 "cat ~/$RUN_DIR/run_id" | tr -d '\r' | tail -n 1)
    echo "tpu_pod.sh: a run ($run_id) is already going on all $nworkers workers; watching it" \
      "(stop it first with 'launch/tpu_pod.sh stop $name $zone' to start a new one)." >&2
  else
    if ((running > 0)); then
      echo "tpu_pod.sh: $running of $nworkers workers still run a previous attempt; waiting for" \
        "them to stop (the others' loss stops them within RSEPM_HEARTBEAT_TIMEOUT)." >&2
      n=0
      while ((running > 0)); do
        ((n++ < 30)) || die 1 "workers still running after 30 polls; stop them:" \
          "launch/tpu_pod.sh stop $name $zone"
        pause 30
        poll_status
      done
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    COPYFILE_DISABLE=1 tar -czf "$tmp/$SRC_DIR.tgz" -C "$here" --exclude=__pycache__ \
      --exclude='*.pyc' rsepm_jax configs requirements.txt launch
    echo "tpu_pod.sh: copying the code to the $nworkers worker(s) of $name and installing." >&2
    gcloud compute tpus tpu-vm scp "$tmp/$SRC_DIR.tgz" "$name:$SRC_DIR.tgz" --zone="$zone" \
      --worker=all --quiet --strict-host-key-checking=no ${ssh_flags[@]+"${ssh_flags[@]}"}
    run_all "rm -rf ~/$SRC_DIR && mkdir -p ~/$SRC_DIR && tar -xzf ~/$SRC_DIR.tgz -C ~/$SRC_DIR \
&& rm -f ~/$SRC_DIR.tgz && $(env_prefix) $(remote_self) _setup"
    n=$(grep -c 'rsepm-setup-ok worker=' <<<"$out" || true)
    ((n >= nworkers)) || die 1 "set-up succeeded on $n of $nworkers workers; see the" \
      "rsepm-setup-failed lines above."

    run_id=$(date -u +%Y%m%dT%H%M%SZ)
    run_all "$(env_prefix) $(remote_self) _start $(quote_args "$run_id" "$workdir" "$config" \
      ${extra[@]+"${extra[@]}"})"
    started=$(grep -c 'rsepm-started worker=' <<<"$out" || true)
    if ((started < nworkers)); then
      pod_ssh all "$(remote_self) _stop" >&2 || true
      die 1 "started on $started of $nworkers workers (output above); stopped the others."
    fi
    echo "tpu_pod.sh: run $run_id started on $nworkers worker(s)." >&2
  fi
  echo "tpu_pod.sh: logs: ~/$RUN_DIR/logs/worker_<i>.log on each worker, copied to" \
    "$workdir/logs/$run_id/ when it stops; now: launch/tpu_pod.sh logs $name $zone" >&2
  if [[ ${DETACH:-0} == 1 ]]; then
    echo "tpu_pod.sh: DETACH=1: not watching. State: launch/tpu_pod.sh status $name $zone" >&2
    return 0
  fi
  watch_run
}

here="$(cd "$(dirname "$0")/.." && pwd)"
tmp=""
case "${1:-}" in
  status|logs|stop)
    [[ $# -ge 3 ]] || usage
    cmd="$1"; name="$2"; zone="$3"
    case "$cmd" in
      status) pod_ssh all "$(remote_self) _status" | tr -d '\r' |
        sed -n 's/.*rsepm-status worker=\([0-9]*\) state=/worker \1: /p; s/.*rsepm-last worker=\([0-9]*\) /worker \1 log: /p' ;;
      logs) pod_ssh all "tail -v -n $(quote_args "${4:-20}") ~/$RUN_DIR/logs/worker_*.log" ;;
      stop) pod_ssh all "$(remote_self) _stop" ;;
    esac ;;
  ""|-h|--help) usage ;;
  *)
    [[ $# -ge 4 ]] || usage
    name="$1"; zone="$2"; config="$3"; workdir="${4%/}"; shift 4
    extra=("$@")
    launch ;;
esac
