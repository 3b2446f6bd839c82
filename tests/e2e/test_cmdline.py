"""initrd-hooks/lib/cmdline.sh, the kernel command-line parser of all three
initrds, run under /bin/sh (dash) and busybox sh with accepted and
malformed command lines (issue 5, scenario 9). No VM needed."""

import os
import shutil
import subprocess

import pytest

LIB = os.path.join(os.path.dirname(__file__), "..", "..", "initrd-hooks", "lib", "cmdline.sh")

SHELLS = [s for s in (["/bin/sh"], ["/bin/busybox", "sh"], ["/bin/dash"])
          if os.path.exists(s[0])]


def parse(cmdline, shell):
    script = '. "$1"; nbdroot_parse "$2"; rc=$?; nbdroot_dump; echo RC=$rc'
    p = subprocess.run(shell + ["-c", script, "sh", LIB, cmdline], capture_output=True,
                       text=True, timeout=30)
    assert p.stderr == "", p.stderr
    out = dict(l.split("=", 1) for l in p.stdout.splitlines() if "=" in l)
    return int(out.pop("RC")), {k[len("NBDROOT_"):]: v for k, v in out.items()}


# (command line, expected fields); every field not named has its default.
ACCEPTED = [
    ("nbdroot=10.0.2.2:10810/lab ip=dhcp panic=5",
     dict(SERVERS="10.0.2.2:10810", IMAGE="lab", NODE="", EXPORT="", PANIC="5",
          IP_METHOD="dhcp", MODE="persistent")),
    ("nbdroot=server/lab", dict(SERVERS="server:10809", IMAGE="lab")),
    # The verification initrd's parameters pass (a server's --boot-cmdline
    # may give them to every boot).
    ("nbdroot=server/lab nbdroot.memtester_mask=0x1 nbdroot.stress=8 nbdroot.reserve=32 "
     "nbdroot.after=poweroff nbdroot.memtester_loops=1 nbdroot.fake_memtester_fail=1",
     dict(SERVERS="server:10809", IMAGE="lab")),
    ("nbdroot=server.example.org:1/lab-1.x_y", dict(SERVERS="server.example.org:1",
                                                    IMAGE="lab-1.x_y")),
    ("nbdroot=10.0.0.1:65535/lab/node7", dict(SERVERS="10.0.0.1:65535", NODE="node7",
                                              EXPORT="lab/node7")),
    ("nbdroot=[fd00::1]:10809/lab", dict(SERVERS="[fd00::1]:10809")),
    ("nbdroot=[fd00::1]/lab", dict(SERVERS="[fd00::1]:10809")),
    ("nbdroot=h/lab nbdroot.node=52-54-00-12-34-56",
     dict(NODE="52-54-00-12-34-56", EXPORT="lab/52-54-00-12-34-56")),
    ("nbdroot=h/lab/n1 nbdroot.node=n1", dict(NODE="n1", EXPORT="lab/n1")),
    ("nbdroot=h:7/lab nbdroot.servers=a,b:8,[fd00::2],c:9",
     dict(SERVERS="h:7 a:7 b:8 [fd00::2]:7 c:9")),
    ("nbdroot=h/lab nbdroot.servers=h,a", dict(SERVERS="h:10809 a:10809")),
    ("nbdroot=h/lab nbdroot.mode=ephemeral", dict(MODE="ephemeral", MODE_GIVEN="1")),
    ("nbdroot=h/lab nbdroot.mode=persistent", dict(MODE="persistent", MODE_GIVEN="1")),
    ("nbdroot=h/lab nbdroot.retries=1 nbdroot.timeout=0", dict(RETRIES="1", TIMEOUT="0")),
    ("nbdroot=h/lab nbdroot.retries=100 nbdroot.timeout=86400", dict(RETRIES="100",
                                                                     TIMEOUT="86400")),
    ("nbdroot=h/lab nbdroot.shell", dict(SHELL="1")),
    ("nbdroot=h/lab nbdroot.shell=1 nbdroot.shell=0", dict(SHELL="0")),
    ("nbdroot=h/lab nbdroot.netlink=0 nbdroot.blocksize=4096", dict(NETLINK="0",
                                                                    BLOCKSIZE="4096")),
    ("nbdroot=h/lab panic=-1", dict(PANIC="-1")),
    # the node agent
    ("nbdroot=h/lab nbdroot.tracker=10.0.2.2:8080",
     dict(AGENT="on", PEERS="on", TRACKER="10.0.2.2:8080", CACHE="64M", PEER_PORT="10809")),
    ("nbdroot=h/lab nbdroot.tracker=[fd00::1]:80 nbdroot.peer_port=20000 nbdroot.cache=1G",
     dict(TRACKER="[fd00::1]:80", PEER_PORT="20000", CACHE="1G")),
    ("nbdroot=h/lab nbdroot.cache=0 nbdroot.peers=off", dict(CACHE="0", PEERS="off")),
    ("nbdroot=h/lab nbdroot.cache=65536 nbdroot.cache=512K", dict(CACHE="512K")),
    ("nbdroot=h/lab nbdroot.agent=off nbdroot.agent=on nbdroot.agent=off", dict(AGENT="off")),
    ("nbdroot=h/lab ro rootfstype=ext3 rootflags=noatime",
     dict(RO="1", FSTYPE="ext3", FSOPTS="noatime")),
    ("nbdroot=h/lab ro rw", dict(RO="0")),
    ("nbdroot=a/one nbdroot=b/two", dict(SERVERS="b:10809", IMAGE="two")),
    ("quiet  nbdroot=h/lab   splash init=/bin/sh", dict(IMAGE="lab")),
    # the kernel's ip=
    ("nbdroot=h/lab ip=off", dict(IP_METHOD="off")),
    ("nbdroot=h/lab ip=10.0.2.15::10.0.2.2:255.255.255.0:node:eth0:off",
     dict(IP_METHOD="static", IP_ADDR="10.0.2.15", IP_GW="10.0.2.2", IP_MASK="255.255.255.0",
          IP_DEV="eth0")),
    ("nbdroot=h/lab ip=10.0.2.15:::::eth1:none:10.0.2.3",
     dict(IP_METHOD="static", IP_ADDR="10.0.2.15", IP_DEV="eth1", IP_DNS="10.0.2.3")),
    ("nbdroot=h/lab ip=:::::eth1:dhcp", dict(IP_METHOD="dhcp", IP_DEV="eth1")),
    ("nbdroot=h/lab ip=eth0:dhcp", dict(IP_METHOD="dhcp", IP_DEV="eth0")),
    # dracut's root=nbd:
    ("root=nbd:10.0.2.2:10809/lab", dict(SERVERS="10.0.2.2:10809", IMAGE="lab",
                                         FSTYPE="ext4")),
    ("root=nbd:srv:10809/lab:xfs", dict(IMAGE="lab", FSTYPE="xfs")),
    ("root=nbd:srv:10809/lab/n2:ext4:noatime,discard",
     dict(NODE="n2", FSTYPE="ext4", FSOPTS="noatime,discard")),
    ("root=nbd:[fd00::1]:10809/lab", dict(SERVERS="[fd00::1]:10809")),
    ("root=nbd:srv/lab", dict(SERVERS="srv:10809")),
    ("root=nbd:srv:1/lab nbdroot=other:2/img", dict(SERVERS="other:2", IMAGE="img")),
    ("root=/dev/nbd0 nbdroot=srv/lab", dict(IMAGE="lab")),
]

