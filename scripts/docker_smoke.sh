#!/usr/bin/env bash
# Build the project's image on a locally bootstrapped Debian base and train two steps in it.
#
#   sudo scripts/docker_smoke.sh [--keep]
#
# For machines where no registry (nvcr.io, Docker Hub) is reachable but the Debian and
# PyPI mirrors are: debootstrap makes a minimal bookworm root file system, `docker import`
# turns it into the base image, and docker/Dockerfile builds on it with
# BASE_IMAGE=ep-base:bookworm (torch then comes from PyPI's CPU wheels). Starts its own
# dockerd if none is running and stops it at the end; --keep keeps the images.
# Takes several minutes (debootstrap, torch + deepspeed downloads), hence not in the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=${1:-}
WORK=$(mktemp -d /tmp/ep-docker-smoke.XXXXXX)
DOCKERD_PID=""

cleanup() {
  if [ -n "$DOCKERD_PID" ]; then
    if [ "$KEEP" != --keep ]; then
      docker rmi -f expert-parallel:smoke ep-base:bookworm >/dev/null 2>&1 || true
    fi
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
    # containerd is dockerd's child; make sure it went too.
    pkill -P "$DOCKERD_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  echo "== starting dockerd"
  # No bridge, no iptables rules: builds and runs use the host network, so the
  # smoke test leaves no interface or firewall rule behind.
  dockerd --data-root "$WORK/docker" --pidfile "$WORK/dockerd.pid" --bridge=none \
    --iptables=false --ip6tables=false >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; exit 1; }
fi

t0=$(date +%s)
echo "== debootstrap bookworm (minbase + python3) + torch wheel"
debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
  bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log"; exit 1; }
# Put torch in the base, as NGC's image has it: the wheel comes through this machine's pip
# configuration (a local CPU wheel where there is one; the Dockerfile's fallback index,
# download.pytorch.org, may be unreachable here).
mkdir -p "$WORK/rootfs/tmp/wheels"
python3 -m pip download --quiet --no-deps -d "$WORK/rootfs/tmp/wheels" "${TORCH_SPEC:-torch==2.13.0}"
cp /etc/resolv.conf "$WORK/rootfs/etc/resolv.conf"
# Behind a TLS-intercepting proxy the host's CA bundle holds the proxy's CA: hand it to
# the base (as a local CA, so the Dockerfile's ca-certificates install keeps it).
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/usr/local/share/ca-certificates/host-ca-bundle.crt"
  chroot "$WORK/rootfs" update-ca-certificates >/dev/null 2>&1 || true
fi
wheel=$(cd "$WORK/rootfs/tmp/wheels" && ls torch-*.whl)
# env -i: the host's PIP_* settings (local wheel dirs, cert paths) mean nothing in the chroot.
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root chroot "$WORK/rootfs" python3 -m pip install --quiet --break-system-packages --no-cache-dir \
  "/tmp/wheels/$wheel" >"$WORK/torch.log" 2>&1 || { tail -20 "$WORK/torch.log"; exit 1; }
rm -rf "$WORK/rootfs/tmp/wheels"
tar -C "$WORK/rootfs" -c . | docker import - ep-base:bookworm >/dev/null
echo "   base image: $(docker image ls ep-base:bookworm --format '{{.Size}}') after $(( $(date +%s) - t0 ))s"

echo "== docker build (BASE_IMAGE=ep-base:bookworm)"
t1=$(date +%s)
docker build --network host -q -f docker/Dockerfile --build-arg BASE_IMAGE=ep-base:bookworm \
  -t expert-parallel:smoke . >/dev/null
echo "   image: $(docker image ls expert-parallel:smoke --format '{{.Size}}') after $(( $(date +%s) - t1 ))s"

run_in_image() {  # run_in_image LABEL docker-run-args...: show the step lines, or the tail on failure
  local label=$1; shift
  echo "== $label"
  # Host network: with --network none the container's host name resolves nowhere and
  # the c10d store (which advertises it) retries forever.
  if docker run --rm --network host "$@" >"$WORK/run.log" 2>&1; then
    grep -E "^(\[[^]]*\] )?step|^summary" "$WORK/run.log" || tail -5 "$WORK/run.log"
  else
    tail -30 "$WORK/run.log"; exit 1
  fi
}
TINY=(--max-steps 2 --ep-size 2 --d-model 32 --n-layers 2 --n-heads 2 --seq-len 32 --num-experts 4
      --expert-ffn-hidden 48 --global-batch-size 8 --eval-batches 1 --tensorboard false --out /tmp/run)
run_in_image "two training steps, 2 ranks, EP=2, entrypoint 'train' (torchrun --standalone)" \
  -e NPROC_PER_NODE=2 expert-parallel:smoke train "${TINY[@]}"
run_in_image "mpirun -np 2 inside the image (ranks from OMPI_*, rendezvous via mpi4py)" \
  expert-parallel:smoke mpirun --oversubscribe --bind-to none -np 2 python3 launch/train.py "${TINY[@]}"
echo "== done in $(( $(date +%s) - t0 ))s"
