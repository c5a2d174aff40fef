#!/usr/bin/env bash
# Run a query on a cluster as a Ray Job, from any machine that reaches the head's dashboard; the job's
# log is followed live and its run directory comes back under runs/.
#   RAY_AUTH_TOKEN=<token> RAY_AUTH_MODE=token cluster/submit.sh http://HEAD:8265 "Compare Python, Rust, and Go" [metaagent submit options]
# Every node needs metaagent-ray installed (same version) and the LLM backend it will call.
set -euo pipefail
head=${1:?usage: cluster/submit.sh http://HEAD:8265 QUERY [options]}
query=${2:?usage: cluster/submit.sh http://HEAD:8265 QUERY [options]}
shift 2
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
exec metaagent submit "$query" --address "$head" "$@"
