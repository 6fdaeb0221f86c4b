"""Benchmark (a script, not a test): one complete sample at full resolution, timed end to end.

    python tests/bench_sample.py                      # CPU, float32, the CLI's default: dpm++2m, 50 steps, 192x224x192
    python tests/bench_sample.py --device cuda --dtype float16 bfloat16 --compare --method ddim --steps 64
    python tests/bench_sample.py --weights medforj_flow --prediction flow      # the published weights

The U-Net is MEDFORJ_UNET with random weights (torch.manual_seed(0)) unless --weights names a
weights file or manifest entry: cost per step does not depend on the weights, quality does.
Per dtype: one warm-up network call, then dm.sample from torch.Generator().manual_seed(0) noise,
timed as a whole (all steps, the model calls and the sampler's arithmetic). Prints seconds,
seconds per step and peak memory (CUDA: torch.cuda.max_memory_allocated above the level before
the sample, and whether it fits a 15 GB card such as Colab's T4; CPU: the process's peak resident
set size, VmHWM). --compare also samples in float32 and prints each reduced precision's voxel
difference from it (max and mean absolute, on the [-1, 1] scale).
"""
import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import ddpm_mini as dm  # noqa: E402


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def one_sample(model, args, dtype: str, device: torch.device) -> tuple:
    shape = (1, 1, *args.shape)
    options = dict(steps=args.steps, dtype=None if device.type == "cpu" else dtype, progress=args.progress,
                   method=args.method)
    t = torch.full((1,), 500, dtype=torch.float32 if args.prediction == "rflow" else torch.long, device=device)
    with torch.inference_mode(), dm._autocast(device, options["dtype"] or "float32"):
        model(torch.zeros(shape, device=device), t)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    x = dm.sample(model, args.prediction, shape=shape, generator=torch.Generator().manual_seed(0), **options)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else peak_rss_bytes()
    return x.cpu(), seconds, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=("float32", "float16", "bfloat16"))
    p.add_argument("--steps", type=int, default=dm._CLI_STEPS, help=f"sampling steps (default {dm._CLI_STEPS}, "
                   "the CLI's)")
    p.add_argument("--method", choices=dm.METHODS,
                   help="sampler method (default as the CLI's: dpm++2m, ddim for an rflow model)")
    p.add_argument("--shape", type=int, nargs=3, default=list(dm.IMAGE_SHAPE))
    p.add_argument("--prediction", default="flow")
    p.add_argument("--weights", help="weights file or manifest name (default: random MEDFORJ_UNET weights)")
    p.add_argument("--compare", action="store_true", help="also sample in float32 and print the differences")
    p.add_argument("--progress", action="store_true", help="show the sampler's progress bar")
    args = p.parse_args()
    device = dm._device(args.device)
    if args.weights:
        model, meta = dm.load_model(dm.fetch(args.weights) if not pathlib.Path(args.weights).exists() else args.weights,
                                    device)
        args.prediction = meta["prediction"]
    else:
        torch.manual_seed(0)
        model = dm.UNet(**dm.MEDFORJ_UNET).to(device).eval()
    args.method = dm._cli_method(args.method, args.prediction)  # the CLI's default
    dtypes = list(args.dtype) + (["float32"] if args.compare and "float32" not in args.dtype else [])
    print(f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads); {args.prediction}, "
          f"{'x'.join(map(str, args.shape))}, {args.steps} steps, method {args.method}", flush=True)
    results = {}
    for dtype in dtypes:
        x, seconds, peak = one_sample(model, args, dtype, device)
        results[dtype] = x
        fits = f", fits 15 GB: {'yes' if peak < 15e9 else 'no'}" if device.type == "cuda" else ""
        print(f"{dtype:9s} {seconds:8.1f} s  {seconds / args.steps:7.3f} s/step  peak "
              f"{peak / 2**30:6.2f} GiB{fits}; finite {bool(torch.isfinite(x).all())}, "
              f"range [{x.min():.3f}, {x.max():.3f}]", flush=True)
    if args.compare:
        for dtype in args.dtype:
            if dtype != "float32":
                d = (results[dtype] - results["float32"]).abs()
                print(f"{dtype} vs float32: max |diff| {d.max():.4f}, mean |diff| {d.mean():.5f}")


if __name__ == "__main__":
    main()
