"""Encrypted scoring benchmark: plain and CKKS-encrypted scoring of the Heart test split, side by side.

Model: the logistic regression of ``specs/heart-disease.toml`` (trained here with
``fedcollab.run``, 20 rounds, no DP, unless ``--model RUN_DIR`` names an existing run folder).
Rows: the pooled test split of the four hospitals (254 rows, 13 encoded features).

Sides, in one process, each repeated ``--repeats`` times (median reported):

* ``plain``: ``x @ w + b`` in numpy (the holder would see every row);
* ``encrypted``: the three steps of ``fedcollab score`` in memory: the querier's
  ``build_request`` (fresh CKKS key, column packing, serialisation, Ed25519 signature), the
  holder's ``answer_request`` (container checks, signature check against its roster, replay and
  budget checks against a ledger on disk, ciphertext checks, masked product, flooding, the
  ledger entry) and the querier's ``decrypt_response``.

``scoring_ms_per_row``: encrypted wall time of the three steps / rows (key generation included).
``scoring_bytes_per_row``: (request + response bytes) / rows, the public context included.
``scoring_acc_delta``: |encrypted accuracy - plain accuracy| at threshold 0.5.
The same figures for a full batch (the test rows tiled to the 4096 slots of one ciphertext)
are printed before the JSON line.

Run:  .venv/bin/python benchmarks/scoring.py [--model RUN_DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import ROOT  # noqa: E402 - sets Flower's offline environment first

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from rich.console import Console  # noqa: E402

from fedcollab.data import load_partner_data  # noqa: E402
from fedcollab.privacy.accounting import PartyLedger, public_key_hex  # noqa: E402
from fedcollab.privacy.mechanisms import fresh_generator  # noqa: E402
from fedcollab.protocols.scoring import answer_request, build_request, decrypt_response, load_linear_model
from fedcollab.spec import NodePolicy, Roster, ScoringPolicy, load_spec  # noqa: E402

SPEC = ROOT / "specs" / "heart-disease.toml"


def _encrypted(x: np.ndarray, model, tmp: Path) -> dict:
    holder_key, querier_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    ledger = PartyLedger(tmp / f"ledger-{time.perf_counter_ns()}.jsonl", party="holder", key=holder_key)
    policy = NodePolicy(partner="holder", scoring=ScoringPolicy(max_rows_per_querier={"bench": 2 * len(x)}))
    roster = Roster.model_validate({"parties": {"holder": {"signing_key": public_key_hex(holder_key)},
                                                "bench": {"signing_key": public_key_hex(querier_key)}}})
    t0 = time.perf_counter()
    pending = build_request(x, querier="bench", key=querier_key, model_id=model.model_id)
    t1 = time.perf_counter()
    ans = answer_request(pending.request, model=model, policy=policy, ledger=ledger, roster=roster, generator=fresh_generator())
    t2 = time.perf_counter()
    scores = decrypt_response(ans.response, pending.state)
    t3 = time.perf_counter()
    return {"logits": scores.logits, "encrypt": t1 - t0, "apply": t2 - t1, "decrypt": t3 - t2, "total": t3 - t0,
            "request_bytes": len(pending.request), "response_bytes": len(ans.response)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="run folder with model.safetensors and summary.json")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    out = Console(file=sys.stdout, width=160)
    err = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="fedcollab-bench-score-") as td:
        tmp = Path(td)
        run_dir = args.model
        if run_dir is None:
            import fedcollab

            err.print("training the Heart logistic regression (fedcollab.run, 20 rounds)...")
            fedcollab.run(SPEC, out=tmp / "run", spec_path=SPEC, progress=False)
            run_dir = tmp / "run"
        model = load_linear_model(run_dir)
        spec = load_spec(SPEC)
        parts = [load_partner_data(spec, p.name) for p in spec.partners]
        x = np.concatenate([p.x_test for p in parts])
        y = np.concatenate([p.y_test for p in parts])
        n = len(x)

        t_plain = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plain = model.logits(x)
            t_plain.append(time.perf_counter() - t0)
        acc_plain = float(((plain > 0) == y).mean())

        runs = [_encrypted(x, model, tmp) for _ in range(args.repeats)]
        enc = runs[-1]
        acc_enc = float(((enc["logits"] > 0) == y).mean())
        med = {k: statistics.median(r[k] for r in runs) for k in ("encrypt", "apply", "decrypt", "total")}
        bytes_row = (enc["request_bytes"] + enc["response_bytes"]) / n

        big = np.resize(x, (4096, x.shape[1]))
        full = [_encrypted(big, model, tmp) for _ in range(max(1, args.repeats // 2))]
        full_ms = 1e3 * statistics.median(r["total"] for r in full) / len(big)
        full_bytes = (full[-1]["request_bytes"] + full[-1]["response_bytes"]) / len(big)

    out.print(f"Heart pooled test split: {n} rows x {x.shape[1]} features, model {model.model_id[:12]}, median of {args.repeats}")
    out.print(f"  plain      accuracy {acc_plain:.4f}   {1e3 * statistics.median(t_plain) / n:.5f} ms/row")
    out.print(f"  encrypted  accuracy {acc_enc:.4f}   {1e3 * med['total'] / n:.3f} ms/row "
              f"(encrypt {1e3 * med['encrypt'] / n:.3f}, apply {1e3 * med['apply'] / n:.3f}, decrypt {1e3 * med['decrypt'] / n:.3f}); "
              f"{bytes_row:,.0f} bytes/row (request {enc['request_bytes']:,}, response {enc['response_bytes']:,})")
    out.print(f"  max |logit error| {np.abs(enc['logits'] - plain).max():.2e} (flooding std 2^-10 = {2**-10:.2e})")
    out.print(f"  full batch (4096 rows, one ciphertext per feature): {full_ms:.4f} ms/row, {full_bytes:,.0f} bytes/row")
    out.file.flush()
    payload = {"scoring_ms_per_row": round(1e3 * med["total"] / n, 4), "scoring_bytes_per_row": round(bytes_row, 1),
               "scoring_acc_delta": round(abs(acc_enc - acc_plain), 4)}
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
