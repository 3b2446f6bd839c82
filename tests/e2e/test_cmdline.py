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


HEX = "00112233445566778899aabbccddeeff" * 2
KEY = "n1:" + HEX

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
    # the tls tier: the key's node may be the one the MAC gives (checked later)
    (f"nbdroot=h/lab/n1 nbdroot.tls=require nbdroot.key={KEY}",
     dict(TLS="require", KEY_ID="n1", AGENT="on", NODE="n1")),
    (f"nbdroot=h/lab nbdroot.key=52-54-00-12-34-56:{HEX.upper()} nbdroot.tls=require",
     dict(TLS="require", KEY_ID="52-54-00-12-34-56", NODE="")),
    (f"nbdroot=h/lab nbdroot.agent=off nbdroot.tls=require nbdroot.key={KEY}",
     dict(TLS="require", AGENT="on")),
    ("nbdroot=h/lab nbdroot.tls=require nbdroot.tls=off", dict(TLS="off", KEY_ID="")),
    # what a boot script under --tls require appends to an admin's line
    (f"nbdroot=h/lab/n1 nbdroot.tls=off ip=dhcp nbdroot.tls=require nbdroot.key={KEY}",
     dict(TLS="require", KEY_ID="n1")),
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
    ("nbdroot=h/lab nbdroot.tls=on", "nbdroot.tls: expected off or require, got 'on'"),
    ("nbdroot=h/lab nbdroot.tls=", "nbdroot.tls: expected off or require"),
    ("nbdroot=h/lab nbdroot.tls=require", "this boot got no key"),
    ("nbdroot=h/lab nbdroot.tls=require nbdroot.key=", "expected NODE:HEX"),
    (f"nbdroot=h/lab nbdroot.key={KEY}", "nbdroot.key= is for nbdroot.tls=require"),
    (f"nbdroot=h/lab nbdroot.tls=off nbdroot.key={KEY}", "is for nbdroot.tls=require"),
    (f"nbdroot=h/lab nbdroot.tls=require nbdroot.key={HEX}", "expected NODE:HEX"),
    (f"nbdroot=h/lab nbdroot.tls=require nbdroot.key=:{HEX}", "NODE is not a node id"),
    (f"nbdroot=h/lab nbdroot.tls=require nbdroot.key=n/1:{HEX}", "NODE is not a node id"),
    (f"nbdroot=h/lab nbdroot.tls=require nbdroot.key=n1:{HEX[2:]}", "62 hex digits, not 64"),
    (f"nbdroot=h/lab nbdroot.tls=require nbdroot.key=n1:{HEX}00", "66 hex digits, not 64"),
    (f"nbdroot=h/lab nbdroot.tls=require nbdroot.key=n1:{HEX[:-1]}g", "is not hex digits"),
    (f"nbdroot=h/lab nbdroot.tls=require nbdroot.key=n1:{HEX}:{HEX}", "is not hex digits"),
    (f"nbdroot=h/lab/n2 nbdroot.tls=require nbdroot.key={KEY}",
     "nbdroot.key is for node 'n1', and this node is 'n2'"),
    (f"nbdroot=h/lab nbdroot.node=n2 nbdroot.tls=require nbdroot.key={KEY}",
     "nbdroot.key is for node 'n1', and this node is 'n2'"),
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
    # A message goes to the console: it never quotes the key.
    assert HEX[:16] not in got["ERROR"] and HEX[2:18] not in got["ERROR"], got["ERROR"]


