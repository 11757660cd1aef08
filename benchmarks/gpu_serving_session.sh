#!/usr/bin/env bash
# GPU runs for the serving path and the kernels (issues 19 and 25), in parts that each fit one
# device call (<= 10 min); each command has its own time limit, so one that overruns leaves the
# others' tables.
#
#     bash benchmarks/gpu_serving_session.sh tests     # ~9 min: GPU tests (SSD, serving kernels, engines, workers)
#     bash benchmarks/gpu_serving_session.sh conv_tests  # ~8 min: conv1d GPU tests (cold autotuning)
#     bash benchmarks/gpu_serving_session.sh kernels   # ~10 min: SSD S1-S3 vs mamba-ssm and fla; SSD inference forward; conv1d vs cuDNN
#     bash benchmarks/gpu_serving_session.sh serving   # ~10 min: engine, host cost, service (1 and 4 workers)
#     bash benchmarks/gpu_serving_session.sh mamba3    # ~8 min: Mamba-3 vs Mamba-2 at S1, chunk 64, eager + graphs, twice; profile
#     [PEER_SHAPES=S3] bash benchmarks/gpu_serving_session.sh mamba3_peer  # ~8 min: the op beside mamba-ssm's Mamba-3 (S1,S2)
#     bash benchmarks/gpu_serving_session.sh engine_knobs  # ~4 min: engine-process CPU per chunk (paced) vs streams, batch wait, flush delay
#     bash benchmarks/gpu_serving_session.sh pipeline_fill  # ~9 min: engine process and service --workers 4 vs --pipeline-fill
#     bash benchmarks/gpu_serving_session.sh service_edge  # ~3 min: service --workers 4 at 384 and 448 clients, fill 1 and 2
#     bash benchmarks/gpu_serving_session.sh service_400  # ~4 min: the same at 400-448 clients, fill 2 and 3
#     bash benchmarks/gpu_serving_session.sh ssd_memory  # ~9 min: SSD S1/S2 and Mamba-1 M1 with peak memory, vs the peers
#     [BASE_WHEELS='w1 w2'] [AB_SHAPES=S1] bash benchmarks/gpu_serving_session.sh ssd_bwd  # ~9 min: SSD S1/S2 fwd+bwd
#                                                      # (base installs, this, peers); tests
#     [SEGMENTS=2,8] [CHUNKS=128,256] [OLD_SCAN=f.py] bash benchmarks/gpu_serving_session.sh scan  # ~9 min (~5 with mamba-ssm's library carried):
#                                                      # Mamba-1 scan M1/M2 (at forced time segments) vs mamba-ssm CUDA; tests
#     bash benchmarks/gpu_serving_session.sh rotary    # ~8 min: Mamba-3 GPU tests; rotation kernels vs 5de9c7b's, config sweep
#     BASE_SITE=/tmp/base_site bash benchmarks/gpu_serving_session.sh engine_pair
#                                                      # ~3 min: engine-process CPU per chunk, a base install vs this tree
#
# Run from the repository root with streamssm importable and the peers under .peers/ (mamba-ssm
# sdist, fla-core wheel). The conv1d kernel before today's backward is taken from git
# (7db386b~1) or, in a copy without .git, from $OLD_CONV. First calls of the kernels autotune.
set -u
# a command that fails or times out (pytest, a bench, a grep that finds no table) is remembered, and
# the script exits 1 naming its lines: its tables are written either way
set -E -o pipefail
failed=()
trap 'failed+=("$LINENO")' ERR
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
# autotuning results kept on disk: a later process running the same kernel at the same key skips it
# (the Mamba-3 layer bench's second run took 20 s instead of ~200, H100, 2026-12-06)
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
OUT=${OUT:-$(mktemp -d)}
# ... and carried from one device machine to the next: the results in $AUTOTUNE_ARCHIVE (carry it with
# the call) are unpacked into Triton's cache first, and on exit every result on this machine goes to
# $OUT/triton_autotune.tar.gz (copy that to $AUTOTUNE_ARCHIVE for the next call). Triton keys a result by
# the kernel's source, its key values, its configs, the Triton version and the GPU architecture (H100 and
# H200 are both sm_90): a call then compiles only the chosen config of a kernel, and benchmarks none (the
# mamba-ssm Mamba-3 peer's autotuning alone outlasted 200 s of a call at S1 on 2026-12-07)
TRITON_CACHE=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
AUTOTUNE_ARCHIVE=${AUTOTUNE_ARCHIVE:-.whl/triton_autotune.tar.gz}
mkdir -p "$OUT" "$TRITON_CACHE"
[ -s "$AUTOTUNE_ARCHIVE" ] && tar -xzf "$AUTOTUNE_ARCHIVE" -C "$TRITON_CACHE"
save_autotuning() {
    # through a temporary name: a call killed at its limit while this ran left an empty archive (2026-12-07)
    (cd "$TRITON_CACHE" && find . -name '*.autotune.json' | tar -czf "$OUT/triton_autotune.part" -T -) \
        && mv "$OUT/triton_autotune.part" "$OUT/triton_autotune.tar.gz"
}
trap save_autotuning EXIT
OLD_CONV=${OLD_CONV:-.peers/old_kernels/conv_7db386b.py}
OLD_ROTARY=${OLD_ROTARY:-.peers/old_kernels/rotary_5de9c7b.py}
part=${1:-all}

