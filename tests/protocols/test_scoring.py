"""Encrypted scoring: CKKS correctness, masking, flooding, signed requests, the query budget and malformed input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.audit._verify import verify_lines
from fedcollab.core import CryptoError, ExitCode, NodeErrorCode, PolicyRefused
from fedcollab.crypto import SCORING_PARAMS, PublicScoringContext, SecretScoringContext
from fedcollab.privacy.accounting import PartyLedger, key_fingerprint, public_key_hex
from fedcollab.protocols.scoring import (
    REQUEST_MAGIC,
    LinearModel,
    ScoringAuthError,
    ScoringBudgetExhausted,
    ScoringReplayError,
    ScoringRequestError,
    answer_request,
    blob_table,
    build_request,
    decrypt_response,
    fold_scaling,
    load_linear_model,
    pack_container,
    sign_request_header,
    unpack_container,
)
from fedcollab.spec import NodePolicy, Roster, ScoringPolicy, load_policy, policy_toml

FLOOD = 2.0**-10
D = 4


@pytest.fixture(scope="module")
def secret_ctx() -> SecretScoringContext:
    return SecretScoringContext.generate()


@pytest.fixture()
def gen() -> np.random.Generator:
    return np.random.default_rng(7)


def _model(d: int = D) -> LinearModel:
    rng = np.random.default_rng(3)
    return LinearModel(weights=rng.normal(size=d), bias=0.25, model_id="ab" * 32)


KEYS = {name: Ed25519PrivateKey.generate() for name in ("bank", "stranger", "mallory")}


def _roster(holder_key: Ed25519PrivateKey) -> Roster:
    """The holder's own roster: itself and the queriers (not mallory, whose key is not known)."""
    parties = {"telecom": holder_key, "bank": KEYS["bank"], "stranger": KEYS["stranger"]}
    return Roster.model_validate({"parties": {n: {"signing_key": public_key_hex(k)} for n, k in parties.items()}})


def _pack(header: dict, blobs: dict, key: Ed25519PrivateKey | None) -> bytes:
    """A request container from a header and blobs, signed with ``key`` (or carrying the header's signature as is)."""
    h = {k: v for k, v in header.items() if k != "blobs"}
    if key is not None:
        h = sign_request_header({**h, "blobs": blob_table(list(blobs.items()))}, key)
    return pack_container(REQUEST_MAGIC, h, list(blobs.items()))


