"""Robust aggregation (issue 13, faults): one partner sending a scaled update cannot steer the model.

Plain mode: Flower's own FedTrimmedAvg, FedMedian, Krum and MultiKrum, built by the coordinator's
``_strategy`` from the spec and fed real Flower reply ``Message`` objects in-process. Secagg: each
node clips its update to ``secagg.clip_l2`` before encoding; the decoded sum shows the bound.
"""

from __future__ import annotations

import copy
import time
import tomllib
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedcollab.coordinator._server import _strategy
from fedcollab.core import SpecError
from fedcollab.node._secagg import encode_for_secagg
from fedcollab.protocols.quantize import flatten_arrays as flatten
from fedcollab.protocols.quantize import decode_update
from fedcollab.spec import parse_spec
from tests.conftest import ROOT

SCALE = 100.0  # the poisoned partner scales its update by this factor


def _raw(name: str = "heart-disease.toml") -> dict:
    return tomllib.loads((ROOT / "specs" / name).read_text())


def _spec(n_partners: int = 4, name: str = "heart-disease.toml", **training):
    raw = _raw(name)
    while len(raw["partners"]) < n_partners:
        extra = copy.deepcopy(raw["partners"][0])
        extra["name"] = f"extra-{len(raw['partners'])}"
        raw["partners"].append(extra)
    raw["training"].update(training)
    return parse_spec(raw)


