#!/bin/sh
# install.sh TREE [--initramfs-tools] [--dracut]
# Installs nbdroot's node-side files into a root tree (or / ): the shared
# library under /usr/share/nbdroot/lib, nbdroot-keeper and nbdroot-agent in /usr/sbin, and
# the initramfs-tools hook and script and/or the dracut module. Regenerate the tree's initrd afterwards
# (update-initramfs -u, or dracut --add nbdroot --omit nbd).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tree=${1:?usage: install.sh TREE [--initramfs-tools] [--dracut]}
shift
[ $# -gt 0 ] || set -- --initramfs-tools --dracut
install -d "$tree/usr/share/nbdroot/lib"
install -m 644 "$here/lib/cmdline.sh" "$here/lib/node.sh" "$tree/usr/share/nbdroot/lib/"
install -m 755 "$here/lib/udhcpc.script" "$tree/usr/share/nbdroot/lib/"
# The reconnect daemon: $NBDROOT_KEEPER, or this checkout's build.
keeper=${NBDROOT_KEEPER:-$here/../build/initrd-hooks/nbdroot-keeper}
if [ -x "$keeper" ]; then
	install -D -m 755 "$keeper" "$tree/usr/sbin/nbdroot-keeper"
else
	echo "install.sh: WARNING: no nbdroot-keeper at $keeper (build nbdroot or set NBDROOT_KEEPER):" >&2
	echo "install.sh: WARNING: nodes will not survive a server restart" >&2
fi
# The node agent: $NBDROOT_AGENT, or this checkout's build (stripped).
agent=${NBDROOT_AGENT:-$here/../build/nbdserver/nbdroot-agent}
if [ -x "$agent" ]; then
	install -D -s -m 755 "$agent" "$tree/usr/sbin/nbdroot-agent"
else
	echo "install.sh: no nbdroot-agent at $agent (build nbdroot or set NBDROOT_AGENT):" >&2
	echo "install.sh: nodes will attach to the server directly" >&2
fi
for what; do
	case $what in
	--initramfs-tools)
		install -d "$tree/etc/initramfs-tools/hooks" "$tree/etc/initramfs-tools/scripts"
		install -m 755 "$here/initramfs-tools/hooks/nbdroot" "$tree/etc/initramfs-tools/hooks/nbdroot"
		install -m 644 "$here/initramfs-tools/scripts/nbdroot" "$tree/etc/initramfs-tools/scripts/nbdroot" ;;
	--dracut)
		d=$tree/usr/lib/dracut/modules.d/95nbdroot
		install -d "$d"
		install -m 755 "$here"/dracut/95nbdroot/*.sh "$d/" ;;
	*) echo "install.sh: unknown option $what" >&2; exit 1 ;;
	esac
done
