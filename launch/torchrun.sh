#!/usr/bin/env bash
# Start `k2l train` under torchrun, on one node or on several (c10d rendezvous).
# Run `launch/torchrun.sh --help` for the options; everything after `--` goes to `k2l train`.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/torchrun.sh [options] -- CONFIG [key=value ...]

Starts `python -m k2l_dist.cli train CONFIG [key=value ...]` under torchrun.

options:
  --nproc-per-node N   processes (ranks) on this node; default: the GPUs that
                       `nvidia-smi -L` lists, else 1 (on CPU, ask for the ranks you want)
  --nnodes N           nodes in the job (default 1: `torchrun --standalone`)
  --node-rank R        this node's rank, 0..N-1 (required when --nnodes > 1)
  --endpoint HOST:PORT c10d rendezvous endpoint, the same on every node
                       (required when --nnodes > 1), e.g. node0:29400
  --run-id ID          rendezvous id shared by the nodes of one job (default k2l;
                       single-node --standalone draws its own)
  --max-restarts K     worker-group restarts before torchrun fails (default 0)
  --endpoint-wait S    nodes other than 0: seconds to wait for node 0's rendezvous to answer
                       before giving up with a message (default 120)
  --log-dir DIR        every rank's stdout/stderr files (default <run_dir>/logs when a
                       run_dir=... override is given, else runs/logs); only local rank 0
                       is echoed on the console
  --dry-run            print the environment and the command, run nothing
  -h, --help           this help

Several nodes: every node runs this script with the same arguments but its own
--node-rank; node 0 (the --endpoint host) serves the rendezvous. The script prints each
node's command, and the nodes other than 0 first check that the endpoint answers.
run_dir (and data.shards unless data.local_shards=true) must be on storage every node
mounts at the same absolute path; `k2l train` checks it and names a node that differs.

Environment set unless already set: OMP_NUM_THREADS=max(1, cores/nproc-per-node),
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_=17179869184 (glibc's allocator
page-faults heavily on CPU training steps otherwise), RAY_USAGE_STATS_ENABLED=0.

examples:
  launch/torchrun.sh --nproc-per-node 2 -- configs/quickstart.yaml run_dir=runs/q
  # on each of 2 nodes (R = 0, 1):
  launch/torchrun.sh --nnodes 2 --node-rank R --endpoint node0:29400 --run-id celeba \
      -- configs/celeba.yaml run_dir=runs/celeba
EOF
}

die() {
  echo "launch/torchrun.sh: error: $*" >&2
  echo "(launch/torchrun.sh --help for usage)" >&2
  exit 2
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

# POSIX shell quoting: leave safe words alone, single-quote the rest.
quote() {
  local s="$1"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(quote "$w")"
  done
  printf '%s' "$out"
}

nproc_per_node=""
nnodes=1
node_rank=""
endpoint=""
run_id="k2l"
max_restarts=0
endpoint_wait=120
log_dir=""
dry_run=0
train_args=()

need_value() {  # $1 = flag, $2 = number of remaining args
  [[ "$2" -ge 2 ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node) need_value "$1" $#; nproc_per_node="$2"; shift 2 ;;
    --nnodes) need_value "$1" $#; nnodes="$2"; shift 2 ;;
    --node-rank|--node_rank) need_value "$1" $#; node_rank="$2"; shift 2 ;;
    --endpoint) need_value "$1" $#; endpoint="$2"; shift 2 ;;
    --run-id|--run_id) need_value "$1" $#; run_id="$2"; shift 2 ;;
    --max-restarts|--max_restarts) need_value "$1" $#; max_restarts="$2"; shift 2 ;;
    --endpoint-wait) need_value "$1" $#; endpoint_wait="$2"; shift 2 ;;
    --log-dir|--log_dir) need_value "$1" $#; log_dir="$2"; shift 2 ;;
    --nproc-per-node=*|--nnodes=*|--node-rank=*|--endpoint=*|--run-id=*|--max-restarts=*|--log-dir=*|--endpoint-wait=*)
      flag="${1%%=*}"; value="${1#*=}"; shift; set -- "$flag" "$value" "$@" ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    -*) die "unknown option $1 (arguments of \`k2l train\` go after --)" ;;
    *) train_args=("$@"); break ;;
  esac
done

