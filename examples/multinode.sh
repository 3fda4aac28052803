#!/usr/bin/env bash
# Start one torchrun per node of a hostfile over ssh (what Coati / Colossal-LLaMA users do with
# `colossalai run --hostfile`), e.g. 2 nodes x 8 GPUs:
#
#   examples/multinode.sh --hostfile hostfile -- examples/train_sft.py --pretrain PATH --strategy fsdp ...
#
# hostfile: one node per line, `host [slots]` (`host slots=N` is read too); '#' starts a comment. slots is
# that node's process count (--nproc_per_node); without it --nproc_per_node (default 8) is used. Line i is
# --node_rank i (static rendezvous), so the first host holds global rank 0, which writes checkpoints, and
# is the rendezvous point (--rdzv_endpoint FIRST_HOST:--master_port). Every node needs passwordless ssh from
# here, the same code path (--workdir, default: this directory) and the same Python environment (--python,
# default: python3 on the remote PATH). NCCL_*, CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS and HF_HOME (when set)
# and variables named with --env are passed on. --dry-run prints the commands instead of running them.
set -euo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    echo
    echo "options: --hostfile FILE  --nproc_per_node N  --master_port PORT  --workdir DIR  --python PY"
    echo "         --env NAME (repeatable)  --ssh_opts 'OPTS'  --dry-run  -- SCRIPT ARGS..."
}

hostfile=""
nproc_default=8
master_port=29500
workdir="$(pwd)"
python="python3"
ssh_opts="-o BatchMode=yes"
dry_run=0
env_names=(NCCL_DEBUG NCCL_SOCKET_IFNAME NCCL_IB_DISABLE NCCL_IB_HCA CUDA_VISIBLE_DEVICES OMP_NUM_THREADS HF_HOME)

while [[ $# -gt 0 ]]; do
    case "$1" in
        --hostfile) hostfile="$2"; shift 2 ;;
        --nproc_per_node) nproc_default="$2"; shift 2 ;;
        --master_port) master_port="$2"; shift 2 ;;
        --workdir) workdir="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --env) env_names+=("$2"); shift 2 ;;
        --ssh_opts) ssh_opts="$2"; shift 2 ;;
        --dry-run|--dry_run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "multinode.sh: unknown option $1 (put the training command after --)" >&2; exit 2 ;;
    esac
done
if [[ -z "$hostfile" || $# -eq 0 ]]; then
    usage >&2
    exit 2
fi
[[ -f "$hostfile" ]] || { echo "multinode.sh: hostfile $hostfile not found" >&2; exit 2; }

hosts=()
slots=()
while read -r line || [[ -n "$line" ]]; do
    line="${line%%#*}"
    read -r host rest <<< "$line" || true
    [[ -z "${host:-}" ]] && continue
    n="${rest#slots=}"
    n="${n%% *}"
    [[ -z "$n" ]] && n="$nproc_default"
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "multinode.sh: bad slot count '$rest' for $host" >&2; exit 2; }
    hosts+=("$host")
    slots+=("$n")
done < "$hostfile"
nnodes=${#hosts[@]}
[[ $nnodes -gt 0 ]] || { echo "multinode.sh: no hosts in $hostfile" >&2; exit 2; }
master="${hosts[0]}"
job_id="coati-$(date +%s)"

quote() { printf '%q ' "$@"; }
exports=""
for name in "${env_names[@]}"; do
    if [[ -n "${!name:-}" ]]; then exports+="export $name=$(printf '%q' "${!name}"); "; fi
done
is_local() { [[ "$1" == "localhost" || "$1" == "127.0.0.1" || "$1" == "$(hostname)" || "$1" == "$(hostname -f 2>/dev/null)" ]]; }

pids=()
for rank in "${!hosts[@]}"; do
    host="${hosts[$rank]}"
    launch=$(quote "$python" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$rank" \
        --nproc_per_node "${slots[$rank]}" --rdzv_backend static --rdzv_id "$job_id" \
        --rdzv_endpoint "$master:$master_port" "$@")
    remote="cd $(printf '%q' "$workdir") && ${exports}exec $launch"
    if is_local "$host"; then
        cmd=(bash -c "$remote")
    else
        # shellcheck disable=SC2206
        cmd=(ssh $ssh_opts "$host" "$remote")
    fi
    if [[ $dry_run -eq 1 ]]; then
        echo "# node $rank: $host (${slots[$rank]} processes)"
        if [[ "$remote" != *"'"* ]]; then
            echo "${cmd[*]:0:${#cmd[@]}-1} '$remote'"
        else
            quote "${cmd[@]}"
            echo
        fi
        continue
    fi
    "${cmd[@]}" 2>&1 | sed -u "s/^/[$host] /" &
    pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
exit $status
