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
    PRIVACY_INVALID = 130
    BUDGET_EXHAUSTED = 131
    POLICY_REFUSED = 132
    TOO_FEW_PARTICIPANTS = 133
    UNAPPROVED_BUNDLE = 140


NODE_ERROR_HELP: dict[NodeErrorCode, str] = {
    NodeErrorCode.INTERNAL: "Unexpected failure at the node; details are in the node's own log.",
    NodeErrorCode.UNKNOWN_PARTNER: "The node could not tell which partner of the spec it is.",
    NodeErrorCode.DATA_UNREADABLE: "The node could not read its data source.",
    NodeErrorCode.DATA_SCHEMA_MISMATCH: "The node's data does not match the shared schema.",
    NodeErrorCode.BAD_REQUEST: "The coordinator's message was malformed or out of order.",
    NodeErrorCode.BAD_MODEL_UPDATE: "The global model received or the update produced was NaN or wrongly shaped.",
    NodeErrorCode.PRIVACY_INVALID: "The privacy parameters could not be satisfied (for example no sigma reaches the target).",
    NodeErrorCode.BUDGET_EXHAUSTED: "The release would exceed the node's budget; nothing was released.",
    NodeErrorCode.POLICY_REFUSED: "The node's policy forbids this request.",
    NodeErrorCode.TOO_FEW_PARTICIPANTS: "Distributed DP: fewer partners in the round than the noise shares were sized for (t_min); nothing was released.",
    NodeErrorCode.UNAPPROVED_BUNDLE: "Deployment: the run's bundle is not one the partner approved (SHA-256 pin); nothing ran.",
}
