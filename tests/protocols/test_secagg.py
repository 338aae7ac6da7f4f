"""SecAgg+ on the pure stage functions: sums, dropouts, what the coordinator learns, hostile input."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.core import ConfigError, CryptoError, ProtocolError, UpdateError
from fedcollab.crypto import combine_shares, expand_mask, share_from_bytes
from fedcollab.protocols import secagg
from fedcollab.protocols.quantize import (check_headroom, clip_vector, decode_update, dequantize, encode_update, flatten_arrays, pack,
                                          quantize, unflatten_arrays, unpack)

Stage = secagg.Stage
NAMES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")
LENGTH = 257


@pytest.fixture(scope="module")
def keys() -> dict[str, Ed25519PrivateKey]:
    return {n: Ed25519PrivateKey.generate() for n in NAMES}


@pytest.fixture(scope="module")
def roster(keys):
    return {n: k.public_key() for n, k in keys.items()}


def make_cfg(names=NAMES, **kw) -> secagg.SecAggConfig:
    params = dict(run_id="run-1", round=3, participants=tuple(names), k=4, threshold=3, max_dropouts=1,
                  bits=32, length=LENGTH)
    params.update(kw)
    return secagg.SecAggConfig(**params)


def random_vectors(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 2**cfg.bits, size=cfg.length, dtype=cfg.dtype) for n in cfg.participants}


def plain_sum(vectors, names, dtype):
    total = np.zeros(len(next(iter(vectors.values()))), dtype=dtype)
    for n in names:
        total += vectors[n]
    return total


def staged(cfg, keys, roster, vectors=None):
    """Run every stage by hand (no dropouts), keeping every state and message."""
    vectors = vectors or random_vectors(cfg)
    r = SimpleNamespace(cfg=cfg, vectors=vectors, roster=roster)
    r.coord0, _ = secagg.coord_start(cfg, roster)
    r.nodes0, r.ads = {}, {}
    for n in cfg.participants:
        r.nodes0[n], r.ads[n] = secagg.node_advertise(cfg, secagg.NodeIdentity(name=n, signing_key=keys[n]))
    r.coord1, r.to_nodes = secagg.coord_collect_advertisements(r.coord0, r.ads)
    r.nodes1, r.bundles = {}, {}
    for n in r.to_nodes:
        r.nodes1[n], r.bundles[n] = secagg.node_share(r.nodes0[n], r.to_nodes[n], roster)
    r.coord2, r.routed = secagg.coord_route_shares(r.coord1, r.bundles)
    r.nodes2, r.masked = {}, {}
    for n in r.routed:
        r.nodes2[n], r.masked[n] = secagg.node_masked_input(r.nodes1[n], r.routed[n], vectors[n])
    r.coord3c, r.checks = secagg.coord_collect_masked(r.coord2, r.masked)
    r.nodes2c, r.signed = {}, {}
    for n in r.checks:
        r.nodes2c[n], r.signed[n] = secagg.node_consistency(r.nodes2[n], r.checks[n], secagg.NodeIdentity(name=n, signing_key=keys[n]))
    r.coord3, r.requests = secagg.coord_collect_signatures(r.coord3c, r.signed)
    r.nodes3, r.revealed = {}, {}
    for n in r.requests:
        r.nodes3[n], r.revealed[n] = secagg.node_unmask(r.nodes2c[n], r.requests[n], roster)
    r.coord4, r.total = secagg.coord_unmask(r.coord3, r.revealed)
    return r


@pytest.fixture(scope="module")
def run(keys, roster):
    return staged(make_cfg(), keys, roster)


# --------------------------------------------------------------------------- encoding


class TestQuantize:
    def test_round_trip_within_half_a_step(self):
        """dequantize(quantize(x)) equals clip(x) within 0.5 / scale, negatives included, both moduli."""
        x = np.random.default_rng(1).normal(size=1000) * 0.3
        for bits, scale in ((32, 2.0**20), (64, 2.0**40)):
            q = quantize(x, clip=1.0, scale=scale, bits=bits, n_parties=10)
            assert q.dtype == (np.uint32 if bits == 32 else np.uint64)
            back = dequantize(q, scale=scale, bits=bits)
            assert np.max(np.abs(back - np.clip(x, -1, 1))) <= 0.5 / scale

    def test_sum_of_encodings_decodes_to_float_sum(self):
        """The modular sum of n encodings decodes to the float sum within n · 0.5 / scale."""
        rng = np.random.default_rng(2)
        xs = [rng.uniform(-2, 2, size=500) for _ in range(6)]
        total = np.zeros(500, dtype=np.uint32)
        for x in xs:
            total += quantize(x, clip=2.0, scale=2.0**24, bits=32, n_parties=6)
        assert np.max(np.abs(dequantize(total, scale=2.0**24, bits=32) - sum(xs))) <= 6 * 0.5 / 2**24

    def test_clipping_linf_and_l2(self):
        """L∞ clips each coordinate; L2 rescales to the bound; a zero vector stays zero."""
        x = np.array([3.0, -4.0, 0.5])
        assert np.array_equal(clip_vector(x, bound=1.0), [1.0, -1.0, 0.5])
        assert np.isclose(np.linalg.norm(clip_vector(x, bound=1.0, norm="l2")), 1.0)
        assert np.array_equal(clip_vector(np.zeros(3), bound=1.0, norm="l2"), np.zeros(3))
        with pytest.raises(UpdateError, match="NaN"):
            clip_vector(np.array([np.nan]), bound=1.0)

    def test_one_l2_clipper(self):
        """clip_vector's L2 branch is privacy.mechanisms.clip_l2 (bit for bit); an overflowing norm is an UpdateError, not zeros."""
        from fedcollab.privacy.mechanisms import clip_l2

        rng = np.random.default_rng(5)
        for scale in (1e-3, 1.0, 1e3):
            x = rng.normal(size=257) * scale
            assert np.array_equal(clip_vector(x, bound=2.0, norm="l2"), clip_l2(x, 2.0))
        with pytest.raises(UpdateError, match="overflows"), np.errstate(over="ignore"):  # numpy warns of the overflow too
            clip_vector(np.full(4, 1e300), bound=1.0, norm="l2")

    def test_headroom_is_checked(self):
        """n · max|x| · scale must stay below 2^(bits-1); the message names a scale that fits."""
        check_headroom(n_parties=10, max_abs=1.0, scale=2.0**27, bits=32)
        with pytest.raises(ProtocolError, match=r"no headroom.*2\^32.*scale <="):
            check_headroom(n_parties=10, max_abs=1.0, scale=2.0**28, bits=32)
        check_headroom(n_parties=10, max_abs=1.0, scale=2.0**28, bits=64)
        with pytest.raises(ProtocolError, match="no headroom"):
            quantize(np.ones(3), clip=8.0, scale=2.0**30, bits=32, n_parties=5)
        for bad in (dict(n_parties=True), dict(max_abs=float("nan")), dict(scale=0.0), dict(bits=16)):
            args = dict(n_parties=3, max_abs=1.0, scale=10.0, bits=32) | bad
            with pytest.raises(ProtocolError, match=f"`{next(iter(bad))}`"):
                check_headroom(**args)

    def test_stochastic_rounding_needs_a_generator_and_is_unbiased(self):
        """Stochastic rounding takes an explicit numpy Generator and averages to the true value."""
        x = np.full(20_000, 0.3)
        with pytest.raises(ProtocolError, match="generator"):
            quantize(x, clip=1.0, scale=1.0, bits=32, n_parties=2, rounding="stochastic")
        q = quantize(x, clip=1.0, scale=1.0, bits=32, n_parties=2, rounding="stochastic",
                     generator=np.random.default_rng(0))
        assert abs(dequantize(q, scale=1.0, bits=32).mean() - 0.3) < 0.02

    def test_pack_and_unpack(self):
        """pack sends (w·x, w); the sum of packs unpacks to (Σ w·x, Σ w)."""
        a, b = pack(np.array([1.0, 2.0]), 3), pack(np.array([-1.0, 0.0]), 1)
        assert np.array_equal(a, [3.0, 6.0, 3.0])
        weighted, total = unpack(a + b)
        assert np.array_equal(weighted, [2.0, 6.0]) and total == 4.0
        with pytest.raises(UpdateError, match="weight"):
            pack(np.ones(2), -1)


