"""Protocols shared by node and coordinator: pure functions and records, no runtime.

* statistics: the federated statistics round for global feature scaling (exact or DP)
* evaluation: score histograms at the node, pooled accuracy and AUC at the coordinator
* dpsgd: the DP-SGD plan (sample rate, steps, noise multiplier) a node derives from the spec
* summary: the published ``summary.json`` format
* wire: message kinds and record keys
"""

from fedcollab.protocols._dpsgd import DpPlan, plan_dp
from fedcollab.protocols._evaluation import HIST_BINS, PooledMetrics, pooled_metrics, score_histograms
from fedcollab.protocols._statistics import (
    Scaling,
    combine_statistics,
    dp_statistics,
    scaling_from_bounds,
    statistics_sensitivity,
)
from fedcollab.protocols._summary import SUMMARY_SCHEMA_VERSION, Summary
from fedcollab.protocols._wire import MessageKind, RecordKey

__all__ = [
    "HIST_BINS",
    "SUMMARY_SCHEMA_VERSION",
    "DpPlan",
    "MessageKind",
    "PooledMetrics",
    "RecordKey",
    "Scaling",
    "Summary",
    "combine_statistics",
    "dp_statistics",
    "plan_dp",
    "pooled_metrics",
    "scaling_from_bounds",
    "score_histograms",
    "statistics_sensitivity",
]
