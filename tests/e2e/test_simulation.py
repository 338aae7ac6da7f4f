"""One short in-process Flower simulation of the Heart spec with DP-SGD, asserted from several sides."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

pytestmark = pytest.mark.slow


class TestDpRun:
    def test_completes_all_rounds(self, dp_run):
        """Every round ran with all four hospitals, and evaluation reached every partner."""
        assert [r.round for r in dp_run.rounds] == [1, 2, 3]
        assert all(r.partners_trained == ["cleveland", "hungary", "switzerland", "va-long-beach"] for r in dp_run.rounds)
        assert dp_run.summary.metrics.pooled_test.n == 254
        assert {k: v.n for k, v in dp_run.summary.metrics.partners.items()} == {"cleveland": 104, "hungary": 89, "switzerland": 16, "va-long-beach": 45}
        assert not dp_run.summary.failures

    def test_epsilon_recomputed_within_target(self, dp_run):
        """Recomputing each partner's epsilon from the recorded sigma, q and T gives the claim, and it is <= target."""
        from fedcollab.audit import recompute_summary_epsilons

        summary = json.loads((dp_run.out_dir / "summary.json").read_text())
        rec = recompute_summary_epsilons(summary)
        assert set(rec) == {"cleveland", "hungary", "switzerland", "va-long-beach"}
        for name, r in rec.items():
            assert r["recomputed"] == pytest.approx(r["claimed"], rel=1e-9), name
            assert r["recomputed"] <= r["target"], name

    def test_guarantee_fields(self, dp_run):
        """The guarantee names unit, observer, accountant and delta; steps are those actually taken."""
        (g,) = dp_run.summary.privacy.guarantees
        assert (g.unit, g.observer, g.accountant, g.delta) == ("record", "coordinator", "rdp", 1e-3)
        cle = g.partners["cleveland"]
        assert cle.steps == 3 * 6 and cle.n_train == 199 and cle.clip_norm == 3.0
        assert cle.sample_rate == pytest.approx(32 / 199) and cle.expected_batch == 32.0
        # The fixture runs 3 rounds, so sigma is calibrated for 18 steps and the spend is just under the target.
        assert 0.99 < cle.epsilon <= 1.0

    def test_non_private_releases_declared(self, dp_run):
        """Row counts (declared public) and test metrics are listed; no training release is non-private."""
        npr = dp_run.summary.privacy.non_private_releases
        kinds = {(r.party, r.kind) for r in npr}
        for p in ("cleveland", "hungary", "switzerland", "va-long-beach"):
            assert (p, "row_counts") in kinds and (p, "test_metrics") in kinds
        assert all(r.about != "train" for r in npr)
        assert all(r.declared_public for r in npr if r.kind == "row_counts")
        tm = next(r for r in npr if r.kind == "test_metrics")
        assert tm.about == "test" and tm.rounds == [1, 2, 3]

    def test_outputs(self, dp_run):
        """summary.json follows the published schema; metrics.jsonl has a line per round; the model hash matches."""
        import jsonschema

        from tests.conftest import ROOT

        out = dp_run.out_dir
        summary = json.loads((out / "summary.json").read_text())
        jsonschema.validate(summary, json.loads((ROOT / "schemas" / "summary.schema.json").read_text()))
        for key in ("schema_version", "run_id", "spec", "versions", "aggregation", "rounds", "wall_seconds"):
            assert key in summary
        assert set(summary["versions"]) >= {"fedcollab", "flwr", "opacus", "dp-accounting"}
        assert summary["spec"]["sha256"] == hashlib.sha256((ROOT / "specs" / "heart-disease-dp.toml").read_bytes()).hexdigest()
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]
        model = out / summary["model"]["path"]
        assert hashlib.sha256(model.read_bytes()).hexdigest() == summary["model"]["sha256"]
        assert (out / "checkpoints" / "checkpoint.npz").exists()

    def test_model_loads_and_predicts(self, dp_run):
        """The saved model loads with safetensors and has the logistic regression's shapes."""
        from safetensors.numpy import load_file

        arrays = load_file(str(dp_run.out_dir / dp_run.summary.model.path))
        assert arrays["linear.weight"].shape == (1, 13) and arrays["linear.bias"].shape == (1,)
        assert all(math.isfinite(float(x)) for x in arrays["linear.weight"].ravel())
