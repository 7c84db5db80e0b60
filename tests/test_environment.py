"""The two set-up files do not drift; the entry scripts are wired as the README says."""

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_mirrors_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(py["dependencies"])
    for extra in ("notebooks", "vit", "test", "dask"):
        wanted += py["optional-dependencies"][extra]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    pip = [p for p in pip if not p.startswith("-e")]
    assert {_name(r): r.replace(" ", "") for r in wanted} == {_name(r): r.replace(" ", "") for r in pip}


def test_lock_file_pins_the_pinned_stack():
    lock = dict(line.split("==") for line in (ROOT / "requirements-lock.txt").read_text().split()
                if "==" in line)
    lock = {k.lower(): v for k, v in lock.items()}
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(py["dependencies"]) + [r for e in ("notebooks", "vit", "test") for r in py["optional-dependencies"][e]]
    for r in reqs:
        if "==" in r:
            name, version = r.split("==")
            assert lock[name.lower()] == version, f"lock file disagrees with pyproject on {name}"


def test_ci_calls_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "./run_all.sh --tests" in ci and "./run_all.sh --tests" in readme


def test_run_all_help_and_bad_option():
    out = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--profile" in out.stdout and "--tests" in out.stdout
    bad = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--profile", "huge"], capture_output=True, text=True,
                         env={"FLATNESS_VENV": "/nonexistent", "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "allowed: smoke, cpu, paper" in bad.stderr


def test_every_notebook_has_parameters_cell_with_profile():
    import json

    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert nbs, "no notebooks"
    for nb in nbs:
        cells = json.loads(nb.read_text())["cells"]
        params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{nb.name}: needs exactly one papermill 'parameters' cell"
        src = "".join(params[0]["source"])
        assert "profile" in src, f"{nb.name}: the parameters cell must set profile"
        code = [c for c in cells if c["cell_type"] == "code"]
        assert sum(len("".join(c.get("outputs", []) and str(c["outputs"]))) for c in code) < 200_000, \
            f"{nb.name}: committed outputs too large"


def _run_all(*args, venv="/nonexistent"):
    """run_all.sh with a venv that does not exist: anything reaching set-up would try to create it."""
    return subprocess.run(["bash", str(ROOT / "run_all.sh"), *args], capture_output=True, text=True, timeout=60,
                          env={"FLATNESS_VENV": venv, "PATH": "/usr/bin:/bin", "PYTHON": "/nonexistent/python"})


def test_run_all_only_matching_nothing_fails_listing_notebooks(tmp_path):
    venv = tmp_path / "venv"
    for args in (["--only", "99"], ["--only", "1"], ["--tests", "--only", "99"]):
        out = _run_all(*args, venv=str(venv))
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "matches no notebook" in out.stderr and "01_boolean_prior_vs_flatness.ipynb" in out.stderr
        assert "done" not in out.stdout
    assert not venv.exists(), "selection errors must come before the venv set-up"


def test_run_all_wiring():
    """Report after a notebooks run, scheduler option, no Agg for kernels, executed-notebook check in --tests."""
    text = (ROOT / "run_all.sh").read_text()
    help_ = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--help"], capture_output=True, text=True).stdout
    assert "--scheduler" in help_ and "FLATNESS_DASK_SCHEDULER" in help_ and "REPORT.md" in help_
    assert "export FLATNESS_DASK_SCHEDULER=" in text
    assert "-m flatness.claims report --profile" in text
    assert "export MPLBACKEND" not in text and "unset MPLBACKEND" in text
    assert "tests/test_notebooks_executed.py" in text and "--nbval-lax" in text


def test_ci_installs_the_browser():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "chromium" in ci and "chromium-driver" in ci