MALFORMED = [
    ("nbdroot=", "expected <server>"),
    ("nbdroot=server", "expected <server>"),
    ("nbdroot=/lab", "bad server"),
    ("nbdroot=server/", "bad image"),
    ("nbdroot=server:/lab", "bad server"),
    ("nbdroot=server:0/lab", "bad server"),
    ("nbdroot=server:65536/lab", "bad server"),
    ("nbdroot=server:080/lab", "bad server"),
    ("nbdroot=server:1x/lab", "bad server"),
    ("nbdroot=fd00::1/lab", "bad server"),
    ("nbdroot=[fd00::1/lab", "bad server"),
    ("nbdroot=[]:1/lab", "bad server"),
    ("nbdroot=[zz::1]/lab", "bad server"),
    ("nbdroot=ser_ver/lab", "bad server"),
    ("nbdroot=-server/lab", "bad server"),
    ("nbdroot=a..b/lab", "bad server"),
    ("nbdroot=server/.lab", "bad image"),
    ("nbdroot=server/la:b", "bad image"),
    ("nbdroot=server/lab/", "bad node"),
    ("nbdroot=server/lab/a/b", "bad export"),
    ("nbdroot=server/lab/n*", "bad node"),
    ("nbdroot=server/" + "x" * 201, "bad image"),
    ("nbdroot=h/lab nbdroot.node=", "bad node id"),
    ("nbdroot=h/lab nbdroot.node=a/b", "bad node id"),
    ("nbdroot=h/lab nbdroot.node=..", "bad node id"),
    ("nbdroot=h/lab/n1 nbdroot.node=n2", "but nbdroot.node=n2"),
    ("nbdroot=h/lab nbdroot.servers=a,,b", "empty entry"),
    ("nbdroot=h/lab nbdroot.servers=a:0", "bad server 'a:0'"),
    ("nbdroot=h/lab nbdroot.servers=a/b", "bad server"),
    ("nbdroot=h/lab nbdroot.mode=temporary", "nbdroot.mode"),
    ("nbdroot=h/lab nbdroot.mode=", "nbdroot.mode"),
    ("nbdroot=h/lab nbdroot.retries=0", "nbdroot.retries"),
    ("nbdroot=h/lab nbdroot.retries=101", "nbdroot.retries"),
    ("nbdroot=h/lab nbdroot.retries=x", "nbdroot.retries"),
    ("nbdroot=h/lab nbdroot.timeout=-1", "nbdroot.timeout"),
    ("nbdroot=h/lab nbdroot.timeout=1000000", "nbdroot.timeout"),
    ("nbdroot=h/lab nbdroot.shell=maybe", "nbdroot.shell"),
    ("nbdroot=h/lab nbdroot.netlink=2", "nbdroot.netlink"),
    ("nbdroot=h/lab nbdroot.blocksize=300", "nbdroot.blocksize"),
    ("nbdroot=h/lab nbdroot.frobnicate=1", "unknown parameter 'nbdroot.frobnicate'"),
    ("nbdroot=h/lab panic=soon", "panic="),
    ("nbdroot=h/lab nbdroot.agent=yes", "nbdroot.agent: expected on or off"),
    ("nbdroot=h/lab nbdroot.peers=", "nbdroot.peers: expected on or off"),
    ("nbdroot=h/lab nbdroot.tracker=10.0.2.2", "nbdroot.tracker: expected <host>:<port>"),
    ("nbdroot=h/lab nbdroot.tracker=", "nbdroot.tracker"),
    ("nbdroot=h/lab nbdroot.tracker=h:0", "nbdroot.tracker"),
    ("nbdroot=h/lab nbdroot.tracker=a/b:1", "nbdroot.tracker"),
    ("nbdroot=h/lab nbdroot.peer_port=0", "nbdroot.peer_port: expected 1-65535"),
    ("nbdroot=h/lab nbdroot.peer_port=65536", "nbdroot.peer_port"),
    ("nbdroot=h/lab nbdroot.peer_port=", "nbdroot.peer_port"),
    ("nbdroot=h/lab nbdroot.cache=", "nbdroot.cache: expected a size"),
    ("nbdroot=h/lab nbdroot.cache=64MB", "nbdroot.cache: expected a size"),
    ("nbdroot=h/lab nbdroot.cache=M", "nbdroot.cache: expected a size"),
    ("nbdroot=h/lab nbdroot.cache=-1", "nbdroot.cache: expected a size"),
    ("nbdroot=h/lab nbdroot.cache=0x10", "nbdroot.cache: expected a size"),
    ("nbdroot=h/lab nbdroot.cache=1*", "nbdroot.cache: expected a size"),
    ("nbdroot=h/lab nbdroot.cache=9999999999999", "nbdroot.cache: too large"),
    ("nbdroot=h/lab rootfstype=Ext4!", "bad filesystem type"),
    ("nbdroot=h/lab ip=bogus", "ip=: unknown value"),
    ("nbdroot=h/lab ip=10.0.2.300:::::eth0:off", "bad IPv4 address"),
    ("nbdroot=h/lab ip=1.2.3:::::eth0:off", "bad IPv4 address"),
    ("nbdroot=h/lab ip=::10.0.2.2::::off", "without an address"),
    ("nbdroot=h/lab ip=10.0.2.15:::::eth0:magic", "unknown autoconf"),
    ("root=nbd:", "bad server"),
    ("root=nbd:srv:10809", "bad image"),
    ("root=nbd:srv:99999/lab", "bad server"),
    ("root=nbd:srv:10809/lab/x/y:ext4", "bad export"),
    ("nbdroot.node=x", "without nbdroot= or root=nbd:"),
    ("nbdroot.servers=a,b", "without nbdroot= or root=nbd:"),
    ("nbdroot.tracker=a:1", "without nbdroot= or root=nbd:"),
]

