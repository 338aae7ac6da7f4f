"""One short simulation of Heart with aggregation = "secagg", beside the same spec with plain FedAvg."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(plain, secagg) results of the same 2-round no-DP spec."""
    import fedcollab
    from fedcollab.spec import load_spec
    from tests.conftest import ROOT

    base = load_spec(ROOT / "protocols" / "heart-disease-secagg.toml")
    short = base.training.model_copy(update={"rounds": 2})
    secagg = base.model_copy(update={"training": short}).with_base_dir(base.base_dir)
    plain = base.model_copy(update={"training": short, "aggregation": "plain"}).with_base_dir(base.base_dir)
    return (
        fedcollab.run(plain, out=tmp_path_factory.mktemp("plain")),
        fedcollab.run(secagg, out=tmp_path_factory.mktemp("secagg")),
    )


def test_secagg_model_equals_plain(pair):
    """The securely aggregated model equals plain FedAvg within the fixed-point error (scale 2^20)."""
    plain, sec = pair
    assert sec.summary.aggregation == "secagg"
    for k, v in plain.model.items():
        np.testing.assert_allclose(sec.model[k], v, atol=1e-5)
    assert sec.summary.metrics.pooled_test.accuracy == pytest.approx(plain.summary.metrics.pooled_test.accuracy, abs=0.01)


def test_secagg_run_ledger_verifies(pair):
    from fedcollab.audit import verify_ledger
    from fedcollab.core import ExitCode
    from fedcollab.spec import load_roster

    _, sec = pair
    rep = verify_ledger(sec.out_dir / "ledger.jsonl", load_roster(sec.out_dir / "roster.json"))
    assert rep.exit_code == ExitCode.OK
    details = [r for r in sec.summary.privacy.non_private_releases if r.kind == "model_update"]
    assert {r.party for r in details} == {"cleveland", "hungary", "switzerland", "va-long-beach"}


def test_statistics_summed_under_secagg(pair):
    """The scaling statistics went through secure aggregation (mod 2^64) and match the plain round's."""
    plain, sec = pair
    for key in ("mean", "std"):
        np.testing.assert_allclose(sec.summary.scaling_parameters[key], plain.summary.scaling_parameters[key], rtol=1e-5, atol=1e-5)
