"""Deployment benchmark: the Heart spec on loopback in deployment against the same spec in simulation.

Deployment: ``fedcollab coordinator start`` (flower-superlink, TLS, node authentication, state
database) and four ``fedcollab node start`` processes (flower-supernode ``--isolation process`` plus
fedcollab's executor), each node reading its own hospital's CSV; ``fedcollab submit`` launches the
run. Simulation: ``fedcollab.run`` of the same spec (Flower's simulation engine, in-process).

Reported: per-round seconds (mean over rounds 2..N: round 1 pays one-off costs, listed apart),
seconds per message exchange (in deployment a plain round is one exchange, train carrying the
previous round's evaluation, except the last round, which evaluates on its own: rounds 2..N-1 are
one exchange each), the ratio of deployment to simulation round time, and the final pooled
accuracy in deployment. Ends with one
JSON line ``{"deploy_round_seconds", "deploy_vs_simulation_round", "deploy_acc"}``.

Run:  .venv/bin/python benchmarks/deploy.py [--rounds 5] [--poll 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT  # noqa: E402 - sets Flower's offline environment first

HOSPITALS = {"cleveland": "Cleveland", "hungary": "Hungary", "switzerland": "Switzerland", "va-long-beach": "VA Long Beach"}


def _env() -> dict[str, str]:
    from fedcollab.runner._deploy import flower_env

    return flower_env({"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})


def _fc(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedcollab", *args], env=_env(), capture_output=True, text=True, timeout=timeout)


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedcollab", *args], env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def deploy(base: Path, spec_path: Path, poll: float) -> dict:
    """Set up a loopback deployment, run the spec, tear everything down; returns the coordinator's status.json."""
    import pandas as pd

    from fedcollab.crypto import generate_signing_key, make_trial_certificates
    from fedcollab.data._source import embedded_path
    from fedcollab.node import init_node_home
    from fedcollab.privacy.accounting import public_key_hex
    from fedcollab.runner._deploy import free_port
    from fedcollab.spec import NodePolicy, Roster, RosterEntry

    make_trial_certificates(base / "certs")
    coord = base / "coordinator"
    coord.mkdir()
    parties = {"coordinator": RosterEntry(signing_key=public_key_hex(generate_signing_key(coord / "signing_key.pem")), role="coordinator")}
    rows = pd.read_csv(embedded_path("heart_disease_uci.csv"), dtype=str, keep_default_na=False, na_values=[""])
    for name, hospital in HOSPITALS.items():
        home = init_node_home(base / "nodes" / name, partner=name, policy=NodePolicy(partner=name, allow_non_private_training=True))
        parties[name] = RosterEntry(signing_key=home.public_key())
        rows[rows["dataset"] == hospital].to_csv(base / f"{name}.csv", index=False)
    (coord / "roster.json").write_text(Roster(parties=parties).model_dump_json())
    address = f"127.0.0.1:{free_port()}"
    procs = [_spawn(["coordinator", "start", "--home", str(coord), "--certs", str(base / "certs"), "--port", address.split(":")[1]], base / "coordinator.log")]
    try:
        keys = []
        for name in HOSPITALS:
            r = _fc("node", "keygen", str(base / "nodes" / name), "--format", "json")
            keys.append(json.loads(r.stdout)["public_key_file"])
        for _ in range(90):
            r = _fc("coordinator", "register-node", *keys, "--home", str(coord))
            if r.returncode == 0:
                break
            time.sleep(1)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        for name in HOSPITALS:
            # Each partner approves the spec it runs (its node refuses any other with code 142).
            r = _fc("node", "approve", str(spec_path), "--home", str(base / "nodes" / name))
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-2000:])
            procs.append(_spawn(["node", "start", str(base / "nodes" / name), "--data", str(base / f"{name}.csv"), "--roster", str(coord / "roster.json"),
                                 "--superlink", address, "--ca", str(base / "certs" / "ca.crt"), "--poll", str(poll)], base / f"node-{name}.log"))
        r = _fc("submit", str(spec_path), "--home", str(coord), "--format", "json", "--timeout", "900", timeout=960)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        if r.returncode != 0:
            raise RuntimeError(f"deployment run failed: {row}")
        status = json.loads((coord / "runs" / str(row["run_id"]) / "status.json").read_text())
        status["run_seconds"] = status["finished"] - status["started"]
        return status
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def simulate(spec_path: Path, out: Path) -> list[float]:
    """Per-round seconds of the same spec on Flower's simulation engine."""
    import fedcollab

    res = fedcollab.run(spec_path, out=out)
    return [r.seconds for r in res.rounds]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--poll", type=float, default=0.3, help="fedcollab node start --poll (0 = Flower's own 3 s idle polling)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedcollab-deploy-bench-") as tmp:
        base = Path(tmp)
        spec_path = base / "heart.toml"
        spec_path.write_text((ROOT / "specs" / "heart-disease.toml").read_text().replace("rounds = 20", f"rounds = {args.rounds}"))
        t0 = time.perf_counter()
        st = deploy(base / "deploy", spec_path, args.poll)
        deploy_wall = time.perf_counter() - t0
        sim = simulate(spec_path, base / "sim")
    dep = [r["seconds"] for r in st["rounds"]]
    dep_round = statistics.mean(dep[1:]) if len(dep) > 1 else dep[0]
    sim_round = statistics.mean(sim[1:]) if len(sim) > 1 else sim[0]
    print(f"Heart spec, {args.rounds} rounds, 4 nodes on loopback (TLS, node auth), SuperNode poll cap {args.poll} s")
    per_msg = statistics.mean(dep[1:-1]) if len(dep) > 2 else dep_round / 2
    print(f"  deployment: round 1 {dep[0]:.2f} s, rounds 2..{len(dep)} mean {dep_round:.2f} s, last round (2 exchanges) {dep[-1]:.2f} s; "
          f"{per_msg:.2f} s per message exchange; run {st['run_seconds']:.1f} s, whole benchmark set-up and run {deploy_wall:.1f} s")
    print(f"  simulation: round 1 {sim[0]:.2f} s, rounds 2..{len(sim)} mean {sim_round:.2f} s")
    print(f"  ratio deployment / simulation per round: {dep_round / sim_round:.1f}x; final pooled accuracy in deployment {st['accuracy']:.3f}")
    print(json.dumps({"deploy_round_seconds": round(dep_round, 3), "deploy_vs_simulation_round": round(dep_round / sim_round, 2),
                      "deploy_acc": round(float(st["accuracy"]), 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
