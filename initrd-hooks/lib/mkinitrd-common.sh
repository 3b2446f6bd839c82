# Shared by mkinitrd.sh and mkverify.sh, which source it from lib/ beside
# themselves (as they read lib/cmdline.sh); not copied into any initrd.
# The sourcing script sets prog, usage (the usage line) and help (the sed
# range of its header to print for --help) first. The functions work on the
# script's globals: tree, out, modtree, kver, compress, moddir, work, root.

die() { echo "$prog: $*" >&2; exit 1; }
say() { echo "$prog: $*" >&2; }

# parse_args "$@": TREE OUT [--modules-from DIR] [--kver VERSION]
# [--compress zstd|xz|gzip]. Sets tree, out, modtree (absolute), kver and
# compress; then kver (when not given) and moddir.
parse_args() {
	tree= out= modtree= kver= compress=
	while [ $# -gt 0 ]; do
		case $1 in
		--modules-from) modtree=${2:?}; shift 2 ;;
		--kver) kver=${2:?}; shift 2 ;;
		--compress) compress=${2:?}; shift 2 ;;
		-h | --help) sed -n "$help" "$0"; exit 0 ;;
		-*) die "unknown option $1" ;;
		*) if [ -z "$tree" ]; then tree=$1; elif [ -z "$out" ]; then out=$1; else die "too many arguments"; fi; shift ;;
		esac
	done
	[ -n "$tree" ] && [ -n "$out" ] || die "usage: $usage"
	[ -d "$tree" ] || die "$tree: not a directory"
	tree=$(cd "$tree" && pwd)
	modtree=${modtree:-$tree}
	[ -d "$modtree" ] || die "$modtree: not a directory"
	modtree=$(cd "$modtree" && pwd)

	# The kernel version: the one in /lib/modules, or the newest with a
	# matching /boot/vmlinuz-* when there are several.
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
}

# ---------------------------------------------------------------- programs

# is_static FILE
is_static() {
	case $(LC_ALL=C ldd "$1" 2>&1) in
	*"not a dynamic executable"* | *"statically linked"*) return 0 ;;
	esac
	return 1
}

# needed_libs ROOT FILE: absolute paths (inside ROOT, "/" for the host) of
# the shared libraries FILE needs, the dynamic loader included; MISSING for
# one ldd does not find.
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

# install_bin ROOT FILE DEST: copies FILE to DEST in the initrd, and its
# libraries from ROOT.
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

# ---------------------------------------------------------------- modules

# list_modules: every module file of moddir into $work/ko.list.
list_modules() {
	find "$moddir/kernel" "$moddir/updates" "$moddir/extra" -name '*.ko*' 2>/dev/null >"$work/ko.list" || true
	[ -s "$work/ko.list" ] || die "no modules (*.ko) under $moddir"
}

# ko_path NAME: the module file for NAME ('-' and '_' are the same).
ko_path() {
	n=$(echo "$1" | tr - _)
	awk -v n="$n" '{ b = $0; sub(/.*\//, "", b); sub(/\.ko(\.(xz|zst|gz))?$/, "", b);
		gsub(/-/, "_", b); if (b == n) { print; exit } }' "$work/ko.list"
}

# install_modules: the files listed in $work/order, uncompressed, into the
# initrd's /lib/modules/KVER, in that order in /lib/nbdroot/modules.
install_modules() {
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
}

# ---------------------------------------------------------------- scripts

# install_scripts INIT: INIT as /init, and the network library.
install_scripts() {
	cp "$1" "$root/init"
	cp "$here/lib/cmdline.sh" "$here/lib/node.sh" "$root/lib/nbdroot/"
	cp "$here/lib/udhcpc.script" "$root/lib/nbdroot/udhcpc.script"
	chmod 755 "$root/init" "$root/lib/nbdroot/udhcpc.script"
	echo "$kver" >"$root/lib/nbdroot/kver"
}

# ---------------------------------------------------------------- archive

# write_archive: the initrd's tree as a cpio archive into $out, compressed
# with $compress (when not given: what the kernel's config can unpack).
# Sets files, raw (KiB unpacked) and size (bytes).
write_archive() {
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
}
