#!/usr/bin/env bash
# Join a Ray cluster with this machine's LLM slots.
#   RAY_AUTH_TOKEN=<token> cluster/start-worker.sh HEAD_ADDRESS:6379 [--llm ollama|local|fake] [--model M]
# A cluster started by `ray start` (Ray >= 2.59) requires its token: `ray get-auth-token` on the head
# prints it; give it here as RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token).
# RAY_AUTH_MODE=disabled joins a cluster started without token authentication.
set -euo pipefail
head=${1:?usage: cluster/start-worker.sh HEAD_ADDRESS:6379 [--llm ...] [--model ...]}
shift
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} && ! -s ~/.ray/auth_token ]]; then
    echo "error: the cluster at $head needs its token: run \`ray get-auth-token\` on the head, then here: RAY_AUTH_TOKEN=<token> $0 $head $*" >&2
    exit 2
fi
resources=$(metaagent node-resources "$@")
ray start --address="$head" --resources="$resources"
echo "worker joined $head with $resources"