from_git() {
    # an earlier version of a file (revision, path, where to write it) where this copy's git has that revision;
    # otherwise the copy carried in .peers/ stays (the device's copy of the tree has a stale .git: a failed
    # `git show` had emptied the carried file on 2026-12-06)
    git cat-file -e "$1:$2" 2>/dev/null || return 0
    mkdir -p "$(dirname "$3")" && git show "$1:$2" >"$3"
}

tests() {
    echo "== GPU tests: SSD kernels (split and one-pass) vs float64, serving-path kernels, graphs == eager, workers"
    # the kernels' first config each, not autotuned (320 s ran 5 of the SSD file's cases cold on 2026-12-07);
    # the autotuned picks: part ssd_bwd (its tests and the bench's check vs float64)
    STREAMSSM_AUTOTUNE=0 timeout 320 python -m pytest -q -p no:randomly -m gpu tests/test_ssd_kernel.py 2>&1 | tail -n 8 \
        | tee "$OUT/tests.txt"
    timeout 120 python -m pytest -q -p no:randomly -m gpu tests/test_gated_rms_norm_kernel.py tests/test_blocks_triton.py \
        tests/test_add_rms_norm_kernel.py tests/test_engines.py 2>&1 | tail -n 8 | tee -a "$OUT/tests.txt"
    timeout 90 python -m pytest -q -p no:randomly tests/test_service_workers.py 2>&1 | tail -n 4 | tee -a "$OUT/tests.txt"
}

conv_tests() {
    echo "== GPU tests: conv1d vs float64 (each kernel's first config: cold autotuning of every config took ~5 min)"
    STREAMSSM_AUTOTUNE=0 timeout 450 python -m pytest -q -p no:randomly -m gpu tests/test_conv1d_kernel.py -k "not int32 and not grid_axis" \
        2>&1 | tail -n 8 | tee "$OUT/conv_tests.txt"
}

