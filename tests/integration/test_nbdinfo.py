"""nbdinfo (libnbd) against nbdserver: export list, sizes, flags, block
sizes and the base:allocation map."""

import json

from conftest import GRAIN, MiB, file_extents, merge_extents, run


def nbdinfo_json(*args):
    return json.loads(run(["nbdinfo", "--json", *args], timeout=60).stdout)


def test_list_shows_every_export_with_description(nbdserver, make_image):
    a = make_image("a.img", size=1 * MiB)
    b = make_image("b.img", size=2 * MiB)
    c = make_image("c.img", size=3 * MiB)
    srv = nbdserver({
        "alpha": (a, {"desc": "first disk"}),
        "beta": (b, {"ro": True, "desc": "second-disk"}),
        "gamma": c,
    })
    info = nbdinfo_json("--list", srv.uri("alpha"))
    exports = {e["export-name"]: e for e in info["exports"]}
    assert set(exports) == {"alpha", "beta", "gamma"}
    assert exports["alpha"].get("description") == "first disk"
    assert exports["beta"].get("description") == "second-disk"
    assert exports["alpha"]["export-size"] == a.size
    assert exports["beta"]["export-size"] == b.size
    assert exports["gamma"]["export-size"] == c.size
    assert exports["beta"]["is_read_only"] is True
    assert exports["alpha"]["is_read_only"] is False


def test_list_details_are_descriptions(nbdserver, make_image):
    """NBD_OPT_LIST sends the description as the reply's details."""
    import nbd
    a = make_image("a.img", size=1 * MiB)
    b = make_image("b.img", size=1 * MiB)
    srv = nbdserver({"one": (a, {"desc": "the first"}), "two": (b, {"desc": "the second"})})
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(srv.uri("one"))
    seen = {}
    h.opt_list(lambda name, desc: seen.__setitem__(name, desc) or 0)
    h.opt_abort()
    assert seen == {"one": "the first", "two": "the second"}


def test_json_size_and_flags_writable(nbdserver, image):
    srv = nbdserver({"disk": image})
    info = nbdinfo_json(srv.uri("disk"))
    assert info["protocol"] == "newstyle-fixed"
    assert info["structured"] is True
    (e,) = info["exports"]
    assert e["export-size"] == image.size
    assert e["is_read_only"] is False
    for flag in ("can_multi_conn", "can_fua", "can_trim", "can_zero",
                 "can_fast_zero", "can_cache", "can_flush", "can_df"):
        assert e[flag] is True, flag
    assert "base:allocation" in e["contexts"]
    assert e["block_size_minimum"] == 1
    assert e["block_size_preferred"] == 4096
    assert e["block_size_maximum"] == 32 * MiB


def test_json_size_and_flags_read_only(nbdserver, make_image):
    img = make_image("ro.img", size=3 * MiB + 4096)
    srv = nbdserver({"ro": (img, {"ro": True})})
    (e,) = nbdinfo_json(srv.uri("ro"))["exports"]
    assert e["export-size"] == img.size
    assert e["is_read_only"] is True
    assert e["can_multi_conn"] is True


def test_max_block_option_is_advertised(nbdserver, image):
    srv = nbdserver({"disk": image}, args=["--max-block", str(1 * MiB)])
    (e,) = nbdinfo_json(srv.uri("disk"))["exports"]
    assert e["block_size_maximum"] == 1 * MiB
    assert e["block_size_minimum"] == 1


def test_size_of_odd_sized_file(nbdserver, make_image):
    img = make_image("odd.img", layout=[(0, 12345, "data")])
    srv = nbdserver({"odd": img})
    p = run(["nbdinfo", "--size", srv.uri("odd")])
    assert int(p.stdout.strip()) == 12345


def map_of(uri):
    entries = json.loads(run(["nbdinfo", "--map", "--json", uri]).stdout)
    return merge_extents([(m["offset"], m["length"], m["type"]) for m in entries])


def test_map_matches_file_holes(nbdserver, make_image):
    layout = [
        (0, GRAIN, "data"),
        (GRAIN, 3 * GRAIN, "hole"),
        (4 * GRAIN, 2 * GRAIN, "data"),
        (6 * GRAIN, GRAIN, "hole"),
        (7 * GRAIN, GRAIN, "data"),
        (8 * GRAIN, 8 * GRAIN, "hole"),
    ]
    img = make_image("map.img", layout=layout)
    # The filesystem must agree with the layout, or the test is meaningless.
    assert file_extents(img.path) == [(o, n, k == "hole") for o, n, k in layout]
    srv = nbdserver({"disk": img})
    expected = [(o, n, 3 if k == "hole" else 0) for o, n, k in layout]
    assert map_of(srv.uri("disk")) == expected


def test_map_of_random_layout(nbdserver, make_image):
    img = make_image("rand.img", size=8 * MiB, seed=42)
    srv = nbdserver({"disk": (img, {"ro": True})})
    expected = [(o, n, 3 if hole else 0) for o, n, hole in file_extents(img.path)]
    assert len(expected) > 3
    assert map_of(srv.uri("disk")) == expected


def test_map_of_fully_sparse_and_fully_allocated(nbdserver, make_image):
    sparse = make_image("sparse.img", layout=[(0, 2 * MiB, "hole")])
    full = make_image("full.img", layout=[(0, 2 * MiB, "data")])
    srv = nbdserver({"sparse": sparse, "full": full})
    assert map_of(srv.uri("sparse")) == [(0, 2 * MiB, 3)]
    assert map_of(srv.uri("full")) == [(0, 2 * MiB, 0)]


def test_unknown_export_is_refused(nbdserver, image):
    srv = nbdserver({"disk": image})
    p = run(["nbdinfo", srv.uri("nosuch")], check=False)
    assert p.returncode != 0
    assert "nosuch" in p.stderr or "unknown" in p.stderr.lower() or "not" in p.stderr.lower()


def test_empty_name_needs_default_export(nbdserver, make_image):
    a = make_image("a.img", size=1 * MiB)
    b = make_image("b.img", size=2 * MiB)
    srv = nbdserver({"a": a, "b": b})
    p = run(["nbdinfo", "--size", srv.uri("")], check=False)
    assert p.returncode != 0, "empty export name accepted without --default-export"

    srv2 = nbdserver({"a": a, "b": b}, args=["--default-export", "b"])
    p = run(["nbdinfo", "--size", srv2.uri("")])
    assert int(p.stdout.strip()) == b.size


def test_map_of_odd_sized_files(nbdserver, make_image):
    """Extents end exactly at the export's end, not at a block boundary."""
    tail_hole = make_image("a.img", layout=[(0, 4096, "data"), (4096, 2 * 4096 + 1234, "hole")])
    tail_data = make_image("b.img", layout=[(0, 8192, "hole"), (8192, 5000, "data")])
    srv = nbdserver({"a": tail_hole, "b": tail_data})
    for name, img in (("a", tail_hole), ("b", tail_data)):
        expected = [(o, n, 3 if hole else 0) for o, n, hole in file_extents(img.path)]
        assert map_of(srv.uri(name)) == expected
        assert sum(n for _, n, _ in expected) == img.size


def test_empty_export(nbdserver, tmp_path):
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    srv = nbdserver({"empty": str(empty)})
    assert int(run(["nbdinfo", "--size", srv.uri("empty")]).stdout) == 0
