#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU: the kernel tests, the attention benchmark and the
# streams-per-GPU benchmark. Results go to the folder given as $1 (default: benchmarks/results/gpu).
# Uses the interpreter named by $PYTHON (default: python3) with a copy of the package on PYTHONPATH, so it runs on a
# machine whose Python already holds torch, triton and transformers, without installing the package.
# ATTENTION=0 skips the attention benchmark.
set -uo pipefail
out=${1:-benchmarks/results/gpu}
py=${PYTHON:-python3}
mkdir -p "$out" && out=$(cd "$out" && pwd)
# The package as installed: streamwavlm.kernels lives in kernels/ (pyproject's package-dir).
site=$(mktemp -d)
cp -r streamwavlm tests pyproject.toml "$site/" && cp -r kernels "$site/streamwavlm/kernels"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  nvidia-smi -L
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/device.txt"
status=0
# (test_streaming.py: the CUDA tests only; its other tests read sound files, which need soundfile)
(cd "$site" && timeout 200 $py -m pytest -p no:cacheprovider tests/test_triton_attention.py \
  "tests/test_streaming.py::test_cuda_graph_steps_equal_eager_steps" -rs -q) 2>&1 \
  | tee "$out/tests.txt" || status=1
if [ "${ATTENTION:-1}" = 1 ]; then
  timeout 150 $py benchmarks/bench_attention_gpu.py --quick --out "$out/attention.md" 2>&1 | tee "$out/attention.log" \
    || status=1
fi
timeout 180 $py benchmarks/bench_streams_gpu.py --out "$out/streams.md" 2>&1 | tee "$out/streams.log" || status=1
exit $status
