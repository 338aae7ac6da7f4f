"""A vertical run end to end through `fedcollab run`: alignment, SecureBoost, the books, the refusals.

One short run (2 trees of depth 2 on the embedded Heart vertical split) is shared by the module;
the protocol itself is tested as plain functions in tests/protocols/test_secureboost.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcollab.cli import app
from fedcollab.core import ExitCode, NodeErrorCode

runner = CliRunner()


def _small_spec(root: Path, tmp: Path, *, privacy: str = 'mode = "none"', extra: str = "", trees: int = 2, depth: int = 2) -> Path:
    text = (root / "specs" / "heart-disease-vertical.toml").read_text()
    text = text.replace("n_trees = 30", f"n_trees = {trees}").replace("max_depth = 3", f"max_depth = {depth}")
    text = text.replace('[privacy]\nmode = "none"', "[privacy]\n" + privacy) + extra
    path = tmp / "vertical.toml"
    path.write_text(text)
    return path


def _nodes(spec: Path, out: Path) -> None:
    """The simulated partners' node folders a run would create (policy derived from the spec)."""
    from fedcollab.runner._run import prepare_simulated_nodes
    from fedcollab.spec import load_spec

    prepare_simulated_nodes(load_spec(spec), out / "nodes")
    assert (out / "nodes" / "lab" / "policy.toml").read_text().count("[vertical]\nallowed = true") == 1


