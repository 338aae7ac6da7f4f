"""Server-blind HE as plain functions in-process: key custody among real node folders, signed uploads and
aggregates, encrypted statistics, and 20 rounds on Heart with the real local trainer beside plain FedAvg."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.coordinator._he import accept_public_context, aggregate_uploads, verify_upload
from fedcollab.core import CryptoError, PolicyRefused, ProtocolError
from fedcollab.crypto import upload_hash
from fedcollab.node import init_node_home
from fedcollab.node._he import (
    decode_model,
    encrypt_model,
    generate_key,
    install_key,
    make_advert,
    make_upload,
    open_aggregate,
    open_statistics,
    secret_context,
)
from fedcollab.privacy.accounting import public_key_hex
from fedcollab.protocols.he import encode_statistics_limbs, encode_weighted, quantisation_bound

RUN = "run-he-test"


@pytest.fixture(scope="module")
def spec():
    from fedcollab.spec import load_spec
    from tests.conftest import ROOT

    return load_spec(ROOT / "specs" / "heart-disease-he.toml")


@pytest.fixture(scope="module")
def federation(spec, tmp_path_factory):
    """Four real node folders, the key distributed as in a run; the coordinator's public context."""
    root = tmp_path_factory.mktemp("he-nodes")
    names = [p.name for p in spec.partners]
    homes = {n: init_node_home(root / n, partner=n) for n in names}
    keys = {n: h.key() for n, h in homes.items()}
    roster = {n: public_key_hex(k) for n, k in keys.items()}
    holder = spec.he.resolved_key_holder(names)
    adverts = {n: make_advert(run_id=RUN, me=n, signing_key=keys[n], home=homes[n].root) for n in names if n != holder}
    ctx, published, packages = generate_key(spec, run_id=RUN, me=holder, signing_key=keys[holder], home=homes[holder].root,
                                            adverts=adverts, roster=roster)
    contexts = {holder: ctx}
    for n, pkg in packages.items():
        contexts[n] = install_key(spec, run_id=RUN, me=n, home=homes[n].root, package=pkg, roster=roster)
    coordinator_key = Ed25519PrivateKey.generate()
    pub, fp = accept_public_context(spec, published, run_id=RUN, holder_key=roster[holder])
    return {"homes": homes, "keys": keys, "roster": roster, "holder": holder, "contexts": contexts, "published": published,
            "pub": pub, "fp": fp, "coordinator": coordinator_key, "adverts": adverts}


