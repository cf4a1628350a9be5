#!/usr/bin/env bash
# Everything issue 4 asks of a GPU, in one run on the device machine (H200, no network):
#   device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
# after `bash benchmarks/gpu_wheels.sh` here. About 30 s of work on this CPU machine; the stages are
# capped at 120 + 150 + 120 s so one run leaves a 15-minute lease room for a second. Writes to $OUT
# (or ./gpu_out): the GPU tests' log, the H200 version of benchmarks/results/decision_latency.md, and
# the learner step timings.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } \
  | tee "$OUT/machine.txt"
python3 -c 'import torch, numpy; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "numpy", numpy.__version__)' | tee -a "$OUT/machine.txt"
rc=0
# -m gpu: only the CUDA tests (graphs vs eager, in-place weight update reaching captured graphs,
# Q-value blocks, the dqn policy's off-loop path on the device, auto device placement).
timeout 120 python3 -m pytest -p no:cacheprovider -W default -q -m gpu tests/test_batcher.py tests/test_dqn_policy.py 2>&1 \
  | tee "$OUT/gpu_tests.log" || rc=1
timeout 150 python3 benchmarks/decision_latency.py --out "$OUT/decision_latency.md" \
  --note "device machine (H200), run by benchmarks/gpu_check.sh" 2>&1 | tee "$OUT/decision_latency.log" || rc=1
timeout 120 python3 benchmarks/learner_step.py --out "$OUT/learner_step.md" \
  --note "device machine (H200), run by benchmarks/gpu_check.sh" 2>&1 | tee "$OUT/learner_step.log" || rc=1
exit $rc
