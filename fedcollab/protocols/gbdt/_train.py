"""The whole protocol run in-process: partners as function calls, the way node and coordinator call it.

This is not the Flower wiring (that comes as a node adapter and a coordinator strategy): it drives
the same stage functions, sums the replies in the clear or as SecAgg+ would (fixed point modulo
2^64, the masks cancelling in the modular sum), and collects every release event the nodes make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcollab.privacy.accounting import Release
from fedcollab.protocols.gbdt._binning import BinLayout
from fedcollab.protocols.gbdt._dp import GbdtDpPlan
from fedcollab.protocols.gbdt._histogram import decode_histograms, encode_histograms, histogram_bound, sum_histograms
from fedcollab.protocols.gbdt._model import Ensemble
from fedcollab.protocols.gbdt._protocol import (
    coordinator_start_tree,
    coordinator_step,
    node_apply_tree,
    node_init,
    node_reply,
    node_set_edges,
    node_sketch,
)
from fedcollab.protocols.gbdt._sketch import SketchLayout, edges_from_sketch
from fedcollab.spec import TreeParams

SECAGG_SCALE = float(2**24)


@dataclass(frozen=True)
class TrainResult:
    """The model and every release each partner made."""

    model: Ensemble
    releases: dict[str, list[Release]]


def train_in_process(partners: Sequence[tuple[str, np.ndarray, np.ndarray]], *, layout: BinLayout, params: TreeParams,
                     plan: GbdtDpPlan | None, coordinator_rng: np.random.Generator,
                     node_rngs: Sequence[np.random.Generator] | None = None, secagg: bool = False,
                     sketch: SketchLayout | None = None) -> TrainResult:
    """Train with ``partners`` = ``[(name, x_train, y_train), ...]`` answering as nodes would.

    With ``sketch`` (``bin_edges = "quantile"``) the run starts with the count sketch (summed in the clear,
    or fixed-point encoded as under SecAgg+ with ``secagg``), and ``layout`` (the public one) gets the
    quantile edges.
    """
    states = [node_init(x, y, layout=layout, base_score=params.base_score) for _, x, y in partners]
    rngs = list(node_rngs) if node_rngs is not None else [None] * len(partners)
    releases: dict[str, list[Release]] = {name: [] for name, _, _ in partners}
    max_rows = max(len(y) for _, _, y in partners)
    if sketch is not None:
        counts = []
        for i, (name, x, _) in enumerate(partners):
            states[i], values, event = node_sketch(states[i], x, party=name, sketch=sketch, plan=plan, rng=rngs[i])
            releases[name].append(event)
            counts.append(values)
        if secagg:
            sk_bound = float(max_rows) + 12.0 * (plan.sigma_sketch if plan is not None else 0.0)
            sk_q = np.zeros(counts[0].size, dtype=np.uint64)
            for v in counts:
                sk_q += encode_histograms(v, bound=sk_bound, scale=SECAGG_SCALE, n_parties=len(counts))
            summed = decode_histograms(sk_q, shape=counts[0].shape, scale=SECAGG_SCALE)
        else:
            summed = np.sum(counts, axis=0)
        indices = edges_from_sketch(summed, sketch, n_bins=params.n_bins)
        public = layout
        for i, (_, x, _) in enumerate(partners):
            states[i], layout = node_set_edges(states[i], x, indices, public=public, sketch=sketch, n_bins=params.n_bins)
    sigma = 0.0 if plan is None else max(plan.sigma_split, plan.sigma_leaf)
    # |p - y| <= 1 and p (1 - p) <= 1/4 bound every cell without DP; 12 sigma covers the noise (fails with prob. < 1e-32 per cell)
    bound = histogram_bound(max_rows=max_rows, grad_clip=min(params.grad_clip, 1.0), hess_clip=min(params.hess_clip, 0.25), noise_margin=12.0 * sigma)
    trees = []
    for t in range(params.n_trees):
        gt, req = coordinator_start_tree(t, layout=layout, params=params, plan=plan, rng=coordinator_rng)
        tree = None
        while req is not None:
            replies = []
            for i, (name, _, _) in enumerate(partners):
                states[i], reply, event = node_reply(states[i], req, party=name, layout=layout, params=params, plan=plan, rng=rngs[i])
                releases[name].append(event)
                replies.append(reply.values)
            if secagg:
                shape = replies[0].shape
                total_q = np.zeros(int(np.prod(shape)), dtype=np.uint64)
                for v in replies:
                    total_q += encode_histograms(v, bound=bound, scale=SECAGG_SCALE, n_parties=len(replies))
                total = decode_histograms(total_q, shape=shape, scale=SECAGG_SCALE)
            else:
                total = sum_histograms(replies)
            gt, req, tree = coordinator_step(gt, req, total, layout=layout, params=params, plan=plan)
        assert tree is not None
        trees.append(tree)
        states = [node_apply_tree(s, tree, layout=layout) for s in states]
    return TrainResult(model=Ensemble(trees=tuple(trees), base_score=params.base_score, feature_names=layout.feature_names), releases=releases)