class TestKeyCustody:
    def test_every_partner_holds_the_same_key(self, federation):
        """All four partners end with the holder's key (same fingerprint); files are mode 0600 and the X25519 keys are gone."""
        fps = {n: c.fingerprint for n, c in federation["contexts"].items()}
        assert set(fps.values()) == {federation["fp"]} and len(fps) == 4
        for n, h in federation["homes"].items():
            f = h.root / "he" / f"{RUN}.ctx"
            assert f.stat().st_mode & 0o077 == 0
            assert not (h.root / "he" / f"{RUN}.x25519").exists()

    def test_coordinator_context_holds_no_secret_key(self, federation):
        """The coordinator's context has no secret key: it adds ciphertexts but cannot decrypt or encrypt."""
        pub = federation["pub"]
        assert not pub.has_secret_key()
        ctx = federation["contexts"][federation["holder"]]
        total = pub.add([ctx.encrypt(np.arange(4)), ctx.encrypt(np.arange(4))])
        np.testing.assert_array_equal(federation["contexts"]["hungary"].decrypt(total, length=4), 2 * np.arange(4))

    def test_holder_handing_the_secret_key_to_the_coordinator_is_refused(self, spec, federation):
        """Even correctly signed, a context that carries the secret key is refused by the coordinator."""
        from fedcollab.crypto import public_context_message, sign

        holder = federation["holder"]
        secret = federation["contexts"][holder].secret_bytes()
        bad = {"public_context": secret, "fingerprint": federation["fp"],
               "signature": sign(federation["keys"][holder], public_context_message(run_id=RUN, public_data=secret, fingerprint=federation["fp"]))}
        with pytest.raises(CryptoError, match="carries a secret key"):
            accept_public_context(spec, bad, run_id=RUN, holder_key=federation["roster"][holder])

    def test_public_context_signed_by_another_key_is_refused(self, spec, federation):
        bad = dict(federation["published"], signature=Ed25519PrivateKey.generate().sign(b"x"))
        with pytest.raises(CryptoError, match="public context"):
            accept_public_context(spec, bad, run_id=RUN, holder_key=federation["roster"][federation["holder"]])

    def test_only_the_designated_holder_generates(self, spec, federation, tmp_path):
        with pytest.raises(PolicyRefused):
            generate_key(spec, run_id=RUN, me="hungary", signing_key=federation["keys"]["hungary"], home=tmp_path,
                         adverts={}, roster=federation["roster"])

    def test_advert_signed_by_a_substituted_key_is_refused(self, spec, federation, tmp_path):
        """A coordinator that swaps a partner's X25519 key (signing it itself) is caught by the holder's roster copy."""
        adverts = dict(federation["adverts"])
        adverts["hungary"] = make_advert(run_id=RUN, me="hungary", signing_key=Ed25519PrivateKey.generate(), home=tmp_path)
        with pytest.raises(CryptoError, match="key advert of hungary"):
            generate_key(spec, run_id=RUN, me=federation["holder"], signing_key=federation["keys"][federation["holder"]], home=tmp_path,
                         adverts=adverts, roster=federation["roster"])

    def test_missing_advert_is_refused(self, spec, federation, tmp_path):
        adverts = {k: v for k, v in federation["adverts"].items() if k != "hungary"}
        with pytest.raises(ProtocolError, match="every other partner"):
            generate_key(spec, run_id=RUN, me=federation["holder"], signing_key=federation["keys"][federation["holder"]], home=tmp_path,
                         adverts=adverts, roster=federation["roster"])

    def test_package_for_another_partner_is_refused(self, spec, federation, tmp_path):
        """A package relayed to the wrong partner does not open (recipient bound by signature and AAD)."""
        holder = federation["holder"]
        ad = make_advert(run_id=RUN, me="hungary", signing_key=federation["keys"]["hungary"], home=tmp_path)
        adverts = dict(federation["adverts"], hungary=ad)
        _, _, packages = generate_key(spec, run_id=RUN, me=holder, signing_key=federation["keys"][holder], home=tmp_path / "h",
                                      adverts=adverts, roster=federation["roster"])
        with pytest.raises(CryptoError):
            install_key(spec, run_id=RUN, me="hungary", home=tmp_path, package=packages["switzerland"], roster=federation["roster"])


def _upload(spec, federation, partner, vector, rnd):
    return make_upload(federation["contexts"][partner], vector, run_id=RUN, round_=rnd, me=partner, signing_key=federation["keys"][partner])


def _wire(up):
    return {"ct": up["ct"], "round": up["round"], "signature": up["signature"]}


