#!/usr/bin/env bash
# Build the project's image on a locally bootstrapped Debian base and train two steps in
# it, once with torchrun and once with mpirun, both through the image's entry point.
#
#   sudo scripts/docker_smoke.sh [--out DIR] [--keep] [--fresh]
#
#   --out DIR   keep what the runs wrote: DIR/torchrun and DIR/mpirun (run directories:
#               metrics.jsonl, summary.json), DIR/logs (dockerd, debootstrap, build and
#               run logs); default: a temporary directory, removed at the end
#   --keep      keep the work directory (docker data root, root file system) for a look
#   --fresh     debootstrap the base again even if the cache holds it
#
# For machines where no registry (nvcr.io, Docker Hub) is reachable but the Debian and
# PyPI mirrors are: debootstrap makes a minimal bookworm root file system with python3 and
# torch (NGC's image has torch too), `docker import` turns it into the base image, and
# docker/Dockerfile builds on it with BASE_IMAGE=ep-base:bookworm.
#
# It always starts its own dockerd (own socket, data root and exec root under the work
# directory; no bridge, no iptables rules; builds and containers use the host network) and
# stops it at the end, so it neither needs nor touches a system Docker. Installs docker.io
# and debootstrap with apt-get when missing. The downloads (.debs, torch wheels) and the
# finished base root file system (a tarball keyed by its recipe) are cached in
# $EP_SMOKE_CACHE (default ~/.cache/ep-docker-smoke): a first run debootstraps (~1-3 min
# on 2 cores), later ones start from the tarball. The image itself is built from scratch
# every time, by a daemon that has never seen it. Knobs: DEBIAN_MIRROR, TORCH_SPEC
# (default torch==2.13.0), EP_SMOKE_TMPFS=no (scratch on disk even when memory would
# allow a tmpfs; --keep implies it).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT="" KEEP=0 FRESH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --fresh) FRESH=1; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "docker_smoke.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "docker_smoke.sh: needs root (dockerd, debootstrap)" >&2; exit 3; }
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${EP_SMOKE_CACHE:-${HOME:-/root}/.cache/ep-docker-smoke}
# Short: dockerd's and containerd's unix sockets live under it (108-byte path limit).
WORK=$(mktemp -d /tmp/epds.XXXXXX)
if [ -z "$OUT" ]; then OUT=$WORK/out; fi
mkdir -p "$OUT/logs" "$CACHE/debs" "$CACHE/wheels"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
echo "$WORK" > "$LOGS/work_dir"
DOCKERD_PID=""
T0=$(date +%s)

say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
fail() {  # fail MESSAGE LOG: the log's tail, then exit 1
  echo "docker_smoke.sh: $1 (log: $2)" >&2
  tail -n 40 "$2" >&2 || true
  exit 1
}

