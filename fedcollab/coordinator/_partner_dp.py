"""The coordinator's side of partner-level DP: decode distributed-DP sums, add central-DP noise, record both.

* distributed: the modular sum of the nodes' DDG vectors is read back (``ddg_decode``) and divided
  by the number of partners in it; the coordinator adds nothing and learns only the noisy sum.
* central: the mean of the partners' L2-clipped updates plus Gaussian noise of std ``z * C`` on
  the sum, drawn here; one release per partner summed, observer ``model_recipients``, kept in the
  coordinator's own chain (never a node's budget toward the coordinator).

Every round leaves an ``aggregate`` entry in the run ledger: participants, partners summed,
dropouts, threshold and the effective noise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcollab.core import ProtocolError
from fedcollab.coordinator._ledger import COORDINATOR, RunLedger
from fedcollab.privacy.accounting import Release
from fedcollab.privacy.mechanisms import fresh_generator
from fedcollab.protocols.ddg import ddg_decode
from fedcollab.protocols.partner_dp import PARTNER_ACCOUNTANT, plan_central, plan_distributed
from fedcollab.protocols.quantize import clip_vector, decode_update
from fedcollab.spec import Spec


class PartnerDp:
    """Partner-level DP of one run at the coordinator (inactive unless privacy.mode is distributed or central)."""

    def __init__(self, spec: Spec, ledger: RunLedger, *, d: int, generator: np.random.Generator | None = None) -> None:
        self.spec = spec
        self.ledger = ledger
        self.mode = spec.privacy.mode
        self.active = self.mode in ("distributed", "central")
        self.extra_coordinates = 0 if self.mode == "distributed" else 1
        self.ddg = plan_distributed(spec, d=d) if self.mode == "distributed" else None
        self.central = plan_central(spec) if self.mode == "central" else None
        self.datasets = {p.name: p.dataset_id for p in spec.partners}
        self._generator = generator

    def _noise(self, size: int) -> np.ndarray:
        assert self.central is not None
        gen = self._generator if self._generator is not None else fresh_generator()
        return gen.normal(0.0, self.central.noise_multiplier * self.central.clip, size)

    def secure_mean(self, total: np.ndarray, rnd: int, *, participants: list[str], summed: list[str]) -> np.ndarray:
        """The round's mean update from the SecAgg+ sum (distributed: noised by the nodes; central: noise added here)."""
        n = len(summed)
        if n == 0:
            raise ProtocolError(f"round {rnd}: nothing was summed")
        if self.ddg is not None:
            if n < self.ddg.t_min:
                raise ProtocolError(f"round {rnd}: {n} partners summed, fewer than t_min = {self.ddg.t_min}")
            mean = ddg_decode(total, gamma=self.ddg.gamma, bits=self.ddg.bits) / n
            self._aggregate(rnd, participants, summed, noise_std_on_sum=self.ddg.effective_std(n),
                            extra={"sigma_total": self.ddg.sigma_total, "gamma": self.ddg.gamma, "t_min": self.ddg.t_min,
                                   "colluders": self.ddg.colluders, "n_honest": self.ddg.n_honest, "wraparound_bound": self.ddg.wraparound_bound})
            return mean
        weighted, rel_total = decode_update(total, max_weight=1.0, scale=self.spec.secagg.scale, bits=32)
        if not np.isclose(rel_total, n):
            raise ProtocolError(f"round {rnd}: central DP expects unit weights, the sum says {rel_total:g} for {n} partners")
        return self._central(weighted * rel_total, rnd, participants, summed)

    def central_mean(self, updates: dict[str, np.ndarray], rnd: int, *, participants: list[str]) -> np.ndarray:
        """Plain aggregation under central DP: clip each update to L2 ``C`` (again: never trust a node's clipping), sum, noise, mean."""
        assert self.central is not None
        summed = sorted(updates)
        total = np.sum([clip_vector(updates[p], bound=self.central.clip, norm="l2") for p in summed], axis=0)
        return self._central(total, rnd, participants, summed)

    def _central(self, total: np.ndarray, rnd: int, participants: list[str], summed: list[str]) -> np.ndarray:
        assert self.central is not None
        noisy = total + self._noise(total.size)
        mean = noisy / len(summed)
        if not np.isfinite(mean).all():
            raise ProtocolError(f"round {rnd}: the aggregate is not finite")
        std = self.central.noise_multiplier * self.central.clip
        payload = mean.astype(np.float64).tobytes()
        for p in summed:
            release = Release(kind="central_dp_update", about="train", unit="partner", observer="model_recipients", added_by=COORDINATOR,
                              party=p, round=rnd, mechanism=self.central.mechanism(),
                              details={"clip": self.central.clip, "noise_std_on_sum": std, "summed": len(summed),
                                       "noise_rng": "numpy PCG64 seeded from OS entropy (256 bits)"})
            self.ledger.release(release, dataset=self.datasets[p], delta=self.central.delta, accountant=PARTNER_ACCOUNTANT, payload=payload)
        self._aggregate(rnd, participants, summed, noise_std_on_sum=std, extra={"noise_multiplier": self.central.noise_multiplier})
        return mean

    def _aggregate(self, rnd: int, participants: list[str], summed: list[str], *, noise_std_on_sum: float, extra: dict[str, Any]) -> None:
        pp = self.spec.privacy.partner
        body: dict[str, Any] = {
            "mode": self.mode,
            "aggregation": self.spec.aggregation,
            "participants": participants,
            "summed": summed,
            "dropped": sorted(set(participants) - set(summed)),
            "clip": pp.clip if pp else None,
            "noise_std_on_sum": noise_std_on_sum,
            "noise_std_on_mean": noise_std_on_sum / len(summed),
            **extra,
        }
        if self.spec.aggregation == "secagg":
            body["threshold"] = self.spec.secagg.resolved_threshold(len(self.spec.partners))
        self.ledger.aggregate(rnd, body)
