"""Deployment pieces as plain functions: certificates, node keys, the bundle pin, the egress log, outcomes."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest


class TestCertificates:
    def test_server_certificate_names_loopback_and_extra_hosts_and_chains_to_the_ca(self, tmp_path):
        """The server certificate carries localhost, 127.0.0.1 and every --host as SANs and is signed by the CA."""
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec

        from fedcollab.crypto import certificate_sans, make_trial_certificates

        c = make_trial_certificates(tmp_path, hosts=["coord.example.org", "10.0.0.7"])
        assert set(certificate_sans(c.server_cert)) == {"localhost", "127.0.0.1", "coord.example.org", "10.0.0.7"}
        ca = x509.load_pem_x509_certificate(c.ca_cert.read_bytes())
        srv = x509.load_pem_x509_certificate(c.server_cert.read_bytes())
        assert srv.issuer == ca.subject
        ca.public_key().verify(srv.signature, srv.tbs_certificate_bytes, ec.ECDSA(srv.signature_hash_algorithm))
        for key in (c.ca_key, c.server_key):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600

    def test_never_overwrites_a_private_key(self, tmp_path):
        """A second run into the same folder refuses instead of replacing the CA key."""
        from fedcollab.core import CryptoError
        from fedcollab.crypto import make_trial_certificates

        make_trial_certificates(tmp_path)
        before = (tmp_path / "ca.key").read_bytes()
        with pytest.raises(CryptoError):
            make_trial_certificates(tmp_path)
        assert (tmp_path / "ca.key").read_bytes() == before


class TestNodeAuthKey:
    def test_key_loads_as_flower_does_and_registers_as_pem(self, tmp_path):
        """The private key is OpenSSH P-384 (as flower-supernode reads it); the public key becomes PEM for RegisterNode."""
        from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_private_key

        from fedcollab.crypto import generate_node_auth_key, load_node_auth_public_key

        pub = generate_node_auth_key(tmp_path / "k")
        assert pub.startswith("ecdsa-sha2-nistp384 ")
        priv = load_ssh_private_key((tmp_path / "k").read_bytes(), password=None)
        pem = load_node_auth_public_key(tmp_path / "k.pub")
        assert load_pem_public_key(pem).public_numbers() == priv.public_key().public_numbers()

    def test_non_ec_key_is_refused(self, tmp_path):
        """An Ed25519 key is not a node key."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from fedcollab.core import CryptoError
        from fedcollab.crypto import load_node_auth_public_key

        line = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        with pytest.raises(CryptoError):
            load_node_auth_public_key(line.decode())
        with pytest.raises(CryptoError, match="missing.pub.*expected an OpenSSH public key"):
            load_node_auth_public_key("missing.pub")  # neither a key line nor an existing file: named


class TestBundle:
    def test_bundle_is_deterministic_and_carries_no_code(self):
        """Two builds have the same SHA-256 (a node can pin it) and the bundle holds only pyproject.toml and Flower's manifest."""
        import io
        import zipfile

        from fedcollab.node._deploy import approved_bundle_sha256, build_bundle

        fab, sha = build_bundle()
        assert sha == approved_bundle_sha256()
        names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
        assert not [n for n in names if n.endswith(".py")], names
        assert "pyproject.toml" in names