class TestSignedUploadsAndAggregates:
    def test_unsigned_mis_signed_or_replayed_uploads_refused(self, spec, federation):
        up = _wire(_upload(spec, federation, "hungary", np.arange(5), 3))
        roster = federation["roster"]
        verify_upload(up, run_id=RUN, round_=3, partner="hungary", roster_key=roster["hungary"])
        with pytest.raises(CryptoError, match="upload of hungary"):
            verify_upload(dict(up, signature=b""), run_id=RUN, round_=3, partner="hungary", roster_key=roster["hungary"])
        with pytest.raises(CryptoError, match="upload of switzerland"):  # claimed by another partner
            verify_upload(up, run_id=RUN, round_=3, partner="switzerland", roster_key=roster["switzerland"])
        with pytest.raises(ProtocolError, match="round 3, expected 4"):
            verify_upload(up, run_id=RUN, round_=4, partner="hungary", roster_key=roster["hungary"])
        with pytest.raises(CryptoError):  # a ciphertext swapped after signing
            verify_upload(dict(up, ct=_upload(spec, federation, "hungary", np.arange(5), 3)["ct"]), run_id=RUN, round_=3, partner="hungary",
                          roster_key=roster["hungary"])

    def test_node_checks_the_aggregate(self, spec, federation):
        """Nodes accept only an aggregate signed by the coordinator that lists their own upload and enough others."""
        ups = {p: _upload(spec, federation, p, np.arange(5), 1) for p in ("cleveland", "hungary", "va-long-beach")}
        verified = {p: verify_upload(_wire(u), run_id=RUN, round_=1, partner=p, roster_key=federation["roster"][p]) for p, u in ups.items()}
        agg, rejected = aggregate_uploads(federation["pub"], verified, run_id=RUN, round_=1, n_ciphertexts=1, signing_key=federation["coordinator"])
        assert rejected == {}
        ckey = public_key_hex(federation["coordinator"])
        ctx = federation["contexts"]["hungary"]
        got = open_aggregate(ctx, agg, run_id=RUN, round_=1, coordinator_key=ckey, length=5, my_hash=ups["hungary"]["hash"], min_partners=3, roster=federation["roster"])
        np.testing.assert_array_equal(got, 3 * np.arange(5))
        with pytest.raises(ProtocolError, match="missing from the aggregate"):
            open_aggregate(ctx, agg, run_id=RUN, round_=1, coordinator_key=ckey, length=5, my_hash="ab" * 32, min_partners=3, roster=federation["roster"])
        with pytest.raises(PolicyRefused):
            open_aggregate(ctx, agg, run_id=RUN, round_=1, coordinator_key=ckey, length=5, my_hash=None, min_partners=4, roster=federation["roster"])
        with pytest.raises(CryptoError, match="HE aggregate"):
            open_aggregate(ctx, dict(agg, included=agg["included"][:2]), run_id=RUN, round_=1, coordinator_key=ckey, length=5, my_hash=None,
                           min_partners=2, roster=federation["roster"])
        with pytest.raises(CryptoError, match="HE aggregate"):  # an aggregate with a partner's ciphertext doubled
            open_aggregate(ctx, dict(agg, ct=federation["pub"].add([agg["ct"], ups["hungary"]["ct"]])), run_id=RUN, round_=1,
                           coordinator_key=ckey, length=5, my_hash=None, min_partners=2, roster=federation["roster"])
        with pytest.raises(ProtocolError, match="round 1, expected 2"):
            open_aggregate(ctx, agg, run_id=RUN, round_=2, coordinator_key=ckey, length=5, my_hash=None, min_partners=2, roster=federation["roster"])

    def test_encrypted_checkpoint_round_trips_to_what_the_nodes_check(self, spec, federation, tmp_path):
        """A resumed run sends the checkpointed aggregate as it was: it reads back equal, the nodes decrypt it, and a tampered
        upload in the file is caught by the nodes' own roster check (the coordinator only checks the file's form)."""
        import json

        from fedcollab.coordinator._he import HE_CHECKPOINT, read_encrypted_checkpoint, write_encrypted_checkpoint

        ups = {p: _upload(spec, federation, p, np.arange(5), 1) for p in ("cleveland", "hungary", "va-long-beach")}
        verified = {p: verify_upload(_wire(u), run_id=RUN, round_=1, partner=p, roster_key=federation["roster"][p]) for p, u in ups.items()}
        agg, _ = aggregate_uploads(federation["pub"], verified, run_id=RUN, round_=1, n_ciphertexts=1, signing_key=federation["coordinator"])
        write_encrypted_checkpoint(tmp_path, agg, fingerprint=federation["fp"])
        rnd, wire, fp = read_encrypted_checkpoint(tmp_path / HE_CHECKPOINT)
        assert (rnd, fp) == (1, federation["fp"]) and wire.keys() == agg.keys()
        assert all(wire[k] == (list(agg[k]) if isinstance(agg[k], list) else agg[k]) for k in agg)
        ckey = public_key_hex(federation["coordinator"])
        kw = dict(run_id=RUN, round_=1, coordinator_key=ckey, length=5, my_hash=ups["hungary"]["hash"], min_partners=3, roster=federation["roster"])
        np.testing.assert_array_equal(open_aggregate(federation["contexts"]["hungary"], wire, **kw), 3 * np.arange(5))
        doc = json.loads((tmp_path / HE_CHECKPOINT).read_text())
        doc["uploads"]["cleveland"]["ct"] = doc["uploads"]["hungary"]["ct"]  # a swapped upload: the file's form is still right
        (tmp_path / HE_CHECKPOINT).write_text(json.dumps(doc))
        _, forged, _ = read_encrypted_checkpoint(tmp_path / HE_CHECKPOINT)
        with pytest.raises(CryptoError, match="cleveland"):
            open_aggregate(federation["contexts"]["hungary"], forged, **kw)

    def test_single_partner_upload_as_the_aggregate_is_refused(self, spec, federation):
        """Attack 6: the coordinator signs one partner's upload as "the aggregate" for a node that did not upload.

        With the inclusion check skipped (no own upload), hungary would decrypt cleveland's model.
        Now: one partner is fewer than the minimum (never below 2), whatever the policy says.
        """
        from fedcollab.node._he import required_partners

        up = _upload(spec, federation, "cleveland", np.arange(5), 1)
        verified = {"cleveland": verify_upload(_wire(up), run_id=RUN, round_=1, partner="cleveland", roster_key=federation["roster"]["cleveland"])}
        agg, _ = aggregate_uploads(federation["pub"], verified, run_id=RUN, round_=1, n_ciphertexts=1, signing_key=federation["coordinator"])
        ckey = public_key_hex(federation["coordinator"])
        ctx = federation["contexts"]["hungary"]
        for min_partners in (0, 1, required_partners(spec, 1)):
            with pytest.raises(PolicyRefused, match="distinct partner"):
                open_aggregate(ctx, agg, run_id=RUN, round_=1, coordinator_key=ckey, length=5, my_hash=None, min_partners=min_partners,
                               roster=federation["roster"])
        assert required_partners(spec, 1) == len(spec.partners)  # Heart HE spec: no min_partners, so all four

    def test_aggregate_claiming_uploads_it_does_not_hold_is_refused(self, spec, federation):
        """One partner's ciphertext sent as the aggregate while listing two signed uploads: the node adds the uploads itself."""
        ups = {p: _upload(spec, federation, p, np.arange(5) * (i + 1), 1) for i, p in enumerate(("cleveland", "switzerland"))}
        verified = {p: verify_upload(_wire(u), run_id=RUN, round_=1, partner=p, roster_key=federation["roster"][p]) for p, u in ups.items()}
        ckey = public_key_hex(federation["coordinator"])
        ctx = federation["contexts"]["hungary"]
        # (a) The coordinator lists both uploads but signs cleveland's ciphertext as the sum and ships the real uploads:
        # the node decrypts its own sum of the two, never cleveland's model alone.
        included = sorted(f"{p}:{u[0]}" for p, u in verified.items())
        from fedcollab.crypto import aggregate_message, sign
        from fedcollab.protocols.he import flatten_per_party

        forged = {"ct": ups["cleveland"]["ct"], "round": 1, "included": included,
                  "signature": sign(federation["coordinator"], aggregate_message(run_id=RUN, round_=1, ciphertexts=ups["cleveland"]["ct"],
                                                                                 included=included)),
                  **flatten_per_party({f"upload/{p}": {"ct": u[1], "signature": u[2]} for p, u in verified.items()})}
        got = open_aggregate(ctx, forged, run_id=RUN, round_=1, coordinator_key=ckey, length=5, my_hash=None, min_partners=2,
                             roster=federation["roster"])
        np.testing.assert_array_equal(got, 3 * np.arange(5))
        # (b) switzerland's upload replaced by a second copy of cleveland's (re-labelled): its signature does not verify.
        bad = dict(forged, **{"upload/switzerland/ct": ups["cleveland"]["ct"]})
        with pytest.raises(CryptoError, match="switzerland"):
            open_aggregate(ctx, bad, run_id=RUN, round_=1, coordinator_key=ckey, length=5, my_hash=None, min_partners=2, roster=federation["roster"])
        # (c) an upload signed by the coordinator's key in a partner's name: checked against the node's roster, refused.
        fake_sig = sign(federation["coordinator"], bytes.fromhex(verified["switzerland"][0]))
        with pytest.raises(CryptoError, match="switzerland"):
            open_aggregate(ctx, dict(forged, **{"upload/switzerland/signature": fake_sig}), run_id=RUN, round_=1, coordinator_key=ckey,
                           length=5, my_hash=None, min_partners=2, roster=federation["roster"])
        # (d) an included upload that does not travel with the aggregate.
        stripped = {k: v for k, v in forged.items() if not str(k).startswith("upload/switzerland/")}
        with pytest.raises(ProtocolError, match="does not travel"):
            open_aggregate(ctx, stripped, run_id=RUN, round_=1, coordinator_key=ckey, length=5, my_hash=None, min_partners=2,
                           roster=federation["roster"])
        # (e) a previous round's upload replayed into this round: the hash binds the round.
        old = _upload(spec, federation, "switzerland", np.arange(5), 0)
        replay = dict(forged, **{"upload/switzerland/ct": old["ct"], "upload/switzerland/signature": old["signature"]})
        with pytest.raises(CryptoError, match="switzerland"):
            open_aggregate(ctx, replay, run_id=RUN, round_=1, coordinator_key=ckey, length=5, my_hash=None, min_partners=2, roster=federation["roster"])

    def test_malformed_upload_left_out_of_the_signed_list(self, spec, federation):
        """A signed upload whose ciphertext does not load is left out by name; the others are summed and listed."""
        ups = {p: _upload(spec, federation, p, np.arange(5), 2) for p in ("cleveland", "hungary")}
        verified = {p: verify_upload(_wire(u), run_id=RUN, round_=2, partner=p, roster_key=federation["roster"][p]) for p, u in ups.items()}
        bad = _upload(spec, federation, "switzerland", np.arange(5), 2)
        bad["ct"] = [bad["ct"][0][:500]]
        bad["signature"] = federation["keys"]["switzerland"].sign(bytes.fromhex(upload_hash(run_id=RUN, round_=2, partner="switzerland", ciphertexts=bad["ct"])))
        verified["switzerland"] = verify_upload(_wire(bad), run_id=RUN, round_=2, partner="switzerland", roster_key=federation["roster"]["switzerland"])
        agg, rejected = aggregate_uploads(federation["pub"], verified, run_id=RUN, round_=2, n_ciphertexts=1, signing_key=federation["coordinator"])
        assert set(rejected) == {"switzerland"} and [x.split(":")[0] for x in agg["included"]] == ["cleveland", "hungary"]
        np.testing.assert_array_equal(federation["contexts"]["hungary"].decrypt(agg["ct"], length=5), 2 * np.arange(5))

    def test_statistics_under_he_equal_the_plain_sums(self, spec, federation):
        """Encrypted statistics (limbs) decrypt to the same per-feature sums as adding them in the clear."""
        rng = np.random.default_rng(3)
        parts = {p: {"count": [float(rng.integers(50, 300))], "sum": rng.normal(0, 5e3, 13).tolist(),
                     "sumsq": rng.uniform(0, 1e8, 13).tolist()} for p in federation["contexts"]}
        verified = {p: verify_upload(_wire(_upload(spec, federation, p, encode_statistics_limbs(s), 0)), run_id=RUN, round_=0, partner=p,
                                     roster_key=federation["roster"][p]) for p, s in parts.items()}
        agg, _ = aggregate_uploads(federation["pub"], verified, run_id=RUN, round_=0, n_ciphertexts=1, signing_key=federation["coordinator"])
        total = open_statistics(spec, federation["contexts"]["switzerland"], agg, run_id=RUN, coordinator_key=public_key_hex(federation["coordinator"]),
                                n_features=13, my_hash=None, min_partners=2, roster=federation["roster"])
        for k in ("count", "sum", "sumsq"):
            np.testing.assert_allclose(total[k], np.sum([s[k] for s in parts.values()], axis=0), atol=4 * 2.0**-12)


