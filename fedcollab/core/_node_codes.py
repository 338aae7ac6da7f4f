"""Closed error codes a node may send to the coordinator (never exception text)."""

from __future__ import annotations

from enum import IntEnum


class NodeErrorCode(IntEnum):
    """What a node says when it refuses or fails. Text stays in the node's own log."""

    INTERNAL = 100
    UNKNOWN_PARTNER = 101
    DATA_UNREADABLE = 110
    DATA_SCHEMA_MISMATCH = 111
    BAD_REQUEST = 120
    BAD_MODEL_UPDATE = 121
    OUT_OF_ORDER = 122
    PRIVACY_INVALID = 130
    BUDGET_EXHAUSTED = 131
    POLICY_REFUSED = 132
    TOO_FEW_PARTICIPANTS = 133
    SCORING_BUDGET_EXHAUSTED = 134
    SCORING_BAD_REQUEST = 135
    CRYPTO_REFUSED = 140
    SCORING_UNAUTHENTICATED = 136
    SCORING_REPLAYED = 137
    UNAPPROVED_BUNDLE = 141
    SPEC_NOT_APPROVED = 142
    # The node owns its dataset id and its split (issue 13, attacks 2 and 5).
    DATASET_MISMATCH = 150
    SPLIT_CHANGED = 151
    TEST_SPLIT_TOO_SMALL = 152


NODE_ERROR_HELP: dict[NodeErrorCode, str] = {
    NodeErrorCode.INTERNAL: "Unexpected failure at the node; details are in the node's own log.",
    NodeErrorCode.UNKNOWN_PARTNER: "The node could not tell which partner of the spec it is.",
    NodeErrorCode.DATA_UNREADABLE: "The node could not read its data source.",
    NodeErrorCode.DATA_SCHEMA_MISMATCH: "The node's data does not match the shared schema.",
    NodeErrorCode.BAD_REQUEST: "The coordinator's message was malformed or out of order.",
    NodeErrorCode.BAD_MODEL_UPDATE: "The global model received or the update produced was NaN or wrongly shaped.",
    NodeErrorCode.OUT_OF_ORDER: "The message does not follow the run's order at this node (train, evaluate or close before setup, a second setup, a secure-aggregation stage before the round's earlier stages, a round already answered or beyond the spec; in an analytics run, a second query or profile, or a secure-aggregation stage before the query); refused and recorded, nothing released.",
    NodeErrorCode.PRIVACY_INVALID: "The privacy parameters could not be satisfied (for example no sigma reaches the target).",
    NodeErrorCode.BUDGET_EXHAUSTED: "The release would exceed the node's budget; nothing was released.",
    NodeErrorCode.POLICY_REFUSED: "The node's policy forbids this request.",
    NodeErrorCode.TOO_FEW_PARTICIPANTS: "Distributed DP: fewer partners in the round than the noise shares were sized for (t_min); nothing was released.",
    NodeErrorCode.SCORING_BUDGET_EXHAUSTED: "Encrypted scoring: the querier's row budget for this model is spent; nothing was scored.",
    NodeErrorCode.SCORING_BAD_REQUEST: "Encrypted scoring: the request was malformed (container, context parameters or ciphertexts).",
    NodeErrorCode.CRYPTO_REFUSED: "A signature, key package, HE context or ciphertext failed the node's check (unsigned, mis-signed, malformed or other parameters); nothing was decrypted or sent.",
    NodeErrorCode.SCORING_UNAUTHENTICATED: "Encrypted scoring: the querier is not in the holder's roster, or the request is unsigned, signed by another key or altered after signing; nothing was scored.",
    NodeErrorCode.SCORING_REPLAYED: "Encrypted scoring: the holder's ledger already records an answer to this request id (a replay); nothing was scored or charged.",
    NodeErrorCode.UNAPPROVED_BUNDLE: "Deployment: the run's bundle is not one the partner approved (SHA-256 pin); nothing ran.",
    NodeErrorCode.SPEC_NOT_APPROVED: "Deployment: the run's spec (SHA-256) is not in the node's approved store; nothing was built or released.",
    NodeErrorCode.DATASET_MISMATCH: "The spec names another dataset id for this partner than the one configured in the node's folder; nothing was released.",
    NodeErrorCode.SPLIT_CHANGED: "The spec's train/test split differs from the split the node pinned for this dataset on first use; nothing was released.",
    NodeErrorCode.TEST_SPLIT_TOO_SMALL: "The test split has fewer rows than the policy's `min_test_rows`; no test metrics were released.",
}