class TestEgressLog:
    @pytest.fixture(autouse=True)
    def _task(self, monkeypatch):
        # Flower stamps messages with the task's run id, set when a task pulls its input.
        from flwr.supercore.task_identity import TaskIdentity

        monkeypatch.setattr(TaskIdentity, "_run_id", 7, raising=False)
        monkeypatch.setattr(TaskIdentity, "_node_id", 2, raising=False)
        monkeypatch.setattr(TaskIdentity, "_task_id", 3, raising=False)

    def _reply(self, content):
        from flwr.app import ConfigRecord, Message, RecordDict

        req = Message(content=RecordDict({"config": ConfigRecord({"fedcollab.run_id": "r1", "server-round": 3})}), dst_node_id=1, message_type="train")
        req.metadata.__dict__["_message_id"] = req.object_id
        return req, Message(content=content, reply_to=req)

    def test_refusal_entry_shows_the_code_and_only_the_refusal(self, tmp_path):
        """A coded refusal is logged with its code, round, size, commitment and the kinds of ledger entries it carries."""
        from flwr.app import ConfigRecord, RecordDict

        from fedcollab.node._deploy import EgressLog, _remember_request

        lines = json.dumps([json.dumps({"kind": "refusal", "party": "a"})])
        req, reply = self._reply(RecordDict({"fedcollab.error": ConfigRecord({"code": 132}), "fedcollab.releases": ConfigRecord({"lines": lines})}))
        _remember_request(req)
        log = EgressLog(tmp_path / "egress.jsonl")
        e = log.record(reply, flower_run_id=7, fab_sha256="ab" * 32)
        assert (e["error_code"], e["round"], e["run_id"], e["ledger_kinds"]) == (132, 3, "r1", ["refusal"])
        assert e["records"] == ["fedcollab.error", "fedcollab.releases"] and e["bytes"] > 0
        assert e["content_sha256"] == reply.content.object_id
        assert json.loads((tmp_path / "egress.jsonl").read_text()) == e

    def test_commitment_changes_with_the_payload(self, tmp_path):
        """Two replies that differ in one metric have different commitments."""
        from flwr.app import MetricRecord, RecordDict

        from fedcollab.node._deploy import EgressLog

        log = EgressLog(tmp_path / "egress.jsonl")
        a = log.record(self._reply(RecordDict({"metrics": MetricRecord({"n": 1})}))[1], flower_run_id=1, fab_sha256=None)
        b = log.record(self._reply(RecordDict({"metrics": MetricRecord({"n": 2})}))[1], flower_run_id=1, fab_sha256=None)
        assert a["content_sha256"] != b["content_sha256"]
        assert len((tmp_path / "egress.jsonl").read_text().splitlines()) == 2


class TestOutcome:
    @pytest.mark.parametrize(("row", "code"), [
        ({"status": "running", "sub_status": "", "details": ""}, None),
        ({"status": "finished", "sub_status": "completed", "details": ""}, 0),
        ({"status": "finished", "sub_status": "failed", "details": "ServerApp failed with exception: fedcollab exit 9: NodeError"}, 9),
        ({"status": "finished", "sub_status": "failed", "details": "ServerApp failed with exception: boom"}, 8),
        ({"status": "finished", "sub_status": "stopped", "details": ""}, 8),
    ])
    def test_exit_code_of_a_run(self, row, code):
        """A run's true outcome: 0 only when completed, fedcollab's code when it failed with one, else transport failure."""
        from fedcollab.runner._deploy import outcome_code

        assert outcome_code(row) == code


class TestLocalSpec:
    def test_only_this_partners_source_is_replaced(self, heart_spec, tmp_path):
        """The node reads its own file; the other partners' entries are untouched."""
        from fedcollab.node._deploy import local_spec

        data = tmp_path / "mine.csv"
        s = local_spec(heart_spec, "hungary", data)
        by = {p.name: p for p in s.partners}
        assert by["hungary"].source.path == str(data.resolve()) and by["hungary"].source.where == {}
        assert by["cleveland"] == next(p for p in heart_spec.partners if p.name == "cleveland")

    def test_spec_round_trips_through_the_run_config(self, root):
        """The base64 run-config value decodes to the same spec at the coordinator and at the node."""
        from fedcollab.coordinator._deploy import decode_spec, encode_spec
        from fedcollab.node._deploy import decode_run_spec

        text = (root / "specs" / "heart-disease.toml").read_text()
        _, a = decode_spec(encode_spec(text))
        b = decode_run_spec(encode_spec(text))
        assert a.model_dump() == b.model_dump() and a.name == "heart-disease"

    @pytest.mark.parametrize("value", ["not base64!", "//79", "W1s="])  # not base64, not UTF-8, not TOML
    def test_a_run_config_spec_that_does_not_decode_is_a_bad_request(self, value):
        """A spec value that is not base64 UTF-8 TOML is a ConfigError naming the key, which a node answers with 120."""
        from fedcollab.core import ConfigError, NodeErrorCode, node_code_for
        from fedcollab.node._deploy import RUN_CONFIG_SPEC, decode_run_spec

        with pytest.raises(ConfigError, match=RUN_CONFIG_SPEC) as exc:
            decode_run_spec(value)
        assert node_code_for(exc.value) == NodeErrorCode.BAD_REQUEST


