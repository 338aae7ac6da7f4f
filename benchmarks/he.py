"""HE aggregation benchmark: a plain numpy weighted sum, fedcollab's HE aggregation and a FLARE-style baseline, side by side.

Ten nodes, two model sizes, each a named model whose layers the FLARE-style side encrypts one
ciphertext per layer (the others see the same parameters as one flat vector):

* "100k": MLP 784-128-10 (MNIST), 101,770 parameters;
* "1m":   MLP 784-1024-256-10, 1,068,810 parameters.

Sides (one process, same random float32 models, weights n_k / Σ n):

* ``numpy``: ``w @ X``, the weighted sum of ten float32 vectors (the floor);
* ``fedcollab-he``: the real fedcollab code path: a node pre-weights and fixed-point encodes its
  whole model (``encode_weighted``, clip 8, scale 2^19), encrypts it as one flat vector filling
  every slot (TenSEAL BFV, N = 4096, [40, 60], t = 16,760,833, symmetric) and signs the upload
  (``node._he.make_upload``); the coordinator verifies the ten signatures, loads and adds the
  ciphertexts and signs the aggregate (``coordinator._he.verify_upload``, ``aggregate_uploads``);
  a node checks the signature, decrypts and decodes (``open_aggregate``, ``decode_weighted``);
* ``flare-style``: NVIDIA FLARE's HE recipe: TenSEAL CKKS, N = 8192, coefficient sizes
  [60, 40, 40], global scale 2^40, symmetric; nodes pre-weight; one ``ckks_vector`` per layer;
  the server deserialises and adds; one decryption.

Round time = one node's encryption (serialisation included) + the server's sum of ten uploads
(deserialisation, addition, serialisation) + one node's decryption; CPU time
(``time.process_time``, TenSEAL with one thread), median of ``--reps`` repetitions (at least 10).
Bytes: one node's serialised upload over 4 bytes per parameter (float32); the aggregate a node
downloads is reported too.

Run:  .venv/bin/python benchmarks/he.py [--reps 10] [--quick]
Ends with one JSON line: {"he_bytes_ratio_1m", "he_round_vs_numpy_1m", "flare_style_vs_ours_1m"}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

N_NODES = 10
MODELS = {
    "100k": ("MLP 784-128-10", [(784, 128), (128,), (128, 10), (10,)]),
    "1m": ("MLP 784-1024-256-10", [(784, 1024), (1024,), (1024, 256), (256,), (256, 10), (10,)]),
}
GOALS = {"bytes": 3.2, "round": 250.0, "round_stretch": 150.0, "flare": 2.0}
RUN = "bench-he"


@contextlib.contextmanager
def _quiet_stdout():
    """TenSEAL's C++ prints a warning on stdout for every vector larger than one ciphertext: silence fd 1."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)


def _cpu(fn: Any) -> tuple[float, Any]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def bench_numpy(x: np.ndarray, w: np.ndarray, reps: int) -> dict[str, float]:
    times = [_cpu(lambda: w @ x)[0] for _ in range(reps)]
    return {"round": statistics.median(times)}


