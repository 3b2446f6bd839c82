"""The dracut module's command-line hook (initrd-hooks/dracut/95nbdroot/
nbdroot-parse.sh) run outside dracut, with dracut-lib's functions and
/sbin/initqueue stubbed: what it hands to dracut (issue 5, scenario 8, the
unit-test half). No VM, no dracut needed."""

import os
import subprocess

import pytest

HOOKS = os.path.join(os.path.dirname(__file__), "..", "..", "initrd-hooks")
PARSE = os.path.join(HOOKS, "dracut", "95nbdroot", "nbdroot-parse.sh")
LIB = os.path.join(HOOKS, "lib", "cmdline.sh")

STUBS = r'''
getcmdline() { printf '%s\n' "$CMDLINE"; }
info() { echo "INFO $*"; }
warn() { echo "WARN $*"; }
die() { echo "DIE $*"; exit 3; }
'''


def run_hook(tmp_path, cmdline, shell=("/bin/sh",)):
    """Sources the hook as dracut does; returns (exit status, vars, output)."""
    lib = tmp_path / "lib" / "nbdroot"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "cmdline.sh").write_text(open(LIB).read())
    hookdir = tmp_path / "hooks"
    (hookdir / "initqueue" / "finished").mkdir(parents=True, exist_ok=True)
    hook = open(PARSE).read().replace("/lib/nbdroot/cmdline.sh", str(lib / "cmdline.sh"))
    queue = tmp_path / "initqueue"
    queue.write_text('#!/bin/sh\necho "QUEUE $*"\n')
    queue.chmod(0o755)
    script = (STUBS + hook + '\necho "VAR root=$root"; '
              'echo "VAR rootok=$rootok"; echo "VAR fstype=$fstype"; echo "VAR rflags=$rflags"\n')
    env = dict(os.environ, CMDLINE=cmdline, hookdir=str(hookdir), nbdroot_initqueue=str(queue))
    p = subprocess.run(list(shell) + ["-c", script], capture_output=True, text=True, env=env,
                       timeout=30)
    out = p.stdout + p.stderr
    vars_ = dict(l[4:].split("=", 1) for l in p.stdout.splitlines() if l.startswith("VAR "))
    finished = (hookdir / "initqueue" / "finished" / "nbdroot.sh")
    return p.returncode, vars_, out, finished.read_text() if finished.exists() else None


SHELLS = [s for s in (("/bin/sh",), ("/bin/bash",), ("/bin/busybox", "sh")) if os.path.exists(s[0])]


@pytest.fixture(params=SHELLS, ids=lambda s: " ".join(s))
def shell(request):
    return request.param


@pytest.mark.parametrize("cmdline,fstype,rflags", [
    ("root=nbd:10.0.2.2:10809/lab ip=dhcp", "ext4", ""),
    ("root=nbd:srv:1234/lab/n1:xfs:noatime", "xfs", "noatime"),
    ("nbdroot=srv/lab nbdroot.servers=b,c", "ext4", ""),
    ("root=/dev/nbd0 nbdroot=srv/lab", "ext4", ""),
    ("root=nbd:[fd00::1]:10809/lab", "ext4", ""),
])
def test_takes_over_the_root(tmp_path, shell, cmdline, fstype, rflags):
    rc, v, out, finished = run_hook(tmp_path, cmdline, shell)
    assert rc == 0, out
    assert "QUEUE --settled --onetime --unique --name nbdroot-attach /sbin/nbdroot-attach" in out
    assert v["root"] == "block:/dev/root"
    assert v["rootok"] == "1"
    assert v["fstype"] == fstype
    assert v["rflags"] == rflags
    assert finished.strip() == "[ -e /dev/root ]"
    assert "INFO nbdroot: root from" in out


@pytest.mark.parametrize("cmdline", ["root=/dev/sda1 ro", "root=UUID=abc", "", "ip=dhcp"])
def test_leaves_other_roots_alone(tmp_path, shell, cmdline):
    rc, v, out, finished = run_hook(tmp_path, cmdline, shell)
    assert rc == 0, out
    assert v["rootok"] == "" and finished is None and "QUEUE" not in out


@pytest.mark.parametrize("cmdline,why", [
    ("root=nbd:srv:0/lab", "bad server"),
    ("nbdroot=srv/lab nbdroot.mode=sometimes", "nbdroot.mode"),
    ("root=nbd:srv:10809", "bad image"),
])
def test_malformed_stops_the_boot_with_a_reason(tmp_path, shell, cmdline, why):
    rc, v, out, finished = run_hook(tmp_path, cmdline, shell)
    assert rc == 3, out
    assert "DIE nbdroot: bad kernel command line:" in out and why in out