[[ ${#train_args[@]} -gt 0 ]] || die "no arguments for \`k2l train\`: give them after --, e.g. -- configs/quickstart.yaml"

# ---- checks --------------------------------------------------------------------------
is_uint "$nnodes" && [[ "$nnodes" -ge 1 ]] || die "--nnodes must be a positive integer, got '$nnodes'"
is_uint "$max_restarts" || die "--max-restarts must be a non-negative integer, got '$max_restarts'"
is_uint "$endpoint_wait" || die "--endpoint-wait must be a non-negative integer, got '$endpoint_wait'"
[[ -n "$run_id" ]] || die "--run-id must not be empty"

if [[ -z "$nproc_per_node" ]]; then
  nproc_per_node=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    if is_uint "$gpus" && [[ "$gpus" -ge 1 ]]; then
      nproc_per_node="$gpus"
    fi
  fi
fi
is_uint "$nproc_per_node" && [[ "$nproc_per_node" -ge 1 ]] \
  || die "--nproc-per-node must be a positive integer, got '$nproc_per_node'"

if [[ "$nnodes" -gt 1 ]]; then
  [[ -n "$endpoint" ]] || die "--endpoint HOST:PORT is required when --nnodes > 1 (the c10d rendezvous endpoint, the same on every node)"
  [[ "$endpoint" =~ ^.+:[0-9]+$ ]] || die "--endpoint must be HOST:PORT, got '$endpoint'"
  [[ -n "$node_rank" ]] || die "--node-rank is required when --nnodes > 1 (0..$((nnodes - 1)))"
  is_uint "$node_rank" && [[ "$node_rank" -lt "$nnodes" ]] \
    || die "--node-rank must be an integer in 0..$((nnodes - 1)), got '$node_rank'"
else
  if [[ -n "$endpoint" || -n "$node_rank" ]]; then
    echo "launch/torchrun.sh: note: --nnodes 1 runs torchrun --standalone; --endpoint/--node-rank are ignored" >&2
  fi
fi

# Log dir: <run_dir>/logs when the training arguments override run_dir (the last one wins,
# as in `k2l train`), else runs/logs.
if [[ -z "$log_dir" ]]; then
  log_dir="runs/logs"
  for a in "${train_args[@]}"; do
    if [[ "$a" == run_dir=* && -n "${a#run_dir=}" ]]; then
      log_dir="${a#run_dir=}"
      log_dir="${log_dir%/}/logs"
    fi
  done
fi

# ---- environment ---------------------------------------------------------------------
# One process per rank: split the cores so the ranks' OpenMP pools do not oversubscribe.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  cores="$(nproc 2>/dev/null || echo 1)"
  threads=$((cores / nproc_per_node))
  [[ "$threads" -ge 1 ]] || threads=1
  export OMP_NUM_THREADS="$threads"
fi
# glibc's default allocator returns freed pages and page-faults them back on every CPU step.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-17179869184}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-17179869184}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

# ---- command -------------------------------------------------------------------------
if command -v torchrun >/dev/null 2>&1; then
  cmd=(torchrun)
else
  cmd=("${PYTHON:-python3}" -m torch.distributed.run)  # torchrun's own module
fi
if [[ "$nnodes" -eq 1 ]]; then
  cmd+=(--standalone --nproc-per-node "$nproc_per_node")
else
  # torchrun 2.13 assigns group ranks at the c10d rendezvous and logs that --node-rank is
  # ignored for it; it is passed so each node's command line says which node it is.
  # is_host: node 0 serves the rendezvous store, whatever its host name resolves to.
  cmd+=(--nnodes "$nnodes" --node-rank "$node_rank" --rdzv-backend c10d --rdzv-endpoint "$endpoint"
        --rdzv-id "$run_id" --rdzv-conf "is_host=$([[ "$node_rank" -eq 0 ]] && echo 1 || echo 0)"
        --nproc-per-node "$nproc_per_node")
fi
# --tee 3: stdout+stderr of every local rank into <log-dir>/<run id>_*/attempt_<n>/<rank>/
# {stdout,stderr}.log and to the console; --local-ranks-filter 0: the console shows rank 0 only.
cmd+=(--max-restarts "$max_restarts" --log-dir "$log_dir" --tee 3 --local-ranks-filter 0
      -m k2l_dist.cli train "${train_args[@]}")

if [[ "$nnodes" -gt 1 ]]; then
  # What every node runs: the same arguments, its own --node-rank.
  echo "launch/torchrun.sh: node $node_rank of $nnodes; on each node R = 0..$((nnodes - 1)) run:" >&2
  for ((r = 0; r < nnodes; r++)); do
    echo "  [node $r] $(quote_all "$0" --nnodes "$nnodes" --node-rank "$r" --endpoint "$endpoint" --run-id "$run_id" \
      --nproc-per-node "$nproc_per_node" --max-restarts "$max_restarts" -- "${train_args[@]}")" >&2
  done
fi

if [[ "$dry_run" -eq 1 ]]; then
  printf 'export %s\n' "$(quote_all "OMP_NUM_THREADS=$OMP_NUM_THREADS" \
    "MALLOC_MMAP_THRESHOLD_=$MALLOC_MMAP_THRESHOLD_" "MALLOC_TRIM_THRESHOLD_=$MALLOC_TRIM_THRESHOLD_" \
    "RAY_USAGE_STATS_ENABLED=$RAY_USAGE_STATS_ENABLED")"
  printf '%s\n' "$(quote_all "${cmd[@]}")"
  exit 0
fi

# Nodes other than 0 join node 0's rendezvous: say so plainly when nothing answers there.
if [[ "$nnodes" -gt 1 && "$node_rank" -gt 0 ]]; then
  host="${endpoint%:*}" port="${endpoint##*:}"
  "${PYTHON:-python3}" - "$host" "$port" "$endpoint_wait" <<'EOF_PY' \
    || die "nothing answers at the rendezvous endpoint $endpoint after ${endpoint_wait} s: start node 0 (whose address it must be) first, and check the address and that port $port is open between the nodes"
import socket, sys, time
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + wait
while True:
    try:
        socket.create_connection((host, port), timeout=2).close()
        sys.exit(0)
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(1)
EOF_PY
fi

mkdir -p "$log_dir"
exec "${cmd[@]}"
