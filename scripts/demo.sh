#!/usr/bin/env bash
# The built-in example, end to end on one machine: a node with no disk boots
# in a qemu VM from an image that nbdserver serves; its console shows here.
#   1. Debian's kernel package is downloaded once (apt-get download) and
#      unpacked (dpkg -x) into a cache; it is never installed on this host;
#   2. examples/rootfs, plus busybox and that kernel (/boot, /lib/modules),
#      becomes generation 1 of image "demo" in a fresh store (imagebuilder
#      build, publish);
#   3. nbdserver serves the store on 127.0.0.1 (qemu's user network lets the
#      VM reach this host as 10.0.2.2), over NBD and HTTP, with new nodes
#      verified before they get their root (--new-nodes verify);
#      imagebuilder boot writes the node's kernel, initrd
#      (initrd-hooks/mkinitrd.sh) and the verification initrd
#      (initrd-hooks/mkverify.sh) into the store, and boot.ipxe for step 5;
#   4. node A is new: its firmware's iPXE is handed one URL by DHCP,
#      http://SERVER/boot/${net0/mac:hexhyp}.ipxe, and the server decides the
#      rest: A is `new`, so it boots the verification initrd (memtester over
#      its free RAM, EDAC counters, the inventory), which reports to the
#      server and reboots; A is `ready` now, and its next script boots its
#      root: its initrd attaches node A's own copy-on-write view
#      demo/52-54-00-12-34-56 over NBD and switches into it; the example's
#      /sbin/init (examples/rootfs/sbin/init) shows the root, counts the boot
#      in /var/lib/demo and powers off; the report's summary is shown;
#   5. node A boots again (kernel and initrd handed to qemu as boot.ipxe
#      says) and finds what it wrote: boot number 2;
#   6. the root is edited and rebuilt (an incremental generation); a new
#      node B boots it, node A stays on the generation it started with;
#      node B stays up, its node agent serving the blocks it read;
#   7. node C boots the same generation and reads most of its root's blocks
#      from node B (the server's tracker names B; each 64 KiB chunk is
#      checked against the generation's SHA-256 digests).
# Nodes B and C share a virtual network (a bridge in a network namespace
# the demo makes and removes: needs root; without it node B boots on
# qemu's user network and step 7 is skipped). Every VM and nbdserver run
# in that namespace then.
# Nodes B and C are registered by the admin (admin create), which vouches
# for them: they attach without a verification run.
# Each boot must end within $NBDROOT_DEMO_BOOT_TIMEOUT seconds (180; twice
# that for node A's verification and boot). qemu
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
ns=""
cleanup() {
  [ -s "$work/qemu.pid" ] && kill "$(cat "$work/qemu.pid")" 2>/dev/null
  [ -s "$work/qemu-bg.pid" ] && kill "$(cat "$work/qemu-bg.pid")" 2>/dev/null
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  [ -n "$ns" ] && ip netns delete "$ns" 2>/dev/null
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

# The peers' network: network namespace $ns, bridge br0 (10.0.3.1/24, where
# nbdserver also listens) and a tap device per peer VM. inns runs a command
# in it.
inns=()
serve=(--listen 127.0.0.1:0 --http 127.0.0.1:0)
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null; then
  ns="nbdroot-demo-$$"
  ip netns add "$ns" || fail "ip netns add $ns"
  inns=(ip netns exec "$ns")
  peers_net() {
    ip -n "$ns" link set lo up &&
      ip -n "$ns" link add br0 type bridge &&
      ip -n "$ns" addr add 10.0.3.1/24 dev br0 &&
      ip -n "$ns" link set br0 up || return 1
    for t in tapB tapC; do
      ip -n "$ns" tuntap add dev "$t" mode tap || return 1
      ip -n "$ns" link set "$t" master br0 up || return 1
    done
  }
  peers_net || fail "could not make the peers' network in namespace $ns"
  # The bridge's listener first: boot scripts name the server by the address
  # the node used (10.0.3.1 from inside the namespace) and the first port.
  serve=(--listen 10.0.3.1:0 --listen 127.0.0.1:0 --http 10.0.3.1:0)
fi

echo "== 3. nbdserver --store on 127.0.0.1 (NBD and HTTP); imagebuilder boot (kernel, initrd, verification initrd)"
# memtester runs one pattern (mask 0x1) so that the demo's emulated CPU
# gets through it in a minute; a lab leaves the mask out (all patterns).
"${inns[@]}" "$server" --store "$store" "${serve[@]}" --ready-file "$work/ready" \
  --new-nodes verify --boot-cmdline "console=ttyS0 quiet panic=5 no_timer_check nbdroot.memtester_mask=0x1" \
  2>>"$work/server.log" &
pid=$!
for _ in $(seq 100); do [ -s "$work/ready" ] && break; sleep 0.1; done
[ -s "$work/ready" ] || fail "nbdserver did not start"
port="$(grep '^127\.0\.0\.1:' "$work/ready")"
port="${port##*:}"
http="$(grep '^http://' "$work/ready")"
http="${http#http://}"
# What a node on qemu's user network calls the HTTP service.
case "$http" in 127.0.0.1:*) node_http="10.0.2.2:${http##*:}" ;; *) node_http="$http" ;; esac
echo "   listening on 127.0.0.1:$port: the VMs reach it as 10.0.2.2:$port"
if [ -n "$ns" ]; then
  bport="$(grep '^10\.0\.3\.1:' "$work/ready")"
  bport="${bport##*:}"
  tracker="$http"
  echo "   and, in network namespace $ns, on the bridge: 10.0.3.1:$bport, its tracker (HTTP) on $tracker"
