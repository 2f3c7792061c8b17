#!/usr/bin/env bash
# GPU evidence for the faster-qwen3-tts-batch engine (run on a CUDA GPU from the repo root, with
# requirements.lock installed). Writes into $OUT (default reports/faster-qwen3-tts-batch):
#   probe_gpu.json      the package as published on this stack, stage by stage (which calls fail)
#   gpu_tests.log       tests marked gpu: batched graph taps equal eager values, row by row
#   summary.json        parity run of recipes/faster-qwen3-tts-batch4.toml (0.6B base dims, bf16,
#                       batch of 4 voice-clone rows vs the batch-1 reference, fp32 truth); its
#                       "batch" key holds the per-row table (padding, prefill error, mates)
#   faster-qwen3-tts-batch4.tar.gz  that run directory without the per-layer traces
#   bash benchmarks/gpu_faster_batch.sh
set -u
OUT=${OUT:-reports/faster-qwen3-tts-batch}
RUN=/tmp/runs/faster-qwen3-tts-batch4
mkdir -p "$OUT" /tmp/runs
python3 benchmarks/probe_faster_qwen3_tts_batch.py --device cuda --model random:0.6b-base --out "$OUT/probe_gpu.json"
echo "probe: exit $?"
python3 -m pytest -q -m gpu tests/test_faster_batch_engine.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $?"
python3 -m parity.cli run recipes/prompts/voice-clone-batch.jsonl --recipe recipes/faster-qwen3-tts-batch4.toml --out "$RUN" --force
echo "run: exit $?"
cp "$RUN/summary.json" "$OUT/summary.json"
tar czf "$OUT/faster-qwen3-tts-batch4.tar.gz" -C /tmp/runs --exclude='*.safetensors' faster-qwen3-tts-batch4
