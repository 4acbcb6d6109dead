#!/usr/bin/env bash
# Single-node launch: torchrun with NPROC processes on this machine.
#
#   launch/torchrun.sh CONFIG [key=value ...]
#   NPROC=8 launch/torchrun.sh configs/deepseek_v3_16b.yaml parallel.ep=8 parallel.dp_shard=8
#   NPROC=2 launch/torchrun.sh configs/tiny.yaml parallel.ep=2   # CPU, gloo (dp_shard auto = 2)
#
# Environment:
#   NPROC          processes on this node (default: number of GPUs from nvidia-smi, else 1)
#   PYTHON         interpreter (default: the repo's .venv if present, else python3 on PATH)
#   TORCHRUN_ARGS  extra torchrun arguments, e.g. "--max-restarts 2"
#   DRY_RUN=1      print the command instead of running it
#
# The trainer picks the backend itself (NCCL on CUDA, gloo on CPU), so the same line works on
# this CPU machine and on a GPU node. Overrides go through unchanged to `python -m train`;
# rerunning with the same run.dir resumes from the newest complete checkpoint there.
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || usage
CONFIG=$1
shift
if [[ ! -f "$CONFIG" ]]; then
    echo "torchrun.sh: config file not found: $CONFIG" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -z "${VIRTUAL_ENV:-}" && -x "$ROOT/.venv/bin/python" ]]; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON=$(command -v python3 || command -v python)
    fi
fi

if [[ -z "${NPROC:-}" ]]; then
    NPROC=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [[ "$NPROC" -ge 1 ]] || NPROC=1
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "torchrun.sh: NPROC must be a positive integer, got '$NPROC'" >&2
    exit 2
fi

# The packages are importable from the repo root even without `pip install -e .`.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# torchrun sets OMP_NUM_THREADS=1 per process when unset; keep a user's choice.

# shellcheck disable=SC2206
EXTRA=(${TORCHRUN_ARGS:-})
CMD=("$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC" "${EXTRA[@]}"
     -m train --config "$CONFIG" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${CMD[@]}"
    echo
    exit 0
fi
echo "+ ${CMD[*]}" >&2
exec "${CMD[@]}"
