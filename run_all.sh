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
notebook in notebooks/ headless with papermill, writing executed notebooks to notebooks/executed/<profile>/,
figures to figures/ and result tables to results/.

Options:
  --profile P      smoke | cpu | paper   (default: cpu; paper expects a GPU)
  --only NN        run only notebooks whose name starts with NN (repeatable), e.g. --only 01
  -p NAME VALUE    pass a parameter through to papermill (repeatable), e.g. -p n_prior_samples 1e6
  --tests          run the full test suite instead: pytest tests/, then every notebook under nbval
                   at the smoke profile, then every benchmark at --quick sizes (this is what CI runs)
  --bench          run the benchmarks at full size (python benchmarks/run.py) instead
  --setup-only     only create/refresh the environment
  -h, --help       this help

Environment: FLATNESS_VENV (venv path), PYTHON (interpreter used to create it), FLATNESS_DATA_DIR (extra
data folder), FLATNESS_RESULTS_DIR (result tables; default results/).
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
    -p) params+=(-p "${2:?-p needs NAME VALUE}" "${3:?-p needs NAME VALUE}"); shift 3 ;;
    --tests) mode=tests; shift ;;
    --bench) mode=bench; shift ;;
    --setup-only) mode=setup; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$profile" in smoke|cpu|paper) ;; *) echo "run_all.sh: unknown profile '$profile'; allowed: smoke, cpu, paper" >&2; exit 2 ;; esac

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
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
cd "$ROOT"

notebooks=()
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  [[ -f "$nb" ]] || continue
  base="$(basename "$nb")"
  if [[ ${#only[@]} -gt 0 ]]; then
    keep=0
    for o in "${only[@]}"; do [[ "$base" == "$o"* ]] && keep=1; done
    [[ $keep -eq 1 ]] || continue
  fi
  notebooks+=("$nb")
done

case "$mode" in
  setup) exit 0 ;;
  tests)
    echo "== unit tests"
    "$VENV/bin/python" -m pytest tests/ -q
    echo "== notebooks under nbval at the smoke profile"
    FLATNESS_PROFILE=smoke "$VENV/bin/python" -m pytest --nbval-lax -q -p no:cacheprovider \
      --ignore=notebooks/executed "${notebooks[@]}"
    echo "== benchmarks at --quick sizes (they must run; their ratios are printed, not asserted)"
    "$VENV/bin/python" benchmarks/run.py --quick
    ;;
  bench)
    "$VENV/bin/python" benchmarks/run.py
    ;;
  notebooks)
    out="notebooks/executed/$profile"
    mkdir -p "$out" figures
    for nb in "${notebooks[@]}"; do
      echo "== $nb (profile $profile)"
      "$VENV/bin/python" -m papermill "$nb" "$out/$(basename "$nb")" -k python3 \
        -p profile "$profile" "${params[@]}" --cwd notebooks
    done
    echo "== done: figures in figures/, executed notebooks in $out/, tables in results/"
    ;;
esac
