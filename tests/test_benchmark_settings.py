"""How benchmarks/run.py resolves a method's unlearning settings (no model is trained here)."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def run():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    spec = importlib.util.spec_from_file_location("benchmarks_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings(run, monkeypatch, method, suite):
    monkeypatch.setattr(run, "solver_method", lambda name, resolved: resolved)
    return run.METHODS[method](suite)


def test_per_method_settings_override_the_methods_own(run, monkeypatch):
    suite = {
        "unlearning": {"curvature": "ggn", "refine_steps": 0},
        "per_method": {"cg": {"refine_damping": "fixed"}, "cg+refine": {"refine_steps": 1}},
    }
    resolved = settings(run, monkeypatch, "cg+refine", suite)
    # suite < per_method["cg"] < the method's own (line_search, 5 steps) < per_method["cg+refine"]
    assert resolved == {"curvature": "ggn", "refine_steps": 1, "refine_damping": "line_search"}
    assert settings(run, monkeypatch, "cg", suite)["refine_damping"] == "fixed"


def test_the_full_suite_keeps_the_refinement_its_readme_table_measured(run, monkeypatch):
    resolved = settings(run, monkeypatch, "cg+refine", run.SUITES["full"])
    assert (resolved["refine_steps"], resolved["refine_damping"]) == (3, "adaptive")
    resolved = settings(run, monkeypatch, "cg+refine", run.SUITES["quick"])
    assert (resolved["refine_steps"], resolved["refine_damping"]) == (5, "line_search")
