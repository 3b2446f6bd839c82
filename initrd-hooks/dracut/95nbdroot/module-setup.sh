#!/bin/bash
# dracut module "nbdroot": a root filesystem on an nbdroot server's
# per-node view. Self-contained like nbdroot's own initrd: it brings the
# network up itself (busybox udhcpc with short timeouts, or ip=) rather
# than through dracut's network modules. Build with
#   dracut --add nbdroot --omit "nbd network network-legacy systemd-networkd" ...
# (dracut's nbd module parses root=nbd: too). Needs the shared library in
# /usr/share/nbdroot/lib (initrd-hooks/install.sh) and busybox in the tree.

check() {
    require_binaries nbd-client busybox || return 1
    [ -r /usr/share/nbdroot/lib/cmdline.sh ] || return 1
    # Only when asked for.
    return 255
}

depends() {
    return 0
}

installkernel() {
    instmods nbd ext4 crc32c virtio_net virtio_pci
}

install() {
    inst_multiple nbd-client ip sed tr grep head tail cat sleep kill mount umount ln awk cut
    inst_simple "$(command -v busybox)" /usr/bin/busybox
    # The reconnect daemon (static; installed by install.sh).
    if [ -x /usr/sbin/nbdroot-keeper ]; then
        inst_simple /usr/sbin/nbdroot-keeper /usr/sbin/nbdroot-keeper
    else
        dwarn "nbdroot: no /usr/sbin/nbdroot-keeper: nodes will not survive a server restart"
    fi
    # The node agent (install.sh), with its libraries. Without it the node
    # attaches to the server directly.
    if [ -x /usr/sbin/nbdroot-agent ]; then
        inst_binary /usr/sbin/nbdroot-agent /usr/sbin/nbdroot-agent
    fi
    ln_r /usr/bin/busybox /usr/sbin/udhcpc
    ln_r /usr/bin/busybox /usr/bin/ipcalc
    inst_simple /usr/share/nbdroot/lib/cmdline.sh /lib/nbdroot/cmdline.sh
    inst_simple /usr/share/nbdroot/lib/node.sh /lib/nbdroot/node.sh
    inst_simple /usr/share/nbdroot/lib/udhcpc.script /lib/nbdroot/udhcpc.script
    chmod 755 "$initdir/lib/nbdroot/udhcpc.script"
    inst_hook cmdline 91 "$moddir/nbdroot-parse.sh"
    inst_script "$moddir/nbdroot-attach.sh" /sbin/nbdroot-attach
    dracut_need_initqueue
}
