#!/usr/bin/env bash
# Start a real two-node SLURM cluster on this one machine (root only).
#
#   scripts/cluster/start.sh [--dir DIR] [--cpus N] [--gpus G] [--rate RATE] [--prefix NAME]
#
# What it builds:
#   * two network namespaces <prefix>-n1 / <prefix>-n2 joined by a veth pair
#     (10.77.0.1 <-> 10.77.0.2), each with its own loopback; optional `tc tbf` rate
#     limit on both ends of the link (--rate 1gbit, 200mbit, ...) for benchmarks.
#     netem delay is not used: this kernel lacks it.
#   * one munged (its own key and socket under DIR, so a system munged is untouched);
#   * slurmctld in node n1's namespace, one slurmd per node. Each daemon runs under
#     `nsenter --net=<ns> unshare --uts --mount`, which gives it the node's hostname and
#     a bind-mounted hosts file while keeping /sys and the cgroup tree intact
#     (`ip netns exec` remounts /sys, and slurmd's cgroup check then fails).
#   * SlurmdParameters=config_overrides, so each node may claim --cpus CPUs even though
#     both share this machine's cores, and --gpus placeholder GPUs (GRES whose "device files"
#     are empty files) so scripts that request GPUs run; the ranks compute on CPU.
#   * EnforcePartLimits=ALL: a job asking for more than a node has is refused by sbatch.
#     launch/slurm/*.sbatch ask for 8 GPUs and 32 CPUs per node, as on a real cluster;
#     here shrink them on the command line, which wins over #SBATCH lines:
#       scripts/cluster/run.sh sbatch --gpus-per-node=2 --cpus-per-task=4 --time=10 \
#         launch/slurm/train.sbatch --ep-size 4
#
# Jobs started by a slurmd inherit its namespaces, so ranks on "n1" and "n2" really talk
# over the veth link by host name. Use scripts/cluster/run.sh to run sbatch/squeue/...
# on the login side (node n1), and scripts/cluster/stop.sh to remove everything.
set -euo pipefail

DIR=/tmp/ep-cluster
CPUS=4
GPUS=2
RATE=""
PREFIX=epc
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "start.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" -eq 0 ] || { echo "start.sh: needs root (network namespaces, slurmd)" >&2; exit 3; }
for tool in ip nsenter unshare munged slurmctld slurmd sbatch; do
  command -v "$tool" >/dev/null || { echo "start.sh: $tool not found (apt-get install slurm-wlm munge iproute2)" >&2; exit 3; }
done
if [ -e "/run/netns/$PREFIX-n1" ] || [ -e "/run/netns/$PREFIX-n2" ]; then
  echo "start.sh: a cluster already exists ($PREFIX); run stop.sh first" >&2; exit 4
fi
if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ] && [ ! -f "$DIR/cluster.env" ]; then
  echo "start.sh: $DIR exists and is not a cluster directory; choose another --dir" >&2; exit 4
fi
rm -rf "$DIR"  # logs kept by a failed start or `stop.sh --keep`

# Anything that fails from here on tears down what was already started.
trap '"$HERE/stop.sh" --dir "$DIR" --prefix "$PREFIX" >/dev/null 2>&1 || true' ERR

mkdir -p "$DIR"/{ctld,log,n1,n2}
# munged runs as user munge and refuses paths it cannot traverse (pytest's 0700 tmp
# dirs, for one), so its key and socket live under /run instead of DIR.
MUNGE_DIR=/run/$PREFIX-munge
rm -rf "$MUNGE_DIR"
mkdir -p "$MUNGE_DIR"
chmod 755 "$DIR"
cat > "$DIR/cluster.env" <<EOF
CLUSTER_DIR=$DIR
CLUSTER_PREFIX=$PREFIX
SLURM_CONF=$DIR/slurm.conf
MUNGE_DIR=$MUNGE_DIR
EOF

# ---- network: two namespaces, one veth pair ------------------------------------------
for n in 1 2; do
  ip netns add "$PREFIX-n$n"
  ip -n "$PREFIX-n$n" link set lo up
done
ip link add "$PREFIX-v1" netns "$PREFIX-n1" type veth peer name "$PREFIX-v2" netns "$PREFIX-n2"
for n in 1 2; do
  ip -n "$PREFIX-n$n" addr add "10.77.0.$n/24" dev "$PREFIX-v$n"
  ip -n "$PREFIX-n$n" link set "$PREFIX-v$n" up
  if [ -n "$RATE" ]; then
    # Token bucket on each end's egress: the link carries at most RATE each way.
    ip netns exec "$PREFIX-n$n" tc qdisc add dev "$PREFIX-v$n" root tbf rate "$RATE" burst 256kb latency 100ms
  fi
