#!/usr/bin/env bash
# Sets everything up on a fresh machine, starts the cluster on the embedded SmolLM2 model (a local Ray and
# redis-server, a prefill pool and a decode pool behind the ingress), asks it a question over gRPC, prints the
# answer, and keeps serving until Ctrl-C. Extra arguments go to `tandem serve` (e.g. --grpc-port 50052).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash deploy/setup.sh
export HF_HUB_OFFLINE=1

http_port=8000
grpc_port=50051
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ "${args[$i]}" == "--http-port" ]] && http_port="${args[$((i + 1))]}"
    [[ "${args[$i]}" == "--grpc-port" ]] && grpc_port="${args[$((i + 1))]}"
done

.venv/bin/tandem serve "$@" &
server=$!
trap 'kill -INT "$server" 2>/dev/null; wait "$server"' EXIT INT TERM

# The question goes over gRPC with Tandem's client, as a backend service would send it.
.venv/bin/python - "$grpc_port" "$server" <<'PY'
import os, sys, time

from cluster.client import TandemClient, TandemError

port, server = sys.argv[1], int(sys.argv[2])
question = "What is the capital of France?"
deadline = time.monotonic() + 900
with TandemClient(f"127.0.0.1:{port}", timeout=120) as client:
    while True:
        try:
            os.kill(server, 0)
        except OSError:
            sys.exit("tandem serve exited before it answered")
        try:
            if client.health():
                answer = client.chat([{"role": "user", "content": question}], max_tokens=64, temperature=0)
                break
        except TandemError as e:
            if e.code.name != "UNAVAILABLE":
                sys.exit(f"tandem serve refused the question: {e}")
        if time.monotonic() > deadline:
            sys.exit("tandem serve did not answer within 15 minutes")
        time.sleep(2)
print(f"\nQ: {question}\nA: {answer.text}\n", flush=True)
PY
echo "Serving: gRPC on localhost:$grpc_port (tandem generate --url localhost:$grpc_port --chat --prompt ...)," \
     "the OpenAI API on http://localhost:$http_port/v1; Ctrl-C stops." >&2
wait "$server"