def _problems(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as exc:
        parse_spec(raw)
    return exc.value.problems


def _updates(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The global model (Heart logistic regression shapes) and n honest updates around one direction."""
    rng = np.random.default_rng(seed)
    glob = {"linear.weight": rng.normal(size=(1, 13)), "linear.bias": rng.normal(size=(1,))}
    direction = {k: rng.normal(scale=0.1, size=v.shape) for k, v in glob.items()}
    deltas = [{k: direction[k] + rng.normal(scale=0.01, size=v.shape) for k, v in glob.items()} for _ in range(n)]
    return glob, deltas


def _replies(glob, deltas, n_examples) -> list[Message]:
    """Train replies as the SuperLink delivers them: full model weights and num-examples, from node 100 + i."""
    out = []
    for i, (d, n) in enumerate(zip(deltas, n_examples)):
        arrays = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(glob[k] + d[k])) for k in glob})
        meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=100 + i, dst_node_id=0, reply_to_message_id=uuid.uuid4().hex,
                        group_id="1", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
        out.append(Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}), metadata=meta))
    return out


def _aggregate(spec, glob, deltas, n_examples) -> np.ndarray:
    """The aggregated update (new global - old) as one flat vector, through the spec's Flower strategy."""
    strategy = _strategy(spec, len(spec.partners))
    arrays, _ = strategy.aggregate_train(1, _replies(glob, deltas, n_examples))
    assert arrays is not None
    return flatten({k: arrays[k].numpy() for k in glob}, list(glob)) - flatten(glob, list(glob))


def _poisoned(deltas, who: int = 0):
    return [{k: SCALE * v for k, v in d.items()} if i == who else d for i, d in enumerate(deltas)]


class TestPlainRobustStrategies:
    """Four (Krum: five) partners, one of which scales its update by 100."""

    @pytest.mark.parametrize(("strategy", "n"), [("trimmed_mean", 4), ("median", 4), ("krum", 5), ("multikrum", 5)])
    def test_robust_rule_stays_near_the_honest_mean(self, strategy, n):
        """The robust aggregate is within 20% of the honest mean update; FedAvg's is more than 10 times off."""
        glob, deltas = _updates(n)
        names = list(glob)
        honest_mean = np.mean([flatten(d, names) for d in deltas], axis=0)
        weights = [150, 200, 80, 120, 90][:n]
        robust = _aggregate(_spec(n, strategy=strategy), glob, _poisoned(deltas), weights)
        fedavg = _aggregate(_spec(n, strategy="fedavg"), glob, _poisoned(deltas), weights)
        size = np.linalg.norm(honest_mean)
        assert np.linalg.norm(robust - honest_mean) < 0.2 * size
        assert np.linalg.norm(fedavg - honest_mean) > 10 * size

    @pytest.mark.parametrize("strategy", ["trimmed_mean", "median"])
    def test_coordinatewise_rules_stay_within_the_honest_range(self, strategy):
        """With one poisoned update out of four, every coordinate lies between the honest extremes."""
        glob, deltas = _updates(4, seed=1)
        names = list(glob)
        honest = np.stack([flatten(d, names) for d in deltas[1:]])
        agg = _aggregate(_spec(4, strategy=strategy), glob, _poisoned(deltas), [100, 100, 100, 100])
        assert np.all(agg >= honest.min(axis=0) - 1e-9) and np.all(agg <= honest.max(axis=0) + 1e-9)

    def test_krum_selects_an_honest_update(self):
        """Krum returns exactly one partner's model, never the poisoned one."""
        glob, deltas = _updates(5, seed=2)
        names = list(glob)
        agg = _aggregate(_spec(5, strategy="krum"), glob, _poisoned(deltas), [1, 1, 1, 1, 1])
        distances = [np.linalg.norm(agg - flatten(d, names)) for d in _poisoned(deltas)]
        assert min(distances) < 1e-9
        assert int(np.argmin(distances)) != 0

    def test_strategies_are_flowers_own(self):
        """The spec's names map to Flower 1.42's strategies with the spec's parameters."""
        from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum, MultiKrum

        s = _strategy(_spec(4, strategy="trimmed_mean", trim_fraction=0.3), 4)
        assert isinstance(s, FedTrimmedAvg) and s.beta == 0.3
        assert isinstance(_strategy(_spec(4, strategy="median"), 4), FedMedian)
        k = _strategy(_spec(7, strategy="krum", byzantine_partners=2), 7)
        assert isinstance(k, Krum) and k.num_malicious_nodes == 2 and k.num_nodes_to_select == 1
        m = _strategy(_spec(8, strategy="multikrum", byzantine_partners=2, min_partners=7), 8)
        assert isinstance(m, MultiKrum) and m.num_malicious_nodes == 2 and m.num_nodes_to_select == 7 - 2


class TestSecaggNormBound:
    """Under secagg the coordinator sees only the sum; the node's own L2 clip bounds one partner's pull."""

    def _decoded_mean(self, spec, glob, deltas, weights) -> np.ndarray:
        new = [{k: glob[k] + d[k] for k in glob} for d in deltas]
        enc = [encode_for_secagg(spec, new=nw, old=glob, weight=float(w), max_weight=float(max(weights)), n_parties=len(deltas),
                                 clip_l2=spec.secagg.clip_l2) for nw, w in zip(new, weights)]
        total = np.zeros_like(enc[0], dtype=np.uint64)
        for e in enc:
            total = (total + e.astype(np.uint64)) % (1 << 32)
        mean, _ = decode_update(total.astype(np.uint32), max_weight=float(max(weights)), scale=spec.secagg.scale, bits=32)
        return mean

    def test_clipped_encoding_bounds_the_poisoned_partner(self):
        """With clip_l2 = B the decoded mean moves by at most 2 * B * w_p / W; without it, far more."""
        bound = 0.5
        raw = _raw("heart-disease-secagg.toml")
        raw["secagg"] = {"clip_l2": bound}
        clipped = parse_spec(raw)
        unclipped = parse_spec(_raw("heart-disease-secagg.toml"))
        glob, deltas = _updates(4, seed=3)
        weights = [200, 150, 100, 50]
        assert max(np.linalg.norm(flatten(d, list(glob))) for d in deltas) < bound  # honest updates pass unclipped
        shift_bound = 2 * bound * weights[0] / sum(weights)
        honest = self._decoded_mean(clipped, glob, deltas, weights)
        moved = np.linalg.norm(self._decoded_mean(clipped, glob, _poisoned(deltas), weights) - honest)
        assert moved <= shift_bound + 1e-4
        free = np.linalg.norm(self._decoded_mean(unclipped, glob, _poisoned(deltas), weights) - self._decoded_mean(unclipped, glob, deltas, weights))
        assert free > 10 * shift_bound


class TestSpecRules:
    """Robust rules and clip_l2 are refused where they cannot work, with the field named."""

    @pytest.mark.parametrize("strategy", ["trimmed_mean", "median", "krum"])
    def test_not_under_secagg(self, strategy):
        raw = _raw("heart-disease-secagg.toml")
        raw["training"]["strategy"] = strategy
        assert any(f"training.strategy = '{strategy}' needs aggregation = 'plain'" in p and "secagg.clip_l2" in p for p in _problems(raw))

    def test_not_under_he(self):
        raw = _raw("heart-disease-he.toml")
        raw["training"]["strategy"] = "median"
        assert any("needs aggregation = 'plain'" in p and "'he'" in p for p in _problems(raw))

    def test_not_with_partner_level_dp(self):
        raw = _raw("heart-disease-dp.toml")
        raw["privacy"] = {"mode": "central", "partner": {"epsilon": 1.0, "delta": 1e-5}}
        raw["preprocessing"] = {"scaling": "public_bounds"}
        raw["training"]["strategy"] = "median"
        assert any("training.strategy = 'median' cannot be used with partner-level DP" in p for p in _problems(raw))

    def test_record_level_dp_is_allowed(self):
        raw = _raw("heart-disease-dp.toml")
        raw["training"]["strategy"] = "median"
        assert parse_spec(raw).training.strategy == "median"

    def test_trim_that_cuts_nothing(self):
        """floor(0.2 * 4) = 0: Flower would silently average everything."""
        raw = _raw()
        raw["training"].update(strategy="trimmed_mean", trim_fraction=0.2)
        assert any("training.trim_fraction = 0.2 cuts no update from a round of 4 updates" in p for p in _problems(raw))

    def test_trim_fraction_range(self):
        raw = _raw()
        raw["training"].update(strategy="trimmed_mean", trim_fraction=0.5)
        assert any("trim_fraction" in p and "0.5" in p for p in _problems(raw))

    def test_krum_needs_2f_plus_3(self):
        raw = _raw()
        raw["training"].update(strategy="krum")
        assert any("byzantine_partners = 1 needs at least 2f + 3 = 5 updates per round" in p and "got 4" in p for p in _problems(raw))

    def test_krum_counts_the_fewest_updates(self):
        """A round may proceed with min_partners updates: that is the n Krum's bound applies to."""
        with pytest.raises(SpecError, match="2f \\+ 3 = 5"):
            _spec(6, strategy="krum", min_partners=4)
        assert _spec(6, strategy="krum", min_partners=5).training.strategy == "krum"

    def test_multikrum_select_bound(self):
        with pytest.raises(SpecError, match="training.krum_select = 5 exceeds"):
            _spec(5, strategy="multikrum", krum_select=5)

    def test_robust_needs_three_updates(self):
        raw = _raw()
        raw["partners"] = raw["partners"][:2]
        raw["training"]["strategy"] = "median"
        assert any("needs at least 3 updates per round" in p and "got 2" in p for p in _problems(raw))

    def test_parameter_without_its_rule(self):
        raw = _raw()
        raw["training"]["byzantine_partners"] = 2
        assert any("training.byzantine_partners is only for strategy 'krum' or 'multikrum', got strategy 'fedavg'" in p for p in _problems(raw))

    def test_clip_l2_only_under_secagg(self):
        raw = _raw()
        raw["secagg"] = {"clip_l2": 1.0}
        assert any("secagg.clip_l2 is applied by the nodes under aggregation = 'secagg' only, got 'plain'" in p for p in _problems(raw))

    def test_clip_l2_not_with_partner_dp(self):
        raw = _raw("heart-disease-ddp.toml")
        raw.setdefault("secagg", {})["clip_l2"] = 1.0
        assert any("privacy.partner.clip is the L2 bound" in p for p in _problems(raw))

    def test_clip_l2_positive(self):
        raw = _raw("heart-disease-secagg.toml")
        raw["secagg"] = {"clip_l2": 0.0}
        assert any("clip_l2" in p for p in _problems(raw))
