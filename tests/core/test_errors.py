"""Exit codes, node error codes and the error tree."""

from __future__ import annotations

from pathlib import Path

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
