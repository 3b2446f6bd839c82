#!/usr/bin/python3
"""Image build benchmark: imagebuilder full and incremental builds against
`mke2fs -d` and `mksquashfs` (LTSP's way), on a generated tree.

    /usr/bin/python3 bench/build_bench.py                       # 512 MiB, 480 files, 3 runs
    /usr/bin/python3 bench/build_bench.py --size-mib 2048 --files 1920 --runs 3

Each run of the incremental case applies the issue's four changes to fresh
files (grow one by 1 MiB, add one of 1 MiB, delete one, rewrite one in place)
and builds a delta over the previous generation. Reported: median wall
times, the ratio incremental/full, store bytes per generation (what the
generation's directory occupies on disk), blocks shared with the parent,
and the ratios against mke2fs -d and mksquashfs. The source tree sits in
the page cache for every tool alike (the machine has the RAM for it).
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_IB = os.path.join(HERE, "..", "build-ib", "imagebuilder", "imagebuilder")


def sh(cmd, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"{cmd!r} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def timed(cmd):
    t = time.monotonic()
    out = sh(cmd)
    return time.monotonic() - t, out


def make_tree(root, files, total, seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 2 * total // files) for _ in range(files)]
    scale = total / sum(sizes)
    paths = []
    for i, s in enumerate(sizes):
        d = os.path.join(root, f"dir{i % 16:02d}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"file{i:05d}")
        with open(p, "wb") as f:
            f.write(rng.randbytes(max(1, int(s * scale))))
        paths.append(p)
    return paths


def disk_bytes(path):
    if not os.path.isdir(path):
        return os.lstat(path).st_blocks * 512
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def change_tree(src, paths, run, rng):
    """The issue's four changes, on files not touched before."""
    grow, delete, rewrite = paths[3 * run], paths[3 * run + 1], paths[3 * run + 2]
    with open(grow, "ab") as f:
        f.write(rng.randbytes(MiB))
    with open(os.path.join(src, "dir00", f"added{run}"), "wb") as f:
        f.write(rng.randbytes(MiB))
    os.unlink(delete)
    size = os.path.getsize(rewrite)
    with open(rewrite, "r+b") as f:
        f.write(rng.randbytes(size))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--files", type=int, default=480)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--imagebuilder", default=os.environ.get("IMAGEBUILDER", DEFAULT_IB))
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    ib = os.path.abspath(args.imagebuilder)
    if not os.access(ib, os.X_OK):
        sys.exit(f"no imagebuilder at {ib} (BUILD_DIR=build-ib ./scripts/build.sh)")

    work = args.workdir or tempfile.mkdtemp(prefix="build-bench-", dir="/var/tmp")
    src = os.path.join(work, "src")
    try:
        print(f"tree: {args.size_mib} MiB in {args.files} files under {src}", flush=True)
        paths = make_tree(src, args.files, args.size_mib * MiB, seed=1)
        sh(["sync"])
        res = {"tree_mib": args.size_mib, "files": args.files, "runs": args.runs}

        # imagebuilder, full builds (each into a fresh store)
        full_t, full_bytes, img_size = [], [], None
        for r in range(args.runs):
            store = os.path.join(work, f"store-full{r}")
            os.makedirs(store)
            t, out = timed([ib, "-q", "--store", store, "build", "lab", "--from", src])
            gen = out.strip().splitlines()[-1]
            gdir = os.path.join(store, "images", "lab", "generations", gen)
            with open(os.path.join(gdir, "manifest.json")) as f:
                img_size = json.load(f)["size"]
            full_t.append(t)
            full_bytes.append(disk_bytes(gdir))
            if r < args.runs - 1:
                shutil.rmtree(store)
        store = os.path.join(work, f"store-full{args.runs - 1}")
        print(f"imagebuilder full:        {median(full_t):7.2f} s  (runs {', '.join(f'{x:.2f}' for x in full_t)})", flush=True)

        # mke2fs -d with the same geometry and options
        mk_t = []
        for r in range(args.runs):
            img = os.path.join(work, "mke2fs.img")
            if os.path.exists(img):
                os.unlink(img)
            t, _ = timed(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "1",
                          "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
                          "-d", src, img, str(img_size // 1024) + "k"])
            mk_t.append(t)
        mk_bytes = disk_bytes(os.path.join(work, "mke2fs.img"))
        print(f"mke2fs -d:                {median(mk_t):7.2f} s", flush=True)

        # mksquashfs (default gzip, all cores)
        sq_t = []
        for r in range(args.runs):
            out_sq = os.path.join(work, "root.squashfs")
            t, _ = timed(["mksquashfs", src, out_sq, "-noappend", "-quiet", "-no-progress"])
            sq_t.append(t)
        sq_bytes = disk_bytes(os.path.join(work, "root.squashfs"))
        print(f"mksquashfs:               {median(sq_t):7.2f} s", flush=True)

        # imagebuilder incremental builds, each over the previous generation
        rng = random.Random(2)
        inc_t, inc_bytes, shared = [], [], []
        for r in range(args.runs):
            change_tree(src, paths, r, rng)
            t, out = timed([ib, "-q", "--store", store, "build", "lab", "--from", src])
            gen = out.strip().splitlines()[-1]
            gdir = os.path.join(store, "images", "lab", "generations", gen)
            with open(os.path.join(gdir, "manifest.json")) as f:
                m = json.load(f)
            if m["format"] != "delta":
                sys.exit(f"expected a delta, got {m['format']}")
            inc_t.append(t)
            inc_bytes.append(disk_bytes(gdir))
            shared.append(m["blocks_shared"] / (m["size"] // m["block_size"]))
        print(f"imagebuilder incremental: {median(inc_t):7.2f} s  (runs {', '.join(f'{x:.3f}' for x in inc_t)})", flush=True)

        res.update({
            "image_bytes": img_size,
            "full_s": median(full_t), "incremental_s": median(inc_t),
            "mke2fs_d_s": median(mk_t), "mksquashfs_s": median(sq_t),
            "full_store_bytes": median(full_bytes), "incremental_store_bytes": median(inc_bytes),
            "mke2fs_d_bytes": mk_bytes, "mksquashfs_bytes": sq_bytes,
            "blocks_shared": median(shared),
        })
        print()
        print(f"image size                      {img_size / MiB:9.1f} MiB")
        print(f"store bytes, full generation    {res['full_store_bytes'] / MiB:9.1f} MiB")
        print(f"store bytes, delta generation   {res['incremental_store_bytes'] / MiB:9.2f} MiB"
              f"  = {100 * res['incremental_store_bytes'] / img_size:.2f}% of the image size (target <= 5%)")
        print(f"blocks shared with the parent   {100 * res['blocks_shared']:9.2f}%  (target >= 98%)")
        print(f"incremental / full time         {100 * res['incremental_s'] / res['full_s']:9.2f}%  (target <= 10%)")
        print(f"full / mke2fs -d time           {res['full_s'] / res['mke2fs_d_s']:9.2f}x")
        print(f"full / mksquashfs time          {res['full_s'] / res['mksquashfs_s']:9.2f}x")
        print(f"incremental / mke2fs -d time    {100 * res['incremental_s'] / res['mke2fs_d_s']:9.2f}%")
        print(f"incremental / mksquashfs time   {100 * res['incremental_s'] / res['mksquashfs_s']:9.2f}%")
        print(f"squashfs bytes                  {sq_bytes / MiB:9.1f} MiB (random data does not compress)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
