"""A model people can use: metadata in the model file, predict (CLI and Result), DataFrames, spec.replace, fedcollab new."""

from __future__ import annotations

import json
import sys
import tomllib

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import ROOT

SPEC = ROOT / "specs" / "heart-disease.toml"
EMBEDDED = ROOT / "fedcollab" / "data" / "embedded" / "heart_disease_uci.csv"
HOSPITALS = {"cleveland": "Cleveland", "hungary": "Hungary", "switzerland": "Switzerland", "va-long-beach": "VA Long Beach"}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, heart_spec):
    """One 2-round non-DP simulation of the Heart spec (plain aggregation), shared by this module."""
    import fedcollab

    out = tmp_path_factory.mktemp("usable-run")
    return fedcollab.run(heart_spec.replace(training={"rounds": 2}), out=out, spec_path=SPEC)


def _clean_rows(n: int = 12):
    import pandas as pd

    df = pd.read_csv(EMBEDDED, dtype=str, keep_default_na=False, na_values=[""])
    df = df[df["dataset"] == "Cleveland"].dropna(subset=["trestbps", "chol", "fbs", "thalch", "exang", "oldpeak", "restecg"])
    return df.head(n).reset_index(drop=True)


def _test_split(spec, partner: str):
    """The partner's test rows, raw, as the node splits them (drop rows missing model inputs, then split)."""
    from fedcollab.data import FeatureEncoder, read_source, split_indices, validate_frame

    p = next(x for x in spec.partners if x.name == partner)
    raw = read_source(p.source, spec.base_dir)
    typed = validate_frame(raw, spec.data_schema)
    keep = ~typed[[*spec.data_schema.features, spec.data_schema.label.column]].isna().any(axis=1)
    kept_raw, kept = raw[keep].reset_index(drop=True), typed[keep].reset_index(drop=True)
    y = FeatureEncoder(spec.data_schema).labels(kept)
    _, test = split_indices(y, p.split, seed=spec.seed)
    return kept_raw.iloc[test].reset_index(drop=True), y[test]


class TestModelFile:
    def test_metadata_names_features_encoding_and_scaling(self, short_run):
        """The safetensors header says which encoded feature each weight belongs to, how rows are encoded and scaled."""
        from safetensors import safe_open

        path = short_run.out_dir / "model.safetensors"
        with safe_open(str(path), framework="numpy") as fh:
            meta = {k: json.loads(v) for k, v in fh.metadata().items()}
            w = fh.get_tensor("linear.weight")
        assert meta["format"] == "fedcollab-model/1"
        assert len(meta["feature_names"]) == w.shape[1] == 13
        assert "sex=Male" in meta["feature_names"] and "cp=asymptomatic" in meta["feature_names"]
        cp = next(e for e in meta["encoding"] if e["column"] == "cp")
        assert cp["reference"] == "typical angina" and cp["encoded"] == ["cp=atypical angina", "cp=non-anginal", "cp=asymptomatic"]
        assert meta["scaling"]["method"] == "federated_statistics"
        assert meta["scaling"]["mean"] == pytest.approx(short_run.summary.scaling_parameters["mean"])
        assert meta["model"]["kind"] == "logistic_regression" and meta["label"] == {"column": "num", "positive_above": 0.0}

    def test_summary_repeats_feature_names(self, short_run):
        """summary.json's model entry lists the encoded features and their encoding, and follows the published schema."""
        import jsonschema

        summary = json.loads((short_run.out_dir / "summary.json").read_text())
        jsonschema.validate(summary, json.loads((ROOT / "schemas" / "summary.schema.json").read_text()))
        assert summary["model"]["feature_names"] == short_run.summary.model.feature_names
        assert [e["column"] for e in summary["model"]["encoding"]] == list(short_run.summary.model.encoding[i].column for i in range(10))

    def test_model_file_without_metadata_is_refused(self, tmp_path):
        """A bare safetensors file (no fedcollab metadata) gets an error saying what is missing."""
        from safetensors.numpy import save_file

        from fedcollab.core import ConfigError
        from fedcollab.runner import load_model

        save_file({"linear.weight": np.ones((1, 13), dtype=np.float32)}, str(tmp_path / "m.safetensors"))
        with pytest.raises(ConfigError, match="no fedcollab model metadata"):
            load_model(tmp_path / "m.safetensors")


