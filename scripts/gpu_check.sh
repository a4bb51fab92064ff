#!/usr/bin/env bash
# Run THERE, on a lent GPU machine, in one call (the device tool's `run`, carrying .whl from
# scripts/gpu_wheels.sh):  bash scripts/gpu_check.sh
# It installs the carried wheels, runs the GPU tests, records fixtures (bench/gpu_record.py) and
# the CUDA benchmarks, and leaves everything under $OUT (at most 8 files come back):
#   pytest-gpu.log, record.log, bench.log, record/{manifest,memory_stats,peaks,oom}.json, record/oom_snapshot.pickle.gz
# Then, here: copy record/ to the folder its manifest suggests (tests/fixtures/gpu/...), and write
# the numbers into bench/RESULTS.md.
set -uo pipefail
OUT=${OUT:-/tmp/oomlens-gpu}
mkdir -p "$OUT/record"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "the carried wheels did not install: run scripts/gpu_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
status=0
# One call runs every stage; where the device's 10-minute limit is too short, name stages:
#   bash scripts/gpu_check.sh tests record      then      bash scripts/gpu_check.sh bench
stages=${*:-tests record bench}
stamp() { echo "== $1 at $(date -u +%T)"; }
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
  "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name())'
for stage in $stages; do
  stamp "$stage"
  case $stage in
    tests)
      # Named paths: collecting the whole suite would import streamlit and playwright, which that machine lacks.
      python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/gpu tests/collector/test_allocator.py tests/collector/test_whereabouts.py 2>&1 \
        | tee "$OUT/pytest-gpu.log" || status=1 ;;
    record)
      python3 -m bench.gpu_record --out "$OUT/record" 2>&1 | tee "$OUT/record.log" || status=1 ;;
    bench)
      {
        python3 -m bench.postmortem_latency --device cuda
        python3 -m bench.collector_overhead --device cuda --seq-len 1024 4096 --blocks 100 --processes 2
        # A real fine-tuning step (1.2 B parameters, bf16, LoRA): the hooks' fixed cost against it.
        python3 -m bench.collector_overhead --device cuda --model llama-3.2-1b --dtype bf16 --micro-batch 2 \
          --seq-len 2048 --blocks 60 --processes 2
        # train.loss_chunk_tokens: real peaks and step times with and without, side by side.
        python3 -m bench.chunked_loss --device cuda
      } 2>&1 | tee "$OUT/bench.log" || status=1 ;;
    *) echo "unknown stage $stage (tests, record, bench)"; status=1 ;;
  esac
done
stamp done
exit $status