done
echo "RATE=$RATE" >> "$DIR/cluster.env"

# One hosts file for both nodes: each name maps to its veth address, never 127.0.1.1,
# so gloo/NCCL bind and connect on the link.
cat > "$DIR/hosts" <<EOF
127.0.0.1 localhost
10.77.0.1 n1
10.77.0.2 n2
EOF

# ---- munge ----------------------------------------------------------------------------
chown munge:munge "$MUNGE_DIR"
chmod 755 "$MUNGE_DIR"
dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
chown munge:munge "$MUNGE_DIR/munge.key"
chmod 400 "$MUNGE_DIR/munge.key"
runuser -u munge -- munged --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_DIR/munge.socket" \
  --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
  --seed-file="$MUNGE_DIR/munged.seed" --num-threads=2

# ---- slurm.conf ---------------------------------------------------------------------
cat > "$DIR/slurm.conf" <<EOF
# Generated by scripts/cluster/start.sh: an emulated two-node cluster.
ClusterName=epc
SlurmctldHost=n1(10.77.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/%n/spool
SlurmctldPidFile=$DIR/ctld/slurmctld.pid
SlurmdPidFile=$DIR/%n/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: both "nodes" share one cgroup tree. linuxproc tracks a job's processes by
# parentage, which is what scancel relies on to kill every one of them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
# A job asking for more than a node has (the sbatch scripts' 8 GPUs / 32 CPUs per node, as
# written for a real cluster) is refused by sbatch with the reason, instead of being
# accepted and left pending forever (reason PartitionConfig).
EnforcePartLimits=ALL
ReturnToService=2
JobRequeue=1
# Short grace between SIGTERM and SIGKILL on scancel / time limit.
KillWait=5
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
# Placeholder "GPUs" (empty files as devices): jobs can request --gpus-per-node as on a real
# cluster and see SLURM_GPUS_ON_NODE, while computing on CPU.
GresTypes=gpu
NodeName=n1 NodeAddr=10.77.0.1 NodeHostname=n1 CPUs=$CPUS Gres=gpu:$GPUS RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeAddr=10.77.0.2 NodeHostname=n2 CPUs=$CPUS Gres=gpu:$GPUS RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
# slurmd drops GPUs without device files, so give it placeholders (never opened).
mkdir -p "$DIR/fakedev"
for ((g = 0; g < GPUS; g++)); do : > "$DIR/fakedev/gpu$g"; done
echo "Name=gpu File=$DIR/fakedev/gpu[0-$((GPUS - 1))]" > "$DIR/gres.conf"
for n in 1 2; do mkdir -p "$DIR/n$n/spool"; done

# ---- daemons ------------------------------------------------------------------------
# node_exec N CMD...: run CMD as node nN (its network, its hostname, its hosts file).
node_exec() {
  local n=$1; shift
  nsenter --net="/run/netns/$PREFIX-n$n" unshare --uts --mount --propagation private \
    "$HERE/node_init.sh" "n$n" "$DIR/hosts" "$@"
}
export SLURM_CONF="$DIR/slurm.conf"
node_exec 1 slurmctld -f "$DIR/slurm.conf" -i
for n in 1 2; do
  node_exec "$n" slurmd -f "$DIR/slurm.conf" -N "n$n"
done

# Wait until both nodes registered and are idle.
for _ in $(seq 1 60); do
  if out=$("$HERE/run.sh" --dir "$DIR" sinfo -h -N -o '%N %t' 2>/dev/null) \
      && [ "$(echo "$out" | grep -c -E 'idle$')" -eq 2 ]; then
    echo "cluster up: $(echo "$out" | tr '\n' ' ')(dir $DIR, rate ${RATE:-unlimited})"
    echo "nodes have $CPUS CPUs and $GPUS GPUs each; the sbatch scripts ask for more, so submit with e.g."
    echo "  mkdir -p logs && scripts/cluster/run.sh sbatch --gpus-per-node=$GPUS --cpus-per-task=$CPUS --time=10 launch/slurm/train.sbatch --ep-size 4"
    exit 0
  fi
  sleep 0.5
done
echo "start.sh: nodes did not become idle; logs in $DIR/log" >&2
"$HERE/run.sh" --dir "$DIR" sinfo -N >&2 || true
tail -n 20 "$DIR"/log/*.log >&2 || true
"$HERE/stop.sh" --dir "$DIR" --prefix "$PREFIX" --keep >/dev/null 2>&1 || true
exit 5
