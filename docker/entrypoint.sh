#!/bin/bash
# Container entry point.
#
#   ep-entrypoint train [train.py options]   one node: torchrun over NPROC_PER_NODE ranks
#                                            (default: one per GPU, else one per CPU);
#                                            multi-node when RDZV_ENDPOINT=host:port and
#                                            NNODES are set (one container per node);
#                                            under srun-direct / mpirun: one rank, as
#                                            started (ranks from SLURM_* / OMPI_* vars)
#   ep-entrypoint <any command>              run it (bash, python3, torchrun, mpirun...)
set -euo pipefail
cd /opt/expert_parallel
[ $# -gt 0 ] || set -- train
if [ "$1" != train ]; then
  exec "$@"
fi
shift
if [ -n "${OMPI_COMM_WORLD_RANK:-}${PMI_RANK:-}" ] \
   || { [ -n "${SLURM_PROCID:-}" ] && [ -n "${SLURM_STEP_ID:-}" ] && [ -z "${RDZV_ENDPOINT:-}" ]; }; then
  # Started once per rank by srun or mpirun: no agent in between.
  if [ -n "${OMPI_COMM_WORLD_RANK:-}${PMI_RANK:-}" ]; then by=mpirun; else by=srun; fi
  echo "ep-entrypoint: rank ${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-${SLURM_PROCID:-}}} started by $by:" \
       "launch/train.py directly, no agent" >&2
  exec python3 launch/train.py "$@"
fi
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  echo "ep-entrypoint: torchrun, ${NNODES:-?} nodes, rendezvous $RDZV_ENDPOINT," \
       "${NPROC_PER_NODE:-auto} ranks per node" >&2
  exec python3 -m torch.distributed.run --nnodes="${NNODES:?set NNODES with RDZV_ENDPOINT}" \
    --nproc-per-node="${NPROC_PER_NODE:-auto}" --rdzv-backend=c10d \
    --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-ep-moe}}" \
    launch/train.py "$@"
fi
echo "ep-entrypoint: torchrun --standalone, ${NPROC_PER_NODE:-auto} ranks" >&2
exec python3 -m torch.distributed.run --standalone --nproc-per-node="${NPROC_PER_NODE:-auto}" \
  launch/train.py "$@"
