#!/usr/bin/env bash
# An ssh stand-in for Open MPI on the emulated cluster: mpirun starts its remote daemons
# (orted) through it, as it would through ssh, so one mpirun spans both nodes.
#
#   scripts/cluster/run.sh env CLUSTER_DIR=/tmp/ep-cluster mpirun -H n1:2,n2:2 -np 4 \
#       --mca plm_rsh_agent "$PWD/scripts/cluster/node_rsh.sh" python launch/train.py ...
#
# Called as `node_rsh.sh [ssh options] HOST COMMAND...`: runs COMMAND with `sh -c` as node
# HOST (n1 or n2) of the cluster in $CLUSTER_DIR (default /tmp/ep-cluster), in that node's
# network namespace, host name and hosts file (scripts/cluster/run.sh). The environment is
# mpirun's, as ssh with a shared home and file system would give.
set -euo pipefail
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done  # ssh flags (-x, -T): meaningless here
[ $# -ge 2 ] || { echo "usage: node_rsh.sh [ssh options] HOST COMMAND..." >&2; exit 2; }
host=$1
shift
case "$host" in
  n1|n2) ;;
  *) echo "node_rsh.sh: unknown node $host (the emulated nodes are n1 and n2)" >&2; exit 2 ;;
esac
exec "$(dirname "$0")/run.sh" --dir "${CLUSTER_DIR:-/tmp/ep-cluster}" --node "${host#n}" sh -c "$*"