class TestPredict:
    def test_result_predict_equals_the_runs_evaluation(self, short_run, heart_spec):
        """Scoring each partner's raw test rows reproduces the accuracy and loss of the run's own federated evaluation."""
        for partner in HOSPITALS:
            rows, y = _test_split(heart_spec, partner)
            scores = short_run.predict(rows)
            assert len(scores) == short_run.summary.metrics.partners[partner].n
            p = np.clip(scores["score"].to_numpy(), 1e-12, 1 - 1e-12)
            acc = float(((p >= 0.5) == (y == 1)).mean())
            loss = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
            m = short_run.summary.metrics.partners[partner]
            assert acc == pytest.approx(m.accuracy, abs=1e-9), partner
            assert loss == pytest.approx(m.loss, rel=1e-4), partner

    def test_cli_predict_writes_scores_with_ids(self, short_run, tmp_path):
        """`fedcollab predict` validates, encodes and scores a CSV; the scores equal Result.predict's, keyed by the id column."""
        from fedcollab.cli._app import app

        rows = _clean_rows()
        rows.to_csv(tmp_path / "new.csv", index=False)
        res = CliRunner().invoke(app, ["predict", "--model", str(short_run.out_dir), "--data", str(tmp_path / "new.csv"),
                                       "--out", str(tmp_path / "scores.csv"), "--format", "json"])
        assert res.exit_code == 0, res.output
        got = json.loads(res.stdout)
        assert got["rows"] == 12 and [r["id"] for r in got["scores"]] == list(rows["id"])  # ids as written in the file
        want = short_run.predict(rows)["score"].to_numpy()
        assert [r["score"] for r in got["scores"]] == pytest.approx(want, rel=1e-6)
        lines = (tmp_path / "scores.csv").read_text().splitlines()
        assert lines[0] == "id,score,predicted" and len(lines) == 13

    def test_cli_predict_names_the_bad_column(self, short_run, tmp_path):
        """An unknown category stops with the data exit code and names the column and the value."""
        from fedcollab.cli._app import app

        rows = _clean_rows(3)
        rows.loc[1, "cp"] = "sharp"
        rows.to_csv(tmp_path / "bad.csv", index=False)
        res = CliRunner().invoke(app, ["predict", "--model", str(short_run.out_dir), "--data", str(tmp_path / "bad.csv")])
        assert res.exit_code == 3
        assert "`cp`" in res.output and "'sharp'" in res.output

    def test_rows_without_label_score_and_missing_features_are_named(self, short_run):
        """The label column is optional; a row missing a feature value is an error naming the row."""
        from fedcollab.core import DataValidationError

        rows = _clean_rows(4).drop(columns=["num"])
        assert len(short_run.predict(rows)) == 4
        rows.loc[2, "chol"] = None
        with pytest.raises(DataValidationError, match=r"rows 2"):
            short_run.predict(rows)


class TestNotebookApi:
    def test_dataframes_run_like_files(self, short_run, heart_spec, tmp_path):
        """fedcollab.run(spec, data={partner: DataFrame}) validates and uses the frames: the same row counts as the file run."""
        import pandas as pd

        import fedcollab

        df = pd.read_csv(EMBEDDED)  # pandas' own dtypes, as a notebook would have them
        frames = {name: df[df["dataset"] == ds].reset_index(drop=True) for name, ds in HOSPITALS.items()}
        res = fedcollab.run(heart_spec.replace(training={"rounds": 1}), out=tmp_path / "frames", data=frames)
        assert {k: v.n for k, v in res.summary.metrics.partners.items()} == {k: v.n for k, v in short_run.summary.metrics.partners.items()}
        assert res.summary.metrics.pooled_test.n == short_run.summary.metrics.pooled_test.n

    def test_bad_frame_is_refused_before_simulating(self, heart_spec, tmp_path):
        """A frame with an unknown category, or a frame for an unknown partner, fails up front naming what is wrong."""
        import pandas as pd

        import fedcollab
        from fedcollab.core import ConfigError, DataValidationError

        df = pd.read_csv(EMBEDDED)
        bad = df[df["dataset"] == "Cleveland"].copy()
        bad.loc[bad.index[0], "sex"] = "M"
        with pytest.raises(DataValidationError) as err:
            fedcollab.run(heart_spec, out=tmp_path / "x", data={"cleveland": bad})
        assert "data['cleveland']" in str(err.value) and any("`sex`" in p for p in err.value.problems)
        with pytest.raises(ConfigError, match="not partners of the spec"):
            fedcollab.run(heart_spec, out=tmp_path / "y", data={"boston": df})

    def test_spec_replace_merges_and_validates(self, heart_spec):
        """replace() merges nested tables, keeps the spec's folder, and names the field of a bad value."""
        from fedcollab.core import SpecError

        s = heart_spec.replace(training={"rounds": 5})
        assert s.training.rounds == 5 and s.training.batch_size == heart_spec.training.batch_size and s.base_dir == heart_spec.base_dir
        with pytest.raises(SpecError) as err:
            heart_spec.replace(training={"rounds": 0})
        assert err.value.problems[0].startswith("`training.rounds`")
        with pytest.raises(SpecError) as err:
            heart_spec.replace(training={"roundz": 3})
        assert "`training.roundz` is not a known field" in err.value.problems[0]
        with pytest.raises(SpecError) as err:
            heart_spec.replace(privacy={"mode": "record"})
        assert "`privacy`" in err.value.problems[0] and "target_epsilon" in err.value.problems[0]