class TestApprovedRunSpec:
    """Issue 14 item 1: the node parses its OWN approved copy, selected by the SHA-256 of the sent bytes."""

    def test_unapproved_spec_is_refused_with_the_code(self, root, tmp_path):
        from fedcollab.coordinator._deploy import encode_spec
        from fedcollab.core import NodeCoded, NodeErrorCode, node_code_for
        from fedcollab.node._deploy import approved_run_spec

        text = (root / "specs" / "heart-disease.toml").read_text()
        with pytest.raises(NodeCoded) as exc:
            approved_run_spec(tmp_path, encode_spec(text))
        assert node_code_for(exc.value) == NodeErrorCode.SPEC_NOT_APPROVED

    def test_approved_spec_is_parsed_from_the_nodes_copy(self, root, tmp_path):
        from fedcollab.coordinator._deploy import encode_spec
        from fedcollab.node._deploy import approved_run_spec
        from fedcollab.node._home import NodeHome

        text = (root / "specs" / "heart-disease.toml").read_text()
        NodeHome(tmp_path).approve_spec(text.encode())
        assert approved_run_spec(tmp_path, encode_spec(text)).name == "heart-disease"

    def test_one_byte_off_is_refused(self, root, tmp_path):
        from fedcollab.coordinator._deploy import encode_spec
        from fedcollab.core import NodeCoded
        from fedcollab.node._deploy import approved_run_spec
        from fedcollab.node._home import NodeHome

        text = (root / "specs" / "heart-disease.toml").read_text()
        NodeHome(tmp_path).approve_spec(text.encode())
        with pytest.raises(NodeCoded):
            approved_run_spec(tmp_path, encode_spec(text + " "))


