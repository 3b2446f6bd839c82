"""The e2e lab: Debian's kernel, our initrd, test root trees, a store with
generations, nbdserver on a fixed free port, and qemu VMs booting from it.

Nothing here is installed on the host: the kernel package is fetched with
`apt-get download` into the cache and unpacked with `dpkg -x`.

Environment:
  NBDROOT_E2E_CACHE     cache dir (default /var/cache/nbdroot-e2e, or
                        ~/.cache/nbdroot-e2e when that is not writable)
  NBDROOT_E2E_KERNEL    package name (default: the newest
                        linux-image-6.1.0-*-amd64 apt knows)
  NBDROOT_E2E_ACCEL     qemu accelerator (default tcg)
  NBDROOT_E2E_LOGS      where consoles and server logs of failed tests go
  NBDSERVER, IMAGEBUILDER  the binaries (default: the build trees)
  NBDROOT_E2E_STORE=handmade  developer switch: lay generations out by hand
                        (mke2fs -d) instead of calling imagebuilder
"""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
HOOKS = os.path.join(REPO, "initrd-hooks")
MiB = 1 << 20
BOOT_TIMEOUT = float(os.environ.get("NBDROOT_E2E_BOOT_TIMEOUT", "120"))


def cache_dir():
    d = os.environ.get("NBDROOT_E2E_CACHE")
    if not d:
        d = "/var/cache/nbdroot-e2e"
        try:
            os.makedirs(d, exist_ok=True)
            if not os.access(d, os.W_OK):
                raise PermissionError(d)
        except OSError:
            d = os.path.expanduser("~/.cache/nbdroot-e2e")
    os.makedirs(d, exist_ok=True)
    return d


def run(cmd, timeout=600, **kw):
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=timeout, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {p.returncode}\nstdout: {p.stdout[-3000:]}\n"
                             f"stderr: {p.stderr[-3000:]}")
    return p


def find_binary(env, pattern):
    """$env, else build/'s binary, else the newest of the other build trees'
    (sanitizer and fuzzing builds last) matching `pattern` (build*/...)."""
    path = os.environ.get(env)
    if path:
        return path if os.access(path, os.X_OK) else None
    found = [p for p in glob.glob(os.path.join(REPO, pattern)) if os.access(p, os.X_OK)]
    if not found:
        return None
    plain = os.path.join(REPO, pattern.replace("build*", "build", 1))
    if plain in found:
        return plain
    slow = ("asan", "fuzz", "ubsan", "tsan")
    return max(found, key=lambda p: (not any(w in p for w in slow), os.path.getmtime(p)))


# ---------------------------------------------------------------- kernel

class Kernel:
    def __init__(self, root, version):
        self.root = root            # the unpacked package: boot/, lib/modules/
        self.version = version
        self.vmlinuz = os.path.join(root, "boot", f"vmlinuz-{version}")


def newest_kernel_package():
    out = subprocess.run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"],
                         capture_output=True, text=True, timeout=60).stdout
    names = re.findall(r"^(linux-image-6\.1\.0-(\d+)-amd64) ", out, re.M)
    if not names:
        return None
    return max(names, key=lambda n: int(n[1]))[0]


def fetch_kernel():
    """Downloads (once) and unpacks Debian's kernel package; returns a Kernel."""
    cache = cache_dir()
    pkg = os.environ.get("NBDROOT_E2E_KERNEL") or newest_kernel_package()
    if pkg is None:
        # No apt lists: use whatever was unpacked before.
        done = sorted(glob.glob(os.path.join(cache, "linux-image-*", ".unpacked")))
        if not done:
            raise RuntimeError("apt-cache knows no linux-image-6.1.0-*-amd64 (run apt-get update)")
        pkg = os.path.basename(os.path.dirname(done[-1]))
    root = os.path.join(cache, pkg)
    if not os.path.exists(os.path.join(root, ".unpacked")):
        debs = os.path.join(cache, "debs")
        os.makedirs(debs, exist_ok=True)
        if not glob.glob(os.path.join(debs, f"{pkg}_*.deb")):
            run(["apt-get", "download", pkg], cwd=debs)
        deb = sorted(glob.glob(os.path.join(debs, f"{pkg}_*.deb")))[-1]
        shutil.rmtree(root, ignore_errors=True)
        run(["dpkg", "-x", deb, root])
        open(os.path.join(root, ".unpacked"), "w").close()
    version = pkg[len("linux-image-"):]
    return Kernel(root, version)


