#!/usr/bin/env bash
# node_init.sh NAME HOSTS_FILE CMD...: become cluster node NAME, then exec CMD.
# Runs inside fresh UTS and mount namespaces (see start.sh), so the hostname and the
# bind-mounted /etc/hosts are private to this node's processes.
set -euo pipefail
name=$1 hosts=$2
shift 2
hostname "$name"
mount --bind "$hosts" /etc/hosts
exec "$@"