class TestFlowerApp:
    def test_new_writes_a_flower_app(self, tmp_path, monkeypatch):
        """`fedcollab new` writes a folder Flower accepts: [tool.flwr.app] components that import as ServerApp/ClientApp."""
        from flwr.clientapp import ClientApp
        from flwr.common.config import validate_config
        from flwr.serverapp import ServerApp

        from fedcollab.cli._app import app

        res = CliRunner().invoke(app, ["new", "heart_app", "--into", str(tmp_path)])
        assert res.exit_code == 0, res.output
        root = tmp_path / "heart_app"
        config = tomllib.loads((root / "pyproject.toml").read_text())
        assert config["tool"]["flwr"]["app"]["components"] == {"serverapp": "heart_app.server_app:app", "clientapp": "heart_app.client_app:app"}
        assert config["tool"]["flwr"]["federations"]["local-simulation"]["options"]["num-supernodes"] == 4
        ok, errors, _ = validate_config(config, check_module=False, project_dir=root)
        assert ok, errors
        monkeypatch.syspath_prepend(str(root))
        import importlib

        server = importlib.import_module("heart_app.server_app")
        client = importlib.import_module("heart_app.client_app")
        assert isinstance(server.app, ServerApp) and isinstance(client.app, ClientApp)
        assert (root / "heart_app" / "spec.toml").read_bytes() == (ROOT / "fedcollab" / "specs" / "heart-disease.toml").read_bytes()
        for mod in [m for m in sys.modules if m.startswith("heart_app")]:
            monkeypatch.delitem(sys.modules, mod)

    def test_new_refuses_a_bad_name(self, tmp_path):
        """A name that is not a Python package name is refused, naming NAME."""
        from fedcollab.cli._app import app

        res = CliRunner().invoke(app, ["new", "Heart-App", "--into", str(tmp_path)])
        assert res.exit_code == 2 and "`NAME`" in res.output


