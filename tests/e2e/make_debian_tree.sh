#!/bin/sh
# make_debian_tree.sh OUT.tar [initramfs-tools|dracut]
# Builds a minimal Debian 12 tree with a kernel, nbd-client, systemd and
# initramfs-tools (default) or dracut with dracut-network (debootstrap, run
# as root), and stores it as OUT.tar so that
# later runs unpack it instead of bootstrapping again. Network: Debian's
# mirror only. Takes several minutes the first time.
set -eu
out=$1
flavour=${2:-initramfs-tools}
mirror=${NBDROOT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=$(mktemp -d "${TMPDIR:-/tmp}/nbdroot-deb.XXXXXX")
trap 'umount -R "$work/tree/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
case $flavour in
initramfs-tools | dracut) ;;
*) echo "make_debian_tree.sh: unknown flavour $flavour" >&2; exit 2 ;;
esac
pkgs=initramfs-tools,linux-image-amd64,nbd-client,systemd-sysv,udev,kmod,busybox,e2fsprogs,ifupdown,isc-dhcp-client
nice debootstrap --variant=minbase --include="$pkgs" bookworm "$work/tree" "$mirror"
if [ "$flavour" = dracut ]; then
	# debootstrap cannot choose dracut for the kernel's initramfs tool:
	# swap it in with apt inside the tree (dracut replaces initramfs-tools).
	# dracut's network module picks systemd-networkd, which needs dbus.
	mount -t proc proc "$work/tree/proc"
	chroot "$work/tree" apt-get update -qq
	DEBIAN_FRONTEND=noninteractive chroot "$work/tree" apt-get install -y -qq \
		--no-install-recommends dracut dracut-network dbus procps
	umount "$work/tree/proc"
fi
# A root password-free console and a hostname, nothing else.
echo nbdroot-node > "$work/tree/etc/hostname"
chroot "$work/tree" passwd -d root >/dev/null
rm -rf "$work/tree/var/cache/apt/archives/"*.deb "$work/tree/var/lib/apt/lists/"*
tar -C "$work/tree" --numeric-owner -cf "$out.tmp" .
mv "$out.tmp" "$out"
