#!/usr/bin/env bash
# One GPU session for the conv1d and Mamba-1 scan kernels (issue 25): GPU tests, then benchmarks.
#
#     bash benchmarks/gpu_kernels_session.sh            # under 8 min on an H100/H200 (limits 150+90+70+40+100 s)
#     MAMBA=1 bash benchmarks/gpu_kernels_session.sh    # + mamba-ssm's CUDA scan (builds it: ~4 min more)
#
# Run from the repository root with streamssm importable (pip install -e . or PYTHONPATH). The
# kernels before issue 25's changes are timed beside ours when their sources can be had:
# from git (OLD_CONV_REV / OLD_SCAN_REV, the commits before the changes), or from files already
# at $OLD_DIR/conv.py and $OLD_DIR/scan.py (a copy of the tree without .git: write them with
# `git show REV:kernels/conv1d/conv.py` beforehand). Each part has its own time limit, so one
# that overruns leaves the others' tables; every table is printed again at the end.
set -u
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
OUT=${OUT:-$(mktemp -d)}
OLD_DIR=${OLD_DIR:-.peers/old_kernels}
OLD_CONV_REV=${OLD_CONV_REV:-7db386b~1}  # the conv1d before the one-pass backward (2026-12-05)
OLD_SCAN_REV=${OLD_SCAN_REV:-6cac510~1}
mkdir -p "$OUT"
if git rev-parse --git-dir >/dev/null 2>&1; then
    mkdir -p "$OLD_DIR"
    git show "$OLD_CONV_REV:kernels/conv1d/conv.py" >"$OLD_DIR/conv.py"
    git show "$OLD_SCAN_REV:kernels/mamba1/scan.py" >"$OLD_DIR/scan.py"
fi
old_conv=(); old_scan=()
[ -s "$OLD_DIR/conv.py" ] && old_conv=(--old "$OLD_DIR/conv.py")
[ -s "$OLD_DIR/scan.py" ] && old_scan=(--old "$OLD_DIR/scan.py")
peers=none
[ "${MAMBA:-0}" = 1 ] && peers=mamba
scan_limit=$([ "${MAMBA:-0}" = 1 ] && echo 370 || echo 100)

echo "== GPU tests: conv1d and Mamba-1 scan kernels vs float64 references (first calls compile and tune)"
timeout 150 python -m pytest -q -p no:randomly -m gpu tests/test_conv1d_kernel.py -k "not int32 and not grid_axis" 2>&1 | tail -n 15 | tee "$OUT/tests.txt"
timeout 90 python -m pytest -q -p no:randomly -m gpu tests/test_selective_scan_kernel.py 2>&1 | tail -n 15 \
    | tee -a "$OUT/tests.txt"

echo "== conv1d: ours vs the old kernel vs cuDNN, BENCHMARKS.md shapes; channel-last (the blocks' layout) at M1, S1"
timeout 70 python benchmarks/bench_conv1d.py --shapes M1,M2,M3,S1 "${old_conv[@]}" --out "$OUT/conv1d.md"
timeout 40 python benchmarks/bench_conv1d.py --shapes M1,S1 --layouts channel-last "${old_conv[@]}" \
    --out "$OUT/conv1d_channel_last.md"

echo "== Mamba-1 selective scan: ours vs the old kernel (and mamba-ssm CUDA with MAMBA=1), M1/M2"
timeout "$scan_limit" python benchmarks/bench_selective_scan.py --shapes M1,M2 --peers "$peers" \
    "${old_scan[@]}" --out "$OUT/scan.md"

echo; echo "================ summary ================"
for f in tests.txt conv1d.md conv1d_channel_last.md scan.md; do
    echo "--- $f"; cat "$OUT/$f" 2>/dev/null || echo "(missing: that part failed or ran out of time)"
done