@pytest.fixture(scope="module")
def vertical_run(root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vertical")
    spec = _small_spec(root, tmp, trees=3, depth=3)
    out = tmp / "out"
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_summary_and_model_parts(vertical_run):
    """The run aligned the shared patients, trained, evaluated, and left each model part at its own node."""
    out, s = vertical_run
    assert s["status"] == "completed" and s["layout"] == "vertical" and s["trees"] == 3
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["run_id"] == s["run_id"]
    # 644 ids are shared; rows missing one side's own features are dropped by that side first.
    assert 100 <= s["intersection"] <= 644 and s["n_train"] + s["n_test"] == s["intersection"]
    assert s["metrics"]["test_auc"] > 0.7
    model = Path(s["model_parts"]["clinic"]["path"])
    lookup = Path(s["model_parts"]["lab"]["path"])
    assert model.is_relative_to(out / "nodes" / "clinic") and lookup.is_relative_to(out / "nodes" / "lab")
    assert json.loads(lookup.read_text())["entries"], "the lab won at least one split"


def test_summary_follows_the_published_schema_and_predict_names_a_broken_field(vertical_run, root, tmp_path):
    """summary.json validates against schemas/vertical-summary.schema.json; `predict` on a summary whose
    model part's sha256 is not one, or with no model parts, exits CONFIG_INVALID naming the field."""
    import shutil

    import jsonschema

    out, _ = vertical_run
    summary = json.loads((out / "summary.json").read_text())
    jsonschema.validate(summary, json.loads((root / "schemas" / "vertical-summary.schema.json").read_text()))
    emb = root / "fedcollab" / "data" / "embedded"
    for broken, field in ((lambda d: d["model_parts"]["lab"].update(sha256="not-a-digest"), "model_parts.lab.sha256"),
                          (lambda d: d.pop("model_parts"), "model_parts")):
        run = tmp_path / field
        shutil.copytree(out, run, ignore=shutil.ignore_patterns("nodes"))
        doc = json.loads((run / "summary.json").read_text())
        broken(doc)
        (run / "summary.json").write_text(json.dumps(doc))
        r = runner.invoke(app, ["predict", "--model", str(run), "--data", str(emb / "heart_vertical_clinic.csv"),
                                "--party-data", f"lab={emb / 'heart_vertical_lab.csv'}", "--nodes", str(out / "nodes")])
        assert r.exit_code == int(ExitCode.CONFIG_INVALID), r.output
        assert field in " ".join(r.output.split()), r.output


def test_lab_thresholds_stay_at_the_lab(vertical_run):
    """No threshold of the lab's splits appears in the clinic's folder, the run ledger or the summary."""
    out, s = vertical_run
    entries = json.loads(Path(s["model_parts"]["lab"]["path"]).read_text())["entries"]
    # Splits of a 0/1 column sit at 0.5 whatever the data (public); the others are the lab's private quantiles.
    private = [float(e["threshold"]) for e in entries if float(e["threshold"]) != 0.5]
    assert private, "the lab won a split on a numeric column"
    seen: set[float] = set()

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            seen.add(float(x))

    docs = [p for p in (out / "nodes" / "clinic").rglob("*.json")] + [out / "summary.json"]
    for p in docs:
        walk(json.loads(p.read_text()))
    for line in (out / "ledger.jsonl").read_text().splitlines():
        walk(json.loads(line))
    leaked = [t for t in private if t in seen and t * 2 != round(t * 2)]  # round values also occur by chance (counts, bounds)
    assert not leaked, leaked
    clinic_model = json.loads(Path(s["model_parts"]["clinic"]["path"]).read_text())
    passive_nodes = [n for t in clinic_model["trees"] for n in t if n.get("owner") == 1]
    assert passive_nodes and all(math.isnan(n["threshold"]) for n in passive_nodes), "the clinic holds only a reference"


def test_every_release_is_on_the_books_and_the_ledger_verifies(vertical_run, tmp_path):
    out, s = vertical_run
    lines = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    rel = [e["body"]["release"] for e in lines if e["kind"] == "release"]
    kinds = {(r["party"], r["kind"], r["observer"]) for r in rel}
    assert ("lab", "vertical_histogram", "label_holder") in kinds
    assert ("lab", "vertical_partition", "label_holder") in kinds
    assert ("clinic", "vertical_partition", "passive_party") in kinds
    assert ("clinic", "test_metrics", "coordinator") in kinds
    # The alignment ran ECDH-PSI: each party recorded the intersection it revealed to the other (declared, with its size).
    psi = {r["party"]: r for r in rel if r["kind"] == "psi_intersection"}
    assert psi["clinic"]["observer"] == "passive_party" and psi["lab"]["observer"] == "label_holder"
    assert psi["clinic"]["declared_public"] and psi["clinic"]["details"]["size"] == psi["lab"]["details"]["size"] == s["intersection"]
    assert psi["lab"]["details"]["membership"] is True
    # 3 trees x 3 levels of bin sums from the lab, each checked against its budget before it left.
    assert sum(1 for r in rel if r["kind"] == "vertical_histogram") == 9
    assert {e["kind"] for e in lines} >= {"release", "receipt", "close", "countersign"}
    r = runner.invoke(app, ["audit", "verify", str(out / "ledger.jsonl"), "--roster", str(out / "roster.json"), "--format", "json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    lab = [g for g in rep["spend"] if g["party"] == "lab" and g["observer"] == "label_holder"]
    assert lab and lab[0]["epsilon"] is None, "non-private bin sums: epsilon is infinite against the label holder"
    # Tampering with one recorded release is detected.
    text = (out / "ledger.jsonl").read_text().splitlines()
    i = next(k for k, x in enumerate(text) if '"vertical_histogram"' in x)
    text[i] = text[i].replace('"vertical_histogram"', '"vertical_partition"', 1)
    bad = tmp_path / "ledger.jsonl"
    bad.write_text("\n".join(text) + "\n")
    r = runner.invoke(app, ["audit", "verify", str(bad), "--roster", str(out / "roster.json"), "--format", "json"])
    assert r.exit_code == int(ExitCode.LEDGER_TAMPERED), r.output


def test_record_dp_charges_the_lab(root, tmp_path):
    """Under record DP the lab's bin sums are noisy and charged to its budget toward the label holder."""
    spec = _small_spec(root, tmp_path, privacy='mode = "record"\ntarget_epsilon = 2.0\ndelta = 1e-5',
                       extra="")
    text = spec.read_text().replace("n_bins = 16", "n_bins = 16\ndp_split = \"histogram\"").replace("min_intersection = 100", "min_intersection = 100\npassive_bins = \"public\"")
    spec.write_text(text)
    out = tmp_path / "out"
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    plan = s["privacy"]["plan"]
    assert plan["epsilon"] <= 2.0 + 1e-9 and plan["observer"] == "label_holder"
    r = runner.invoke(app, ["audit", "verify", str(out / "ledger.jsonl"), "--roster", str(out / "roster.json"), "--format", "json"])
    assert r.exit_code == 0, r.output
    lab = next(g for g in json.loads(r.stdout)["spend"] if g["party"] == "lab" and g["observer"] == "label_holder")
    assert lab["epsilon"] is not None and 0 < lab["epsilon"] <= 2.0 * (1 + 1e-6)
    assert lab["epsilon"] == pytest.approx(s["privacy"]["parties"]["lab"]["epsilon"]["label_holder"], rel=1e-6)


def test_a_node_that_does_not_join_vertical_runs_refuses(root, tmp_path):
    """The lab's own policy says no: the run stops before alignment, the refusal is in its ledger, no model."""
    spec = _small_spec(root, tmp_path)
    out = tmp_path / "out"
    _nodes(spec, out)
    policy = out / "nodes" / "lab" / "policy.toml"
    policy.write_text(policy.read_text().replace("[vertical]\nallowed = true", "[vertical]\nallowed = false"))
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--format", "json"])
    assert r.exit_code == int(ExitCode.POLICY_REFUSED), r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "failed" and "model_parts" not in s
    lab_ledger = [json.loads(x) for x in (out / "nodes" / "lab" / "ledger.jsonl").read_text().splitlines()]
    assert lab_ledger[-1]["kind"] == "refusal" and lab_ledger[-1]["run_id"] == s["run_id"]
    assert not list((out / "nodes" / "lab" / "vertical").glob(f"{s['run_id']}/*"))


def test_too_small_an_intersection_is_refused(root, tmp_path):
    """A node's minimum intersection holds even when the spec asks for less."""
    spec = _small_spec(root, tmp_path)
    out = tmp_path / "out"
    _nodes(spec, out)
    policy = out / "nodes" / "clinic" / "policy.toml"
    policy.write_text(policy.read_text().replace("min_intersection = 100", "min_intersection = 5000"))
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--format", "json"])
    assert r.exit_code == int(ExitCode.POLICY_REFUSED), r.output
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"


def test_audit_report_lists_the_vertical_releases(vertical_run, tmp_path):
    out, _ = vertical_run
    r = runner.invoke(app, ["audit", "report", str(out / "ledger.jsonl"), "--roster", str(out / "roster.json"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "vertical\\_histogram" in md and "vertical\\_partition" in md and "label\\_holder" in md


def test_vertical_logistic_regression_runs_and_charges_both_ways(root, tmp_path):
    """`kind = "logistic_regression"`: each party's gradient for the other is a release, charged under record DP."""
    text = (root / "specs" / "heart-disease-vertical-lr.toml").read_text().replace("rounds = 60", "rounds = 8")
    text = text.replace('[privacy]\nmode = "none"', '[privacy]\nmode = "record"\ntarget_epsilon = 3.0\ndelta = 1e-5')
    spec = tmp_path / "vlr.toml"
    spec.write_text(text)
    out = tmp_path / "out"
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["model"] == "vertical-logistic-regression" and s["iterations"] == 8
    assert s["privacy"]["plan"]["epsilon"] <= 3.0 + 1e-9
    weights = json.loads(Path(s["model_parts"]["lab"]["path"]).read_text())
    assert Path(s["model_parts"]["lab"]["path"]).is_relative_to(out / "nodes" / "lab") and "intercept" not in weights
    assert len(weights["weights"]) == len(weights["features"]) and "cp=asymptomatic" in weights["features"]
    lines = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    grads = [e["body"]["release"] for e in lines if e["kind"] == "release" and e["body"]["release"]["kind"] == "vertical_gradient"]
    assert sorted({(g["party"], g["observer"]) for g in grads}) == [("clinic", "passive_party"), ("lab", "label_holder")]
    assert len(grads) == 16 and all(g["mechanism"]["mechanism"] == "gaussian" for g in grads)
    r = runner.invoke(app, ["audit", "verify", str(out / "ledger.jsonl"), "--roster", str(out / "roster.json"), "--format", "json"])
    assert r.exit_code == 0, r.output
    spend = {(g["party"], g["observer"]): g["epsilon"] for g in json.loads(r.stdout)["spend"]}
    assert 0 < spend[("lab", "label_holder")] <= 3.0 * (1 + 1e-6) and 0 < spend[("clinic", "passive_party")] <= 3.0 * (1 + 1e-6)


def test_the_split_follows_the_ids_not_the_psi_order():
    """Fresh PSI scalars reorder the common records every run; the train/test split must not move."""
    import random

    from fedcollab.protocols.vertical import split_aligned

    ids = [f"id-{i}" for i in range(300)]
    shuffled = random.Random(1).sample(ids, len(ids))
    tr1, te1 = split_aligned(ids, test_fraction=0.34, seed=16)
    tr2, te2 = split_aligned(shuffled, test_fraction=0.34, seed=16)
    assert {ids[i] for i in te1} == {shuffled[i] for i in te2} and len(te1) == 102 and len(tr1) == 198
    _, te3 = split_aligned(ids, test_fraction=0.34, seed=17)
    assert {ids[i] for i in te3} != {ids[i] for i in te1}


def test_spec_validate_describes_a_vertical_spec(root):
    r = runner.invoke(app, ["spec", "validate", str(root / "specs" / "heart-disease-vertical.toml")])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "vertical" in text and "label holder clinic" in text and "SecureBoost" in text and "scaling" not in text


def test_joint_scoring_of_new_ids_reproduces_the_runs_test_auc(vertical_run, root, tmp_path):
    """`fedcollab predict` on a vertical run: PSI on the ids, each party's part at its node; the test ids score as in the run."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from fedcollab.protocols.vertical import split_aligned

    out, s = vertical_run
    emb = root / "fedcollab" / "data" / "embedded"
    clinic, lab = pd.read_csv(emb / "heart_vertical_clinic.csv"), pd.read_csv(emb / "heart_vertical_lab.csv")
    clinic.drop(columns=["num"]).to_csv(tmp_path / "clinic_new.csv", index=False)  # no label needed to score
    lab.to_csv(tmp_path / "lab_new.csv", index=False)
    lab_ledger = out / "nodes" / "lab" / "ledger.jsonl"
    before = len(lab_ledger.read_text().splitlines())
    r = runner.invoke(app, ["predict", "--model", str(out), "--data", str(tmp_path / "clinic_new.csv"), "--party-data", f"lab={tmp_path / 'lab_new.csv'}",
                            "--out", str(tmp_path / "scores.csv"), "--format", "json"])
    assert r.exit_code == 0, r.output
    scores = pd.read_csv(tmp_path / "scores.csv", dtype={"id": str})
    assert len(scores) == s["intersection"]
    _, test = split_aligned(list(scores["id"]), test_fraction=0.34, seed=16)
    labels = clinic.assign(id=clinic["id"].astype(str)).set_index("id")["num"].gt(0).astype(int)
    t = scores.iloc[test]
    assert roc_auc_score(labels.loc[t["id"]].to_numpy(), t["score"].to_numpy()) == pytest.approx(s["metrics"]["test_auc"], abs=1e-9)
    new = [json.loads(x) for x in lab_ledger.read_text().splitlines()[before:]]
    kinds = sorted(e["body"]["release"]["kind"] for e in new if e["kind"] == "release")
    assert kinds == ["psi_intersection", "vertical_partition"] and all(e["run_id"].startswith("score-") for e in new)
    assert np.isfinite(scores["score"]).all()


def test_scoring_a_handful_of_ids_is_refused_and_parts_come_from_the_nodes(vertical_run, root, tmp_path):
    """A scoring batch below the nodes' vertical.min_intersection is refused before any decision leaves the lab;
    --nodes names where the node folders are; a run id that is not one (a path) is refused."""
    import shutil

    import pandas as pd

    out, s = vertical_run
    emb = root / "fedcollab" / "data" / "embedded"
    clinic, lab = pd.read_csv(emb / "heart_vertical_clinic.csv"), pd.read_csv(emb / "heart_vertical_lab.csv")
    clinic.drop(columns=["num"]).head(5).to_csv(tmp_path / "few.csv", index=False)
    lab.to_csv(tmp_path / "lab_new.csv", index=False)
    lab_ledger = out / "nodes" / "lab" / "ledger.jsonl"
    before = len(lab_ledger.read_text().splitlines())
    r = runner.invoke(app, ["predict", "--model", str(out), "--data", str(tmp_path / "few.csv"), "--party-data", f"lab={tmp_path / 'lab_new.csv'}"])
    assert r.exit_code == int(ExitCode.POLICY_REFUSED), r.output
    assert "min_intersection" in " ".join(r.output.split())
    new = [json.loads(x) for x in lab_ledger.read_text().splitlines()[before:]]
    kinds = [e["body"]["release"]["kind"] if e["kind"] == "release" else e["kind"] for e in new]
    assert "vertical_partition" not in kinds and kinds[-1] == "refusal", kinds
    # The parts are read from the node folders: moved elsewhere, --nodes finds them; without it they are missing.
    moved = tmp_path / "elsewhere"
    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("nodes"))
    shutil.copytree(out / "nodes", moved)
    clinic.drop(columns=["num"]).to_csv(tmp_path / "clinic_new.csv", index=False)
    args = ["predict", "--model", str(run), "--data", str(tmp_path / "clinic_new.csv"), "--party-data", f"lab={tmp_path / 'lab_new.csv'}", "--format", "json"]
    summary = json.loads((run / "summary.json").read_text())
    for part in summary["model_parts"].values():
        part["path"] = str(tmp_path / "gone" / Path(part["path"]).name)
    (run / "summary.json").write_text(json.dumps(summary))
    r = runner.invoke(app, [*args, "--nodes", str(moved)])
    assert r.exit_code == 0, r.output
    summary["run_id"] = "../../etc"
    (run / "summary.json").write_text(json.dumps(summary))
    r = runner.invoke(app, [*args, "--nodes", str(moved)])
    assert r.exit_code == int(ExitCode.CONFIG_INVALID) and "run_id" in r.output, r.output


def test_three_parties_run_score_and_verify(root, tmp_path):
    """A label holder and two passive parties (the lab's columns split between an ECG lab and a stress-test lab)."""
    import pandas as pd

    from tests.conftest import three_party_vertical_spec

    emb = root / "fedcollab" / "data" / "embedded"
    text = three_party_vertical_spec(_small_spec(root, tmp_path, trees=2, depth=3).read_text(), tmp_path)
    spec = tmp_path / "three.toml"
    spec.write_text(text)
    out = tmp_path / "out"
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--format", "json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["passive_parties"] == ["ecg", "stress"] and s["metrics"]["test_auc"] > 0.7
    for name in ("ecg", "stress"):
        assert Path(s["model_parts"][name]["path"]).is_relative_to(out / "nodes" / name)
    lines = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    rel = [e["body"]["release"] for e in lines if e["kind"] == "release"]
    assert {r["party"] for r in rel if r["kind"] == "vertical_histogram"} == {"ecg", "stress"}
    # the ECG lab was aligned first: the clinic tells it which of its common records survive the second PSI (declared)
    told = [r for r in rel if r["kind"] == "psi_intersection" and r["party"] == "clinic" and r["details"].get("to") == "ecg" and r["details"].get("common_to_all")]
    assert len(told) == 1 and told[0]["details"]["size"] == s["intersection"]
    r = runner.invoke(app, ["audit", "verify", str(out / "ledger.jsonl"), "--roster", str(out / "roster.json"), "--format", "json"])
    assert r.exit_code == 0, r.output
    clinic = pd.read_csv(emb / "heart_vertical_clinic.csv").drop(columns=["num"])
    clinic.to_csv(tmp_path / "clinic_new.csv", index=False)
    r = runner.invoke(app, ["predict", "--model", str(out), "--data", str(tmp_path / "clinic_new.csv"), "--party-data", f"ecg={tmp_path / 'ecg.csv'}",
                            "--party-data", f"stress={tmp_path / 'stress.csv'}", "--out", str(tmp_path / "scores.csv"), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(tmp_path / "scores.csv")) == s["intersection"]


def _interrupt(monkeypatch, at: int) -> None:
    """Ctrl-C as the progress bar reaches tree (iteration) ``at``: SecureBoost has written its checkpoint of ``at + 1`` trees;
    vertical LR has made iteration ``at``'s two gradient releases but not yet checkpointed it."""
    from fedcollab.runner import _vertical

    orig = _vertical._TreeProgress.tree

    def tree(self, t: int) -> None:
        orig(self, t)
        if t == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(_vertical._TreeProgress, "tree", tree)


def _same_trees(a: list, b: list) -> bool:
    """The same tree structure and splits; values equal up to float summation order (the PSI order differs run to run)."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        return False
    for ta, tb in zip(a, b):
        for na, nb in zip(ta, tb):
            for k in na:
                if isinstance(na[k], float):
                    if not (math.isnan(na[k]) and math.isnan(nb[k])) and na[k] != pytest.approx(nb[k], rel=1e-9, abs=1e-12):
                        return False
                elif na[k] != nb[k]:
                    return False
    return True


def test_an_interrupted_secureboost_run_resumes_from_each_partys_checkpoint(vertical_run, root, tmp_path, monkeypatch):
    """Interrupted after 2 of 3 trees, `run --resume` grows only the third: no second PSI, no bin sums twice, the model of an uninterrupted run."""
    spec = _small_spec(root, tmp_path, trees=3, depth=3)  # vertical_run's spec
    out = tmp_path / "out"
    _interrupt(monkeypatch, 1)
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--format", "json"])
    assert r.exit_code == int(ExitCode.INTERRUPTED) and "--resume" in r.output
    failed = json.loads((out / "summary.json").read_text())
    assert failed["status"] == "interrupted" and failed["error"] == {"exit_code": 130, "error": "RunInterrupted"}
    # Each party's checkpoint is in its own node folder: the label holder's trees and margins, the lab's thresholds.
    ck = {p: json.loads((out / "nodes" / p / "vertical" / failed["run_id"] / "checkpoint.json").read_text()) for p in ("clinic", "lab")}
    assert ck["clinic"]["done"] == ck["lab"]["done"] == 2 and len(ck["clinic"]["model"]["trees"]) == 2
    assert "lookup" not in ck["clinic"] and "margin" not in ck["lab"] and "model" not in ck["lab"]
    assert all(math.isnan(n["threshold"]) for t in ck["clinic"]["model"]["trees"] for n in t if n["owner"] == 1)
    assert not (out / "checkpoints").exists()
    monkeypatch.undo()
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--resume", "--format", "json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["status"] == "completed" and s["run_id"] == failed["run_id"] and s["resumed_after"] == 2 and s["trees"] == 3
    assert s["intersection"] == vertical_run[1]["intersection"]
    assert not list((out / "nodes").glob("*/vertical/*/checkpoint.json")), "checkpoints are removed once the model is written"
    whole = json.loads(Path(vertical_run[1]["model_parts"]["clinic"]["path"]).read_text())
    resumed = json.loads(Path(s["model_parts"]["clinic"]["path"]).read_text())
    assert _same_trees(resumed["trees"], whole["trees"])
    assert s["metrics"]["test_auc"] == pytest.approx(vertical_run[1]["metrics"]["test_auc"], abs=1e-9)
    # The books: one PSI per party, each level's bin sums once (3 trees x 3 levels), the summary counting both parts.
    rel = [e["body"]["release"] for e in map(json.loads, (out / "ledger.jsonl").read_text().splitlines()) if e["kind"] == "release"]
    assert sorted(r["party"] for r in rel if r["kind"] == "psi_intersection") == ["clinic", "lab"]
    levels = [(r["details"]["tree"], r["details"]["level"]) for r in rel if r["kind"] == "vertical_histogram"]
    assert len(levels) == len(set(levels)) == 9
    assert s["privacy"]["parties"]["lab"]["releases"] == vertical_run[1]["privacy"]["parties"]["lab"]["releases"]
    r = runner.invoke(app, ["audit", "verify", str(out / "ledger.jsonl"), "--roster", str(out / "roster.json"), "--format", "json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--resume", "--format", "json"])
    assert r.exit_code == int(ExitCode.CONFIG_INVALID) and "nothing to resume" in r.output


def test_an_interrupted_vertical_lr_run_resumes_and_charges_the_repeated_iteration(root, tmp_path, monkeypatch):
    """Interrupted inside iteration 3 of 8 (its gradients already released), resumed from the checkpoint after iteration 2:
    iteration 3 runs again and both parts' releases are charged, none lost."""
    text = (root / "specs" / "heart-disease-vertical-lr.toml").read_text().replace("rounds = 60", "rounds = 8")
    text = text.replace('[privacy]\nmode = "none"', '[privacy]\nmode = "record"\ntarget_epsilon = 3.0\ndelta = 1e-5')
    spec = tmp_path / "vlr.toml"
    spec.write_text(text)
    out = tmp_path / "out"
    _interrupt(monkeypatch, 3)
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--format", "json"])
    assert r.exit_code == int(ExitCode.INTERRUPTED)
    run_id = json.loads((out / "summary.json").read_text())["run_id"]
    ck = json.loads((out / "nodes" / "lab" / "vertical" / run_id / "checkpoint.json").read_text())
    assert ck["done"] == 3 and len(ck["weights"]) > 0 and "intercept" not in ck
    monkeypatch.undo()
    # A changed spec is not a resume of this run.
    changed = tmp_path / "changed.toml"
    changed.write_text(text.replace("rounds = 8", "rounds = 9"))
    r = runner.invoke(app, ["run", str(changed), "--out", str(out), "--resume", "--format", "json"])
    assert r.exit_code == int(ExitCode.CONFIG_INVALID) and "spec differs" in r.output
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--resume", "--format", "json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["resumed_after"] == 3 and s["iterations"] == 8 and s["metrics"]["test_auc"] > 0.8
    rel = [e["body"]["release"] for e in map(json.loads, (out / "ledger.jsonl").read_text().splitlines()) if e["kind"] == "release"]
    for party in ("clinic", "lab"):
        its = sorted(r["details"]["iteration"] for r in rel if r["kind"] == "vertical_gradient" and r["party"] == party)
        assert its == [0, 1, 2, 3, 3, 4, 5, 6, 7], (party, its)
        assert s["privacy"]["parties"][party]["releases"]["vertical_gradient->" + ("passive_party" if party == "clinic" else "label_holder")] == 9
    assert sum(1 for r in rel if r["kind"] == "psi_intersection") == 2
    r = runner.invoke(app, ["audit", "verify", str(out / "ledger.jsonl"), "--roster", str(out / "roster.json"), "--format", "json"])
    assert r.exit_code == 0, r.output
    spend = {(g["party"], g["observer"]): g["epsilon"] for g in json.loads(r.stdout)["spend"]}
    # Nine charged gradient releases each, one more than the plan's eight: above the target, as the ledger says.
    assert spend[("lab", "label_holder")] > 3.0 and spend[("lab", "label_holder")] == pytest.approx(s["privacy"]["parties"]["lab"]["epsilon"]["label_holder"], rel=1e-6)


def test_a_plan_over_the_budget_is_refused_before_the_psi(root, tmp_path):
    """The lab's budget (epsilon 1) cannot pay for the run's planned bin sums (epsilon 2): refused at preflight, nothing spent."""
    import re

    spec = _small_spec(root, tmp_path, privacy='mode = "record"\ntarget_epsilon = 2.0\ndelta = 1e-5')
    spec.write_text(spec.read_text().replace("n_bins = 16", "n_bins = 16\ndp_split = \"histogram\"")
                    .replace("min_intersection = 100", "min_intersection = 100\npassive_bins = \"public\""))
    out = tmp_path / "out"
    _nodes(spec, out)
    policy = out / "nodes" / "lab" / "policy.toml"
    text, n = re.subn(r'(unit = "record"\n(?:.*\n)*?epsilon = )[0-9.e+-]+', r"\g<1>1.0", policy.read_text(), count=1)
    assert n == 1, policy.read_text()
    policy.write_text(text)
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--format", "json"])
    assert r.exit_code == int(ExitCode.BUDGET_EXHAUSTED), r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "failed"
    for party in ("clinic", "lab"):
        mine = [json.loads(x) for x in (out / "nodes" / party / "ledger.jsonl").read_text().splitlines()]
        assert not [e for e in mine if e["run_id"] == s["run_id"] and e["kind"] == "release"], party  # no PSI, no bin sums
    lab = [json.loads(x) for x in (out / "nodes" / "lab" / "ledger.jsonl").read_text().splitlines()]
    assert lab[-1]["kind"] == "refusal" and "plan needs epsilon" in lab[-1]["body"]["reason"]
    # The run ledger verifies as an aborted run (its close says so), the lab's refusal in it, no finding.
    r = runner.invoke(app, ["audit", "verify", str(out / "ledger.jsonl"), "--roster", str(out / "roster.json"), "--format", "json"])
    assert r.exit_code == int(ExitCode.LEDGER_ABORTED) and json.loads(r.stdout)["findings"] == [], r.output
    run = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["party"]) for e in run] == [("refusal", "lab"), ("receipt", "coordinator"), ("abort", "coordinator")]
    assert int(run[0]["body"]["code"]) == int(NodeErrorCode.BUDGET_EXHAUSTED) and run[-1]["body"]["reason"] == "BudgetExhausted"


def test_planned_releases_are_the_runs_noisy_releases(root):
    """The preflight's plan: epsilon of each party's planned releases at the target; none for the tree label holder or without DP."""
    from fedcollab.privacy.accounting import compute_epsilon
    from fedcollab.protocols.vertical import planned_releases
    from fedcollab.spec import PrivacySpec, load_spec

    dp = PrivacySpec(mode="record", target_epsilon=1.0, delta=1e-3)
    trees = load_spec(root / "specs" / "heart-disease-vertical.toml")
    lr = load_spec(root / "specs" / "heart-disease-vertical-lr.toml")
    assert planned_releases(trees, "lab") == [] and planned_releases(lr, "clinic") == []
    trees, lr = (s.model_copy(update={"privacy": dp}) for s in (trees, lr))
    assert planned_releases(trees, "clinic") == []
    for spec, party, n in ((trees, "lab", 30 * 3), (lr, "clinic", 60), (lr, "lab", 60)):
        got = planned_releases(spec, party)
        assert len(got) == n and all(r.about == "train" and not r.non_private for r in got)
        assert compute_epsilon([r.mechanism for r in got], delta=1e-3, accountant="rdp").epsilon == pytest.approx(1.0, rel=1e-3)


def test_vertical_lr_with_two_passive_parties_runs_resumes_scores_and_verifies(root, tmp_path, monkeypatch):
    """Vertical LR with the lab's columns split between an ECG lab and a stress-test lab (two key holders), under record DP:
    interrupted inside iteration 3 of 6, resumed, every party's share charged once per other party's gradient and
    iteration (iteration 3 twice), each passive party's weights at its own node, joint scoring with all three files."""
    import pandas as pd

    from tests.conftest import three_party_vertical_spec

    text = (root / "specs" / "heart-disease-vertical-lr.toml").read_text().replace("rounds = 60", "rounds = 6")
    text = text.replace('[privacy]\nmode = "none"', '[privacy]\nmode = "record"\ntarget_epsilon = 3.0\ndelta = 1e-5')
    spec = tmp_path / "three-lr.toml"
    spec.write_text(three_party_vertical_spec(text, tmp_path))
    out = tmp_path / "out"
    _interrupt(monkeypatch, 3)
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--format", "json"])
    assert r.exit_code == int(ExitCode.INTERRUPTED), r.output
    run_id = json.loads((out / "summary.json").read_text())["run_id"]
    for name in ("clinic", "ecg", "stress"):
        ck = json.loads((out / "nodes" / name / "vertical" / run_id / "checkpoint.json").read_text())
        assert ck["done"] == 3 and len(ck["weights"]) == {"clinic": 5, "ecg": 6, "stress": 3}[name], (name, len(ck["weights"]))
    monkeypatch.undo()
    r = runner.invoke(app, ["run", str(spec), "--out", str(out), "--resume", "--format", "json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["resumed_after"] == 3 and s["passive_parties"] == ["ecg", "stress"] and s["metrics"]["test_auc"] > 0.75
    rel = [e["body"]["release"] for e in map(json.loads, (out / "ledger.jsonl").read_text().splitlines()) if e["kind"] == "release"]
    for party in ("clinic", "ecg", "stress"):
        mine = [r for r in rel if r["kind"] == "vertical_gradient" and r["party"] == party]
        others = {"clinic", "ecg", "stress"} - {party}
        for other in others:  # one release per iteration of the other party's gradient, which this party's share feeds
            its = sorted(r["details"]["iteration"] for r in mine if r["details"]["recipient"] == other)
            # iteration 3 (and, for a party that had already sent its next share, 4) charged twice; none lost
            assert set(its) == set(range(6)) and its.count(3) == 2 and max(its.count(i) for i in its) == 2, (party, other, its)
        assert {r["details"]["decrypted_by"] for r in mine} <= {"ecg", "stress"}
    for name in ("ecg", "stress"):
        part = json.loads(Path(s["model_parts"][name]["path"]).read_text())
        assert Path(s["model_parts"][name]["path"]).is_relative_to(out / "nodes" / name) and len(part["weights"]) == {"ecg": 6, "stress": 3}[name]
    r = runner.invoke(app, ["audit", "verify", str(out / "ledger.jsonl"), "--roster", str(out / "roster.json"), "--format", "json"])
    assert r.exit_code == 0, r.output
    spend = json.loads(r.stdout)["spend"]
    # All of a party's releases together: 14 of the plan's 12 (iteration 3 twice, for both other parties), above the target of 3.
    from fedcollab.privacy.accounting import GaussianMechanism, compute_epsilon

    z = s["privacy"]["plan"]["z"]
    assert compute_epsilon([GaussianMechanism(noise_multiplier=z, releases=12)], delta=1e-5, accountant="rdp").epsilon == pytest.approx(3.0, rel=1e-4)
    clinic_obs = [g for g in spend if g["party"] == "clinic" and g["observer"] == "passive_party"]
    assert clinic_obs[0]["releases"] == 14 and clinic_obs[0]["epsilon"] > 3.0
    emb = root / "fedcollab" / "data" / "embedded"
    pd.read_csv(emb / "heart_vertical_clinic.csv").drop(columns=["num"]).to_csv(tmp_path / "clinic_new.csv", index=False)
    r = runner.invoke(app, ["predict", "--model", str(out), "--data", str(tmp_path / "clinic_new.csv"), "--party-data", f"ecg={tmp_path / 'ecg.csv'}",
                            "--party-data", f"stress={tmp_path / 'stress.csv'}", "--out", str(tmp_path / "scores.csv"), "--format", "json"])
    assert r.exit_code == 0, r.output
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == s["intersection"] and scores["score"].between(0, 1).all()
    logits = [json.loads(x) for x in (out / "nodes" / "stress" / "ledger.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "release" and e["body"]["release"]["kind"] == "vertical_logit" and e["run_id"].startswith("score-") for e in logits)


def test_a_resume_is_refused_when_a_partys_file_no_longer_holds_its_checkpointed_ids(root):
    """The runner's and the node's resume share one check of a party's checkpointed rows (ConfigError here, naming the party)."""
    import numpy as np

    from fedcollab.core import ConfigError, ProtocolError
    from fedcollab.data import load_vertical_party
    from fedcollab.protocols.vertical import checkpoint_rows, rows_body
    from fedcollab.runner._vertical import resumed_rows
    from fedcollab.spec import load_spec

    spec = load_spec(root / "specs" / "heart-disease-vertical.toml")
    clinic, lab = load_vertical_party(spec, "clinic"), load_vertical_party(spec, "lab")
    docs = {"clinic": {**rows_body(clinic, np.arange(5)), "done": 2}, "lab": {**rows_body(lab, np.arange(5)), "done": 2}}
    assert len(resumed_rows(docs, clinic, [lab])[0]) == 5
    moved = {**docs, "lab": {**docs["lab"], "rows": list(range(1, 6))}}  # the same count, other records: the ids' digest differs
    with pytest.raises(ConfigError, match="--resume: lab's checkpoint: the party's data changed"):
        resumed_rows(moved, clinic, [lab])
    with pytest.raises(ConfigError, match="--resume: lab's checkpoint: rows: expected distinct"):
        resumed_rows({**docs, "lab": {**docs["lab"], "rows": [0, 0, 1]}}, clinic, [lab])
    with pytest.raises(ProtocolError, match="vertical resume: the checkpoint: the party's data changed"):
        checkpoint_rows(lab, moved["lab"])
