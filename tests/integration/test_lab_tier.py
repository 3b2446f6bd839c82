"""The `lab` security tier (issue 13, docs/security.md): no authentication,
but guards against accidents.

- The server says at start, once and at warn level, that nothing is
  authenticated.
- One writer per view: while a node's view is attached from one address, an
  attach from another is refused, naming both. Two source addresses come
  from raw clients bound to 127.0.0.2 and 127.0.0.3 (Linux routes all of
  127/8 to the loopback interface, so no namespace is needed).
- Address pinning: `admin pin NODE ADDRESS` / `unpin`, and --pin-addresses.
- Canonical export names: spelling tricks are refused and leave the store
  as it was.
- The audit log of admin changes.
"""

import json
import os

import pytest

from nbdraw import RawClient, REP_ACK
from storeutil import admin, make_store, serve_store


def test_start_warns_once_that_nothing_is_authenticated(nbdserver, tmp_path):
    store, _ = make_store(tmp_path)
    srv = serve_store(nbdserver, store)
    lines = [l for l in srv.stderr().splitlines() if "no authentication" in l]
    assert len(lines) == 1, srv.stderr()
    assert " warning " in lines[0], lines[0]
    # It says what the tier guards against, and what it does not.
    for word in ("one writer per view", "spoof"):
        assert word in lines[0], lines[0]