# --------------------------------------------------------------------------- config and graph


class TestArrayCodec:
    """The one vector codec every protocol uses for model arrays (SecAgg+, distributed DP, HE, central DP)."""

    def test_round_trip_keeps_names_order_shapes_and_dtypes(self):
        arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([7.5], dtype=np.float32), "k": np.array([[1, 2]], dtype=np.int64)}
        flat = flatten_arrays(arrays)
        assert flat.dtype == np.float64 and flat.tolist() == [0, 1, 2, 3, 4, 5, 7.5, 1, 2]
        back = unflatten_arrays(flat, arrays)
        assert list(back) == ["w", "b", "k"]
        for k, v in arrays.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v)
        assert flatten_arrays(arrays, ["b", "w"]).tolist() == [7.5, 0, 1, 2, 3, 4, 5]

    @pytest.mark.parametrize("size", [8, 10, 0])
    def test_a_vector_of_another_size_is_refused(self, size):
        with pytest.raises(UpdateError, match="expected 9"):
            unflatten_arrays(np.zeros(size), {"w": np.zeros((3, 3))})


class TestConfig:
    def test_bad_parameters_are_each_named(self):
        """One ConfigError lists every bad parameter (k odd, t <= k/2, t > k - dropouts, bits)."""
        with pytest.raises(ConfigError) as info:
            make_cfg(k=3, threshold=1, max_dropouts=0, bits=16)
        text = str(info.value)
        assert "`k` must be even" in text and "`threshold` must be > degree/2" in text and "`bits`" in text
        with pytest.raises(ConfigError, match=r"`threshold` must be <= degree - max_dropouts = 4 - 2 = 2"):
            make_cfg(threshold=3, max_dropouts=2)
        with pytest.raises(ConfigError, match="at least 3"):
            make_cfg(names=("a", "b"), k=2, threshold=1)
        with pytest.raises(ConfigError, match="repeats"):
            make_cfg(names=("a", "a", "b"))

    def test_config_from_the_wire_is_validated(self):
        """A coordinator sending t <= k/2 gets a ProtocolError at the node."""
        wire = make_cfg().to_wire() | {"threshold": 2}
        with pytest.raises(ProtocolError, match="threshold"):
            secagg.SecAggConfig.from_wire(wire)
        assert secagg.SecAggConfig.from_wire(make_cfg().to_wire()) == make_cfg()

    def test_graph_is_regular_symmetric_and_per_round(self):
        """Every node has k neighbours, the relation is symmetric, the graph changes with the round."""
        g = secagg.neighbour_graph(make_cfg())
        assert all(len(v) == 4 and u not in v for u, v in g.items())
        assert all(u in g[v] for u in g for v in g[u])
        graphs = {tuple(sorted(secagg.neighbour_graph(make_cfg(round=r)).items())) for r in range(8)}
        assert len(graphs) > 1
        complete = secagg.neighbour_graph(make_cfg(names=NAMES[:5], k=4))
        assert all(len(v) == 4 for v in complete.values())


