# shellcheck shell=bash
# Sourced by the launch scripts (not run): two things that are easy to get wrong, kept in one place so that
# tests/test_launch.py can check them without Slurm.
#
# 1. The rendezvous from Slurm's environment (slurm_rendezvous): which node this is, how many there are,
#    where rank 0 listens, how many GPUs each node runs.
# 2. Stopping a run cleanly on a signal (run_launcher): SIGTERM must reach the *training ranks*, which then
#    finish the current step, save a checkpoint and exit 0. Neither launcher passes it on that way:
#    - `deepspeed` (deepspeed/launcher/runner.py) installs no signal handler unless it drives pdsh, so a
#      SIGTERM kills it at once and leaves its child `deepspeed.launcher.launch` and the ranks running
#      unsupervised (and Slurm then kills them when the job step ends, in the middle of a step or a save);
#    - `deepspeed.launcher.launch` (launch.py) and torchrun do forward SIGTERM to the ranks, but SIGKILL
#      them 30 s later, which is too short for a large model to finish a step and write a checkpoint.
#    So run_launcher sends SIGTERM to the ranks themselves and waits for them, however long the save takes.
#    One rank's signal is enough: the ranks agree at every step to stop together (pretrain/train/loop.py).

# The hosts of a Slurm node list (SLURM_JOB_NODELIST), one per line, in order.
slurm_expand_nodelist() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1"
  else
    slurm_expand_nodelist_bash "$1"
  fi
}

# The same without Slurm's tools: "gpu[01-03,07],cpu5" -> gpu01 gpu02 gpu03 gpu07 cpu5. Handles zero padding
# and several bracket groups in one name ("rack[1-2]-n[01-02]"); commas inside brackets separate ranges.
slurm_expand_nodelist_bash() {
  local list=$1 item="" char depth=0 i
  for ((i = 0; i < ${#list}; i++)); do
    char=${list:i:1}
    case $char in
      '[') depth=$((depth + 1)) ;;
      ']') depth=$((depth - 1)) ;;
    esac
    if [[ $char == , && $depth -eq 0 ]]; then
      _slurm_expand_host "$item"
      item=""
    else
      item+=$char
    fi
  done
  if [[ -n $item ]]; then _slurm_expand_host "$item"; fi
}

# One host expression: expand its first bracket group, then the rest of the name recursively.
_slurm_expand_host() {
  local expr=$1
  if [[ $expr != *'['* ]]; then
    printf '%s\n' "$expr"
    return
  fi
  local prefix=${expr%%\[*} rest=${expr#*\[}
  local ranges=${rest%%\]*} suffix=${rest#*\]}
  local range low high n parts
  IFS=, read -ra parts <<<"$ranges"
  for range in "${parts[@]}"; do
    low=${range%%-*}
    high=${range##*-}
    # 10# reads "08" as eight, not as a bad octal number; the width of the low end gives the zero padding.
    for ((n = 10#$low; n <= 10#$high; n++)); do
      _slurm_expand_host "$prefix$(printf '%0*d' "${#low}" "$n")$suffix"
    done
  done
}

# Sets NNODES, NODE_RANK, GPUS_PER_NODE, NUM_PROCESSES and exports MASTER_ADDR, MASTER_PORT for this node,
# from Slurm's variables. Every node computes the same MASTER_ADDR and MASTER_PORT on its own.
#   MASTER_ADDR   the first host of SLURM_JOB_NODELIST (rank 0 runs there and listens for the others)
#   MASTER_PORT   kept when set; else 20000 + SLURM_JOB_ID % 10000 (two jobs sharing a node do not collide)
#   NODE_RANK     SLURM_NODEID;  NNODES: SLURM_NNODES (or SLURM_JOB_NUM_NODES)
#   GPUS_PER_NODE kept when set; else SLURM_GPUS_ON_NODE (set with --gpus-per-node/--gres); else the GPUs
#                 nvidia-smi lists; else 8
slurm_rendezvous() {
  local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
  if [[ -z $nodelist ]]; then
    echo "error: SLURM_JOB_NODELIST is not set: run this inside a Slurm allocation (sbatch/salloc)" >&2
    return 2
  fi
  local hosts
  hosts=$(slurm_expand_nodelist "$nodelist")
  NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-$(wc -l <<<"$hosts")}}
  NODE_RANK=${SLURM_NODEID:-0}
  if [[ $(wc -l <<<"$hosts") -ne $NNODES ]]; then
    echo "error: SLURM_JOB_NODELIST=$nodelist names $(wc -l <<<"$hosts") hosts but SLURM_NNODES=$NNODES" >&2
    return 2
  fi
  if ((NODE_RANK < 0 || NODE_RANK >= NNODES)); then
    echo "error: SLURM_NODEID=$NODE_RANK is outside 0..$((NNODES - 1))" >&2
    return 2
  fi
  MASTER_ADDR=$(head -n 1 <<<"$hosts")
  MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}
  if [[ -z ${GPUS_PER_NODE:-} ]]; then
    if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
      GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU')
    else
      GPUS_PER_NODE=8
    fi
  fi
  NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))
  export MASTER_ADDR MASTER_PORT
}

# Writes the DeepSpeed hostfile of the allocation ("host slots=GPUS_PER_NODE", in node-list order). With
# --no_ssh the launcher connects to none of these hosts: it reads the file for the node count and for the
# global rank of each node's first process (node_rank x slots).
slurm_hostfile() {
  local file=$1 host
  : >"$file"
  while read -r host; do
    printf '%s slots=%s\n' "$host" "$GPUS_PER_NODE" >>"$file"
  done < <(slurm_expand_nodelist "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}")
}

# The processes below PID, deepest first.
_descendants() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
    _descendants "$child"
    echo "$child"
  done
}

# The training ranks below a launcher: its topmost descendants whose environment holds LOCAL_RANK (both
# launchers set it for each rank; their own processes and the ranks' children are left alone).
launcher_ranks() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
    if tr '\0' '\n' <"/proc/$child/environ" 2>/dev/null | grep -q '^LOCAL_RANK='; then
      echo "$child"
    else
      launcher_ranks "$child"
    fi
  done
}