class TestSpecEnforcement:
    """Issue 14 item 1: the ClientApp a deployed node answers with is built from its own approved copy, or refuses with 142."""

    PARTNER = "hungary"

    def _node(self, root, tmp_path, data):
        from fedcollab.node import init_node_home
        from fedcollab.node._deploy import NodeDeployment
        from fedcollab.privacy.accounting import public_key_hex
        from fedcollab.runner._run import simulated_policy
        from fedcollab.spec import load_spec

        spec = load_spec(root / "specs" / "heart-disease.toml")
        home = init_node_home(tmp_path / self.PARTNER, partner=self.PARTNER, policy=simulated_policy(spec, self.PARTNER))
        roster = {self.PARTNER: home.public_key(), "coordinator": public_key_hex(init_node_home(tmp_path / "coord", partner="coord").key())}
        return NodeDeployment(home=home.root, partner=self.PARTNER, data=data, roster=roster, approved_bundles=frozenset()), home

    def _send(self, app, message_type, cfg, flower_run_id=1):
        import time
        import uuid

        from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

        from fedcollab.protocols.wire import RecordKey

        meta = Metadata(run_id=flower_run_id, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=600.0, message_type=message_type)
        msg = Message(content=RecordDict({RecordKey.CONFIG: ConfigRecord({"fedcollab.run_id": "r1", **cfg})}), metadata=meta)
        ctx = Context(run_id=flower_run_id, node_id=7, node_config={"partner": self.PARTNER}, state=RecordDict(), run_config={})
        return msg, app(msg, ctx)

    def test_unapproved_spec_refuses_every_message_with_142_and_releases_nothing(self, root, tmp_path, monkeypatch):
        """Setup, train and evaluate of an unapproved spec: each reply is code 142 alone, nothing is read, charged or released."""
        from flwr.supercore.task_identity import TaskIdentity

        from fedcollab.coordinator._deploy import encode_spec
        from fedcollab.node._deploy import RUN_CONFIG_SPEC, EgressLog, _remember_request
        from fedcollab.protocols.wire import RecordKey

        monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
        monkeypatch.setattr(TaskIdentity, "_node_id", 7, raising=False)
        monkeypatch.setattr(TaskIdentity, "_task_id", 3, raising=False)
        missing = tmp_path / "never-read.csv"  # the data file does not even exist: a refusal must not need it
        node, home = self._node(root, tmp_path, missing)
        ledger_before = home.ledger_path.read_text() if home.ledger_path.exists() else ""
        run_config = {RUN_CONFIG_SPEC: encode_spec((root / "specs" / "heart-disease.toml").read_text())}
        egress = EgressLog(tmp_path / "egress.jsonl")
        for message_type, cfg in [("query", {"fedcollab.kind": "setup", "scaling": "none"}), ("train", {"server-round": 1}),
                                  ("evaluate", {"server-round": 1})]:
            msg, reply = self._send(node.client_app(run_config, flower_run_id=1), message_type, cfg)
            assert not reply.has_error()
            assert list(reply.content.keys()) == [RecordKey.ERROR]  # no arrays, metrics, statistics or ledger entries
            assert dict(reply.content.config_records[RecordKey.ERROR]) == {"code": 142, "partner": self.PARTNER}
            _remember_request(msg)
            e = egress.record(reply, flower_run_id=1, fab_sha256=None)
            assert (e["error_code"], e["records"], e["ledger_kinds"]) == (142, ["fedcollab.error"], [])
        assert not node._apps  # nothing was built
        assert (home.ledger_path.read_text() if home.ledger_path.exists() else "") == ledger_before
        assert not missing.exists()

    def test_spec_approved_later_runs_in_the_next_run_only(self, root, tmp_path):
        """A refusal holds for the rest of its Flower run; the next run checks again and gets the app built from the node's copy."""
        from fedcollab.coordinator._deploy import encode_spec
        from fedcollab.node._deploy import RUN_CONFIG_SPEC
        from fedcollab.protocols.wire import RecordKey

        text = (root / "specs" / "heart-disease.toml").read_text()
        node, home = self._node(root, tmp_path, tmp_path / "data.csv")
        run_config = {RUN_CONFIG_SPEC: encode_spec(text)}
        first = node.client_app(run_config, flower_run_id=1)
        home.approve_spec(text.encode())
        _, reply = self._send(node.client_app(run_config, flower_run_id=1), "query", {"fedcollab.kind": "setup"})
        assert int(reply.content.config_records[RecordKey.ERROR]["code"]) == 142  # still run 1: refused
        app = node.client_app(run_config, flower_run_id=2)
        assert app is not first and list(node._apps.values()) == [app]
        assert node.client_app(run_config, flower_run_id=3) is app  # built once per spec
        # Withdrawing the approval (deleting the stored copy) refuses the very next message, without a restart.
        (home.root / "approved" / f"{hashlib.sha256(text.encode()).hexdigest()}.toml").unlink()
        _, reply = self._send(node.client_app(run_config, flower_run_id=3), "train", {"server-round": 1})
        assert int(reply.content.config_records[RecordKey.ERROR]["code"]) == 142 and not node._apps
        home.approve_spec(text.encode())
        # One byte off the approved spec is another spec: refused.
        _, reply = self._send(node.client_app({RUN_CONFIG_SPEC: encode_spec(text + " ")}, flower_run_id=3), "train", {"server-round": 1})
        assert int(reply.content.config_records[RecordKey.ERROR]["code"]) == 142

    def test_approved_app_is_built_from_the_nodes_own_copy(self, root, tmp_path, monkeypatch):
        """The ClientApp is built from the bytes in approved/<sha256>.toml, not from the run config's copy."""
        import fedcollab.node._client as client
        from fedcollab.coordinator._deploy import encode_spec
        from fedcollab.node._deploy import RUN_CONFIG_SPEC

        text = (root / "specs" / "heart-disease.toml").read_text()
        node, home = self._node(root, tmp_path, tmp_path / "data.csv")
        digest = home.approve_spec(text.encode())
        # Mark the node's copy (as if the partner's folder held a different, approved text under that hash).
        (home.root / "approved" / f"{digest}.toml").write_text(text.replace('name = "heart-disease"', 'name = "heart-disease-own-copy"', 1))
        built = []
        monkeypatch.setattr(client, "make_client_app", lambda spec, homes, roster: built.append(spec) or object())
        node.client_app({RUN_CONFIG_SPEC: encode_spec(text)}, flower_run_id=1)
        assert [s.name for s in built] == ["heart-disease-own-copy"]
        assert built[0].partners[[p.name for p in built[0].partners].index(self.PARTNER)].source.path == str((tmp_path / "data.csv").resolve())