# --------------------------------------------------------------------------- full rounds


class TestRound:
    def test_aggregate_is_the_plain_modular_sum(self, run):
        """With every node present the coordinator gets exactly Σ x mod 2^32."""
        assert np.array_equal(run.total, plain_sum(run.vectors, NAMES, np.uint32))

    @pytest.mark.parametrize("bits", [32, 64])
    def test_float_updates_fedavg_within_quantisation_error(self, keys, bits):
        """Clipped, weighted, quantised float updates: decoded mean = float weighted mean within the bound."""
        names = NAMES[:5]
        rng = np.random.default_rng(5)
        updates = {n: rng.normal(scale=0.05, size=40) for n in names}
        weights = {n: float(rng.integers(50, 300)) for n in names}
        scale = 2.0**22 if bits == 32 else 2.0**40
        enc = dict(max_weight=300.0, clip=0.1, scale=scale, bits=bits, n_parties=len(names))
        vectors = {n: encode_update(updates[n], weight=weights[n], **enc) for n in names}
        cfg = make_cfg(names=names, k=4, threshold=3, max_dropouts=1, bits=bits, length=41)
        total, _ = secagg.run_round_in_memory(vectors, cfg=cfg, signing_keys=keys)
        mean, total_weight = decode_update(total, max_weight=300.0, scale=scale, bits=bits)
        w = np.array([weights[n] for n in names])
        expected = sum(weights[n] * np.clip(updates[n], -0.1, 0.1) for n in names) / w.sum()
        rel_w = w.sum() / 300.0
        bound = len(names) * 0.5 / scale * (1 + np.abs(expected)) / (rel_w - len(names) * 0.5 / scale)
        assert np.all(np.abs(mean - expected) <= bound + 1e-15)
        assert abs(total_weight - w.sum()) <= len(names) * 0.5 / scale * 300.0

    @pytest.mark.parametrize("stage", [Stage.ADVERTISE, Stage.SHARE, Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK])
    def test_one_dropout_at_each_stage_completes(self, keys, stage):
        """A node missing from the replies of any stage: the sum of the nodes whose input counts."""
        cfg = make_cfg()
        vectors = random_vectors(cfg, seed=3)
        total, coord = secagg.run_round_in_memory(vectors, cfg=cfg, signing_keys=keys, drop_at={stage: ["charlie"]})
        late = stage in (Stage.CONSISTENCY, Stage.UNMASK)
        expected_in = [n for n in NAMES if n != "charlie"] if not late else list(NAMES)
        assert list(coord.survivors) == expected_in
        assert ("charlie" in coord.signers) == (stage == Stage.UNMASK)
        assert list(coord.dropped) == (["charlie"] if stage == Stage.MASKED_INPUT else [])
        assert np.array_equal(total, plain_sum(vectors, expected_in, np.uint32))

    def test_dropouts_spread_over_stages_within_threshold(self):
        """With k = 6, t = 4 (two tolerated), dropouts at two different stages still complete."""
        cfg8 = make_cfg(names=[f"n{i}" for i in range(8)], k=6, threshold=4, max_dropouts=2)
        keys8 = {n: Ed25519PrivateKey.generate() for n in cfg8.participants}
        vectors = random_vectors(cfg8, seed=4)
        drop = {Stage.ADVERTISE: ["n1"], Stage.MASKED_INPUT: ["n5"]}
        total, coord = secagg.run_round_in_memory(vectors, cfg=cfg8, signing_keys=keys8, drop_at=drop)
        alive = [n for n in cfg8.participants if n not in ("n1", "n5")]
        assert coord.dropped == ("n5",)
        assert np.array_equal(total, plain_sum(vectors, alive, np.uint32))

    @pytest.mark.parametrize("stage", [Stage.ADVERTISE, Stage.SHARE, Stage.MASKED_INPUT, Stage.CONSISTENCY, Stage.UNMASK])
    def test_below_threshold_aborts(self, keys, stage):
        """Two dropouts in one neighbourhood (t = 3 of k = 4) abort with 'fewer than t', at any stage."""
        cfg = make_cfg()
        g = secagg.neighbour_graph(cfg)
        victim = NAMES[0]
        two = list(g[victim][:2])
        with pytest.raises(ProtocolError, match="fewer than t"):
            secagg.run_round_in_memory(random_vectors(cfg), cfg=cfg, signing_keys=keys, drop_at={stage: two})

    def test_fresh_keys_and_seeds_every_round(self, keys, roster):
        """Two rounds never share an X25519 key; states and messages survive the wire."""
        cfg = make_cfg()
        a = secagg.node_advertise(cfg, secagg.NodeIdentity(name="alpha", signing_key=keys["alpha"]))[1]
        b = secagg.node_advertise(replace(cfg, round=4), secagg.NodeIdentity(name="alpha", signing_key=keys["alpha"]))[1]
        assert {a.c_pk, a.s_pk}.isdisjoint({b.c_pk, b.s_pk})


