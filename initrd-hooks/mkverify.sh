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
die() { echo "$prog: $*" >&2; exit 1; }
say() { echo "$prog: $*" >&2; }

tree= out= modtree= kver= compress=
while [ $# -gt 0 ]; do
	case $1 in
	--modules-from) modtree=${2:?}; shift 2 ;;
	--kver) kver=${2:?}; shift 2 ;;
	--compress) compress=${2:?}; shift 2 ;;
	-h | --help) sed -n '2,23p' "$0"; exit 0 ;;
	-*) die "unknown option $1" ;;
	*) if [ -z "$tree" ]; then tree=$1; elif [ -z "$out" ]; then out=$1; else die "too many arguments"; fi; shift ;;
	esac
done
[ -n "$tree" ] && [ -n "$out" ] || die "usage: $prog TREE OUT [--kver VERSION] [--modules-from DIR] [--compress zstd|xz|gzip]"
[ -d "$tree" ] || die "$tree: not a directory"
tree=$(cd "$tree" && pwd)
modtree=${modtree:-$tree}
[ -d "$modtree" ] || die "$modtree: not a directory"
modtree=$(cd "$modtree" && pwd)

if [ -z "$kver" ]; then
	for d in "$modtree"/lib/modules/*/ "$modtree"/usr/lib/modules/*/; do
		[ -d "$d" ] || continue
		v=$(basename "$d")
		if [ -z "$kver" ] || [ -e "$tree/boot/vmlinuz-$v" ]; then kver=$v; fi
	done
	[ -n "$kver" ] || die "no kernel modules under $modtree/lib/modules"
fi
moddir=$modtree/lib/modules/$kver
[ -d "$moddir" ] || moddir=$modtree/usr/lib/modules/$kver
[ -d "$moddir" ] || die "no $modtree/lib/modules/$kver"

work=$(mktemp -d "${TMPDIR:-/tmp}/nbdroot-verify.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/bin "$root"/sbin "$root"/lib/nbdroot "$root"/lib/modules/"$kver" \
	"$root"/etc "$root"/dev "$root"/proc "$root"/sys "$root"/run "$root"/tmp

# ---------------------------------------------------------------- programs

is_static() {
	case $(LC_ALL=C ldd "$1" 2>&1) in
	*"not a dynamic executable"* | *"statically linked"*) return 0 ;;
	esac
	return 1
}

# needed_libs ROOT FILE: the shared libraries FILE needs (paths inside ROOT).
needed_libs() {
	if [ "$1" != / ] && [ -x "$1/usr/bin/ldd" ] && [ "$(id -u)" = 0 ]; then
		LC_ALL=C chroot "$1" /usr/bin/ldd "${2#"$1"}"
	else
		LC_ALL=C ldd "$2"
	fi | awk '
		/not found/ { print "MISSING"; next }
		$2 == "=>" && $3 ~ /^\// { print $3; next }
		$1 ~ /^\// { print $1 }'
}

# install_bin ROOT FILE DEST: FILE as DEST in the initrd, with its libraries from ROOT.
install_bin() {
	cp -L "$2" "$root/$3"
	chmod 755 "$root/$3"
	is_static "$2" && return 0
	for lib in $(needed_libs "$1" "$2"); do
		[ "$lib" = MISSING ] && die "$2 needs a library that is not there (ldd: not found)"
		src=$lib
		[ "$1" != / ] && [ -e "$1$lib" ] && src=$1$lib
		[ -e "$src" ] || die "$2: library $lib not found"
		mkdir -p "$root$(dirname "$lib")"
		[ -e "$root$lib" ] || cp -L "$src" "$root$lib"
	done
}

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
find "$moddir/kernel" "$moddir/updates" "$moddir/extra" -name '*.ko*' 2>/dev/null >"$work/ko.list" || true
[ -s "$work/ko.list" ] || die "no modules (*.ko) under $moddir"

ko_path() {
	n=$(echo "$1" | tr - _)
	awk -v n="$n" '{ b = $0; sub(/.*\//, "", b); sub(/\.ko(\.(xz|zst|gz))?$/, "", b);
		gsub(/-/, "_", b); if (b == n) { print; exit } }' "$work/ko.list"
}

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

: >"$root/lib/nbdroot/modules"
while read -r p; do
	rel=${p#"$moddir"/}
	rel=${rel%.xz}; rel=${rel%.zst}; rel=${rel%.gz}
	dest=$root/lib/modules/$kver/$rel
	mkdir -p "$(dirname "$dest")"
	case $p in
	*.ko.xz) xz -dc "$p" >"$dest" ;;
	*.ko.zst) zstd -qdc "$p" >"$dest" ;;
	*.ko.gz) gzip -dc "$p" >"$dest" ;;
	*) cp "$p" "$dest" ;;
	esac
	echo "/lib/modules/$kver/$rel" >>"$root/lib/nbdroot/modules"
done <"$work/order"

# ---------------------------------------------------------------- scripts

cp "$here/verify/init" "$root/init"
cp "$here/lib/cmdline.sh" "$here/lib/node.sh" "$root/lib/nbdroot/"
cp "$here/lib/udhcpc.script" "$root/lib/nbdroot/udhcpc.script"
chmod 755 "$root/init" "$root/lib/nbdroot/udhcpc.script"
echo "$kver" >"$root/lib/nbdroot/kver"

# ---------------------------------------------------------------- archive

if [ -z "$compress" ]; then
	cfg=$tree/boot/config-$kver
	compress=gzip
	if [ -f "$cfg" ]; then
		if grep -q '^CONFIG_RD_ZSTD=y' "$cfg" && command -v zstd >/dev/null; then compress=zstd
		elif grep -q '^CONFIG_RD_XZ=y' "$cfg" && command -v xz >/dev/null; then compress=xz
		fi
	elif command -v zstd >/dev/null; then
		compress=zstd
	fi
fi
case $compress in
zstd) cmd="zstd -q -${NBDROOT_ZSTD_LEVEL:-19} -T0 -c" ;;
xz) cmd="xz -9 --check=crc32 -T0 -c" ;;
gzip) cmd="gzip -9 -n -c" ;;
*) die "unknown compression $compress" ;;
esac

files=$(cd "$root" && find . | wc -l)
raw=$(du -sk "$root" | cut -f1)
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | $cmd >"$out.tmp"
mv "$out.tmp" "$out"
size=$(wc -c <"$out")
say "kernel $kver; tools:$tools"
say "modules: $(sed 's,.*/,,; s,\.ko$,,' "$root/lib/nbdroot/modules" | tr '\n' ' ')"
echo "$out: $size bytes ($compress; ${raw} KiB unpacked, $files files)"
