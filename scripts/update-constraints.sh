#!/usr/bin/env bash
# Refreshes constraints.txt to the newest versions pyproject.toml allows, and only if they pass:
#   bash scripts/update-constraints.sh               # torch stays at the pinned version
#   TORCH=2.14.1 bash scripts/update-constraints.sh  # also move torch
# Run it when a dependency has a release you need, or before a release of saetrain. It installs
# into a throwaway virtualenv (your environment is not touched) with no constraints, runs the
# quickstart smoke check and the test suite from the repo root, and rewrites constraints.txt only
# when both pass. Otherwise it names the failing tests and the versions that moved, leaves the
# file as it was, and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pinned_torch=$(sed -n 's/^torch==//p' constraints.txt)
torch=${TORCH:-$pinned_torch}
echo "update-constraints: newest allowed versions in a throwaway virtualenv (torch $torch)"
"$PY" -m venv "$work/venv"
vpy="$work/venv/bin/python"
"$vpy" -m pip install -q --upgrade pip
# No saetrain pins: the newest versions pyproject.toml's ranges allow.
grep -E '^torch==' constraints.txt | sed "s/==.*/==$torch/" >"$work/loose.txt"
PATH="$work/venv/bin:$PATH" PYTHON="$vpy" SAETRAIN_CONSTRAINTS="$work/loose.txt" \
  bash scripts/setup.sh >"$work/setup.log" 2>&1 || {
  tail -20 "$work/setup.log"
  echo "update-constraints: the newest versions do not install (above); constraints.txt unchanged"
  exit 1
}
{
  sed -n '/^#/p' constraints.txt
  "$vpy" -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+[a-z0-9.]*$/torch==\1/' | sort -f
} >"$work/constraints.txt"
moved=$(diff <(grep -v '^#' constraints.txt) <(grep -v '^#' "$work/constraints.txt") |
  sed -n 's/^> /  now /p; s/^< /  was /p' || true)
echo "update-constraints: versions that moved:"
echo "${moved:-  none}"
export PATH="$work/venv/bin:$PATH" PYTHON="$vpy"
if ! bash scripts/quickstart_smoke.sh >"$work/smoke.log" 2>&1; then
  tail -20 "$work/smoke.log"
  echo "update-constraints: the quickstart smoke check fails with these versions (above); constraints.txt unchanged"
  exit 1
fi
set +e
"$vpy" -m pytest -q -p no:cacheprovider -rfE >"$work/pytest.log" 2>&1
rc=$?
set -e
tail -1 "$work/pytest.log"
if [ "$rc" -ne 0 ]; then
  echo "update-constraints: the suite fails with these versions; constraints.txt unchanged. Failing:"
  grep -E '^(FAILED|ERROR) ' "$work/pytest.log" || tail -20 "$work/pytest.log"
  exit 1
fi
cp "$work/constraints.txt" constraints.txt
echo "update-constraints: the suite passed; constraints.txt rewritten"
