#!/usr/bin/env bash
# Run a coati script on every node of a Slurm allocation: srun starts one task per node, each task one torchrun
# with that node's processes, rendezvous (static) on the allocation's first node. Submit it as is, from the
# repository root (the #SBATCH lines below are its defaults; options given to sbatch win), e.g. 2 nodes x 8 GPUs:
#
#   sbatch examples/slurm.sh -- examples/train_sft.py --pretrain PATH --strategy fsdp --save_path /shared/out ...
#   sbatch --nodes 4 --gpus-per-node 4 examples/slurm.sh --dry-run -- examples/train_sft.py ...
#
# or inside `salloc --nodes 2 --ntasks-per-node 1 --gpus-per-node 8`: examples/slurm.sh -- examples/train_sft.py ...
# The nodes are `scontrol show hostnames $SLURM_JOB_NODELIST` in order: the first is node rank 0 (global rank 0,
# which writes checkpoints: use a shared file system) and the rendezvous point (FIRST_HOST:--master_port). Each
# node runs --nproc_per_node processes, default: its GPUs (SLURM_GPUS_ON_NODE, else --gpus-per-node), else
# --ntasks-per-node. srun passes the environment (venv, NCCL_*, HF_HOME) and working directory on; the task
# gets every CPU of its node. --dry-run prints the srun command and each node's torchrun command instead.
#
#SBATCH --job-name=coati
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=coati-%j.out
set -euo pipefail

usage() {
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    echo
    echo "options: --nproc_per_node N  --master_port PORT  --python PY  --srun_opts 'OPTS'  --dry-run"
    echo "         -- SCRIPT ARGS..."
}

nproc=""
master_port=29500
python="python3"
srun_opts=""
dry_run="${DRY_RUN:-0}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nproc_per_node) nproc="$2"; shift 2 ;;
        --master_port) master_port="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --srun_opts) srun_opts="$2"; shift 2 ;;
        --dry-run|--dry_run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) echo "slurm.sh: unknown option $1 (put the training command after --)" >&2; exit 2 ;;
    esac
done
if [[ $# -eq 0 ]]; then
    usage >&2
    exit 2
fi
if [[ -z "${SLURM_JOB_NODELIST:-}" || -z "${SLURM_JOB_ID:-}" ]]; then
    echo "slurm.sh: no Slurm allocation here (SLURM_JOB_NODELIST / SLURM_JOB_ID unset): sbatch this script, or run it" \
         "inside salloc" >&2
    exit 2
fi
command -v scontrol > /dev/null || { echo "slurm.sh: scontrol not found on PATH" >&2; exit 2; }
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
nnodes=${#hosts[@]}
[[ $nnodes -gt 0 ]] || { echo "slurm.sh: scontrol lists no hosts for $SLURM_JOB_NODELIST" >&2; exit 2; }
if [[ -z "$nproc" ]]; then
    nproc="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-}}}"
    nproc="${nproc##*:}"  # --gpus-per-node=a100:8
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || {
    echo "slurm.sh: processes per node unknown ('$nproc'): allocate --gpus-per-node or pass --nproc_per_node" >&2
    exit 2
}

quote() { printf '%q ' "$@"; }
# what every task runs; its node rank is the task's own SLURM_NODEID (one task per node)
launch="$(quote "$python" -m torch.distributed.run --nnodes "$nnodes")--node_rank \"\$SLURM_NODEID\" "
launch+="$(quote --nproc_per_node "$nproc" --rdzv_backend static --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_endpoint "${hosts[0]}:$master_port" "$@")"
launch="${launch% }"
srun=(srun "--nodes=$nnodes" "--ntasks=$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
if [[ -n "${SLURM_CPUS_ON_NODE:-}" ]]; then srun+=("--cpus-per-task=$SLURM_CPUS_ON_NODE"); fi
# shellcheck disable=SC2206
srun+=($srun_opts bash -c "exec $launch")

if [[ "$dry_run" != 0 ]]; then
    if [[ "$launch" != *"'"* ]]; then
        echo "${srun[*]:0:${#srun[@]}-1} 'exec $launch'"
    else
        quote "${srun[@]}"
        echo
    fi
    for rank in "${!hosts[@]}"; do
        echo "# node $rank: ${hosts[$rank]} ($nproc processes)"
        SLURM_NODEID=$rank bash -c "printf '%q ' $launch" | sed 's/ $//'
        echo
    done
    exit 0
fi
exec "${srun[@]}"
