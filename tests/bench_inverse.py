"""Benchmark (a script, not a test): DPS against the plain baselines on phantoms whose truth is known,
and the cost of one full-resolution solve.

    python tests/bench_inverse.py                                   # teaching_flow, 8 phantoms, all five tasks
    python tests/bench_inverse.py --weights teaching_velocity --steps 64 --csv docs/inverse_phantoms.csv
    python tests/bench_inverse.py --full --device cuda --dtype float16 --steps 8    # 192x224x192, random weights

Phantoms: seeds 60000.. (never trained on) at the model's grid. For each task (dm.inverse_task, seeded)
the measurement y = task.measure(x), then dm.solve_inverse with the model (DPS, the authors' guidance
and zeta scaled to the grid, --steps, generator seed 0) and the task's baseline (nearest slice,
masked image, noisy image, zero-filled, corrupted image) are scored against the truth:
  PSNR  10 log10(4 / MSE) on [-1, 1] (peak-to-peak 2), per phantom, then averaged;
  SSIM  notebooks/lab.py's ssim3d (Gaussian window, sigma 1.5), averaged;
  inpainting also scores the hole alone (PSNR_hole), where the baseline has nothing.
--full instead times DPS at 192 x 224 x 192 with random MEDFORJ_UNET weights (torch.manual_seed(0)):
seconds per step and peak memory (CUDA: max_memory_allocated; CPU: VmHWM) for each guidance.
"""
import argparse
import math
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "notebooks")]
import ddpm_mini as dm  # noqa: E402
from conftest import append_rows  # noqa: E402
from lab import ssim3d  # noqa: E402

FIELDS = ("model", "task", "method", "n", "steps", "psnr", "ssim", "psnr_hole", "seconds")


def psnr(x, truth, where=None) -> float:
    err = (x - truth) ** 2
    per = [float(e[w].mean()) if where is not None else float(e.mean()) for e, w in
           zip(err, where if where is not None else [None] * len(err))]
    return sum(10 * math.log10(4 / max(m, 1e-12)) for m in per) / len(per)


def phantoms(args):
    model, meta = dm.load_model(args.weights if pathlib.Path(args.weights).exists() else dm.fetch(args.weights),
                                args.device)
    shape = tuple(meta["shape"])
    truth = torch.stack([torch.from_numpy(dm.phantom(60_000 + i, shape)[0]) for i in range(args.n)])[:, None]
    rows = []
    for name in args.tasks:
        task = dm.inverse_task(name, shape, seed=0)
        y = task.measure(truth, torch.Generator().manual_seed(1))
        start = time.perf_counter()
        x = torch.cat([dm.solve_inverse(model, meta["prediction"], y[i:i + args.batch], task, steps=args.steps,
                                        guidance=args.guidance, generator=torch.Generator().manual_seed(i),
                                        progress=False).cpu() for i in range(0, args.n, args.batch)])
        seconds = time.perf_counter() - start
        hole = None if name != "inpainting" else [~task.forward(torch.ones(1, *shape)).bool()[0]] * args.n
        for method, v in (("baseline", task.baseline(y).clamp(-1, 1)), ("dps", x)):
            row = {"model": args.weights, "task": name, "method": method, "n": args.n, "steps": args.steps,
                   "psnr": f"{psnr(v, truth):.2f}", "ssim": f"{float(ssim3d(v[:, 0], truth[:, 0]).mean()):.3f}",
                   "psnr_hole": f"{psnr(v[:, 0], truth[:, 0], hole):.2f}" if hole else "",
                   "seconds": f"{seconds:.0f}" if method == "dps" else ""}
            rows.append(row)
            print(f"{name:>17} {method:>8}: PSNR {row['psnr']:>6} dB, SSIM {row['ssim']}"
                  + (f", hole PSNR {row['psnr_hole']} dB" if hole else "") + (f"  ({seconds:.0f} s)" if method == "dps" else ""),
                  flush=True)
    append_rows(args.csv, FIELDS, rows)


def full(args):
    device = dm._device(args.device)
    torch.manual_seed(0)
    model = dm.UNet(**dm.MEDFORJ_UNET).to(device)
    x = torch.rand(1, 1, *dm.IMAGE_SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    print(f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), torch {torch.__version__}, "
          f"MEDFORJ_UNET random weights, 192x224x192, {args.steps} steps, dtype {args.dtype or 'default'}", flush=True)
    for name in args.tasks:
        task = dm.inverse_task(name, dm.IMAGE_SHAPE)
        y = task.measure(x, torch.Generator().manual_seed(1)).to(device)
        for guidance in ("conversion", "network"):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = dm.solve_inverse(model, "flow", y, task, steps=args.steps, guidance=guidance, dtype=args.dtype,
                                   generator=torch.Generator().manual_seed(0), progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
            print(f"{name:>17} {guidance:>10}: {seconds / args.steps:7.3f} s/step (first step included), "
                  f"peak {peak / 2**30:6.2f} GiB, finite {bool(torch.isfinite(out).all())}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="teaching_flow")
    p.add_argument("--tasks", nargs="+", default=list(dm.INVERSE_TASKS), choices=dm.INVERSE_TASKS)
    p.add_argument("--n", type=int, default=8, help="phantoms (default 8)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--guidance", default="conversion", choices=("conversion", "network"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", help="CUDA precision for --full")
    p.add_argument("--full", action="store_true", help="time one full-resolution solve per task and guidance")
    p.add_argument("--csv", type=pathlib.Path)
    args = p.parse_args()
    full(args) if args.full else phantoms(args)


if __name__ == "__main__":
    main()
