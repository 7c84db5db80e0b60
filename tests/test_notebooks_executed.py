"""Executed notebooks carry their figures inline and no error output.

``./run_all.sh --tests`` executes every notebook at the smoke profile with papermill into a temporary folder and
runs this file with ``FLATNESS_EXECUTED_DIR`` set to it (``./run_all.sh`` does the same for
``notebooks/executed/<profile>/`` after a notebooks run); ``FLATNESS_EXECUTED_NAMES`` (space-separated file names)
restricts the check to the notebooks just run. Without ``FLATNESS_EXECUTED_DIR`` the tests skip: executing the
notebooks is run_all.sh's step, not pytest's.
"""

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = os.environ.get("FLATNESS_EXECUTED_DIR")


def _executed() -> list[Path]:
    if not EXECUTED:
        return []
    names = os.environ.get("FLATNESS_EXECUTED_NAMES", "").split()
    if names:
        return [Path(EXECUTED) / n for n in names]
    return sorted(Path(EXECUTED).glob("[0-9][0-9]_*.ipynb"))


def outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def problems(nb: dict) -> list[str]:
    """What is wrong with an executed notebook: no inline figure, an error output, an unexecuted code cell."""
    out = outputs(nb)
    found = []
    if not any("image/png" in o.get("data", {}) for o in out):
        found.append("no image/png output (was MPLBACKEND=Agg set for the kernel?)")
    found += [f"error output: {o.get('ename')}: {o.get('evalue')}" for o in out if o.get("output_type") == "error"]
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    if any(c.get("execution_count") is None for c in code):
        found.append("a code cell was not executed")
    return found


needs_executed = pytest.mark.skipif(not EXECUTED, reason="FLATNESS_EXECUTED_DIR is not set: run ./run_all.sh "
                                                         "--tests (it executes the notebooks first)")


@needs_executed
def test_every_notebook_was_executed():
    assert _executed(), f"no executed notebook in {EXECUTED}"
    missing = [p.name for p in _executed() if not p.is_file()]
    assert not missing, f"not executed into {EXECUTED}: {missing}"


@needs_executed
@pytest.mark.parametrize("path", _executed() or [None], ids=lambda p: getattr(p, "name", "none"))
def test_executed_notebook_shows_figures_and_no_error(path):
    if path is None:
        pytest.fail(f"no executed notebook in {EXECUTED}")
    nb = json.loads(path.read_text())
    assert not problems(nb), f"{path}: {problems(nb)}"


def test_problems_detects_missing_figure_and_error():
    """The check can fail: no inline figure, an error output, an unexecuted cell (runs without notebooks)."""
    cell = {"cell_type": "code", "source": ["plt.plot()"], "execution_count": 1,
            "outputs": [{"output_type": "display_data", "data": {"text/plain": "<Figure>"}}]}
    assert problems({"cells": [cell]}) == ["no image/png output (was MPLBACKEND=Agg set for the kernel?)"]
    cell["outputs"].append({"output_type": "display_data", "data": {"image/png": "iVBOR"}})
    assert problems({"cells": [cell]}) == []
    cell["outputs"].append({"output_type": "error", "ename": "AssertionError", "evalue": "r", "traceback": []})
    assert problems({"cells": [cell, {**cell, "outputs": [], "execution_count": None}]}) == [
        "error output: AssertionError: r", "a code cell was not executed"]
