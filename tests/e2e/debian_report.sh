#!/bin/sh
# Run by e2e-report.service in the Debian test tree once systemd reached
# multi-user.target: reports on the serial console (lines "E2E: ...") and
# powers off. Scenario 7 reads these lines.
exec >/dev/ttyS0 2>&1
# A fresh line first: systemd may have left a status line open on the
# console (no newline yet) when the boot was slow.
echo
echo "E2E: systemd up, kernel $(uname -r), root $(findmnt -no SOURCE,FSTYPE,OPTIONS /)"
sed 's/^/E2E: state /' /run/nbdroot/state
for p in /proc/[0-9]*; do
	c=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null)
	case $c in *bd-client* | *bdroot-keeper*) echo "E2E: process ${p#/proc/} $c" ;; esac
done
echo "E2E: system $(systemctl is-system-running)"
for f in /root/*.txt; do [ -f "$f" ] && echo "E2E: marker ${f##*/}=$(cat "$f")"; done
for w in $(cat /proc/cmdline); do
	case $w in e2e.write=*:*) v=${w#e2e.write=}; echo "${v#*:}" >"/root/${v%%:*}"; echo "E2E: wrote ${v%%:*}" ;; esac
done
sync
echo "E2E: done"
systemctl poweroff
