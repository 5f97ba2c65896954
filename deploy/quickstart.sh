#!/usr/bin/env bash
# Sets everything up on a fresh machine, starts the cluster on the embedded SmolLM2 model (a local Ray and
# redis-server, a prefill pool and a decode pool behind the ingress), asks it a question over HTTP, prints the
# answer, and keeps serving until Ctrl-C. Extra arguments go to `tandem serve` (e.g. --http-port 8001).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash deploy/setup.sh
export HF_HUB_OFFLINE=1

port=8000
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ "${args[$i]}" == "--http-port" ]] && port="${args[$((i + 1))]}"
done

.venv/bin/tandem serve "$@" &
server=$!
trap 'kill -INT "$server" 2>/dev/null; wait "$server"' EXIT INT TERM

.venv/bin/python - "$port" "$server" <<'PY'
import json, os, sys, time, urllib.request

port, server = sys.argv[1], int(sys.argv[2])
question = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 64,
            "temperature": 0}
deadline = time.monotonic() + 900
while True:
    try:
        os.kill(server, 0)
    except OSError:
        sys.exit("tandem serve exited before it answered")
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/generate", json.dumps(question).encode())
        answer = json.load(urllib.request.urlopen(request, timeout=60))
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("tandem serve did not answer within 15 minutes")
        time.sleep(2)
print(f"\nQ: {question['messages'][0]['content']}\nA: {answer['text']}\n", flush=True)
PY
echo "Serving on http://127.0.0.1:$port/generate; Ctrl-C stops." >&2
wait "$server"
