#!/bin/sh
# mkverify.sh TREE OUT [--kver VERSION] [--modules-from DIR] [--compress zstd|xz|gzip]
#
# Builds nbdroot's verification initrd (docs/verification.md) for the kernel
# in TREE: busybox, memtester, dmidecode and stress-ng with their shared
# libraries, the kernel modules for NICs, disks and EDAC, our network
# scripts and verify/init. The node's normal initrd (mkinitrd.sh) gets none
# of these tools.
#
#   busybox     the host's busybox-static (/bin/busybox), else TREE's
#   memtester, dmidecode, stress-ng
#               TREE's (with TREE's libraries) when there, else the host's;
#               memtester is required, the others are optional.
#               stress-ng and the libraries only it needs are listed in
#               /lib/nbdroot/stress-ng.files; the init deletes them before
#               memtester runs, so they take no RAM from it.
#               NBDROOT_VERIFY_STRESS=0 leaves stress-ng out.
#   modules     virtio (net, blk, scsi), common wired NICs (e1000, e1000e,
#               igb, ixgbe, i40e, tg3, bnx2, r8169), ahci, nvme, sd_mod and
#               the EDAC drivers (amd64, skx, i10nm, ie31200, sb), those the
#               kernel has, with their dependencies
#               (+ $NBDROOT_VERIFY_MODULES)
#
# Prints the initrd's size on the last line of stdout. Needs: cpio, kmod's
# modinfo, and zstd, xz or gzip.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
prog=mkverify.sh
usage="$prog TREE OUT [--kver VERSION] [--modules-from DIR] [--compress zstd|xz|gzip]"
help=2,23p
# shellcheck source=lib/mkinitrd-common.sh
. "$here/lib/mkinitrd-common.sh"
parse_args "$@"

work=$(mktemp -d "${TMPDIR:-/tmp}/nbdroot-verify.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/bin "$root"/sbin "$root"/lib/nbdroot "$root"/lib/modules/"$kver" \
	"$root"/etc "$root"/dev "$root"/proc "$root"/sys "$root"/run "$root"/tmp

# ---------------------------------------------------------------- programs

if is_static /bin/busybox 2>/dev/null; then
	install_bin / /bin/busybox bin/busybox
elif [ -x "$tree/bin/busybox" ]; then
	install_bin "$tree" "$tree/bin/busybox" bin/busybox
else
	die "no busybox: install busybox-static on this host, or busybox in the tree"
fi
for applet in $("$root/bin/busybox" --list); do
	[ "$applet" = busybox ] || [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# tool NAME REQUIRED: TREE's NAME, else the host's, into /sbin.
tools=
tool() {
	for p in sbin usr/sbin bin usr/bin; do
		if [ -x "$tree/$p/$1" ] && ! [ -L "$tree/$p/$1" ]; then
			install_bin "$tree" "$tree/$p/$1" "sbin/$1"
			tools="$tools $1(tree)"
			return 0
		fi
	done
	if p=$(command -v "$1"); then
		install_bin / "$p" "sbin/$1"
		tools="$tools $1(host)"
		return 0
	fi
	[ "$2" = required ] && die "no $1 in the tree or on this host (apt-get install $1)"
	say "no $1 in the tree or on this host: left out"
}
tool memtester required
tool dmidecode optional
# stress-ng last: the files only it brings (its libraries come to ~30 MiB,
# libIPSec_MB and libcrypto among them) are listed, and the init deletes
# them after the stress step, before memtester, to give their RAM back.
if [ "${NBDROOT_VERIFY_STRESS:-1}" != 0 ]; then
	(cd "$root" && find . -type f | sort) >"$work/before"
	tool stress-ng optional
	(cd "$root" && find . -type f | sort) | comm -13 "$work/before" - | sed 's,^\.,,' \
		>"$root/lib/nbdroot/stress-ng.files"
fi

# ---------------------------------------------------------------- modules

wanted="virtio_pci virtio_net virtio_blk virtio_scsi e1000 e1000e igb ixgbe i40e tg3 bnx2 r8169
	ahci nvme sd_mod amd64_edac skx_edac i10nm_edac ie31200_edac sb_edac ${NBDROOT_VERIFY_MODULES:-}"
list_modules

: >"$work/order"
: >"$work/seen"
# add_module NAME: its dependencies first, then NAME (depth first, once).
add_module() {
	n=$(echo "$1" | tr - _)
	grep -qx "$n" "$work/seen" && return 0
	echo "$n" >>"$work/seen"
	p=$(ko_path "$n")
	[ -z "$p" ] && p=$(ko_path "${n}_generic")
	[ -z "$p" ] && return 0  # built in, or not in this kernel
	for d in $(modinfo -F depends "$p" | tr , ' '); do
		add_module "$d"
		n=$(echo "$1" | tr - _)  # restored after recursion (no locals in sh)
	done
	p=$(ko_path "$n")
	[ -z "$p" ] && p=$(ko_path "${n}_generic")
	echo "$p" >>"$work/order"
}
for m in $wanted; do add_module "$m"; done

install_modules

# ---------------------------------------------------------------- scripts

install_scripts "$here/verify/init"

# ---------------------------------------------------------------- archive

write_archive
say "kernel $kver; tools:$tools"
say "modules: $(sed 's,.*/,,; s,\.ko$,,' "$root/lib/nbdroot/modules" | tr '\n' ' ')"
echo "$out: $size bytes ($compress; ${raw} KiB unpacked, $files files)"
