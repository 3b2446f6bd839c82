#!/bin/sh
# /sbin/init of the e2e test root (busybox). It reports on the console with
# lines starting "E2E: ", does what the e2e.* kernel parameters ask, then
# powers the VM off. Parameters:
#   e2e.write=NAME:TEXT  write TEXT into /data/NAME (synced)
#   e2e.ticks=N          N rounds of: write a 256 KiB file, sync, drop the
#                        caches, re-read and check every file written so far
#   e2e.tickwait=S       seconds between rounds (default 1)
#   e2e.files            list /data with checksums at the end
#   e2e.stay             after "done", stay up (the test kills the VM), the
#                        agent's counters on the console every second
# Also reports the uptime at its start and the memory (for bench/).
export PATH=/bin:/sbin
say() { echo "E2E: $*"; }
[ -r /proc/uptime ] || mount -t proc proc /proc
[ -d /sys/class ] || mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
say "init started, generation $(cat /etc/generation)"
say "uptime $(cut -d' ' -f1 /proc/uptime)"
say "mem $(awk '/^(MemTotal|MemFree|MemAvailable):/ { printf "%s %s kB ", $1, $2 }' /proc/meminfo)"
sed 's/^/E2E: state /' /run/nbdroot/state 2>/dev/null
ps -o pid,args | grep -e '[n]bd-client' -e '[b]droot-agent' | sed 's/^/E2E: process /'
mkdir -p /data
for f in /data/*.txt; do
	[ -f "$f" ] && say "marker ${f##*/}=$(cat "$f")"
done

ticks=0 wait=1 files=0
for w in $(cat /proc/cmdline); do
	case $w in
	e2e.write=*:*)
		v=${w#e2e.write=}
		echo "${v#*:}" >"/data/${v%%:*}" && sync && say "wrote ${v%%:*}" ;;
	e2e.ticks=*) ticks=${w#*=} ;;
	e2e.tickwait=*) wait=${w#*=} ;;
	e2e.files) files=1 ;;
	esac
done

i=1
while [ "$i" -le "$ticks" ]; do
	if ! dd if=/dev/urandom of=/data/tick.$i bs=64k count=4 2>/run/dd.err; then
		say "IO-ERROR tick $i write: $(cat /run/dd.err)"; break
	fi
	sha256sum /data/tick.$i >>/data/ticks.sha 2>/run/sha.err || { say "IO-ERROR tick $i sha: $(cat /run/sha.err)"; break; }
	sync || { say "IO-ERROR tick $i sync"; break; }
	echo 3 >/proc/sys/vm/drop_caches
	if ! sha256sum -c /data/ticks.sha >/run/check.out 2>&1; then
		say "IO-ERROR tick $i check: $(grep -v ': OK$' /run/check.out | head -n 3 | tr '\n' ' ')"
		break
	fi
	say "tick $i ok"
	i=$((i + 1))
	sleep "$wait"
done

if [ "$files" = 1 ] && [ -f /data/ticks.sha ]; then
	if sha256sum -c /data/ticks.sha >/run/check.out 2>&1; then
		say "files ok $(wc -l </data/ticks.sha)"
	else
		say "files BAD $(grep -v ': OK$' /run/check.out | head -n 3 | tr '\n' ' ')"
	fi
fi
if dmesg | grep -E 'I/O error|EXT4-fs error|Buffer I/O|blk_update_request|nbd0: Receive control failed|Connection timed out' >/run/kerr; then
	sed 's/^/E2E: kernel: /' /run/kerr | head -n 20
fi
[ -f /run/nbdroot/agent.stats ] && say "agent $(cat /run/nbdroot/agent.stats)"
say "done"
if grep -qw e2e.stay /proc/cmdline; then
	sync
	while :; do
		[ -f /run/nbdroot/agent.stats ] && say "agent $(cat /run/nbdroot/agent.stats)"
		sleep 1
	done
fi
sync
mount -o remount,ro / 2>/dev/null
sync
poweroff -f