@pytest.fixture(scope="module")
def heart_rounds(spec, federation):
    """20 rounds on Heart with the real local trainer: plain FedAvg and HE aggregation side by side (in-process)."""
    from fedcollab.data import exact_statistics, load_partner_data
    from fedcollab.models import build_model, model_arrays, set_model_arrays
    from fedcollab.node._training import evaluate_model, train_model
    from fedcollab.protocols.evaluation import pooled_metrics
    from fedcollab.protocols.statistics import combine_statistics

    names = [p.name for p in spec.partners]
    data = {n: load_partner_data(spec, n) for n in names}
    scaling = combine_statistics([exact_statistics(d.x_train) for d in data.values()])
    d_features = len(data[names[0]].feature_names)
    template = OrderedDict(model_arrays(build_model(spec.model, d_features, seed=spec.seed)))
    n_params = sum(v.size for v in template.values())
    total_rows = float(sum(d.n_train for d in data.values()))
    ckey = public_key_hex(federation["coordinator"])

    def local(global_arrays, n, rnd):
        model = build_model(spec.model, d_features, seed=spec.seed)
        set_model_arrays(model, dict(global_arrays))
        train_model(model, scaling.apply(data[n].x_train), data[n].y_train, training=spec.training, plan=None, shuffle_seed=spec.seed * 1000 + rnd)
        out = model_arrays(model)
        return OrderedDict((k, out[k]) for k in template)

    def flat(a):
        return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in a.values()])

    def shaped(vec):
        out, off = OrderedDict(), 0
        for k, v in template.items():
            out[k] = vec[off:off + v.size].reshape(v.shape).astype(v.dtype)
            off += v.size
        return out

    def evaluate(arrays):
        parts = []
        for n in names:
            model = build_model(spec.model, d_features, seed=spec.seed)
            set_model_arrays(model, dict(arrays))
            parts.append(evaluate_model(model, scaling.apply(data[n].x_test), data[n].y_test))
        return pooled_metrics(parts)

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids contention on a shared machine (restored below)
    try:
        return _rounds(spec, federation, names, data, template, n_params, total_rows, ckey, local, flat, shaped, evaluate)
    finally:
        torch.set_num_threads(threads)


