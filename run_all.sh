#!/usr/bin/env bash
# Regenerate every figure, or run the test suite, on a fresh machine. See ./run_all.sh --help.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${FLATNESS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

usage() {
  cat <<EOF
Usage: ./run_all.sh [options]

Sets up (or refreshes) the virtual environment $VENV from pyproject.toml, then runs every numbered
notebook in notebooks/ headless with papermill, writing executed notebooks (figures inline) to
notebooks/executed/<profile>/, figures to figures/ (cpu) or figures/<profile>/, result tables to results/,
and at the end the claims scorecard of that profile: REPORT.md for cpu, results/<profile>/REPORT.md for
smoke and paper (python -m flatness.claims report --profile P). A notebook that fails (an error, or a
paper claim that does not hold at cpu/paper: its last cell raises ClaimFailed) does not stop the others;
the scorecard is still written and the exit status is 1, naming the failed notebooks.

Options:
  --profile P         smoke | cpu | paper   (default: cpu; paper expects a GPU)
  --only NN           run only notebooks whose file name starts with NN (repeatable), e.g. --only 01;
                      a selection that matches no notebook is an error (exit 2, the notebooks are listed)
  -p NAME VALUE       pass a parameter through to papermill (repeatable), e.g. -p n_prior_samples 1e6
  --scheduler ADDR    run sweeps on the Dask cluster at ADDR (e.g. tcp://10.0.0.5:8786): exported as
                      FLATNESS_DASK_SCHEDULER, which flatness.runs.run_sweep reads when no executor is given
  --tests             run the full test suite instead (this is what CI runs): pytest tests/ (unit tests and
                      the JupyterLab-in-Chromium test), every notebook under nbval at the smoke profile,
                      every notebook executed at smoke with papermill and checked for inline figures and
                      errors (tests/test_notebooks_executed.py), then every benchmark at --quick sizes
  --bench             run the benchmarks at full size (python benchmarks/run.py) instead
  --setup-only        only create/refresh the environment
  -h, --help          this help

Environment: FLATNESS_VENV (venv path), PYTHON (interpreter used to create it), FLATNESS_DATA_DIR (extra
data folder), FLATNESS_RESULTS_DIR (result tables; default results/), FLATNESS_FIGURES_DIR (figure root;
default figures/), FLATNESS_DASK_SCHEDULER (as --scheduler).
EOF
}

profile=cpu
mode=notebooks
only=()
params=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
    --profile=*) profile="${1#*=}"; shift ;;
    --only) only+=("${2:?--only needs a value}"); shift 2 ;;
    --only=*) only+=("${1#*=}"); shift ;;
    -p) params+=(-p "${2:?-p needs NAME VALUE}" "${3:?-p needs NAME VALUE}"); shift 3 ;;
    --scheduler) export FLATNESS_DASK_SCHEDULER="${2:?--scheduler needs an address}"; shift 2 ;;
    --scheduler=*) export FLATNESS_DASK_SCHEDULER="${1#*=}"; shift ;;
    --tests) mode=tests; shift ;;
    --bench) mode=bench; shift ;;
    --setup-only) mode=setup; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in smoke|cpu|paper) ;; *) echo "run_all.sh: unknown profile '$profile'; allowed: smoke, cpu, paper" >&2; exit 2 ;; esac

