"""Benchmark (a script, not a test): sample quality against the number of sampling steps, per method.

    python tests/bench_steps.py                                   # teaching_flow, 16 samples, CPU
    python tests/bench_steps.py --weights teaching_flow teaching_sample --device cuda --csv docs/sampler_steps.csv
    python tests/bench_steps.py --cache runs/steps --batch 2   # on a CPU: resumable, every chunk is kept

For each model (a shipped teaching model or any weights file / run folder) it draws --n samples
from the same starting noise (torch.Generator().manual_seed(0)) with 1000-step DDIM, the reference,
and with each method (ddim, dpm++2m) at each of --steps, and compares every set with the reference:
  voxel   RMSE and max |x - x_ref| over all voxels (intensities in [-1, 1]);
  W1, tDice, ok   the lab's PhantomScore per sample (notebooks/lab.py): means, and how many of
                  the n are recognisable (W1 <= 0.12, tissue Dice >= 0.45);
  vol err mean over structures of mean |V - V_ref| / mean V_ref (the reference set's mean volume) of
          dm.segment_phantom's regional
          volumes (cortex, white matter, CSF, ventricles, thalamus, putamen; left and right merged).
Sets are drawn in order of cost (the reference, then each step count with every method) and each
row is printed and appended to --csv as soon as its set is drawn, so a run stopped part-way keeps
what it finished. --dtype float32 (default) samples in full precision; on CUDA it also turns off
TF32 in matmuls and convolutions, so that what differs between sets is the sampler, not the arithmetic. The teaching models are phantom models
at 40 x 48 x 40: what they show about steps is a guide for the published models, not a measurement
of them.
"""
import argparse
import pathlib
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "notebooks")]
import ddpm_mini as dm  # noqa: E402
from conftest import append_rows  # noqa: E402
from lab import PhantomScore  # noqa: E402

STRUCTURES = ("cortex", "white_matter", "csf", "lateral_ventricles", "thalamus", "putamen")
FIELDS = ("model", "method", "steps", "n", "rmse", "max_abs", "w1", "tdice", "recognisable", "volume_error",
          "seconds", "device")


def volumes(x: np.ndarray) -> dict:
    table = dm.merge_left_right(dm.regional_volumes([dm.segment_phantom(v) for v in x]))
    return {k: np.asarray(table["volumes"][k], dtype=float) for k in STRUCTURES}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", nargs="+", default=["teaching_flow"], help="manifest names, files or run folders")
    p.add_argument("--n", type=int, default=16, help="samples per set (default 16)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25, 50, 256])
    p.add_argument("--methods", nargs="+", default=list(dm.METHODS), choices=dm.METHODS)
    p.add_argument("--reference-steps", type=int, default=1000, help="DDIM steps of the reference (default 1000)")
    p.add_argument("--batch", type=int, default=16, help="samples per network call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="CUDA precision (default float32, TF32 off; CPU always float32)")
    p.add_argument("--csv", type=pathlib.Path, help="append the rows here")
    p.add_argument("--cache", type=pathlib.Path, help="keep each drawn chunk of --batch samples here "
                   "(<model>_step<its training step>_<method>_<steps>_<first>-<end>.pt) and reuse it: a run "
                   "stopped part-way (hours on a CPU) goes on where it stopped; --batch 2 keeps a 1000-step "
                   "chunk under an hour on a 2-core CPU")
    args = p.parse_args()
    device = dm._device(args.device)
    if device.type == "cuda" and args.dtype == "float32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    where = f"{device} {args.dtype} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    for name in args.weights:
        source = name if pathlib.Path(name).exists() else dm.fetch(name)
        model, meta = dm.load_model(source, device)
        prediction, shape = meta["prediction"], tuple(meta["shape"])
        schedule = dm.Schedule.from_config(meta["schedule"]) if "schedule" in meta else None
        noise = torch.randn(args.n, 1, *shape, generator=torch.Generator().manual_seed(0))

        def chunk(method, steps, i):
            """Samples i .. i + batch of one set, drawn or (--cache) read back: each chunk is kept as
            soon as it is drawn, so a stopped run loses at most one chunk."""
            j = min(i + args.batch, args.n)
            tag = f"{pathlib.Path(name).name}_step{meta.get('step')}_{method}_{steps}_{i}-{j}"
            kept = args.cache and args.cache / f"{tag}.pt"
            if kept and kept.exists():
                saved = torch.load(kept, weights_only=True)
                return saved["x"], float(saved["seconds"])
            start = time.perf_counter()
            x = dm.sample(model, prediction, noise=noise[i:j], steps=steps, method=method, schedule=schedule,
                          progress=False, dtype=args.dtype if device.type == "cuda" else None).float().cpu()[:, 0]
            seconds = time.perf_counter() - start
            if kept:
                kept.parent.mkdir(parents=True, exist_ok=True)
                dm._atomic_write(kept, lambda tmp: torch.save({"x": x, "seconds": seconds}, tmp))
            return x, seconds

        def draw(method, steps):
            parts = [chunk(method, steps, i) for i in range(0, args.n, args.batch)]
            return torch.cat([x for x, _ in parts]).numpy(), sum(s for _, s in parts)

        score = PhantomScore(shape)
        ref, ref_seconds = draw("ddim", args.reference_steps)
        ref_volumes = volumes(ref)
        found = [k for k in STRUCTURES if ref_volumes[k].mean() > 0]  # the segmenter found it in the reference
        print(f"{name} ({prediction}, {'x'.join(map(str, shape))}, step {meta.get('step')}, {where}): reference DDIM "
              f"{args.reference_steps} steps in {ref_seconds:.0f} s", flush=True)
        print(f"{'method':>8} {'steps':>5} {'RMSE':>7} {'max':>6} {'W1':>6} {'tDice':>6} {'ok':>5} {'vol err':>8} {'s':>7}")
        sets = [("ddim", args.reference_steps)] + [(m, n) for n in sorted(args.steps) for m in args.methods]
        for method, steps in sets:
            x, seconds = (ref, ref_seconds) if (method, steps) == ("ddim", args.reference_steps) else draw(method, steps)
            v = volumes(x)
            verr = float(np.mean([np.mean(np.abs(v[k] - ref_volumes[k])) / ref_volumes[k].mean() for k in found]))
            w1, td = [score.w1(s) for s in x], [score.tdice(s) for s in x]
            row = {"model": f"{name}@{meta.get('step')}", "method": method, "steps": steps, "n": args.n,
                   "rmse": f"{np.sqrt(np.mean((x - ref) ** 2)):.4f}", "max_abs": f"{np.abs(x - ref).max():.3f}",
                   "w1": f"{np.mean(w1):.3f}", "tdice": f"{np.mean(td):.3f}",
                   "recognisable": sum(a <= 0.12 and b >= 0.45 for a, b in zip(w1, td)),
                   "volume_error": f"{verr:.4f}", "seconds": f"{seconds:.1f}", "device": where}
            append_rows(args.csv, FIELDS, [row])
            print(f"{method:>8} {steps:5d} {row['rmse']:>7} {row['max_abs']:>6} {row['w1']:>6} {row['tdice']:>6} "
                  f"{row['recognisable']:>2}/{args.n:<2} {row['volume_error']:>8} {seconds:7.1f}", flush=True)


if __name__ == "__main__":
    main()
