"""The node's side of server-blind aggregation under HE (aggregation = "he").

Key custody (stages carried by ``query`` messages, ``fedcollab.kind = "he"``):

1. ``advert``: every partner but the key holder makes an X25519 key pair (kept in its folder,
   mode 0600) and signs the public half with its roster Ed25519 key;
2. ``keygen``: the designated key holder (the spec's ``he.key_holder``, checked against this
   node's own spec) verifies each advert against its own roster copy, generates the BFV secret
   key, seals one key package per partner and signs it; the coordinator gets the context
   *without* the secret key, signed;
3. ``install``: each partner verifies the package against the key holder's roster key, opens it,
   checks the fingerprint and records a signed ``key_custody`` ledger entry.

Rounds: the train and evaluate messages carry the previous aggregate (signed by the coordinator
with the hashes of the uploads in it) and the included uploads with their partners' own
signatures; the node checks every signature against its roster, that at least the spec's
minimum of distinct partners (never fewer than 2) and its own upload (where it uploaded) are
in it, adds the uploads itself, decrypts, trains, pre-weights, encrypts and signs its upload. The model writer
decrypts the last aggregate and writes the model into its folder (``he/RUN-model.npz``).

Everything secret (the HE key, the X25519 key, the statistics awaiting encryption) lives in the
node's folder with mode 0600, never in a message or in Flower's context.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcollab.core import CryptoError, PolicyRefused, ProtocolError, UpdateError, get_logger, write_private
from fedcollab.crypto import (
    HE_PARAMETER_SETS,
    SecretContext,
    aggregate_message,
    key_advert_message,
    load_secret_context,
    new_secret_context,
    open_key_package,
    public_context_message,
    seal_key_package,
    sign,
    upload_hash,
    verify,
)
from fedcollab.protocols.quantize import flatten_arrays, unflatten_arrays
from fedcollab.protocols.he import (
    decode_statistics_limbs,
    decode_weighted,
    encode_statistics_limbs,
    encode_weighted,
    flatten_per_party,
    unflatten_per_party,
)
from fedcollab.spec import Spec

log = get_logger("node.he")


# --- the node's folder ---------------------------------------------------------------------------

def he_dir(home: Path) -> Path:
    """Folder of a node's HE material (created mode 0700)."""
    d = Path(home) / "he"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def params_of(spec: Spec) -> Any:
    """The HE parameter set the spec names."""
    return HE_PARAMETER_SETS[spec.he.parameters]


def _partners(spec: Spec) -> list[str]:
    return [p.name for p in spec.partners]


def secret_context(spec: Spec, home: Path, run_id: str) -> SecretContext:
    """This node's HE secret context for ``run_id`` (from its folder)."""
    path = he_dir(home) / f"{run_id}.ctx"
    if not path.exists():
        raise ProtocolError("no HE key installed for this run")
    return load_secret_context(path.read_bytes(), params=params_of(spec))


def _uploads(home: Path, run_id: str) -> tuple[Path, dict[str, str]]:
    """This node's record of its upload hashes for ``run_id`` (round -> hash), and where it is kept."""
    path = he_dir(home) / f"{run_id}-uploads.json"
    return path, (json.loads(path.read_text()) if path.exists() else {})


def record_upload(home: Path, run_id: str, round_: int, upload_hash_hex: str) -> None:
    """Keep the hash of this node's upload of ``round_`` in its folder (its latest, if the round ran again after a resume).

    The folder, not Flower's context, so that a resumed run (a new Flower run) still refuses an
    aggregate of an earlier round that leaves this node's upload out (issue 13, attack 6).
    """
    path, done = _uploads(home, run_id)
    done[str(int(round_))] = str(upload_hash_hex)
    write_private(path, json.dumps(done, sort_keys=True).encode())


def forget_uploads_after(home: Path, run_id: str, round_: int) -> None:
    """A resumed run's key reload: the uploads of rounds after the checkpoint's were the interrupted part's; they run again.

    Without this, a node that does not upload a re-run round would still expect its old upload in that round's aggregate.
    """
    path, done = _uploads(home, run_id)
    if path.exists():
        write_private(path, json.dumps({k: v for k, v in done.items() if int(k) <= int(round_)}, sort_keys=True).encode())


def my_upload(home: Path, run_id: str, round_: int) -> str | None:
    """The hash of this node's upload of ``round_`` (None: it sent none that round)."""
    got = _uploads(home, run_id)[1].get(str(int(round_)))
    return str(got) if got is not None else None


