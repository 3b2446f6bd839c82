#!/usr/bin/env bash
# The built-in example: builds nbdserver, makes a small ext4 image from
# examples/rootfs, serves it on a free loopback port and shows what real NBD
# clients see: the export list, the allocation map, and a file read back out
# of the served filesystem. Pass --keep to leave the server running.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
keep=0
[ "${1:-}" = "--keep" ] && keep=1

"$root/scripts/install-deps.sh"
"$root/scripts/build.sh" >/dev/null
server="$root/build/nbdserver/nbdserver"

work="$(mktemp -d /tmp/nbdroot-demo.XXXXXX)"
cleanup() { [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; true; }
trap cleanup EXIT

echo "== making a 64 MiB ext4 image of examples/rootfs in $work"
truncate -s 64M "$work/example.img"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -d "$root/examples/rootfs" \
  "$work/example.img"

cp --sparse=always "$work/example.img" "$work/example.img.rw"

echo "== starting nbdserver"
"$server" --listen 127.0.0.1:0 --ready-file "$work/ready" --log-level info \
  --export "example=$work/example.img,ro,desc=nbdroot example root filesystem" \
  --export "scratch=$work/example.img.rw" 2>"$work/server.log" &
pid=$!
for _ in $(seq 50); do [ -s "$work/ready" ] && break; sleep 0.1; done
[ -s "$work/ready" ] || { cat "$work/server.log"; echo "server did not start"; exit 1; }
addr="$(head -1 "$work/ready")"
echo "   listening on $addr (log: $work/server.log)"

echo "== nbdinfo --list nbd://$addr"
nbdinfo --list "nbd://$addr" | grep -E "export=|description|export-size|is_read_only"
echo "== allocation map of 'example' (data vs holes)"
nbdinfo --map "nbd://$addr/example" | head -8
echo "== copying the export back with nbdcopy and reading /etc/motd out of it"
nbdcopy "nbd://$addr/example" "$work/copy.img"
cmp "$work/example.img" "$work/copy.img" && echo "   the copy is byte-identical"
debugfs -R "cat /etc/motd" "$work/copy.img" 2>/dev/null
if [ "$keep" = 1 ]; then
  echo "== serving nbd://$addr/example until Ctrl-C"
  wait "$pid"
fi
