"""JSON Schema export of the published formats."""

from __future__ import annotations

import json
from pathlib import Path

from fedcollab.privacy.accounting import event_json_schema, ledger_entry_json_schema
from fedcollab.protocols.summary import Summary, VerticalSummary
from fedcollab.spec import NodePolicy, Spec


def schemas() -> dict[str, dict]:
    """File name -> JSON Schema."""
    spec = Spec.model_json_schema(by_alias=True)
    spec["$id"] = "https://fedcollab.dev/schema/spec.schema.json"
    summary = Summary.model_json_schema()
    summary["$id"] = "https://fedcollab.dev/schema/summary.schema.json"
    return {
        "spec.schema.json": spec,
        "summary.schema.json": summary,
        "vertical-summary.schema.json": {**VerticalSummary.model_json_schema(), "$id": "https://fedcollab.dev/schema/vertical-summary.schema.json"},
        "event.schema.json": event_json_schema(),
        "ledger.schema.json": ledger_entry_json_schema(),
        "policy.schema.json": {**NodePolicy.model_json_schema(), "$id": "https://fedcollab.dev/schema/policy.schema.json"},
    }


def write_schemas(out: Path) -> list[Path]:
    """Write every schema under ``out`` (``schemas/`` in the repo)."""
    written = []
    for name, schema in schemas().items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
