"""Generate docs/spec-reference.md from the pydantic models in ``fedcollab.spec``.

Usage::

    python docs/gen_spec_reference.py           # write docs/spec-reference.md
    python docs/gen_spec_reference.py --check   # exit 1 if the file on disk is out of date

Types, defaults and descriptions come from ``Model.model_fields``; constraints come from
``Spec.model_json_schema(by_alias=True)`` (the same schema ``fedcollab spec schema`` writes).
The cross-field rules below are copied by hand from the models' ``model_validator`` methods in
``fedcollab/spec/_models.py``: update them when a validator changes.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from fedcollab.spec import (
    ColumnSpec,
    GbdtSpec,
    HeSpec,
    LabelSpec,
    ModelSpec,
    PartnerSpec,
    PreprocessingSpec,
    PartnerPrivacySpec,
    PrivacySpec,
    SchemaSpec,
    SecAggSpec,
    SourceSpec,
    Spec,
    SplitSpec,
    TrainingSpec,
)

OUT = Path(__file__).resolve().parent / "spec-reference.md"

#: Document order.
MODELS: list[type[BaseModel]] = [
    Spec,
    PartnerSpec,
    SourceSpec,
    SplitSpec,
    SchemaSpec,
    ColumnSpec,
    LabelSpec,
    ModelSpec,
    GbdtSpec,
    TrainingSpec,
    PrivacySpec,
    PartnerPrivacySpec,
    SecAggSpec,
    PreprocessingSpec,
    HeSpec,
]

#: Rules that involve more than one field (from the ``model_validator`` methods).
RULES: dict[str, list[str]] = {
    "Spec": [
        "Partner names are unique.",
        "Every key of `partners[].source.where` is a declared column; for a category column its value is one of the `levels`.",
        "`partners[].split.column` is a declared column.",
        "`preprocessing.scaling = \"dp_statistics\"` needs record-level DP-SGD (`privacy.mode = \"record\"`, or `record_level = true`) and `privacy.preprocessing_epsilon_share` in (0, 1).",
        "`privacy.preprocessing_epsilon_share` > 0 is only allowed with `preprocessing.scaling = \"dp_statistics\"`.",
        "`preprocessing.scaling = \"federated_statistics\"` (exact statistics) is refused with any `privacy.mode` but `\"none\"`.",
        "`privacy.mode = \"distributed\"` needs `aggregation = \"secagg\"` with the complete graph (`secagg.neighbours` >= partners - 1), and `t_min - colluders` >= 1.",
        "Partner-level DP (`distributed` or `central`) needs strategy `fedavg` or `fedprox`.",
        "`training.min_partners` is at most the number of partners.",
        "Robust `training.strategy` (`trimmed_mean`, `median`, `krum`, `multikrum`) needs `aggregation = \"plain\"` and no partner-level DP, and at least 3 updates per round (`training.min_partners`, default all partners); `trimmed_mean` must cut at least one update (floor(`trim_fraction` * updates) >= 1); `krum`/`multikrum` need updates >= 2 * `byzantine_partners` + 3; `krum_select` <= updates - `byzantine_partners`.",
        "`training.trim_fraction`, `byzantine_partners` and `krum_select` are refused when set for a strategy that does not use them.",
        "`secagg.clip_l2` needs `aggregation = \"secagg\"` and is refused with partner-level DP (`privacy.partner.clip` bounds the update there).",
        "`aggregation = \"he\"`: at least 2 partners; `he.key_holder` and `he.model_writer` are partners; `he.clip * he.scale` + partners <= 8,380,416 (FedAdam runs at every partner after decryption).",
    ],
    "SplitSpec": ["Give exactly one of `test_fraction` or `column`."],
    "ColumnSpec": [
        "A `category` column needs non-empty, unique `levels`; `levels` is only for category columns.",
        "`bounds` is only for `number` columns and must be `[min, max]` with min < max.",
    ],
    "LabelSpec": ["Give exactly one of `positive_above` or `positive_levels`."],
    "SchemaSpec": [
        "Column names are unique; `features` lists each column once, and every feature is a declared column.",
        "A `number` feature needs `bounds`.",
        "The label column is declared and is not a feature.",
        "A `number` label needs `positive_above`; a `bool` or `category` label needs `positive_levels`, which for a category label must be among its `levels`.",
    ],
    "ModelSpec": [
        "`kind = \"mlp\"` needs `hidden`; `hidden` is only for `mlp`.",
        "`kind = \"custom\"` needs `target` of the form `package.module:ClassName`; `target` and `options` are only for `custom`.",
        "`[model.gbdt]` is only for `kind = \"gbdt\"`; a `gbdt` model is refused with `aggregation = \"he\"` and with privacy modes other than `none` and `record`.",
    ],
    "GbdtSpec": [
        "Fields left out resolve by privacy mode: without DP 50 trees, depth 3, learning rate 0.1, lambda 1, min child weight 1; with record-level DP 50 trees, depth 2, learning rate 1, lambda 500, min child weight 0 (docs/protocols/gbdt.md).",
        "`dp_leaf_share` must be < 1 with `dp_split = \"histogram\"`.",
    ],
    "PrivacySpec": [
        "Record-level DP-SGD (`mode = \"record\"`, or `record_level = true` with `distributed`/`central`) needs `target_epsilon` and `delta`; both are refused otherwise.",
        "`mode = \"distributed\"` or `\"central\"` needs a `[privacy.partner]` table; the table is refused with other modes.",
    ],
    "PreprocessingSpec": [
        "`auto` resolves to `federated_statistics` when `privacy.mode = \"none\"` and to `public_bounds` with any DP mode.",
    ],
}

_MODEL_NAMES = {m.__name__ for m in MODELS}


# --- where each model lives in the TOML file -------------------------------------------------
def _toml_locations() -> dict[str, str]:
    """Model name -> its TOML location, found by walking ``Spec``'s fields."""
    out = {"Spec": "top level"}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = field.alias or name
            path = f"{prefix}.{key}" if prefix else key
            for sub, is_list in _model_refs(field.annotation):
                if sub.__name__ in out:
                    continue
                if is_list:
                    out[sub.__name__] = f"`[[{path.replace('[].', '.')}]]`"
                else:
                    out[sub.__name__] = f"`[{path}]`" if not prefix else f"`{path}` (inline table or `[{path.replace('[].', '.')}]`)"
                walk(sub, path + "[]" if is_list else path)

    walk(Spec, "")
    return out


