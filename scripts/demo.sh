#!/usr/bin/env bash
# The built-in example, end to end on one machine: a node with no disk boots
# in a qemu VM from an image that nbdserver serves; its console shows here.
#   1. Debian's kernel package is downloaded once (apt-get download) and
#      unpacked (dpkg -x) into a cache; it is never installed on this host;
#   2. examples/rootfs, plus busybox and that kernel (/boot, /lib/modules),
#      becomes generation 1 of image "demo" in a fresh store (imagebuilder
#      build, publish);
#   3. nbdserver serves the store on 127.0.0.1 (qemu's user network lets the
#      VM reach this host as 10.0.2.2); imagebuilder boot writes the node's
#      kernel, initrd (initrd-hooks/mkinitrd.sh) and boot.ipxe;
#   4. node A boots them: its initrd attaches node A's own copy-on-write view
#      demo/52-54-00-12-34-56 over NBD and switches into it; the example's
#      /sbin/init (examples/rootfs/sbin/init) shows the root, counts the boot
#      in /var/lib/demo and powers off;
#   5. node A boots again and finds what it wrote: boot number 2;
#   6. the root is edited and rebuilt (an incremental generation); a new
#      node B boots it, node A stays on the generation it started with.
# Each boot must end within $NBDROOT_DEMO_BOOT_TIMEOUT seconds (180). qemu
# emulates the CPU (TCG) unless NBDROOT_DEMO_ACCEL=kvm.
# Pass --keep to leave the server running at the end.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
keep=0
[ "${1:-}" = "--keep" ] && keep=1
boot_timeout="${NBDROOT_DEMO_BOOT_TIMEOUT:-180}"
accel="${NBDROOT_DEMO_ACCEL:-tcg}"

"$root/scripts/install-deps.sh"
echo "== 0. build (scripts/build.sh: a few minutes the first time)"
if ! out="$("$root/scripts/build.sh" 2>&1)"; then
  echo "$out" | tail -n 40 >&2
  echo "demo: FAILED: the build" >&2
  exit 1
fi
server="$root/build/nbdserver/nbdserver"
ib="$root/build/imagebuilder/imagebuilder"
# Not root: imagebuilder runs mke2fs and mkinitrd.sh modinfo (in sbin), and
# mkinitrd.sh caches Debian's nbd-client in $NBDROOT_CACHE (/var/cache/nbdroot).
export PATH="$PATH:/usr/sbin:/sbin"
[ -w /var/cache ] || export NBDROOT_CACHE="${NBDROOT_CACHE:-$HOME/.cache/nbdroot}"

