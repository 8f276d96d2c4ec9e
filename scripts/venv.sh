#!/usr/bin/env bash
# Creates and fills ./.venv with the pinned versions (constraints.txt); a no-op when
# it is already up to date. Sourced by scripts/quickstart and scripts/test.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.fedblocks-installed"
want="$(cat "$root/pyproject.toml" "$root/setup.py" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "fedblocks: installing pinned dependencies into $venv (first run takes a few minutes)" >&2
    "$venv/bin/python" -m pip install -q --upgrade "pip>=24" >&2
    "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[engines,dev]" >&2
    echo "$want" > "$stamp"
fi