def make_initrd(kernel, out):
    """Our own initrd for `kernel` (initrd-hooks/mkinitrd.sh); returns
    (path, size in bytes, mkinitrd's report)."""
    p = run([os.path.join(HOOKS, "mkinitrd.sh"), kernel.root, out], timeout=600)
    return out, os.path.getsize(out), p.stdout.strip() + "\n" + p.stderr.strip()


# ---------------------------------------------------------------- trees

def make_test_tree(path, generation):
    """A busybox root whose /sbin/init is node_init.sh; /etc/generation
    names the generation it is built into."""
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "data", "root"):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    shutil.copy2("/bin/busybox", os.path.join(path, "bin", "busybox"))
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True).stdout.split()
    for a in applets:
        link = os.path.join(path, "bin", a)
        if a != "busybox" and not os.path.lexists(link):
            os.symlink("busybox", link)
    shutil.copy2(os.path.join(HERE, "node_init.sh"), os.path.join(path, "sbin", "init"))
    os.chmod(os.path.join(path, "sbin", "init"), 0o755)
    with open(os.path.join(path, "etc", "generation"), "w") as f:
        f.write(generation + "\n")
    return path


# ---------------------------------------------------------------- store

class Store:
    """A store, filled by imagebuilder (or, with NBDROOT_E2E_STORE=handmade,
    by mke2fs -d as a developer's stand-in)."""

    def __init__(self, path, nbdserver, imagebuilder=None, handmade=False):
        self.path = path
        self.nbdserver = nbdserver
        self.imagebuilder = imagebuilder
        self.handmade = handmade
        os.makedirs(path, exist_ok=True)

    def build(self, image, tree, gen_hint, size_mib=64):
        """A new generation of `image` from `tree`; returns its id."""
        if not self.handmade:
            p = run([self.imagebuilder, "--store", self.path, "build", image, "--from", tree],
                    timeout=600)
            return p.stdout.strip().splitlines()[-1].strip()
        d = os.path.join(self.path, "images", image, "generations", gen_hint)
        os.makedirs(d)
        img = os.path.join(d, "image.ext4")
        run(["mke2fs", "-q", "-t", "ext4", "-d", tree, "-E",
             "lazy_itable_init=0,lazy_journal_init=0", img, f"{size_mib}M"])
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump({"image": image, "generation": gen_hint, "parent": None, "format": "full",
                       "size": size_mib * MiB, "block_size": 4096}, f)
        return gen_hint

    def publish(self, image, gen):
        if not self.handmade:
            run([self.imagebuilder, "--store", self.path, "publish", image, gen])
            return
        link = os.path.join(self.path, "images", image, "current")
        tmp = link + ".tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.join("generations", gen), tmp)
        os.replace(tmp, link)

    def admin(self, *args):
        return run([self.nbdserver, "admin", "--store", self.path, *args], timeout=60).stdout