def publish_context(ctx: SecretContext, *, run_id: str, signing_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The context without its secret key, signed by the key holder: what the coordinator may hold."""
    public = ctx.public()
    return {"public_context": public.data, "fingerprint": ctx.fingerprint, "params": ctx.params.name,
            "signature": sign(signing_key, public_context_message(run_id=run_id, public_data=public.data, fingerprint=ctx.fingerprint))}


# --- key custody -----------------------------------------------------------------------------------

def make_advert(*, run_id: str, me: str, signing_key: Ed25519PrivateKey, home: Path) -> dict[str, Any]:
    """A fresh X25519 key (kept in the folder) and its public half, signed with the roster key."""
    priv = X25519PrivateKey.generate()
    raw = priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    write_private(he_dir(home) / f"{run_id}.x25519", raw)
    pub = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"partner": me, "x25519": pub, "signature": sign(signing_key, key_advert_message(run_id=run_id, partner=me, x25519_public=pub))}


def generate_key(spec: Spec, *, run_id: str, me: str, signing_key: Ed25519PrivateKey, home: Path,
                 adverts: dict[str, dict[str, Any]], roster: dict[str, str]) -> tuple[SecretContext, dict[str, Any], dict[str, dict[str, Any]]]:
    """At the key holder: (secret context, signed public context, {partner: key package}).

    Every other partner of the spec must have sent an advert that verifies against this node's
    own roster copy; otherwise nothing is generated.
    """
    partners = _partners(spec)
    if spec.he.resolved_key_holder(partners) != me:
        raise PolicyRefused("this partner is not the spec's HE key holder")
    others = sorted(p for p in partners if p != me)
    if sorted(adverts) != others:
        raise ProtocolError("key adverts must come from every other partner of the spec")
    for p in others:
        ad = adverts[p]
        x = ad.get("x25519")
        if not isinstance(x, (bytes, bytearray)) or len(x) != 32:
            raise CryptoError(f"`advert.x25519` of {p} must be 32 bytes")
        verify(roster[p], key_advert_message(run_id=run_id, partner=p, x25519_public=bytes(x)), ad.get("signature"), what=f"key advert of {p}")
    ctx = new_secret_context(params_of(spec))
    write_private(he_dir(home) / f"{run_id}.ctx", ctx.secret_bytes())
    packages = {p: seal_key_package(ctx, run_id=run_id, sender=me, recipient=p, recipient_x25519=bytes(adverts[p]["x25519"]),
                                    signing_key=signing_key) for p in others}
    return ctx, publish_context(ctx, run_id=run_id, signing_key=signing_key), packages


def install_key(spec: Spec, *, run_id: str, me: str, home: Path, package: dict[str, Any], roster: dict[str, str]) -> SecretContext:
    """Open the key holder's package (verified against this node's roster copy) and keep the key."""
    holder = spec.he.resolved_key_holder(_partners(spec))
    x_path = he_dir(home) / f"{run_id}.x25519"
    if not x_path.exists():
        raise ProtocolError("no X25519 key advertised for this run")
    ctx = open_key_package(package, run_id=run_id, me=me, my_x25519=x_path.read_bytes(), sender=holder,
                           sender_public_hex=roster[holder], params=params_of(spec))
    write_private(he_dir(home) / f"{run_id}.ctx", ctx.secret_bytes())
    x_path.unlink()
    return ctx


def custody_body(spec: Spec, ctx: SecretContext, *, me: str, event: str) -> dict[str, Any]:
    """Body of the ``key_custody`` ledger entry a partner signs about the HE key."""
    partners = _partners(spec)
    return {"key": "he-secret", "event": event, "fingerprint": ctx.fingerprint, "parameters": ctx.params.to_dict(),
            "generated_by": spec.he.resolved_key_holder(partners), "held_by": partners,
            "can_decrypt": partners, "coordinator_holds": "parameters only (no secret key, no public key)", "party": me}


# --- statistics --------------------------------------------------------------------------------------

def keep_statistics(home: Path, run_id: str, stats: dict[str, list[float]]) -> None:
    """The setup statistics wait in the folder until the HE key is installed."""
    write_private(he_dir(home) / f"{run_id}-stats.json", json.dumps(stats).encode())


def encrypt_statistics(spec: Spec, ctx: SecretContext, *, home: Path, run_id: str, me: str, signing_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The kept statistics as an encrypted, signed upload (round 0); the plaintext file is removed."""
    path = he_dir(home) / f"{run_id}-stats.json"
    if not path.exists():
        raise ProtocolError("no statistics kept for this run")
    vec = encode_statistics_limbs(json.loads(path.read_text()))
    path.unlink()
    return make_upload(ctx, vec, run_id=run_id, round_=0, me=me, signing_key=signing_key)


