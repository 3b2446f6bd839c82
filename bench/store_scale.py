#!/usr/bin/python3
"""How node-view costs grow with the number of nodes in a store.

For each N it lays out a store (one 16 MiB generation, N nodes made by one
`nbdserver admin create` run) and times, as the median of --reps runs:
  start      nbdserver start until its --ready-file is written
  opt_list   one NBD_OPT_LIST over a Unix socket (libnbd opt mode), the
             first after start; list2: a second one
  nbdinfo    `nbdinfo --list` (NBD_OPT_INFO and LIST_META_CONTEXT per export);
             only for N <= --nbdinfo-max, it takes a few ms per export
  admin      `nbdserver admin list`
  attach     connect + NBD_OPT_GO to an existing node, then disconnect
  create     the same for a node that does not exist yet (--nodes auto), the
             first the server creates (it reads nodes/ once for the name check)
  create2    the next new node in the same server (what later nodes of a
             storm of new nodes pay)

Usage: /usr/bin/python3 bench/store_scale.py [--nodes 100,1000,10000]
           [--nbdserver build/nbdserver/nbdserver] [--workdir /var/tmp/nbdroot-scale]
Needs python3-libnbd and libnbd-bin (nbdinfo).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import nbd

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20


def make_store(root, nbdserver, n):
    store = os.path.join(root, f"store{n}")
    gen = os.path.join(store, "images", "lab", "generations", "g1")
    os.makedirs(gen)
    with open(os.path.join(gen, "image.ext4"), "wb") as f:
        f.write(os.urandom(MiB))
        f.truncate(16 * MiB)
    with open(os.path.join(gen, "manifest.json"), "w") as f:
        json.dump({"image": "lab", "generation": "g1", "parent": None, "format": "full",
                   "size": 16 * MiB, "block_size": 4096}, f)
    os.symlink("generations/g1", os.path.join(store, "images", "lab", "current"))
    names = [f"n{i:05d}" for i in range(n)]
    t = time.monotonic()
    for i in range(0, n, 1000):
        subprocess.run([nbdserver, "admin", "--store", store, "create", *names[i:i + 1000],
                        "--image", "lab"], check=True, stdout=subprocess.DEVNULL)
    return store, time.monotonic() - t


class Server:
    def __init__(self, nbdserver, store, workdir):
        self.dir = tempfile.mkdtemp(dir=workdir)
        self.sock = os.path.join(self.dir, "sock")
        ready = os.path.join(self.dir, "ready")
        t = time.monotonic()
        self.proc = subprocess.Popen(
            [nbdserver, "--store", store, "--socket", self.sock, "--ready-file", ready,
             "--threads", "2", "--log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "log"), "w"))
        while not (os.path.exists(ready) and os.path.getsize(ready)):
            if self.proc.poll() is not None:
                sys.exit(f"nbdserver exited: {open(os.path.join(self.dir, 'log')).read()}")
            time.sleep(0.002)
        self.start_s = time.monotonic() - t

    def uri(self, export=""):
        return f"nbd+unix:///{export}?socket={self.sock}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)
        shutil.rmtree(self.dir, ignore_errors=True)


def timed(f):
    t = time.monotonic()
    f()
    return time.monotonic() - t


def opt_list(uri, n):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    got = []
    h.opt_list(lambda name, desc: got.append(name))
    h.opt_abort()
    assert len(got) >= n, f"listed {len(got)} of {n} nodes"


def attach(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(4096, 0)
    h.shutdown()


def run_one(args, n):
    store, create_s = make_store(args.workdir, args.nbdserver, n)
    rows = {k: [] for k in ("start", "opt_list", "list2", "nbdinfo", "admin", "attach", "create",
                           "create2")}
    for rep in range(args.reps):
        srv = Server(args.nbdserver, store, args.workdir)
        rows["start"].append(srv.start_s)
        rows["opt_list"].append(timed(lambda: opt_list(srv.uri(), n)))
        rows["list2"].append(timed(lambda: opt_list(srv.uri(), n)))
        if n <= args.nbdinfo_max:
            rows["nbdinfo"].append(timed(lambda: subprocess.run(
                ["nbdinfo", "--list", srv.uri()], check=True, stdout=subprocess.DEVNULL)))
        rows["admin"].append(timed(lambda: subprocess.run(
            [args.nbdserver, "admin", "--store", store, "list"], check=True,
            stdout=subprocess.DEVNULL)))
        node = f"n{(rep * 7919) % n:05d}"
        os.sync()  # earlier steps leave metadata for the attach's fsyncs to flush
        rows["attach"].append(timed(lambda: attach(srv.uri(f"lab/{node}"))))
        rows["create"].append(timed(lambda: attach(srv.uri(f"lab/new{rep}"))))
        rows["create2"].append(timed(lambda: attach(srv.uri(f"lab/new{rep}b"))))
        srv.stop()
    shutil.rmtree(store)
    med = {k: statistics.median(v) if v else None for k, v in rows.items()}
    return create_s, med


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="100,1000,10000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--nbdinfo-max", type=int, default=1000)
    ap.add_argument("--nbdserver", default=os.path.join(HERE, "..", "build", "nbdserver",
                                                         "nbdserver"))
    ap.add_argument("--workdir", default="/var/tmp/nbdroot-scale")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    print(f"{'n':>6} {'setup s':>8} {'start s':>8} {'OPT_LIST s':>10} {'list2 s':>8} {'nbdinfo s':>10} "
          f"{'admin list s':>12} {'attach ms':>10} {'create ms':>10} {'create2 ms':>10}", flush=True)
    for n in (int(x) for x in args.nodes.split(",")):
        create_s, m = run_one(args, n)
        nbdinfo = f"{m['nbdinfo']:10.2f}" if m["nbdinfo"] is not None else f"{'-':>10}"
        print(f"{n:>6} {create_s:8.1f} {m['start']:8.3f} {m['opt_list']:10.3f} {m['list2']:8.3f} {nbdinfo} "
              f"{m['admin']:12.3f} {m['attach'] * 1000:10.1f} {m['create'] * 1000:10.1f} "
              f"{m['create2'] * 1000:10.1f}",
              flush=True)


if __name__ == "__main__":
    main()
