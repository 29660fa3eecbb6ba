#!/usr/bin/env bash
# Every CUDA check in one pass, for a lent GPU machine: the GPU-only tests of each model file, its
# tiny preset (compile + bf16 autocast, the defaults on CUDA), then its gpu preset cut to
# GPU_STEPS steps (throughput and MFU in the progress lines). Prints only; writes under $OUT.
#   bash benchmarks/gpu_check.sh [model ...]        (default: every model file present)
set -u
OUT=${OUT:-/tmp/gpu_check}
models=${*:-vit clip llava pixel_ar vqvae vqgan ddpm flow_matching sd3_mini}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
for m in $models; do
  [ -f "$m.py" ] || continue
  echo "== $m: GPU-only tests"
  python3 -m pytest -q -p no:cacheprovider "tests/test_$m.py" -k "cuda or gpu" 2>&1 | tail -n 3
  echo "== $m: tiny preset (compile + bf16)"
  python3 "$m.py" --preset tiny --out_dir "$OUT/$m-tiny" 2>&1 | tail -n 4
  echo "== $m: gpu preset, ${GPU_STEPS:-300} steps"
  python3 "$m.py" --preset gpu --max_steps "${GPU_STEPS:-300}" --out_dir "$OUT/$m-gpu" 2>&1 | tail -n 12
done
