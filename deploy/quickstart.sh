#!/usr/bin/env bash
# Sets everything up on a fresh machine, then has Tandem answer a question with the embedded SmolLM2 model.
# Extra arguments go to `tandem generate` (e.g. --prompt "..." --max-tokens 64 --json).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash deploy/setup.sh
export HF_HUB_OFFLINE=1
if [[ $# -eq 0 ]]; then
    set -- --chat --prompt "What is the capital of France?"
fi
exec .venv/bin/tandem generate "$@"