fi
"$ib" -q --store "$store" boot demo --out "$boot" --server "10.0.2.2:$port" \
  --cmdline "console=ttyS0 quiet panic=5" 2>"$work/mkinitrd.log" | indent ||
  { cat "$work/mkinitrd.log" >&2; fail "imagebuilder boot"; }
grep '^kernel' "$boot/boot.ipxe" | sed 's/^/   boot.ipxe: /'
"$ib" -q --store "$store" boot demo --http-server "$node_http" 2>>"$work/mkinitrd.log" | indent ||
  { tail -n 20 "$work/mkinitrd.log" >&2; fail "imagebuilder boot (into the store)"; }
echo "   HTTP on $http; iPXE's chain line ($store/boot/chain.ipxe):"
grep '^chain' "$store/boot/chain.ipxe" | indent

# boot_node NAME MAC: boots a VM with no disk as iPXE would with boot.ipxe
# (its kernel, initrd and command line, with the MAC where iPXE puts it),
# streams its console here and waits until it powers off. Sets $console to
# the file holding the console.
# With PEER=IP (and the peers' network), the VM is on the bridge instead,
# at address IP, with its node agent on the tracker; with STAY=1 it stays up
# (demo.stay) in the background: boot_node returns once it says so.
boots=0
boot_node() {
  local name=$1 mac=$2 append rc=0 t0=$SECONDS nic
  append="$(sed -n 's/^kernel vmlinuz //p' "$boot/boot.ipxe")"
  # shellcheck disable=SC2016  # iPXE's variable, literally
  append="${append//'${net0/mac:hexhyp}'/${mac//:/-}}"
  nic=(-nic "user,model=virtio-net-pci,mac=$mac")
  if [ -n "${PEER:-}" ]; then
    append="${append/nbdroot=10.0.2.2:$port\//nbdroot=10.0.3.1:$bport/}"
    append="${append/ip=dhcp/ip=$PEER::10.0.3.1:255.255.255.0:::off} nbdroot.tracker=$tracker"
    nic=(-nic "tap,ifname=tap$name,script=no,downscript=no,model=virtio-net-pci,mac=$mac")
  fi
  [ "${STAY:-0}" = 1 ] && append="$append demo.stay"
  boots=$((boots + 1))
  console="$work/console-$boots-$name.log"
  local qemu=(qemu-system-x86_64 -accel "$accel" -m 512 -smp 1 -no-reboot
    -display none -monitor none -serial stdio "${nic[@]}"
    -kernel "$boot/vmlinuz" -initrd "$boot/initrd.img" -append "$append")
  local shown="${qemu[*]:0:${#qemu[@]}-1}"
  echo "   \$ ${shown//$boot\//} \"$append\""
  if [ "${STAY:-0}" = 1 ]; then
    "${inns[@]}" timeout --foreground "$boot_timeout" "${qemu[@]}" -pidfile "$work/qemu-bg.pid" \
      </dev/null 2>&1 | sed -u "s/\r\$//; s/^/   $name | /" | tee "$console" &
    bg_pipe=$!
    until grep -q "init: staying up" "$console" 2>/dev/null; do
      kill -0 "$bg_pipe" 2>/dev/null || fail "node $name stopped before it got to the example's /sbin/init (console above)"
      [ $((SECONDS - t0)) -gt "$boot_timeout" ] && fail "node $name did not come up within $boot_timeout s"
      sleep 0.5
    done
    echo "   (node $name: $((SECONDS - t0)) s from qemu's start to its /sbin/init; it stays up)"
    return 0
  fi
  "${inns[@]}" timeout --foreground "$boot_timeout" "${qemu[@]}" -pidfile "$work/qemu.pid" </dev/null |
    sed -u "s/\r\$//; s/^/   $name | /" | tee "$console" || rc=$?
  [ "$rc" = 124 ] && fail "node $name did not power off within $boot_timeout s (console above)"
  [ "$rc" = 0 ] || fail "qemu exited with status $rc (node $name)"
  grep -q "init: powering off" "$console" ||
    fail "node $name did not get to the example's /sbin/init (console above)"
  echo "   (node $name: $((SECONDS - t0)) s from qemu's start to power-off)"
}

