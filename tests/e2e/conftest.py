"""Fixtures for the VM boot tests. See nodelab.py for the pieces and the
environment variables.

- `kernel` (session): Debian's linux-image-6.1.0-*-amd64, unpacked, cached.
- `initrd` (session): our own initrd (initrd-hooks/mkinitrd.sh) for it.
- `lab`: a store with generation g1 of image `lab` (a busybox test root),
  nbdserver serving it on a free fixed port, and `lab.boot(...)`.
  On failure the consoles and the server log are copied to
  $NBDROOT_E2E_LOGS (default <cache>/logs/<test>) and attached to the report.
"""

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import nodelab  # noqa: E402


def _skip_reason():
    missing = [t for t in ("qemu-system-x86_64", "apt-get", "dpkg", "mke2fs", "cpio")
               if shutil.which(t) is None]
    if missing:
        return f"missing tools: {' '.join(missing)} (run scripts/install-deps.sh)"
    if not os.path.exists("/bin/busybox"):
        return "no /bin/busybox (busybox-static; run scripts/install-deps.sh)"
    if os.geteuid() != 0:
        return "the e2e tests unpack packages and build images as root"
    return None


@pytest.fixture(scope="session")
def tools():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    nbdserver = nodelab.find_binary("NBDSERVER", "build*/nbdserver/nbdserver")
    if not nbdserver:
        pytest.skip("no nbdserver binary (build it, or set NBDSERVER)")
    handmade = os.environ.get("NBDROOT_E2E_STORE") == "handmade"
    imagebuilder = nodelab.find_binary("IMAGEBUILDER", "build*/imagebuilder/imagebuilder")
    if not imagebuilder and not handmade:
        pytest.skip("no imagebuilder binary (build it, or set IMAGEBUILDER): the e2e tests "
                    "build their generations with it. Developers without it can set "
                    "NBDROOT_E2E_STORE=handmade to lay them out with mke2fs instead.")
    return {"nbdserver": nbdserver, "imagebuilder": imagebuilder, "handmade": handmade}


@pytest.fixture(scope="session")
def kernel(tools):
    return nodelab.fetch_kernel()


@pytest.fixture(scope="session")
def initrd(kernel, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("initrd") / "initrd.img")
    path, size, report = nodelab.make_initrd(kernel, out)
    print(f"\ninitrd: {report}")
    return path


@pytest.fixture
def lab(request, tools, kernel, initrd, tmp_path):
    store = nodelab.Store(str(tmp_path / "store"), tools["nbdserver"], tools["imagebuilder"],
                          tools["handmade"])
    tree = nodelab.make_test_tree(str(tmp_path / "tree-g1"), "g1")
    gen = store.build("lab", tree, "g1")
    store.publish("lab", gen)
    server = nodelab.Server(tools["nbdserver"], store.path, str(tmp_path)).start()
    lab = nodelab.Lab(str(tmp_path), kernel, initrd, server, store)
    lab.first_generation = gen
    request.node._lab = lab
    yield lab
    for v in lab.vms:
        v.kill()
    # A test may have replaced lab.server (another network, other flags):
    # stop that one too, or it outlives the run (it did: a --tls require
    # server of test_tls_boot was still running after CI ended).
    for s in (server, lab.server):
        rc = s.stop()
        assert rc in (0, None) or s.proc is None, f"nbdserver exit status {rc}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    lab = getattr(item, "_lab", None)
    if lab is None or report.when != "call" or not report.failed:
        return
    logs = os.environ.get("NBDROOT_E2E_LOGS") or os.path.join(nodelab.cache_dir(), "logs")
    dest = os.path.join(logs, item.name)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest, exist_ok=True)
    for v in lab.vms:
        if os.path.exists(v.console_path):
            shutil.copy(v.console_path, dest)
        report.sections.append((f"console of {v.name} (kept in {dest})", v.console()[-6000:]))
    shutil.copy(lab.server.log, dest)
    report.sections.append(("nbdserver log", lab.server.text()[-4000:]))
