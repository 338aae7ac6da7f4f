"""``fedcollab score``: encrypted scoring with another party's linear model (docs/scoring.md).

``encrypt`` (querier) -> request file -> ``apply`` (model holder) -> response file -> ``decrypt``
(querier); ``run`` does all three on one machine for trials and demos.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from fedcollab.cli._errors import fail as _fail
from fedcollab.core import ConfigError, FedcollabError

score_app = typer.Typer(
    help="Encrypted scoring: score your rows with another party's model; it sees neither rows nor scores.",
    no_args_is_help=True,
)
_err = Console(stderr=True)


@contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_err, transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda k: prog.advance(task, k)


def querier_rows(spec_path: Path, *, partners: list[str] | None, split: str, data: Path | None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Encoded rows (unscaled), labels if known, and feature names, from the spec's partners or a CSV."""
    x, y, names, _ = querier_rows_by_partner(spec_path, partners=partners, split=split, data=data)
    return x, y, names


def querier_rows_by_partner(spec_path: Path, *, partners: list[str] | None, split: str,
                            data: Path | None) -> tuple[np.ndarray, np.ndarray | None, list[str], list[str]]:
    """As :func:`querier_rows`, and the source of every row (the partner's name, or the --data file's name)."""
    from fedcollab.data import FeatureEncoder, load_partner_data, read_source, validate_frame
    from fedcollab.spec import SourceSpec, load_spec

    spec = load_spec(spec_path)
    enc = FeatureEncoder(spec.data_schema)
    if data is not None:
        df = read_source(SourceSpec(path=str(data.resolve())), ".")
        typed = validate_frame(df, spec.data_schema, source=str(data))
        schema = spec.data_schema
        keep = ~typed[list(schema.features)].isna().any(axis=1)
        typed = typed[keep].reset_index(drop=True)
        y = None if typed[schema.label.column].isna().any() else enc.labels(typed)
        return enc.features(typed), y, enc.feature_names, [data.name] * len(typed)
    names = partners or [p.name for p in spec.partners]
    xs, ys, who = [], [], []
    for name in names:
        pd_ = load_partner_data(spec, name)
        if split in ("test", "all"):
            xs.append(pd_.x_test)
            ys.append(pd_.y_test)
            who += [name] * len(pd_.y_test)
        if split in ("train", "all"):
            xs.append(pd_.x_train)
            ys.append(pd_.y_train)
            who += [name] * len(pd_.y_train)
    return np.concatenate(xs), np.concatenate(ys), enc.feature_names, who


def _emit(info: dict[str, Any], fmt: str, lines: list[str]) -> None:
    if fmt == "json":
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    out = Console()
    for ln in lines:
        out.print(ln, highlight=False)


SpecOpt = Annotated[Path, typer.Option("--spec", help="The collaboration spec whose schema encodes the rows (public).")]
PartnerOpt = Annotated[list[str] | None, typer.Option("--partner", help="Score this partner's rows of the spec (repeatable; default: every partner).")]
SplitOpt = Annotated[str, typer.Option("--split", help="test, train or all (rows of --partner).")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="A CSV with the schema's columns instead of the spec's partners.")]
FmtOpt = Annotated[str, typer.Option("--format", help="table or json.")]


def _check_split(split: str) -> None:
    if split not in ("test", "train", "all"):
        raise typer.BadParameter(f"must be test, train or all, got {split!r}", param_hint="--split")


PassOpt = Annotated[str | None, typer.Option("--passphrase-env", help="Environment variable holding the signing key's passphrase.")]


def _passphrase(env: str | None) -> bytes | None:
    return (os.environ.get(env, "").encode() or None) if env else None


def querier_identity(node: Path | None, key: Path | None, querier: str | None, passphrase: bytes | None) -> tuple[str, Any]:
    """The querier's name and Ed25519 signing key, from its node folder (``--node``) or a key file (``--key``)."""
    from fedcollab.crypto import load_signing_key
    from fedcollab.node import NodeHome

    if (node is None) == (key is None):
        raise ConfigError("give exactly one of `--node NODE_DIR` (fedcollab node init) or `--key signing_key.pem` to sign the request, "
                          f"got {'both' if node else 'neither'}")
    if node is not None:
        home = NodeHome(node)
        if not home.exists():
            raise ConfigError(f"`--node`: {node} must be a node folder (signing_key.pem, policy.toml; fedcollab node init)")
        name = home.policy().partner
        if querier is not None and querier != name:
            raise ConfigError(f"`--querier` must be the node's partner name {name!r} (its policy.toml), got {querier!r}")
        return name, home.key(passphrase)
    if not querier:
        raise ConfigError("`--querier` is required with `--key` (your name in the model holder's roster)")
    return querier, load_signing_key(key, passphrase=passphrase)  # type: ignore[arg-type]


