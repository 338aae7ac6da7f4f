"""Check a partner's data against the spec's schema, locally, before anything starts.

Used by ``fedcollab data check`` (a partner checks their own file before joining) and by the
simulation runner, which checks every partner's data before it starts Flower: in simulation the
person running it is every partner, so each partner's own message is shown by partner name,
in a second instead of a node code after the simulation's start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcollab.core import DataUnreadable, DataValidationError
from fedcollab.spec import SourceSpec, Spec


@dataclass
class DataCheck:
    """What checking one partner's data found."""

    partner: str
    path: str
    rows: int | None = None
    columns: list[str] = field(default_factory=list)
    n_train: int | None = None
    n_test: int | None = None
    problems: list[str] = field(default_factory=list)
    unreadable: bool = False

    @property
    def ok(self) -> bool:
        """Whether the data can be used as it is."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"partner": self.partner, "path": self.path, "ok": self.ok, "rows": self.rows, "columns": self.columns,
                "n_train": self.n_train, "n_test": self.n_test, "unreadable": self.unreadable, "problems": self.problems}


def check_partner_data(spec: Spec, partner: str, *, data: str | Path | None = None) -> DataCheck:
    """Read and validate ``partner``'s data (its spec source, or ``data`` as its node would read it).

    With ``data`` the file is read as a deployed node reads ``--data``: the whole file, no
    ``where`` filter. Never raises for bad data: every problem is listed in the result.
    """
    from fedcollab.data import prepare_frame, read_source
    from fedcollab.data import resolve_path

    p = next((x for x in spec.partners if x.name == partner), None)
    if p is None:
        raise DataValidationError(f"--partner: expected one of the spec's partners {[x.name for x in spec.partners]}, got {partner!r}")
    src = SourceSpec(path=str(Path(data).resolve())) if data is not None else p.source
    if src is None:
        return DataCheck(partner, "", problems=[f"partners.{partner}.source: no data source in the spec (pass --data FILE, as the node's --data)"],
                         unreadable=True)
    try:
        shown = str(resolve_path(src.path, spec.base_dir))
    except DataValidationError as exc:
        return DataCheck(partner, src.path, problems=[str(exc)], unreadable=True)
    res = DataCheck(partner, shown)
    try:
        df = read_source(src, spec.base_dir)
    except DataUnreadable as exc:
        res.problems, res.unreadable = [str(exc)], True
        return res
    except DataValidationError as exc:  # a `where` filter naming a column the file lacks
        res.problems = exc.problems or [str(exc)]
        return res
    res.rows, res.columns = len(df), [str(c) for c in df.columns]
    try:
        prepared = prepare_frame(df, spec, p, source=f"partner {partner!r} data")
    except DataValidationError as exc:
        res.problems = exc.problems or [str(exc).removeprefix(f"partner {partner!r} data: ")]
        return res
    res.n_train, res.n_test = prepared.n_train, prepared.n_test
    return res


def check_simulation_data(spec: Spec, *, skip: set[str] = frozenset()) -> list[DataCheck]:  # type: ignore[assignment]
    """Check every partner's data source (but those in ``skip``, whose DataFrames were checked); raise one data error naming each partner's problems.

    Raises
    ------
    DataUnreadable
        When every failing partner's file is missing or unreadable.
    DataValidationError
        Otherwise, one line per problem: ``partner: problem (file PATH)``.
    """
    checks = [check_partner_data(spec, p.name) for p in spec.partners if p.name not in skip]
    bad = [c for c in checks if not c.ok]
    if bad:
        lines = [f"{c.partner}: {prob}" + ("" if c.unreadable or not c.path else f" (file {c.path})") for c in bad for prob in c.problems]
        err = DataUnreadable if all(c.unreadable for c in bad) else DataValidationError
        raise err(f"the data of {len(bad)} partner(s) cannot be used; nothing was started:", problems=lines)
    return checks


def missing_sources(spec: Spec) -> list[str]:
    """One line per simulation source file that does not exist: the field, the partner and the path."""
    from fedcollab.data import EMBEDDED_PREFIX, resolve_path

    out = []
    for i, p in enumerate(spec.partners):
        if p.source is None:
            continue
        try:
            path = resolve_path(p.source.path, spec.base_dir)
        except DataValidationError as exc:  # an unknown embedded file
            out.append(f"`partners[{i}].source.path`: partner {p.name!r}: {exc}")
            continue
        if not p.source.path.startswith(EMBEDDED_PREFIX) and not path.is_file():
            out.append(f"`partners[{i}].source.path`: partner {p.name!r}: expected a readable file, got {str(path)!r} (not found; "
                       "relative paths resolve against the spec's folder)")
    return out


def model_search_path(spec: Spec) -> list[str]:
    """Where a custom model's module is looked for: the spec's folder, then ``PYTHONPATH`` and the installed packages."""
    return [str(Path(spec.base_dir).resolve())]


def add_model_search_path(spec: Spec) -> None:
    """Put the spec's folder on the import path of this process and of the simulation's workers (custom models)."""
    import os
    import sys

    if spec.model.kind != "custom":
        return
    for d in model_search_path(spec):
        if d not in sys.path:
            sys.path.insert(0, d)
        parts = [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]
        if d not in parts:
            os.environ["PYTHONPATH"] = os.pathsep.join([d, *parts])


def check_model_target(spec: Spec) -> None:
    """Import a custom model's ``model.target`` here, at the coordinator's own validation.

    Only the spec author's machine does this (``spec validate``, ``run``); a partner's node
    never imports a model named in a request.

    Raises
    ------
    SpecError
        Naming ``model.target``, what failed and where modules are looked for.
    """
    import importlib

    from fedcollab.core import SpecError

    target = spec.model.target
    if spec.model.kind != "custom" or not target:
        return
    add_model_search_path(spec)
    module_name, _, attr = target.partition(":")
    where = f"modules are looked for in the spec's folder ({model_search_path(spec)[0]}), then on PYTHONPATH and among installed packages"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure of the author's module is a spec problem
        raise SpecError(f"`model.target`: expected an importable module, cannot import {module_name!r} ({type(exc).__name__}); {where}") from None
    if not callable(getattr(module, attr, None)):
        raise SpecError(f"`model.target`: expected a class {attr!r} in module {module_name!r}, got none ({module.__file__}); {where}")