# Select the notebooks before any set-up, so that a bad selection fails at once (and creates nothing).
cd "$ROOT"
available=()
notebooks=()
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  [[ -f "$nb" ]] || continue
  base="$(basename "$nb")"
  available+=("$base")
  if [[ ${#only[@]} -gt 0 ]]; then
    keep=0
    for o in "${only[@]}"; do [[ "$base" == "$o"* ]] && keep=1; done
    [[ $keep -eq 1 ]] || continue
  fi
  notebooks+=("$nb")
done
if [[ "$mode" != setup && "$mode" != bench && ${#notebooks[@]} -eq 0 ]]; then
  if [[ ${#only[@]} -gt 0 ]]; then
    echo "run_all.sh: --only ${only[*]} matches no notebook (a prefix of the file name, e.g. --only 01); available:" >&2
  else
    echo "run_all.sh: no numbered notebook (NN_topic.ipynb) in notebooks/" >&2
  fi
  [[ ${#available[@]} -gt 0 ]] && printf '  %s\n' "${available[@]}" >&2
  exit 2
fi

setup() {
  # (Re)install when the venv is missing or pyproject.toml / the lock file changed since the last install.
  local stamp="$VENV/.flatness-install-stamp"
  local want
  want="$(cat "$ROOT/pyproject.toml" "$ROOT/requirements-lock.txt" 2>/dev/null | sha256sum | cut -d' ' -f1)"
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "== installing the suite into $VENV (pyproject.toml changed or first run)"
    local constraints=()
    [[ -f "$ROOT/requirements-lock.txt" ]] && constraints=(-c "$ROOT/requirements-lock.txt")
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
      "${constraints[@]}" -e "$ROOT[notebooks,vit,test,dask]"
    echo "$want" > "$stamp"
  fi
}

setup
# No MPLBACKEND for notebook kernels: ipykernel then selects its inline backend, so executed notebooks carry
# their figures (the notebooks also save them to files). Unit tests and benchmarks get Agg explicitly.
unset MPLBACKEND
export PYTHONUNBUFFERED=1

execute() {  # execute NOTEBOOK OUT_DIR PROFILE [papermill args...]
  local nb="$1" out="$2" prof="$3"
  shift 3
  "$VENV/bin/python" -m papermill "$nb" "$out/$(basename "$nb")" -k python3 -p profile "$prof" "$@" --cwd notebooks
}

check_executed() {  # check_executed DIR: the selected notebooks, executed in DIR, show a figure and no error
  local names=()
  for nb in "${notebooks[@]}"; do names+=("$(basename "$nb")"); done
  FLATNESS_EXECUTED_DIR="$1" FLATNESS_EXECUTED_NAMES="${names[*]}" \
    "$VENV/bin/python" -m pytest tests/test_notebooks_executed.py -q -p no:cacheprovider
}

case "$mode" in
  setup) exit 0 ;;
  tests)
    echo "== unit tests"
    MPLBACKEND=Agg "$VENV/bin/python" -m pytest tests/ -q
    # Smoke notebooks train tiny models: one thread each (on 2 busy cores, thread spinning costs ~10x).
    echo "== notebooks under nbval at the smoke profile"
    OMP_NUM_THREADS=1 FLATNESS_PROFILE=smoke "$VENV/bin/python" -m pytest --nbval-lax -q -p no:cacheprovider \
      --ignore=notebooks/executed "${notebooks[@]}"
    echo "== notebooks executed with papermill at the smoke profile (into a temporary folder), then checked"
    executed="$(mktemp -d "${TMPDIR:-/tmp}/flatness-executed.XXXXXX")"
    trap 'rm -rf "$executed"' EXIT
    for nb in "${notebooks[@]}"; do
      OMP_NUM_THREADS=1 FLATNESS_PROFILE=smoke execute "$nb" "$executed" smoke --log-level WARNING --no-progress-bar
    done
    check_executed "$executed"
    echo "== benchmarks at --quick sizes (they must run; their ratios are printed, not asserted)"
    MPLBACKEND=Agg "$VENV/bin/python" benchmarks/run.py --quick
    ;;
  bench)
    MPLBACKEND=Agg "$VENV/bin/python" benchmarks/run.py
    ;;
  notebooks)
    out="notebooks/executed/$profile"
    mkdir -p "$out"
    # A notebook that fails (an error, or a claim that does not hold: its last cell raises ClaimFailed at
    # cpu and paper) does not stop the others; the scorecard is still written, and the exit status is 1.
    failed=()
    for nb in "${notebooks[@]}"; do
      echo "== $nb (profile $profile)"
      execute "$nb" "$out" "$profile" "${params[@]}" || failed+=("$nb")
    done
    echo "== the executed notebooks carry their figures"
    ok=()
    for nb in "${notebooks[@]}"; do [[ " ${failed[*]} " == *" $nb "* ]] || ok+=("$nb"); done
    if [[ ${#ok[@]} -gt 0 ]]; then notebooks=("${ok[@]}"); check_executed "$out" || failed+=("(figure check)"); fi
    echo "== claims scorecard"
    "$VENV/bin/python" -m flatness.claims report --profile "$profile"
    if [[ ${#failed[@]} -gt 0 ]]; then
      echo "run_all.sh: ${#failed[@]} notebook(s) failed at profile $profile (see their executed copies in $out/" \
           "and the scorecard): ${failed[*]}" >&2
      exit 1
    fi
    echo "== done: figures in figures/, executed notebooks in $out/, tables in results/, scorecard above"
    ;;
esac
