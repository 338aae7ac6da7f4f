"""Protocols shared by node and coordinator: pure functions and records, no runtime.

* statistics: the federated statistics round for global feature scaling (exact or DP)
* evaluation: score histograms at the node, pooled accuracy and AUC at the coordinator
* dpsgd: the DP-SGD plan (sample rate, steps, noise multiplier) a node derives from the spec
* summary: the published ``summary.json`` format
* secagg: SecAgg+ secure aggregation as pure stage functions (``from fedcollab.protocols import secagg``)
* quantize: fixed-point encoding modulo 2^32 / 2^64 for secure aggregation, weights packed in
* ddg: the distributed discrete Gaussian (noise shares under secure aggregation), zCDP, wrap-around
* partner_dp: partner-level DP plans (distributed DDG under secagg, central Gaussian), from the spec alone
* he: fixed-point encodings for server-blind aggregation and statistics under HE
* wire: message kinds and record keys
* scoring: encrypted scoring of a linear model (signed request, authenticated and budgeted answer, decryption)
* gbdt: federated histogram gradient-boosted trees, DP plan, XGBoost export (a subpackage: ``from fedcollab.protocols import gbdt``)
* psi: ECDH private set intersection on edwards25519 for vertical record alignment (a subpackage, needs PyNaCl:
  ``from fedcollab.protocols import psi``)
"""

from fedcollab.protocols import _secagg as secagg
from fedcollab.protocols._ddg import (
    SystemRandomSource,
    check_honest_minimum,
    check_wraparound,
    ddg_decode,
    ddg_encode,
    ddg_generator,
    ddg_norm_bound,
    ddg_tau,
    ddg_zcdp,
    sample_discrete_gaussian,
    wraparound_probability,
)
from fedcollab.protocols._dpsgd import DpPlan, plan_dp
from fedcollab.protocols._partner_dp import CentralPlan, DdgPlan, plan_central, plan_distributed
from fedcollab.protocols._he import (
    check_he_headroom,
    decode_statistics_limbs,
    decode_weighted,
    encode_statistics_limbs,
    encode_weighted,
    quantisation_bound,
)
from fedcollab.protocols._evaluation import HIST_BINS, PooledMetrics, pooled_metrics, score_histograms
from fedcollab.protocols._quantize import (
    check_headroom,
    clip_vector,
    decode_update,
    dequantize,
    encode_update,
    pack,
    quantize,
    unpack,
)
from fedcollab.protocols._scoring import (
    LinearModel,
    ScoringAuthError,
    ScoringBudgetExhausted,
    ScoringReplayError,
    ScoringRequestError,
    answer_request,
    build_request,
    decrypt_response,
    load_linear_model,
)
from fedcollab.protocols._statistics import (
    Scaling,
    combine_statistics,
    decode_statistics,
    dp_statistics,
    encode_statistics,
    scaling_from_bounds,
    statistics_sensitivity,
)
from fedcollab.protocols._summary import SUMMARY_SCHEMA_VERSION, Summary, VerticalSummary
from fedcollab.protocols._wire import MessageKind, RecordKey

__all__ = [
    "HIST_BINS",
    "SUMMARY_SCHEMA_VERSION",
    "CentralPlan",
    "DdgPlan",
    "DpPlan",
    "LinearModel",
    "MessageKind",
    "PooledMetrics",
    "RecordKey",
    "Scaling",
    "ScoringAuthError",
    "ScoringBudgetExhausted",
    "ScoringReplayError",
    "ScoringRequestError",
    "Summary",
    "SystemRandomSource",
    "VerticalSummary",
    "answer_request",
    "build_request",
    "check_he_headroom",
    "check_headroom",
    "check_honest_minimum",
    "check_wraparound",
    "clip_vector",
    "combine_statistics",
    "ddg_decode",
    "ddg_encode",
    "ddg_generator",
    "ddg_norm_bound",
    "ddg_tau",
    "ddg_zcdp",
    "decode_statistics",
    "decode_statistics_limbs",
    "decode_update",
    "decode_weighted",
    "decrypt_response",
    "dequantize",
    "dp_statistics",
    "encode_statistics",
    "encode_statistics_limbs",
    "encode_update",
    "encode_weighted",
    "load_linear_model",
    "pack",
    "plan_central",
    "plan_distributed",
    "plan_dp",
    "pooled_metrics",
    "quantisation_bound",
    "quantize",
    "sample_discrete_gaussian",
    "scaling_from_bounds",
    "score_histograms",
    "secagg",
    "statistics_sensitivity",
    "unpack",
    "wraparound_probability",
]