NOT_OURS = ["", "root=/dev/sda1 ro quiet", "root=UUID=1234 nbd=1", "ip=dhcp panic=5",
            "nbdroot.shell"]


@pytest.fixture(params=SHELLS, ids=lambda s: " ".join(s))
def shell(request):
    return request.param


@pytest.mark.parametrize("cmdline,expected", ACCEPTED, ids=[c for c, _ in ACCEPTED])
def test_accepted(shell, cmdline, expected):
    rc, got = parse(cmdline, shell)
    assert rc == 0, f"rejected: {got.get('ERROR')}"
    assert got["ERROR"] == ""
    for k, v in expected.items():
        assert got[k] == v, f"{k}: {got[k]!r} != {v!r} (all: {got})"


@pytest.mark.parametrize("cmdline,why", MALFORMED, ids=[c[:60] for c, _ in MALFORMED])
def test_malformed(shell, cmdline, why):
    rc, got = parse(cmdline, shell)
    assert rc == 2, f"accepted: {got}"
    assert why in got["ERROR"], got["ERROR"]


@pytest.mark.parametrize("cmdline", NOT_OURS)
def test_not_for_us(shell, cmdline):
    rc, got = parse(cmdline, shell)
    assert rc == 1, got


def test_defaults(shell):
    rc, got = parse("nbdroot=h/lab", shell)
    assert rc == 0
    assert got == dict(SERVERS="h:10809", IMAGE="lab", NODE="", EXPORT="", FSTYPE="ext4",
                       FSOPTS="", RO="0", MODE="persistent", MODE_GIVEN="0", RETRIES="5", TIMEOUT="0",
                       SHELL="0", PANIC="", NETLINK="1", BLOCKSIZE="", AGENT="on", PEERS="on",
                       TRACKER="", CACHE="64M", PEER_PORT="10809", IP="",
                       IP_METHOD="dhcp", IP_ADDR="", IP_GW="", IP_MASK="", IP_DEV="",
                       IP_DNS="", ERROR="")