def _rounds(spec, federation, names, data, template, n_params, total_rows, ckey, local, flat, shaped, evaluate):
    plain, he = OrderedDict(template), OrderedDict(template)
    checks = []
    for rnd in range(1, spec.training.rounds + 1):
        lp = {n: local(plain, n, rnd) for n in names}
        mean = sum(data[n].n_train * flat(lp[n]) for n in names) / total_rows
        plain = shaped(mean)
        lh = {n: local(he, n, rnd) for n in names}
        ups = {n: encrypt_model(spec, federation["contexts"][n], lh[n], weight=data[n].n_train / total_rows, run_id=RUN, round_=rnd, me=n,
                                signing_key=federation["keys"][n]) for n in names}
        verified = {n: verify_upload(_wire(u), run_id=RUN, round_=rnd, partner=n, roster_key=federation["roster"][n]) for n, u in ups.items()}
        agg, _ = aggregate_uploads(federation["pub"], verified, run_id=RUN, round_=rnd, n_ciphertexts=1, signing_key=federation["coordinator"])
        total = open_aggregate(federation["contexts"]["va-long-beach"], agg, run_id=RUN, round_=rnd, coordinator_key=ckey, length=n_params + 1,
                               my_hash=ups["va-long-beach"]["hash"], min_partners=4, roster=federation["roster"])
        encoded = [encode_weighted(flat(lh[n]), weight=data[n].n_train / total_rows, clip=spec.he.clip, scale=spec.he.scale,
                                   max_abs=federation["pub"].params.max_abs) for n in names]
        exact_float = sum(data[n].n_train / total_rows * flat(lh[n]) for n in names)
        checks.append((total, np.sum(encoded, axis=0), exact_float))
        he = decode_model(total, template, scale=spec.he.scale)
    return {"plain": plain, "he": he, "checks": checks, "he_metrics": evaluate(he), "plain_metrics": evaluate(plain), "scale": spec.he.scale}


