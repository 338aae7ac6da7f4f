"""The coordinator's side of server-blind aggregation under HE (aggregation = "he").

The coordinator relays key adverts and sealed key packages it cannot open, holds a BFV context
*without* the secret key (``load_public_context`` refuses one that carries it), checks each
upload's Ed25519 signature against the roster, adds ciphertexts, and signs the aggregate with
the list of upload hashes in it. It never holds a plaintext update, aggregate, statistic or
model: checkpoints are encrypted aggregates, and the model writer (a partner) writes the model.

What it therefore cannot do: run a server optimiser (FedAdam runs at every partner after
decryption instead), clip or noise centrally, check an update's norm, or evaluate the model
itself. See ``docs/he.md``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import ConfigError, CryptoError, NodeError, NodeErrorCode, ProtocolError, get_logger
from fedcollab.crypto import (
    HE_PARAMETER_SETS,
    PublicContext,
    aggregate_message,
    load_public_context,
    public_context_message,
    sign,
    upload_hash,
    verify,
)
from fedcollab.coordinator._rounds import Trained, metric_parts
from fedcollab.protocols.statistics import Scaling, scaling_from_bounds
from fedcollab.protocols.he import flatten_per_party, unflatten_per_party
from fedcollab.spec import Spec

log = get_logger("coordinator.he")
#: Statistics under HE are (1 + 2 d) values of 5 limbs (``fedcollab.protocols.he``).
_STATS_LIMBS = 5
#: Flower's gRPC message limit (deployment); a round's message must stay below it.
GRPC_MAX_MESSAGE_BYTES = 536_870_912


def accept_public_context(spec: Spec, published: dict[str, Any], *, run_id: str, holder_key: str) -> tuple[PublicContext, str]:
    """Check the key holder's signature and that the context carries no key: ``(context, fingerprint)``."""
    try:
        data, fp, signature = published["public_context"], str(published["fingerprint"]), published["signature"]
    except (KeyError, TypeError):
        raise ProtocolError("the key holder's reply must hold public_context, fingerprint and signature") from None
    if not isinstance(data, (bytes, bytearray)):
        raise CryptoError(f"`public_context` must be bytes (got {type(data).__name__}).")
    verify(holder_key, public_context_message(run_id=run_id, public_data=bytes(data), fingerprint=fp), signature, what="public context")
    ctx = load_public_context(bytes(data), params=HE_PARAMETER_SETS[spec.he.parameters])
    return ctx, fp


def verify_upload(rec: dict[str, Any] | None, *, run_id: str, round_: int, partner: str, roster_key: str) -> tuple[str, list[bytes], bytes]:
    """An upload's hash, ciphertexts and signature, after checking its round and its signature against the roster.

    Raises
    ------
    ProtocolError
        No upload, or one for another round.
    CryptoError
        An unsigned or mis-signed upload, or ciphertexts that are not bytes.
    """
    if rec is None:
        raise ProtocolError(f"{partner}: no HE upload in the reply")
    try:
        cts, rnd, signature = rec["ct"], int(rec["round"]), rec.get("signature")
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"{partner}: an HE upload must hold ct, round and signature") from None
    if rnd != round_:
        raise ProtocolError(f"{partner}: an HE upload for round {rnd}, expected {round_}")
    if not isinstance(cts, list) or not all(isinstance(c, (bytes, bytearray)) for c in cts):
        raise CryptoError(f"`{partner}.ct` must be a list of bytes.")
    cts = [bytes(c) for c in cts]
    h = upload_hash(run_id=run_id, round_=round_, partner=partner, ciphertexts=cts)
    verify(roster_key, bytes.fromhex(h), signature, what=f"upload of {partner}")
    return h, cts, bytes(signature)