# run_launcher COMMAND...: runs a launcher and passes SIGTERM/SIGINT/SIGHUP on to its ranks (see the top of
# this file). The first signal asks for a clean stop; a second one ends the launcher and everything below it.
# Returns the launcher's exit status once the launcher and its ranks have all exited.
run_launcher() {
  # The launcher's own variables must not leak in from the caller (a rank is recognised by LOCAL_RANK).
  env -u RANK -u LOCAL_RANK -u WORLD_SIZE "$@" &
  _launcher_pid=$!
  _stop_requests=0
  _watched=()
  trap '_stop_launcher TERM' TERM
  trap '_stop_launcher INT' INT
  trap '_stop_launcher HUP' HUP
  local status=0
  while true; do
    wait "$_launcher_pid" && status=0 || status=$?
    # wait returns early (status > 128) when a trapped signal arrives; the launcher may still be running.
    if ((status > 128)) && kill -0 "$_launcher_pid" 2>/dev/null; then continue; fi
    break
  done
  # `deepspeed` itself may be gone while the ranks still write their checkpoint: leaving now would let
  # Slurm kill them with the job step. Wait for every process we signalled.
  local pid
  for pid in "${_watched[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]]; do sleep 1; done
  done
  trap - TERM INT HUP
  return "$status"
}

_stop_launcher() {
  _stop_requests=$((_stop_requests + 1))
  local ranks
  ranks=$(launcher_ranks "$_launcher_pid")
  if ((_stop_requests == 1)) && [[ -n $ranks ]]; then
    echo "[launch] SIG$1: asking the training ranks ($(echo $ranks)) to stop after this step with a checkpoint;" \
      "send it again to abort" >&2
    # shellcheck disable=SC2086
    kill -TERM $ranks 2>/dev/null || true
    read -ra _watched <<<"$(echo $ranks)"
  else
    # No rank yet (the launcher is starting), or a second signal: end the launcher and everything below it.
    echo "[launch] SIG$1: stopping the launcher and its processes" >&2
    local tree
    tree=$(_descendants "$_launcher_pid")
    # shellcheck disable=SC2086
    kill -TERM $tree "$_launcher_pid" 2>/dev/null || true
    read -ra _watched <<<"$(echo $tree)"
  fi
}
