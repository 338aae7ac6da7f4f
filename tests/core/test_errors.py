"""Exit codes, node error codes and the error tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedcollab.core import EXIT_CODE_HELP, NODE_ERROR_HELP, ExitCode, FedcollabError, NodeErrorCode
from fedcollab.core import _errors


class TestCodes:
    def test_every_exit_code_has_help(self):
        """Every ExitCode has non-empty help text."""
        assert set(EXIT_CODE_HELP) == set(ExitCode)
        assert all(v.strip() for v in EXIT_CODE_HELP.values())

    def test_every_node_code_has_help(self):
        """Every NodeErrorCode has non-empty help text."""
        assert set(NODE_ERROR_HELP) == set(NodeErrorCode)

    def test_error_exit_codes_are_registered(self):
        """Each error class maps to a registered exit code."""
        classes = [c for c in vars(_errors).values() if isinstance(c, type) and issubclass(c, FedcollabError)]
        assert len(classes) >= 10
        for c in classes:
            assert ExitCode(c.exit_code) in EXIT_CODE_HELP

    def test_problems_are_listed(self):
        """An error with problems lists each on its own line."""
        e = FedcollabError("bad", problems=["a", "b"])
        assert str(e).splitlines() == ["bad", "  - a", "  - b"]

    def test_exit_codes_documented(self):
        """docs/exit-codes.md has a row per exit code and node error code, with the registry's help text."""
        text = (Path(__file__).resolve().parents[2] / "docs" / "exit-codes.md").read_text()
        for code in ExitCode:
            assert f"| {int(code)} | `{code.name}` |" in text
            assert EXIT_CODE_HELP[code] in text
        for code in NodeErrorCode:
            assert f"| {int(code)} | `{code.name}` | {NODE_ERROR_HELP[code]} |" in text


