#!/usr/bin/env bash
# Spark GPU discovery script (spark.executor.resource.gpu.discoveryScript /
# spark.worker.resource.gpu.discoveryScript): prints the GPUs this host has, as
#   {"name": "gpu", "addresses": ["0", "1"]}
# from nvidia-smi's indices. Ship it to executors with --files scripts/gpu-discovery.sh.
set -euo pipefail
if ! command -v nvidia-smi > /dev/null 2>&1; then
  echo "gpu-discovery.sh: nvidia-smi not found on ${HOSTNAME:-this host}; it has no NVIDIA driver" >&2
  exit 1
fi
indices=$(nvidia-smi --query-gpu=index --format=csv,noheader | tr -d ' ')
addresses=$(printf '%s\n' "$indices" | sed '/^$/d' | sed 's/.*/"&"/' | paste -sd, -)
echo "{\"name\": \"gpu\", \"addresses\": [${addresses}]}"