def aggregate_uploads(ctx: PublicContext, uploads: dict[str, tuple[str, list[bytes], bytes]], *, run_id: str, round_: int, n_ciphertexts: int,
                      signing_key: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Add the verified uploads and sign ``(aggregate, included upload hashes)``: ``(aggregate wire, {party: why left out})``.

    The included uploads travel with the aggregate, each with its partner's own signature
    (``upload/PARTNER/ct``, ``upload/PARTNER/signature``): a node checks them against its roster
    and adds them itself, so it decrypts only a sum of enough distinct partners' uploads of
    this round, never one partner's upload passed off as the aggregate (issue 13, attack 6).
    """
    total, rejected = ctx.sum_uploads({p: u[1] for p, u in uploads.items()}, n_ciphertexts=n_ciphertexts)
    kept = {p: u for p, u in uploads.items() if p not in rejected}
    included = sorted(f"{p}:{u[0]}" for p, u in kept.items())
    wire: dict[str, Any] = {"ct": total, "round": round_, "included": included}
    wire["signature"] = sign(signing_key, aggregate_message(run_id=run_id, round_=round_, ciphertexts=total, included=included))
    wire.update(flatten_per_party({f"upload/{p}": {"ct": list(u[1]), "signature": u[2]} for p, u in kept.items()}))
    return wire, rejected


#: The encrypted checkpoint's file name in the run's ``checkpoints/`` folder.
HE_CHECKPOINT = "checkpoint.he.json"


def write_encrypted_checkpoint(directory: Path, aggregate: dict[str, Any], *, fingerprint: str) -> None:
    """The round's encrypted aggregate (JSON, ciphertexts in base64): a restart needs a partner to decrypt it.

    It holds the whole aggregate as the nodes receive it (the coordinator's signature, the
    included upload hashes and every included upload with its partner's signature), so a resumed
    run sends the nodes exactly what they would have checked and decrypted (``read_encrypted_checkpoint``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    uploads = unflatten_per_party({k[len("upload/"):]: v for k, v in aggregate.items() if str(k).startswith("upload/")})
    doc = {"round": aggregate["round"], "fingerprint": fingerprint, "included": aggregate["included"],
           "signature": bytes(aggregate["signature"]).hex(), "ct": [base64.b64encode(c).decode() for c in aggregate["ct"]],
           "uploads": {p: {"ct": [base64.b64encode(bytes(c)).decode() for c in u["ct"]], "signature": bytes(u["signature"]).hex()}
                       for p, u in sorted(uploads.items())}}
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh)
    os.replace(tmp, directory / HE_CHECKPOINT)


def read_encrypted_checkpoint(path: Path) -> tuple[int, dict[str, Any], str]:
    """``(round, aggregate wire, key fingerprint)`` of an encrypted checkpoint, as the next round's message carries it.

    Only the form is checked here (a malformed file is a :class:`ConfigError` naming the field);
    the signatures are the nodes' to check, against their own roster copies, before they decrypt.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: expected an encrypted checkpoint (JSON), got none ({type(exc).__name__})") from None

    def field(name: str, kind: type, got: Any) -> Any:
        if not isinstance(got, kind) or isinstance(got, bool):
            raise ConfigError(f"{path}: `{name}` must be {kind.__name__}, got {type(got).__name__}")
        return got

    try:
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(doc).__name__}")
        rnd = field("round", int, doc.get("round"))
        if rnd < 1:
            raise ConfigError(f"{path}: `round` must be >= 1, got {rnd}")
        wire: dict[str, Any] = {
            "round": rnd,
            "included": [field("included[]", str, x) for x in field("included", list, doc.get("included"))],
            "signature": bytes.fromhex(field("signature", str, doc.get("signature"))),
            "ct": [base64.b64decode(field("ct[]", str, c), validate=True) for c in field("ct", list, doc.get("ct"))],
        }
        uploads = field("uploads", dict, doc.get("uploads"))
        for p, u in uploads.items():
            u = field(f"uploads.{p}", dict, u)
            wire[f"upload/{p}/ct"] = [base64.b64decode(field(f"uploads.{p}.ct[]", str, c), validate=True)
                                      for c in field(f"uploads.{p}.ct", list, u.get("ct"))]
            wire[f"upload/{p}/signature"] = bytes.fromhex(field(f"uploads.{p}.signature", str, u.get("signature")))
        fingerprint = field("fingerprint", str, doc.get("fingerprint"))
    except (ValueError, binascii.Error) as exc:
        raise ConfigError(f"{path}: expected hex signatures and base64 ciphertexts ({type(exc).__name__})") from None
    listed = sorted(x.partition(":")[0] for x in wire["included"])
    if listed != sorted(uploads):
        raise ConfigError(f"{path}: `uploads` must hold exactly the included partners' uploads {listed}, got {sorted(uploads)}")
    return rnd, wire, fingerprint


class HeSession:
    """One run's HE state at the coordinator: key custody, the encrypted statistics, and the rounds as the round loop's strategy.

    ``link`` is the run's :class:`~fedcollab.coordinator._exchange.Link`. After key custody
    (:meth:`distribute_keys`, or :meth:`resume_from` in a resumed run) and :meth:`start_rounds`,
    :func:`~fedcollab.coordinator._rounds.run_rounds` drives :meth:`train`, :meth:`checkpoint`,
    :meth:`evaluate` and :meth:`finish`.
    """

    def __init__(self, spec: Spec, *, link: Any, message_type: Any) -> None:
        self.spec = spec
        self.link = link
        self.ledger = link.ledger
        self.recorder = link.recorder
        self.mt = message_type
        self.run_id = self.ledger.run_id
        self.partners = sorted(link.node_names.values())
        names = [p.name for p in spec.partners]
        self.holder = spec.he.resolved_key_holder(names)
        self.writer = spec.he.resolved_model_writer(names)
        self.node_scaling = False
        self.ctx: PublicContext | None = None
        self.fingerprint = ""
        #: A resumed run's checkpointed aggregate (``resume_from``): the next round's train message carries it.
        self.resumed_aggregate: dict[str, Any] | None = None

    def _roster(self, party: str) -> str:
        return self.ledger.roster.parties[party].signing_key

    def _base(self, stage: str) -> dict[str, Any]:
        return {"fedcollab.kind": "he", "fedcollab.run_id": self.run_id, "he.stage": stage}

    def _send(self, rnd: int, mt: Any, per: dict[str, tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]]) -> dict[str, Any]:
        return self.link.exchange(rnd, mt, per)

    def _require(self, got: dict[str, Any], want: list[str], what: str) -> None:
        missing = sorted(set(want) - set(got))
        if missing:
            codes = {p: self.recorder.failures.get(p, [int(NodeErrorCode.INTERNAL)])[-1] for p in missing}
            raise NodeError(f"HE {what}: no valid reply from {missing}", codes=codes)

    # --- key custody -------------------------------------------------------------------------
    def distribute_keys(self) -> None:
        """Adverts -> key generation at the key holder -> sealed packages installed at every other partner."""
        if self.holder not in self.partners:
            raise ProtocolError(f"the HE key holder {self.holder!r} did not join the run")
        others = [p for p in self.partners if p != self.holder]
        got = self._send(0, self.mt.QUERY, {p: (None, self._base("advert"), {}) for p in others})
        self._require(got, others, "key adverts")
        adverts = {p: {k: m.content.config_records["he"][k] for k in ("x25519", "signature")} for p, m in got.items()}
        got = self._send(0, self.mt.QUERY, {self.holder: (None, self._base("keygen"), {"he.adverts": flatten_per_party(adverts)})})
        self._require(got, [self.holder], "key generation")
        reply = got[self.holder].content.config_records
        self.ctx, self.fingerprint = accept_public_context(self.spec, dict(reply["he"]), run_id=self.run_id, holder_key=self._roster(self.holder))
        packages = unflatten_per_party(dict(reply["he.packages"]))
        self.ledger.own.append(kind="key_custody", run_id=self.run_id, round=0, body={
            "key": "he-public-context", "event": "received from the key holder, signature verified", "fingerprint": self.fingerprint,
            "public_digest": self.ctx.digest, "generated_by": self.holder, "party": "coordinator",
            "holds": "parameters only: no secret key (checked), no public key", "can_decrypt": False})
        got = self._send(0, self.mt.QUERY, {p: (None, self._base("install"), {"he.package": packages.get(p, {})}) for p in others})
        self._require(got, others, "key installation")
        for p, m in got.items():
            if str(m.content.config_records["he"]["fingerprint"]) != self.fingerprint:
                raise ProtocolError(f"{p} confirmed another HE key fingerprint")
        log.info("HE key %s… generated by %s, installed at %s", self.fingerprint[:12], self.holder, others)

    def resume_from(self, checkpoint_dir: Path | None, last_round: int) -> None:
        """A resumed run: every partner reloads the run's key from its own folder, the key holder re-publishes the public context.

        No key is generated or sent again: the encrypted aggregate of ``last_round`` (the
        checkpoint) is decryptable only under the key the partners already hold, and every
        partner must confirm that key's fingerprint (each records a signed ``key_custody``
        entry). The next round's train message then carries the checkpointed aggregate.
        """
        if checkpoint_dir is None:
            raise ProtocolError("resuming under HE needs the run's checkpoint folder")
        rnd, self.resumed_aggregate, fingerprint = read_encrypted_checkpoint(checkpoint_dir / HE_CHECKPOINT)
        if rnd != last_round:
            raise ProtocolError(f"the encrypted checkpoint is of round {rnd}, the run resumes after round {last_round}")
        if self.holder not in self.partners:
            raise ProtocolError(f"the HE key holder {self.holder!r} did not join the run")
        got = self._send(0, self.mt.QUERY, {p: (None, self._base("rejoin"), {}) for p in self.partners})
        self._require(got, self.partners, "key reload")
        for p, m in got.items():
            if str(m.content.config_records["he"]["fingerprint"]) != fingerprint:
                raise ProtocolError(f"{p} holds another HE key than the checkpoint's ({fingerprint[:12]}...)")
        self.ctx, self.fingerprint = accept_public_context(self.spec, dict(got[self.holder].content.config_records["he"]),
                                                           run_id=self.run_id, holder_key=self._roster(self.holder))
        if self.fingerprint != fingerprint:
            raise ProtocolError(f"the key holder re-published another HE key than the checkpoint's ({fingerprint[:12]}...)")
        self.ledger.own.append(kind="key_custody", run_id=self.run_id, round=0, body={
            "key": "he-public-context", "event": f"resumed after round {rnd}: re-published by the key holder, signature verified",
            "fingerprint": self.fingerprint, "public_digest": self.ctx.digest, "generated_by": self.holder, "party": "coordinator",
            "holds": "parameters only: no secret key (checked), no public key", "can_decrypt": False})
        log.info("HE run resumed after round %d: key %s… reloaded at %s", rnd, self.fingerprint[:12], self.partners)

    # --- statistics ------------------------------------------------------------------------------
    def scaling(self, scaling_name: str, bounds: np.ndarray, n_features: int) -> Scaling:
        """The scaling to send: statistics modes run encrypted and leave the scaling at the partners."""
        if scaling_name == "public_bounds":
            return scaling_from_bounds(bounds)
        if scaling_name not in {"federated_statistics", "dp_statistics"}:
            return Scaling(mean=np.zeros(n_features), std=np.ones(n_features), method="none")
        assert self.ctx is not None
        got = self._send(0, self.mt.QUERY, {p: (None, self._base("stats"), {}) for p in self.partners})
        uploads = {}
        for p, m in got.items():
            uploads[p] = verify_upload(m.content.config_records.get("he.upload"), run_id=self.run_id, round_=0, partner=p,
                                       roster_key=self._roster(p))
        self._require(uploads, self.partners, "statistics")
        n_ct = -(-((1 + 2 * n_features) * _STATS_LIMBS) // self.ctx.params.slots)
        agg, rejected = aggregate_uploads(self.ctx, uploads, run_id=self.run_id, round_=0, n_ciphertexts=n_ct, signing_key=self.ledger.own.key)
        if rejected:
            raise ProtocolError(f"malformed encrypted statistics from {sorted(rejected)}")
        got = self._send(0, self.mt.QUERY, {p: (None, self._base("stats_result"), {"he.aggregate": agg}) for p in self.partners})
        self._require(got, self.partners, "statistics result")
        self.node_scaling = True
        # The coordinator never sees the statistics: the scaling lives at the partners.
        return Scaling(mean=np.zeros(0), std=np.zeros(0), method=scaling_name)

    # --- rounds (the round loop's strategy: fedcollab.coordinator._rounds) ------------------------------
    def start_rounds(self, arrays: Any, scaling: Scaling, *, scaling_config: Callable[[int], Any], min_partners: int) -> HeSession:
        """Ready the rounds: the model's size (from the seeded initial ``arrays``), the scaling to send, the minimum of partners."""
        assert self.ctx is not None
        self.n_params = int(sum(arrays[k].numpy().size for k in arrays.keys()))
        self.n_ct = -(-(self.n_params + 1) // self.ctx.params.slots)
        self.total_rows = float(sum(self.recorder.partners.values()))
        self.scaling_config, self.min_partners = scaling_config, min_partners
        self.agg: dict[str, Any] | None = self.resumed_aggregate
        return self

    def _cfg(self, rnd: int) -> dict[str, Any]:
        cfg = dict(self.scaling_config(rnd))
        if self.node_scaling:
            cfg["he.scaling"] = "node"
        return cfg

    def train(self, rnd: int, evaluate_previous: int | None) -> Any:
        """Pre-weighted encrypted uploads -> verified -> added -> signed: the round's aggregate, which only the partners can open."""
        assert self.ctx is not None
        rec = self.recorder
        cfg = self._cfg(rnd)
        cfg["he.total_rows"] = self.total_rows
        if self.spec.training.strategy == "fedprox":
            cfg["proximal-mu"] = self.spec.training.proximal_mu
        extra = {"he.aggregate": self.agg} if self.agg is not None else {}
        got = self._send(rnd, self.mt.TRAIN, {p: (None, cfg, extra) for p in self.partners})
        failed = {p: c[-1] for p, c in rec.failures.items() if p not in got and p in self.partners}
        uploads: dict[str, tuple[str, list[bytes], bytes]] = {}
        for p, m in got.items():
            try:
                uploads[p] = verify_upload(m.content.config_records.get("he.upload"), run_id=self.run_id, round_=rnd, partner=p,
                                           roster_key=self._roster(p))
            except (CryptoError, ProtocolError) as exc:
                self._reject(p, rnd, failed, exc)
        new, rejected = aggregate_uploads(self.ctx, uploads, run_id=self.run_id, round_=rnd, n_ciphertexts=self.n_ct,
                                          signing_key=self.ledger.own.key)
        for p, why in rejected.items():
            self._reject(p, rnd, failed, CryptoError(why))
        included = [x.split(":", 1)[0] for x in new["included"]]
        if len(included) < self.min_partners:
            raise NodeError(f"round {rnd}: {len(included)} valid encrypted upload(s), at least {self.min_partners} needed", codes=failed)
        self.agg = new
        return Trained(sorted(included), failed, None)

    def checkpoint(self, directory: Path, rnd: int) -> None:
        assert self.agg is not None
        write_encrypted_checkpoint(directory, self.agg, fingerprint=self.fingerprint)

    def evaluate(self, rnd: int, evaluating: bool, failed: dict[str, int]) -> dict[str, dict[str, Any]]:
        """Every partner decrypts the round's aggregate (after its own checks) and evaluates it on its test split."""
        if not evaluating:
            return {}
        egot = self._send(rnd, self.mt.EVALUATE, {p: (None, self._cfg(rnd), {"he.aggregate": self.agg}) for p in self.partners})
        parts = {p: metric_parts(m.content.metric_records["metrics"]) for p, m in egot.items()}
        rec = self.recorder
        failed.update({p: rec.failures[p][-1] for p in self.partners if p not in egot and p not in failed and p in rec.failures})
        return parts

    def finish(self, last_round: int) -> None:
        """The final model: decrypted and written by the model writer (a partner), never by the coordinator."""
        assert self.agg is not None
        cfg = {**self._base("final"), "server-round": last_round}
        got = self._send(last_round, self.mt.QUERY, {self.writer: (None, cfg, {"he.aggregate": self.agg})})
        self._require(got, [self.writer], "final model")
        self.model_sha256 = str(got[self.writer].content.config_records["he"]["model_sha256"])
        self.ledger.own.append(kind="key_custody", run_id=self.run_id, round=last_round, body={
            "key": "he-secret", "event": "final model decrypted and written by the model writer", "party": "coordinator",
            "model_writer": self.writer, "model_sha256": self.model_sha256, "fingerprint": self.fingerprint})

    def _reject(self, p: str, rnd: int, failed: dict[str, int], exc: Exception) -> None:
        code = int(NodeErrorCode.BAD_MODEL_UPDATE)
        failed[p] = code
        self.recorder.failures.setdefault(p, []).append(code)
        log.warning("round %d: the encrypted upload of %s is left out (%s)", rnd, p, exc)