def open_statistics(spec: Spec, ctx: SecretContext, aggregate: dict[str, Any], *, run_id: str, coordinator_key: str, n_features: int,
                    my_hash: str | None, min_partners: int, roster: dict[str, str]) -> dict[str, list[float]]:
    """The summed statistics (checked and decrypted)."""
    total = open_aggregate(ctx, aggregate, run_id=run_id, round_=0, coordinator_key=coordinator_key,
                           length=(1 + 2 * n_features) * 5, my_hash=my_hash, min_partners=min_partners, roster=roster)
    return decode_statistics_limbs(total, n_features=n_features)


# --- rounds -------------------------------------------------------------------------------------------

def make_upload(ctx: SecretContext, vector: np.ndarray, *, run_id: str, round_: int, me: str, signing_key: Ed25519PrivateKey) -> dict[str, Any]:
    """Encrypt ``vector`` and sign the upload: ``{"ct", "round", "hash", "signature"}``."""
    cts = ctx.encrypt(vector)
    h = upload_hash(run_id=run_id, round_=round_, partner=me, ciphertexts=cts)
    return {"ct": cts, "round": round_, "hash": h, "signature": sign(signing_key, bytes.fromhex(h))}


def encrypt_model(spec: Spec, ctx: SecretContext, arrays: dict[str, np.ndarray], *, weight: float, run_id: str, round_: int, me: str,
                  signing_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The pre-weighted, fixed-point model as one flat vector filling every slot, encrypted and signed."""
    flat = flatten_arrays(arrays)
    vec = encode_weighted(flat, weight=weight, clip=spec.he.clip, scale=spec.he.scale, max_abs=ctx.params.max_abs)
    return make_upload(ctx, vec, run_id=run_id, round_=round_, me=me, signing_key=signing_key)


def required_partners(spec: Spec, policy_min: int = 2) -> int:
    """Distinct partners an aggregate must hold before this node decrypts it.

    The spec's ``training.min_partners`` (all partners when unset), the policy's
    ``min_partners_per_round``, and never fewer than 2: one partner's upload is never decrypted
    on its own.
    """
    return max(2, spec.training.min_partners or len(spec.partners), policy_min)


def open_aggregate(ctx: SecretContext, aggregate: dict[str, Any], *, run_id: str, round_: int, coordinator_key: str, length: int,
                   my_hash: str | None, min_partners: int, roster: dict[str, str]) -> np.ndarray:
    """Check the aggregate and every upload in it, add the uploads here, then decrypt the sum.

    Checks, in order: the coordinator's signature over (aggregate, included upload hashes); every
    included upload travels with the aggregate and carries its own partner's signature, checked
    against this node's ``roster`` (its own copy, never keys from the message), over a hash
    bound to this run and round; at least ``min_partners`` (and never fewer than 2) distinct
    partners, each once; this node's own upload, where it uploaded this round. The node then
    adds the uploads itself and decrypts that sum, so a coordinator cannot pass one partner's
    ciphertext off as the aggregate (issue 13, attack 6).

    Raises
    ------
    CryptoError
        A missing or wrong signature (the coordinator's or an upload's), or ciphertexts that do not load.
    ProtocolError
        An included upload missing from the message, or listed twice.
    UpdateError
        A malformed aggregate, another round, or this node's own upload left out (``BAD_MODEL_UPDATE``).
    PolicyRefused
        Fewer distinct partners than required.
    """
    try:
        cts = [bytes(c) for c in aggregate["ct"]]
        included = [str(x) for x in aggregate["included"]]
        rnd = int(aggregate["round"])
        signature = aggregate["signature"]
    except (KeyError, TypeError, ValueError):
        raise UpdateError("an HE aggregate must hold ct, included, round and signature") from None
    if rnd != round_:
        raise UpdateError(f"an HE aggregate of round {rnd}, expected {round_}")
    verify(coordinator_key, aggregate_message(run_id=run_id, round_=rnd, ciphertexts=cts, included=included), signature,
           what="HE aggregate")
    pairs = [x.partition(":")[::2] for x in included]
    names = [p for p, _ in pairs]
    if len(set(names)) != len(names):
        raise ProtocolError("an HE aggregate lists a partner's upload more than once")
    need = max(2, min_partners)
    if len(names) < need:
        raise PolicyRefused(f"{len(names)} distinct partner(s) in the aggregate, at least {need} required")
    if my_hash is not None and my_hash not in {h for _, h in pairs}:
        raise UpdateError("this node's upload is missing from the aggregate")
    uploads = unflatten_per_party({k[len("upload/"):]: v for k, v in aggregate.items() if str(k).startswith("upload/")})
    parts = []
    for partner, h in pairs:
        up = uploads.get(partner)
        key = roster.get(partner)
        if up is None or key is None:
            raise ProtocolError(f"the upload of {partner!r} does not travel with the aggregate, or {partner!r} is not in the roster")
        blobs = up.get("ct")
        if not isinstance(blobs, list) or len(blobs) != len(cts) or not all(isinstance(b, (bytes, bytearray)) for b in blobs):
            raise CryptoError(f"`upload/{partner}/ct` must be {len(cts)} ciphertexts (bytes)")
        blobs = [bytes(b) for b in blobs]
        if upload_hash(run_id=run_id, round_=rnd, partner=partner, ciphertexts=blobs) != h:
            raise CryptoError(f"`upload/{partner}/ct` is not the upload the aggregate lists")
        verify(key, bytes.fromhex(h), up.get("signature"), what=f"upload of {partner} in the aggregate")
        parts.append(blobs)
    return ctx.decrypt(ctx.public().add(parts), length=length)


def decode_model(total: np.ndarray, template: dict[str, np.ndarray], *, scale: float) -> OrderedDict[str, np.ndarray]:
    """The weighted mean model, shaped like ``template``."""
    mean, weight = decode_weighted(total, scale=scale)
    if not 0 < weight <= 1.0 + 1e-3:
        raise UpdateError("the aggregate's total weight is outside (0, 1]")
    if mean.size != sum(np.size(v) for v in template.values()):
        raise UpdateError("the aggregate does not have the model's size")
    return unflatten_arrays(mean, template)


def fedadam_step(current: dict[str, np.ndarray], aggregated: dict[str, np.ndarray], m: dict[str, np.ndarray] | None,
                 v: dict[str, np.ndarray] | None, *, server_round: int, eta: float, beta_1: float, beta_2: float,
                 tau: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One FedAdam step as Flower 1.42's ``FedAdam.aggregate_train`` computes it: ``(new model, m, v)``.

    Notes
    -----
    Under HE the coordinator holds no plaintext model, so every partner runs the server optimiser
    itself after decryption, from the same inputs, and reaches the same model. Reddi et al. 2021
    (Adaptive Federated Optimization), Algorithm 2, with Flower's bias-corrected step
    ``eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`` (Kingma & Ba 2014, Sec. 2).
    """
    delta = {k: aggregated[k] - current[k] for k in current}
    m = {k: beta_1 * (m[k] if m else np.zeros_like(d)) + (1 - beta_1) * d for k, d in delta.items()}
    v = {k: beta_2 * (v[k] if v else np.zeros_like(d)) + (1 - beta_2) * d**2 for k, d in delta.items()}
    eta_norm = eta * np.sqrt(1 - np.power(beta_2, server_round + 1.0)) / (1 - np.power(beta_1, server_round + 1.0))
    new = {k: x + eta_norm * m[k] / (np.sqrt(v[k]) + tau) for k, x in current.items()}
    return new, m, v


def server_step(spec: Spec, home: Path, run_id: str, template: dict[str, np.ndarray], aggregated: OrderedDict[str, np.ndarray],
                round_: int) -> OrderedDict[str, np.ndarray]:
    """The global model of ``round_``: the decrypted FedAvg aggregate, or FedAdam's step from it (run at the node).

    FedAdam's state (model, m, v of the last round) is kept in the node's folder; a round is
    stepped once, however many messages carry its aggregate.
    """
    if spec.training.strategy != "fedadam":
        return aggregated
    path = he_dir(home) / f"{run_id}-fedadam.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            done = int(z["__round__"])
            current = {k: z[f"theta/{k}"] for k in template}
            m: dict[str, np.ndarray] | None = {k: z[f"m/{k}"] for k in template}
            v: dict[str, np.ndarray] | None = {k: z[f"v/{k}"] for k in template}
    else:
        done, current, m, v = 0, {k: np.asarray(x) for k, x in template.items()}, None, None
    if done == round_:
        return OrderedDict((k, current[k]) for k in template)
    if done != round_ - 1:
        raise ProtocolError(f"FedAdam state is at round {done}; the aggregate of round {round_} cannot be applied")
    t = spec.training
    new, m, v = fedadam_step(current, dict(aggregated), m, v, server_round=round_, eta=t.server_learning_rate, beta_1=t.server_beta_1,
                             beta_2=t.server_beta_2, tau=t.server_tau)
    new = {k: np.asarray(new[k], dtype=template[k].dtype) for k in template}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, __round__=np.asarray(round_), **{f"theta/{k}": new[k] for k in template}, **{f"m/{k}": m[k] for k in template},
                 **{f"v/{k}": v[k] for k in template})
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return OrderedDict((k, new[k]) for k in template)


