#!/usr/bin/env bash
# Creates the virtualenv the Python client's tests run in: pycapnp, pytest and pytest-asyncio
# from PyPI at the versions in clients/python/requirements-test.txt, and the client itself as
# a user installs it (`pip install ./clients/python`).
#
#   scripts/python-venv.sh [VENV_DIR]      # default: target/python-venv
#
# tests/python.rs runs it when the venv is missing; .ci/run runs it up front.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/target/python-venv}
pip_quiet=(--quiet --disable-pip-version-check --no-input)
requirements="$root/clients/python/requirements-test.txt"
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian's python3 ships venv separately.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            rm -rf "$venv"
            python3 -m venv "$venv"
        else
            echo "python3 -m venv failed; install python3-venv" >&2
            exit 1
        fi
    fi
fi
# Installed once per version of the requirements file.
if [ "$(cat "$venv/.capsync-requirements" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/python" -m pip install "${pip_quiet[@]}" -r "$requirements"
    echo "$want" > "$venv/.capsync-requirements"
fi
# The client itself, offline (its dependencies are in place): refreshed on every run so the
# installed copy is the checkout's.
"$venv/bin/python" -m pip install "${pip_quiet[@]}" --no-deps --no-build-isolation --force-reinstall "$root/clients/python" >/dev/null
echo "$venv"