kernels() {
    echo "== SSD: ours vs mamba-ssm vs fla at S1-S3 (forward TFLOP/s and x byte floor), S1 kernel by kernel"
    timeout 300 python benchmarks/bench_ssd.py --shapes S1,S2,S3 --no-eager --verify-shapes S1 --profile S1 \
        --out "$OUT/ssd.md"
    echo "== SSD inference forward: one-pass vs split vs mamba-ssm, serving rows (carried states) and S1/S2"
    timeout 240 python benchmarks/bench_ssd_fused.py --shapes R1,R256,R384,R1024,S1,S2 --out "$OUT/ssd_fused.md"
    echo "== conv1d: the one-pass backward (both layouts) vs the one before and cuDNN; serving and long shapes"
    from_git 7db386b~1 kernels/conv1d/conv.py "$OLD_CONV"
    old=(); [ -s "$OLD_CONV" ] && old=(--old "$OLD_CONV")
    timeout 240 python benchmarks/bench_conv1d.py --shapes R2,L1,M1,S1 --layouts channel-last,time --state "${old[@]}" \
        --out "$OUT/conv1d.md"
}

serving() {
    echo "== engine: real-time 16 kHz streams, the one-pass SSD inference forward vs the split one"
    timeout 150 python benchmarks/bench_realtime.py --streams 384,512,1024 --calls 5 --engines graphs \
        --ssd-forwards auto --profile --out "$OUT/realtime.md"
    echo "== engine host cost per call without the model (what runs serially with the GPU), 256-1024 streams"
    timeout 60 python benchmarks/bench_engine_host.py --device cuda --streams 256,512,1024 | tee "$OUT/engine_host.md"
    echo "== serve --workers engine process: CPU per chunk over real links, zero-time model (the GIL-bound limit)"
    timeout 60 python benchmarks/bench_engine_process.py --device cuda --streams 256,512 --rounds 40 | tee "$OUT/engine_process.md"
    echo "== service: websocket clients at real-time pace (12 client processes), one process"
    timeout 170 python benchmarks/bench_service.py --model d512 --device cuda --dtype bfloat16 --engine graphs --prepare \
        --clients 128,192 --client-procs 12 --seconds 3 --max-wall 120 --all --engine-only | tee "$OUT/service.md"
    echo "== service with 4 websocket worker processes (serve --workers 4): 320 at the edge on 2026-12-06 (kept 1 of 3 runs)"
    timeout 220 python benchmarks/bench_service.py --model d512 --device cuda --dtype bfloat16 --engine graphs --prepare \
        --workers 4 --clients 320,384 --repeats 2 --client-procs 12 --seconds 3 --max-wall 180 --all | tee "$OUT/service_workers.md"
}

mamba3() {
    echo "== Mamba-3 vs Mamba-2 at S1, chunk 64, eager and CUDA graphs, twice (one run decides nothing: 8.9-10.4 ms)"
    for run in 1 2; do  # the first autotunes every kernel (170 s did not suffice on a fresh machine)
        timeout $((run == 1 ? 300 : 120)) python benchmarks/bench_mamba3.py --shapes S1 --chunks 64 --graphs \
            --out "$OUT/mamba3_$run.md" 2>&1 | grep -E '^[|]'
    done
    echo "== the kernel profile, its own process (timings after torch.profiler are not kept)"
    timeout 120 python benchmarks/bench_mamba3.py --shapes S1 --chunks 64 --profile S1 >"$OUT/mamba3_profile.txt" 2>&1
    sed -n '/GPU kernels/,/Self CUDA time total/p' "$OUT/mamba3_profile.txt" | cut -c1-150 | sed -n '1,80p'  # reads to the end: no SIGPIPE under pipefail
}

mamba3_peer() {
    # PEER_SHAPES=S3 for the third shape (S1,S2 with the carried autotuning: ~4 min on 2026-12-07)
    local shapes=${PEER_SHAPES:-S1,S2}
    echo "== the Mamba-3 op beside mamba-ssm's at $shapes, chunk 64 (its cold autotuning ran past 240 s twice)"
    timeout 480 python benchmarks/bench_mamba3.py --shapes "$shapes" --levels op --chunks 64 --peer \
        --out "$OUT/mamba3_peer.md" 2>&1 | grep -E '^[{|]'
}

