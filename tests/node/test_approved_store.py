"""The node's approved-specs store (issue 14 item 1): pinned by SHA-256 in the node folder."""
import hashlib

from fedcollab.node._home import NodeHome

SPEC = b'[run]\nname = "demo"\n'


def test_approved_spec_returns_nodes_copy(tmp_path):
    home = NodeHome(tmp_path)
    digest = home.approve_spec(SPEC)
    assert digest == hashlib.sha256(SPEC).hexdigest()
    assert (tmp_path / "approved" / f"{digest}.toml").read_bytes() == SPEC
    assert home.approved_spec(SPEC) == SPEC


def test_unapproved_and_one_byte_off_are_refused(tmp_path):
    home = NodeHome(tmp_path)
    assert home.approved_spec(SPEC) is None
    home.approve_spec(SPEC)
    assert home.approved_spec(SPEC[:-1] + b" ") is None
