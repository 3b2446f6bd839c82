#!/bin/sh
# mkinitrd.sh TREE OUT [--modules-from DIR] [--kver VERSION] [--compress zstd|xz|gzip]
#
# Builds nbdroot's own small initrd for the kernel in TREE: busybox, the
# standard nbd-client with its libraries, the kernel modules a node needs to
# reach its root over NBD (with their dependencies), and our init script.
# It works for any tree that has a kernel in /lib/modules, even one with no
# initramfs-tools or dracut inside.
#
#   busybox     the host's busybox-static (/bin/busybox, statically linked),
#               else TREE's busybox with its libraries
#   nbd-client  TREE's (with TREE's libraries), else the host's, else the
#               Debian package fetched with `apt-get download` into
#               $NBDROOT_CACHE (default /var/cache/nbdroot) and unpacked
#               with dpkg -x (never installed); its libraries come from the
#               host then. $NBDROOT_NBD_CLIENT names a binary to use instead.
#   nbdroot-keeper  $NBDROOT_KEEPER, else TREE's /usr/sbin/nbdroot-keeper,
#               else the host's, else this checkout's build/ (static)
#   nbdroot-agent  the node agent: $NBDROOT_AGENT, else TREE's
#               /usr/sbin/nbdroot-agent, else the host's, else this
#               checkout's build/; stripped, with its libraries from the
#               host (libc, GnuTLS, libroaring). Optional: without it the
#               node attaches to the server directly (and nbdroot-keeper
#               reconnects).
#   modules     virtio_pci virtio_net nbd ext4 crc32c (+ $NBDROOT_MODULES)
#               and their dependencies, read with modinfo from the .ko files
#               of DIR/lib/modules/VERSION (DIR = TREE unless --modules-from)
#
# Prints the initrd's size on the last line of stdout. Needs: cpio, kmod's
# modinfo, and zstd, xz or gzip.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
prog=mkinitrd.sh
usage="$prog TREE OUT [--modules-from DIR] [--kver VERSION] [--compress zstd|xz|gzip]"
help=2,24p
# shellcheck source=lib/mkinitrd-common.sh
. "$here/lib/mkinitrd-common.sh"
parse_args "$@"

