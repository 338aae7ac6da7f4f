"""The AI-readiness profile in-process: local noise, findings on the Heart silos, the HTML report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedcollab.node import init_node_home
from fedcollab.node._analytics import NodeAnalytics, load_frame, profile_counts
from fedcollab.privacy.accounting import compute_epsilon
from fedcollab.protocols.profile import build_profile, noisy_profile, plan_profile, profile_layout
from fedcollab.spec import BudgetSpec, NodePolicy


@pytest.fixture(scope="module")
def heart_profile(heart_spec, tmp_path_factory):
    """Every Heart silo releases its profile through its own budget gate (seeded generators: reproducible)."""
    tmp = tmp_path_factory.mktemp("profile")
    vectors, nodes = {}, {}
    for i, p in enumerate(heart_spec.partners):
        home = init_node_home(tmp / p.name, partner=p.name,
                              policy=NodePolicy(partner=p.name, budgets=[BudgetSpec(dataset=p.dataset_id, epsilon=8, delta=1e-5)]))
        node = NodeAnalytics(heart_spec, p.name, home=home, run_id="profile")
        vectors[p.name], _ = node.answer_profile(epsilon=4.0, delta=1e-6, generator=np.random.default_rng(1000 + i))
        nodes[p.name] = node
    schema = heart_spec.data_schema
    prof = build_profile(vectors, profile_layout(schema), plan_profile(schema, epsilon=4.0, delta=1e-6), failed={},
                         features=list(schema.features))
    return prof, nodes


class TestProfileNoise:
    def test_gaussian_noise_over_1e4_draws(self, heart_spec):
        """Per-coordinate noise has the planned std (core and rest), mean zero, over 10^4 draws each."""
        schema = heart_spec.data_schema
        blocks = profile_layout(schema)
        plan = plan_profile(schema, epsilon=4.0, delta=1e-6)
        sig = plan.sigmas(blocks)
        gen = np.random.default_rng(7)
        draws = np.stack([noisy_profile(np.zeros(sig.size), plan, blocks, generator=gen) for _ in range(10_000 // sig.size + 400)])
        core, rest = sig == plan.sigma_core, sig == plan.sigma_rest
        assert abs(draws[:, core].std() / plan.sigma_core - 1) < 0.03
        assert abs(draws[:, rest].std() / plan.sigma_rest - 1) < 0.03
        assert abs(draws.mean()) < 0.1
        eps = compute_epsilon([plan.mechanism], delta=1e-6, accountant="rdp").epsilon
        assert 3.9 < eps <= 4.0

    def test_exact_counts(self, heart_spec):
        """Switzerland's exact counts: 123 rows, chol 0 in all of them, 45 of 46 usable rows positive."""
        schema = heart_spec.data_schema
        blocks = profile_layout(schema)
        c = profile_counts(load_frame(heart_spec, "switzerland"), schema, blocks)
        o, named = 0, {}
        for b in blocks:
            named[b.name] = c[o:o + b.width]
            o += b.width
        assert named["rows"][0] == 123 and named["zeros:chol"][0] == 123
        assert named["usable_pos"][0] == 45 and named["usable_neg"][0] == 1
        assert named["hist:chol"][0] == 123


class TestHeartFindings:
    def test_switzerland_chol_and_labels_flagged(self, heart_profile):
        """Switzerland's chol (always 0) and its all-positive labels are flagged; no other silo's chol is."""
        prof, _ = heart_profile
        msgs = [(f["silo"], f["column"]) for f in prof.findings if f["level"] == "warning"]
        assert ("switzerland", "chol") in msgs
        assert ("switzerland", "label") in msgs
        assert not any(c == "chol" and s != "switzerland" for s, c in msgs)
        assert not any(c == "label" and s in ("cleveland", "hungary") for s, c in msgs)

    def test_each_silo_charged_to_its_budget(self, heart_profile):
        """Every node recorded one Gaussian 'profile' release, counted against its budget."""
        _, nodes = heart_profile
        for node in nodes.values():
            entries = [json.loads(x) for x in node.gate.ledger.path.read_text().splitlines()]
            rel = [e for e in entries if e["kind"] == "release"]
            assert len(rel) == 1 and rel[0]["body"]["release"]["kind"] == "profile" and rel[0]["body"]["counted"]
            assert rel[0]["body"]["release"]["mechanism"]["mechanism"] == "gaussian"
            assert 0 < rel[0]["body"]["claim"]["epsilon_total"] <= 8

    def test_html_report(self, heart_profile, heart_spec, tmp_path):
        """The HTML report lists the findings and embeds the plots."""
        from fedcollab.runner._profile_report import write_profile_report

        prof, _ = heart_profile
        path = write_profile_report(prof, heart_spec, tmp_path)
        text = path.read_text()
        assert "switzerland: `chol` is (almost) always 0" in text
        assert text.count("data:image/png;base64,") == 3
