#!/usr/bin/env bash
# Maintainer script: the GPU checks, run on a lent CUDA machine from the repository root.
#
#   bash tests/gpu_checks.sh lab OUT        # teaching recipe on the GPU: speed alone, four teaching
#                                           # runs at once, scores of every checkpoint, shipped files
#   bash tests/gpu_checks.sh fullres OUT    # full-resolution MEDFORJ_UNET sampling (random weights)
#                                           # in float16 / bfloat16 vs float32, and one DPS solve
#
# Python packages the machine may lack (nibabel, pooch, platformdirs, monai) are installed from
# .whl/ when that folder exists. Results land in OUT (logs, CSV, weights). Figures from these runs
# are quoted in README and docs with the device they ran on.
set -u
mode=$1; out=$2; mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
recipe="--phantoms --size 40 48 40 --batch-size 2 --lr 1e-3 --seed 0 --device ${DEVICE:-cuda} --workers 3"

if [ "$mode" = lab ]; then
  # 1. one run alone (notebook 03 on a GPU), float32 and the default bfloat16 autocast: seconds per
  #    step between the checkpoints at N/3 and N steps (start-up and worker launch left out)
  n=${SPEED_STEPS:-750}
  for dt in ${SPEED_DTYPES:-float32 bfloat16}; do
    OMP_NUM_THREADS=4 python3 ddpm_mini.py train $recipe --prediction flow --steps $n --checkpoint-every $((n / 3)) \
      --keep 5 --dtype $dt --out /tmp/speed_$dt > "$out/speed_$dt.log" 2>&1
    python3 - "$dt" $n <<'EOF' | tee -a "$out/speed.txt"
import sys, ddpm_mini as dm
dt, n = sys.argv[1], int(sys.argv[2])
s = [float(dm.load_model(f"/tmp/speed_{dt}/checkpoints/step_{k:06d}", "cpu")[1]["seconds"]) for k in (n // 3, n)]
print(f"one run alone, {dt}: {(s[1] - s[0]) / (n - n // 3) * 1000:.1f} ms/step (steps {n // 3}..{n}); {s[1]:.1f} s for {n} steps")
EOF
  done
  # 2. the four teaching runs at once, float32, for MINUTES minutes each
  for p in flow velocity sample noise; do
    OMP_NUM_THREADS=3 python3 ddpm_mini.py train $recipe --prediction $p --dtype float32 --steps 40000 \
      --minutes "${MINUTES:-4.5}" --checkpoint-every 500 --keep 200 --out runs/teaching_$p > "$out/train_$p.log" 2>&1 &
  done
  wait
  # 3. score every checkpoint (4 EMA samples, 20 DDIM steps, on the GPU), one process per run
  for p in flow velocity sample noise; do
    OMP_NUM_THREADS=4 python3 tests/bench_lab.py runs/teaching_$p --device ${DEVICE:-cuda} --csv /tmp/score_$p.csv \
      > "$out/score_$p.log" 2>&1 &
  done
  wait
  python3 - "$out" <<'EOF'
import csv, sys
rows = [r for p in ("flow", "velocity", "sample", "noise") for r in csv.DictReader(open(f"/tmp/score_{p}.csv"))]
with open(f"{sys.argv[1]}/lab_runs_gpu.csv", "w", newline="") as f:
    w = csv.DictWriter(f, list(rows[0])); w.writeheader(); w.writerows(rows)
EOF
  # 4. ship the newest EMA weights of each run (float16; refused if half precision changes the samples)
  for p in flow velocity sample noise; do
    steps=$(python3 -c "import ddpm_mini as dm; print(dm.latest_checkpoint('runs/teaching_$p').name[5:].lstrip('0'))")
    OMP_NUM_THREADS=8 python3 tests/ship_teaching_models.py runs/teaching_$p --command \
      "python ddpm_mini.py train $recipe --prediction {prediction} --dtype float32 --steps $steps (NVIDIA H200, four runs at once)" \
      >> "$out/ship.log" 2>&1
  done
  cp weights/*.safetensors "$out/" 2>/dev/null
  tar czf "$out/lab.tgz" data_manifest.csv runs/*/history.csv runs/*/scores "$out"/*.log "$out"/*.txt "$out"/*.csv
  ls -la "$out"
fi

if [ "$mode" = fullres ]; then
  python3 tests/bench_sample.py --device cuda --dtype float16 bfloat16 --compare --steps "${STEPS:-64}" \
    | tee "$out/sample_fullres.txt"
  if [ -f tests/bench_inverse.py ]; then
    python3 tests/bench_inverse.py --device cuda --dtype float16 | tee "$out/dps_fullres.txt"
  fi
fi