class TestTaskHeartbeat:
    """A task's heartbeat must not stop the partner's node when the SuperNode no longer knows the task.

    Found by the deployment suite: a heartbeat that raced a finished (or abandoned) task made Flower's
    heartbeat function raise SIGINT in the node's process, whose handler stops the node; the node went
    down in the middle of a run. The client below answers as the SuperNode's runtime API does for such a
    task (``success = False``, or an HTTP error for a token it no longer accepts).
    """

    class _Runtime:
        def __init__(self, success: bool = True, status: int | None = None) -> None:
            self.success, self.status, self.calls = success, status, 0

        def SendTaskHeartbeat(self, req):  # noqa: N802 - Flower's method name
            import httpx
            from types import SimpleNamespace

            self.calls += 1
            if self.status is not None:
                request = httpx.Request("POST", "http://127.0.0.1/v1/runtime/send-task-heartbeat")
                raise httpx.HTTPStatusError("refused", request=request, response=httpx.Response(self.status, request=request))
            return SimpleNamespace(success=self.success)

    def _sigints(self, fn):
        import signal

        got = []
        old = signal.signal(signal.SIGINT, lambda *_: got.append(1))
        try:
            result = fn()
        finally:
            signal.signal(signal.SIGINT, old)
        return result, len(got)

    def test_flowers_own_heartbeat_raises_sigint_for_an_unknown_task(self):
        """Why the node has its own: Flower 1.42's function raises SIGINT in the process (if this changes, ours can go)."""
        from flwr.supercore.heartbeat import make_task_heartbeat_fn_http

        _, sigints = self._sigints(make_task_heartbeat_fn_http(self._Runtime(success=False)))
        assert sigints == 1

    @pytest.mark.parametrize("success, status", [(False, None), (True, 401), (True, 500)])
    def test_ours_marks_the_task_gone_and_raises_nothing(self, success, status):
        import threading

        from fedcollab.node._deploy import task_heartbeat

        gone = threading.Event()
        ok, sigints = self._sigints(task_heartbeat(self._Runtime(success=success, status=status), gone))
        assert (ok, sigints, gone.is_set()) == (True, 0, True)

    @pytest.mark.parametrize("status", [503, 504])
    def test_ours_retries_an_unavailable_supernode_and_keeps_a_live_task(self, status):
        import threading

        from fedcollab.node._deploy import task_heartbeat

        gone = threading.Event()
        assert task_heartbeat(self._Runtime(status=status), gone)() is False and not gone.is_set()
        assert task_heartbeat(self._Runtime(success=True), gone)() is True and not gone.is_set()