# ---------------------------------------------------------------- server

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerNet:
    """A virtual network for VMs that talk to each other (qemu's user
    network keeps every VM alone): network namespace NAME with a bridge at
    10.0.3.1/24 and a tap device per VM. nbdserver and qemu run inside it
    (`prefix`); the i-th MAC seen is 10.0.3.(10 + i). Needs root."""

    HOST = "10.0.3.1"

    def __init__(self, name=None):
        self.name = name or f"nbdroot-e2e-{os.getpid()}-{next(_peernets)}"
        self.taps = 0
        self.addresses = {}
        run(["ip", "netns", "add", self.name])
        try:
            for cmd in (["link", "set", "lo", "up"], ["link", "add", "br0", "type", "bridge"],
                        ["addr", "add", f"{self.HOST}/24", "dev", "br0"],
                        ["link", "set", "br0", "up"]):
                run(["ip", "-n", self.name] + cmd)
        except Exception:
            self.close()
            raise
        self.prefix = ["ip", "netns", "exec", self.name]

    def nic(self, mac):
        """qemu's arguments for a NIC on the bridge; returns (args, address)."""
        self.taps += 1
        tap = f"tap{self.taps}"
        run(["ip", "-n", self.name, "tuntap", "add", "dev", tap, "mode", "tap"])
        run(["ip", "-n", self.name, "link", "set", tap, "master", "br0", "up"])
        args = ["-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
        # One address per MAC, as a DHCP server's reservations give: a node
        # that boots again comes back from the same address (the server lets
        # one address at a time write a node's view, and a powered-off VM's
        # connection lingers until the server times it out).
        index = self.addresses.setdefault(mac, len(self.addresses) + 1)
        return args, f"10.0.3.{10 + index}"

    def close(self):
        subprocess.run(["ip", "netns", "delete", self.name], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)


_peernets = iter(range(1, 1 << 30))


class Server:
    """nbdserver --store on 127.0.0.1:PORT (a fixed port, so that a restart
    comes back where the nodes expect it). Guests reach it at 10.0.2.2.
    With `net` (a PeerNet) it runs in that namespace on the bridge's
    address instead, with the HTTP API (the tracker) on port+1."""

    def __init__(self, binary, store, workdir, port=None, net=None, args=(), http=False):
        self.binary = binary
        self.args = list(args)
        self.store = store
        self.workdir = workdir
        # In its own namespace nothing else listens: fixed ports.
        self.port = port or (10809 if net else free_port())
        self.net = net
        self.host = net.HOST if net else "127.0.0.1"
        self.tracker = f"{self.host}:{self.port + 1}" if net else None
        # http=True: the HTTP service (boot scripts, boot files, reports) on
        # a free port of its own; guests reach it at 10.0.2.2:http_port.
        if http and not self.tracker:
            self.http_port = free_port()
            self.tracker = f"{self.host}:{self.http_port}"
        else:
            self.http_port = self.port + 1 if net else None
        self.proc = None
        self.log = os.path.join(workdir, "nbdserver.log")
        self.starts = 0

    def start(self, timeout=15):
        self.starts += 1
        ready = os.path.join(self.workdir, f"ready.{self.starts}")
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log, "ab") as log:
                log.write(f"--- start {self.starts} ---\n".encode())
                log.flush()
                extra = ["--http", self.tracker] if self.tracker else []
                self.proc = subprocess.Popen(
                    (self.net.prefix if self.net else []) +
                    [self.binary, "--listen", f"{self.host}:{self.port}", "--store", self.store,
                     "--threads", "1", "--ready-file", ready] + extra + self.args,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            while time.monotonic() < deadline:
                if os.path.exists(ready) and open(ready).read().strip():
                    return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
                raise AssertionError(f"nbdserver not ready within {timeout} s")
            if time.monotonic() >= deadline:
                raise AssertionError(f"nbdserver kept exiting ({self.proc.returncode}); see {self.log}")
            time.sleep(0.2)  # the port may still be held by the old process

    def stop(self, timeout=30):
        """SIGTERM; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return None

    def text(self):
        try:
            return open(self.log, errors="replace").read()
        except FileNotFoundError:
            return ""


# ---------------------------------------------------------------- VMs

class VM:
    """One qemu node. The console goes to a file, read while it runs."""

    def __init__(self, lab, name, append, mac, vmlinuz=None, initrd=None, memory_mib=None,
                 net=None, netboot=None, firmware="bios", smp=1, reboot=False):
        self.lab = lab
        self.vmlinuz = vmlinuz or lab.kernel.vmlinuz
        self.initrd = initrd or lab.initrd
        self.memory_mib = memory_mib or lab.memory_mib
        self.name = name
        self.mac = mac
        self.append = append
        self.net = net              # a PeerNet: the VM is on its bridge
        self.nic = ["-netdev", "user,id=n0", "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
        if net:
            self.nic, self.address = net.nic(mac)
            self.append = append.replace(
                "ip=dhcp", f"ip={self.address}::{net.HOST}:255.255.255.0:::off")
        # netboot=URL: no -kernel; the firmware's iPXE asks DHCP, which
        # hands it URL (qemu's user network), and follows it over HTTP.
        # `firmware` "ovmf" boots UEFI (OVMF and its iPXE) instead of SeaBIOS.
        # reboot=True lets a guest's reboot start it again (the verification
        # initrd reboots into the node's next boot script).
        self.netboot = netboot
        self.firmware = firmware
        self.smp = smp
        self.reboot = reboot
        if netboot:
            self.nic = ["-netdev", f"user,id=n0,bootfile={netboot}",
                        "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
        self.console_path = os.path.join(lab.workdir, f"console-{name}.log")
        self.proc = None
        self.started = None
        self.elapsed = None

    def start(self):
        cmd = ["qemu-system-x86_64", "-accel", self.lab.accel, "-m", str(self.memory_mib),
               "-smp", str(self.smp), "-display", "none", "-monitor", "none",
               "-serial", f"file:{self.console_path}"]
        if not self.reboot:
            cmd.append("-no-reboot")
        if self.firmware == "ovmf":
            varstore = os.path.join(self.lab.workdir, f"ovmf-vars-{self.name}.fd")
            shutil.copy("/usr/share/OVMF/OVMF_VARS_4M.fd", varstore)
            cmd += ["-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                    "-drive", f"if=pflash,format=raw,file={varstore}"]
        if self.netboot:
            cmd += ["-boot", "n"]
        else:
            cmd += ["-kernel", self.vmlinuz, "-initrd", self.initrd, "-append", self.append]
        cmd += self.nic
        self.started = time.monotonic()
        prefix = self.net.prefix if self.net else []
        self.proc = subprocess.Popen(prefix + ["nice", "-n", "5"] + cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lab.vms.append(self)
        return self

    def console(self):
        try:
            with open(self.console_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def e2e(self):
        """The node's E2E: lines, without the prefix."""
        # Wherever "E2E: " is in a line: the node's report may land after a
        # line the console left open (systemd's "A start job is running"
        # status, redrawn with \r and no newline, when a boot is slow), and
        # a line the report started may be cut by a \r.
        return [m.group(1).strip() for m in re.finditer(r"E2E: ([^\r\n]*)", self.console())]

    def wait_for(self, pattern, timeout=BOOT_TIMEOUT):
        """Waits until `pattern` (a regex) is on the console; returns the match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.console())
            if m:
                return m
            if self.proc.poll() is not None:
                m = re.search(pattern, self.console())
                if m:
                    return m
                raise AssertionError(f"{self.name}: qemu exited ({self.proc.returncode}) before "
                                     f"{pattern!r}; console in {self.console_path}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {pattern!r} within {timeout} s; "
                             f"console in {self.console_path}")

    def wait(self, timeout=BOOT_TIMEOUT):
        """Waits for qemu to exit (the node powered off or rebooted)."""
        try:
            self.proc.wait(max(1, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name}: still running after {timeout} s; console in "
                                 f"{self.console_path}")
        self.elapsed = time.monotonic() - self.started
        if self.proc.returncode != 0:
            err = self.proc.stderr.read().decode(errors="replace")
            raise AssertionError(f"{self.name}: qemu exited {self.proc.returncode}: {err[-2000:]}")
        return self

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Lab:
    def __init__(self, workdir, kernel, initrd, server, store):
        self.workdir = workdir
        self.kernel = kernel
        self.initrd = initrd
        self.server = server
        self.store = store
        self.accel = os.environ.get("NBDROOT_E2E_ACCEL", "tcg")
        self.memory_mib = 512
        self.vms = []

    def cmdline(self, node=None, extra="", image="lab", port=None):
        host = self.server.host if self.server.net else "10.0.2.2"
        parts = ["console=ttyS0", f"nbdroot={host}:{port or self.server.port}/{image}",
                 "ip=dhcp", "panic=5"]
        if node:
            parts.append(f"nbdroot.node={node}")
        # The scenarios written for nbd-client on the server and
        # nbdroot-keeper; the agent's ask for nbdroot.agent=on.
        if "nbdroot.agent=" not in extra:
            parts.append("nbdroot.agent=off")
        return " ".join(parts + ([extra] if extra else []))

    def vm(self, name, append, mac="52:54:00:12:34:56", **kw):
        return VM(self, name, append, mac, **kw)

    def boot(self, name, append, mac="52:54:00:12:34:56", timeout=BOOT_TIMEOUT, **kw):
        """Boots a node to the end (it powers off); returns the VM."""
        v = self.vm(name, append, mac, **kw).start()
        v.wait(timeout)
        return v