work="$(mktemp -d -t nbdroot-demo.XXXXXX)"
store="$work/store"  # image generations and node views
tree="$work/rootfs"  # the image's source directory
boot="$work/boot"    # what a TFTP/HTTP server would serve: vmlinuz, initrd.img, boot.ipxe
mkdir -p "$store"
pid=""
cleanup() {
  [ -s "$work/qemu.pid" ] && kill "$(cat "$work/qemu.pid")" 2>/dev/null
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() {
  {
    echo
    echo "demo: FAILED: $*"
    [ -s "$work/server.log" ] && echo "nbdserver's log:" && tail -n 15 "$work/server.log"
  } >&2
  exit 1
}
indent() { sed 's/^/   /'; }

echo "== 1. Debian's kernel: apt-get download (70 MB, once) + dpkg -x into a cache; not installed here"
# tests/e2e/nodelab.py does this for the VM boot tests; both share the cache.
k="$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import nodelab
k = nodelab.fetch_kernel(); print(k.root, k.version)' "$root/tests/e2e")" ||
  fail "could not fetch Debian's kernel package (see above)"
read -r kdir kver <<<"$k"
echo "   $kver, unpacked in $kdir"

echo "== 2. imagebuilder: examples/rootfs + busybox + the kernel -> image 'demo'"
cp -a "$root/examples/rootfs" "$tree"
mkdir -p "$tree"/{bin,dev,proc,sys,run,tmp,root,var/lib/demo}
cp /bin/busybox "$tree/bin/"  # busybox-static: the whole userland
for a in $(/bin/busybox --list); do
  [ -e "$tree/bin/$a" ] || ln -s busybox "$tree/bin/$a"
done
# /boot/vmlinuz-* and /lib/modules: hard links into the cache where possible.
cp -al "$kdir/boot" "$kdir/lib" "$tree/" 2>/dev/null ||
  { rm -rf "${tree:?}/boot" "${tree:?}/lib"; cp -a "$kdir/boot" "$kdir/lib" "$tree/"; }
gen1="$("$ib" -q --store "$store" build demo --from "$tree" | tail -1)"
"$ib" -q --store "$store" publish demo "$gen1" >/dev/null
"$ib" --store "$store" list demo | indent

echo "== 3. nbdserver --store on 127.0.0.1; imagebuilder boot (kernel, initrd, boot.ipxe)"
"$server" --store "$store" --listen 127.0.0.1:0 --ready-file "$work/ready" \
  2>>"$work/server.log" &
pid=$!
for _ in $(seq 100); do [ -s "$work/ready" ] && break; sleep 0.1; done
[ -s "$work/ready" ] || fail "nbdserver did not start"
port="$(head -1 "$work/ready")"
port="${port##*:}"
echo "   listening on 127.0.0.1:$port: the VMs reach it as 10.0.2.2:$port"
"$ib" -q --store "$store" boot demo --out "$boot" --server "10.0.2.2:$port" \
  --cmdline "console=ttyS0 quiet panic=5" 2>"$work/mkinitrd.log" | indent ||
  { cat "$work/mkinitrd.log" >&2; fail "imagebuilder boot"; }
grep '^kernel' "$boot/boot.ipxe" | sed 's/^/   boot.ipxe: /'

# boot_node NAME MAC: boots a VM with no disk as iPXE would with boot.ipxe
# (its kernel, initrd and command line, with the MAC where iPXE puts it),
# streams its console here and waits until it powers off. Sets $console to
# the file holding the console.
boots=0
boot_node() {
  local name=$1 mac=$2 append rc=0 t0=$SECONDS
  append="$(sed -n 's/^kernel vmlinuz //p' "$boot/boot.ipxe")"
  # shellcheck disable=SC2016  # iPXE's variable, literally
  append="${append//'${net0/mac:hexhyp}'/${mac//:/-}}"
  boots=$((boots + 1))
  console="$work/console-$boots-$name.log"
  local qemu=(qemu-system-x86_64 -accel "$accel" -m 512 -smp 1 -no-reboot
    -display none -monitor none -serial stdio
    -nic "user,model=virtio-net-pci,mac=$mac"
    -kernel "$boot/vmlinuz" -initrd "$boot/initrd.img" -append "$append")
  local shown="${qemu[*]:0:${#qemu[@]}-1}"
  echo "   \$ ${shown//$boot\//} \"$append\""
  timeout --foreground "$boot_timeout" "${qemu[@]}" -pidfile "$work/qemu.pid" </dev/null |
    sed -u "s/\r\$//; s/^/   $name | /" | tee "$console" || rc=$?
  [ "$rc" = 124 ] && fail "node $name did not power off within $boot_timeout s (console above)"
  [ "$rc" = 0 ] || fail "qemu exited with status $rc (node $name)"
  grep -q "init: powering off" "$console" ||
    fail "node $name did not get to the example's /sbin/init (console above)"
  echo "   (node $name: $((SECONDS - t0)) s from qemu's start to power-off)"
}

echo "== 4. node A boots with no disk: its root is its own view of 'demo', over NBD"
boot_node A 52:54:00:12:34:56
grep -q "this is boot number 1 of this node" "$console" || fail "node A's first boot did not count 1"

echo "== 5. node A boots again: what it wrote is still there"
boot_node A 52:54:00:12:34:56
grep -q "this is boot number 2 of this node" "$console" || fail "node A's second boot did not count 2"
grep -q "boot-1.txt: written by boot 1 of node" "$console" ||
  fail "node A's second boot did not find the first boot's /var/lib/demo/boot-1.txt"

echo "== 6. the admin edits the root and rebuilds it (incremental); a new node B boots"
echo "Welcome to generation 2 of the nbdroot example, built after node A's boots." >"$tree/etc/motd"
gen2="$("$ib" -q --store "$store" build demo --from "$tree" | tail -1)"
"$ib" -q --store "$store" publish demo "$gen2" >/dev/null
"$ib" --store "$store" list demo | indent
boot_node B 52:54:00:12:34:57
grep -q "Welcome to generation 2" "$console" || fail "node B did not boot the new generation"

echo "== nbdserver admin list: the nodes, the generation each is pinned to, the bytes each changed"
"$server" admin --store "$store" list | indent
dirty() { "$server" admin --store "$store" list | awk -v n="$1" '$1 == n { print $5 " " $6 }'; }

cat <<EOF
== Summary ($SECONDS s)
   Image 'demo': $gen1 (examples/rootfs + busybox + Debian's kernel $kver),
   then $gen2 (/etc/motd edited: a delta over it).
   Node A (MAC 52:54:00:12:34:56) booted twice in a qemu VM with no disk: kernel and
   initrd from 'imagebuilder boot', root over NBD from nbdserver. Its second boot
   found what the first wrote (boot counter 2, boot-1.txt), kept in node A's own
   copy-on-write view ($(dirty 52-54-00-12-34-56) changed), still on $gen1.
   Node B booted after the rebuild and got $gen2 ($(dirty 52-54-00-12-34-57) changed).
EOF

if [ "$keep" = 1 ]; then
  echo "== serving nbd://127.0.0.1:$port (exports demo, demo@GEN, demo/NODE; boot files in $boot) until Ctrl-C"
  wait "$pid"
fi
