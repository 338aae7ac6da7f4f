"""Deployment end to end: a coordinator and four partner nodes as separate processes on loopback.

One module-scoped deployment (real ``flower-superlink`` and ``flower-supernode`` processes over TLS
with node authentication, started through the ``fedcollab`` CLI) serves every test here, in file
order: a plain 2-round Heart run, federated trees under secagg, an unregistered node, a policy
refusal (with a node that did not approve the run's spec), a coordinator restart (a plain run,
a tree run, then a server-blind HE run), a killed node, a three-party vertical run. Each partner approves each spec with
``fedcollab node approve`` before it is submitted, as a partner does in deployment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTNERS = ["cleveland", "hungary", "switzerland", "va-long-beach"]
REFUSER = "va-long-beach"  # its policy allows plain aggregation only
UNAPPROVER = "switzerland"  # does not approve the secagg spec: its node refuses that run with 142

# Run by `make test-deployment` (CI runs it after `make test`): ~5 minutes of real processes.
pytestmark = [pytest.mark.slow, pytest.mark.deployment]


def _env() -> dict[str, str]:
    from fedcollab.runner._deploy import flower_env

    return flower_env({"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})


def fc(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the ``fedcollab`` command in a child process."""
    return subprocess.run([sys.executable, "-m", "fedcollab", *args], env=_env(), capture_output=True, text=True, timeout=timeout)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a short ``fedcollab`` command (approve, keygen, register-node, nodes, status, certs) in this process.

    The same CLI code as ``fc``; a child process would pay ~2.5 s of imports for each of the
    some thirty short commands here. The long-lived ones (coordinator, nodes, submit) are processes.
    """
    from typer.testing import CliRunner

    from fedcollab.cli import app

    r = CliRunner().invoke(app, list(args))
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``fedcollab ARGS`` in its own process group (killed whole at teardown)."""
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedcollab", *args], env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop(*procs: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal process groups we started, then wait for their leaders (SIGKILL after 20 s)."""
    for proc in procs:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@dataclass
