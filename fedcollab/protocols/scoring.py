"""Encrypted scoring: a querier scores its rows with a model holder's linear model (``docs/scoring.md``).

Three steps, exchanged as files:

1. querier, :func:`build_request`: rows -> request (public CKKS context + column-packed
   ciphertexts, signed with the querier's node key) and a local secret state (context with
   secret key, mode 0600);
2. model holder, :func:`answer_request`: checks the request, authenticates the querier against
   its own roster (Ed25519 signature over :func:`request_digest`), refuses a request id it has
   already answered, checks the querier's row budget in its ``NodePolicy`` against its ledger,
   scores under encryption (masked, noise-flooded), records a ``scoring`` ledger entry, then
   returns the response;
3. querier, :func:`decrypt_response`: logits, the sigmoid applied locally.

File container (request and response): an 8-byte magic, the header length (8 bytes, big
endian), a JSON header listing each blob with its length and SHA-256, then the blobs.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcollab.core import BudgetExhausted, ConfigError, CryptoError, NodeErrorCode, PolicyRefused, ProtocolError, write_private
from fedcollab.crypto import SCORING_PARAMS, PublicScoringContext, SecretScoringContext, check_scoring_params
from fedcollab.privacy.accounting import SCORING_CHARGE_PER_ROW, PartyLedger, canonical, key_fingerprint, public_key_hex
from fedcollab.spec import NodePolicy, Roster

REQUEST_MAGIC = b"FCSCREQ1"
RESPONSE_MAGIC = b"FCSCRSP1"
STATE_FORMAT = "fedcollab.score_secret"
SCORING_VERSION = 1
MAX_HEADER_BYTES = 1 << 20
SIGNATURE_DOMAIN = b"fedcollab.score_request/1 signature\x00"
Progress = Callable[[int], None] | None


class ScoringRequestError(ProtocolError):
    """A scoring request or response file is malformed (the field is named)."""

    node_code = NodeErrorCode.SCORING_BAD_REQUEST


class ScoringAuthError(CryptoError):
    """The querier is not in the holder's roster, or the request's signature is missing or wrong."""

    node_code = NodeErrorCode.SCORING_UNAUTHENTICATED


class ScoringReplayError(ProtocolError):
    """The holder's ledger already records an answer to this request id."""

    node_code = NodeErrorCode.SCORING_REPLAYED


class ScoringBudgetExhausted(BudgetExhausted):
    """The querier's row budget for this model would be exceeded; nothing was scored."""

    node_code = NodeErrorCode.SCORING_BUDGET_EXHAUSTED

    def __init__(self, message: str, *, querier: str, rows: int, rows_before: int, budget: int) -> None:
        self.querier, self.rows, self.rows_before, self.budget = querier, rows, rows_before, budget
        super().__init__(message)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------- container


