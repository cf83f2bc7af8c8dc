#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for vubackend: the Debian packages the
# build and the tests need, then vubackend itself (editable, which compiles
# the native helper in place) with its test tools.
# Idempotent; run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."

# QEMU, qemu-storage-daemon and DPDK are the real peers of the tests;
# busybox-static, cpio and kmod build the QEMU test guest (scripts/guest.sh);
# libxen-dev gives Xen's libraries (tests load them; without Xen their open
# calls fail with ENOENT).
APT_PACKAGES=(gcc libc6-dev qemu-system-x86 qemu-system-common qemu-utils dpdk-dev
              busybox-static cpio kmod libxen-dev)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
echo "== installing vubackend and its test tools with $($PYTHON --version)"
$PYTHON -m pip install -q --upgrade "pip>=23" "setuptools>=68" wheel "cffi>=1.16"
$PYTHON -m pip install -q --no-build-isolation -e ".[test]"
$PYTHON -c "import vubackend._native" 2>/dev/null \
    || { echo "the native helper did not build" >&2; exit 1; }

echo "== fetching the QEMU test guest kernel (cached in .cache/guest)"
bash scripts/guest.sh
