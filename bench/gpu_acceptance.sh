#!/usr/bin/env bash
# The GPU acceptance runs, for a session that is lent a GPU (the device tool), in stages that
# each fit one 10-minute call. Run from the repository root on the GPU machine:
#   bash bench/gpu_acceptance.sh tests|profile|demo|throughput|maxbatch|split|transfer
# Output goes to $OUT (or ./gpu-results); commit what matters to bench/results/.
set -euo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
out=${OUT:-gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max \
    --format=csv > "$out/gpu.txt" || true
case "${1:-tests}" in
  tests)       # the whole suite on CUDA, GPU-marked tests included
    python -m pytest -q -rs 2>&1 | tee "$out/pytest.txt" ;;
  profile)     # measured per-layer times; predicted plain peak against one real step
    python -m vmem profile --model resnet50 --batch 64 --device cuda | tee "$out/profile.txt"
    python - <<'PY' 2>&1 | tee -a "$out/profile.txt"
import torch, vmem
from vmem.preprocessing import profile_network
model = vmem.models.resnet50().cuda()
prof = profile_network(model, (64, 3, 224, 224))
x = torch.randn(64, 3, 224, 224, device="cuda")
torch.cuda.reset_peak_memory_stats()
model(x).sum().backward()
measured = torch.cuda.max_memory_allocated()
print(f"predicted plain peak {prof.peak_bytes} bytes, measured {measured} bytes, "
      f"error {(prof.peak_bytes - measured) / measured:+.2%}")
PY
    ;;
  demo)        # ResNet-50 batch 128 under half its plain peak, against plain
    python -m vmem demo --steps 12 | tee "$out/demo.txt" ;;
  throughput)  # resnet50 and vgg16 at batch 128, budgets 4/8/16 GiB, every method; simulated
               # against measured step time and auto against the best fixed policy (issue 7)
    python -m bench --models resnet50,vgg16 --batch 128 --budgets 4GiB,8GiB,16GiB \
        --traces --out "$out/bench" | tee "$out/throughput.txt" ;;
  maxbatch)    # the largest batch per method and budget (long: run per model)
    python -m bench --models "${2:-resnet50}" --batch 128 --budgets 4GiB,8GiB,16GiB \
        --iterations 3 --max-batch --out "$out/bench-max" | tee "$out/maxbatch.txt" ;;
  split)       # VGG-16 batch 256, 224x224, fp32 within 4 GiB (feature-map splitting), 5 steps
    python -m vmem plan --model vgg16 --batch 256 --budget 4GiB | tee "$out/split-plan.txt"
    python -m bench --models vgg16 --batch 256 --budgets 4GiB --methods vmem-auto \
        --iterations 5 --warmup 1 --out "$out/bench-split" | tee "$out/split.txt" ;;
  transfer)    # backends against raw cudaMemcpyAsync; compression on ResNet-50's ReLU outputs
    python -m pytest -q -rs tests/transfer 2>&1 | tee "$out/transfer-tests.txt"
    python bench/transfer.py --out "$out/transfer.txt" ;;
  *) echo "unknown stage $1: tests, profile, demo, throughput, maxbatch, split or transfer" >&2
     exit 2 ;;
esac
