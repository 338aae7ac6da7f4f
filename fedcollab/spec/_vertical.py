"""The ``[vertical]`` table: partners hold different columns about the same people (``layout = "vertical"``).

A vertical spec names the join key (``id_column``, never a feature), the partner that holds the
label (``label_holder``, the active party) and, per partner, the schema columns it holds
(``[[partners]] columns``). Every feature is held by exactly one partner; the label column only by
the label holder. Records are aligned by ECDH private set intersection on the id column; trees are
trained by SecureBoost (the label holder's gradients encrypted under its own BFV key). See
docs/vertical.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from fedcollab.core import FrozenModel


class VerticalSpec(FrozenModel):
    """How a vertical collaboration aligns and trains."""

    id_column: str = Field(min_length=1, description="The join key column every partner holds (hashed into the PSI group, never a feature, never sent in the clear).")
    label_holder: str = Field(min_length=1, description="The partner that holds the label (the active party); it owns the HE key.")
    psi_reveal: Literal["both", "label_holder"] = Field(default="both", description="Who learns which of its records are in the intersection: both parties, or only the label holder (the other learns only the size).")
    min_intersection: int = Field(default=20, ge=1, description="Fewest aligned records a run trains on; a smaller intersection is refused before any training.")
    passive_bins: Literal["quantile", "public"] = Field(default="quantile", description="Bin edges of a passive party's features: quantiles of its own rows (kept at its node, so split thresholds stay secret) or equal-width over the public schema bounds.")


def vertical_problems(spec: Any) -> list[str]:
    """Problems of a spec's vertical layout (one line each); none for a horizontal spec without columns."""
    out: list[str] = []
    v = spec.vertical
    if spec.layout == "horizontal":
        if v is not None:
            out.append("[vertical] is only for layout = 'vertical'")
        for i, p in enumerate(spec.partners):
            if p.columns is not None:
                out.append(f"partners[{i}].columns is only for layout = 'vertical' (in a horizontal spec every partner holds every column)")
        return out
    if v is None:
        return ["layout = 'vertical' needs a [vertical] table with `id_column` and `label_holder`"]
    schema = spec.data_schema
    declared = {c.name for c in schema.columns}
    names = [p.name for p in spec.partners]
    if len(spec.partners) < 2:
        out.append(f"layout = 'vertical' takes at least 2 partners (the label holder and one or more others), got {len(spec.partners)}")
    if v.label_holder not in names:
        out.append(f"vertical.label_holder `{v.label_holder}` is not a partner; partners are {names}")
    if v.id_column not in declared:
        out.append(f"vertical.id_column `{v.id_column}` is not a declared column")
    if v.id_column in schema.features:
        out.append(f"vertical.id_column `{v.id_column}` is also a feature (the join key must not be a model input)")
    if v.id_column == schema.label.column:
        out.append(f"vertical.id_column `{v.id_column}` is the label column")
    holders: dict[str, list[str]] = {}
    for i, p in enumerate(spec.partners):
        if p.columns is None:
            out.append(f"partners[{i}] ({p.name}): a vertical spec needs `columns`, the schema columns this partner holds")
            continue
        if len(set(p.columns)) != len(p.columns):
            out.append(f"partners[{i}].columns lists a column twice")
        for c in p.columns:
            if c not in declared:
                out.append(f"partners[{i}].columns: `{c}` is not a declared column")
            elif c == v.id_column:
                out.append(f"partners[{i}].columns: `{c}` is the id column (every partner holds it; do not list it)")
            elif c == schema.label.column and p.name != v.label_holder:
                out.append(f"partners[{i}].columns: the label `{c}` may only be held by the label holder `{v.label_holder}`, not `{p.name}`")
            else:
                holders.setdefault(c, []).append(p.name)
    for f in schema.features:
        who = holders.get(f, [])
        if len(who) > 1:
            out.append(f"feature `{f}` is held by {len(who)} partners {who}; in a vertical spec every feature is held by exactly one")
        elif not who and all(p.columns is not None for p in spec.partners):
            out.append(f"feature `{f}` is held by no partner (list it in one partner's `columns`)")
    lab = schema.label.column
    if v.label_holder in names and all(p.columns is not None for p in spec.partners):
        holder = next(p for p in spec.partners if p.name == v.label_holder)
        if lab not in (holder.columns or []):
            out.append(f"the label `{lab}` must be in the label holder's columns (partner `{v.label_holder}`)")
    for i, p in enumerate(spec.partners):
        if p.columns is not None and p.name != v.label_holder and not [c for c in p.columns if c in schema.features]:
            out.append(f"partners[{i}] ({p.name}) holds no feature: a passive party must bring at least one")
    if v.psi_reveal == "label_holder":
        out.append("vertical.psi_reveal = 'label_holder' tells the passive party only the intersection size, but training needs it to know "
                   "its common records: expected 'both', got 'label_holder'")
    if spec.model.kind not in ("gbdt", "logistic_regression"):
        out.append(f"layout = 'vertical' trains model kind 'gbdt' (SecureBoost) or 'logistic_regression' (HE vertical LR), got {spec.model.kind!r}")
    if spec.aggregation != "plain":
        out.append(f"layout = 'vertical' always encrypts the label holder's gradients under its own key; leave `aggregation` out (got {spec.aggregation!r})")
    if spec.privacy.mode not in ("none", "record"):
        out.append(f"layout = 'vertical' offers privacy.mode 'none' or 'record' (noise on the passive party's bin sums), got {spec.privacy.mode!r}")
    elif spec.privacy.mode == "record" and spec.model.kind == "gbdt" and (spec.model.gbdt is None or spec.model.gbdt.dp_split == "random"):
        out.append("layout = 'vertical' with record-level DP protects the passive party's bin sums: set model.gbdt.dp_split = 'histogram'")
    if spec.privacy.mode == "record" and spec.model.kind == "gbdt" and v.passive_bins != "public":
        # Quantile edges move with the data: one replaced record could move many records across
        # bins, so the bin sums' sensitivity is only bounded over data-independent edges.
        out.append(f"vertical.passive_bins must be 'public' under record-level DP (quantile edges depend on the data), got {v.passive_bins!r}")
    return out
