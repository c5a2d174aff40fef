#!/usr/bin/env bash
# Run a query on an existing cluster, from any machine that can reach the head.
#   cluster/submit.sh HEAD_ADDRESS:6379 "Compare Python, Rust, and Go for web development" [metaagent run options]
# Every node needs metaagent-ray installed (same version) and the LLM backend it will call
# (an Ollama server reachable at --ollama-host from every node, or the local extra).
set -euo pipefail
head=${1:?usage: cluster/submit.sh HEAD_ADDRESS:6379 QUERY [options]}
query=${2:?usage: cluster/submit.sh HEAD_ADDRESS:6379 QUERY [options]}
shift 2
exec metaagent run "$query" --address "$head" "$@"