@score_app.command("encrypt")
def encrypt(
    spec: SpecOpt,
    out: Annotated[Path, typer.Option("--out", help="Request file to send to the model holder.")],
    secret: Annotated[Path, typer.Option("--secret", help="Secret state to keep (CKKS secret key, mode 0600; must not exist).")],
    node: Annotated[Path | None, typer.Option("--node", help="Your node folder (fedcollab node init): its key signs the request, its partner name is the querier.")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Instead of --node: your Ed25519 signing key (PEM, mode 0600); needs --querier.")] = None,
    querier: Annotated[str | None, typer.Option("--querier", help="Your name in the model holder's roster and policy (default: the node's partner).")] = None,
    target_model: Annotated[str | None, typer.Option("--target-model", help="Bind the request to this model SHA-256 (the holder refuses to score it with another).")] = None,
    passphrase_env: PassOpt = None,
    partner: PartnerOpt = None,
    split: SplitOpt = "test",
    data: DataOpt = None,
    fmt: FmtOpt = "table",
) -> None:
    """Querier: encrypt rows under a fresh CKKS key, sign the request with your node key; keep the secret state."""
    from fedcollab.privacy.accounting import key_fingerprint, public_key_hex
    from fedcollab.protocols.scoring import build_request, write_atomic, write_secret

    _check_split(split)
    try:
        name, signing_key = querier_identity(node, key, querier, _passphrase(passphrase_env))
        x, y, names = querier_rows(spec, partners=partner, split=split, data=data)
        if secret.exists():
            raise ConfigError(f"`--secret`: {secret} exists; refusing to overwrite a secret key file")
        t0 = time.perf_counter()
        with _progress(fmt == "table", "encrypting", x.shape[1] * (-(-len(x) // 4096))) as prog:
            pending = build_request(x, querier=name, key=signing_key, model_id=target_model, feature_names=names, labels=y, progress=prog)
        write_secret(secret, pending.state)
        write_atomic(out, pending.request)
    except FedcollabError as exc:
        raise _fail(exc) from None
    fp = key_fingerprint(public_key_hex(signing_key))
    info = {"request": str(out), "secret": str(secret), "request_id": pending.request_id, "querier": name, "signer": fp,
            "model": target_model, "rows": pending.n_rows, "features": int(x.shape[1]), "request_bytes": len(pending.request),
            "seconds": round(time.perf_counter() - t0, 3)}
    _emit(info, fmt, [f"encrypted {pending.n_rows} rows x {x.shape[1]} features -> {escape(str(out))} ({len(pending.request):,} bytes)",
                      f"signed as {escape(name)} (key {fp}); the holder must have this key in its roster",
                      f"keep {escape(str(secret))} (secret key, mode 0600); send only the request"])


@score_app.command("apply")
def apply(
    request: Annotated[Path, typer.Argument(help="Request file from the querier.")],
    model: Annotated[Path, typer.Option("--model", help="Run folder with model.safetensors and summary.json (fedcollab run --out).")],
    node: Annotated[Path, typer.Option("--node", help="Your node folder (policy with [scoring] budgets, signing key, ledger).")],
    out: Annotated[Path, typer.Option("--out", help="Response file to return to the querier.")],
    roster: Annotated[Path, typer.Option("--roster", help="Your own copy of the roster (JSON, obtained out of band): the querier's signing key.")],
    spec: Annotated[Path | None, typer.Option("--spec", help="Check the request's feature names against this spec's schema.")] = None,
    passphrase_env: PassOpt = None,
    fmt: FmtOpt = "table",
) -> None:
    """Model holder: authenticate the querier, check its budget, score under encryption, record it in the ledger."""
    from fedcollab.node import NodeHome
    from fedcollab.privacy.accounting import PartyLedger
    from fedcollab.privacy.mechanisms import fresh_generator
    from fedcollab.protocols.scoring import answer_request, load_linear_model, parse_request, write_atomic
    from fedcollab.spec import load_roster

    try:
        home = NodeHome(node)
        if not home.exists():
            raise ConfigError(f"`--node`: {node} must be a node folder (signing_key.pem, policy.toml; fedcollab node init)")
        passphrase = _passphrase(passphrase_env)
        known = load_roster(roster)
        policy = home.policy()
        ledger = PartyLedger(home.ledger_path, party=policy.partner, key=home.key(passphrase), anchor_path=home.anchor_path)
        lin = load_linear_model(model)
        names = None
        if spec is not None:
            from fedcollab.spec import load_spec

            names = load_spec(spec).data_schema.encoded_features()
        try:
            data = request.read_bytes()
        except OSError as exc:
            raise FedcollabError(f"cannot read {request}: {exc.strerror}") from None
        t0 = time.perf_counter()
        with _progress(fmt == "table", "scoring", len(parse_request(data).header["chunks"])) as prog:
            ans = answer_request(data, model=lin, policy=policy, ledger=ledger, roster=known, generator=fresh_generator(),
                                 expected_features=names, progress=prog)
        write_atomic(out, ans.response)
    except FedcollabError as exc:
        raise _fail(exc) from None
    info = {"response": str(out), "request_id": ans.request_id, "querier": ans.querier, "querier_key": ans.querier_key, "rows": ans.rows,
            "rows_used": ans.rows_before + ans.charged, "budget": ans.budget, "model": lin.model_id,
            "response_bytes": len(ans.response), "seconds": round(time.perf_counter() - t0, 3), "ledger": str(home.ledger_path)}
    _emit(info, fmt, [f"scored {ans.rows} encrypted rows for {escape(ans.querier)} (signature checked, key {ans.querier_key}) -> "
                      f"{escape(str(out))} ({len(ans.response):,} bytes)",
                      f"budget: {ans.rows_before + ans.charged} of {ans.budget} rows used for model {lin.model_id[:12]}; recorded in {escape(str(home.ledger_path))}"])


def _write_scores(path: Path, scores: Any, partners: list[str] | None = None) -> None:
    """Scores as CSV or JSON: row, (partner: whose rows, where known), logit, probability."""
    from fedcollab.protocols.scoring import write_atomic

    probs = scores.probabilities
    if path.suffix.lower() == ".json":
        rows = [{"row": i, **({"partner": partners[i]} if partners else {}), "logit": float(z), "probability": float(p)}
                for i, (z, p) in enumerate(zip(scores.logits, probs, strict=True))]
        write_atomic(path, (json.dumps({"model": scores.model_id, "holder": scores.holder, "scores": rows}) + "\n").encode())
        return
    if partners:
        lines = ["row,partner,logit,probability"] + [f"{i},{partners[i]},{z:.6f},{p:.6f}" for i, (z, p) in enumerate(zip(scores.logits, probs, strict=True))]
    else:
        lines = ["row,logit,probability"] + [f"{i},{z:.6f},{p:.6f}" for i, (z, p) in enumerate(zip(scores.logits, probs, strict=True))]
    write_atomic(path, ("\n".join(lines) + "\n").encode())


@score_app.command("decrypt")
def decrypt(
    response: Annotated[Path, typer.Argument(help="Response file from the model holder.")],
    secret: Annotated[Path, typer.Option("--secret", help="The secret state written by `score encrypt`.")],
    out: Annotated[Path, typer.Option("--out", help="Scores file: .csv (row,logit,probability) or .json.")],
    fmt: FmtOpt = "table",
) -> None:
    """Querier: decrypt the scores, apply the sigmoid, report accuracy when labels are known."""
    from fedcollab.protocols.scoring import decrypt_response

    try:
        try:
            resp, state = response.read_bytes(), secret.read_bytes()
        except OSError as exc:
            raise FedcollabError(f"cannot read {exc.filename}: {exc.strerror}") from None
        scores = decrypt_response(resp, state)
        _write_scores(out, scores)
    except FedcollabError as exc:
        raise _fail(exc) from None
    info = {"scores": str(out), "rows": len(scores.logits), "holder": scores.holder, "model": scores.model_id, "accuracy": scores.accuracy}
    acc = "" if scores.accuracy is None else f", accuracy {scores.accuracy:.4f}"
    _emit(info, fmt, [f"decrypted {len(scores.logits)} scores from {escape(scores.holder)} -> {escape(str(out))}{acc}"])


@score_app.command("run")
def run(
    spec: SpecOpt,
    model: Annotated[Path, typer.Option("--model", help="Run folder of the model to score with (fedcollab run --out).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the request, response, secret, scores (with a partner column), the holder's ledger and the roster.")] = Path("runs/score"),
    partner: PartnerOpt = None,
    split: SplitOpt = "test",
    data: DataOpt = None,
    querier: Annotated[str, typer.Option("--querier", help="The querier's name in the holder's policy.")] = "querier",
    budget: Annotated[int | None, typer.Option("--budget", help="Budget rows the simulated holder grants the querier; each row scored costs 2 (default: exactly the rows scored).")] = None,
    fmt: FmtOpt = "table",
) -> None:
    """All three steps on one machine (a trial): encrypted and plain accuracy side by side."""
    from fedcollab.node import init_node_home
    from fedcollab.privacy.accounting import PartyLedger
    from fedcollab.privacy.mechanisms import fresh_generator
    from fedcollab.protocols.scoring import answer_request, build_request, decrypt_response, load_linear_model, write_atomic, write_secret
    from fedcollab.spec import NodePolicy, Roster, ScoringPolicy

    _check_split(split)
    try:
        x, y, names, row_partners = querier_rows_by_partner(spec, partners=partner, split=split, data=data)
        lin = load_linear_model(model)
        if querier == "holder":
            raise ConfigError("`--querier` must differ from the simulated model holder's name 'holder'")
        # The throwaway holder and querier nodes are fresh for every trial (a temporary folder), so a
        # rerun starts with a full budget; the holder's ledger is copied to OUT/holder-ledger.jsonl.
        import tempfile

        out.mkdir(parents=True, exist_ok=True)
        trial = tempfile.TemporaryDirectory(prefix="fedcollab-score-")
        home = init_node_home(Path(trial.name) / "holder", partner="holder", policy=NodePolicy(
            partner="holder", scoring=ScoringPolicy(max_rows_per_querier={querier: budget if budget is not None else 2 * len(x)})))
        qhome = init_node_home(Path(trial.name) / "querier", partner=querier)
        # the holder's own copy of the roster, as it would receive it out of band
        roster = Roster(parties={"holder": {"signing_key": home.public_key()}, querier: {"signing_key": qhome.public_key()}})
        write_atomic(out / "roster.json", (roster.model_dump_json(indent=2) + "\n").encode())
        policy = home.policy()
        ledger = PartyLedger(home.ledger_path, party=policy.partner, key=home.key())
        secret = out / f"secret-{os.urandom(4).hex()}.json"
        n_ct = -(-len(x) // 4096)
        with _progress(fmt == "table", "encrypt, score, decrypt", x.shape[1] * n_ct + 2 * n_ct) as prog:
            t0 = time.perf_counter()
            pending = build_request(x, querier=querier, key=qhome.key(), model_id=lin.model_id, feature_names=names, labels=y, progress=prog)
            t1 = time.perf_counter()
            ans = answer_request(pending.request, model=lin, policy=policy, ledger=ledger, roster=roster, generator=fresh_generator(),
                                 expected_features=names, progress=prog)
            t2 = time.perf_counter()
            scores = decrypt_response(ans.response, pending.state, progress=prog)
            t3 = time.perf_counter()
        write_secret(secret, pending.state)
        write_atomic(out / "request.fcs", pending.request)
        write_atomic(out / "response.fcs", ans.response)
        _write_scores(out / "scores.csv", scores, partners=row_partners)
        write_atomic(out / "holder-ledger.jsonl", home.ledger_path.read_bytes())
        trial.cleanup()
    except FedcollabError as exc:
        raise _fail(exc) from None
    plain = lin.logits(x)
    acc_plain = None if y is None else float(((plain > 0).astype(np.float64) == y).mean())
    n = len(x)
    info = {
        "rows": n, "features": int(x.shape[1]), "model": lin.model_id, "querier": querier,
        "accuracy_encrypted": scores.accuracy, "accuracy_plain": acc_plain,
        "accuracy_delta": None if acc_plain is None or scores.accuracy is None else abs(scores.accuracy - acc_plain),
        "max_abs_logit_error": float(np.max(np.abs(scores.logits - plain))),
        "ms_per_row": {"encrypt": 1e3 * (t1 - t0) / n, "apply": 1e3 * (t2 - t1) / n, "decrypt": 1e3 * (t3 - t2) / n, "total": 1e3 * (t3 - t0) / n},
        "bytes_per_row": (len(pending.request) + len(ans.response)) / n,
        "request_bytes": len(pending.request), "response_bytes": len(ans.response),
        "budget": {"rows_used": ans.rows_before + ans.charged, "budget": ans.budget}, "out": str(out),
    }
    lines = [f"scored {n} rows x {x.shape[1]} features under CKKS with model {lin.model_id[:12]}"]
    if acc_plain is not None:
        lines.append(f"accuracy: encrypted {scores.accuracy:.4f}, plain {acc_plain:.4f} (delta {info['accuracy_delta']:.4f})")
    lines += [f"max |logit error| {info['max_abs_logit_error']:.2e}; {info['ms_per_row']['total']:.3f} ms/row; {info['bytes_per_row']:,.0f} bytes/row",
              f"holder budget: {ans.rows_before + ans.charged} of {ans.budget} rows used; wrote {escape(str(out))}/scores.csv"]
    _emit(info, fmt, lines)
