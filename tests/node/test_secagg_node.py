"""The node checks every secure-aggregation request against its own spec and policy."""

from __future__ import annotations

import numpy as np
import pytest

from fedcollab.core import PolicyRefused, ProtocolError
from fedcollab.node._secagg import check_config, encode_for_secagg
from fedcollab.protocols import secagg
from fedcollab.protocols.quantize import decode_update


@pytest.fixture(scope="module")
def spec():
    from fedcollab.spec import load_spec
    from tests.conftest import ROOT

    return load_spec(ROOT / "specs" / "heart-disease-secagg.toml")


def _cfg(spec, **kw):
    base = dict(run_id="r", round=3, participants=("cleveland", "hungary", "switzerland", "va-long-beach"), k=spec.secagg.neighbours,
                threshold=2, max_dropouts=1, bits=32, length=15)
    base.update(kw)
    return secagg.SecAggConfig(**base)


class TestConfigCheck:
    def test_accepts_the_spec_parameters(self, spec):
        check_config(spec, _cfg(spec), me="hungary", run_id="r", round_=3, length=15, min_partners=2)

    @pytest.mark.parametrize("change", [{"round": 4}, {"run_id": "other"}, {"length": 16}])
    def test_wrong_round_or_shape(self, spec, change):
        with pytest.raises(ProtocolError, match="differ from the spec"):
            check_config(spec, _cfg(spec, **change), me="hungary", run_id="r", round_=3, length=15, min_partners=2)

    def test_threshold_cannot_be_lowered(self, spec):
        """A coordinator asking for another graph or more tolerated dropouts is refused."""
        with pytest.raises(ProtocolError, match="graph or threshold"):
            check_config(spec, _cfg(spec, threshold=2, max_dropouts=0, k=4), me="hungary", run_id="r", round_=3, length=15, min_partners=2)

    def test_after_a_dropout_fewer_tolerated_dropouts_are_accepted(self, spec):
        """Three participants left: same t = 2, no further dropout tolerated; the node accepts that."""
        cfg = _cfg(spec, participants=("cleveland", "hungary", "va-long-beach"), max_dropouts=0)
        check_config(spec, cfg, me="hungary", run_id="r", round_=3, length=15, min_partners=2)

    def test_unknown_participant(self, spec):
        with pytest.raises(ProtocolError, match="participants"):
            check_config(spec, _cfg(spec, participants=("cleveland", "hungary", "switzerland", "mallory")), me="hungary", run_id="r", round_=3, length=15,
                         min_partners=2)

    def test_policy_minimum_partners(self, spec):
        with pytest.raises(PolicyRefused):
            check_config(spec, _cfg(spec), me="hungary", run_id="r", round_=3, length=15, min_partners=5)


def test_encoding_round_trip(spec):
    """Two nodes' encoded updates, summed modulo 2^32, decode to their weighted mean."""
    rng = np.random.default_rng(0)
    old = {"w": rng.normal(size=(1, 13)), "b": rng.normal(size=(1,))}
    news = [{k: v + rng.normal(scale=0.1, size=v.shape) for k, v in old.items()} for _ in range(2)]
    weights = [199.0, 30.0]
    enc = [encode_for_secagg(spec, new=n, old=old, weight=w, max_weight=199.0, n_parties=4) for n, w in zip(news, weights)]
    total = (enc[0].astype(np.uint64) + enc[1]).astype(np.uint32)
    mean, weight = decode_update(total, max_weight=199.0, scale=spec.secagg.scale, bits=32)
    flat = [np.concatenate([n["w"].ravel() - old["w"].ravel(), n["b"] - old["b"]]) for n in news]
    expected = (weights[0] * flat[0] + weights[1] * flat[1]) / sum(weights)
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    assert weight == pytest.approx(229.0, rel=1e-5)