def model_path(home: Path, run_id: str) -> Path:
    """Where the model writer keeps the final model of ``run_id``."""
    return he_dir(home) / f"{run_id}-model.npz"


def write_model(home: Path, run_id: str, arrays: OrderedDict[str, np.ndarray]) -> Path:
    """The model writer's final model (npz, names in order; mode 0600)."""
    path = model_path(home, run_id)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, __order__=np.asarray(list(arrays)), **arrays)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def write_model_scaling(home: Path, run_id: str, st: Any) -> None:
    """The scaling the final model expects, beside it (under HE only the partners know it; the model file records it)."""
    import json

    if "he.scale_mean" in st:
        body = {"method": str(st["he.scale_method"]), "mean": list(st["he.scale_mean"]), "std": list(st["he.scale_std"])}
        write_private(model_path(home, run_id).with_name(f"{run_id}-scaling.json"), json.dumps(body).encode())


def read_model_scaling(home: Path, run_id: str) -> dict[str, Any] | None:
    """The scaling the model writer recorded with the final model, if it ran the statistics round."""
    import json

    path = model_path(home, run_id).with_name(f"{run_id}-scaling.json")
    return json.loads(path.read_text()) if path.exists() else None


def read_model(home: Path, run_id: str) -> OrderedDict[str, np.ndarray]:
    """The final model the model writer wrote (no pickle)."""
    with np.load(model_path(home, run_id), allow_pickle=False) as z:
        order = [str(x) for x in z["__order__"]]
        return OrderedDict((k, z[k]) for k in order)