def test_the_key_is_kept_but_not_dumped(shell):
    script = '. "$1"; nbdroot_parse "$2" || exit 9; nbdroot_dump; echo "KEY $NBDROOT_KEY"'
    p = subprocess.run(shell + ["-c", script, "sh", LIB, f"nbdroot=h/lab nbdroot.tls=require "
                                                         f"nbdroot.key={KEY}"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[-1] == f"KEY {KEY}"
    assert not any(HEX in l for l in lines[:-1]), lines


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
                       TRACKER="", CACHE="64M", PEER_PORT="10809", TLS="off", KEY_ID="", IP="",
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


# ---------------------------------------------------------------- the agent's key (node.sh)

FAKE_AGENT = r'''#!/bin/sh
# Stands in for nbdroot-agent: records its arguments, and its key file's
# mode and contents, then says it is ready.
[ "$1" = --help ] && exit 0
echo "$*" >"$FAKE_OUT/args"
while [ $# -gt 0 ]; do
	case $1 in
	--tls-key-file) stat -c %a "$2" >"$FAKE_OUT/mode"; cat "$2" >"$FAKE_OUT/key"; shift ;;
	--ready-file) ready=$2; shift ;;
	esac
	shift
done
echo "unix x" >"$ready"
'''


def start_agent(shell, tmp_path, cmdline, node=None, agent=FAKE_AGENT):
    """nbdroot_agent_start as the init runs it, under umask 000, with a fake
    nbdroot-agent on PATH (or none when agent is None). Returns (process,
    run directory)."""
    run = tmp_path / "run"
    run.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if agent is not None:
        (bindir / "nbdroot-agent").write_text(agent)
        (bindir / "nbdroot-agent").chmod(0o755)
    script = ('umask 000; . "$1"; . "$2"; log() { echo "LOG $*"; }; '
              'fail() { echo "FAIL $*"; exit 1; }; nbdroot_parse "$3" || exit 9; '
              '[ -n "$4" ] && NBDROOT_NODE=$4; nbdroot_export; '
              'nbdroot_agent_wanted && nbdroot_agent_start')
    env = dict(os.environ, NBDROOT_RUN=str(run), FAKE_OUT=str(tmp_path),
               PATH=f"{bindir}:/usr/bin:/bin")
    p = subprocess.run(shell + ["-c", script, "sh", LIB, NODE_LIB, cmdline, node or ""],
                       capture_output=True, text=True, timeout=30, env=env)
    return p, run


def test_the_agent_gets_the_key_in_a_file_only_root_can_read(shell, tmp_path):
    p, run = start_agent(shell, tmp_path, f"nbdroot=h/lab/n1 nbdroot.tracker=h:80 "
                                          f"nbdroot.tls=require nbdroot.key={KEY}")
    assert p.returncode == 0, p.stdout + p.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("--tls") + 1] == "require"
    assert args[args.index("--tls-key-file") + 1] == f"{run}/node.psk"
    # Peers as asked: over TLS too (the agent opens the generation's peer key).
    assert args[args.index("--peers") + 1] == "on", args
    assert args[args.index("--tracker") + 1] == "h:80", args
    assert not any(HEX in a for a in args)
    # Written under umask 077 whatever the caller's umask (000 here).
    assert (tmp_path / "mode").read_text().strip() == "600"
    assert (tmp_path / "key").read_text() == KEY + "\n"
    assert not (run / "node.psk").exists(), "the key file outlived the agent's start"
    assert "TLS with node n1's key, peers on (tracker h:80)" in p.stdout
    assert HEX not in p.stdout + p.stderr


def test_without_tls_the_agent_gets_no_key(shell, tmp_path):
    p, run = start_agent(shell, tmp_path, "nbdroot=h/lab/n1")
    assert p.returncode == 0, p.stdout + p.stderr
    args = (tmp_path / "args").read_text().split()
    assert "--tls" not in args and "--tls-key-file" not in args
    assert not (tmp_path / "mode").exists()


def test_a_key_for_another_node_than_the_macs_fails(shell, tmp_path):
    """The node id may come from the MAC only after parsing."""
    p, _ = start_agent(shell, tmp_path, f"nbdroot=h/lab nbdroot.tls=require nbdroot.key={KEY}",
                       node="52-54-00-12-34-56")
    assert p.returncode == 1
    assert "FAIL nbdroot.key is for node 'n1', and this node is '52-54-00-12-34-56'" in p.stdout
    assert not (tmp_path / "args").exists()


@pytest.mark.parametrize("agent", [None, "#!/bin/sh\necho 'libfoo.so: not found' >&2\nexit 127\n"],
                         ids=["missing", "broken"])
def test_tls_without_a_working_agent_fails_rather_than_attach_in_plaintext(shell, tmp_path,
                                                                         agent):
    p, _ = start_agent(shell, tmp_path, f"nbdroot=h/lab/n1 nbdroot.tls=require nbdroot.key={KEY}",
                       agent=agent)
    assert p.returncode == 1, p.stdout
    assert "FAIL nbdroot.tls=require" in p.stdout and "not attaching in plaintext" in p.stdout


SLOW_AGENT = r'''#!/bin/sh
# Stands in for an nbdroot-agent whose first attach takes 11 s of retries.
[ "$1" = --help ] && exit 0
while [ $# -gt 0 ]; do
	case $1 in --ready-file) ready=$2; shift ;; esac
	shift
done
echo "warning upstream: cannot attach 'lab/n1' yet: h:10809: connect: Connection refused; retrying" >&2
sleep 11
echo "unix x" >"$ready"
'''

GIVING_UP_AGENT = r'''#!/bin/sh
[ "$1" = --help ] && exit 0
echo "error cannot attach 'lab/n1': h:10809: export 'lab/n1' refused: NBD_REP_ERR_UNKNOWN" >&2
exit 1
'''


def test_the_init_waits_for_a_retrying_agent_and_says_so_on_the_console(shell, tmp_path):
    """No bound of its own (the key came once): every 10 s the console
    gets the agent log's last line, and the boot goes on once it is ready."""
    p, _ = start_agent(shell, tmp_path, "nbdroot=h/lab/n1", agent=SLOW_AGENT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "LOG still waiting for nbdroot-agent to attach lab/n1 (10 s): warning upstream: " \
           "cannot attach 'lab/n1' yet: h:10809: connect: Connection refused; retrying" \
           in p.stdout, p.stdout
    assert "FAIL" not in p.stdout


def test_an_agent_that_gives_up_fails_the_boot_with_its_reason(shell, tmp_path):
    p, _ = start_agent(shell, tmp_path, "nbdroot=h/lab/n1", agent=GIVING_UP_AGENT)
    assert p.returncode == 1, p.stdout
    assert "FAIL nbdroot-agent stopped: error cannot attach 'lab/n1'" in p.stdout, p.stdout
    assert "NBD_REP_ERR_UNKNOWN" in p.stdout
