#!/usr/bin/env bash
# Start a Ray head node that offers this machine's LLM slots (computed from its RAM, cores, GPUs and
# the model), with the dashboard on (Ray Jobs: `metaagent submit`, `ray job submit`) and token
# authentication on.
#   cluster/start-head.sh [--port 6379] [--dashboard-host 127.0.0.1] [--dashboard-port 8265] [--llm ollama|local|fake] [--model M]
# --dashboard-host 0.0.0.0 opens the job API to the network (default: this machine only).
# The token: RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH if set, else ~/.ray/auth_token (created if missing).
# Give it to each worker and driver as RAY_AUTH_TOKEN, with RAY_AUTH_MODE=token.
set -euo pipefail
port=6379 dashboard_host=127.0.0.1 dashboard_port=8265
while [[ $# -gt 0 ]]; do
    case $1 in
        --port) port=$2; shift 2 ;;
        --dashboard-host) dashboard_host=$2; shift 2 ;;
        --dashboard-port) dashboard_port=$2; shift 2 ;;
        *) break ;;
    esac
done
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && -z ${RAY_AUTH_TOKEN_PATH:-} ]]; then
    ray get-auth-token --generate >/dev/null  # never print the token into logs
fi
resources=$(metaagent node-resources "$@")
ray start --head --port="$port" --include-dashboard=true --dashboard-host="$dashboard_host" \
    --dashboard-port="$dashboard_port" --resources="$resources"
ip=$(hostname -I | awk '{print $1}')
echo "head started with $resources (token authentication: $RAY_AUTH_MODE)"
echo "workers:  RAY_AUTH_TOKEN=\$(ray get-auth-token) cluster/start-worker.sh $ip:$port"
echo "jobs:     metaagent submit QUERY --address http://$dashboard_host:$dashboard_port"