class TestDisplay:
    def test_cholesterol_example_asks_for_chol(self):
        """The "cholesterol" example query's mean is over `chol`, not `thalch`."""
        from fedcollab.spec import load_query

        q = load_query(ROOT / "examples" / "query-chol-by-sex.toml")
        assert [s.column for s in q.statistics if s.kind == "mean"] == ["chol"]

    def test_epsilon_plot_scales_to_the_spend_and_separates_lines(self, tmp_path):
        """Four identical curves under a budget of 8 but spending 1: the axis ends near 1, each line has its own marker and x offset."""
        from fedcollab.audit._report import _plot, _Point, _Series

        series = [_Series(key=(p, p, "record", "coordinator"), budgets=[8.0],
                          points=[_Point(r, r, "run", r, 0.3 * r, 0.3 * r) for r in (1, 2, 3)]) for p in HOSPITALS]
        fig = _plot(series, tmp_path / "epsilon.png", several_runs=False)
        ax = fig.axes[0]
        assert ax.get_ylim()[1] < 1.5
        recomputed = [ln for ln in ax.get_lines() if ln.get_label().endswith(": recomputed")]
        assert len({ln.get_marker() for ln in recomputed}) == 4
        assert len({tuple(ln.get_xdata()) for ln in recomputed}) == 4
        assert any("budget ε = 8" in t.get_text() for t in ax.texts)

    def test_partner_level_table_says_so_and_shows_rounds(self, short_run, capsys):
        """A partner-level guarantee is labelled partner-level and shows rounds, not `steps 0`."""
        from fedcollab.cli._app import print_result_table
        from fedcollab.protocols.summary import Guarantee, PartnerGuarantee, Privacy

        pg = PartnerGuarantee(epsilon=1.5, target_epsilon=2.0, noise_multiplier=None, clip_norm=1.0, sample_rate=None, expected_batch=None,
                              steps=0, n_train=100, mechanism="ddg", rounds=2)
        g = Guarantee(unit="partner", observer="coordinator", accountant="rdp", accountant_version="x", delta=1e-5, releases_included=[],
                      partners={p: pg for p in HOSPITALS})
        summary = short_run.summary.model_copy(update={"privacy": Privacy(mode="distributed", guarantees=[g], non_private_releases=[])})
        import os

        os.environ["COLUMNS"] = "200"
        try:
            print_result_table(summary)
        finally:
            del os.environ["COLUMNS"]
        text = capsys.readouterr().out
        assert "partner-level" in text and "rounds" in text and "steps" not in text

    def test_wrote_line_lists_ledger_and_roster(self, short_run, capsys):
        """The end-of-run line names every file written, ledger and roster included."""
        from fedcollab.cli._app import _emit

        _emit(short_run, "table")
        last = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("wrote")][-1]
        assert "ledger.jsonl" in last and "roster.json" in last and "model.safetensors" in last

    def test_keygen_prints_the_key_on_one_line(self, tmp_path):
        """`node keygen` prints the OpenSSH public key unwrapped, exactly as in the .pub file."""
        from fedcollab.cli._app import app
        from fedcollab.node import init_node_home

        init_node_home(tmp_path / "n", partner="cleveland")
        res = CliRunner().invoke(app, ["node", "keygen", str(tmp_path / "n")], env={"COLUMNS": "60"})
        assert res.exit_code == 0, res.output
        pub = (tmp_path / "n" / "flower_auth_key.pub").read_text().strip()
        assert pub in res.stdout.splitlines()

    def test_audit_verify_keeps_party_names_at_80_columns(self, short_run):
        """audit verify on an 80-column terminal shows `va-long-beach` whole in its tables."""
        from fedcollab.cli._app import app

        out = short_run.out_dir
        res = CliRunner().invoke(app, ["audit", "verify", str(out / "ledger.jsonl"), "--roster", str(out / "roster.json")], env={"COLUMNS": "80"})
        assert res.exit_code == 0, res.output
        assert "va-long-beach" in res.stdout and "va-long-b…" not in res.stdout

    def test_zero_target_epsilon_exit_code_agrees_with_exit_codes(self, tmp_path):
        """target_epsilon = 0 is a spec error (exit 2), and exit-codes says that 2 covers it."""
        from fedcollab.cli._app import app
        from fedcollab.core import EXIT_CODE_HELP, ExitCode

        text = (ROOT / "specs" / "heart-disease-dp.toml").read_text()
        import re

        bad = tmp_path / "bad.toml"
        bad.write_text(re.sub(r"target_epsilon = [0-9.]+", "target_epsilon = 0", text))
        res = CliRunner().invoke(app, ["spec", "validate", str(bad)])
        assert res.exit_code == 2 and "privacy.target_epsilon" in res.output
        assert "target_epsilon = 0" in EXIT_CODE_HELP[ExitCode.CONFIG_INVALID]
        assert "not read from a spec" in EXIT_CODE_HELP[ExitCode.PRIVACY_INVALID]

    def test_profile_shows_usable_at_most_rows_and_drops_noise_bins(self):
        """Usable rows are shown at most rows; histogram bins under 2 sigma are not drawn, the rest carry error bars."""
        from fedcollab.runner._profile_report import shown_hist, shown_usable

        assert shown_usable(304.0, 311.0) == 304.0 and shown_usable(304.0, 290.0) == 290.0
        h, err = shown_hist(np.array([0.0, 3.0, 50.0, 150.0, -2.0]), sigma=4.0)
        assert h[0] == h[1] == h[4] == 0 and h[2:4].sum() == pytest.approx(1.0)
        assert err[2] == pytest.approx(4.0 / 200.0) and err[1] == 0


class TestFlowerAppRuns:
    def test_app_runs_one_round_in_process(self, tmp_path, monkeypatch):
        """The written ServerApp and ClientApp complete a 1-round simulation: a verified ledger and a usable model."""
        import importlib

        from fedcollab.audit import verify_ledger
        from fedcollab.cli._new import write_flower_app
        from fedcollab.core import ExitCode
        from fedcollab.runner import load_model
        from fedcollab.runner._run import set_flower_env, simulate_apps
        from fedcollab.spec import load_roster, load_spec

        one = tmp_path / "one.toml"
        one.write_text(SPEC.read_text().replace("rounds = 20", "rounds = 1"))
        root = write_flower_app("flwr_one_round", spec=one, into=tmp_path)
        monkeypatch.syspath_prepend(str(root))
        server = importlib.import_module("flwr_one_round.server_app").app
        client = importlib.import_module("flwr_one_round.client_app").app
        set_flower_env()
        simulate_apps(load_spec(one), server, client)
        out = root / "runs"
        assert json.loads((out / "run.json").read_text())["finished"] is True
        assert verify_ledger(out / "ledger.jsonl", load_roster(out / "roster.json")).exit_code == ExitCode.OK
        assert len(load_model(out / "model.safetensors").predict(_clean_rows(5))) == 5
        for mod in [m for m in sys.modules if m.startswith("flwr_one_round")]:
            monkeypatch.delitem(sys.modules, mod)
