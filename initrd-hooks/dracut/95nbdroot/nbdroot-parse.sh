#!/bin/sh
# dracut cmdline hook (91): takes nbdroot= and root=nbd:<server>[:<port>]/
# <export>[:fstype[:opts]] with nbdroot's parser, sets root=block:/dev/root
# and queues /sbin/nbdroot-attach (network, nbd-client, /dev/root ->
# /dev/nbd0) on the settled initqueue; dracut's rootfs-block module then
# mounts /dev/root.
command -v getcmdline >/dev/null 2>&1 || . /lib/dracut-lib.sh
. /lib/nbdroot/cmdline.sh

nbdroot_parse "$(getcmdline)"
case $? in
0)
    root=block:/dev/root
    rootok=1
    fstype=$NBDROOT_FSTYPE
    [ -n "$NBDROOT_FSOPTS" ] && rflags=$NBDROOT_FSOPTS
    ${nbdroot_initqueue:-/sbin/initqueue} --settled --onetime --unique --name nbdroot-attach \
        /sbin/nbdroot-attach
    echo '[ -e /dev/root ]' >"${hookdir:-/lib/dracut/hooks}/initqueue/finished/nbdroot.sh"
    info "nbdroot: root from ${NBDROOT_SERVERS} export $NBDROOT_IMAGE/${NBDROOT_NODE:-<MAC>}"
    ;;
1) ;;
*) die "nbdroot: bad kernel command line: $NBDROOT_ERROR" ;;
esac
