"""Benchmark (a script, not a test): CPU training speed of TEACHING_UNET, and how many minutes of
training it takes until its samples are recognisably phantoms.

    OMP_NUM_THREADS=1 python tests/bench_train.py                        # ~20 min on a busy 2-core CPU
    OMP_NUM_THREADS=1 python tests/bench_train.py --speed-steps 0 --minutes 2 5   # part 2 alone, ~8 min
    python tests/bench_train.py --speed-steps 0 --minutes 5 10 --batch 1 --lr 2e-3 \
        --unet '{"channels": (8, 16, 32), "num_head_channels": 8}'       # part 2 for another setting

Part 1, speed: optimizer steps per second of train() (flow, Adam, EMA) for batch sizes 1-4 at
48 x 56 x 48 and 64^3 (one warm-up step, then --speed-steps timed steps).

Part 2, time to recognisable: train TEACHING_UNET as `python ddpm_mini.py demo` does (flow, batch 2,
lr 1e-3, 48 x 56 x 48 phantoms; --batch, --lr and --unet change that), pausing at each of
--minutes (training time; sampling excluded)
to draw 4 samples from the EMA model (20 DDIM steps) and score each, segmentation-free:
  W1    Wasserstein-1 distance between the sample's voxel intensities and those of 16 reference
        phantoms pooled (mean |quantile difference| over 1000 levels, in [-1, 1] units).
  tDice tissue Dice: label both by nearest PHANTOM_INTENSITIES mean; mean Dice over scalp, skull,
        CSF, cortex and white matter against the best-matching reference phantom.
A sample is recognisable when W1 <= 0.12 and tDice >= 0.45. Why these numbers (printed as the
baselines): other real phantoms score W1 0.01-0.11 and tDice 0.50-0.71, the voxel-wise mean of 16
phantoms (a blurred head) 0.10 / 0.36, Gaussian noise 0.75 / 0.09. The run counts as recognisable
once 3 of the 4 samples are.
"""
import argparse
import ast
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "notebooks"))
import ddpm_mini as dm  # noqa: E402
from lab import PhantomScore  # noqa: E402

SHAPE = dm.TEACHING_SHAPE  # (48, 56, 48): the demo's phantoms


Reference = PhantomScore  # the scores: notebooks/lab.py (the lessons show them too)


def speed(shape, batch, steps):
    torch.manual_seed(0)
    model = dm.UNet(**dm.TEACHING_UNET)
    data = dm.PhantomDataset(shape=shape)
    dm.train(model, data, "flow", 1, batch_size=batch, progress=False)  # warm-up
    start = time.perf_counter()
    dm.train(model, data, "flow", steps, batch_size=batch, progress=False)
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[2, 5, 8], help="training minutes to score at")
    parser.add_argument("--speed-steps", type=int, default=2, help="timed steps per speed point (0: skip part 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--batch", type=int, default=2, help="part 2: volumes per step (default 2, the demo's)")
    parser.add_argument("--lr", type=float, default=1e-3, help="part 2: Adam learning rate (default 1e-3, the demo's)")
    parser.add_argument("--unet", default="{}", help='part 2: TEACHING_UNET overrides as a dict literal, e.g. \'{"channels": (8, 16, 32)}\'')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unet = dict(dm.TEACHING_UNET, **ast.literal_eval(args.unet))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), TEACHING_UNET "
          f"{sum(p.numel() for p in dm.UNet(**dm.TEACHING_UNET).parameters()):,} parameters", flush=True)
    if args.speed_steps:
        print("\npart 1: training steps/s (CPU)\nsize          batch  steps/s  volumes/s", flush=True)
        for shape in (SHAPE, (64, 64, 64)):
            for batch in (1, 2, 3, 4):
                rate = speed(shape, batch, args.speed_steps)
                print(f"{'x'.join(map(str, shape)):12s}  {batch:5d}  {rate:7.3f}  {rate * batch:9.3f}", flush=True)

    ref = Reference(SHAPE)
    noise = np.random.default_rng(0).standard_normal(SHAPE).clip(-1, 1)
    blur = np.mean([dm.phantom(20_000 + i, SHAPE)[0] for i in range(16)], 0)
    print("\npart 2 baselines (W1, tDice): " + ", ".join(
        f"{name} {ref.w1(x):.3f} / {ref.tdice(x):.2f}" for name, x in
        [("real phantom " + str(i), dm.phantom(30_000 + i, SHAPE)[0]) for i in range(3)] + [("blurred head", blur), ("noise", noise)]))
    print(f"\npart 2: flow, batch {args.batch}, lr {args.lr:g}, U-Net {unet}, "
          f"{sum(p.numel() for p in dm.UNet(**unet).parameters()):,} parameters")
    print("train min  steps  loss(last 20)  W1 (4 samples)            tDice (4 samples)         recognisable", flush=True)
    with tempfile.TemporaryDirectory() as out:
        torch.manual_seed(0)
        model, done = dm.UNet(**unet), 0.0
        for minutes in args.minutes:
            result = dm.train(model, dm.PhantomDataset(shape=SHAPE), "flow", 100_000, batch_size=args.batch, lr=args.lr, out=out,
                              checkpoint_every=100_000, resume=done > 0, max_minutes=minutes - done, progress=False)
            done = minutes
            x = dm.sample(result.ema, "flow", shape=(4, 1, *SHAPE), steps=20, generator=torch.Generator().manual_seed(0),
                          progress=False)[:, 0].numpy()
            w1s, dices = [ref.w1(v) for v in x], [ref.tdice(v) for v in x]
            ok = sum(w <= 0.12 and d >= 0.45 for w, d in zip(w1s, dices))
            dm.save_slices_png(x[0], pathlib.Path(tempfile.gettempdir()) / f"bench_train_{minutes:g}min.png",
                               title=f"{minutes:g} min, step {len(result.history)}")
            print(f"{minutes:9g}  {len(result.history):5d}  {np.mean(result.history[-20:]):13.4f}  "
                  f"{' '.join(f'{w:.3f}' for w in w1s):24s}  {' '.join(f'{d:.2f}' for d in dices):24s}  "
                  f"{ok}/4 {'yes' if ok >= 3 else 'no'}", flush=True)


if __name__ == "__main__":
    main()
