#!/usr/bin/env bash
# Submit `k2l train` to a Ray cluster as a Ray job. The job's entrypoint runs on the head
# node only, so it is the driver k2l_dist.distributed.ray_launch: a placement group of one
# bundle per node, one torchrun per node started from there (see that module).
set -euo pipefail

usage() {
  cat <<'EOF2'
usage: launch/ray_submit.sh [options] -- CONFIG [key=value ...]

options:
  --address URL        the cluster's job server (default $RAY_ADDRESS, else http://127.0.0.1:8265;
                       with cluster.yaml: `ray dashboard cluster.yaml` tunnels it to localhost)
  --nodes N            nodes to train on (default 1)
  --nproc-per-node P   ranks per node (default 1; one per GPU on GPU nodes)
  --gpus-per-node G    GPUs reserved per node (default 0)
  --cpus-per-node C    CPUs reserved per node (default 1)
  --project-dir DIR    run on every node from DIR, a folder the nodes have (`~` is the node's
                       home: quote it, '~/k2l-dist'); CONFIG is then a path there. Default: the
                       config files named in the arguments are shipped with the job (Ray's
                       working_dir) and every node starts in that copy.
  --max-restarts K     torchrun restarts of a failed worker group (default 0)
  --no-wait            return once submitted (default: follow the job's log to its end)
  --dry-run            print the `ray job submit` command, submit nothing
  -h, --help           this help

run_dir (and data.shards unless data.local_shards=true) must be on storage every node
mounts at the same absolute path: the job checks it and stops, naming the node, if not.
Keep Ray's token authentication on: the client needs RAY_AUTH_MODE=token (set here unless
already set) and the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN).
EOF2
}

die() { echo "launch/ray_submit.sh: error: $*" >&2; exit 2; }

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
nodes=1 nproc=1 gpus=0 cpus=1 project_dir="" max_restarts=0 wait=1 dry_run=0
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address="${2:?--address needs a value}"; shift 2 ;;
    --nodes) nodes="${2:?--nodes needs a value}"; shift 2 ;;
    --nproc-per-node) nproc="${2:?--nproc-per-node needs a value}"; shift 2 ;;
    --gpus-per-node) gpus="${2:?--gpus-per-node needs a value}"; shift 2 ;;
    --cpus-per-node) cpus="${2:?--cpus-per-node needs a value}"; shift 2 ;;
    --project-dir) project_dir="${2:?--project-dir needs a value}"; shift 2 ;;
    --max-restarts) max_restarts="${2:?--max-restarts needs a value}"; shift 2 ;;
    --no-wait) wait=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown option $1" ;;
  esac
done
[[ ${#train_args[@]} -gt 0 ]] || die "give the \`k2l train\` arguments after --, e.g. -- configs/quickstart.yaml"

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

# A folder on the nodes, said so that the node's shell expands a leading ~ (printf %q
# would turn it into a literal \~).
remote_path() {
  case "$1" in
    "~") printf '"$HOME"' ;;
    "~/"*) printf '"$HOME"/%s' "$(printf '%q' "${1#\~/}")" ;;
    *) printf '%q' "$1" ;;
  esac
}

stage=""
trap '[[ -z "$stage" ]] || rm -rf "$stage"; [[ -z "${err:-}" ]] || rm -f "$err"' EXIT
launch_args=()
if [[ -z "$project_dir" ]]; then
  # Ship the config files with the job: Ray unpacks the working_dir on every node that runs
  # a part of the job, and each node's torchrun starts there.
  stage="$(mktemp -d)"
  for a in "${train_args[@]}"; do
    if [[ "$a" != *=* && "$a" != -* && -f "$a" ]]; then
      [[ ! -e "$stage/$(basename "$a")" ]] || die "two config files named $(basename "$a"); rename one"
      cp "$a" "$stage/$(basename "$a")"
      launch_args+=("$(basename "$a")")
    else
      launch_args+=("$a")
    fi
  done
  entry="python -m k2l_dist.distributed.ray_launch"
else
  launch_args=("${train_args[@]}")
  entry="cd $(remote_path "$project_dir") && python -m k2l_dist.distributed.ray_launch --cwd $(printf '%q' "$project_dir")"
fi
entry+=" --nodes $nodes --nproc-per-node $nproc --gpus-per-node $gpus --cpus-per-node $cpus"
entry+=" --max-restarts $max_restarts --"
for a in "${launch_args[@]}"; do entry+=" $(printf '%q' "$a")"; done

submit() {  # $1: the submission id
  local cmd=(ray job submit --address "$address" --submission-id "$1")
  [[ -z "$stage" ]] || cmd+=(--working-dir "$stage")
  [[ $wait -eq 1 ]] || cmd+=(--no-wait)
  cmd+=(-- bash -c "$entry")
  if [[ $dry_run -eq 1 ]]; then
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE RAY_USAGE_STATS_ENABLED=$RAY_USAGE_STATS_ENABLED"
    printf '%q ' "${cmd[@]}"; echo
    return 0
  fi
  "${cmd[@]}"
}

id="k2l-$(date +%Y%m%d-%H%M%S)-$$"
[[ $dry_run -eq 0 ]] || { submit "$id"; exit 0; }
# A job server that does not answer: one line, not `ray job submit`'s traceback.
if [[ "$address" == http://* || "$address" == https://* ]]; then
  "${PYTHON:-python3}" - "$address" <<'EOF_PY' || die "no Ray job server answers at $address: is the head running (ray status), and is this its dashboard address (with cluster.yaml: \`ray dashboard cluster.yaml\` tunnels it to http://127.0.0.1:8265)?"
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/api/version", timeout=10)
except urllib.error.HTTPError:
    pass  # it answers (perhaps asking for the token): the submission will say more
except (urllib.error.URLError, OSError):
    sys.exit(1)
EOF_PY
fi
# A head that has just started answers "No available agent" until its job agent is up:
# nothing was submitted then, so the submission is retried for up to a minute.
err="$(mktemp)"
for attempt in $(seq 1 12); do
  set +e
  submit "$id-$attempt" 2> >(tee "$err" >&2)
  rc=$?
  set -e
  wait  # for tee
  grep -q "No available agent" "$err" || exit $rc
  echo "launch/ray_submit.sh: the job agent at $address is not up yet; retrying in 5 s ($attempt/12)" >&2
  sleep 5
done
die "no job agent answered at $address within a minute: see dashboard_agent.log in the head's Ray logs (/tmp/ray/session_latest/logs); an agent port held by another Ray is a common cause"
