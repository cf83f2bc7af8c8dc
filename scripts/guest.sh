#!/usr/bin/env bash
# Fetch the kernel of the tiny QEMU test guest: Debian's kernel package,
# downloaded with `apt-get download` and unpacked (never installed), reduced
# to vmlinuz plus the modules the guest tests load (virtio PCI, blk, net,
# rng, ext4 for the file-system test) and their load order.
#
# Output (cached; rerunning is a no-op): $VUBACKEND_GUEST_DIR, by default
# .cache/guest in the repository, holding kernel/vmlinuz,
# kernel/modules/*.ko and kernel/modules.list. The initramfs itself is built
# by the tests (tests/guest/rig.py) from busybox-static and tests/guest/rootfs.
# Needs: apt-get, dpkg, kmod (depmod, modprobe).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${VUBACKEND_GUEST_DIR:-$PWD/.cache/guest}
KDIR="$OUT/kernel"
MODULES=(virtio_pci virtio_blk virtio_net virtio_rng virtio_console ext4)

if [ -f "$KDIR/vmlinuz" ] && [ -f "$KDIR/modules.list" ]; then
    exit 0
fi

kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | grep -o 'linux-image-[0-9][^ ]*-amd64' | head -1 || true
}
pkg=$(kernel_package)
if [ -z "$pkg" ]; then
    apt-get update -q
    pkg=$(kernel_package)
fi
if [ -z "$pkg" ]; then
    echo "guest.sh: apt cannot resolve linux-image-amd64 to a kernel package" >&2
    exit 1
fi
version=${pkg#linux-image-}
echo "== guest kernel: $pkg (downloaded, unpacked, not installed)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1) \
    || (cd "$work" && apt-get update -q && apt-get download -q "$pkg")
dpkg -x "$work"/"${pkg}"_*.deb "$work/root"
depmod -b "$work/root" "$version"

rm -rf "$KDIR.tmp"
mkdir -p "$KDIR.tmp/modules"
cp "$work/root/boot/vmlinuz-$version" "$KDIR.tmp/vmlinuz"
: > "$KDIR.tmp/modules.list"
for module in "${MODULES[@]}"; do
    modprobe -d "$work/root" -S "$version" --show-depends "$module" \
        | awk '$1 == "insmod" {print $2}' | while read -r path; do
            name=$(basename "$path")
            if ! grep -qx "$name" "$KDIR.tmp/modules.list"; then
                cp "$path" "$KDIR.tmp/modules/$name"
                echo "$name" >> "$KDIR.tmp/modules.list"
            fi
        done
done
echo "$version" > "$KDIR.tmp/version"
rm -rf "$KDIR"
mv "$KDIR.tmp" "$KDIR"
echo "== guest kernel ready in $KDIR ($(wc -l < "$KDIR/modules.list") modules)"