class TestHeartTwentyRounds:
    def test_each_round_aggregate_is_the_numpy_sum(self, heart_rounds):
        """Every round: the decrypted aggregate equals the integer sum exactly, and the float weighted sum within n / (2 scale)."""
        bound = quantisation_bound(n_parties=4, scale=heart_rounds["scale"])
        assert len(heart_rounds["checks"]) == 20
        for total, int_sum, exact_float in heart_rounds["checks"]:
            np.testing.assert_array_equal(total, int_sum)
            assert np.abs(total[:-1] / heart_rounds["scale"] - exact_float).max() <= bound

    def test_he_model_within_1e_3_of_plain(self, heart_rounds):
        """After 20 rounds every parameter of the HE model is within 1e-3 of plain FedAvg's."""
        for k, v in heart_rounds["plain"].items():
            assert np.abs(heart_rounds["he"][k] - v).max() < 1e-3, k

    def test_he_model_meets_the_utility_bars(self, heart_rounds):
        """Pooled test accuracy >= 0.78 and AUC >= 0.86, as plain FedAvg."""
        m = heart_rounds["he_metrics"]
        assert m.accuracy >= 0.78 and m.auc is not None and m.auc >= 0.86, (m, heart_rounds["plain_metrics"])


def test_crypto_failures_leave_the_node_as_a_code():
    """A refused signature, package or ciphertext leaves the node as CRYPTO_REFUSED, never as text."""
    from fedcollab.core import NodeErrorCode
    from fedcollab.node._client import _code_for

    assert _code_for(CryptoError("`key package`: the signature does not verify")) == NodeErrorCode.CRYPTO_REFUSED