# --------------------------------------------------------------------------- what the coordinator learns


class TestCoordinatorView:
    def test_no_single_update_recoverable_from_the_transcript(self, keys):
        """From everything it received the coordinator never holds t shares of both secrets of one node.

        Survivors' vectors stay masked by pairwise masks even after their self-masks are removed;
        the dropped node's key is revealed, but its masked vector never arrived.
        """
        cfg = make_cfg()
        vectors = random_vectors(cfg, seed=9)
        transcript: list = []
        secagg.run_round_in_memory(vectors, cfg=cfg, signing_keys=keys,
                                   drop_at={Stage.MASKED_INPUT: ["delta"]}, transcript=transcript)
        masked = {n: m.vector for s, n, m in transcript if s == Stage.MASKED_INPUT}
        reveals = [m for s, _, m in transcript if s == Stage.UNMASK]
        b_pts = {n: {} for n in NAMES}
        s_pts = {n: {} for n in NAMES}
        for msg in reveals:
            x = cfg.x_of(msg.node)
            for owner, raw in msg.b_shares.items():
                b_pts[owner][x] = share_from_bytes(raw)
            for owner, raw in msg.s_shares.items():
                s_pts[owner][x] = share_from_bytes(raw)
        t = cfg.threshold
        for n in NAMES:
            assert not (len(b_pts[n]) >= t and len(s_pts[n]) >= t), n
        assert "delta" not in masked and len(s_pts["delta"]) >= t and not b_pts["delta"]
        for u in masked:
            assert np.count_nonzero(masked[u] - vectors[u]) > 0.99 * cfg.length
            seed = combine_shares(b_pts[u], threshold=t, length=32)
            without_self_mask = masked[u] - expand_mask(seed, cfg.length, dtype=cfg.dtype)
            assert np.count_nonzero(without_self_mask - vectors[u]) > 0.99 * cfg.length
            with pytest.raises(CryptoError, match="fewer than t"):
                combine_shares(s_pts[u], threshold=t, length=32)

    def test_lying_about_dropouts_gains_nothing(self, run):
        """Telling some neighbours 'u dropped' and others 'u survived' is refused by every lied-to node.

        The survivor and dropped lists must match the signed survivor set; a node told 'u dropped'
        while the signed set holds u reveals nothing. Those told the truth reveal only b-shares.
        """
        cfg, t = run.cfg, run.cfg.threshold
        g = secagg.neighbour_graph(cfg)
        u = NAMES[2]
        nbrs = list(g[u])
        for n_lied in range(len(nbrs) + 1):
            told_dropped = set(nbrs[:n_lied])
            b_count = s_count = 0
            for w in nbrs:
                honest = run.requests[w]
                if w in told_dropped:
                    req = replace(honest, survivors=tuple(v for v in honest.survivors if v != u), dropped=(u,))
                    with pytest.raises(ProtocolError, match="do not match the signed survivor set"):
                        secagg.node_unmask(run.nodes2c[w], req, run.roster)
                    continue
                _, reply = secagg.node_unmask(run.nodes2c[w], honest, run.roster)
                b_count += u in reply.b_shares
                s_count += u in reply.s_shares
            assert s_count == 0 and b_count == len(nbrs) - n_lied
            assert not (b_count >= t and s_count >= t)

    def test_node_refuses_both_share_kinds_of_one_peer(self, run):
        """A request naming a peer as survivor and dropped is refused; nothing is revealed."""
        w = NAMES[0]
        req = run.requests[w]
        both = replace(req, dropped=(req.survivors[0],))
        with pytest.raises(ProtocolError, match="both share kinds"):
            secagg.node_unmask(run.nodes2c[w], both, run.roster)

    def test_secrets_are_erased_and_not_in_repr(self, run):
        """Private keys and the seed leave the node state after masking; repr shows no key material."""
        st = run.nodes2[NAMES[0]]
        assert st.c_sk is None and st.s_sk is None and st.seed is None
        assert "c_sk" not in st.to_wire() and "seed" not in st.to_wire()
        before = run.nodes1[NAMES[0]]
        assert before.s_sk.hex() not in repr(before) and "held" not in repr(run.nodes2[NAMES[0]])
        assert run.nodes3[NAMES[0]].held == {}


# --------------------------------------------------------------------------- hostile input


