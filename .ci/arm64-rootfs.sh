#!/usr/bin/env bash
# An arm64 Debian rootfs with edge-sdk[agent] in /opt/venv, run through qemu-user-static and
# binfmt_misc (tests/test_arm64.py uses it; also handy by hand).
#
# Usage (as root): .ci/arm64-rootfs.sh ROOT WHEEL
#   ROOT  a new directory (made here; keep it outside the clone)
#   WHEEL the edge-sdk wheel built from the checkout (pip wheel --no-deps .)
# The rootfs with its venv is cached as a tarball keyed on the Debian release and
# pyproject.toml's [agent] requirements (EDGE_SDK_ARM64_CACHE, default /var/cache/edge-sdk): a cached run unpacks it
# and reinstalls only the wheel. Clear the cache with: rm -rf /var/cache/edge-sdk
# Exit 77 (one line on stderr) when this machine cannot run it: not root, no qemu or binfmt,
# no network for a cold build. Any other non-zero exit is a failure.
set -euo pipefail
RELEASE=bookworm
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${EDGE_SDK_ARM64_CACHE:-/var/cache/edge-sdk}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Bump when the recipe below changes what the cached tarball holds.
RECIPE=1

cannot() { echo "arm64: $*" >&2; exit 77; }
[ $# = 2 ] || { echo "usage: $0 ROOT WHEEL" >&2; exit 2; }
ROOTFS="$1"
WHEEL="$(realpath "$2")"
[ -f "$WHEEL" ] || { echo "arm64: no wheel at $WHEEL" >&2; exit 2; }
[ "$(id -u)" = 0 ] || cannot "needs root (debootstrap, chroot, mount)"
for tool in debootstrap qemu-aarch64-static update-binfmts zstd chroot; do
  command -v "$tool" >/dev/null 2>&1 ||
    cannot "the $tool command is missing (apt-get install qemu-user-static binfmt-support debootstrap zstd)"
done
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null ||
    cannot "cannot mount binfmt_misc at /proc/sys/fs/binfmt_misc"
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null ||
  cannot "binfmt_misc has no enabled qemu-aarch64 entry (update-binfmts --enable qemu-aarch64)"

# Keyed on what the tarball holds (the [agent] requirements), not on the whole pyproject.toml:
# a lint contract or another extra must not cost a cold build (about 5 minutes in CI).
agent_requirements() {
  python3 - "$HERE/pyproject.toml" <<'EOF' 2>/dev/null || cat "$HERE/pyproject.toml"
import json, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(json.dumps([p.get("requires-python"), p.get("dependencies", []),
                  p.get("optional-dependencies", {}).get("agent", [])], sort_keys=True))
EOF
}
KEY="$( (echo "$RELEASE recipe=$RECIPE"; agent_requirements) | sha256sum | cut -c1-16)"
TARBALL="$CACHE/arm64-$RELEASE-$KEY.tar.zst"

mkdir -p "$ROOTFS"
ROOTFS="$(realpath "$ROOTFS")"
[ -z "$(ls -A "$ROOTFS")" ] || { echo "arm64: $ROOTFS is not empty" >&2; exit 2; }
MOUNTS=()
cleanup() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}"; done
  MOUNTS=()
}
trap cleanup EXIT
trap "exit 130" INT TERM
mount_proc() {
  mount -t proc proc "$ROOTFS/proc" && MOUNTS+=("$ROOTFS/proc")
  # qemu-user 7.2 shows the guest the host's x86 cpuinfo, on which onnxruntime segfaults.
  mount --bind "$ROOTFS/etc/edge-sdk/cpuinfo" "$ROOTFS/proc/cpuinfo" && MOUNTS+=("$ROOTFS/proc/cpuinfo")
}
# The host's pip configuration (PIP_* variables, pip.conf, local wheel dirs) stays out.
in_root() {
  chroot "$ROOTFS" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 PIP_CONFIG_FILE=/dev/null "$@"
}
arm64_cpuinfo() {
  local n i
  n="$(nproc)"
  for ((i = 0; i < n; i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid\n' "$i"
    printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
  done
}

start=$SECONDS
if [ -f "$TARBALL" ]; then
  tar -I zstd -xpf "$TARBALL" -C "$ROOTFS"
  echo "arm64: restored $TARBALL in $((SECONDS - start)) s" >&2
else
  python3 - "$MIRROR" <<'EOF' || cannot "no network: cannot reach $MIRROR for debootstrap"
import sys, urllib.request
urllib.request.urlopen(sys.argv[1] + "/dists/bookworm/Release", timeout=20).read(64)
EOF
  echo "arm64: cold build of the $RELEASE rootfs (debootstrap ~3 min, venv ~1 min)" >&2
  if ! debootstrap --arch=arm64 --variant=minbase \
      --include=python3,python3-venv,python3-pip,ca-certificates \
      "$RELEASE" "$ROOTFS" "$MIRROR" > "$ROOTFS.debootstrap.log" 2>&1; then
    tail -5 "$ROOTFS.debootstrap.log" >&2
    echo "arm64: debootstrap failed (log: $ROOTFS.debootstrap.log)" >&2
    exit 1
  fi
  rm -f "$ROOTFS.debootstrap.log"
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  mkdir -p "$ROOTFS/etc/edge-sdk"
  arm64_cpuinfo > "$ROOTFS/etc/edge-sdk/cpuinfo"
  cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/host-ca-certificates.crt"
  mount_proc
  in_root python3 -m venv /opt/venv
  mkdir -p "$ROOTFS/tmp/wheel"
  cp "$WHEEL" "$ROOTFS/tmp/wheel/"
  in_root pip install -q --only-binary=:all: "/tmp/wheel/$(basename "$WHEEL")[agent]"
  rm -rf "$ROOTFS/tmp/wheel"
  cleanup
  mkdir -p "$CACHE"
  tar -I 'zstd -T0 -3' -cpf "$TARBALL.tmp.$$" -C "$ROOTFS" --one-file-system .
  mv "$TARBALL.tmp.$$" "$TARBALL"
  # Tarballs of earlier [agent] requirements are never restored again.
  find "$CACHE" -maxdepth 1 -name "arm64-$RELEASE-*.tar.zst" ! -name "$(basename "$TARBALL")" -delete
  echo "arm64: built and cached $TARBALL in $((SECONDS - start)) s" >&2
  exit 0
fi
# A cached rootfs has the dependencies; only edge-sdk itself comes from this checkout.
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/host-ca-certificates.crt"
mkdir -p "$ROOTFS/tmp/wheel"
cp "$WHEEL" "$ROOTFS/tmp/wheel/"
mount_proc
in_root pip install -q --no-deps --force-reinstall "/tmp/wheel/$(basename "$WHEEL")"
rm -rf "$ROOTFS/tmp/wheel"
echo "arm64: rootfs ready at $ROOTFS in $((SECONDS - start)) s" >&2
