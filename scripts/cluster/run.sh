#!/usr/bin/env bash
# Run a command as a node of the emulated cluster (default n1, the login/controller node):
#
#   scripts/cluster/run.sh [--dir DIR] [--node 1|2] sbatch launch/slurm/train.sbatch
#   scripts/cluster/run.sh squeue
#
# The command gets the node's network namespace, hostname and hosts file, and
# SLURM_CONF pointing at the cluster's slurm.conf; jobs it submits inherit SLURM_CONF.
set -euo pipefail
DIR=/tmp/ep-cluster
NODE=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --node) NODE=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: run.sh [--dir DIR] [--node N] CMD..." >&2; exit 2; }
[ -f "$DIR/cluster.env" ] || { echo "run.sh: no cluster at $DIR (start.sh first)" >&2; exit 3; }
# shellcheck disable=SC1091
. "$DIR/cluster.env"
export SLURM_CONF
HERE=$(cd "$(dirname "$0")" && pwd)
exec nsenter --net="/run/netns/$CLUSTER_PREFIX-n$NODE" unshare --uts --mount --propagation private \
  "$HERE/node_init.sh" "n$NODE" "$DIR/hosts" "$@"
