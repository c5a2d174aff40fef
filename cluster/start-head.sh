#!/usr/bin/env bash
# Start a Ray head node that offers this machine's LLM slots (computed from its RAM, cores, GPUs
# and the model), then print the address workers and drivers use.
#   cluster/start-head.sh [--llm ollama|local|fake] [--model M]
set -euo pipefail
resources=$(metaagent node-resources "$@")
ray start --head --port=6379 --resources="$resources" --include-dashboard=false
echo "head started with $resources; workers: cluster/start-worker.sh $(hostname -I | awk '{print $1}'):6379"
