"""Benchmark (a script, not a test): minutes of 2-core CPU training until a teaching model's samples
are recognisable phantoms, for runs of `python ddpm_mini.py train` (the lab's recipe), one run per
parameterization.

    python tests/bench_lab.py runs/teaching_flow runs/teaching_sample ...   # score every checkpoint
    python tests/bench_lab.py --speed 12      # the CSV's runs, with this machine's s/step and minutes
    python tests/bench_lab.py --shipped 16    # the shipped teaching models, 16 samples each, and real phantoms

For every complete checkpoint (checkpoints/step_NNNNNN) of each run folder it draws 4 samples of the
EMA weights (DDIM, --sample-steps, starting noise torch.Generator().manual_seed(0)) at the run's
training grid and scores each with notebooks/lab.py's PhantomScore (built at that grid):
  W1    Wasserstein-1 distance of the voxel intensities to 16 reference phantoms (seeds 20000..) pooled;
  tDice mean Dice over scalp, skull, CSF, cortex, WM (labels by the nearest PHANTOM_INTENSITIES
        mean) against the best-matching reference phantom.
A sample is recognisable when W1 <= 0.12 and tDice >= 0.45; a model when 3 of its 4 samples are.
--samples N draws N instead (the same seed: the first 4 are the 4-sample check's); the CSV keeps one
row per run, step, sample steps and N, and the summary reads the 4-sample rows.
Scores are cached in --csv (one row per run and step; scored checkpoints are not scored again), so
the script can follow a run that is still training or was resumed across sittings.

Minutes: a run's wall clock is not a fair measure (the machine may have been busy), so with --speed N
the script times N steps of dm.train itself for each run's prediction and grid with the recipe's U-Net
(TEACHING_UNET) and batch (2), in float32, on this process's
threads (after 2 warm-up steps, as the difference of a (2 + N)-step and a 2-step run) and reports
    minutes to recognisable = (first step at which the model is recognisable) x (seconds per step) / 60.
Run it with nothing else on the machine for the seconds per step to mean anything; the grid's
baselines (real phantoms 30000.., the blurred mean head, noise) are printed first.

--shipped N scores the shipped teaching models (dm.fetch("teaching_<prediction>")) the same way with N
samples each (seed 0), beside N unseen real phantoms (seeds 30000..), whose tDice is the range a
model's samples should reach: mean, median and range of tDice, how many reach 0.50, W1's range and
how many are recognisable. Four samples decide little; 16 show how a model's samples spread.
"""
import argparse
import csv
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "notebooks"))
import ddpm_mini as dm  # noqa: E402
from lab import PhantomScore as Reference  # noqa: E402

FIELDS = ("run", "prediction", "shape", "step", "w1", "tdice", "recognisable", "sample_steps")