work=$(mktemp -d "${TMPDIR:-/tmp}/nbdroot-initrd.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/bin "$root"/sbin "$root"/lib/nbdroot "$root"/lib/modules/"$kver" \
	"$root"/etc "$root"/dev "$root"/proc "$root"/sys "$root"/run "$root"/newroot "$root"/tmp

# ---------------------------------------------------------------- programs

# busybox
if is_static /bin/busybox 2>/dev/null; then
	install_bin / /bin/busybox bin/busybox
	bbsrc="host /bin/busybox (static)"
elif [ -x "$tree/bin/busybox" ] || [ -x "$tree/usr/bin/busybox" ]; then
	b=$tree/bin/busybox
	[ -x "$b" ] || b=$tree/usr/bin/busybox
	install_bin "$tree" "$b" bin/busybox
	bbsrc="tree's busybox"
else
	die "no busybox: install busybox-static on this host, or busybox in the tree"
fi
for applet in $("$root/bin/busybox" --list); do
	case $applet in busybox) continue ;; esac
	[ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# nbd-client
find_nbd_client() {
	if [ -n "${NBDROOT_NBD_CLIENT:-}" ]; then
		[ -x "$NBDROOT_NBD_CLIENT" ] || die "NBDROOT_NBD_CLIENT=$NBDROOT_NBD_CLIENT: not executable"
		echo "/ $NBDROOT_NBD_CLIENT"; return
	fi
	for p in sbin/nbd-client usr/sbin/nbd-client; do
		[ -x "$tree/$p" ] && { echo "$tree $tree/$p"; return; }
	done
	for p in /sbin/nbd-client /usr/sbin/nbd-client; do
		[ -x "$p" ] && { echo "/ $p"; return; }
	done
	cache=${NBDROOT_CACHE:-/var/cache/nbdroot}/nbd-client
	if ! [ -x "$cache/sbin/nbd-client" ]; then
		say "no nbd-client in the tree or on this host: fetching Debian's package"
		mkdir -p "$cache.deb"
		(cd "$cache.deb" && apt-get download nbd-client >&2) || die "apt-get download nbd-client failed"
		rm -rf "$cache" && mkdir -p "$cache"
		dpkg -x "$(ls "$cache.deb"/nbd-client_*.deb | tail -n 1)" "$cache" || die "dpkg -x failed"
	fi
	echo "/ $cache/sbin/nbd-client"
}
set -- $(find_nbd_client)
install_bin "$1" "$2" sbin/nbd-client
nbdsrc=$2

# nbdroot-keeper (reconnects after a server restart; built statically with
# nbdroot): $NBDROOT_KEEPER, TREE's (install.sh), the host's, or this
# checkout's build/.
find_keeper() {
	if [ -n "${NBDROOT_KEEPER:-}" ]; then
		[ -x "$NBDROOT_KEEPER" ] || die "NBDROOT_KEEPER=$NBDROOT_KEEPER: not executable"
		echo "$NBDROOT_KEEPER"; return
	fi
	for p in "$tree/usr/sbin/nbdroot-keeper" "$(command -v nbdroot-keeper || true)" \
		"$here/../build/initrd-hooks/nbdroot-keeper"; do
		[ -n "$p" ] && [ -x "$p" ] && { echo "$p"; return; }
	done
}
keeper=$(find_keeper)
if [ -n "$keeper" ]; then
	install_bin / "$keeper" sbin/nbdroot-keeper
else
	say "WARNING: no nbdroot-keeper (build nbdroot, or set NBDROOT_KEEPER): nodes booted"
	say "WARNING: from this initrd get I/O errors when the server restarts"
	keeper="none"
fi

# nbdroot-agent (the node agent: the kernel's NBD on a Unix socket, the
# servers and peers behind it): $NBDROOT_AGENT, TREE's (install.sh), the
# host's, or this checkout's build/.
find_agent() {
	if [ -n "${NBDROOT_AGENT:-}" ]; then
		[ -x "$NBDROOT_AGENT" ] || die "NBDROOT_AGENT=$NBDROOT_AGENT: not executable"
		echo "$NBDROOT_AGENT"; return
	fi
	for p in "$tree/usr/sbin/nbdroot-agent" "$(command -v nbdroot-agent || true)" \
		"$here/../build/nbdserver/nbdroot-agent"; do
		[ -n "$p" ] && [ -x "$p" ] && { echo "$p"; return; }
	done
}
agent=$(find_agent)
if [ -n "$agent" ]; then
	install_bin / "$agent" sbin/nbdroot-agent
	if command -v strip >/dev/null 2>&1; then
		strip --strip-unneeded "$root/sbin/nbdroot-agent" || die "strip $agent failed"
	fi
else
	say "no nbdroot-agent (build nbdroot, or set NBDROOT_AGENT): nodes attach to the server directly"
	agent="none"
fi

# ---------------------------------------------------------------- modules

wanted="virtio_pci virtio_net nbd ext4 crc32c ${NBDROOT_MODULES:-}"
required="nbd ext4"
list_modules


is_builtin() {
	n=$(echo "$1" | tr - _)
	[ -f "$moddir/modules.builtin" ] &&
		tr - _ <"$moddir/modules.builtin" | grep -q "/$n\.ko$"
}

: >"$work/order"
# add_module NAME: its dependencies first, then NAME (depth first, once).
add_module() {
	n=$(echo "$1" | tr - _)
	grep -qx "$n" "$work/seen" 2>/dev/null && return 0
	echo "$n" >>"$work/seen"
	p=$(ko_path "$n")
	# Aliases the softdeps use (no modules.alias needed): crc32c is
	# crc32c_generic, which every x86 CPU can run.
	[ -z "$p" ] && p=$(ko_path "${n}_generic")
	if [ -z "$p" ]; then
		is_builtin "$n" && return 0
		case " $required " in *" $n "*) die "module $n: neither built in nor in $moddir" ;; esac
		say "module $n: not in this kernel, skipped"
		return 0
	fi
	deps=$(modinfo -F depends "$p" | tr , ' ')
	soft=$(modinfo -F softdep "$p" | tr ' ' '\n' | grep -v ':$' || true)
	for d in $deps $soft; do
		add_module "$d"
		n=$(echo "$1" | tr - _)  # restored after recursion
	done
	p=$(ko_path "$n")
	[ -z "$p" ] && p=$(ko_path "${n}_generic")
	echo "$p" >>"$work/order"
}
for m in $wanted; do add_module "$m"; done

install_modules

# ---------------------------------------------------------------- scripts

install_scripts "$here/init"

# ---------------------------------------------------------------- archive

write_archive
say "kernel $kver; busybox: $bbsrc; nbd-client: $nbdsrc; nbdroot-keeper: $keeper; nbdroot-agent: $agent"
say "modules: $(sed 's,.*/,,; s,\.ko$,,' "$root/lib/nbdroot/modules" | tr '\n' ' ')"
echo "$out: $size bytes ($compress; ${raw} KiB unpacked, $files files)"