def bench_ours(layers: list[np.ndarray], w: np.ndarray, reps: int) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcollab.coordinator._he import aggregate_uploads, verify_upload
    from fedcollab.crypto import new_secret_context
    from fedcollab.node._he import make_upload, open_aggregate
    from fedcollab.privacy.accounting import public_key_hex
    from fedcollab.protocols.he import decode_weighted, encode_weighted

    clip, scale = 8.0, float(2**19)
    ctx = new_secret_context()
    pub = ctx.public()
    keys = [Ed25519PrivateKey.generate() for _ in range(N_NODES)]
    roster = [public_key_hex(k) for k in keys]
    coord = Ed25519PrivateKey.generate()
    flat = [np.concatenate([layer[i].ravel() for layer in layers]) for i in range(N_NODES)]
    n_params = flat[0].size
    n_ct = -(-(n_params + 1) // ctx.params.slots)

    def encrypt(i: int) -> dict[str, Any]:
        vec = encode_weighted(flat[i], weight=float(w[i]), clip=clip, scale=scale, max_abs=ctx.params.max_abs)
        return make_upload(ctx, vec, run_id=RUN, round_=1, me=f"n{i}", signing_key=keys[i])

    uploads = [encrypt(i) for i in range(N_NODES)]

    def server() -> dict[str, Any]:
        verified = {f"n{i}": verify_upload({"ct": u["ct"], "round": 1, "signature": u["signature"]}, run_id=RUN, round_=1, partner=f"n{i}",
                                           roster_key=roster[i]) for i, u in enumerate(uploads)}
        agg, rejected = aggregate_uploads(pub, verified, run_id=RUN, round_=1, n_ciphertexts=n_ct, signing_key=coord)
        assert not rejected
        return agg

    def decrypt(agg: dict[str, Any]) -> np.ndarray:
        total = open_aggregate(ctx, agg, run_id=RUN, round_=1, coordinator_key=public_key_hex(coord), length=n_params + 1,
                               my_hash=uploads[0]["hash"], min_partners=N_NODES)
        mean, _ = decode_weighted(total, scale=scale)
        return mean

    enc_t, ser_t, dec_t, rounds = [], [], [], []
    mean = None
    for _ in range(reps):
        te, _ = _cpu(lambda: encrypt(0))
        ts_, agg = _cpu(server)
        td, mean = _cpu(lambda: decrypt(agg))
        enc_t.append(te), ser_t.append(ts_), dec_t.append(td), rounds.append(te + ts_ + td)
    exact = (w.astype(np.float64) @ np.stack(flat).astype(np.float64)) / float(np.rint(w * scale).sum() / scale)
    return {"round": statistics.median(rounds), "encrypt": statistics.median(enc_t), "server": statistics.median(ser_t),
            "decrypt": statistics.median(dec_t), "up_bytes": sum(len(c) for c in uploads[0]["ct"]),
            "down_bytes": sum(len(c) for c in agg["ct"]), "ciphertexts": n_ct, "max_abs_error": float(np.abs(mean - exact).max())}


def bench_flare(layers: list[np.ndarray], w: np.ndarray, reps: int) -> dict[str, Any]:
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40],
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, n_threads=1)
    ctx.global_scale = 2**40
    server_ctx = ts.context_from(ctx.serialize(save_secret_key=False))

    def encrypt(i: int) -> list[bytes]:
        return [ts.ckks_vector(ctx, (float(w[i]) * layer[i]).ravel().tolist()).serialize() for layer in layers]

    with _quiet_stdout():
        uploads = [encrypt(i) for i in range(N_NODES)]

        def server() -> list[bytes]:
            out = []
            for j in range(len(layers)):
                acc = ts.ckks_vector_from(server_ctx, uploads[0][j])
                for i in range(1, N_NODES):
                    acc += ts.ckks_vector_from(server_ctx, uploads[i][j])
                out.append(acc.serialize())
            return out

        def decrypt(agg: list[bytes]) -> np.ndarray:
            return np.concatenate([np.asarray(ts.ckks_vector_from(ctx, c).decrypt()) for c in agg])

        enc_t, ser_t, dec_t, rounds = [], [], [], []
        for _ in range(reps):
            te, _ = _cpu(lambda: encrypt(0))
            ts_, agg = _cpu(server)
            td, mean = _cpu(lambda: decrypt(agg))
            enc_t.append(te), ser_t.append(ts_), dec_t.append(td), rounds.append(te + ts_ + td)
    exact = w.astype(np.float64) @ np.stack([np.concatenate([layer[i].ravel() for layer in layers]) for i in range(N_NODES)]).astype(np.float64)
    return {"round": statistics.median(rounds), "encrypt": statistics.median(enc_t), "server": statistics.median(ser_t),
            "decrypt": statistics.median(dec_t), "up_bytes": sum(len(c) for c in uploads[0]), "down_bytes": sum(len(c) for c in agg),
            "ciphertexts": len(layers), "max_abs_error": float(np.abs(mean - exact).max())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--reps", type=int, default=10, help="repetitions per side (median; at least 10 for the published figures)")
    ap.add_argument("--quick", action="store_true", help="100k only, 3 repetitions (a smoke run)")
    args = ap.parse_args()
    reps = 3 if args.quick else max(10, args.reps)
    sizes = ["100k"] if args.quick else ["100k", "1m"]
    rng = np.random.default_rng(0)
    rows = rng.integers(50, 500, N_NODES).astype(np.float64)
    w = (rows / rows.sum()).astype(np.float32)
    results: dict[str, dict[str, Any]] = {}
    t_all = time.perf_counter()
    for label in sizes:
        name, shapes = MODELS[label]
        layers = [[rng.normal(0, 0.5, size=s).astype(np.float32) for _ in range(N_NODES)] for s in shapes]
        n_params = sum(int(np.prod(s)) for s in shapes)
        x = np.stack([np.concatenate([layer[i].ravel() for layer in layers]) for i in range(N_NODES)])
        r = {"numpy": bench_numpy(x, w, max(reps, 50)), "fedcollab-he": bench_ours(layers, w, reps), "flare-style": bench_flare(layers, w, reps)}
        results[label] = {"model": name, "n_params": n_params, **r}
        f32 = 4 * n_params
        print(f"\n{label}: {name}, {n_params:,} parameters, {N_NODES} nodes; CPU time, median of {reps} repetitions")
        print(f"  {'side':<14}{'round (ms)':>12}{'x numpy':>10}{'encrypt':>10}{'server':>10}{'decrypt':>10}{'up x f32':>10}{'down x f32':>11}{'cts':>6}{'max err':>10}")
        base = r["numpy"]["round"]
        print(f"  {'numpy':<14}{base * 1e3:>12.2f}{1.0:>10.1f}{'':>10}{'':>10}{'':>10}{1.0:>10.2f}{1.0:>11.2f}{'':>6}{0.0:>10.1e}")
        for side in ("fedcollab-he", "flare-style"):
            s = r[side]
            print(f"  {side:<14}{s['round'] * 1e3:>12.1f}{s['round'] / base:>10.1f}{s['encrypt'] * 1e3:>10.1f}{s['server'] * 1e3:>10.1f}"
                  f"{s['decrypt'] * 1e3:>10.1f}{s['up_bytes'] / f32:>10.2f}{s['down_bytes'] / f32:>11.2f}{s['ciphertexts']:>6}{s['max_abs_error']:>10.1e}")
        print(f"  flare-style / fedcollab-he round time: {r['flare-style']['round'] / r['fedcollab-he']['round']:.2f}x")
    big = "1m" if "1m" in results else "100k"
    b = results[big]
    bytes_ratio = b["fedcollab-he"]["up_bytes"] / (4 * b["n_params"])
    round_ratio = b["fedcollab-he"]["round"] / b["numpy"]["round"]
    flare_ratio = b["flare-style"]["round"] / b["fedcollab-he"]["round"]
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(f"\ngoals at {big}: bytes {bytes_ratio:.2f}x <= {GOALS['bytes']} {verdict(bytes_ratio <= GOALS['bytes'])}; "
          f"round {round_ratio:.0f}x numpy <= {GOALS['round']:.0f} {verdict(round_ratio <= GOALS['round'])} "
          f"(stretch {GOALS['round_stretch']:.0f}: {verdict(round_ratio <= GOALS['round_stretch'])}); "
          f"FLARE-style {flare_ratio:.1f}x slower >= {GOALS['flare']} {verdict(flare_ratio >= GOALS['flare'])}")
    print(f"(total {time.perf_counter() - t_all:.0f} s)")
    sys.stdout.flush()
    sys.stdout.write(json.dumps({"he_bytes_ratio_1m": round(bytes_ratio, 4), "he_round_vs_numpy_1m": round(round_ratio, 2),
                                 "flare_style_vs_ours_1m": round(flare_ratio, 3)}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
