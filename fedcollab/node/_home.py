"""A node's home folder: its signing key, its policy and its ledger.

``fedcollab node init DIR --partner NAME`` creates::

    DIR/signing_key.pem   Ed25519, mode 0600, optional passphrase
    DIR/public_key.hex    the raw public key (goes into the roster, out of band)
    DIR/policy.toml       NodePolicy v1 template, to edit
    DIR/node.json         node-local configuration: the partner and the dataset id its budget is kept under
    DIR/split.json        the train/test split pinned per dataset on first use (written by the node)
    DIR/ledger.jsonl      the node's chain of privacy events (source of truth for its budget)
    DIR/ledger.anchor.json  seq and hash of its last entry, replaced atomically after every append;
                          a ledger file behind it is refused (rolled back) at start-up and on every read.
                          With ``FEDCOLLAB_ANCHOR_DIR`` set (``node start --anchor-dir``) the anchor lives
                          there instead, outside the folder, so that restoring an old copy of the whole
                          folder (a snapshot, a backup) is caught too (``fedcollab node anchor`` moves it)
    DIR/nonces.jsonl      commitment nonces, mode 0600 (never sent)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.core import ConfigError, ProtocolError
from fedcollab.crypto import generate_signing_key, load_signing_key
from fedcollab.privacy.accounting import BudgetGate, PartyLedger, parse_lines, public_key_hex, verify_signature
from fedcollab.spec import NodePolicy, load_policy, policy_toml

#: Where nodes keep their ledger anchors when it is not their own folder: another volume, a
#: partition a backup restore does not touch, a write-once store. Operational configuration of the
#: machine (the node's service unit, ``node start --anchor-dir``), deliberately not a file in the folder.
ANCHOR_DIR_ENV = "FEDCOLLAB_ANCHOR_DIR"


def external_anchor_path(root: Path, anchor_dir: str | Path) -> Path:
    """The anchor of the node folder ``root`` in ``anchor_dir``: one file per folder, named after its absolute path."""
    import hashlib

    real = Path(root).resolve()
    return Path(anchor_dir) / f"{real.name}-{hashlib.sha256(str(real).encode()).hexdigest()[:16]}.anchor.json"


@dataclass(frozen=True)
class NodeHome:
    """Paths of a node's folder."""

    root: Path

    @property
    def key_path(self) -> Path:  # noqa: D102
        return self.root / "signing_key.pem"

    @property
    def public_path(self) -> Path:  # noqa: D102
        return self.root / "public_key.hex"

    @property
    def policy_path(self) -> Path:  # noqa: D102
        return self.root / "policy.toml"

    @property
    def ledger_path(self) -> Path:  # noqa: D102
        return self.root / "ledger.jsonl"

    @property
    def anchor_path(self) -> Path:
        """``$FEDCOLLAB_ANCHOR_DIR/<folder>-<hash>.anchor.json`` when that is set, else ``DIR/ledger.anchor.json``."""
        d = os.environ.get(ANCHOR_DIR_ENV)
        return external_anchor_path(self.root, d) if d else self.root / "ledger.anchor.json"

    def move_anchor(self, anchor_dir: str | Path, *, passphrase: bytes | None = None) -> Path:
        """Move the folder's anchor to ``anchor_dir`` (outside the folder), after checking the ledger against it.

        Refuses (LedgerRolledBack) a ledger that is already behind its anchor, and a target that
        already holds a different anchor for this folder. The folder's own anchor is removed last,
        so an interrupted move leaves both (identical) copies.
        """
        inside = self.root / "ledger.anchor.json"
        PartyLedger(self.ledger_path, party=self.policy().partner, key=self.key(passphrase), anchor_path=inside).check_anchor()
        target = external_anchor_path(self.root, anchor_dir)
        if target.resolve().is_relative_to(self.root.resolve()):
            raise ConfigError(f"--to: expected a folder outside the node folder {self.root}, got {anchor_dir}")
        data = inside.read_bytes() if inside.exists() else None
        if target.exists() and data is not None and target.read_bytes() != data:
            raise ConfigError(f"{target}: already holds a different anchor for {self.root}; refusing to overwrite")
        Path(anchor_dir).mkdir(parents=True, exist_ok=True)
        if data is not None:
            _write_atomic(target, data)
            os.chmod(target, 0o600)
            inside.unlink()
        return target

    @property
    def nonce_path(self) -> Path:  # noqa: D102
        return self.root / "nonces.jsonl"

    @property
    def config_path(self) -> Path:  # noqa: D102
        return self.root / "node.json"

    @property
    def split_path(self) -> Path:  # noqa: D102
        return self.root / "split.json"

    @property
    def approved_dir(self) -> Path:
        """The partner's approved specs, each stored as ``approved/<sha256>.toml`` (issue 14 item 1)."""
        return self.root / "approved"

    def approve_spec(self, spec_bytes: bytes) -> str:
        """Store ``spec_bytes`` as approved; return its SHA-256 hex (idempotent)."""
        import hashlib

        digest = hashlib.sha256(spec_bytes).hexdigest()
        self.approved_dir.mkdir(parents=True, exist_ok=True)
        path = self.approved_dir / f"{digest}.toml"
        if not path.exists():
            _write_atomic(path, spec_bytes)  # byte for byte: the hash names these exact bytes
        return digest

    def approved_spec(self, spec_bytes: bytes) -> bytes | None:
        """The node's own stored copy of the spec whose SHA-256 equals that of ``spec_bytes``; None if not approved."""
        import hashlib

        path = self.approved_dir / f"{hashlib.sha256(spec_bytes).hexdigest()}.toml"
        return path.read_bytes() if path.is_file() else None

    def dataset(self) -> str:
        """The dataset id this node's budget is kept under: node-local configuration, never the spec.

        From ``node.json`` (``node init --dataset``, ``node start --dataset``, or the runner in
        simulation). A folder made before ``node.json`` existed falls back to the one dataset its
        policy budgets, else to the partner's name (the old default of ``--dataset``).
        """
        if self.config_path.exists():
            try:
                cfg = json.loads(self.config_path.read_text())
                value = cfg["dataset"]
            except (OSError, ValueError, KeyError, TypeError):
                raise ConfigError(f"{self.config_path}: expected a JSON object with a string `dataset`") from None
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{self.config_path}: `dataset` must be a non-empty string, got {value!r}")
            return value
        pol = self.policy()
        names = sorted({b.dataset for b in pol.budgets})
        return names[0] if len(names) == 1 else pol.partner

    def set_dataset(self, dataset: str) -> None:
        """Store the dataset id in ``node.json`` (atomically)."""
        if not isinstance(dataset, str) or not dataset:
            raise ConfigError(f"`dataset` must be a non-empty string, got {dataset!r}")
        cfg: dict[str, Any] = {}
        if self.config_path.exists():
            try:
                cfg = dict(json.loads(self.config_path.read_text()))
            except (OSError, ValueError, TypeError):
                cfg = {}
        cfg.update(schema_version=1, partner=self.policy().partner, dataset=dataset)
        _write_atomic(self.config_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    def pinned_split(self, dataset: str) -> dict[str, Any] | None:
        """The split parameters pinned for ``dataset``, if any."""
        return self._splits().get(dataset)

    def pin_split(self, dataset: str, params: dict[str, Any]) -> None:
        """Pin ``params`` as ``dataset``'s split (refuses to overwrite a pinned one)."""
        splits = self._splits()
        if dataset in splits:
            raise ConfigError(f"{self.split_path}: the split of dataset {dataset!r} is already pinned")
        splits[dataset] = params
        _write_atomic(self.split_path, json.dumps({"schema_version": 1, "splits": splits}, indent=2, sort_keys=True) + "\n")

    def _splits(self) -> dict[str, Any]:
        if not self.split_path.exists():
            return {}
        try:
            data = json.loads(self.split_path.read_text())
            splits = data["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{self.split_path}: expected a JSON object with `splits` (dataset -> split parameters)") from None
        if not isinstance(splits, dict):
            raise ConfigError(f"{self.split_path}: `splits` must be an object, got {type(splits).__name__}")
        return dict(splits)

    def exists(self) -> bool:
        """Whether the folder holds a key and a policy."""
        return self.key_path.exists() and self.policy_path.exists()

    def key(self, passphrase: bytes | None = None) -> Ed25519PrivateKey:
        """The node's signing key."""
        return load_signing_key(self.key_path, passphrase=passphrase)

    def policy(self) -> NodePolicy:
        """The node's policy."""
        return load_policy(self.policy_path)

    def public_key(self) -> str:
        """The node's public key (hex)."""
        return self.public_path.read_text().strip()

    def gate(self, party: str, dataset: str, *, passphrase: bytes | None = None) -> BudgetGate:
        """The budget gate over this node's ledger for ``dataset``."""
        ledger = PartyLedger(self.ledger_path, party=party, key=self.key(passphrase), anchor_path=self.anchor_path)
        return BudgetGate(ledger, self.policy(), dataset=dataset, nonce_path=self.nonce_path)


def _write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes, unchanged) to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def init_node_home(root: str | Path, *, partner: str, policy: NodePolicy | None = None, passphrase: bytes | None = None,
                   dataset: str | None = None) -> NodeHome:
    """Create a node folder (refuses to overwrite an existing key).

    ``dataset`` is the id the node's budget is kept under (stored in ``node.json``); by default
    the one dataset the policy budgets, else the partner's name.
    """
    home = NodeHome(Path(root))
    if home.key_path.exists():
        raise ConfigError(f"{home.root} already holds a node (signing_key.pem); refusing to overwrite")
    home.root.mkdir(parents=True, exist_ok=True)
    key = generate_signing_key(home.key_path, passphrase=passphrase)
    home.public_path.write_text(public_key_hex(key) + "\n")
    pol = policy or NodePolicy(partner=partner)
    if pol.partner != partner:
        raise ConfigError(f"policy.partner is {pol.partner!r}, expected {partner!r}")
    home.policy_path.write_text(policy_toml(pol))
    home.ledger_path.touch()
    if dataset is None:
        names = sorted({b.dataset for b in pol.budgets})
        dataset = names[0] if len(names) == 1 else partner
    home.set_dataset(dataset)
    return home