# --- Flower glue (called from the ClientApp's handlers) ------------------------------------------------

class HeHandlers:
    """The ClientApp's HE work: ``query`` (key custody, statistics, final model), ``train`` and ``evaluate``.

    Each takes ``(node, cfg, st, msg)`` as the ClientApp's handlers do and returns a ``RecordDict``.
    """

    def __init__(self, spec: Spec, homes: dict[str, str], roster: dict[str, str]) -> None:
        self.spec = spec
        self.homes = homes
        self.roster = {k: v for k, v in roster.items()}
        self.coordinator_key = roster["coordinator"]
        # Uploads in an aggregate must be the spec's partners', checked against this node's roster copy.
        self.partner_roster = {p: roster[p] for p in _partners(spec) if p in roster}
        self._template: dict[int, OrderedDict[str, np.ndarray]] = {}

    # helpers
    def _records(self) -> Any:
        from flwr.app import ConfigRecord, MetricRecord, RecordDict

        return ConfigRecord, MetricRecord, RecordDict

    def _lines(self, lines: list[str]) -> Any:
        from flwr.app import ConfigRecord

        from fedcollab.protocols.wire import RecordKey

        return {RecordKey.RELEASES: ConfigRecord({"lines": json.dumps(lines)})}

    def template(self, n_features: int) -> OrderedDict[str, np.ndarray]:
        """The initial model (the same seed as the coordinator's), also the shape of every aggregate."""
        if n_features not in self._template:
            from fedcollab.models import build_model, model_arrays

            self._template[n_features] = OrderedDict(model_arrays(build_model(self.spec.model, n_features, seed=self.spec.seed)))
        return self._template[n_features]

    def _home(self, node: Any) -> Path:
        return Path(self.homes[node.partner])

    def _aggregate(self, msg: Any) -> dict[str, Any]:
        rec = msg.content.config_records.get("he.aggregate")
        if rec is None:
            raise ProtocolError("no HE aggregate in the message")
        return dict(rec)

    def _global_model(self, node: Any, ctx: SecretContext, msg: Any, st: Any, round_: int) -> OrderedDict[str, np.ndarray]:
        tpl = self.template(len(node.data.feature_names))
        if round_ == 0:
            return OrderedDict((k, v.copy()) for k, v in tpl.items())
        length = int(sum(v.size for v in tpl.values())) + 1
        total = open_aggregate(ctx, self._aggregate(msg), run_id=node.run_id, round_=round_, coordinator_key=self.coordinator_key,
                               length=length, my_hash=my_upload(self._home(node), node.run_id, round_),
                               min_partners=required_partners(self.spec, node.policy.min_partners_per_round), roster=self.partner_roster)
        return server_step(self.spec, self._home(node), node.run_id, tpl, decode_model(total, tpl, scale=self.spec.he.scale), round_)

    def _scaling(self, st: Any, cfg: Any, scaling_of: Any) -> Any:
        from fedcollab.protocols.statistics import Scaling

        if str(cfg.get("he.scaling", "")) == "node":
            if "he.scale_mean" not in st:
                raise ProtocolError("the statistics round under HE has not run")
            return Scaling(mean=np.asarray(st["he.scale_mean"], dtype=np.float64), std=np.asarray(st["he.scale_std"], dtype=np.float64),
                           method=str(st["he.scale_method"]))
        return scaling_of(cfg)

    # handlers
    def query(self, node: Any, cfg: Any, st: Any, msg: Any) -> Any:
        """Key custody stages, the statistics round and the final model."""
        ConfigRecord, _, RecordDict = self._records()
        stage = str(cfg.get("he.stage", ""))
        spec, me, home, run_id = self.spec, node.partner, self._home(node), node.run_id
        key = node.gate.ledger.key
        if stage == "advert":
            ad = make_advert(run_id=run_id, me=me, signing_key=key, home=home)
            return RecordDict({"he": ConfigRecord({"x25519": ad["x25519"], "signature": ad["signature"]})})
        if stage == "keygen":
            adverts = unflatten_per_party(dict(msg.content.config_records.get("he.adverts", ConfigRecord())))
            ctx, published, packages = generate_key(spec, run_id=run_id, me=me, signing_key=key, home=home, adverts=adverts, roster=self.roster)
            line = node.gate.ledger.append(kind="key_custody", run_id=run_id, round=0,
                                           body=custody_body(spec, ctx, me=me, event="generated; sealed and signed a key package for each other partner")).decode()
            return RecordDict({"he": ConfigRecord(published), "he.packages": ConfigRecord(flatten_per_party(packages)), **self._lines([line])})
        if stage == "install":
            package = dict(msg.content.config_records.get("he.package", ConfigRecord()))
            ctx = install_key(spec, run_id=run_id, me=me, home=home, package=package, roster=self.roster)
            line = node.gate.ledger.append(kind="key_custody", run_id=run_id, round=0,
                                           body=custody_body(spec, ctx, me=me, event="received from the key holder; signature and fingerprint verified")).decode()
            return RecordDict({"he": ConfigRecord({"fingerprint": ctx.fingerprint}), **self._lines([line])})
        if stage == "rejoin":
            # A resumed run: the key this node installed for the run, from its own folder; nothing new is generated or opened.
            if int(st.get("he.resume_after", 0)) < 1 or "he.rejoined" in st:
                raise ProtocolError("a key reload only opens a resumed run, once")
            ctx = secret_context(spec, home, run_id)
            st["he.rejoined"] = True
            forget_uploads_after(home, run_id, int(st["he.resume_after"]))
            line = node.gate.ledger.append(kind="key_custody", run_id=run_id, round=0, body=custody_body(
                spec, ctx, me=me, event=f"reloaded from this partner's folder: the run resumes after round {int(st['he.resume_after'])}")).decode()
            he_rec = publish_context(ctx, run_id=run_id, signing_key=key) if spec.he.resolved_key_holder(_partners(spec)) == me else {
                "fingerprint": ctx.fingerprint}
            return RecordDict({"he": ConfigRecord(he_rec), **self._lines([line])})
        if stage == "stats":
            up = encrypt_statistics(spec, secret_context(spec, home, run_id), home=home, run_id=run_id, me=me, signing_key=key)
            record_upload(home, run_id, 0, up["hash"])
            return RecordDict({"he.upload": ConfigRecord({"ct": up["ct"], "round": 0, "signature": up["signature"]})})
        if stage == "stats_result":
            from fedcollab.protocols.statistics import combine_statistics

            d = len(node.data.feature_names)
            total = open_statistics(spec, secret_context(spec, home, run_id), self._aggregate(msg), run_id=run_id,
                                    coordinator_key=self.coordinator_key, n_features=d, my_hash=my_upload(home, run_id, 0),
                                    min_partners=required_partners(spec, node.policy.min_partners_per_round), roster=self.partner_roster)
            if spec.resolved_scaling == "dp_statistics":
                bounds = np.asarray(spec.data_schema.encoded_bounds(), dtype=np.float64).reshape(-1, 2)
                scaling = combine_statistics([total], bounds=bounds)
            else:
                scaling = combine_statistics([total])
            st["he.scale_mean"] = scaling.mean.tolist()
            st["he.scale_std"] = scaling.std.tolist()
            st["he.scale_method"] = scaling.method
            return RecordDict({"he": ConfigRecord({"ok": True})})
        if stage == "final":
            if spec.he.resolved_model_writer(_partners(spec)) != me:
                raise PolicyRefused("this partner is not the spec's model writer")
            rnd = int(cfg.get("server-round", 0))
            arrays = self._global_model(node, secret_context(spec, home, run_id), msg, st, rnd)
            path = write_model(home, run_id, arrays)
            write_model_scaling(home, run_id, st)
            import hashlib

            return RecordDict({"he": ConfigRecord({"model_sha256": hashlib.sha256(path.read_bytes()).hexdigest()})})
        raise ProtocolError(f"unknown HE stage {stage!r}")

    def train(self, node: Any, cfg: Any, st: Any, msg: Any, scaling_of: Any) -> Any:
        """Decrypt the previous aggregate (round 1: the seeded initial model), train, encrypt the pre-weighted model."""
        ConfigRecord, MetricRecord, RecordDict = self._records()
        from fedcollab.protocols.wire import RecordKey

        rnd = int(cfg.get("server-round", 0))
        total_rows = float(cfg.get("he.total_rows", 0.0))
        if rnd < 1 or not 0 < node.data.n_train <= total_rows:
            raise ProtocolError("HE round or weighting parameters out of range")
        ctx = secret_context(self.spec, self._home(node), node.run_id)
        global_arrays = self._global_model(node, ctx, msg, st, rnd - 1)
        arrays, metrics, lines, steps = node.train(dict(global_arrays), scaling=self._scaling(st, cfg, scaling_of), server_round=rnd,
                                                   steps_so_far=int(st["steps"]), proximal_mu=float(cfg.get("proximal-mu", 0.0)))
        st["steps"] = int(st["steps"]) + steps
        up = encrypt_model(self.spec, ctx, OrderedDict((k, arrays[k]) for k in global_arrays), weight=node.data.n_train / total_rows,
                           run_id=node.run_id, round_=rnd, me=node.partner, signing_key=node.gate.ledger.key)
        record_upload(self._home(node), node.run_id, rnd, up["hash"])
        return RecordDict({"he.upload": ConfigRecord({"ct": up["ct"], "round": rnd, "signature": up["signature"]}),
                           RecordKey.METRICS: MetricRecord(metrics), **self._lines(lines)})

    def evaluate(self, node: Any, cfg: Any, st: Any, msg: Any, scaling_of: Any) -> Any:
        """Decrypt the round's aggregate and evaluate it on the test split."""
        _, MetricRecord, RecordDict = self._records()
        from fedcollab.protocols.wire import RecordKey

        rnd = int(cfg.get("server-round", 0))
        ctx = secret_context(self.spec, self._home(node), node.run_id)
        arrays = self._global_model(node, ctx, msg, st, rnd)
        res, lines = node.evaluate(dict(arrays), scaling=self._scaling(st, cfg, scaling_of), server_round=rnd)
        metrics = MetricRecord({"num-examples": res["n"], "n": res["n"], "correct": res["correct"], "loss_sum": res["loss_sum"],
                                "hist_pos": res["hist_pos"], "hist_neg": res["hist_neg"]})
        return RecordDict({RecordKey.METRICS: metrics, **self._lines(lines)})
