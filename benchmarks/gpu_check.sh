#!/usr/bin/env bash
# GPU checks, as one script for a lent GPU machine (under 10 minutes on an H100):
#   1. build the compiled scheduler core for that machine's Python;
#   2. the kernel tests with the Triton kernels compiled on CUDA;
#   3. the kernel benchmark (decode bandwidth against copy bandwidth and SDPA);
#   4. the runtime's own tests on CUDA (tiny random-weight models; the `device` fixture gives
#      cuda there): the request lifecycle, sliding windows, the engine end to end;
#   5. a short generation on CUDA with a random-weight model;
#   6. the memory monitor on real NVML: a reading, and the lending cap following free memory
#      while this script takes device memory and gives it back (issue #12).
# Everything goes to $OUT/gpu_check.log (and the benchmark's JSON lines to $OUT/bench_kernels.jsonl).
#
# The machine has torch, triton, cython, pytest, hypothesis and numpy, but not trio, pyzmq,
# pytest-trio or gguf: carry them as wheels in .whl/ (see the device tool's README), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl trio outcome sniffio pyzmq pytest-trio gguf
# and run with carry [".whl"]:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "machine"
nvidia-smi -L || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

if compgen -G ".whl/*.whl" > /dev/null; then
  step "carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "build the scheduler core"
$PY setup.py -q build_ext --inplace || { echo "build_ext failed"; exit 1; }
# The import name `infinillm` maps onto several folders (DESIGN.md §3); without installing,
# lay the mapping out as links.
PKG=/tmp/infinillm_pkg
rm -rf "$PKG" && mkdir -p "$PKG/infinillm"
for f in runtime/*; do ln -s "$PWD/$f" "$PKG/infinillm/"; done
for d in core_sched kernels transport; do ln -s "$PWD/$d" "$PKG/infinillm/$d"; done
export PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import infinillm.core_sched as c, infinillm.kernels; print('core', c.IMPLEMENTATION)"

step "kernel tests, Triton compiled on CUDA"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/kernels -o addopts="--strict-markers --import-mode=importlib" \
  -W error -x || echo "KERNEL TESTS FAILED"

step "runtime tests on CUDA (tiny random-weight models)"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/runtime/test_runtime.py tests/runtime/test_lifecycle.py \
  tests/runtime/test_sliding_window.py -o addopts="--strict-markers --import-mode=importlib" -W error \
  || echo "RUNTIME TESTS FAILED"

step "kernel benchmark"
timeout 240 $PY benchmarks/bench_kernels.py | tee "$OUT/bench_kernels.jsonl" || echo "BENCHMARK FAILED"

if [ -f benchmarks/bench_generate.py ]; then
  step "generation on CUDA (random-weight model)"
  timeout 120 $PY benchmarks/bench_generate.py --device cuda --random-weights --quick || echo "GENERATION FAILED"
fi
step "memory monitor on NVML (nvidia-ml-py)"
timeout 120 $PY - <<'PYEOF' || echo "NVML CHECK FAILED"
import torch
from infinillm import core_sched
from infinillm.memory import MemoryWatch, NvmlProbe

probe = NvmlProbe()
r = probe.read(0)
print("nvml reading", r.total, r.free, r.used)
assert r.total > 0 and 0 < r.free <= r.total
pool = core_sched.BlockPool(0, 1024, 512)
# A floor just under today's free fraction: taking memory must push the cap down.
floor = max(0.01, (r.free / r.total) / 2 - 0.02)
watch = MemoryWatch(probe, 0, pool, 512, floor)
watch.poll()
print("cap with the device as it is", pool.max_lent_blocks)
hog = torch.empty(int(r.free * 0.9) // 4, dtype=torch.float32, device="cuda")  # another process would
watch.poll()
print("cap with 90% of the free memory taken", pool.max_lent_blocks, "free", watch.reading.free)
assert pool.max_lent_blocks < 512
del hog
torch.cuda.empty_cache()
watch.poll()
print("cap once it is given back", pool.max_lent_blocks)
assert pool.max_lent_blocks == 512
PYEOF
step "done"