cleanup() {
  local code=$?
  set +e  # best effort from here: every step runs even if one fails
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    # Containers are --rm and already gone on success; on failure stop what is left so
    # dockerd can unmount their layers before it exits.
    docker ps -q 2>/dev/null | xargs -r docker kill >/dev/null 2>&1 || true
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$DOCKERD_PID" 2>/dev/null || true
  fi
  # dockerd's containerd (its child) stops with it; anything still holding the work dir
  # (a shim after a KILL) would keep its mounts busy.
  for pid in $(pgrep -f "$WORK/" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  # Leftover overlay/shm mounts under the data root (only after an unclean stop).
  grep -o " $WORK/[^ ]*" /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
  rm -f "$CACHE"/base-*."$$".partial  # an interrupted base tarball
  if [ "$KEEP" -eq 1 ]; then
    echo "work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- tools ------------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  say "apt-get install ${need[*]}"
  # policy-rc.d: the package must not start a system dockerd (we run our own).
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } \
    >"$LOGS/apt.log" 2>&1 || { [ "$made_policy" -eq 0 ] || rm -f /usr/sbin/policy-rc.d; fail "apt-get install failed" "$LOGS/apt.log"; }
  [ "$made_policy" -eq 0 ] || rm -f /usr/sbin/policy-rc.d
fi

# ---- our own dockerd, started first: it comes up while debootstrap runs ------------------
export DOCKER_HOST=unix://$WORK/docker.sock
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH  # a user's docker setup would win over DOCKER_HOST
# Scratch space on a tmpfs when memory allows: the debootstrapped root (~1 GB) and docker's
# data root (base, image layers, build containers: ~4 GB at the peak). dpkg's and docker's
# fsyncs then cost nothing, and deleting it all at the end is an unmount instead of
# minutes of disk I/O on a loaded machine. A bound, not a reservation; on a full tmpfs the
# step fails with ENOSPC in its log.
SCRATCH=$WORK/scratch
mkdir -p "$SCRATCH"
avail_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
if [ "${EP_SMOKE_TMPFS:-auto}" != no ] && [ "$KEEP" -eq 0 ] && [ "${avail_kb:-0}" -gt $((12 * 1024 * 1024)) ]; then
  mount -t tmpfs -o size=8g,mode=0710 ep-smoke "$SCRATCH"
  say "scratch (root file system, docker data root) on an 8 GB tmpfs (MemAvailable $((avail_kb / 1024 / 1024)) GB)"
fi
mkdir -p "$SCRATCH/data"
echo '{}' > "$WORK/daemon.json"  # not /etc/docker/daemon.json: a system setup stays out
dockerd --config-file "$WORK/daemon.json" --host "$DOCKER_HOST" --data-root "$SCRATCH/data" \
  --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" --bridge=none --iptables=false \
  --ip6tables=false --ip-masq=false >"$LOGS/dockerd.log" 2>&1 &
DOCKERD_PID=$!

# ---- base root file system: debootstrap + torch ------------------------------------------
# torch and its dependencies are fetched here, through this machine's pip configuration (a
# local CPU wheel where there is one; the Dockerfile's fallback index, download.pytorch.org,
# may be unreachable), for bookworm's python 3.11, and installed in the chroot from that
# directory alone.
TORCH=${TORCH_SPEC:-torch==2.13.0}
say "pip download $TORCH (+ dependencies) for python 3.11"
python3 -m pip download --quiet -d "$CACHE/wheels" --only-binary=:all: --python-version 3.11 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform linux_x86_64 "$TORCH" >"$LOGS/torch.log" 2>&1 || fail "pip download torch failed" "$LOGS/torch.log"
# The base is a pure function of this recipe: kept as a tarball in the cache, keyed by it
# (bump BASE_RECIPE when the steps below change; --fresh to rebuild it anyway).
BASE_RECIPE=3
INCLUDE=python3,python3-pip,ca-certificates
key=$(printf '%s\n' "$BASE_RECIPE" bookworm minbase "$INCLUDE" "$MIRROR" "$TORCH" | sha256sum | cut -c1-16)
BASE_TAR=$CACHE/base-$key.tar
if [ "$FRESH" -eq 1 ] || [ ! -s "$BASE_TAR" ]; then
  say "debootstrap bookworm (minbase + python3) from $MIRROR"
  ROOTFS=$SCRATCH/rootfs
  ok=0
  for attempt in 1 2; do  # a flaky mirror: the second try reuses what the first downloaded
    # No fsync per unpacked file (what Debian's own docker images set): a throwaway root.
    mkdir -p "$ROOTFS/etc/dpkg/dpkg.cfg.d"
    echo force-unsafe-io > "$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
    if debootstrap --variant=minbase --include="$INCLUDE" --cache-dir="$CACHE/debs" \
        bookworm "$ROOTFS" "$MIRROR" >"$LOGS/debootstrap.log" 2>&1; then
      ok=1; break
    fi
    say "debootstrap attempt $attempt failed; retrying"
    rm -rf "$ROOTFS"
  done
  [ "$ok" -eq 1 ] || fail "debootstrap failed" "$LOGS/debootstrap.log"
  # Behind a TLS-intercepting proxy the host's CA bundle holds the proxy's CA: hand it to
  # the base (as a local CA, so the Dockerfile's ca-certificates install keeps it).
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/usr/local/share/ca-certificates/host-ca-bundle.crt"
    chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1 || true
  fi
  say "install $TORCH in the base"
  mkdir -p "$ROOTFS/tmp/wheels"
  mount --bind "$CACHE/wheels" "$ROOTFS/tmp/wheels"
  # env -i: the host's PIP_* settings (local wheel dirs, cert paths) mean nothing in the chroot.
  # --no-compile: byte-compiling all of torch's modules here costs about as much as the
  # unpacking; the Dockerfile's `import torch` check writes the .pyc of what is imported.
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root chroot "$ROOTFS" python3 -m pip install --quiet \
    --break-system-packages --no-cache-dir --no-compile --no-index --find-links /tmp/wheels "$TORCH" \
    >>"$LOGS/torch.log" 2>&1 || { umount "$ROOTFS/tmp/wheels"; fail "installing torch in the base failed" "$LOGS/torch.log"; }
  umount "$ROOTFS/tmp/wheels"
  rm -rf "$ROOTFS/tmp/wheels" "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  # Written aside and renamed: a concurrent or interrupted run never sees half a tarball.
  tar -C "$ROOTFS" -cf "$BASE_TAR.$$.partial" . && mv "$BASE_TAR.$$.partial" "$BASE_TAR"
  rm -rf "$ROOTFS"
else
  say "base root file system from the cache ($BASE_TAR)"
fi

for _ in $(seq 1 120); do docker version >/dev/null 2>&1 && break; sleep 0.5; done
docker version >/dev/null 2>&1 || fail "dockerd did not come up" "$LOGS/dockerd.log"
say "docker import -> ep-base:bookworm"
docker import "$BASE_TAR" ep-base:bookworm >/dev/null
say "base image: $(docker image ls ep-base:bookworm --format '{{.Size}}')"

# ---- the image ---------------------------------------------------------------------------
say "docker build -f docker/Dockerfile (BASE_IMAGE=ep-base:bookworm)"
# Each output line time-stamped (printf's builtin clock, no fork): where the build spends it.
DOCKER_BUILDKIT=0 docker build --network host -f docker/Dockerfile --build-arg BASE_IMAGE=ep-base:bookworm \
  -t expert-parallel:smoke . 2>&1 | while IFS= read -r line; do printf '[%(%T)T] %s\n' -1 "$line"; done \
  >"$LOGS/build.log" || fail "docker build failed" "$LOGS/build.log"
say "image: $(docker image ls expert-parallel:smoke --format '{{.Size}}')"

# ---- two training steps each way -------------------------------------------------------------
TINY=(--max-steps 2 --ep-size 2 --d-model 32 --n-layers 2 --n-heads 2 --seq-len 32 --num-experts 4
      --expert-ffn-hidden 48 --global-batch-size 8 --eval-batches 1 --tensorboard false)
run_in_image() {  # run_in_image NAME docker-run-args...: the run writes OUT/NAME
  local name=$1; shift
  rm -rf "${OUT:?}/$name"; mkdir -p "$OUT/$name"
  # Host network: with --network none the container's host name resolves nowhere and
  # the c10d store (which advertises it) retries forever.
  if ! timeout 600 docker run --rm --network host -v "$OUT/$name:/runs/$name" "$@" \
      >"$LOGS/$name.log" 2>&1; then
    fail "training with $name in the image failed" "$LOGS/$name.log"
  fi
  grep -E "^(\[[^]]*\] )?(ep-entrypoint|step)" "$LOGS/$name.log" || true
}
say "torchrun: entry point 'train', NPROC_PER_NODE=2 (torchrun --standalone), EP=2"
run_in_image torchrun -e NPROC_PER_NODE=2 expert-parallel:smoke train "${TINY[@]}" --out /runs/torchrun
say "mpirun -np 2 ep-entrypoint train: one rank per MPI process (ranks from OMPI_*), EP=2"
run_in_image mpirun expert-parallel:smoke mpirun --oversubscribe --bind-to none -np 2 \
  ep-entrypoint train "${TINY[@]}" --out /runs/mpirun
say "done"
