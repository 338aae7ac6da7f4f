"""CLI exit codes, each with help text (a test checks that every code has some)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the ``fedcollab`` command."""

    OK = 0
    ERROR = 1
    CONFIG_INVALID = 2
    DATA_INVALID = 3
    PRIVACY_INVALID = 4
    BUDGET_EXHAUSTED = 5
    CRYPTO_FAILED = 6
    PROTOCOL_FAILED = 7
    TRANSPORT_FAILED = 8
    NODE_FAILED = 9
    MISSING_EXTRA = 10
    POLICY_REFUSED = 11
    NODE_REJECTED = 12
    LEDGER_TAMPERED = 20
    CLAIM_MISMATCH = 21
    LEDGER_BUDGET_EXCEEDED = 22
    LEDGER_UNREADABLE = 23
    PROBE_FAILED = 24
    LEDGER_ABORTED = 25
    INTERRUPTED = 130


EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.OK: "Success.",
    ExitCode.ERROR: "An unexpected error; see the log.",
    ExitCode.CONFIG_INVALID: "The spec, policy or query is invalid (privacy values in it too, e.g. target_epsilon = 0); each problem names the field, the expectation and the value.",
    ExitCode.DATA_INVALID: "A silo's data does not match the shared schema; nothing was sent.",
    ExitCode.PRIVACY_INVALID: "Invalid privacy parameters passed to the accounting or a mechanism, not read from a spec (epsilon <= 0, delta outside (0, 1) or [0, 1) for pure DP, NaN), or an unsupported event.",
    ExitCode.BUDGET_EXHAUSTED: "A release would exceed a privacy budget; it was refused before anything left the node.",
    ExitCode.CRYPTO_FAILED: "A signature, key or ciphertext check failed.",
    ExitCode.PROTOCOL_FAILED: "A protocol message was malformed (NaN or wrongly shaped update, wrong stage).",
    ExitCode.TRANSPORT_FAILED: "The Flower runtime failed to deliver messages.",
    ExitCode.NODE_FAILED: "Too few nodes replied successfully; their error codes are listed.",
    ExitCode.MISSING_EXTRA: "A needed extra is not installed (for example: pip install 'fedcollab[node]').",
    ExitCode.POLICY_REFUSED: "A partner's policy forbids the request (mode, features, model kind, rounds, non-private release).",
    ExitCode.NODE_REJECTED: "Deployment: the SuperLink refused the node's authentication key (not registered by the coordinator).",
    ExitCode.LEDGER_TAMPERED: "audit verify: a ledger line is altered, unsigned, mis-signed, missing, reordered or duplicated (the line is named).",
    ExitCode.CLAIM_MISMATCH: "audit verify: a party's claimed epsilon differs from the one recomputed from its events.",
    ExitCode.LEDGER_BUDGET_EXCEEDED: "audit verify: a party's spend exceeds the budget recorded in its entries.",
    ExitCode.LEDGER_UNREADABLE: "audit verify: the ledger or roster cannot be read (missing file, not JSON Lines).",
    ExitCode.PROBE_FAILED: "audit probe: the measured lower bound on epsilon exceeds the claim (the noise is not what is claimed).",
    ExitCode.LEDGER_ABORTED: "audit verify: the ledger is intact and ends with the coordinator's signed abort: the run failed or was interrupted (its reason and the partners' error codes are listed); every release before it is checked.",
    ExitCode.INTERRUPTED: "The run was interrupted (Ctrl-C); the ledger ends with a signed abort and summary.json says status interrupted (resume with --resume).",
}
