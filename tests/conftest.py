"""Shared fixtures: paths, the Heart specs, and one short session-scoped DP simulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"



def three_party_vertical_spec(text: str, tmp_path: Path) -> str:
    """A vertical Heart spec's ``text`` with the lab's columns split between an ECG lab and a stress-test lab.

    Writes ``ecg.csv`` and ``stress.csv`` under ``tmp_path``; the stress lab misses the first 40 ids,
    so the intersection is a three-way one. Returns the rewritten spec text.
    """
    import pandas as pd

    lab = pd.read_csv(ROOT / "fedcollab" / "data" / "embedded" / "heart_vertical_lab.csv")
    lab[["id", "cp", "fbs", "restecg"]].to_csv(tmp_path / "ecg.csv", index=False)
    lab[["id", "thalch", "exang", "oldpeak"]].iloc[40:].to_csv(tmp_path / "stress.csv", index=False)
    old = """[[partners]]
name = "lab"
source = { path = "embedded://heart_vertical_lab.csv" }
columns = ["cp", "fbs", "restecg", "thalch", "exang", "oldpeak"]"""
    assert old in text, "the vertical spec's lab partner table changed"
    return text.replace(old, f"""[[partners]]
name = "ecg"
source = {{ path = "{tmp_path / 'ecg.csv'}" }}
columns = ["cp", "fbs", "restecg"]

[[partners]]
name = "stress"
source = {{ path = "{tmp_path / 'stress.csv'}" }}
columns = ["thalch", "exang", "oldpeak"]""")

class InjectedFailure(RuntimeError):
    """A coordinator-side failure a test injects through the run's ``on_round`` callback."""


def fail_after_round_one_then_resume(spec, out: Path):
    """Run ``spec`` into ``out``, fail it once round 1 is recorded (its checkpoint written), then ``run --resume`` it.

    Returns ``(failed summary.json as a dict, the ledger's lines before the resume, the resumed Result)``.
    """
    import json

    import fedcollab

    def boom(r) -> None:
        if r.round == 1:
            raise InjectedFailure("injected coordinator failure after round 1")

    with pytest.raises(Exception):
        fedcollab.run(spec, out=out, on_round=boom)
    failed = json.loads((out / "summary.json").read_text())
    before = (out / "ledger.jsonl").read_bytes().splitlines()
    return failed, before, fedcollab.run(spec, out=out, resume=True)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def heart_spec():
    from fedcollab.spec import load_spec

    return load_spec(ROOT / "specs" / "heart-disease.toml")


@pytest.fixture(scope="session")
def heart_dp_spec():
    from fedcollab.spec import load_spec

    return load_spec(ROOT / "specs" / "heart-disease-dp.toml")


@pytest.fixture(scope="session")
def dp_cases() -> list[dict]:
    local = ROOT / "tests" / "privacy" / "dp-cases.json"
    return json.loads(local.read_text())


@pytest.fixture(scope="session")
def dp_run(tmp_path_factory, heart_dp_spec):
    """One short in-process simulation of the Heart spec with DP-SGD on (3 rounds), shared by e2e tests."""
    import fedcollab

    spec = heart_dp_spec.model_copy(update={"training": heart_dp_spec.training.model_copy(update={"rounds": 3})})
    spec = spec.with_base_dir(heart_dp_spec.base_dir)
    out = tmp_path_factory.mktemp("dp-run")
    return fedcollab.run(spec, out=out, spec_path=ROOT / "specs" / "heart-disease-dp.toml")


@pytest.fixture(scope="session", autouse=True)
def _one_ray_cluster_per_test_process():
    """The simulations of this test process share one local Ray cluster instead of starting one each.

    Flower's Ray backend starts Ray when it is not running and shuts it down after every
    simulation (``RayBackend.terminate``); starting a local cluster costs ~5 s on two cores, paid
    by some twenty simulations. The backend still builds and terminates its own actor pool for each
    run (every simulation's ClientApps are fresh processes); only ``ray.shutdown`` waits for the end
    of the session. Nothing else changes: the same simulation engine, the same actors.
    """
    try:
        import ray
    except ImportError:  # an install without the simulation extra
        yield
        return
    real = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ray.shutdown = real
        if ray.is_initialized():
            real()
