#!/bin/sh
# /sbin/nbdroot-attach, queued by nbdroot-parse.sh: brings up the network,
# attaches /dev/nbd0 to <image>/<node-id> with nbd-client, trying the
# servers in order, and links /dev/root to it for dracut's rootfs-block.
command -v getcmdline >/dev/null 2>&1 || . /lib/dracut-lib.sh
. /lib/nbdroot/cmdline.sh
NBDROOT_RUN=/run/nbdroot
. /lib/nbdroot/node.sh
mkdir -p "$NBDROOT_RUN"

log() { echo "nbdroot: $*" >/dev/console 2>/dev/null || echo "nbdroot: $*"; }
fail() {
    log "FAILED: $*"
    if [ "${NBDROOT_SHELL:-0}" = 1 ]; then
        emergency_shell -n nbdroot "nbdroot: $*"
    fi
    # die reboots when panic= is set (rd.shell=0), else dracut's emergency shell.
    die "nbdroot: $*"
    exit 1
}

[ -e /dev/root ] && exit 0
nbdroot_parse "$(getcmdline)" || fail "bad kernel command line: $NBDROOT_ERROR"
modprobe nbd nbds_max=4 2>/dev/null
modprobe virtio_net 2>/dev/null
nbdroot_net
nbdroot_node_id
nbdroot_attach
ln -sf /dev/nbd0 /dev/root
nbdroot_write_state
exit 0