class Deployment:
    base: Path
    coord: Path
    address: str
    ca: Path
    coordinator: subprocess.Popen[bytes] | None = None
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)
    intruder: subprocess.Popen[bytes] | None = None

    def spec(self, name: str, rounds: int, aggregation: str = "plain", *, unapproved: tuple[str, ...] = (), training: str = "") -> Path:
        """Write the spec; every partner but ``unapproved`` approves it with `fedcollab node approve` (a node runs only what it approved)."""
        import hashlib

        text = (ROOT / "specs" / "heart-disease.toml").read_text().replace("rounds = 20", f"rounds = {rounds}" + (f"\n{training}" if training else ""))
        text = text.replace('aggregation = "plain"', f'aggregation = "{aggregation}"')
        path = self.base / f"{name}.toml"
        path.write_text(text)
        for partner in PARTNERS:
            if partner in unapproved:
                continue
            r = cli("node", "approve", str(path), "--home", str(self.base / "nodes" / partner), "--format", "json")
            assert r.returncode == 0, r.stderr[-2000:]
            assert json.loads(r.stdout)["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        return path

    def start_coordinator(self) -> None:
        self.coordinator = spawn(["coordinator", "start", "--home", str(self.coord), "--certs", str(self.base / "certs"),
                                  "--port", self.address.rsplit(":", 1)[1]], self.base / "coordinator.log")

    def wait_online(self, n: int = 4, timeout: float = 120) -> None:
        """Until the SuperLink answers and ``n`` nodes are online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = cli("coordinator", "nodes", "--home", str(self.coord), "--format", "json")
            if r.returncode == 0 and sum(x["status"] == "online" for x in json.loads(r.stdout)) >= n:
                return
            time.sleep(1)
        raise AssertionError(f"fewer than {n} nodes online after {timeout} s")

    def submit(self, spec: Path, *extra: str) -> tuple[int, dict]:
        r = fc("submit", str(spec), "--home", str(self.coord), "--format", "json", "--timeout", "300", *extra, timeout=330)
        assert r.stdout.strip(), r.stderr[-3000:]
        return r.returncode, json.loads(r.stdout.strip().splitlines()[-1])

    def wait_for(self, spec: Path, pattern: str, ready=lambda path: True, timeout: float = 180) -> Path:  # type: ignore[no-untyped-def]
        """The first file ``runs/<id>/<pattern>`` of the run of ``spec`` (its spec.toml) that is ``ready``, polled every 0.2 s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in self.coord.glob(f"runs/*/{pattern}"):
                rd = self.coord / "runs" / path.relative_to(self.coord / "runs").parts[0]
                if (rd / "spec.toml").exists() and (rd / "spec.toml").read_text() == spec.read_text() and ready(path):
                    return path
            time.sleep(0.2)
        raise AssertionError(f"no {pattern} of the run of {spec.name} within {timeout} s")

    def approve(self, spec: Path) -> None:
        """Every partner approves ``spec`` with `fedcollab node approve`."""
        for partner in PARTNERS:
            assert cli("node", "approve", str(spec), "--home", str(self.base / "nodes" / partner)).returncode == 0

    @contextmanager
    def refuser_allows(self, *modes: str) -> Iterator[None]:
        """REFUSER's policy allows ``modes`` (besides plain) while the block runs; its narrow policy comes back after."""
        from fedcollab.spec import load_policy, policy_toml

        path = self.base / "nodes" / REFUSER / "policy.toml"
        narrow = path.read_text()
        path.write_text(policy_toml(load_policy(path).model_copy(update={"allowed_aggregation": ["plain", *modes]})))
        try:
            yield
        finally:
            path.write_text(narrow)

    def interrupt_and_resume(self, spec: Path, checkpoint: str, log_name: str) -> tuple[Path, dict[str, str], int, dict]:
        """Submit ``spec``, SIGKILL the coordinator once ``checkpoint`` is written, restart it, `submit --resume` the run.

        Returns (the interrupted run's folder, every node's ledger text at the kill, the resumed submit's code and row).
        """
        proc = spawn(["submit", str(spec), "--home", str(self.coord), "--format", "json", "--timeout", "300"], self.base / log_name)
        self.extra.append(proc)
        old = self.wait_for(spec, f"checkpoints/{checkpoint}").parents[1]
        assert self.coordinator is not None
        stop(self.coordinator, sig=signal.SIGKILL)  # the SuperLink, its SuperExec and the ServerApp die together
        stop(proc)
        ledgers_before = {n: (self.base / "nodes" / n / "ledger.jsonl").read_text() for n in PARTNERS}
        self.start_coordinator()
        self.wait_online()  # the nodes reconnect by themselves
        code, row = self.submit(spec, "--resume", old.name)
        return old, ledgers_before, code, row

    def run_dir(self, flower_run_id: int) -> Path:
        return self.coord / "runs" / str(flower_run_id)

    def egress(self, partner: str, flower_run_id: int) -> list[dict]:
        path = self.base / "nodes" / partner / "egress.jsonl"
        return [e for e in map(json.loads, path.read_text().splitlines()) if e["flower_run_id"] == flower_run_id]


def _require_flower_binaries() -> None:
    # Fail loudly, never skip: this test is the deployment's proof.
    for exe in ("flower-superlink", "flower-supernode"):
        if not (Path(sys.executable).parent / exe).exists() and shutil.which(exe) is None:
            pytest.fail(f"{exe} is not installed next to {sys.executable}: install fedcollab[node,coordinator]")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Certificates, a coordinator, four registered nodes with their own data files; torn down whole."""
    import pandas as pd

    from fedcollab.crypto import generate_signing_key
    from fedcollab.data._source import embedded_path
    from fedcollab.node import init_node_home
    from fedcollab.privacy.accounting import public_key_hex
    from fedcollab.runner._deploy import free_port
    from fedcollab.spec import NodePolicy, Roster, RosterEntry

    _require_flower_binaries()
    base = tmp_path_factory.mktemp("deploy")
    r = cli("certs", str(base / "certs"), "--format", "json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["sans"]) >= {"localhost", "127.0.0.1"}
    coord = base / "coordinator"
    coord.mkdir()
    parties = {"coordinator": RosterEntry(signing_key=public_key_hex(generate_signing_key(coord / "signing_key.pem")), role="coordinator")}
    rows = pd.read_csv(embedded_path("heart_disease_uci.csv"), dtype=str, keep_default_na=False, na_values=[""])
    hospitals = {"cleveland": "Cleveland", "hungary": "Hungary", "switzerland": "Switzerland", "va-long-beach": "VA Long Beach"}
    for name in PARTNERS:
        # min_test_rows = 10: Switzerland's test split has 16 rows, under the policy default of 20 (as simulated partners).
        policy = NodePolicy(partner=name, allow_non_private_training=True, min_test_rows=10, allowed_model_kinds=["logistic_regression", "mlp", "gbdt"],
                            allowed_aggregation=["plain"] if name == REFUSER else ["plain", "secagg", "he"])
        home = init_node_home(base / "nodes" / name, partner=name, policy=policy)
        parties[name] = RosterEntry(signing_key=home.public_key())
        rows[rows["dataset"] == hospitals[name]].to_csv(base / f"{name}.csv", index=False)
    roster = Roster(parties=parties).model_dump_json(indent=2)
    (coord / "roster.json").write_text(roster)
    (base / "roster.json").write_text(roster)  # each partner's copy, exchanged out of band
    d = Deployment(base=base, coord=coord, address=f"127.0.0.1:{free_port()}", ca=base / "certs" / "ca.crt")
    try:
        d.start_coordinator()
        keys = []
        for name in PARTNERS:
            r = cli("node", "keygen", str(base / "nodes" / name), "--format", "json")
            assert r.returncode == 0, r.stderr
            keys.append(json.loads(r.stdout)["public_key_file"])
        deadline = time.monotonic() + 90
        while True:  # the SuperLink takes a few seconds to listen
            r = cli("coordinator", "register-node", *keys, "--home", str(coord), "--format", "json")
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.returncode == 0, r.stderr[-2000:]
        assert len({e["node_id"] for e in json.loads(r.stdout)}) == 4
        for name in PARTNERS:
            d.nodes[name] = spawn(["node", "start", str(base / "nodes" / name), "--data", str(base / f"{name}.csv"), "--roster",
                                   str(base / "roster.json"), "--superlink", d.address, "--ca", str(d.ca)], base / f"node-{name}.log")
        # A node whose key was never registered (a copy of cleveland's folder with a fresh key).
        intruder = base / "nodes" / "intruder"
        shutil.copytree(base / "nodes" / "cleveland", intruder, ignore=shutil.ignore_patterns("flower_auth_key*"))
        assert cli("node", "keygen", str(intruder)).returncode == 0
        d.intruder = spawn(["node", "start", str(intruder), "--data", str(base / "cleveland.csv"), "--roster", str(base / "roster.json"),
                            "--superlink", d.address, "--ca", str(d.ca)], base / "node-intruder.log")
        d.extra.append(d.intruder)
        yield d
    finally:
        stop(*d.extra, *d.nodes.values(), *([d.coordinator] if d.coordinator else []))


def test_plain_run_completes_over_tls_with_node_auth(deployment):
    """The Heart spec runs 2 rounds to completion; submit and status report the true outcome; every reply is in each egress log."""
    d = deployment
    code, row = d.submit(d.spec("heart-2", rounds=2))
    assert code == 0 and row["status"] == "finished" and row["sub_status"] == "completed", row
    run_id = row["run_id"]
    st = json.loads((d.run_dir(run_id) / "status.json").read_text())
    assert st["state"] == "completed" and [r["round"] for r in st["rounds"]] == [1, 2]
    assert all(sorted(r["partners"]) == PARTNERS for r in st["rounds"])
    assert st["accuracy"] > 0.6
    r = cli("status", str(run_id), "--home", str(d.coord), "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["exit_code"] == 0
    for name in PARTNERS:
        out = d.egress(name, run_id)
        # setup, train 1, train 2 (carrying round 1's evaluation), evaluate 2, countersign: five messages left the node, no more.
        assert [(e["message_type"], e["round"]) for e in out] == [("query", 0), ("train", 1), ("train", 2), ("evaluate", 2), ("query", 0)]
        assert all(e["error_code"] is None and e["bytes"] > 0 and len(e["content_sha256"]) == 64 for e in out)
        assert out[1]["records"] == ["arrays", "fedcollab.releases", "metrics"] and out[1]["ledger_kinds"] == ["release"]
        assert out[2]["records"] == ["arrays", "fedcollab.eval", "fedcollab.releases", "metrics"] and out[2]["ledger_kinds"] == ["release", "release"]
        assert out[-1]["ledger_kinds"] == ["countersign"]
    assert all(r["accuracy"] is not None for r in st["rounds"])  # round 1 evaluated through round 2's train message
    # The coordinator's run ledger, with every node's entries and countersignatures, verifies offline.
    from fedcollab.audit import verify_ledger
    from fedcollab.spec import Roster

    rep = verify_ledger(d.run_dir(run_id) / "ledger.jsonl", Roster.model_validate_json((d.coord / "roster.json").read_text()))
    assert int(rep.exit_code) == 0, rep.findings


def test_gbdt_under_secagg_over_tls(deployment):
    """Issue 15: federated trees over TLS under SecAgg+; model.json is a real XGBoost model; the ledger verifies.

    REFUSER's partner first allows secure aggregation in its policy (a node reads its policy at every
    run; restored after). Each tree step's sums leave every node masked (the coordinator sees only
    totals); the written model loads in xgboost and scores as fedcollab's own scorer does.
    """
    import hashlib

    import numpy as np

    from fedcollab.audit import verify_ledger
    from fedcollab.protocols.gbdt import from_xgboost_json
    from fedcollab.spec import Roster

    xgb = pytest.importorskip("xgboost")
    d = deployment
    text = (ROOT / "specs" / "heart-disease-gbdt.toml").read_text().replace('aggregation = "plain"', 'aggregation = "secagg"')
    text = text.replace("n_trees = 50", "n_trees = 2").replace("max_depth = 3", "max_depth = 2")
    spec = d.base / "gbdt-secagg.toml"
    spec.write_text(text)
    d.approve(spec)
    with d.refuser_allows("secagg"):
        code, row = d.submit(spec)
    assert code == 0 and row["sub_status"] == "completed", (row, (d.base / "coordinator.log").read_text()[-3000:])
    run_id = row["run_id"]
    st = json.loads((d.run_dir(run_id) / "status.json").read_text())
    assert st["state"] == "completed" and [r["round"] for r in st["rounds"]] == [1, 2], st
    assert all(sorted(r["partners"]) == PARTNERS for r in st["rounds"]), st["rounds"]
    assert st["auc"] > 0.7, st
    for name in PARTNERS:
        out = d.egress(name, run_id)
        assert out and all(e["error_code"] is None for e in out), out
        trains = [e for e in out if e["message_type"] == "train"]
        # Every tree step's reply carries its sums masked (the "secagg" record), never as plain arrays.
        assert len(trains) >= 2 * 2 and all("secagg" in e["records"] and "arrays" not in e["records"] for e in trains), trains
    path = d.run_dir(run_id) / "model.json"
    assert st["model"] == {"path": "model.json", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "format": "xgboost-json"}
    ensemble, _ = from_xgboost_json(path.read_bytes())
    booster = xgb.Booster(model_file=str(path))
    assert booster.num_boosted_rounds() == 2 == len(ensemble.trees)
    x = np.random.default_rng(0).uniform(-1, 2, size=(50, len(ensemble.feature_names))) * 100
    x[::7, 0] = np.nan  # missing values follow each split's default direction in both scorers
    got = booster.predict(xgb.DMatrix(x, feature_names=list(ensemble.feature_names)))
    np.testing.assert_allclose(got, ensemble.predict_proba(x), atol=1e-6, rtol=0)
    rep = verify_ledger(d.run_dir(run_id) / "ledger.jsonl", Roster.model_validate_json((d.coord / "roster.json").read_text()))
    assert int(rep.exit_code) == 0, rep.findings


def test_unregistered_node_is_rejected(deployment):
    """A node whose key the coordinator never registered is refused by the SuperLink: `node start` exits 12, nothing leaves."""
    d = deployment
    assert d.intruder is not None
    assert d.intruder.wait(120) == 12, (d.base / "node-intruder.log").read_text()[-2000:]
    assert "refused this node's key" in (d.base / "node-intruder.log").read_text()
    assert not (d.base / "nodes" / "intruder" / "egress.jsonl").exists()
    r = cli("coordinator", "nodes", "--home", str(d.coord), "--format", "json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 4


def test_forbidden_mode_is_refused_with_a_code_only(deployment):
    """A run asking for secure aggregation is refused by the node whose policy allows plain only: one coded refusal leaves it.

    The same run's spec was never approved by UNAPPROVER's partner: its node answers with code 142
    (SPEC_NOT_APPROVED) alone, charges and releases nothing.
    """
    d = deployment
    ledger_before = (d.base / "nodes" / REFUSER / "ledger.jsonl").read_text().count("\n")
    unapproved_ledger = (d.base / "nodes" / UNAPPROVER / "ledger.jsonl").read_text()
    code, row = d.submit(d.spec("heart-secagg", rounds=2, aggregation="secagg", unapproved=(UNAPPROVER,)))
    assert code == 9 and row["sub_status"] == "failed", row  # NODE_FAILED, the run's true outcome
    out = d.egress(REFUSER, row["run_id"])
    assert len(out) == 1, out
    (e,) = out
    assert e["error_code"] == 132 and e["records"] == ["fedcollab.error", "fedcollab.releases"] and e["ledger_kinds"] == ["refusal"]
    lines = (d.base / "nodes" / REFUSER / "ledger.jsonl").read_text().splitlines()[ledger_before:]
    assert [json.loads(x)["kind"] for x in lines] == ["refusal"]
    assert "POLICY_REFUSED" in (d.base / "nodes" / REFUSER / "node.log").read_text()
    st = json.loads((d.run_dir(row["run_id"]) / "status.json").read_text())
    assert st["state"] == "failed" and 132 in st["node_codes"].values()
    # The node that did not approve the spec: code 142 alone, no ledger entry, nothing released.
    out = d.egress(UNAPPROVER, row["run_id"])
    assert [(e["error_code"], e["records"], e["ledger_kinds"]) for e in out] == [(142, ["fedcollab.error"], [])], out
    assert (d.base / "nodes" / UNAPPROVER / "ledger.jsonl").read_text() == unapproved_ledger
    assert "SPEC_NOT_APPROVED" in (d.base / "nodes" / UNAPPROVER / "node.log").read_text()
    assert st["node_codes"].get(UNAPPROVER) == 142, st["node_codes"]


def test_coordinator_restart_resumes_from_checkpoint(deployment):
    """Kill the coordinator mid-run, restart it: nodes reconnect, the run resumes after its checkpoint, no release is lost."""
    d = deployment
    spec = d.spec("heart-3", rounds=3)
    old, ledgers_before, code, row = d.interrupt_and_resume(spec, "checkpoint.npz", "submit-interrupted.log")
    assert code == 0, row
    new = d.run_dir(row["run_id"])
    st, old_st = json.loads((new / "status.json").read_text()), json.loads((old / "status.json").read_text())
    after = st["resumed_after_round"]
    assert after >= 1 and [r["round"] for r in st["rounds"]] == list(range(after + 1, 4))
    assert st["fedcollab_run_id"] == old_st["fedcollab_run_id"]
    for n in PARTNERS:
        text = (d.base / "nodes" / n / "ledger.jsonl").read_text()
        assert text.startswith(ledgers_before[n])  # nothing lost, only appended
        rounds = [json.loads(x)["round"] for x in text[len(ledgers_before[n]):].splitlines()
                  if json.loads(x)["kind"] == "release" and json.loads(x)["body"]["release"]["kind"] == "model_update"]
        resumed = list(range(after + 1, 4))
        # The resumed run charged its rounds as new releases; before them, at most the interrupted
        # run's in-flight round (its reply was charged at the node even though the coordinator died).
        assert rounds[len(rounds) - len(resumed):] == resumed and all(r == after + 1 for r in rounds[:len(rounds) - len(resumed)])
    run_ledger = (new / "ledger.jsonl").read_text()
    assert run_ledger.startswith((old / "ledger.jsonl").read_text())


def test_coordinator_restart_resumes_a_gbdt_run_after_its_last_tree(deployment):
    """Issue 15/13: kill the coordinator during a tree run, restart it: `submit --resume` continues after the last
    checkpointed tree; every node rebuilds its margins from the trees it applied; the model has every tree."""
    import hashlib

    d = deployment
    text = (ROOT / "specs" / "heart-disease-gbdt.toml").read_text().replace("n_trees = 50", "n_trees = 4").replace("max_depth = 3", "max_depth = 2")
    spec = d.base / "gbdt-resume.toml"
    spec.write_text(text)
    d.approve(spec)
    old, ledgers_before, code, row = d.interrupt_and_resume(spec, "checkpoint.npz", "submit-gbdt-interrupted.log")
    assert code == 0, (row, (d.base / "coordinator.log").read_text()[-3000:])
    new = d.run_dir(row["run_id"])
    st = json.loads((new / "status.json").read_text())
    after = st["resumed_after_round"]
    assert 1 <= after < 4 and [r["round"] for r in st["rounds"]] == list(range(after + 1, 5)), st
    assert st["fedcollab_run_id"] == json.loads((old / "status.json").read_text())["fedcollab_run_id"]
    for n in PARTNERS:
        assert (d.base / "nodes" / n / "ledger.jsonl").read_text().startswith(ledgers_before[n])  # nothing lost, only appended
        assert all(e["error_code"] is None for e in d.egress(n, row["run_id"]))  # every node recognised the trees it applied
    path = new / "model.json"
    assert st["model"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(json.loads(path.read_text())["learner"]["gradient_booster"]["model"]["trees"]) == 4
    assert (new / "ledger.jsonl").read_text().startswith((old / "ledger.jsonl").read_text())


def test_coordinator_restart_resumes_an_he_run(deployment):
    """Issue 13 (resume in every mode): kill the coordinator during a server-blind HE run, restart it: `submit --resume`
    continues from the encrypted checkpoint; every partner reloads the run's key from its own folder (none is generated or
    sent again), the resumed rounds leave only encrypted, and the model writer writes the final model the run ledger names."""
    import hashlib

    d = deployment
    spec = d.base / "he-resume.toml"
    spec.write_text((ROOT / "specs" / "heart-disease-he.toml").read_text().replace("rounds = 20", "rounds = 5"))
    d.approve(spec)
    with d.refuser_allows("he"):
        old, ledgers_before, code, row = d.interrupt_and_resume(spec, "checkpoint.he.json", "submit-he-interrupted.log")
    assert code == 0, (row, (d.base / "coordinator.log").read_text()[-3000:])
    new = d.run_dir(row["run_id"])
    st = json.loads((new / "status.json").read_text())
    after = st["resumed_after_round"]
    assert 1 <= after < 5 and [r["round"] for r in st["rounds"]] == list(range(after + 1, 6)), st
    run_id = st["fedcollab_run_id"]
    assert run_id == json.loads((old / "status.json").read_text())["fedcollab_run_id"]
    for n in PARTNERS:
        text = (d.base / "nodes" / n / "ledger.jsonl").read_text()
        assert text.startswith(ledgers_before[n])  # nothing lost, only appended
        events = [e["body"]["event"] for e in map(json.loads, text[len(ledgers_before[n]):].splitlines()) if e["kind"] == "key_custody"]
        assert len(events) == 1 and events[0].startswith("reloaded from this partner's folder"), (n, events)
        out = d.egress(n, row["run_id"])
        assert out and all(e["error_code"] is None for e in out), out
        trains = [e for e in out if e["message_type"] == "train"]
        assert len(trains) == 5 - after and all("he.upload" in e["records"] and "arrays" not in e["records"] for e in trains), trains
    model = d.base / "nodes" / "cleveland" / "he" / f"{run_id}-model.npz"
    final = [json.loads(x)["body"] for x in (new / "ledger.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "key_custody" and json.loads(x)["body"].get("model_sha256")]
    assert [b["model_sha256"] for b in final] == [hashlib.sha256(model.read_bytes()).hexdigest()]
    assert (new / "ledger.jsonl").read_text().startswith((old / "ledger.jsonl").read_text())


def test_a_killed_node_is_a_dropout_within_the_stage_deadline(deployment):
    """Issue 13 (faults): a node killed mid-run stalls no stage past `training.stage_timeout`; the run finishes without it.

    Runs last: the killed node stays down.
    """
    d = deployment
    victim = "va-long-beach"
    spec = d.spec("heart-kill", rounds=3, training="min_partners = 3\nstage_timeout = 5")
    assert "stage_timeout = 5" in spec.read_text()
    proc = spawn(["submit", str(spec), "--home", str(d.coord), "--format", "json", "--timeout", "300"], d.base / "submit-kill.log")
    d.extra.append(proc)
    started = d.wait_for(spec, "status.json", ready=lambda p: bool(json.loads(p.read_text()).get("rounds")))  # round 1 done
    stop(d.nodes[victim], sig=signal.SIGKILL)  # gone, not refusing: no reply will ever come
    t_kill = time.monotonic()
    assert proc.wait(240) == 0, (d.base / "submit-kill.log").read_text()[-3000:]
    elapsed = time.monotonic() - t_kill
    st = json.loads(started.read_text())
    assert st["state"] == "completed" and [r["round"] for r in st["rounds"]] == [1, 2, 3], st
    assert victim in st["rounds"][0]["partners"] and victim not in st["rounds"][-1]["partners"]
    assert sorted(st["rounds"][-1]["partners"]) == sorted(p for p in PARTNERS if p != victim)
    # Each remaining exchange waited at most the stage deadline for the dead node, never the 600 s run timeout.
    assert elapsed < 120, elapsed


def test_vertical_secureboost_across_three_nodes(deployment):
    """Issue 16 item 6: a vertical Heart spec between three more nodes on the same SuperLink: a clinic holding the label
    and two passive parties (the lab's columns split between an ECG lab and a stress-test lab, which misses 40 ids).

    The coordinator relays sealed bytes only; each node enforces its own policy, logs its egress,
    keeps its own part of the model; the run ledger verifies offline. Runs last: the hospital
    nodes of the other collaboration stay connected (and are left alone), the killed one down.
    """
    from fedcollab.data._source import embedded_path
    from fedcollab.node import init_node_home
    from fedcollab.spec import NodePolicy, Roster, RosterEntry, VerticalPolicy
    from tests.conftest import three_party_vertical_spec

    d = deployment
    text = (ROOT / "specs" / "heart-disease-vertical.toml").read_text().replace("n_trees = 30", "n_trees = 2").replace("max_depth = 3", "max_depth = 2")
    text = three_party_vertical_spec(text, d.base)  # writes ecg.csv and stress.csv next to the nodes' folders
    files = {"clinic": embedded_path("heart_vertical_clinic.csv"), "ecg": d.base / "ecg.csv", "stress": d.base / "stress.csv"}
    passive = ["ecg", "stress"]
    roster = Roster.model_validate_json((d.coord / "roster.json").read_text())
    parties = dict(roster.parties)
    for name in files:
        policy = NodePolicy(partner=name, allow_non_private_training=True, allowed_model_kinds=["gbdt", "logistic_regression"],
                            test_metrics="public", min_test_rows=10, vertical=VerticalPolicy(allowed=True, min_intersection=100))
        parties[name] = RosterEntry(signing_key=init_node_home(d.base / "nodes" / name, partner=name, policy=policy).public_key())
    text_roster = Roster(parties=parties).model_dump_json(indent=2)
    (d.coord / "roster.json").write_text(text_roster)  # the coordinator reads its roster at every run
    (d.base / "roster-vertical.json").write_text(text_roster)
    keys = []
    for name in files:
        r = cli("node", "keygen", str(d.base / "nodes" / name), "--format", "json")
        assert r.returncode == 0, r.stderr
        keys.append(json.loads(r.stdout)["public_key_file"])
    assert cli("coordinator", "register-node", *keys, "--home", str(d.coord), "--format", "json").returncode == 0
    procs = {name: spawn(["node", "start", str(d.base / "nodes" / name), "--data", str(f), "--roster",
                          str(d.base / "roster-vertical.json"), "--superlink", d.address, "--ca", str(d.ca)], d.base / f"node-{name}.log")
             for name, f in files.items()}
    d.extra.extend(procs.values())
    spec = d.base / "vertical.toml"
    spec.write_text(text)
    for name in files:
        assert cli("node", "approve", str(spec), "--home", str(d.base / "nodes" / name)).returncode == 0
    d.wait_online(n=len(PARTNERS) - 1 + len(files))
    code, row = d.submit(spec)
    assert code == 0 and row["sub_status"] == "completed", (row, (d.base / "coordinator.log").read_text()[-3000:])
    st = json.loads((d.run_dir(row["run_id"]) / "status.json").read_text())
    v = st["vertical"]
    assert st["state"] == "completed" and v["label_holder"] == "clinic" and v["passive_parties"] == passive, st
    assert 100 <= v["intersection"] <= 644 - 40 and v["n_train"] + v["n_test"] == v["intersection"] and v["trees"] == 2
    assert st["auc"] > 0.7
    # Each part of the model is at its own node; the passive parties' thresholds appear nowhere at the coordinator.
    clinic_part = d.base / "nodes" / "clinic" / v["model_parts"]["clinic"]["model_part"]
    trees = json.loads(clinic_part.read_text())["trees"]
    all_entries = 0
    for i, name in enumerate(passive, start=1):
        entries = json.loads((d.base / "nodes" / name / v["model_parts"][name]["model_part"]).read_text())["entries"]
        assert all({"feature", "bin_index", "threshold"} <= set(e) for e in entries), entries
        # The label holder's part holds each passive party's splits as references only (no threshold).
        theirs = [n for t in trees for n in t if n["owner"] == i and n["left"] >= 0]
        assert len(theirs) == len(entries) and all(n["threshold"] != n["threshold"] for n in theirs), (name, theirs)
        all_entries += len(entries)
    assert all_entries > 0  # at least one split on a passive party's feature
    # The coordinator's files hold no part: no tree node, no lookup entry.
    coordinator_view = "".join(p.read_text(errors="replace") for p in d.run_dir(row["run_id"]).rglob("*") if p.is_file())
    assert "bin_index" not in coordinator_view and "default_left" not in coordinator_view
    # Every message that left each vertical node is in its egress log, none refused; the hospitals were left alone.
    for name in files:
        out = d.egress(name, row["run_id"])
        assert out and all(e["message_type"] == "query" and e["error_code"] is None for e in out), out
        assert out[-1]["ledger_kinds"] == ["countersign"]
    kinds = {k for name in files for e in d.egress(name, row["run_id"]) for k in e["ledger_kinds"]}
    assert {"release", "countersign"} <= kinds
    from fedcollab.audit import verify_ledger

    # The auditor checks it with this collaboration's public keys (the coordinator's and the three parties').
    mine = Roster(parties={k: e for k, e in parties.items() if k in ("coordinator", *files)})
    rep = verify_ledger(d.run_dir(row["run_id"]) / "ledger.jsonl", mine)
    assert int(rep.exit_code) == 0, rep.findings

    # Joint scoring with the deployed model (`submit --score RUN`): a fresh PSI, each node's own part, the scores at the clinic only.
    trained = st["fedcollab_run_id"]
    code, row = d.submit(spec, "--score", trained)
    assert code == 0 and row["sub_status"] == "completed", (row, (d.base / "coordinator.log").read_text()[-3000:])
    sst = json.loads((d.run_dir(row["run_id"]) / "status.json").read_text())
    sv = sst["vertical"]
    assert sst["scoring"] == trained and sv["model"] == "scoring" and sv["scored"] == sv["intersection"] == v["intersection"], sv
    scores = (d.base / "nodes" / "clinic" / sv["model_parts"]["clinic"]["model_part"]).read_text().splitlines()
    assert scores[0] == "id,score,predicted" and len(scores) == 1 + v["intersection"]
    view = "".join(p.read_text(errors="replace") for p in d.run_dir(row["run_id"]).rglob("*") if p.is_file())
    assert scores[1].split(",")[1] not in view, "no score reached the coordinator"
    assert int(verify_ledger(d.run_dir(row["run_id"]) / "ledger.jsonl", mine).exit_code) == 0

    # Vertical logistic regression on the same nodes: the clinic and the ECG lab (two parties, two CKKS keys);
    # the stress lab is not a partner of this spec and refuses its hello, left alone.
    lr = d.base / "vertical-lr.toml"
    lr.write_text(_two_party_lr_spec(d.base))
    for name in ("clinic", "ecg"):
        assert cli("node", "approve", str(lr), "--home", str(d.base / "nodes" / name)).returncode == 0
    code, row = d.submit(lr)
    assert code == 0 and row["sub_status"] == "completed", (row, (d.base / "coordinator.log").read_text()[-3000:])
    st = json.loads((d.run_dir(row["run_id"]) / "status.json").read_text())
    v = st["vertical"]
    assert v["model"] == "vertical-logistic-regression" and v["iterations"] == 8 and v["passive_parties"] == ["ecg"], v
    assert st["auc"] > 0.7
    weights = json.loads((d.base / "nodes" / "ecg" / v["model_parts"]["ecg"]["model_part"]).read_text())
    assert v["model_parts"]["ecg"]["model_part"].endswith("weights.json") and len(weights["weights"]) == 1 + 3 + 2  # fbs, cp (3), restecg (2)
    # The ECG lab's weights stay at the ECG lab: none of them is in the coordinator's files.
    coordinator_view = "".join(p.read_text(errors="replace") for p in d.run_dir(row["run_id"]).rglob("*") if p.is_file())
    assert not any(repr(w) in coordinator_view for w in weights["weights"])
    rep = verify_ledger(d.run_dir(row["run_id"]) / "ledger.jsonl", Roster(parties={k: e for k, e in parties.items() if k in ("coordinator", "clinic", "ecg")}))
    assert int(rep.exit_code) == 0, rep.findings
    assert not d.egress("stress", row["run_id"]) or all(e["error_code"] is not None for e in d.egress("stress", row["run_id"]))

    # Kill the coordinator during a vertical LR run (once the clinic has checkpointed), restart it, `submit --resume`:
    # the nodes, still running, go on from their own checkpoints with no second PSI; nothing in their ledgers is lost.
    lr2 = d.base / "vertical-lr-resume.toml"
    lr2.write_text(_two_party_lr_spec(d.base).replace("rounds = 8 ", "rounds = 10 "))
    for name in ("clinic", "ecg"):
        assert cli("node", "approve", str(lr2), "--home", str(d.base / "nodes" / name)).returncode == 0
    proc = spawn(["submit", str(lr2), "--home", str(d.coord), "--format", "json", "--timeout", "300"], d.base / "submit-vlr-interrupted.log")
    d.extra.append(proc)
    old_status = d.wait_for(lr2, "status.json", ready=lambda p: "fedcollab_run_id" in p.read_text())
    run_id = json.loads(old_status.read_text())["fedcollab_run_id"]
    ck = d.base / "nodes" / "clinic" / "vertical" / run_id / "checkpoint.json"
    deadline = time.monotonic() + 180
    while not ck.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ck.exists(), (d.base / "coordinator.log").read_text()[-3000:]
    stop(d.coordinator, sig=signal.SIGKILL)
    stop(proc)
    before = {n: (d.base / "nodes" / n / "ledger.jsonl").read_text() for n in ("clinic", "ecg")}
    d.start_coordinator()
    d.wait_online(n=len(PARTNERS) - 1 + len(files))
    code, row = d.submit(lr2, "--resume", old_status.parent.name)
    assert code == 0 and row["sub_status"] == "completed", (row, (d.base / "coordinator.log").read_text()[-3000:])
    st = json.loads((d.run_dir(row["run_id"]) / "status.json").read_text())
    assert st["fedcollab_run_id"] == run_id and st["vertical"]["resumed"] is True and st["vertical"]["iterations"] == 10, st
    for name in ("clinic", "ecg"):
        text = (d.base / "nodes" / name / "ledger.jsonl").read_text()
        assert text.startswith(before[name])  # nothing lost, only appended
        rel = [e["body"]["release"] for e in map(json.loads, text.splitlines()) if e["kind"] == "release" and e["run_id"] == run_id]
        assert sum(1 for r in rel if r["kind"] == "psi_intersection") == 1, name
        its = [r["details"]["iteration"] for r in rel if r["kind"] == "vertical_gradient"]
        assert set(its) == set(range(10)) and len(its) <= 10 + 1, (name, its)  # at most the in-flight iteration charged twice
        assert not ck.exists() and not (d.base / "nodes" / name / "vertical" / run_id / "checkpoint.json").exists()
    assert (d.run_dir(row["run_id"]) / "ledger.jsonl").read_text().startswith((old_status.parent / "ledger.jsonl").read_text())
    # Entries whose reply the kill lost came back with the resumed hello: every node's chain is whole, the ledger verifies.
    rep = verify_ledger(d.run_dir(row["run_id"]) / "ledger.jsonl", Roster(parties={k: e for k, e in parties.items() if k in ("coordinator", "clinic", "ecg")}))
    assert int(rep.exit_code) == 0, rep.findings
    stop(*procs.values())


def _two_party_lr_spec(base) -> str:
    """The vertical LR Heart spec between the clinic and the ECG lab only (its files written by ``three_party_vertical_spec``)."""
    from tests.conftest import three_party_vertical_spec

    text = three_party_vertical_spec((ROOT / "specs" / "heart-disease-vertical-lr.toml").read_text().replace("rounds = 60 ", "rounds = 8 "), base)
    text = text[:text.index('[[partners]]\nname = "stress"')] + text[text.index("[schema]"):]
    old = 'features = ["age", "sex", "trestbps", "chol", "cp", "fbs", "restecg", "thalch", "exang", "oldpeak"]'
    assert old in text and "rounds = 8 " in text, "the vertical LR spec changed"
    return text.replace(old, 'features = ["age", "sex", "trestbps", "chol", "cp", "fbs", "restecg"]')