engine_knobs() {
    # paced arrival at 128 / 256 / 512 streams: what a model call costs the engine process (calls a round
    # fall with --batch-wait-ms) against what an inbound message costs (messages fall with --flush-us);
    # the baseline runs first and last (the host's drift between runs)
    for knobs in "--batch-wait-ms 0" "--batch-wait-ms 4" "--flush-us 2000" "--batch-wait-ms 0"; do
        echo "== engine process, paced over 20 ms, $knobs"
        timeout 50 python benchmarks/bench_engine_process.py --device cuda --streams 128,256,512 --rounds 60 \
            --pace-ms 20 $knobs 2>&1 | grep -E '^[|]'
    done | tee "$OUT/engine_knobs.md"
    echo "== the engine process's event loop under cProfile (512 paced streams; 16 cores: wall ~ CPU)"
    timeout 50 python benchmarks/bench_engine_process.py --device cuda --streams 512 --rounds 60 --pace-ms 20 \
        --profile 30 2>&1 | grep -v Warning | tee -a "$OUT/engine_knobs.md"
}

ssd_memory() {
    # after 8e77daf / eef81e3 (no zero gradients of the kept outputs): peak memory vs the peers, S1/S2 with
    # the peers' rows (cold autotuning of 8 configs per SSD backward kernel: S1+S2 took > 250 s on 2026-12-06)
    echo "== SSD: ours vs mamba-ssm vs fla at S1, S2 (graph), peak memory"
    timeout 400 python benchmarks/bench_ssd.py --shapes S1,S2 --no-eager --out "$OUT/ssd_memory.md"
    echo "== Mamba-1 scan at M1, peak memory (mamba-ssm CUDA's 0.290 GiB: benchmarks/README.md; MAMBA=1 builds it, ~4 min)"
    local peers=none; [ "${MAMBA:-0}" = 1 ] && peers=mamba
    timeout 150 python benchmarks/bench_selective_scan.py --shapes M1 --peers "$peers" --no-verify \
        --out "$OUT/scan_memory.md"
}

pipeline_fill() {
    # under load the engine is never idle, so --batch-wait never applies: the pipeline rule decides the
    # calls' size (call k + 1 goes out while k runs once pipeline_fill x k's streams have samples pending);
    # engine_knobs (2026-12-06): a call costs the engine process ~0.6 ms of host CPU, and the service at
    # 320 clients ran ~35 streams a call
    for fill in 0.5 1 2; do
        echo "== engine process, paced over 20 ms, --pipeline-fill $fill"
        timeout 40 python benchmarks/bench_engine_process.py --device cuda --streams 256,512 --rounds 60 \
            --pace-ms 20 --pipeline-fill $fill 2>&1 | grep -E '^[|]'
    done | tee "$OUT/pipeline_fill.md"
    for fill in 0.5 1; do
        echo "== service --workers 4, --pipeline-fill $fill"
        timeout 230 python benchmarks/bench_service.py --model d512 --device cuda --dtype bfloat16 --engine graphs \
            --prepare --workers 4 --clients 320,384 --repeats 2 --client-procs 12 --seconds 3 --max-wall 180 --all \
            --pipeline-fill $fill | tee -a "$OUT/pipeline_fill.md"
    done
}

service_runs() {
    # the service with 4 workers, 2 runs per client count: $1 the table under $OUT, then "fill clients" pairs
    local table=$1 run
    shift
    for run in "$@"; do
        set -- $run
        echo "== service --workers 4, --pipeline-fill $1, clients $2"
        timeout 270 python benchmarks/bench_service.py --model d512 --device cuda --dtype bfloat16 --engine graphs \
            --prepare --workers 4 --clients "$2" --repeats 2 --client-procs 12 --seconds 3 --max-wall 200 --all \
            --pipeline-fill "$1" | tee -a "$OUT/$table"
    done
}