NODE_LIB = os.path.join(os.path.dirname(LIB), "node.sh")


@pytest.mark.parametrize("cmdline,name", [
    ("nbdroot=h/lab/n1", "lab/n1"),
    ("nbdroot=h/lab/n1 nbdroot.mode=ephemeral", "lab/n1?mode=ephemeral"),
    ("nbdroot=h/lab/n1 nbdroot.mode=persistent", "lab/n1?mode=persistent"),
    ("nbdroot=h/lab/n1 nbdroot.mode=ephemeral nbdroot=h/lab/n2", "lab/n2?mode=ephemeral")])
def test_attach_name(shell, cmdline, name):
    """The export name nbd-client asks for tells the server the node's mode
    only when the command line gave one (node.sh, nbdroot_attach_name)."""
    script = '. "$1"; . "$2"; nbdroot_parse "$3" || exit 9; nbdroot_attach_name'
    p = subprocess.run(shell + ["-c", script, "sh", LIB, NODE_LIB, cmdline], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == name


@pytest.mark.parametrize("mac,expected", [
    ("52:54:00:12:34:56", "52-54-00-12-34-56"),
    ("52:54:00:AB:cd:EF", "52-54-00-ab-cd-ef"),
    ("52:54:00:12:34", None), ("", None), ("52-54-00-12-34-56", None),
    ("g2:54:00:12:34:56", None)])
def test_mac_to_node_id(shell, mac, expected):
    p = subprocess.run(shell + ["-c", '. "$1"; nbdroot_mac_to_id "$2"', "sh", LIB, mac],
                       capture_output=True, text=True, timeout=30)
    if expected is None:
        assert p.returncode != 0 and p.stdout == ""
    else:
        assert p.returncode == 0 and p.stdout.strip() == expected


def test_glob_characters_do_not_expand(shell, tmp_path):
    """A '*' on the command line is not matched against files."""
    (tmp_path / "lab").write_text("")
    p = subprocess.run(shell + ["-c", '. "$1"; nbdroot_parse "nbdroot=h/l*"; echo "$NBDROOT_ERROR"',
                                "sh", LIB], capture_output=True, text=True, timeout=30,
                       cwd=tmp_path)
    assert "bad image name 'l*'" in p.stdout