class TestHostileInput:
    def test_wrong_lengths(self, run):
        """Keys, ciphertexts, vectors and shares of the wrong length are refused with a clear error."""
        ad = run.ads["alpha"]
        with pytest.raises(ProtocolError, match="`c_pk` must be 32 bytes, got 31"):
            replace(ad, c_pk=ad.c_pk[:31])
        wire = run.masked["alpha"].to_wire()
        with pytest.raises(ProtocolError, match="`vector` must be 1028 bytes"):
            secagg.MaskedInput.from_wire(wire | {"vector": wire["vector"][:-4]})
        short = replace(run.masked["alpha"], vector=run.masked["alpha"].vector[:-1])
        with pytest.raises(ProtocolError, match="length 257"):
            secagg.coord_collect_masked(run.coord2, run.masked | {"alpha": short})
        bundle = run.bundles["alpha"]
        v = next(iter(bundle.ciphertexts))
        bad = replace(bundle, ciphertexts=dict(bundle.ciphertexts) | {v: bundle.ciphertexts[v][:-1]})
        with pytest.raises(ProtocolError, match="must be 160 bytes"):
            secagg.coord_route_shares(run.coord1, run.bundles | {"alpha": bad})
        rev = run.revealed["alpha"]
        owner = next(iter(rev.b_shares))
        with pytest.raises(CryptoError, match="66 bytes"):
            secagg.coord_unmask(run.coord3, run.revealed | {"alpha": replace(rev, b_shares={owner: b"\x00" * 65})})
        with pytest.raises(UpdateError, match="uint32 of shape"):
            secagg.node_masked_input(run.nodes1["alpha"], run.routed["alpha"], run.vectors["alpha"].astype(np.uint64))

    def test_duplicated_keys(self, run, keys):
        """The same public key for two parties, or for both keys of one party, is refused."""
        def signed(ad, name):
            unsigned = replace(ad, signature=b"")
            return replace(unsigned, signature=keys[name].sign(unsigned.signed_bytes()))

        copy = signed(replace(run.ads["bravo"], c_pk=run.ads["alpha"].c_pk), "bravo")
        with pytest.raises(ProtocolError, match="duplicated key: 'alpha' and 'bravo'"):
            secagg.coord_collect_advertisements(run.coord0, run.ads | {"bravo": copy})
        with pytest.raises(ProtocolError, match="duplicated key"):
            secagg.node_share(run.nodes0["charlie"], run.ads | {"bravo": copy}, run.roster)
        same = signed(replace(run.ads["bravo"], s_pk=run.ads["bravo"].c_pk), "bravo")
        with pytest.raises(ProtocolError, match="for both keys"):
            secagg.coord_collect_advertisements(run.coord0, run.ads | {"bravo": same})

    def test_replayed_advertisement_from_another_round(self, run, keys):
        """An advertisement signed for round 2 is refused in round 3; editing its round breaks the signature."""
        old_cfg = replace(run.cfg, round=2)
        _, old = secagg.node_advertise(old_cfg, secagg.NodeIdentity(name="bravo", signing_key=keys["bravo"]))
        with pytest.raises(ProtocolError, match="round 2.*replayed"):
            secagg.node_share(run.nodes0["alpha"], run.ads | {"bravo": old}, run.roster)
        with pytest.raises(CryptoError, match="does not verify"):
            secagg.node_share(run.nodes0["alpha"], run.ads | {"bravo": replace(old, round=3)}, run.roster)
        other_run = replace(run.ads["bravo"], run_id="run-0")
        with pytest.raises(ProtocolError, match="run 'run-0'"):
            secagg.coord_collect_advertisements(run.coord0, run.ads | {"bravo": other_run})

    def test_unsigned_and_mis_signed_advertisements(self, run, keys):
        """No signature, another party's signature, or a key the coordinator substituted: CryptoError."""
        ad = run.ads["bravo"]
        with pytest.raises(CryptoError, match="unsigned"):
            secagg.node_share(run.nodes0["alpha"], run.ads | {"bravo": replace(ad, signature=b"")}, run.roster)
        forged = replace(ad, signature=keys["echo"].sign(ad.signed_bytes()))
        with pytest.raises(CryptoError, match="does not verify against its roster key"):
            secagg.node_share(run.nodes0["alpha"], run.ads | {"bravo": forged}, run.roster)
        mallory = Ed25519PrivateKey.generate()
        swapped = replace(ad, c_pk=run.ads["echo"].s_pk[::-1])
        swapped = replace(swapped, signature=mallory.sign(swapped.signed_bytes()))
        with pytest.raises(CryptoError, match="roster key"):
            secagg.node_share(run.nodes0["alpha"], run.ads | {"bravo": swapped}, run.roster)
        with pytest.raises(ProtocolError, match="unknown node 'mallory'"):
            secagg.node_share(run.nodes0["alpha"], run.ads | {"mallory": replace(ad, node="mallory")}, run.roster)
        mine = replace(run.ads["alpha"], s_pk=run.ads["echo"].s_pk[::-1])
        mine = replace(mine, signature=keys["alpha"].sign(mine.signed_bytes()))
        with pytest.raises(ProtocolError, match="not the one it sent"):
            secagg.node_share(run.nodes0["alpha"], run.ads | {"alpha": mine}, run.roster)

    def test_shares_for_unknown_nodes(self, run):
        """Shares addressed to a non-neighbour, from a non-neighbour, or revealed unasked are refused."""
        g = secagg.neighbour_graph(run.cfg)
        u = "alpha"
        stranger = next(n for n in NAMES if n != u and n not in g[u])
        some = next(iter(run.bundles[u].ciphertexts.values()))
        extra = replace(run.bundles[u], ciphertexts=dict(run.bundles[u].ciphertexts) | {stranger: some})
        with pytest.raises(ProtocolError, match=f"unknown or non-neighbour nodes \\['{stranger}'\\]"):
            secagg.coord_route_shares(run.coord1, run.bundles | {u: extra})
        ghost = replace(run.bundles[u], ciphertexts=dict(run.bundles[u].ciphertexts) | {"mallory": some})
        with pytest.raises(ProtocolError, match="mallory"):
            secagg.coord_route_shares(run.coord1, run.bundles | {u: ghost})
        routed = run.routed[u]
        from_stranger = replace(routed, ciphertexts=dict(routed.ciphertexts) | {stranger: some})
        with pytest.raises(ProtocolError, match="not a neighbour"):
            secagg.node_masked_input(run.nodes1[u], from_stranger, run.vectors[u])
        rev = run.revealed[u]
        unasked = replace(rev, b_shares=dict(rev.b_shares) | {stranger: next(iter(rev.b_shares.values()))})
        with pytest.raises(ProtocolError, match="not asked for"):
            secagg.coord_unmask(run.coord3, run.revealed | {u: unasked})
        both = replace(rev, s_shares={next(iter(rev.b_shares)): next(iter(rev.b_shares.values()))})
        with pytest.raises(ProtocolError, match="not asked for"):
            secagg.coord_unmask(run.coord3, run.revealed | {u: both})

    def test_tampered_share_ciphertext(self, run):
        """A flipped bit in a routed share fails AES-GCM authentication at the recipient."""
        routed = run.routed["alpha"]
        v, ct = next(iter(routed.ciphertexts.items()))
        bad = replace(routed, ciphertexts=dict(routed.ciphertexts) | {v: ct[:-1] + bytes([ct[-1] ^ 1])})
        with pytest.raises(CryptoError, match="authentication failed"):
            secagg.node_masked_input(run.nodes1["alpha"], bad, run.vectors["alpha"])
        swapped = replace(routed, ciphertexts={v: run.routed["bravo"].ciphertexts.get(v, ct) for v in routed.ciphertexts})
        if swapped.ciphertexts != routed.ciphertexts:
            with pytest.raises(CryptoError):
                secagg.node_masked_input(run.nodes1["alpha"], swapped, run.vectors["alpha"])

    def test_altered_revealed_share_is_detected(self, keys, roster):
        """An altered share of a dropped node's key gives a key that does not match its advertisement."""
        cfg = make_cfg(names=NAMES[:5])
        r = staged(cfg, keys, {n: roster[n] for n in cfg.participants})
        gone = "bravo"
        coord3c, checks = secagg.coord_collect_masked(r.coord2, {n: m for n, m in r.masked.items() if n != gone})
        nodes, sigs = {}, {}
        for n in checks:
            nodes[n], sigs[n] = secagg.node_consistency(r.nodes2[n], checks[n], secagg.NodeIdentity(name=n, signing_key=keys[n]))
        coord3, requests = secagg.coord_collect_signatures(coord3c, sigs)
        replies = {n: secagg.node_unmask(nodes[n], requests[n], r.roster)[1] for n in requests}
        w = next(n for n in replies if gone in replies[n].s_shares)
        raw = replies[w].s_shares[gone]
        replies[w] = replace(replies[w], s_shares={gone: raw[:-1] + bytes([raw[-1] ^ 1])})
        with pytest.raises(CryptoError):
            secagg.coord_unmask(coord3, replies)

    def test_wrong_stage_is_refused(self, run):
        """Out-of-order calls and messages of another kind are refused; state never advances twice."""
        with pytest.raises(ProtocolError, match="out of order"):
            secagg.node_masked_input(run.nodes0["alpha"], run.routed["alpha"], run.vectors["alpha"])
        with pytest.raises(ProtocolError, match="out of order"):
            secagg.node_unmask(run.nodes3["alpha"], run.requests["alpha"], run.roster)  # a second unmask request
        with pytest.raises(ProtocolError, match="at stage 'consistency'"):
            secagg.node_unmask(run.nodes2["alpha"], run.requests["alpha"], run.roster)  # the consistency stage skipped
        with pytest.raises(ProtocolError, match="out of order"):
            secagg.node_share(run.nodes1["alpha"], run.ads, run.roster)
        with pytest.raises(ProtocolError, match="out of order"):
            secagg.coord_unmask(run.coord2, run.revealed)
        with pytest.raises(ProtocolError, match="out of order"):
            secagg.coord_route_shares(run.coord3, run.bundles)
        with pytest.raises(ProtocolError, match="expected a 'share-bundle' message, got 'masked-input'"):
            secagg.ShareBundle.from_wire(run.masked["alpha"].to_wire())
        with pytest.raises(ProtocolError, match="field `sender` must be str"):
            secagg.ShareBundle.from_wire(run.bundles["alpha"].to_wire() | {"sender": 7})
        with pytest.raises(ProtocolError, match="not a share bundle|is not a ShareBundle"):
            secagg.coord_route_shares(run.coord1, run.bundles | {"alpha": run.masked["alpha"]})
        with pytest.raises(ProtocolError, match="did not complete the share stage"):
            secagg.coord_collect_masked(replace(run.coord2, shared=run.coord2.shared[1:]), run.masked)

    def test_unmask_refusals(self, run):
        """A node refuses: being listed as dropped, a non-neighbour, a peer it holds no shares of, lists off the signed set."""
        g = secagg.neighbour_graph(run.cfg)
        u = "alpha"
        stranger = next(n for n in NAMES if n != u and n not in g[u])
        req = run.requests[u]
        cases = {
            "listed as dropped": replace(req, dropped=(u,)),
            "not a neighbour": replace(req, survivors=(*req.survivors, stranger)),
            "do not match the signed survivor set": replace(req, survivors=req.survivors[:2]),
        }
        for message, bad in cases.items():
            with pytest.raises(ProtocolError, match=message):
                secagg.node_unmask(run.nodes2c[u], bad, run.roster)
        partial = replace(run.nodes2c[u], held={k: v for k, v in run.nodes2c[u].held.items() if k != req.survivors[0]})
        with pytest.raises(ProtocolError, match="holds no shares"):
            secagg.node_unmask(partial, req, run.roster)
        with pytest.raises(ProtocolError, match="delivered to"):
            secagg.node_unmask(run.nodes2c[u], replace(req, recipient="bravo"), run.roster)

    def test_error_leaves_the_round_consistent(self, run):
        """After a refused reply the coordinator's state is untouched: the same stage still completes."""
        with pytest.raises(ProtocolError):
            secagg.coord_collect_masked(run.coord2, run.masked | {"mallory": run.masked["alpha"]})
        coord3c, _ = secagg.coord_collect_masked(run.coord2, run.masked)
        coord3, _ = secagg.coord_collect_signatures(coord3c, run.signed)
        _, total = secagg.coord_unmask(coord3, run.revealed)
        assert np.array_equal(total, run.total)