service_edge() {
    # after the pool-row scan (da45bb4: the engine's chunked call 10 % shorter at 384 streams, bench_realtime):
    # where the 4-worker service's edge lies now, at --pipeline-fill 1 and 2 (fewer, larger calls: 125 streams
    # a call took 5.6 ms of model time at 384 clients on 2026-12-06, one call of all 384 10.9 ms)
    service_runs service_edge.md "1 384,448" "2 384,448"
}

service_400() {
    # service_edge (2026-12-07): --pipeline-fill 2 held 384 clients in 2 of 2 runs (fill 1: 1 of 2), 448 in
    # neither; the issue's 400 lies between: fill 2 and 3 at 400 and 416 / 448
    service_runs service_400.md "2 400,416" "3 400,448"
}

ssd_bwd() {
    # this tree's SSD backward against base installs in the same call: $BASE_WHEELS (space-separated; or one
    # $BASE_WHEEL, e.g. the commit before) at $AB_SHAPES (default S1,S2; each new kernel source autotunes: ~60 s
    # per shape), then this wheel beside the peers; last the GPU tests vs float64 (cold autotuning: minutes)
    local wheel i=0
    for wheel in ${BASE_WHEELS:-${BASE_WHEEL:-}}; do
        i=$((i + 1))
        python -m pip install -q --no-index --no-deps --no-compile --target "/tmp/base_site$i" "$wheel" || return 1
        echo "== SSD ${AB_SHAPES:-S1,S2} fwd+bwd, base install $i ($wheel)"
        PYTHONPATH=/tmp/base_site$i:$PYTHONPATH timeout 200 python benchmarks/bench_ssd.py --shapes "${AB_SHAPES:-S1,S2}" \
            --no-eager --peers none --no-verify --out "$OUT/ssd_bwd_base$i.md" 2>&1 | grep -E '^[|]'
        save_autotuning  # after each run as well: a call killed at its limit brought none back (2026-12-07)
    done
    echo "== SSD S1, S2 fwd+bwd, this wheel beside mamba-ssm and fla; S1 kernel by kernel"
    timeout 270 python benchmarks/bench_ssd.py --shapes S1,S2 --no-eager --verify-shapes S1 --profile S1 \
        --out "$OUT/ssd_bwd.md"
    save_autotuning
    echo "== GPU tests: SSD vs float64 (bf16, fp32)"
    # 150 s ran 1 to 6 of the 12 cases after a kernel change (cold autotuning at each test shape, 2026-12-07)
    timeout 300 python -m pytest -q -p no:randomly -m gpu tests/test_ssd_kernel.py \
        -k "test_gpu_matches_float64 or test_gpu_packed_matches_reference" 2>&1 | tail -n 8 | tee "$OUT/ssd_tests.txt"
}

scan() {
    # the Mamba-1 scan (and at $SEGMENTS forced time-segment counts) beside mamba-ssm's CUDA scan: its library is
    # built (~4 min) unless carried as .peers/ssbuild/selective_scan_cuda.so, and comes back (12 MiB)
    # (OLD_SCAN: an earlier scan.py, e.g. main's beside a branch's wheel, timed too)
    local old=() so=.peers/ssbuild/selective_scan_cuda.so built=1
    [ -z "${OLD_SCAN:-}" ] || old=(--old "$OLD_SCAN")
    [ ! -f "$so" ] || built=0
    timeout 420 python benchmarks/bench_selective_scan.py --shapes "${SCAN_SHAPES:-M1,M2}" --peers mamba \
        --no-verify --segments "${SEGMENTS:-}" --chunks "${CHUNKS:-}" "${old[@]}" --out "$OUT/scan.md" 2>&1 | grep -E '^[{|]|unavailable'
    [ "$built" = 0 ] || [ ! -f "$so" ] || strip --strip-debug -o "$OUT/selective_scan_cuda.so" "$so"
    echo "== GPU tests: the Mamba-1 scan vs float64"
    # (120 s ran 5 of the 8 cases with cold compiles, 2026-12-07)
    timeout 300 python -m pytest -q -p no:randomly -m gpu tests/test_selective_scan_kernel.py 2>&1 | tail -n 6 \
        | tee "$OUT/scan_tests.txt"
}

