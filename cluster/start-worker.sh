#!/usr/bin/env bash
# Join a Ray cluster with this machine's LLM slots.
#   cluster/start-worker.sh HEAD_ADDRESS:6379 [--llm ollama|local|fake] [--model M]
set -euo pipefail
head=${1:?usage: cluster/start-worker.sh HEAD_ADDRESS:6379 [--llm ...] [--model ...]}
shift
resources=$(metaagent node-resources "$@")
ray start --address="$head" --resources="$resources"
echo "worker joined $head with $resources"