class TestWire:
    def test_states_and_messages_round_trip(self, run):
        """Every state and message survives to_wire/from_wire with only str, int, bytes and lists."""
        def flat(w):
            return all(isinstance(v, (str, int, bytes)) or (isinstance(v, list) and all(isinstance(x, (str, int, bytes)) for x in v))
                       for v in w.values())

        objs = [run.ads["alpha"], run.bundles["alpha"], run.routed["alpha"], run.checks["alpha"], run.signed["alpha"],
                run.requests["alpha"], run.revealed["alpha"], run.nodes0["alpha"], run.nodes1["alpha"], run.nodes2["alpha"],
                run.nodes2c["alpha"], run.nodes3["alpha"], run.coord0, run.coord1, run.coord2, run.coord3c, run.coord3, run.coord4]
        for obj in objs:
            w = obj.to_wire()
            assert flat(w), type(obj).__name__
            back = type(obj).from_wire(w)
            assert back.to_wire() == w
        m = run.masked["alpha"]
        assert np.array_equal(secagg.MaskedInput.from_wire(m.to_wire()).vector, m.vector)
        ads = secagg.advertisements_from_wire(secagg.advertisements_to_wire(run.to_nodes["alpha"]))
        assert ads == run.to_nodes["alpha"]


# --------------------------------------------------------------------------- consistency stage


