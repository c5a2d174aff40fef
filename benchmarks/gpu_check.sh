#!/usr/bin/env bash
# The GPU check of --serve-llm (docs/serve-llm.md), as one prepared script that ends within 8 minutes:
#
#   benchmarks/gpu_check.sh          # a GPU machine: CUDA llama.cpp replicas, 2 on one GPU against 1
#   benchmarks/gpu_check.sh --dry    # (or DRY=1) this CPU machine: the same runs, llama.cpp on the CPU
#
# It installs what it needs into .venv (the local and serve extras; on a GPU, xllamacpp's CUDA build
# from its own index, which offloads every layer to the GPU Ray gives the replica), then runs
# benchmarks/serve_llm.py: one 16-agent plan through 1 replica, then through 2 (prefix routing),
# printing per replica the requests served, with the makespan and completion tokens per second.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=${DRY:-0}
if [[ "${1:-}" == "--dry" ]]; then DRY=1; fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q -e ".[local,serve]"

if [[ "$DRY" == 1 ]]; then
    echo "dry run: llama.cpp replicas on the CPU"
    ARGS=(--threads 1 --parallel 4)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\)\.\([0-9]*\).*/\1\2/p')
    index=cu124
    if [[ "${cuda:-0}" -ge 128 ]]; then index=cu128; fi
    .venv/bin/pip install -q --force-reinstall --no-deps xllamacpp --index-url "https://xorbitsai.github.io/xllamacpp/whl/$index"
    ARGS=(--threads 2 --parallel 8 --cpus-per-replica 1 --gpus-per-replica 0.5)
fi

port=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
timeout 420 .venv/bin/python -m benchmarks.serve_llm --agents 16 --replicas 1 2 --routers prefix --port "$port" "${ARGS[@]}"