def blob_table(blobs: Sequence[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """The header's ``blobs`` table: each blob's name, length and SHA-256."""
    return [{"name": n, "length": len(b), "sha256": _sha(b)} for n, b in blobs]


def pack_container(magic: bytes, header: dict[str, Any], blobs: Sequence[tuple[str, bytes]]) -> bytes:
    """Header + blobs in one byte string; the header gains the blob table."""
    head = json.dumps({**header, "blobs": blob_table(blobs)}, sort_keys=True, separators=(",", ":")).encode()
    return b"".join([magic, len(head).to_bytes(8, "big"), head, *(b for _, b in blobs)])


def unpack_container(data: bytes, magic: bytes, *, what: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Parse and check a container: magic, header, every blob's length and hash, no trailing bytes."""
    if not isinstance(data, bytes | bytearray) or len(data) < 16 or data[:8] != magic:
        raise ScoringRequestError(f"{what}: must start with {magic!r}, got {bytes(data[:8])!r} ({len(data)} bytes)")
    n = int.from_bytes(data[8:16], "big")
    if n > MAX_HEADER_BYTES or 16 + n > len(data):
        raise ScoringRequestError(f"{what}: header length must be <= {min(MAX_HEADER_BYTES, len(data) - 16)} bytes, got {n} (truncated?)")
    try:
        header = json.loads(data[16 : 16 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ScoringRequestError(f"{what}: the header must be JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("blobs"), list):
        raise ScoringRequestError(f"{what}: the header must be an object with a `blobs` list")
    blobs: dict[str, bytes] = {}
    pos = 16 + n
    for i, b in enumerate(header["blobs"]):
        if not (isinstance(b, dict) and isinstance(b.get("name"), str) and isinstance(b.get("length"), int) and b["length"] >= 0):
            raise ScoringRequestError(f"{what}: `blobs[{i}]` must have a name and a length >= 0, got {b!r}")
        chunk = data[pos : pos + b["length"]]
        if len(chunk) != b["length"]:
            raise ScoringRequestError(f"{what}: blob `{b['name']}` must be {b['length']} bytes, got {len(chunk)} (truncated)")
        if _sha(bytes(chunk)) != b.get("sha256"):
            raise ScoringRequestError(f"{what}: blob `{b['name']}` does not match its SHA-256 (altered)")
        blobs[b["name"]] = bytes(chunk)
        pos += b["length"]
    if pos != len(data):
        raise ScoringRequestError(f"{what}: must end after its last blob, got {len(data) - pos} trailing bytes")
    return header, blobs


def _int_field(header: dict[str, Any], name: str, *, what: str, lo: int = 1, hi: int | None = None) -> int:
    v = header.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise ScoringRequestError(f"{what}: `{name}` must be an integer in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")
    return v


def _is_hex(v: Any, n: int) -> bool:
    return isinstance(v, str) and len(v) == n and all(c in "0123456789abcdef" for c in v)


def _chunks(n_rows: int, slots: int) -> list[int]:
    return [min(slots, n_rows - s) for s in range(0, n_rows, slots)]


# --------------------------------------------------------------------------- request signatures


def request_digest(header: dict[str, Any]) -> bytes:
    """The 32 bytes a querier signs: SHA-256 of a domain tag and the header without ``signature``.

    The header (RFC 8785 canonical JSON) names the querier, the request id, the target model (or
    null), the row count and chunks, the CKKS parameters, the feature names, the signer's key
    fingerprint and the blob table, which holds the SHA-256 of the context and of every
    ciphertext. Changing any of them after signing changes the digest.
    """
    try:
        body = canonical({k: v for k, v in header.items() if k != "signature"})
    except Exception:  # noqa: BLE001 - rfc8785 raises its own types for values it cannot canonicalise
        raise ScoringAuthError("request: the header cannot be canonicalised (RFC 8785), so its signature cannot be checked") from None
    return hashlib.sha256(SIGNATURE_DOMAIN + body).digest()


def sign_request_header(header: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``header`` (with its ``blobs`` table) plus ``signer`` (key fingerprint) and ``signature``."""
    signed = {**{k: v for k, v in header.items() if k != "signature"}, "signer": key_fingerprint(public_key_hex(key))}
    return {**signed, "signature": key.sign(request_digest(signed)).hex()}


def authenticate_request(header: dict[str, Any], roster: Roster) -> str:
    """Check a request's signature against the holder's own roster; returns the querier's key fingerprint.

    Only the roster's key for the named querier is used, never a key carried by the request.
    Raises :class:`ScoringAuthError` naming the problem (unknown querier, unsigned, signed by
    another key, altered after signing).
    """
    querier = header.get("querier")
    entry = roster.parties.get(querier) if isinstance(querier, str) else None
    if entry is None:
        raise ScoringAuthError(f"request: querier {querier!r} is not in the holder's roster (known: {sorted(roster.parties)}); "
                               "add its signing key to the roster out of band")
    fp = key_fingerprint(entry.signing_key)
    sig = header.get("signature")
    if not isinstance(sig, str) or len(sig) != 128:
        raise ScoringAuthError(f"request: `signature` must be the querier's Ed25519 signature (128 hex digits), got "
                               f"{'nothing' if sig is None else repr(sig)[:40]}; sign with `fedcollab score encrypt --node`")
    if header.get("signer") != fp:
        raise ScoringAuthError(f"request: signed by key {header.get('signer')!r}, but the roster's key for {querier!r} is {fp}")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(entry.signing_key)).verify(bytes.fromhex(sig), request_digest(header))
    except (InvalidSignature, ValueError):
        raise ScoringAuthError(f"request: the signature is not {querier!r}'s (key {fp}) over this request: "
                               "the request was altered after signing or signed by another key") from None
    return fp


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class LinearModel:
    """A linear scorer on raw encoded features: logit = x . weights + bias (feature scaling folded in)."""

    weights: np.ndarray
    bias: float
    model_id: str
    kind: str = "logistic_regression"

    @property
    def n_features(self) -> int:  # noqa: D102
        return len(self.weights)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Plain scoring (the reference the encrypted path must match)."""
        return np.asarray(x, dtype=np.float64) @ self.weights + self.bias


def fold_scaling(weight: np.ndarray, bias: float, mean: np.ndarray | None, std: np.ndarray | None) -> tuple[np.ndarray, float]:
    """``w . (x - m) / s + b`` as ``w' . x + b'``: the scaling stays with the model holder."""
    w = np.asarray(weight, dtype=np.float64).reshape(-1)
    if mean is None or std is None:
        return w, float(bias)
    m, s = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if m.shape != w.shape or s.shape != w.shape or not (s > 0).all():
        raise ConfigError(f"scaling parameters must be {len(w)} means and {len(w)} positive stds, got {m.shape} and {s.shape}")
    w2 = w / s
    return w2, float(bias - float(w2 @ m))


def load_linear_model(run_dir: str | Path) -> LinearModel:
    """The model of a fedcollab run folder (``model.safetensors`` + ``summary.json``).

    Only a logistic regression / linear model (one ``linear`` layer, one output) can be scored.
    """
    root = Path(run_dir)
    try:
        summary = json.loads((root / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{root}/summary.json: cannot read the run summary ({type(exc).__name__})") from None
    model = summary.get("model") or {}
    path = root / str(model.get("path", "model.safetensors"))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the model {path}: {exc.strerror}") from None
    if model.get("sha256") and _sha(raw) != model["sha256"]:
        raise ConfigError(f"{path}: SHA-256 differs from summary.json's model.sha256 (the model file was changed)")
    if model.get("format", "safetensors") != "safetensors":
        raise ConfigError(f"{path}: only safetensors models can be scored, got {model.get('format')!r}")
    from safetensors.numpy import load as st_load

    try:
        arrays = st_load(raw)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ConfigError(f"{path}: not a safetensors file ({type(exc).__name__})") from None
    if set(arrays) != {"linear.weight", "linear.bias"} or arrays["linear.weight"].ndim != 2 or arrays["linear.weight"].shape[0] != 1:
        shapes = {k: list(v.shape) for k, v in arrays.items()}
        raise PolicyRefused(f"{path}: encrypted scoring supports a logistic regression / linear model (linear.weight (1, d), linear.bias (1,)), got {shapes}")
    sp = summary.get("scaling_parameters")
    w, b = fold_scaling(arrays["linear.weight"][0], float(arrays["linear.bias"][0]),
                        sp.get("mean") if sp else None, sp.get("std") if sp else None)
    if not (np.isfinite(w).all() and math.isfinite(b)):
        raise ConfigError(f"{path}: the model has non-finite weights")
    return LinearModel(weights=w, bias=b, model_id=_sha(raw))


# --------------------------------------------------------------------------- querier


@dataclass(frozen=True)
class PendingRequest:
    """What :func:`build_request` returns: the request to send, the secret state to keep."""

    request: bytes
    state: bytes
    request_id: str
    n_rows: int


def build_request(x: np.ndarray, *, querier: str, key: Ed25519PrivateKey, model_id: str | None = None,
                  feature_names: Sequence[str] | None = None, labels: np.ndarray | None = None,
                  context: SecretScoringContext | None = None, progress: Progress = None) -> PendingRequest:
    """Encrypt rows ``x`` (n, d) for scoring: the request signed with ``key``, and the querier's secret state (JSON).

    ``key`` is the querier's node signing key (its public key is in the holder's roster under
    ``querier``). ``model_id``, if given, binds the request to that model SHA-256: the holder
    refuses to score it with any other model.
    """
    if not isinstance(querier, str) or not querier:
        raise ConfigError(f"`querier` must be a non-empty name, got {querier!r}")
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"`key` must be the querier's Ed25519 signing key, got {type(key).__name__}")
    if model_id is not None and not _is_hex(model_id, 64):
        raise ConfigError(f"`model_id` must be a model SHA-256 (64 lowercase hex digits), got {model_id!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ConfigError(f"`rows` must be a non-empty (rows, features) array, got shape {x.shape}")
    if feature_names is not None and len(feature_names) != x.shape[1]:
        raise ConfigError(f"`feature_names` must name {x.shape[1]} features, got {len(feature_names)}")
    if labels is not None and len(labels) != len(x):
        raise ConfigError(f"`labels` must have {len(x)} entries, got {len(labels)}")
    ctx = context or SecretScoringContext.generate()
    cols = ctx.encrypt_columns(x, progress=progress)
    request_id = secrets.token_hex(16)
    header = {
        "format": "fedcollab.score_request", "version": SCORING_VERSION, "request_id": request_id, "querier": querier,
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "params": ctx.params.to_dict(),
        "n_rows": int(x.shape[0]), "n_features": int(x.shape[1]), "chunks": _chunks(x.shape[0], ctx.params.slots),
        "feature_names": list(feature_names) if feature_names is not None else None, "packing": "column", "model": model_id,
    }
    blobs = [("context", ctx.public_bytes())] + [(f"c{i}f{j}", b) for i, ch in enumerate(cols) for j, b in enumerate(ch)]
    header = sign_request_header({**header, "blobs": blob_table(blobs)}, key)
    req = pack_container(REQUEST_MAGIC, header, blobs)
    state = {
        "format": STATE_FORMAT, "version": SCORING_VERSION, "request_id": request_id, "request_sha256": _sha(req),
        "n_rows": int(x.shape[0]), "chunks": header["chunks"], "context": base64.b64encode(ctx.secret_bytes()).decode(),
        "labels": None if labels is None else [float(v) for v in labels],
    }
    return PendingRequest(request=req, state=json.dumps(state).encode(), request_id=request_id, n_rows=int(x.shape[0]))


def write_secret(path: str | Path, data: bytes) -> None:
    """Write the querier's secret state with mode 0600 (created afresh; an existing file is refused)."""
    p = Path(path)
    try:
        write_private(p, data, mode="new")
    except FileExistsError:
        raise ConfigError(f"{p} exists; refusing to overwrite a secret key file") from None


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` whole or not at all (temporary file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + f".tmp-{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    os.replace(tmp, p)


@dataclass(frozen=True)
class Scores:
    """Decrypted scores at the querier."""

    logits: np.ndarray
    labels: np.ndarray | None
    holder: str
    model_id: str
    request_id: str

    @property
    def probabilities(self) -> np.ndarray:
        """The sigmoid, applied by the querier after decryption."""
        return 1.0 / (1.0 + np.exp(-self.logits))

    @property
    def accuracy(self) -> float | None:
        """Accuracy at threshold 0.5 when labels were kept."""
        if self.labels is None:
            return None
        return float(((self.logits > 0).astype(np.float64) == self.labels).mean())


def decrypt_response(response: bytes, state: bytes, *, progress: Progress = None) -> Scores:
    """Check that ``response`` answers the request of ``state`` and decrypt its scores."""
    try:
        st = json.loads(state)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError("secret state: must be the JSON written by `fedcollab score encrypt`") from None
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise ConfigError(f"secret state: `format` must be {STATE_FORMAT!r}, got {st.get('format') if isinstance(st, dict) else st!r}")
    header, blobs = unpack_container(response, RESPONSE_MAGIC, what="response")
    what = "response"
    if header.get("request_id") != st["request_id"] or header.get("request_sha256") != st["request_sha256"]:
        raise ScoringRequestError(f"{what}: `request_id` must be {st['request_id']} (this secret's request), got {header.get('request_id')!r}")
    if header.get("chunks") != st["chunks"]:
        raise ScoringRequestError(f"{what}: `chunks` must be {st['chunks']}, got {header.get('chunks')!r}")
    ctx = SecretScoringContext.from_secret_bytes(base64.b64decode(st["context"]))
    out = []
    for i, rows in enumerate(st["chunks"]):
        blob = blobs.get(f"r{i}")
        if blob is None:
            raise ScoringRequestError(f"{what}: blob `r{i}` is missing")
        out.append(ctx.decrypt_scores(blob, rows=rows, field=f"r{i}"))
        if progress:
            progress(1)
    labels = np.asarray(st["labels"], dtype=np.float64) if st.get("labels") is not None else None
    return Scores(logits=np.concatenate(out), labels=labels, holder=str(header.get("holder")), model_id=str(header.get("model")),
                  request_id=st["request_id"])


# --------------------------------------------------------------------------- model holder


@dataclass(frozen=True)
class ParsedRequest:
    """A checked request (the ciphertexts are still opaque)."""

    header: dict[str, Any]
    blobs: dict[str, bytes]
    sha256: str

    @property
    def querier(self) -> str:  # noqa: D102
        return str(self.header["querier"])

    @property
    def n_rows(self) -> int:  # noqa: D102
        return int(self.header["n_rows"])

    @property
    def request_id(self) -> str:  # noqa: D102
        return str(self.header["request_id"])


def parse_request(data: bytes) -> ParsedRequest:
    """Check a request's container and header (every field named on failure); no decryption needed."""
    what = "request"
    header, blobs = unpack_container(data, REQUEST_MAGIC, what=what)
    if header.get("format") != "fedcollab.score_request" or header.get("version") != SCORING_VERSION:
        raise ScoringRequestError(f"{what}: `format`/`version` must be fedcollab.score_request/1, got {header.get('format')!r}/{header.get('version')!r}")
    if not isinstance(header.get("querier"), str) or not header["querier"]:
        raise ScoringRequestError(f"{what}: `querier` must be a non-empty string, got {header.get('querier')!r}")
    if not _is_hex(header.get("request_id"), 32):
        raise ScoringRequestError(f"{what}: `request_id` must be 32 lowercase hex digits, got {header.get('request_id')!r}")
    if header.get("model") is not None and not _is_hex(header["model"], 64):
        raise ScoringRequestError(f"{what}: `model` must be null or a model SHA-256 (64 hex digits), got {header.get('model')!r}")
    if header.get("packing") != "column":
        raise ScoringRequestError(f"{what}: `packing` must be 'column', got {header.get('packing')!r}")
    try:
        params = check_scoring_params(header.get("params"))
    except CryptoError as exc:
        raise ScoringRequestError(f"{what}: {exc}") from None
    n = _int_field(header, "n_rows", what=what, hi=10**8)
    d = _int_field(header, "n_features", what=what, hi=10**5)
    if header.get("chunks") != _chunks(n, params.slots):
        raise ScoringRequestError(f"{what}: `chunks` must be {_chunks(n, params.slots)} for {n} rows, got {header.get('chunks')!r}")
    names = header.get("feature_names")
    if names is not None and (not isinstance(names, list) or len(names) != d):
        raise ScoringRequestError(f"{what}: `feature_names` must be null or {d} names, got {names!r}")
    want = {"context"} | {f"c{i}f{j}" for i in range(len(header["chunks"])) for j in range(d)}
    if set(blobs) != want:
        missing, extra = sorted(want - set(blobs))[:3], sorted(set(blobs) - want)[:3]
        raise ScoringRequestError(f"{what}: blobs must be the context and {len(want) - 1} ciphertexts, missing {missing}, unexpected {extra}")
    return ParsedRequest(header=header, blobs=blobs, sha256=_sha(data))


def scoring_rows_before(ledger: PartyLedger, *, querier: str, model_id: str) -> int:
    """Budget rows of ``model_id`` charged to ``querier`` (2 per answered row), recomputed from the holder's ledger."""
    total = 0
    for ln in ledger.lines():
        e = ln.entry
        if e.get("party") == ledger.party and e.get("kind") == "scoring":
            b = e["body"]
            if b.get("querier") == querier and b.get("model") == model_id and b.get("outcome") == "answered":
                total += SCORING_CHARGE_PER_ROW * int(b["rows"])
    return total


def scoring_answered(ledger: PartyLedger, request_id: str) -> bool:
    """Whether the holder's ledger already records an answer to ``request_id`` (any querier, any model)."""
    return any(ln.entry.get("party") == ledger.party and ln.entry.get("kind") == "scoring" and ln.entry.get("run_id") == request_id
               and (ln.entry.get("body") or {}).get("outcome") == "answered" for ln in ledger.lines())


@dataclass(frozen=True)
class Answer:
    """What :func:`answer_request` produced."""

    response: bytes
    querier: str
    rows: int
    rows_before: int
    budget: int
    request_id: str
    querier_key: str
    charged: int = 0


def answer_request(data: bytes, *, model: LinearModel, policy: NodePolicy, ledger: PartyLedger, roster: Roster,
                   generator: np.random.Generator, expected_features: Sequence[str] | None = None, progress: Progress = None) -> Answer:
    """Score a request at the model holder: check, authenticate, budget, compute, record, then release.

    Order (checks come before anything is recorded or released):

    1. the request parses (container, blob hashes, header fields); a malformed one is refused
       with :class:`ScoringRequestError` and nothing is recorded;
    2. the querier is authenticated against ``roster``, the holder's own out-of-band copy: the
       querier must be listed and the request signed by its key over :func:`request_digest`
       (else a ``scoring`` refusal, code 136, and :class:`ScoringAuthError`);
    3. a request id the ledger already records as answered is a replay (a ``scoring``
       refusal, code 137, and :class:`ScoringReplayError`): never answered or charged twice;
    4. the target model (if the request names one), the feature count and names, and the
       public context with its fixed parameters are checked (:class:`ScoringRequestError`);
    5. the querier's rows so far plus this request's stay within its budget (else a ``scoring``
       refusal, code 134, and :class:`ScoringBudgetExhausted`);
    6. every ciphertext is checked and scored; the ``scoring`` entry is appended; only then is
       the response returned.
    """
    req = parse_request(data)
    h = req.header
    what = "request"
    querier, n, request_id = req.querier, req.n_rows, req.request_id
    budget = policy.scoring.budget(querier)
    before = scoring_rows_before(ledger, querier=querier, model_id=model.model_id)
    roster_entry = roster.parties.get(querier)
    body = {"querier": querier, "querier_key": key_fingerprint(roster_entry.signing_key) if roster_entry else None, "model": model.model_id,
            "request": req.sha256, "rows": n, "rows_before": before, "charged": SCORING_CHARGE_PER_ROW * n, "budget": budget,
            "params": SCORING_PARAMS.to_dict(),
            "flood_std": policy.scoring.flood_std}

    def refuse(exc: Exception, code: NodeErrorCode, reason: str) -> Exception:
        ledger.append(kind="scoring", run_id=request_id, round=0, body={**body, "outcome": "refused", "code": int(code), "reason": reason})
        return exc

    try:
        body["querier_key"] = authenticate_request(h, roster)
    except ScoringAuthError as exc:
        reason = "unknown_querier" if roster_entry is None else "bad_signature"
        raise refuse(exc, NodeErrorCode.SCORING_UNAUTHENTICATED, reason) from None
    if scoring_answered(ledger, request_id):
        raise refuse(ScoringReplayError(f"{what}: request id {request_id} from {querier!r} was already answered (see the holder's ledger); "
                                        "a replay is refused and not charged; send a new request"),
                     NodeErrorCode.SCORING_REPLAYED, "replay")
    if h.get("model") is not None and h["model"] != model.model_id:
        raise ScoringRequestError(f"{what}: `model` must be {model.model_id} (the model scored here), got {h['model']}")
    if h["n_features"] != model.n_features:
        raise ScoringRequestError(f"{what}: `n_features` must be {model.n_features} (the model's), got {h['n_features']}")
    if expected_features is not None and h["feature_names"] is not None and list(h["feature_names"]) != list(expected_features):
        raise ScoringRequestError(f"{what}: `feature_names` must be {list(expected_features)}, got {h['feature_names']}")
    try:
        ctx = PublicScoringContext.from_bytes(req.blobs["context"], SCORING_PARAMS, field="context")
    except CryptoError as exc:
        raise ScoringRequestError(f"{what}: {exc}") from None
    # Each row is charged twice: a complex slot answers two linear equations (real and imaginary part).
    if before + SCORING_CHARGE_PER_ROW * n > budget:
        raise refuse(ScoringBudgetExhausted(
            f"querier {querier!r} asked for {n} rows (charged {SCORING_CHARGE_PER_ROW * n}: {SCORING_CHARGE_PER_ROW} per row); {before} of "
            f"its {budget} budget rows for model {model.model_id[:12]} are spent (policy scoring.max_rows_per_querier); nothing was scored",
            querier=querier, rows=n, rows_before=before, budget=budget), NodeErrorCode.SCORING_BUDGET_EXHAUSTED, "budget")
    results = []
    for i, rows in enumerate(h["chunks"]):
        try:
            cols = [ctx.load_column(req.blobs[f"c{i}f{j}"], rows=rows, field=f"c{i}f{j}") for j in range(model.n_features)]
        except CryptoError as exc:
            raise ScoringRequestError(f"{what}: {exc}") from None
        results.append((f"r{i}", ctx.score_linear(cols, weights=model.weights, bias=model.bias, rows=rows,
                                                  flood_std=float(policy.scoring.flood_std), generator=generator)))
        if progress:
            progress(1)
    ledger.append(kind="scoring", run_id=request_id, round=0, body={**body, "outcome": "answered", "code": None})
    header = {"format": "fedcollab.score_response", "version": SCORING_VERSION, "request_id": request_id, "request_sha256": req.sha256,
              "holder": ledger.party, "model": model.model_id, "n_rows": n, "chunks": h["chunks"], "output": "logit",
              "flood_std": policy.scoring.flood_std}
    return Answer(response=pack_container(RESPONSE_MAGIC, header, results), querier=querier, rows=n, rows_before=before, budget=budget,
                  request_id=request_id, querier_key=str(body["querier_key"]), charged=SCORING_CHARGE_PER_ROW * n)
