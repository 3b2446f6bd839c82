#!/bin/sh
# The node init of bench/boot_bench.py. boot_bench.py copies it into every
# tree it boots as /sbin/nbdroot-bench-init and starts it with
# init=/sbin/nbdroot-bench-init (root over NBD: our initrd switches to it)
# or rdinit=/sbin/nbdroot-bench-init (RAM mode: the whole tree is the
# initramfs). It replaces the tree's own init (systemd in the Debian tree),
# so both modes measure the same thing: the kernel and the root up, nothing
# else started.
#
# It prints, on the console, lines starting "E2E: ":
#   init started          the marker boot_bench.py times (qemu start -> here)
#   uptime S              the node's own uptime at that point
#   root DEV FSTYPE       what / is (rootfs/tmpfs in RAM mode, ext4 over NBD)
#   mem KEY kB ...        MemTotal MemFree MemAvailable Buffers Cached Shmem
#   done
# then powers the VM off. POSIX sh: runs under busybox sh and dash alike,
# and needs no other program than mount (busybox's or util-linux's).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "E2E: $*"; }
[ -r /proc/uptime ] || mount -t proc proc /proc
[ -d /sys/class ] || mount -t sysfs sysfs /sys
if ! [ -c /dev/console ] || ! [ -c /dev/null ]; then
	mount -t devtmpfs devtmpfs /dev
	exec </dev/console >/dev/console 2>&1
fi
say "init started"
read -r up _ </proc/uptime
say "uptime $up"
root=
while read -r dev mnt fs _; do
	[ "$mnt" = / ] && root="$dev $fs"
done </proc/mounts
say "root $root"
mem=
while read -r key val _; do
	case $key in
	MemTotal: | MemFree: | MemAvailable: | Buffers: | Cached: | Shmem:)
		mem="$mem ${key%:} $val kB" ;;
	esac
done </proc/meminfo
say "mem$mem"
say "done"
sync
# busybox's poweroff -f calls reboot(2) at once; the Debian tree's own
# poweroff is systemctl, which wants systemd: the sysrq trigger does not.
busybox poweroff -f 2>/dev/null
echo o >/proc/sysrq-trigger 2>/dev/null
sleep 30