def countersign_close(ledger: PartyLedger, *, party: str, run_id: str, close_line: bytes, coordinator_key: str,
                      partners: list[str] | None = None) -> str:
    """Check the coordinator's close entry, then countersign it in ``ledger``.

    The close must list ``party``'s chain head (or, if this node made no entry in the run, no
    head for it) and, when ``partners`` (this node's own spec's partners) is given, exactly
    those partners: a close that leaves a partner out is refused.
    """
    (ln,) = parse_lines(close_line + b"\n")
    e = ln.entry
    if e.get("kind") != "close" or e.get("run_id") != run_id or not verify_signature(e, coordinator_key):
        raise ProtocolError("not a close entry of this run signed by the coordinator")
    body = e.get("body") if isinstance(e.get("body"), dict) else {}
    heads, listed = body.get("heads"), body.get("partners")
    if not isinstance(heads, dict) or not isinstance(listed, list):
        raise ProtocolError("the close entry must hold `heads` and `partners`")
    if partners is not None and sorted(listed) != sorted(partners):
        raise ProtocolError("the close entry's `partners` are not this run's partners (one was left out or added)")
    if party not in listed:
        raise ProtocolError("the close entry does not list this node as a partner")
    _, head = ledger.head()
    in_run = any(x.entry.get("party") == party and x.entry.get("run_id") == run_id for x in ledger.lines())
    if heads.get(party) != (head if in_run else None):
        raise ProtocolError("the close entry does not list this node's chain head")
    return ledger.append(kind="countersign", run_id=run_id, round=int(e["round"]), body={"close": ln.hash}).decode()