echo "== 4. node A is new: iPXE over HTTP, verification, report; then, ready, its root over NBD"
# shellcheck disable=SC2016  # iPXE's variable, literally
url='http://'"$node_http"'/boot/${net0/mac:hexhyp}.ipxe'
console="$work/console-A-http.log"
qemu=(qemu-system-x86_64 -accel "$accel" -m 512 -smp 2 -display none -monitor none
  -serial stdio -boot n -nic "user,model=virtio-net-pci,mac=52:54:00:12:34:56,bootfile=$url")
echo "   \$ ${qemu[*]}"
t0=$SECONDS
rc=0
"${inns[@]}" timeout --foreground $((2 * boot_timeout)) "${qemu[@]}" -pidfile "$work/qemu.pid" \
  </dev/null | sed -u "s/\r\$//; s/^/   A | /" | tee "$console" || rc=$?
[ "$rc" = 124 ] && fail "node A did not get through verification and boot within $((2 * boot_timeout)) s (console above)"
[ "$rc" = 0 ] || fail "qemu exited with status $rc (node A)"
grep -q "nbdroot-verify: report accepted" "$console" || fail "node A's verification report was not taken (console above)"
grep -q "this is boot number 1 of this node" "$console" || fail "node A's first boot did not count 1"
echo "   (node A: $((SECONDS - t0)) s from power-on through verification to power-off)"
echo "   its life, from the store (nbdserver admin list):"
"$server" admin --store "$store" list | awk 'NR == 1 || $1 == "52-54-00-12-34-56"' | indent
python3 -c 'import json, sys
s = json.load(open(sys.argv[1]))
print(" -> ".join([s["history"][0]["from"]] + [c["to"] for c in s["history"]]))' \
  "$store/nodes/52-54-00-12-34-56/state.json" | sed 's/^/   states: /'
echo "   its verification report (nbdserver admin report 52-54-00-12-34-56):"
"$server" admin --store "$store" report 52-54-00-12-34-56 | indent

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
# The admin registers B and C: registered nodes skip verification.
"$server" admin --store "$store" create 52-54-00-12-34-57 52-54-00-12-34-58 --image demo | indent
if [ -n "$ns" ]; then
  PEER=10.0.3.11 STAY=1 boot_node B 52:54:00:12:34:57
else
  boot_node B 52:54:00:12:34:57
fi
grep -q "Welcome to generation 2" "$console" || fail "node B did not boot the new generation"

peer_line="no peers: the peers' network needs root (a network namespace)"
if [ -n "$ns" ]; then
  echo "== 7. node C boots $gen2 too, beside node B: the tracker names B, C reads its clean blocks from B"
  PEER=10.0.3.12 boot_node C 52:54:00:12:34:58
  grep -q "Welcome to generation 2" "$console" || fail "node C did not boot the new generation"
  peer_line="$(sed -n 's/.*init: nbdroot-agent counters: //p' "$console" | python3 -c '
import json, sys
s = json.loads(sys.stdin.readline())
mib = lambda b: "%.1f MiB" % (b / 1048576)
print("node C read %s of its root from node B (peer), %s from the server" % (
    mib(s["gen_peer_bytes"]), mib(s["gen_server_bytes"] + s["view_read_bytes"])))
sys.exit(0 if s["gen_peer_bytes"] > 0 else 3)')" ||
    fail "node C read nothing from node B (${peer_line:-no agent counters on its console})"
  echo "   $peer_line"
  kill "$(cat "$work/qemu-bg.pid")"
  wait "$bg_pipe" 2>/dev/null || true
  rm -f "$work/qemu-bg.pid"
  echo "   (node B stopped)"
fi

echo "== nbdserver admin list: the nodes, the generation each is pinned to, the bytes each changed"
"$server" admin --store "$store" list | indent
dirty() { "$server" admin --store "$store" list | awk -v n="$1" '$1 == n { print $6 " " $7 }'; }

cat <<EOF
== Summary ($SECONDS s)
   Image 'demo': $gen1 (examples/rootfs + busybox + Debian's kernel $kver),
   then $gen2 (/etc/motd edited: a delta over it).
   Node A (MAC 52:54:00:12:34:56), new, was verified first (iPXE over HTTP, the
   verification initrd, its report: $("$server" admin --store "$store" report 52-54-00-12-34-56 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')),
   then booted twice in a qemu VM with no disk: kernel and initrd from
   'imagebuilder boot', root over NBD from nbdserver. Its second boot
   found what the first wrote (boot counter 2, boot-1.txt), kept in node A's own
   copy-on-write view ($(dirty 52-54-00-12-34-56) changed), still on $gen1.
   Node B booted after the rebuild and got $gen2 ($(dirty 52-54-00-12-34-57) changed).
   Peers: $peer_line.
EOF

if [ "$keep" = 1 ]; then
  echo "== serving nbd://127.0.0.1:$port (exports demo, demo@GEN, demo/NODE; boot files in $boot) until Ctrl-C"
  [ -n "$ns" ] && echo "   (in network namespace $ns: ip netns exec $ns nbdinfo --list nbd://127.0.0.1:$port)"
  wait "$pid"
fi