def _model_refs(annotation: Any, in_list: bool = False) -> list[tuple[type[BaseModel], bool]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, in_list)]
    origin = typing.get_origin(annotation)
    refs: list[tuple[type[BaseModel], bool]] = []
    for arg in typing.get_args(annotation):
        refs += _model_refs(arg, in_list or origin is list)
    return refs


# --- rendering ---------------------------------------------------------------------------------
def _type(annotation: Any) -> str:
    """A readable type: ``int``, ``float | None``, ``"sgd" | "adam"``, ``list[ColumnSpec]``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin is list:
        return f"list[{_type(args[0])}]"
    if origin is dict:
        return f"dict[{_type(args[0])}, {_type(args[1])}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        if annotation.__name__ in _MODEL_NAMES:
            return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
        return annotation.__name__
    return str(annotation)


def _toml_value(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, BaseModel):
        changed = value.model_dump(exclude_defaults=True, by_alias=True)
        return _toml_value(changed) if changed else "all defaults"
    return repr(value)


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    return f"`{_toml_value(value)}`" if _toml_value(value) != "all defaults" else "all defaults"


_KEYWORDS = [
    ("minimum", "≥ {}"),
    ("exclusiveMinimum", "> {}"),
    # pydantic 2.14 writes the non-standard keys gt/ge/lt/le for ints annotated with a
    # BeforeValidator (`Int`, `PosInt` in _models.py); read them too.
    ("gt", "> {}"),
    ("ge", "≥ {}"),
    ("maximum", "≤ {}"),
    ("exclusiveMaximum", "< {}"),
    ("lt", "< {}"),
    ("le", "≤ {}"),
    ("minLength", "length ≥ {}"),
    ("maxLength", "length ≤ {}"),
    ("minItems", "≥ {} items"),
    ("maxItems", "≤ {} items"),
    ("pattern", "matches `{}`"),
]


def _constraints(prop: dict[str, Any]) -> str:
    parts: list[str] = []

    def collect(schema: dict[str, Any], prefix: str = "") -> None:
        if "minItems" in schema and schema.get("minItems") == schema.get("maxItems"):
            parts.append(prefix + f"exactly {schema['minItems']} items")
            schema = {k: v for k, v in schema.items() if k not in ("minItems", "maxItems")}
        for key, fmt in _KEYWORDS:
            if key in schema:
                parts.append(prefix + fmt.format(schema[key]))
        if isinstance(schema.get("items"), dict):
            collect(schema["items"], "each item " if not prefix else prefix)

    collect(prop)
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            collect(branch)
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def render() -> str:
    """The whole Markdown document."""
    schema = Spec.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    where = _toml_locations()
    lines = [
        "# Collaboration spec reference",
        "",
        "<!-- GENERATED by docs/gen_spec_reference.py from fedcollab/spec/_models.py; do not edit by hand. -->",
        "<!-- Regenerate: python docs/gen_spec_reference.py   Check: python docs/gen_spec_reference.py --check -->",
        "",
        "A collaboration spec is a TOML file (see `specs/heart-disease.toml`). Every table is",
        "closed (an unknown or misspelt key is an error), frozen and strict: a string is never",
        "turned into a number, `true` is not a number, and numbers must be finite. An integral float",
        "(`20.0`) is accepted where an integer is meant; an integer is accepted where a float is meant.",
        "Validate a spec with `fedcollab spec validate SPEC [--format json]`; every problem names the",
        "field, the expectation and the value. The JSON Schema of the spec is written by",
        "`fedcollab spec schema --out schemas` (`make schema`) to `schemas/spec.schema.json`.",
        "",
        "Note: the spec's data schema is the TOML table `[schema]`; in Python it is the field",
        "`Spec.data_schema` (alias `schema`: a field called `schema` would shadow `BaseModel.schema`).",
        "",
        "`unset` in the Default column means the key is omitted (TOML has no null).",
        "",
    ]
    for model in MODELS:
        name = model.__name__
        props = schema["properties"] if model is Spec else defs[name]["properties"]
        lines += [f"## {name}", "", f"{_doc(model)} TOML: {where.get(name, 'n/a')}.", ""]
        lines += ["| Field | Type | Default | Constraints | Description |", "|---|---|---|---|---|"]
        for fname, field in model.model_fields.items():
            key = field.alias or fname
            label = f"`{key}`" if key == fname else f"`{key}` (Python: `{fname}`)"
            prop = props.get(key, {})
            lines.append(
                "| "
                + " | ".join(
                    _cell(x)
                    for x in (
                        label,
                        f"`{_type(field.annotation)}`" if "](" not in _type(field.annotation) else _type(field.annotation),
                        _default(field),
                        _constraints(prop),
                        field.description or "",
                    )
                )
                + " |"
            )
        rules = RULES.get(name)
        if rules:
            lines += ["", "Rules across fields:", ""]
            lines += [f"- {r}" for r in rules]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write the reference, or with ``--check`` compare it with the file on disk."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/spec-reference.md differs from what would be generated")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output file (default: {OUT})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(args.out), "generated", lineterm="", n=1)
            sys.stderr.write("\n".join(list(diff)[:40]) + "\n")
            sys.stderr.write(f"{args.out} is out of date: run python docs/gen_spec_reference.py\n")
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
