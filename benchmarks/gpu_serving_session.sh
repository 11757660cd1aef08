#!/usr/bin/env bash
# One GPU session for the serving path and the SSD kernels (issues 19 and 25): GPU tests, then
# benchmarks, each part under its own time limit (one that overruns leaves the others' tables).
#
#     bash benchmarks/gpu_serving_session.sh     # about 14 min on an H100 (limits below), tables in $OUT
#
# Run from the repository root with streamssm importable and the peers under .peers/ (mamba-ssm
# sdist, fla-core wheel). First calls of the SSD kernels autotune their configs: the limits allow it.
set -u
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

echo "== GPU tests: SSD kernels vs float64 at the benchmark shapes, serving-path kernels, graphs == eager"
timeout 240 python -m pytest -q -p no:randomly -m gpu tests/test_ssd_kernel.py 2>&1 | tail -n 8 | tee "$OUT/tests.txt"
timeout 120 python -m pytest -q -p no:randomly -m gpu tests/test_gated_rms_norm_kernel.py tests/test_blocks_triton.py \
    tests/test_add_rms_norm_kernel.py tests/test_conv1d_kernel.py tests/test_engines.py 2>&1 | tail -n 8 | tee -a "$OUT/tests.txt"

echo "== SSD: ours vs mamba-ssm vs fla at S1-S3 (forward TFLOP/s and x byte floor), S1 kernel by kernel"
timeout 300 python benchmarks/bench_ssd.py --shapes S1,S2,S3 --no-eager --verify-shapes S1 --profile S1 \
    --out "$OUT/ssd.md"

echo "== engine: real-time 16 kHz streams, SSD chunk 256 vs 512 for the 320-token calls"
timeout 120 python benchmarks/bench_realtime.py --streams 384,512 --calls 5 --engines graphs --ssd-chunks 256,512 \
    --profile --out "$OUT/realtime.md"

echo "== engine host cost per call without the model (what runs serially with the GPU), 256-1024 streams"
timeout 60 python benchmarks/bench_engine_host.py --device cuda --streams 256,512,1024 | tee "$OUT/engine_host.md"

echo "== service: websocket clients at real-time pace (12 client processes), and the engine as it calls it"
timeout 200 python benchmarks/bench_service.py --model d512 --device cuda --dtype bfloat16 --engine graphs --prepare \
    --clients 64,128,192 --client-procs 12 --seconds 3 --max-wall 150 --all --engine-only | tee "$OUT/service.md"

echo "== service with 4 websocket worker processes (serve --workers 4): where one event loop stopped (~130)"
timeout 240 python benchmarks/bench_service.py --model d512 --device cuda --dtype bfloat16 --engine graphs --prepare \
    --workers 4 --clients 128,256,384 --client-procs 12 --seconds 3 --max-wall 200 --all | tee "$OUT/service_workers.md"

echo "== conv1d at the serving shape (channel-last, carried state) vs cuDNN"
timeout 90 python benchmarks/bench_conv1d.py --shapes R1 --layouts channel-last --state --out "$OUT/conv1d.md"

echo "== tables in $OUT"
