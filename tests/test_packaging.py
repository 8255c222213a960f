"""The packaging files agree with each other, so conda and pip users get the same course."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _conda_pip_requirements() -> tuple[list[str], list[str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda, pip = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip.extend(dep["pip"])
        else:
            conda.append(dep)
    return conda, pip


def _all_requirements() -> list[str]:
    project = _pyproject()["project"]
    return [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]


def test_environment_yml_mirrors_pyproject() -> None:
    conda, pip = _conda_pip_requirements()
    extras = sorted(_pyproject()["project"]["optional-dependencies"])
    install = f"-e .[{','.join(extras)}]"
    assert install in pip, f"environment.yml must install cirlib itself with every extra ({install})"
    assert sorted(p for p in pip if p != install) == sorted(_all_requirements())


def test_test_tools_are_not_runtime_dependencies() -> None:
    runtime = {re.split("[=<>]", d)[0] for d in _pyproject()["project"]["dependencies"]}
    assert not runtime & {"pytest", "nbval", "papermill", "ruff", "jupyterlab"}


def test_python_version_agrees() -> None:
    conda, _ = _conda_pip_requirements()
    (py,) = [c for c in conda if c.startswith("python")]
    assert py == "python=3.11"
    assert _pyproject()["project"]["requires-python"] == ">=3.11,<3.12"


def test_torch_pins() -> None:
    deps = _pyproject()["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_every_dependency_is_pinned() -> None:
    for dep in _all_requirements():
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.]*", dep), dep


def test_ci_calls_make_test() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make all" in readme
