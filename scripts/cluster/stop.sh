#!/usr/bin/env bash
# Tear down the emulated cluster started by start.sh and verify nothing is left:
#
#   scripts/cluster/stop.sh [--dir DIR] [--prefix NAME] [--keep]
#
# Kills every process inside the node namespaces (daemons, slurmstepd, job tasks),
# then munged, deletes the namespaces (and with them the veth pair), and removes DIR
# unless --keep. Exits non-zero if any process survived.
set -uo pipefail
DIR=/tmp/ep-cluster
PREFIX=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "stop.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
MUNGE_DIR=""
# shellcheck disable=SC1091
[ -f "$DIR/cluster.env" ] && . "$DIR/cluster.env"
if [ -z "$PREFIX" ]; then
  PREFIX=${CLUSTER_PREFIX:-epc}
fi
MUNGE_DIR=${MUNGE_DIR:-/run/$PREFIX-munge}

ns_pids() {
  for n in 1 2; do
    [ -e "/run/netns/$PREFIX-n$n" ] && ip netns pids "$PREFIX-n$n" 2>/dev/null
  done
}
pidfile_pids() {
  for f in "$DIR/ctld/slurmctld.pid" "$DIR"/n?/slurmd.pid "$MUNGE_DIR/munged.pid"; do
    [ -f "$f" ] && cat "$f"
  done
}
alive() { for p in "$@"; do kill -0 "$p" 2>/dev/null && echo "$p"; done; }

pids=$( { ns_pids; pidfile_pids; } | sort -u)
if [ -n "$pids" ]; then
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null
  for _ in $(seq 1 50); do
    # New processes may appear while slurmd dies (stepd reaping): rescan every round.
    # shellcheck disable=SC2046
    left=$(alive $( { ns_pids; echo "$pids"; } | sort -u))
    [ -z "$left" ] && break
    sleep 0.1
  done
  # shellcheck disable=SC2046
  left=$(alive $( { ns_pids; echo "$pids"; } | sort -u))
  if [ -n "$left" ]; then
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null
    sleep 0.5
  fi
fi
for n in 1 2; do
  [ -e "/run/netns/$PREFIX-n$n" ] && ip netns del "$PREFIX-n$n"
done
# shellcheck disable=SC2046
left=$(alive $(echo "$pids"))
if [ -n "$left" ]; then
  echo "stop.sh: processes survived: $left" >&2
  exit 1
fi
rm -rf "$MUNGE_DIR"
[ "$KEEP" -eq 1 ] || [ ! -f "$DIR/cluster.env" ] || rm -rf "$DIR"
echo "cluster stopped"
