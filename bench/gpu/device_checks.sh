#!/usr/bin/env bash
# GPU checks on a lent device machine (see docs/benchmarks.md "GPU"): run from the repo root there, with
# .gpu/wheels (this project's pure-Python dependencies missing from the device image, downloaded for its
# Python 3.12) and .gpu/smol (SmolLM2-135M's config + tokenizer, no weights) carried along.
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install --no-index --no-deps -q .gpu/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD FEATUREWATCH_DATA_DIR=/tmp/fwdata
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
python3 bench/gpu/make_random_model.py .gpu/smol /tmp/smol-random
# 1) the model-path tests on CUDA (tiny random Llama; pytest's warnings-as-errors off: the image's
#    package versions differ from the project's pins)
FEATUREWATCH_TEST_DEVICE=cuda timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -p no:warnings \
  tests/monitor/test_server.py tests/monitor/test_generate.py tests/monitor/test_model.py \
  tests/monitor/test_proxy.py tests/monitor/test_conversation.py tests/monitor/test_worker.py \
  tests/sae_assets/test_hooks.py tests/sae_assets/test_sae.py \
  tests/detectors/test_detector_scoring.py tests/detectors/test_detector_token_level.py 2>&1 | tail -15
# 2) scoring throughput (`featurewatch score`'s path, shipped SAE + detectors) on the GPU, SmolLM2-135M
#    architecture with random weights, bf16 and fp32
for dt in bfloat16 float32; do
  timeout 120 python3 bench/bench_scoring.py --model /tmp/smol-random --device cuda --dtype $dt \
    --rounds 3 --records 256 --batch-size 32 --json "$OUT/bench_scoring_gpu_$dt.json" 2>&1 | grep -v Warning | tail -20
done
# 3) the sidecar benchmark on the GPU
timeout ${SERVER_TIMEOUT:-300} python3 bench/bench_server.py --model /tmp/smol-random --device cuda --max-tokens 128 \
  --rounds ${SERVER_ROUNDS:-4} --out "$OUT/bench_server_gpu.json" 2>&1 | grep -v Warning | tail -40