class TestFedAdamAtTheNodes:
    def test_step_is_flowers_fedadam(self, monkeypatch):
        """fedadam_step reproduces flwr's FedAdam.aggregate_train over three rounds (its own arithmetic, FedAvg's average given)."""
        from flwr.app import Array, ArrayRecord
        from flwr.serverapp.strategy import FedAdam, FedAvg

        from fedcollab.node._he import fedadam_step

        rng = np.random.default_rng(5)
        strategy = FedAdam(eta=0.1, eta_l=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)
        current = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
        ours, m, v = dict(current), None, None
        for rnd in (1, 2, 3):
            avg = {k: (x + rng.normal(scale=0.1, size=x.shape)).astype(np.float32) for k, x in current.items()}
            monkeypatch.setattr(FedAvg, "aggregate_train", lambda self, r, replies, a=avg: (ArrayRecord({k: Array(v) for k, v in a.items()}), None))
            strategy.current_arrays = {k: np.asarray(x) for k, x in current.items()}
            flower, _ = strategy.aggregate_train(rnd, [])
            ours, m, v = fedadam_step(ours, avg, m, v, server_round=rnd, eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
            for k in current:
                np.testing.assert_allclose(ours[k], flower[k].numpy(), rtol=1e-6, atol=1e-7)
            current = {k: flower[k].numpy() for k in current}

    def test_state_steps_once_per_round_and_refuses_gaps(self, spec, tmp_path):
        """Evaluate and the next train carry the same aggregate: the step is applied once; a missed round is refused."""
        from fedcollab.node._he import server_step

        adam = spec.model_copy(update={"training": spec.training.model_copy(update={"strategy": "fedadam"})})
        tpl = OrderedDict(w=np.zeros(3, dtype=np.float32))
        agg = OrderedDict(w=np.ones(3, dtype=np.float32))
        first = server_step(adam, tmp_path, RUN, tpl, agg, 1)
        again = server_step(adam, tmp_path, RUN, tpl, OrderedDict(w=np.full(3, 9.0, dtype=np.float32)), 1)
        np.testing.assert_array_equal(first["w"], again["w"])
        assert not np.allclose(first["w"], agg["w"]) and (tmp_path / "he" / f"{RUN}-fedadam.npz").stat().st_mode & 0o077 == 0
        with pytest.raises(ProtocolError, match="round 1"):
            server_step(adam, tmp_path, RUN, tpl, agg, 3)
        assert server_step(spec, tmp_path, RUN, tpl, agg, 7) is agg  # FedAvg: the aggregate itself
