"""``fedcollab score``: the file exchange between a querier and a model holder, end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fedcollab.cli import app
from fedcollab.protocols.scoring import REQUEST_MAGIC, pack_container, unpack_container

runner = CliRunner()


@pytest.fixture(scope="module")
def heart_run(tmp_path_factory, heart_spec):
    """A run folder holding a logistic regression fitted (plain numpy) on the pooled Heart training rows."""
    from safetensors.numpy import save_file

    from fedcollab.data import load_partner_data

    parts = [load_partner_data(heart_spec, p.name) for p in heart_spec.partners]
    x = np.concatenate([p.x_train for p in parts])
    y = np.concatenate([p.y_train for p in parts])
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / std
    w, b = np.zeros(z.shape[1]), 0.0
    for _ in range(300):
        g = 1 / (1 + np.exp(-(z @ w + b))) - y
        w -= 0.5 * z.T @ g / len(y)
        b -= 0.5 * g.mean()
    out = tmp_path_factory.mktemp("heart-run")
    save_file({"linear.weight": w[None, :].astype(np.float32), "linear.bias": np.array([b], dtype=np.float32)}, str(out / "model.safetensors"))
    sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "summary.json").write_text(json.dumps({"model": {"path": "model.safetensors", "sha256": sha, "format": "safetensors"},
                                                  "scaling_parameters": {"mean": mean.tolist(), "std": std.tolist()}}))
    return out


@pytest.mark.parametrize("cmd", [["score"], ["score", "encrypt"], ["score", "apply"], ["score", "decrypt"], ["score", "run"]])
def test_help(cmd):
    """Every score command has --help."""
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_run_heart_test_split_matches_plain(heart_run, root, tmp_path):
    """Encrypted scoring of the whole Heart test split gives the plain accuracy (within 0.01)."""
    r = runner.invoke(app, ["score", "run", "--spec", str(root / "specs" / "heart-disease.toml"), "--model", str(heart_run),
                            "--out", str(tmp_path / "s"), "--format", "json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["rows"] == 254 and info["accuracy_plain"] > 0.7
    assert info["accuracy_delta"] <= 0.01
    assert info["max_abs_logit_error"] < 0.01
    lines = (tmp_path / "s" / "scores.csv").read_text().splitlines()
    assert lines[0] == "row,partner,logit,probability" and lines[1].split(",")[1] == "cleveland"
    assert {ln.split(",")[1] for ln in lines[1:]} == {"cleveland", "hungary", "switzerland", "va-long-beach"}
    # The throwaway holder is fresh every time: a rerun into the same folder is not refused for budget.
    again = runner.invoke(app, ["score", "run", "--spec", str(root / "specs" / "heart-disease.toml"), "--model", str(heart_run),
                                "--out", str(tmp_path / "s"), "--format", "json"])
    assert again.exit_code == 0, again.output


def test_file_exchange_budget_and_audit(heart_run, root, tmp_path):
    """encrypt (signed) -> apply -> decrypt as files; beyond the budget exits 5; the holder's ledger verifies."""
    spec = str(root / "specs" / "heart-disease.toml")
    r = runner.invoke(app, ["node", "init", str(tmp_path / "telecom"), "--partner", "telecom", "--format", "json"])
    roster = json.loads(r.stdout)["roster_entry"]
    r = runner.invoke(app, ["node", "init", str(tmp_path / "bank"), "--partner", "bank", "--format", "json"])
    roster |= json.loads(r.stdout)["roster_entry"]
    (tmp_path / "roster.json").write_text(json.dumps({"parties": roster}))
    pol = tmp_path / "telecom" / "policy.toml"
    pol.write_text(pol.read_text().replace("[scoring.max_rows_per_querier]", '[scoring.max_rows_per_querier]\n"bank" = 60'))

    def encrypt(partner, name):
        r = runner.invoke(app, ["score", "encrypt", "--spec", spec, "--partner", partner, "--node", str(tmp_path / "bank"),
                                "--out", str(tmp_path / f"{name}.req"), "--secret", str(tmp_path / f"{name}.secret"), "--format", "json"])
        assert r.exit_code == 0, r.output
        assert (tmp_path / f"{name}.secret").stat().st_mode & 0o777 == 0o600
        assert json.loads(r.stdout)["querier"] == "bank"
        return json.loads(r.stdout)["rows"]

    def apply(name, out=None):
        return runner.invoke(app, ["score", "apply", str(tmp_path / f"{name}.req"), "--model", str(heart_run), "--node", str(tmp_path / "telecom"),
                                   "--roster", str(tmp_path / "roster.json"), "--out", str(tmp_path / f"{out or name}.resp"),
                                   "--spec", spec, "--format", "json"])

    assert encrypt("switzerland", "a") == 16
    r = apply("a")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows_used"] == 32  # 2 budget rows per scored row
    assert json.loads(r.stdout)["querier_key"] == hashlib.sha256(bytes.fromhex(roster["bank"]["signing_key"])).hexdigest()[:16]
    r = runner.invoke(app, ["score", "decrypt", str(tmp_path / "a.resp"), "--secret", str(tmp_path / "a.secret"), "--out", str(tmp_path / "a.json"),
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "a.json").read_text())["scores"]) == 16
    r = apply("a", out="a2")  # the same request again: a replay
    assert r.exit_code == 7 and "137" in r.output and not (tmp_path / "a2.resp").exists()
    assert encrypt("switzerland", "b") == 16  # (16 + 16) x 2 > 60
    r = apply("b")
    assert r.exit_code == 5 and "134" in r.output and not (tmp_path / "b.resp").exists()
    # the querier's name changed after signing: refused, nothing scored
    header, blobs = unpack_container((tmp_path / "b.req").read_bytes(), REQUEST_MAGIC, what="request")
    header = {k: v for k, v in header.items() if k != "blobs"} | {"querier": "telecom"}
    (tmp_path / "c.req").write_bytes(pack_container(REQUEST_MAGIC, header, list(blobs.items())))
    r = apply("c")
    assert r.exit_code == 6 and "136" in r.output and not (tmp_path / "c.resp").exists()
    r = runner.invoke(app, ["audit", "verify", str(tmp_path / "telecom" / "ledger.jsonl"), "--roster", str(tmp_path / "roster.json"), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["lines"] == 4
    # the auditor's report lists each scoring entry: the answer, then the replay, budget and renamed-request refusals
    r = runner.invoke(app, ["audit", "report", str(tmp_path / "telecom" / "ledger.jsonl"), "--roster", str(tmp_path / "roster.json"),
                            "--out", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    section = (tmp_path / "report" / "report.md").read_text().split("## Encrypted scoring", 1)[1].split("\n## ", 1)[0]
    rows = [ln.split(" | ") for ln in section.splitlines() if ln.startswith("| ") and ("answered" in ln or "refused" in ln)]
    assert [r[8] for r in rows] == ["answered", "refused", "refused", "refused"], section
    assert [r[9].split(" ")[0] for r in rows] == ["", "137", "134", "136"], section


def test_encrypt_needs_a_key(root, tmp_path):
    """`score encrypt` refuses to write an unsigned request (exit 2), naming --node and --key."""
    r = runner.invoke(app, ["score", "encrypt", "--spec", str(root / "specs" / "heart-disease.toml"), "--querier", "bank",
                            "--out", str(tmp_path / "r.req"), "--secret", str(tmp_path / "s.json")])
    assert r.exit_code == 2 and "--node" in r.output and not (tmp_path / "r.req").exists()