class TestConsistency:
    def test_quorum_is_t_and_a_strict_majority(self):
        """max(t, n // 2 + 1): with n = 6, t = 3 it is 4; with n = 5, t = 3 it is 3."""
        assert secagg.consistency_quorum(make_cfg()) == 4
        assert secagg.consistency_quorum(make_cfg(names=NAMES[:5])) == 3

    def test_signature_binds_run_round_participants_and_set(self, run, keys):
        """A signature verifies only on the exact (run, round, participants, U3) it was made for."""
        sig = run.signed["alpha"].signature
        key = run.roster["alpha"]
        key.verify(sig, secagg.survivor_set_bytes(run.cfg, NAMES))
        for other in (secagg.survivor_set_bytes(run.cfg, NAMES[1:]), secagg.survivor_set_bytes(replace(run.cfg, round=4), NAMES),
                      secagg.survivor_set_bytes(replace(run.cfg, run_id="run-2"), NAMES)):
            with pytest.raises(Exception):
                key.verify(sig, other)

    def test_forged_signatures_are_refused(self, run, keys):
        """Another party's key, a signature on another set or round, a copied signature: CryptoError, nothing revealed."""
        u, req = "alpha", run.requests["alpha"]
        msg = secagg.survivor_set_bytes(run.cfg, NAMES)
        other_round = keys["bravo"].sign(secagg.survivor_set_bytes(replace(run.cfg, round=2), NAMES))
        cases = {
            "by another key": keys["echo"].sign(msg),
            "on another set": keys["bravo"].sign(secagg.survivor_set_bytes(run.cfg, NAMES[:5])),
            "from another round": other_round,
            "copied from another signer": req.signatures["charlie"],
        }
        for why, sig in cases.items():
            bad = replace(req, signatures=dict(req.signatures) | {"bravo": sig})
            with pytest.raises(CryptoError, match="'bravo' does not verify"):
                secagg.node_unmask(run.nodes2c[u], bad, run.roster)
            with pytest.raises(CryptoError, match="does not verify"):
                secagg.coord_collect_signatures(run.coord3c, run.signed | {"bravo": replace(run.signed["bravo"], signature=sig)})
        with pytest.raises(CryptoError, match="64 bytes"):
            secagg.node_unmask(run.nodes2c[u], replace(req, signatures=dict(req.signatures) | {"bravo": b"\x00" * 63}), run.roster)

    def test_duplicated_and_foreign_signers_are_refused(self, run, keys):
        """A signer listed twice, a non-participant, or a participant outside the signed set is refused."""
        u, req = "alpha", run.requests["alpha"]
        wire = req.to_wire()
        wire["signers"] = [*wire["signers"][:-1], wire["signers"][0]]
        with pytest.raises(ProtocolError, match="repeats a name"):
            secagg.UnmaskRequest.from_wire(wire)
        mallory = Ed25519PrivateKey.generate()
        foreign = replace(req, signatures=dict(req.signatures) | {"mallory": mallory.sign(secagg.survivor_set_bytes(run.cfg, NAMES))})
        with pytest.raises(ProtocolError, match="'mallory', which is not a participant"):
            secagg.node_unmask(run.nodes2c[u], foreign, run.roster)
        smaller = tuple(n for n in NAMES if n != "foxtrot")
        st = replace(run.nodes2c[u], signed=smaller)
        sigs = {n: keys[n].sign(secagg.survivor_set_bytes(run.cfg, smaller)) for n in NAMES}
        outside = replace(req, signed_survivors=smaller, signatures=sigs)
        with pytest.raises(ProtocolError, match="'foxtrot' signed a survivor set it is not in"):
            secagg.node_unmask(st, outside, run.roster)

    def test_too_few_signatures_and_another_set_are_refused(self, run):
        """Below the quorum, or a request for a set other than the one the node signed: refused."""
        u, req = "alpha", run.requests["alpha"]
        few = replace(req, signatures={n: s for n, s in list(req.signatures.items())[:3]})
        with pytest.raises(CryptoError, match="3 valid signatures on the survivor set, fewer than the quorum"):
            secagg.node_unmask(run.nodes2c[u], few, run.roster)
        with pytest.raises(ProtocolError, match="not the set 'alpha' signed|not the set"):
            secagg.node_unmask(run.nodes2c[u], replace(req, signed_survivors=NAMES[:5]), run.roster)

    def test_node_refuses_to_sign_a_set_without_itself_or_with_strangers(self, run, keys):
        """The survivor set must hold the node itself, only participants, and t of its neighbours."""
        me = secagg.NodeIdentity(name="alpha", signing_key=keys["alpha"])
        req = run.checks["alpha"]
        with pytest.raises(ProtocolError, match="not in the survivor set"):
            secagg.node_consistency(run.nodes2["alpha"], replace(req, survivors=NAMES[1:]), me)
        with pytest.raises(ProtocolError, match="non-participants"):
            secagg.node_consistency(run.nodes2["alpha"], replace(req, survivors=(*NAMES, "mallory")), me)
        with pytest.raises(ProtocolError, match="fewer than t"):
            secagg.node_consistency(run.nodes2["alpha"], replace(req, survivors=NAMES[:2]), me)
        with pytest.raises(ProtocolError, match="delivered to"):
            secagg.node_consistency(run.nodes2["alpha"], replace(req, recipient="bravo"), me)

    def test_coordinator_aborts_below_the_quorum(self, run):
        """With 3 of 6 signatures (quorum 4) the round aborts before any unmask request exists."""
        with pytest.raises(ProtocolError, match="fewer than t = 3 \\(quorum 4\\)"):
            secagg.coord_collect_signatures(run.coord3c, {n: run.signed[n] for n in NAMES[:3]})

    def test_dropouts_at_every_stage_within_the_threshold(self):
        """n = 10, t = 5, four tolerated: one dropout at each of four stages, the sum of the right nodes."""
        cfg10 = make_cfg(names=[f"n{i}" for i in range(10)], k=9, threshold=5, max_dropouts=4)
        keys10 = {n: Ed25519PrivateKey.generate() for n in cfg10.participants}
        vectors = random_vectors(cfg10, seed=11)
        drop = {Stage.ADVERTISE: ["n1"], Stage.MASKED_INPUT: ["n3"], Stage.CONSISTENCY: ["n5"], Stage.UNMASK: ["n7"]}
        total, coord = secagg.run_round_in_memory(vectors, cfg=cfg10, signing_keys=keys10, drop_at=drop)
        summed = [n for n in cfg10.participants if n not in ("n1", "n3")]
        assert coord.survivors == tuple(summed) and coord.dropped == ("n3",)
        assert "n5" not in coord.signers and "n7" in coord.signers
        assert np.array_equal(total, plain_sum(vectors, summed, np.uint32))