def checkpoints(run: pathlib.Path) -> list:
    done = [p for p in (run / "checkpoints").glob("step_*") if p.name[5:].isdigit() and (p / "ema.safetensors").exists()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def score_checkpoint(ckpt: pathlib.Path, refs: dict, sample_steps: int, device: str = "cpu", n: int = 4) -> dict:
    model, meta = dm.load_model(ckpt, device)
    shape = tuple(meta["shape"])
    if shape not in refs:
        refs[shape] = Reference(shape)
    x = dm.sample(model, meta["prediction"], shape=(n, 1, *shape), steps=sample_steps,
                  schedule=dm.Schedule.from_config(meta["schedule"]), generator=torch.Generator().manual_seed(0),
                  progress=False)[:, 0].cpu().numpy()
    ref = refs[shape]
    w1s, dices = [ref.w1(v) for v in x], [ref.tdice(v) for v in x]
    ok = sum(w <= 0.12 and d >= 0.45 for w, d in zip(w1s, dices))
    dm.save_slices_png(x[0], ckpt.parent.parent / "scores" / f"{ckpt.name}.png",
                       title=f"{meta['prediction']}, {ckpt.name}, tDice {dices[0]:.2f}")
    return {"prediction": meta["prediction"], "shape": "x".join(map(str, shape)), "step": int(meta["step"]),
            "w1": " ".join(f"{w:.3f}" for w in w1s), "tdice": " ".join(f"{d:.2f}" for d in dices),
            "recognisable": ok, "sample_steps": sample_steps}


def score_shipped(n: int, sample_steps: int, device: str = "cpu") -> list:
    """--shipped N: one summary line per set, real phantoms first, then each shipped teaching model."""
    shape = dm.TEACHING_SHAPE
    ref = Reference(shape)
    sets = {"real phantoms": np.stack([dm.phantom(30_000 + i, shape)[0] for i in range(n)])}
    for prediction in dm.PREDICTIONS:
        model, meta = dm.load_model(dm.fetch(f"teaching_{prediction}"), device)
        x = dm.sample(model, prediction, shape=(n, 1, *shape), steps=sample_steps,
                      schedule=dm.Schedule.from_config(meta["schedule"]), generator=torch.Generator().manual_seed(0),
                      progress=False)
        sets[f"teaching_{prediction} @{meta['step']}"] = x[:, 0].cpu().numpy()
    lines = []
    for name, x in sets.items():
        dice, w1 = np.array([ref.tdice(v) for v in x]), np.array([ref.w1(v) for v in x])
        ok = int(((w1 <= 0.12) & (dice >= 0.45)).sum())
        lines.append(f"{name:<26} tDice mean {dice.mean():.3f} median {np.median(dice):.3f} range {dice.min():.3f}-"
                     f"{dice.max():.3f}, >= 0.50: {int((dice >= 0.5).sum())} of {n}; W1 {w1.min():.3f}-{w1.max():.3f}; "
                     f"recognisable {ok} of {n}")
        print(lines[-1], flush=True)
    return lines


def seconds_per_step(prediction: str, shape: tuple, batch: int, unet: dict, steps: int, device: str = "cpu") -> float:
    """dm.train's seconds per step: ((2 + steps)-step run - 2-step run) / steps, fresh model each."""
    times = []
    for n in (2, 2 + steps):
        torch.manual_seed(0)
        model = dm.UNet(**unet)
        start = time.perf_counter()
        dm.train(model, dm.PhantomDataset(shape=shape), prediction, n, batch_size=batch, lr=1e-3, progress=False,
                 device=device, dtype=torch.float32)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / steps


def run_config(run: pathlib.Path) -> dict:
    """prediction, grid, U-Net and batch of a run, from its newest checkpoint."""
    ckpt = checkpoints(run)[-1]
    _, meta = dm.load_model(ckpt, "cpu")
    state = torch.load(ckpt / "state.pt", weights_only=False)
    history = state["history"]
    batch = int(meta.get("batch_size", 2))  # recorded by train(); runs from before that used 2
    return {"prediction": meta["prediction"], "shape": tuple(meta["shape"]), "unet": meta["unet"], "batch": batch,
            "steps": len(history)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=pathlib.Path,
                        help="training output folders (train --out) to score; none: summarise the CSV's runs")
    parser.add_argument("--csv", type=pathlib.Path, default=pathlib.Path("docs/lab_runs.csv"),
                        help="score cache and record (default docs/lab_runs.csv)")
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per sample (default 20)")
    parser.add_argument("--samples", type=int, default=4, metavar="N",
                        help="samples per checkpoint (default 4; the first 4 of N are the 4-sample check's)")
    parser.add_argument("--every", type=int, default=1, help="score every k-th checkpoint only (default 1: all)")
    parser.add_argument("--speed", type=int, default=0, metavar="N", help="time N steps of dm.train per run (0: skip)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--device", default="cpu", help="sample (and time, float32) on this device (default cpu)")
    parser.add_argument("--baselines", action="store_true", help="print the grid's baselines first")
    parser.add_argument("--shipped", type=int, default=0, metavar="N",
                        help="score the shipped teaching models with N samples each, beside N real phantoms, and stop")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.samples < 1:
        parser.error(f"--samples takes a number of samples, 1 or more, got {args.samples}")
    if args.shipped < 0:
        parser.error(f"--shipped takes a number of samples, 1 or more (0: off), got {args.shipped}")
    if args.shipped:
        score_shipped(args.shipped, args.sample_steps, args.device)
        return
    rows = list(csv.DictReader(open(args.csv))) if args.csv.exists() else []
    seen = {(r["run"], int(r["step"]), int(r["sample_steps"]), len(r["tdice"].split())) for r in rows}
    refs = {}
    for run in args.runs:
        if args.baselines:
            shape = run_config(run)["shape"]
            ref = refs.setdefault(shape, Reference(shape))
            blur = np.mean([dm.phantom(20_000 + i, shape)[0] for i in range(16)], 0)
            noise = np.random.default_rng(0).standard_normal(shape).clip(-1, 1)
            print(f"baselines at {'x'.join(map(str, shape))} (W1 / tDice): " + ", ".join(
                f"{name} {ref.w1(x):.3f} / {ref.tdice(x):.2f}" for name, x in
                [(f"phantom {30_000 + i}", dm.phantom(30_000 + i, shape)[0]) for i in range(8)]
                + [("blurred head", blur), ("noise", noise)]), flush=True)
        for ckpt in checkpoints(run)[args.every - 1::args.every]:
            key = (run.name, int(ckpt.name[5:]), args.sample_steps, args.samples)
            if key in seen:
                continue
            row = {"run": run.name, **score_checkpoint(ckpt, refs, args.sample_steps, args.device, args.samples)}
            rows.append(row)
            seen.add(key)
            dice = [float(d) for d in row["tdice"].split()]
            print(f"{run.name} {ckpt.name}: W1 {row['w1']}, tDice {row['tdice']} (mean {np.mean(dice):.3f}), "
                  f"{row['recognisable']}/{args.samples}", flush=True)
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            with open(args.csv, "w", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                writer.writeheader()
                writer.writerows(sorted(rows, key=lambda r: (r["run"], int(r["sample_steps"]), len(r["tdice"].split()),
                                                             int(r["step"]))))

    summary(rows, args.runs and [r.name for r in args.runs], args)


def summary(rows: list, runs, args) -> None:
    """One line per run of the CSV (or of `runs`): first step with 3 of 4 recognisable, best mean tDice,
    and with --speed the recipe's seconds per step on this machine and the minutes to recognisable."""
    runs = runs or sorted({r["run"] for r in rows}, key=lambda name: (name.startswith("cpu_"), name))
    rates = {}
    print(f"\n{'run':22s} {'prediction':10s} {'grid':9s} {'scored to':>9s} {'first 3/4 at':>12s} "
          f"{'best tDice (4)':>26s} {'s/step':>7s} {'minutes':>8s}")
    for name in runs:
        mine = sorted((r for r in rows if r["run"] == name and int(r["sample_steps"]) == args.sample_steps
                       and len(r["tdice"].split()) == 4),
                      key=lambda r: int(r["step"]))
        if not mine:
            continue
        prediction, shape = mine[0]["prediction"], tuple(int(v) for v in mine[0]["shape"].split("x"))
        last = int(mine[-1]["step"])
        first = next((int(r["step"]) for r in mine if int(r["recognisable"]) >= 3), None)
        best = max(mine, key=lambda r: np.mean([float(d) for d in r["tdice"].split()]))
        if args.speed and (prediction, shape) not in rates:
            rates[prediction, shape] = seconds_per_step(prediction, shape, 2, dm.TEACHING_UNET, args.speed, args.device)
        rate = rates.get((prediction, shape))
        minutes = f"{first * rate / 60:8.1f}" if first and rate else (f"> {last * rate / 60:.0f}" if rate else "")
        print(f"{name:22s} {prediction:10s} {'x'.join(map(str, shape)):9s} {last:9d} "
              f"{first if first else '> ' + str(last):>12} {best['tdice'] + ' @' + str(best['step']):>26s} "
              f"{rate if rate else float('nan'):7.2f} {minutes:>8s}", flush=True)

if __name__ == "__main__":
    main()
