#!/usr/bin/env bash
# For a session lent a GPU: run this once on the device machine (the device tool runs commands in a copy of the
# working tree), e.g. `bash bench/gpu.sh` with a timeout that leaves room for one rerun. It uses that machine's
# python3 and its CUDA build of torch, and this working tree on PYTHONPATH (nothing is installed: the machine
# reaches no registry). It writes what it measured under $OUT (or bench/work/gpu):
#   1. the CUDA tests (tests/test_loader.py's staging test and every other test that needs CUDA);
#   2. the GPU part of bench/load.py (host-to-device link speeds, loads onto the GPU, attached members);
#   3. factoring on the device (`factor --device cuda`): the fixture family, twice (the bytes must agree), timed
#      against the same run on the CPU, with the rebuilt members' worst output cosine.
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

# 3. factoring on the device
timeout 300 python3 - <<'PY' 2>&1 | tee "$OUT/factor-cuda.txt" || status=1
import hashlib, json, shutil, sys, time
from pathlib import Path
sys.path[:0] = ["fixtures", "tests"]
import torch, tinylm, wfactor
from conftest import FAMILY
out = Path("bench/work/gpu-factor")
shutil.rmtree(out, ignore_errors=True)
members = ["lora", "full_ft", "bf16", "top_ft", "vocab_grown"]
args = [f"{m}={FAMILY / m}" for m in members]
def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode()); h.update(p.read_bytes())
    return h.hexdigest()
seconds, digests = {}, {}
for run, device in (("cpu", "cpu"), ("cuda-1", "cuda"), ("cuda-2", "cuda")):
    t = time.perf_counter()
    wfactor.factor(args, base=str(FAMILY / "base"), out=out / run, device=device)
    seconds[run], digests[run] = time.perf_counter() - t, digest(out / run)
with wfactor.open_family(out / "cuda-1") as fam:
    cos = {m: tinylm.worst_cosine(tinylm.load_model(FAMILY / m), tinylm.model_from_state_dict(
        json.loads((FAMILY / m / "config.json").read_text()), fam.state_dict(m))) for m in members}
print(json.dumps({"seconds": seconds, "cuda_runs_identical": digests["cuda-1"] == digests["cuda-2"],
                  "cuda_equals_cpu": digests["cuda-1"] == digests["cpu"], "worst_cosine": cos}, indent=1))
assert digests["cuda-1"] == digests["cuda-2"], "two CUDA runs wrote different bytes"
assert min(cos.values()) >= 0.999, cos
PY

exit $status
