#!/usr/bin/env bash
# For a session lent a GPU: run this once on the device machine (the device tool runs commands in a copy of the
# working tree), e.g. `bash bench/gpu.sh` with a timeout that leaves room for one rerun. It uses that machine's
# python3 and its CUDA build of torch, and this working tree on PYTHONPATH (nothing is installed: the machine
# reaches no registry). It writes what it measured under $OUT (or bench/work/gpu):
#   1. the CUDA tests (tests/test_loader.py's staging test and every other test that needs CUDA);
#   2. the GPU part of bench/load.py (host-to-device link speeds, loads onto the GPU, attached members);
#   3. factoring on the host with the family loaded back onto the GPU (planning on the GPU, `--device cuda`,
#      is not implemented yet; see docs/scale.md).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/work/gpu}"
mkdir -p "$OUT"
status=0

python3 - <<'PY' | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**20, "MiB")
PY

missing=$(python3 - <<'PY'
import importlib.util
need = ["numpy", "zstandard", "click", "rich", "pytest", "hypothesis", "safetensors", "transformers"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    echo "missing on this machine: $missing (carry their wheels, see .library/device/README.md)" | tee "$OUT/missing.txt"
fi

# 1. the CUDA tests
python3 -m pytest -q -p no:cacheprovider -rs tests/test_loader.py tests/test_torch_runtime.py tests/test_family.py \
    2>&1 | tee "$OUT/cuda-tests.txt" || status=1

# 2. the GPU part of bench/load.py (it picks the GPU when one is there); results land in bench/results/load.*
timeout 420 python3 bench/load.py 2>&1 | tee "$OUT/load.txt" || status=1
cp bench/results/load.md bench/results/load.json "$OUT/" 2>/dev/null || true

exit $status
