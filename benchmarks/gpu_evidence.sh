#!/usr/bin/env bash
# The command that produced reports/faster-qwen3-tts/: run on the GPU machine from the repo root,
# with the pinned wheels (requirements.lock) on PYTHONPATH. Each recipe's run directory is packed
# (without the large per-layer traces) into $OUT/<recipe>.tar.gz.
#   bash benchmarks/gpu_evidence.sh faster-qwen3-tts faster-qwen3-tts-eager faster-qwen3-tts-fp32
set -u
for name in "$@"; do
  python3 -m parity.cli run recipes/prompts/en_zh_18.jsonl --recipe "recipes/$name.toml" --out "/tmp/runs/$name" --force
  echo "$name: exit $?"
  tar czf "$OUT/$name.tar.gz" -C /tmp/runs --exclude='*.reference.safetensors' --exclude='*.forced.safetensors' "$name"
done