rotary() {
    # the rotation kernels before today's instruction diet (5de9c7b: libdevice cos/sin after a float64 division,
    # int64 offsets per element) beside this tree's; the Mamba-3 layer: part mamba3
    echo "== GPU tests: the rotation kernels and the Mamba-3 scan vs their references"
    STREAMSSM_AUTOTUNE=0 timeout 300 python -m pytest -q -p no:randomly -m gpu tests/test_mamba3_rotary_kernel.py tests/test_mamba3_kernel.py \
        2>&1 | tail -n 6 | tee "$OUT/rotary_tests.txt"  # 150 s cut them short on a fresh machine (2026-12-06)
    from_git 5de9c7b kernels/mamba3/rotary.py "$OLD_ROTARY"
    echo "== rotation kernels: this tree vs 5de9c7b's, S1-S3; configs at S1, S3"
    timeout 150 python benchmarks/bench_mamba3_rotary.py --shapes S1,S2,S3 --old "$OLD_ROTARY" --out "$OUT/rotary.md"
    timeout 150 python benchmarks/bench_mamba3_rotary.py --shapes S1,S3 --sweep --out "$OUT/rotary_sweep.md" \
        | sed -n '/angles x warps/,$p'  # the sweep's table (its after-kernel rows made a fixed tail cut it short)
}

engine_pair() {
    # BASE_SITE: an install of the code to compare (pip install --target); BASE_BENCH: its bench_engine_process.py,
    # a path from the repository root
    # (the link protocol changed with c57419b: a base before it needs the bench of its own time, eb3a832's)
    : "${BASE_SITE:?engine_pair needs BASE_SITE, a pip --target install of the code to compare}"
    local bench=${BASE_BENCH:-benchmarks/bench_engine_process.py} repo
    repo=$(pwd)  # the base runs from /tmp: its fake workers (python -c) would import this tree from the cwd
    for _ in 1 2; do
        echo "== engine process, base ($BASE_SITE)"
        (cd /tmp && PYTHONPATH="$BASE_SITE:$repo/benchmarks:${PYTHONPATH:-}" timeout 60 python "$repo/$bench" --device cuda \
            --streams 256,512 --rounds 60)
        echo "== engine process, this tree (rounds at once, as the base's bench; then paced over 20 ms as real clients)"
        timeout 60 python benchmarks/bench_engine_process.py --device cuda --streams 256,512 --rounds 60
        timeout 60 python benchmarks/bench_engine_process.py --device cuda --streams 256,512 --rounds 60 --pace-ms 20
    done | tee "$OUT/engine_pair.md"
}

case "$part" in
    tests) tests ;;
    conv_tests) conv_tests ;;
    kernels) kernels ;;
    serving) serving ;;
    mamba3) mamba3 ;;
    mamba3_peer) mamba3_peer ;;
    engine_knobs) engine_knobs ;;
    pipeline_fill) pipeline_fill ;;
    service_edge) service_edge ;;
    service_400) service_400 ;;
    ssd_memory) ssd_memory ;;
    ssd_bwd) ssd_bwd ;;
    rotary) rotary ;;
    scan) scan ;;
    engine_pair) engine_pair ;;
    all) tests; conv_tests; kernels; serving ;;
    *) echo "usage: $0 [tests|conv_tests|kernels|serving|mamba3|mamba3_peer|engine_knobs|pipeline_fill|service_edge|service_400|ssd_memory|ssd_bwd|rotary|scan|engine_pair|all]" >&2; exit 2 ;;
esac
echo "== tables in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
    echo "== failed or timed out: the commands at lines ${failed[*]} of $0" >&2
    exit 1
fi