def _holder(tmp_path, budget: dict[str, int], default: int = 0) -> tuple[PartyLedger, NodePolicy, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    policy = NodePolicy(partner="telecom", scoring=ScoringPolicy(max_rows_per_querier=budget, default_max_rows=default))
    return PartyLedger(tmp_path / "ledger.jsonl", party="telecom", key=key), policy, key


class TestCkks:
    """The CKKS primitives alone."""

    def test_small_batch_matches_plain(self, secret_ctx, gen):
        """Five encrypted rows score to x.w + b within a few flooding standard deviations."""
        x = gen.normal(size=(5, D)) * 10
        w, b = np.array([0.5, -1.25, 2.0, 0.0]), -0.75
        pub = PublicScoringContext.from_bytes(secret_ctx.public_bytes())
        cols = [pub.load_column(blob, rows=5, field=f"f{j}") for j, blob in enumerate(secret_ctx.encrypt_columns(x)[0])]
        out = secret_ctx.decrypt_scores(pub.score_linear(cols, weights=w, bias=b, rows=5, flood_std=FLOOD, generator=gen), rows=5)
        np.testing.assert_allclose(out, x @ w + b, atol=6 * FLOOD)

    def test_unused_slots_are_masked_and_flooded(self, secret_ctx, gen):
        """A ciphertext carrying data in every slot yields only the declared rows; the rest is noise of std flood_std."""
        slots = SCORING_PARAMS.slots
        x = np.full((slots, D), 100.0)
        pub = PublicScoringContext.from_bytes(secret_ctx.public_bytes())
        cols = [pub.load_column(blob, rows=slots, field="f") for blob in secret_ctx.encrypt_columns(x)[0]]
        out = secret_ctx.decrypt_scores(pub.score_linear(cols, weights=np.ones(D), bias=1.0, rows=3, flood_std=FLOOD, generator=gen), rows=slots)
        np.testing.assert_allclose(out[:3], 401.0, atol=6 * FLOOD)
        rest = out[3:]
        assert np.abs(rest).max() < 6 * FLOOD  # 0 * 100 + noise, not 401
        assert 0.9 * FLOOD < rest.std() < 1.1 * FLOOD  # the flooding noise is there, and of the stated size

    def test_secret_key_context_refused(self, secret_ctx):
        """The model holder refuses a context that carries the querier's secret key."""
        with pytest.raises(CryptoError, match="`context` must not carry a secret key"):
            PublicScoringContext.from_bytes(secret_ctx.secret_bytes())

    def test_weaker_parameters_refused(self):
        """A context with other CKKS parameters (N = 4096) is refused, naming expected and got."""
        import tenseal as ts

        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096, coeff_mod_bit_sizes=[40, 20, 40],
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
        ctx.global_scale = 2.0**20
        with pytest.raises(CryptoError, match=r"`context` must have CKKS parameters .*'poly_modulus_degree': 8192.* got .*4096"):
            PublicScoringContext.from_bytes(ctx.serialize(save_secret_key=False))

    def test_garbage_context_and_ciphertext(self, secret_ctx):
        """Bytes that are not a context or not a ciphertext give a CryptoError naming the field."""
        with pytest.raises(CryptoError, match="`context` must be a serialized TenSEAL context"):
            PublicScoringContext.from_bytes(b"\x00" * 64)
        pub = PublicScoringContext.from_bytes(secret_ctx.public_bytes())
        blob = secret_ctx.encrypt_columns(np.ones((2, 1)))[0][0]
        with pytest.raises(CryptoError, match="`c0f0` must be a TenSEAL CKKS vector"):
            pub.load_column(blob[: len(blob) // 2], rows=2, field="c0f0")
        with pytest.raises(CryptoError, match="`c0f0` must hold 3 rows, got 2"):
            pub.load_column(blob, rows=3, field="c0f0")

    def test_nan_and_huge_features_refused(self, secret_ctx):
        """NaN or out-of-range features are refused before encryption, naming row and feature."""
        x = np.ones((3, 2))
        x[1, 1] = np.nan
        with pytest.raises(CryptoError, match="`rows` must be finite, got nan in row 1, feature 1"):
            secret_ctx.encrypt_columns(x)
        with pytest.raises(CryptoError, match=r"\|x\| <= 2\^20"):
            secret_ctx.encrypt_columns(np.full((1, 1), 1e7))


class TestProtocol:
    """Request, budgeted answer, decryption."""

    def test_round_trip_and_ledger(self, tmp_path, gen, secret_ctx):
        """Scores match plain scoring; the holder's ledger records the rows and verifies."""
        x = gen.normal(size=(7, D))
        m = _model()
        ledger, policy, key = _holder(tmp_path, {"bank": 100})
        pending = build_request(x, querier="bank", key=KEYS["bank"], labels=(x[:, 0] > 0).astype(float), context=secret_ctx)
        ans = answer_request(pending.request, model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        scores = decrypt_response(ans.response, pending.state)
        np.testing.assert_allclose(scores.logits, m.logits(x), atol=6 * FLOOD)
        entry = ledger.lines()[-1].entry
        assert entry["kind"] == "scoring" and entry["body"]["outcome"] == "answered" and entry["body"]["rows"] == 7
        roster = Roster.model_validate({"parties": {"telecom": {"signing_key": public_key_hex(key)}}})
        assert verify_lines(ledger.lines(), roster).exit_code == ExitCode.OK

    def test_budget_refuses_with_code_and_entry(self, tmp_path, gen, secret_ctx):
        """6 + 6 rows (charged 2 each) exceed a budget of 20: the second request is refused and recorded; 4 more fit exactly."""
        m = _model()
        ledger, policy, key = _holder(tmp_path, {"bank": 20})
        req = lambda n: build_request(gen.normal(size=(n, D)), querier="bank", key=KEYS["bank"], context=secret_ctx).request  # noqa: E731
        answer_request(req(6), model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        with pytest.raises(ScoringBudgetExhausted) as exc:
            answer_request(req(6), model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        assert exc.value.node_code == NodeErrorCode.SCORING_BUDGET_EXHAUSTED and exc.value.exit_code == ExitCode.BUDGET_EXHAUSTED
        refused = ledger.lines()[-1].entry["body"]
        assert refused["outcome"] == "refused" and refused["code"] == 134 and refused["rows_before"] == 12
        answer_request(req(4), model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        with pytest.raises(ScoringBudgetExhausted):
            answer_request(req(1), model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        # a querier the policy does not name gets default_max_rows = 0
        with pytest.raises(ScoringBudgetExhausted):
            answer_request(build_request(np.ones((1, D)), querier="stranger", key=KEYS["stranger"], context=secret_ctx).request,
                           model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        roster = Roster.model_validate({"parties": {"telecom": {"signing_key": public_key_hex(key)}}})
        rep = verify_lines(ledger.lines(), roster)
        assert rep.exit_code == ExitCode.OK, rep.findings
        import jsonschema

        from tests.conftest import ROOT

        schema = json.loads((ROOT / "schemas" / "ledger.schema.json").read_text())
        for ln in ledger.lines():
            jsonschema.validate(ln.entry, schema)

    def test_complex_slots_are_charged_as_two_equations(self, tmp_path, gen, secret_ctx):
        """Attack 7: a querier packing complex slots gets w.Re(x) + b and w.Im(x) per row, so every row costs 2 budget rows.

        With a budget of d + 1 = 5 equations the querier can no longer get ceil((d + 1) / 2) = 3 complex rows
        (6 equations, enough for the model): 3 rows are refused, 2 rows (4 equations) are the most it gets.
        """
        m = _model()
        ledger, policy, key = _holder(tmp_path, {"bank": D + 1})
        req = lambda n: build_request(gen.normal(size=(n, D)), querier="bank", key=KEYS["bank"], context=secret_ctx).request  # noqa: E731
        with pytest.raises(ScoringBudgetExhausted, match="charged 6"):
            answer_request(req(3), model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        ans = answer_request(req(2), model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        assert ans.charged == 4 and ans.rows_before == 0
        with pytest.raises(ScoringBudgetExhausted):
            answer_request(req(1), model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        answered = [ln.entry["body"] for ln in ledger.lines() if ln.entry["body"]["outcome"] == "answered"]
        assert 2 * sum(b["rows"] for b in answered) <= D + 1  # equations released (real + imaginary part) within the budget
        roster = Roster.model_validate({"parties": {"telecom": {"signing_key": public_key_hex(key)}}})
        assert verify_lines(ledger.lines(), roster).exit_code == ExitCode.OK

    def test_verify_catches_false_counts(self, tmp_path):
        """audit verify recomputes the rows answered before: an understated count or an overrun is found."""
        ledger, _, key = _holder(tmp_path, {})
        body = {"querier": "bank", "model": "ab" * 32, "request": "cd" * 32, "budget": 10, "outcome": "answered", "code": None}
        ledger.append(kind="scoring", run_id="r1", round=0, body={**body, "rows": 8, "rows_before": 0})
        ledger.append(kind="scoring", run_id="r2", round=0, body={**body, "rows": 8, "rows_before": 0})
        roster = Roster.model_validate({"parties": {"telecom": {"signing_key": public_key_hex(key)}}})
        codes = {f.code for f in verify_lines(ledger.lines(), roster).findings}
        assert codes == {ExitCode.CLAIM_MISMATCH, ExitCode.LEDGER_BUDGET_EXCEEDED}

    def test_malformed_requests(self, tmp_path, gen, secret_ctx):
        """Truncated, altered, mis-shaped or mislabelled requests are refused naming the problem; nothing is recorded."""
        m = _model()
        ledger, policy, key = _holder(tmp_path, {"bank": 100})
        good = build_request(gen.normal(size=(3, D)), querier="bank", key=KEYS["bank"], context=secret_ctx).request
        ask = lambda data: answer_request(data, model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)  # noqa: E731
        with pytest.raises(ScoringRequestError, match="truncated"):
            ask(good[:-100])
        with pytest.raises(ScoringRequestError, match="must start with"):
            ask(b"GARBAGE!" + good[8:])
        altered = bytearray(good)
        altered[-5] ^= 1
        with pytest.raises(ScoringRequestError, match="altered"):
            ask(bytes(altered))
        header, blobs = unpack_container(good, REQUEST_MAGIC, what="request")
        # a querier may sign malformed content: re-signed by bank, these reach the holder's content checks
        rebuild = lambda h, b: _pack(h, b, KEYS["bank"])  # noqa: E731
        with pytest.raises(ScoringRequestError, match="`n_features` must be 4 .*got 5"):
            ask(build_request(np.ones((2, 5)), querier="bank", key=KEYS["bank"], context=secret_ctx).request)
        with pytest.raises(ScoringRequestError, match="`params` must be"):
            ask(rebuild({**header, "params": {**header["params"], "poly_modulus_degree": 4096}}, blobs))
        with pytest.raises(ScoringRequestError, match="`c0f2` must be a TenSEAL CKKS vector"):
            ask(rebuild(header, {**blobs, "c0f2": b"\x01" * 1000}))
        with pytest.raises(ScoringRequestError, match="`context` must not carry a secret key"):
            ask(rebuild(header, {**blobs, "context": secret_ctx.secret_bytes()}))
        with pytest.raises(ScoringRequestError, match="missing"):
            ask(rebuild(header, {k: v for k, v in blobs.items() if k != "c0f3"}))
        with pytest.raises(ScoringRequestError, match="`chunks` must be"):
            ask(rebuild({**header, "n_rows": 2}, blobs))
        assert ledger.lines() == []

    def test_response_for_another_request_refused(self, tmp_path, gen, secret_ctx):
        """The querier refuses a response that answers a different request."""
        ledger, policy, key = _holder(tmp_path, {"bank": 100})
        a = build_request(np.ones((2, D)), querier="bank", key=KEYS["bank"], context=secret_ctx)
        b = build_request(np.ones((2, D)), querier="bank", key=KEYS["bank"], context=secret_ctx)
        ans = answer_request(a.request, model=_model(), policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        with pytest.raises(ScoringRequestError, match="`request_id` must be"):
            decrypt_response(ans.response, b.state)


class TestAuthentication:
    """The querier signs its request with its node key; the holder checks it against its own roster."""

    def _refused(self, ledger: PartyLedger, key: Ed25519PrivateKey, code: NodeErrorCode, reason: str) -> dict:
        """The last ledger entry is a refusal with ``code`` and ``reason``; the ledger verifies and matches its schema."""
        body = ledger.lines()[-1].entry["body"]
        assert body["outcome"] == "refused" and body["code"] == int(code) and body["reason"] == reason
        roster = Roster.model_validate({"parties": {"telecom": {"signing_key": public_key_hex(key)}}})
        rep = verify_lines(ledger.lines(), roster)
        assert rep.exit_code == ExitCode.OK, rep.findings
        import jsonschema

        from tests.conftest import ROOT

        schema = json.loads((ROOT / "schemas" / "ledger.schema.json").read_text())
        for ln in ledger.lines():
            jsonschema.validate(ln.entry, schema)
        return body

    def test_signed_request_answered_with_key_fingerprint(self, tmp_path, gen, secret_ctx):
        """A request signed by a roster party is answered; the entry records the querier's key fingerprint."""
        ledger, policy, key = _holder(tmp_path, {"bank": 10})
        m = _model()
        pending = build_request(gen.normal(size=(3, D)), querier="bank", key=KEYS["bank"], model_id=m.model_id, context=secret_ctx)
        ans = answer_request(pending.request, model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        fp = key_fingerprint(public_key_hex(KEYS["bank"]))
        body = ledger.lines()[-1].entry["body"]
        assert ans.querier_key == fp and body["querier_key"] == fp and body["outcome"] == "answered"
        assert len(decrypt_response(ans.response, pending.state).logits) == 3

    def test_unknown_querier_refused(self, tmp_path, gen, secret_ctx):
        """A querier missing from the holder's roster is refused (code 136), even with a valid signature of its own."""
        ledger, policy, key = _holder(tmp_path, {"mallory": 100}, default=100)
        req = build_request(np.ones((2, D)), querier="mallory", key=KEYS["mallory"], context=secret_ctx).request
        with pytest.raises(ScoringAuthError, match="'mallory' is not in the holder's roster") as exc:
            answer_request(req, model=_model(), policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        assert exc.value.node_code == NodeErrorCode.SCORING_UNAUTHENTICATED and exc.value.exit_code == ExitCode.CRYPTO_FAILED
        body = self._refused(ledger, key, NodeErrorCode.SCORING_UNAUTHENTICATED, "unknown_querier")
        assert body["querier"] == "mallory" and body["querier_key"] is None

    @pytest.mark.parametrize("change", ["querier", "querier_and_signer", "rows", "request_id", "model", "unsigned", "ciphertext"])
    def test_tampered_request_refused(self, tmp_path, gen, secret_ctx, change):
        """A request changed after signing (querier, rows, id, model, a ciphertext) or unsigned is refused (code 136)."""
        ledger, policy, key = _holder(tmp_path, {"bank": 100, "stranger": 100})
        m = _model()
        good = build_request(gen.normal(size=(3, D)), querier="bank", key=KEYS["bank"], context=secret_ctx).request
        header, blobs = unpack_container(good, REQUEST_MAGIC, what="request")
        stranger_fp = key_fingerprint(public_key_hex(KEYS["stranger"]))
        if change == "querier":  # a second budget under another roster name
            header = {**header, "querier": "stranger"}
        elif change == "querier_and_signer":
            header = {**header, "querier": "stranger", "signer": stranger_fp}
        elif change == "rows":  # fewer rows charged; the ciphertexts still hold 3
            header = {**header, "n_rows": 2, "chunks": [2]}
        elif change == "request_id":  # evade the replay check
            header = {**header, "request_id": "0" * 32}
        elif change == "model":
            header = {**header, "model": m.model_id}
        elif change == "unsigned":
            header = {k: v for k, v in header.items() if k not in ("signature", "signer")}
        else:  # swap a ciphertext, blob table updated so that the container itself is consistent
            blobs = {**blobs, "c0f1": blobs["c0f0"]}
        with pytest.raises(ScoringAuthError, match="signature|signed by"):
            answer_request(_pack(header, blobs, None), model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        self._refused(ledger, key, NodeErrorCode.SCORING_UNAUTHENTICATED, "bad_signature")
        assert len(ledger.lines()) == 1

    @pytest.mark.parametrize("claim_signer", [False, True])
    def test_other_partys_key_refused(self, tmp_path, gen, secret_ctx, claim_signer):
        """A request naming bank but signed with another party's key is refused, whatever signer it claims."""
        ledger, policy, key = _holder(tmp_path, {"bank": 100})
        good = build_request(np.ones((2, D)), querier="bank", key=KEYS["bank"], context=secret_ctx).request
        header, blobs = unpack_container(good, REQUEST_MAGIC, what="request")
        forged = sign_request_header({k: v for k, v in header.items()}, KEYS["stranger"])
        if claim_signer:  # claims bank's fingerprint; the signature is still stranger's
            forged = {**forged, "signer": key_fingerprint(public_key_hex(KEYS["bank"]))}
        with pytest.raises(ScoringAuthError, match="signed by key|not 'bank'"):
            answer_request(_pack(forged, blobs, None), model=_model(), policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        body = self._refused(ledger, key, NodeErrorCode.SCORING_UNAUTHENTICATED, "bad_signature")
        assert body["querier_key"] == key_fingerprint(public_key_hex(KEYS["bank"]))

    def test_replayed_request_refused(self, tmp_path, gen, secret_ctx):
        """A request id already answered is refused (code 137) and not charged again."""
        ledger, policy, key = _holder(tmp_path, {"bank": 100})
        m = _model()
        req = build_request(gen.normal(size=(3, D)), querier="bank", key=KEYS["bank"], context=secret_ctx).request
        answer_request(req, model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        with pytest.raises(ScoringReplayError, match="already answered") as exc:
            answer_request(req, model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        assert exc.value.node_code == NodeErrorCode.SCORING_REPLAYED and exc.value.exit_code == ExitCode.PROTOCOL_FAILED
        body = self._refused(ledger, key, NodeErrorCode.SCORING_REPLAYED, "replay")
        assert body["rows_before"] == 6  # 3 rows, charged 2 each
        ans = answer_request(build_request(np.ones((1, D)), querier="bank", key=KEYS["bank"], context=secret_ctx).request,
                             model=m, policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        assert ans.rows_before == 6  # the replay was not charged

    def test_request_bound_to_another_model_refused(self, tmp_path, gen, secret_ctx):
        """A request signed for model A is not scored with model B (nothing recorded)."""
        ledger, policy, key = _holder(tmp_path, {"bank": 100})
        req = build_request(np.ones((2, D)), querier="bank", key=KEYS["bank"], model_id="cd" * 32, context=secret_ctx).request
        with pytest.raises(ScoringRequestError, match="`model` must be abab"):
            answer_request(req, model=_model(), policy=policy, ledger=ledger, roster=_roster(key), generator=gen)
        assert ledger.lines() == []


class TestModelAndPolicy:
    """Loading the holder's model and policy."""

    def test_fold_scaling(self):
        """Folding the run's scaling into the weights leaves every logit unchanged."""
        rng = np.random.default_rng(0)
        w, b, mean, std, x = rng.normal(size=3), 0.3, rng.normal(size=3), rng.uniform(0.5, 2, size=3), rng.normal(size=(5, 3))
        w2, b2 = fold_scaling(w, b, mean, std)
        np.testing.assert_allclose(x @ w2 + b2, ((x - mean) / std) @ w + b)

    def test_load_linear_model(self, tmp_path):
        """A run folder's model loads with its scaling folded in; a changed file or an MLP is refused."""
        import hashlib

        from safetensors.numpy import save_file

        save_file({"linear.weight": np.array([[1.0, 2.0]], dtype=np.float32), "linear.bias": np.array([0.5], dtype=np.float32)},
                  str(tmp_path / "model.safetensors"))
        sha = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
        summary = {"model": {"path": "model.safetensors", "sha256": sha, "format": "safetensors"},
                   "scaling_parameters": {"mean": [1.0, 0.0], "std": [2.0, 1.0]}}
        (tmp_path / "summary.json").write_text(json.dumps(summary))
        m = load_linear_model(tmp_path)
        assert m.model_id == sha and math.isclose(m.bias, 0.0) and np.allclose(m.weights, [0.5, 2.0])
        (tmp_path / "summary.json").write_text(json.dumps({**summary, "model": {**summary["model"], "sha256": "0" * 64}}))
        with pytest.raises(Exception, match="SHA-256 differs"):
            load_linear_model(tmp_path)
        save_file({"net.0.weight": np.ones((2, 2), dtype=np.float32)}, str(tmp_path / "model.safetensors"))
        (tmp_path / "summary.json").write_text(json.dumps({"model": {"path": "model.safetensors"}}))
        with pytest.raises(PolicyRefused, match="logistic regression"):
            load_linear_model(tmp_path)

    def test_policy_toml_round_trip(self, tmp_path):
        """The [scoring] section survives policy_toml -> load_policy."""
        pol = NodePolicy(partner="telecom", scoring=ScoringPolicy(max_rows_per_querier={"bank": 12, "a b": 3}, default_max_rows=1))
        (tmp_path / "p.toml").write_text(policy_toml(pol))
        assert load_policy(tmp_path / "p.toml") == pol
        assert pol.scoring.budget("bank") == 12 and pol.scoring.budget("other") == 1
