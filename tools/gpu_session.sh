#!/usr/bin/env bash
# One device call for a GPU session (see README "Development"): installs the wheels carried in
# .whl/ (packages the GPU image lacks), runs the whole test suite with CUDA present (the `cuda`
# tests run instead of skipping), then tools/gpu_check.py. Logs go to $OUT (or /tmp/gpu-out).
#   run: bash tools/gpu_session.sh   (carry: .whl)
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
python3 setup.py -q build_ext --inplace 2>&1 | tail -3  # the optional C kernels, built for this Python
python3 -m pairpack.cli --version
nvidia-smi -L
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -n 8 tests 2>&1 | tee "$OUT/pytest.log" | tail -25
timeout ${CHECK_TIMEOUT:-240} python3 tools/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
# pairpack.trl against TRL's trainer on the GPU (bf16; pairpack's split attention for the packed
# layouts): prints "skipped" without CUDA
timeout ${TRL_TIMEOUT:-150} python3 tools/bench_trl.py --gpu --only epoch --sets hh 2>&1 | grep -v -i warn | tee "$OUT/bench_trl.log" | tail -12
