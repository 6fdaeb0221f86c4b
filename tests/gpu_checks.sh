#!/usr/bin/env bash
# Maintainer script: the GPU checks, run on a lent CUDA machine from the repository root.
#
#   bash tests/gpu_checks.sh lab OUT        # teaching recipe on the GPU: speed alone, four teaching
#                                           # runs at once, scores of every checkpoint, shipped files
#   bash tests/gpu_checks.sh fullres OUT    # full-resolution MEDFORJ_UNET sampling (random weights)
#                                           # in float16 / bfloat16 vs float32 (DDIM 64 steps and
#                                           # dpm++2m at $FAST_STEPS, default 50: the CLI's), the U-Net beside MONAI, DPS solves
#   bash tests/gpu_checks.sh resume OUT RUN # continue a run folder on the GPU (float32) for $MINUTES
#                                           # minutes, checkpoints every 250 steps, each scored with
#                                           # 16 samples; packs the newest full checkpoint and the EMA
#                                           # weights of the best-scoring one into OUT
#   bash tests/gpu_checks.sh steps OUT      # tests/bench_steps.py for the shipped flow, sample and
#                                           # velocity models (float32, TF32 off), one process each
#
# Each step is cut at $DEADLINE_AT (a `date +%s` time; default: 520 s after this script started) so
# that one call fits the lent machine's time; what a cut step finished is kept (rows are written as
# they come).
# Python packages the machine may lack (nibabel, pooch, platformdirs, monai) are installed from
# .whl/ when that folder exists. Results land in OUT (logs, CSV, weights). Figures from these runs
# are quoted in README and docs with the device they ran on.
set -u
mode=$1; out=$2; mkdir -p "$out"
deadline=${DEADLINE_AT:-$(($(date +%s) + 520))}
left() { local l=$((deadline - $(date +%s))); [ "$l" -gt "$1" ] && echo "$1" || echo $((l > 1 ? l : 1)); }
if [ -d .whl ]; then  # once per machine (several modes may start at once after a first call)
  [ -d /tmp/site/pooch ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
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
  timeout $(left 200) python3 tests/bench_sample.py --device cuda --dtype float16 bfloat16 --compare --method ddim --steps "${STEPS:-64}" \
    2>&1 | tee "$out/sample_fullres.txt"
  timeout $(left 90) python3 tests/bench_sample.py --device cuda --dtype float16 bfloat16 --method dpm++2m \
    --steps "${FAST_STEPS:-50}" 2>&1 | tee -a "$out/sample_fullres.txt"
  timeout $(left 150) python3 tests/bench_unet.py --device cuda --shapes 96,112,96 192,224,192 --rounds 1 \
    2>&1 | tee "$out/unet_cuda.txt"
  timeout $(left 150) python3 tests/bench_inverse.py --full --device cuda --dtype float16 --steps 8 \
    --tasks ${DPS_TASKS:-slice_selection kspace_accel motion} 2>&1 | tee "$out/dps_fullres.txt"
fi

if [ "$mode" = resume ]; then
  run=$3; name=$(basename "$run")
  timeout $(left 400) python3 ddpm_mini.py train --phantoms --prediction "${PREDICTION:-velocity}" --out "$run" --resume \
    --steps 40000 --minutes "${MINUTES:-3}" --checkpoint-every 250 --keep 200 --device "${DEVICE:-cuda}" --dtype float32 \
    > "$out/train_$name.log" 2>&1
  timeout $(left 120) python3 tests/bench_lab.py "$run" --samples "${SCORE_SAMPLES:-16}" --device "${DEVICE:-cuda}" \
    --csv "$out/scores_$name.csv" > "$out/score_$name.log" 2>&1
  python3 - "$run" "$out" <<'EOF'
import csv, pathlib, subprocess, sys
import numpy as np
run, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
scores = out / f"scores_{run.name}.csv"
rows = list(csv.DictReader(open(scores))) if scores.exists() else []
newest = sorted((run / "checkpoints").glob("step_*"))[-1]
keep = [str(p.relative_to(run.parent)) for p in (run / "history.csv", newest)]
if rows:
    best = max(rows, key=lambda r: np.mean([float(d) for d in r["tdice"].split()]))
    print("best mean tDice:", best["step"], np.mean([float(d) for d in best["tdice"].split()]), "newest:", newest.name)
    if f"step_{int(best['step']):06d}" != newest.name:
        keep.append(str(run.relative_to(run.parent) / "checkpoints" / f"step_{int(best['step']):06d}" / "ema.safetensors"))
subprocess.run(["tar", "cf", "/tmp/ckpt.tar", "-C", str(run.parent), *keep], check=True)
subprocess.run(["split", "-b", "15M", "-d", "/tmp/ckpt.tar", str(out / f"ckpt_{run.name}.tar.")], check=True)
EOF
fi

if [ "$mode" = steps ]; then
  for m in ${STEPS_MODELS:-teaching_flow teaching_sample teaching_velocity}; do
    timeout $(left ${STEPS_LIMIT:-400}) python3 tests/bench_steps.py --weights $m --device "${DEVICE:-cuda}" --dtype float32 \
      --csv "$out/steps_$m.csv" ${STEPS_ARGS:-} > "$out/steps_$m.log" 2>&1 &
  done
  wait
fi