def _all_error_classes() -> list[type[FedcollabError]]:
    """Every FedcollabError subclass, after importing every fedcollab module (so none is missed)."""
    for mod in _all_modules():
        assert mod  # imported for its classes
    seen: list[type[FedcollabError]] = []
    todo = [FedcollabError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(c for c in cls.__subclasses__() if c not in seen and c.__module__.startswith("fedcollab."))
    return seen


def _all_modules() -> list[object]:
    import importlib
    import pkgutil

    import fedcollab

    names = [m.name for m in pkgutil.walk_packages(fedcollab.__path__, "fedcollab.") if "._generated" not in m.name and not m.name.endswith("__main__")]
    return [importlib.import_module(n) for n in names]


def _exit_rows(section: str) -> dict[int, str]:
    """The table rows of one section of docs/exit-codes.md (exit 130 and node code 130 are different rows)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "exit-codes.md").read_text()
    node_at = text.index("## Node error codes")
    part = text[:node_at] if section == "exit" else text[node_at:]
    rows = [ln for ln in part.splitlines() if ln.startswith("| ") and ln.split("|")[1].strip().isdigit()]
    return {int(ln.split("|")[1]): ln for ln in rows}


class TestRegistry:
    def test_the_tree_is_whole(self):
        """Every exception class defined in fedcollab (warnings aside) is a FedcollabError."""
        import inspect

        strays = [f"{m.__name__}.{name}" for m in _all_modules() for name, c in inspect.getmembers(m, inspect.isclass)
                  if issubclass(c, BaseException) and not issubclass(c, Warning | FedcollabError) and c.__module__ == m.__name__]
        assert strays == []

    def test_every_error_carries_registered_codes(self):
        """Each error class (core and elsewhere) carries an ExitCode and a NodeErrorCode as class attributes."""
        classes = _all_error_classes()
        names = {c.__name__ for c in classes}
        # The classes that used to live outside the tree are in it.
        assert {"LedgerError", "NodeRejected", "NodeCoded", "ScoringRequestError", "ScoringAuthError",
                "ScoringReplayError", "ScoringBudgetExhausted", "MissingExtra"} <= names
        for c in classes:
            assert type(c.exit_code) is ExitCode and c.exit_code in EXIT_CODE_HELP, c
            assert type(c.node_code) is NodeErrorCode and c.node_code in NODE_ERROR_HELP, c

    def test_every_error_is_documented(self):
        """docs/exit-codes.md names each error class in the row of its exit code and in the row of its node code."""
        exit_rows, node_rows = _exit_rows("exit"), _exit_rows("node")
        for c in _all_error_classes():
            assert f"`{c.__name__}`" in exit_rows[int(c.exit_code)], (c, c.exit_code)
            if c is not _errors.NodeCoded:  # its code is per instance
                assert f"`{c.__name__}`" in node_rows[int(c.node_code)], (c, c.node_code)

    def test_codes_are_not_patched_onto_instances(self):
        """No fedcollab module assigns ``exit_code`` or ``node_code`` to an instance (a subclass says it instead)."""
        import ast

        pkg = Path(__file__).resolve().parents[2] / "fedcollab"
        bad = []
        for path in pkg.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
                bad += [f"{path.name}:{node.lineno}" for t in targets if isinstance(t, ast.Attribute) and t.attr in {"exit_code", "node_code"}]
        assert bad == []


class TestNodeCodeFor:
    def test_class_codes(self):
        """The node code is the class's; a bad update is 121, any other protocol error 120, a non-fedcollab error 100."""
        from fedcollab.core import ConfigError, CryptoError, ProtocolError, UpdateError, node_code_for

        assert node_code_for(ProtocolError("x")) == NodeErrorCode.BAD_REQUEST
        assert node_code_for(UpdateError("x")) == NodeErrorCode.BAD_MODEL_UPDATE
        assert node_code_for(ConfigError("x")) == NodeErrorCode.BAD_REQUEST
        assert node_code_for(CryptoError("x")) == NodeErrorCode.CRYPTO_REFUSED
        assert node_code_for(KeyError("patient_123")) == NodeErrorCode.INTERNAL
        assert node_code_for(_errors.MissingExtra("pip install x")) == NodeErrorCode.INTERNAL

    def test_node_coded_carries_its_code(self):
        """A NodeCoded refusal gives its own code, and its text is only the code's name."""
        from fedcollab.core import NodeCoded, node_code_for

        exc = NodeCoded(NodeErrorCode.TOO_FEW_PARTICIPANTS)
        assert node_code_for(exc) == NodeErrorCode.TOO_FEW_PARTICIPANTS and str(exc) == "TOO_FEW_PARTICIPANTS"

    def test_old_names_are_the_one_map(self):
        """node._client keeps `_Coded` and `_code_for` as names of the core class and function."""
        from fedcollab.core import NodeCoded, node_code_for
        from fedcollab.node import _analytics, _client

        assert _client._Coded is NodeCoded and _client._code_for is node_code_for and _analytics._code_for is node_code_for


def _samples() -> list[BaseException]:
    """One instance of each error class (constructed without its own fields where it has some), plus a non-fedcollab one."""
    out: list[BaseException] = [KeyError("patient_123")]
    for c in _all_error_classes():
        exc = c.__new__(c)
        Exception.__init__(exc, "patient_123 is odd")
        if c is _errors.NodeCoded:
            exc.code = NodeErrorCode.UNKNOWN_PARTNER  # type: ignore[attr-defined]
        out.append(exc)
    return out


class TestClientAppsUseTheOneMap:
    """Each ClientApp's error path replies with node_code_for(exc), and no text."""

    @pytest.fixture(autouse=True)
    def _task(self, monkeypatch):
        # Flower stamps messages with the task's run id, set when a task pulls its input.
        from flwr.supercore.task_identity import TaskIdentity

        monkeypatch.setattr(TaskIdentity, "_run_id", 7, raising=False)
        monkeypatch.setattr(TaskIdentity, "_node_id", 2, raising=False)
        monkeypatch.setattr(TaskIdentity, "_task_id", 3, raising=False)

    @staticmethod
    def _ask(app, message_type: str) -> tuple[int, str]:
        from flwr.app import ConfigRecord, Context, Message, RecordDict

        from fedcollab.protocols.wire import RecordKey

        req = Message(content=RecordDict({"config": ConfigRecord({"fedcollab.run_id": "r1", "fedcollab.kind": "setup"})}),
                      dst_node_id=1, message_type=message_type)
        req.metadata.__dict__["_message_id"] = req.object_id
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        reply = app(req, ctx)
        err = reply.content.config_records[RecordKey.ERROR]
        return int(err["code"]), json.dumps(dict(err))

    def _check(self, monkeypatch, module, runtime: str, app, message_type: str) -> None:
        codes = set()
        for exc in _samples():
            def boom(*_a, _exc=exc, **_k):
                raise _exc

            monkeypatch.setattr(module, runtime, boom)
            code, text = self._ask(app, message_type)
            assert code == _errors.node_code_for(exc), type(exc)
            assert "patient_123" not in text
            codes.add(code)
        assert len(codes) >= 8  # the samples really exercise different codes

    def test_training_app(self, monkeypatch, heart_spec, tmp_path):
        """The training ClientApp (plain, secagg and HE rounds share its error path)."""
        from fedcollab.node import _client

        app = _client.make_client_app(heart_spec, {p.name: str(tmp_path / p.name) for p in heart_spec.partners}, {"coordinator": "00"})
        self._check(monkeypatch, _client, "NodeRuntime", app, "query")

    def test_analytics_app(self, monkeypatch, heart_spec, tmp_path):
        """The analytics ClientApp."""
        from fedcollab.node import _analytics

        app = _analytics.make_analytics_client_app(heart_spec, {p.name: str(tmp_path / p.name) for p in heart_spec.partners}, {"coordinator": "00"})
        self._check(monkeypatch, _analytics, "NodeAnalytics", app, "query")
