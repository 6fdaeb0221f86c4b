"""Study script (not a test): how few training steps a small 3D diffusion model on synthetic phantoms
needs until its samples are recognisable, as a function of the training recipe. One run = one
recipe, trained from scratch on 1 CPU thread, scored at the steps given by --score.

Training loop (mirrors ddpm_mini.train, with knobs): items phantom(seed + k) from
dm.PhantomDataset(n=None) in order (optionally dm.augment), stacked --batch at a time; step k draws
t and eps from a generator seeded by (seed, k); x_t = alpha_t x0 + sigma_t eps; loss = MSE between
the U-Net's output and dm.target(prediction, ...) (the prediction's own target space, as
dm.diffusion_loss); Adam (--lr; linear warm-up over --warmup steps; then constant or cosine down to
--lr-floor x lr at --steps); gradient-norm clip (--clip, 0 = off); EMA
    theta_ema <- d theta_ema + (1 - d) theta,  d = min(--ema, (1 + k) / (10 + k)) (--ema-warmup on)
                                               d = --ema                         (--ema-warmup off).
Timestep draws (--tsample): uniform (t ~ U{0..999}, dm.diffusion_loss's), power:P (t = floor(1000
u^(1/P)), density ~ t^(P-1): P > 1 puts more weight on high t), logitnormal:M,S (t = floor(1000
sigmoid(M + S n)), M > 0 shifts towards high t).

Scoring (at each step of --score): 4 samples of the EMA model (and of the raw model with --raw), DDIM
with --sample-steps steps (20 by default), starting noise from torch.Generator().manual_seed(0), each
scored as tests/bench_train.py does (its Reference class, built at this grid):
  W1    Wasserstein-1 distance of the voxel intensities to 16 reference phantoms pooled.
  tDice mean Dice over scalp, skull, CSF, cortex, WM (labels by nearest PHANTOM_INTENSITIES mean)
        against the best-matching reference phantom.
A sample is recognisable when W1 <= 0.12 and tDice >= 0.45; a model when 3 of its 4 samples are.
The grid's baselines (real phantoms seeds 30000.., the blurred mean head, noise) are printed first.
Each scoring point appends one row to --csv (every setting in its columns, the measured training
seconds per step on this process's threads, the scores) and writes a slice PNG of sample 0 under
--png-dir. Seconds per step count the training steps only (data, forward, backward, Adam, EMA),
not scoring.

    OMP_NUM_THREADS=1 python tests/bench_recipe.py --tag base --steps 1200 --score 300 600 900 1200
    OMP_NUM_THREADS=1 python tests/bench_recipe.py --tag fast --lr 3e-3 --warmup 100 --decay cosine \\
        --ema 0.995 --steps 800 --score 400 600 800
    OMP_NUM_THREADS=1 python tests/bench_recipe.py --tag wide --unet '{"channels": (24, 48, 96)}' \\
        --tsample power:2 --steps 600 --score 300 600
    OMP_NUM_THREADS=1 python tests/bench_recipe.py --speed-only 30 --batch 4     # speed probe only
"""
import argparse
import ast
import csv
import math
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ddpm_mini as dm  # noqa: E402
from bench_train import Reference  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def draw_t(kind, n, generator, T):
    """Timesteps (n,) long in 0..T-1 for --tsample kind."""
    name, _, arg = kind.partition(":")
    if name == "uniform":
        return torch.randint(0, T, (n,), generator=generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if name == "power":
        p = float(arg)
        t = T * u ** (1.0 / p)
    elif name == "logitnormal":
        m, s = (float(v) for v in arg.split(","))
        t = T * torch.sigmoid(m + s * torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12)))
    else:
        raise ValueError(f"--tsample: uniform, power:P or logitnormal:M,S, got {kind!r}")
    return t.floor().long().clamp(0, T - 1)


def lr_at(step, args):
    """Learning rate for 0-based step: linear warm-up, then constant or cosine to lr_floor x lr."""
    if args.warmup and step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.decay == "cosine":
        span = max(args.steps - args.warmup, 1)
        frac = min(max(step - args.warmup, 0) / span, 1.0)
        return args.lr * (args.lr_floor + (1 - args.lr_floor) * 0.5 * (1 + math.cos(math.pi * frac)))
    return args.lr


def step_generator(seed, step):
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> np.uint64(1)))


def score(model, args, shape, ref):
    x = dm.sample(model, args.prediction, shape=(4, 1, *shape), steps=args.sample_steps,
                  generator=torch.Generator().manual_seed(0), progress=False)[:, 0].numpy()
    w1s, dices = [ref.w1(v) for v in x], [ref.tdice(v) for v in x]
    ok = sum(w <= 0.12 and d >= 0.45 for w, d in zip(w1s, dices))
    return x, w1s, dices, ok


KNOBS = ("prediction", "shape", "unet", "batch", "lr", "warmup", "decay", "lr_floor", "clip", "ema", "ema_warmup",
         "tsample", "augment", "sample_steps", "seed", "budget")


def summarize(path):
    """Markdown table of a study CSV: one line per (tag, model), its scoring points in step order."""
    rows = list(csv.DictReader(open(path)))
    runs = {}
    for r in rows:
        runs.setdefault((r["tag"], r["model"]), []).append(r)
    print("| run | model | settings | s/step (1 thread) | step: W1 min-max, tDice min-max, recognisable |")
    print("|---|---|---|---|---|")
    for (tag, model), rs in runs.items():
        knobs = ", ".join(f"{k} {rs[0][k]}" for k in KNOBS if rs[0][k] != "")
        points = "; ".join(f"{r['step']}: {float(r['w1_min']):.3f}-{float(r['w1_max']):.3f}, "
                           f"{float(r['tdice_min']):.2f}-{float(r['tdice_max']):.2f}, **{r['recognisable']}/4**"
                           for r in sorted(rs, key=lambda r: int(r["step"])))
        print(f"| {tag} | {model} | {knobs} | {float(rs[-1]['s_per_step']):.2f} | {points} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--tag", default="run", help="run name (CSV column, PNG names)")
    a("--prediction", default="flow", choices=dm.PREDICTIONS)
    a("--shape", type=int, nargs=3, default=[32, 40, 32], help="phantom grid D H W (default 32 40 32)")
    a("--unet", default="{}", help="TEACHING_UNET overrides, a dict literal (ast.literal_eval)")
    a("--batch", type=int, default=2)
    a("--lr", type=float, default=1e-3)
    a("--warmup", type=int, default=0, help="linear lr warm-up steps (0: none)")
    a("--decay", default="none", choices=("none", "cosine"), help="lr after warm-up: constant or cosine to --lr-floor x lr at --steps")
    a("--lr-floor", type=float, default=0.1, help="cosine's final lr as a fraction of --lr")
    a("--clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    a("--ema", type=float, default=0.999, help="EMA decay")
    a("--ema-warmup", default="on", choices=("on", "off"), help="d = min(ema, (1+k)/(10+k)) (on) or d = ema (off)")
    a("--tsample", default="uniform", help="uniform | power:P | logitnormal:M,S")
    a("--augment", default="off", choices=("on", "off"))
    a("--sample-steps", type=int, default=20, help="DDIM steps when scoring")
    a("--seed", type=int, default=0, help="model init, data and noise seed")
    a("--steps", type=int, default=1200, help="step budget (the cosine ends here; training stops here)")
    a("--score", type=int, nargs="+", default=[300, 600, 900, 1200], help="steps to score at")
    a("--raw", action="store_true", help="also score the raw (non-EMA) model")
    a("--stop-when-recognisable", action="store_true", help="end the run at the first recognisable EMA score")
    a("--threads", type=int, default=1, help="torch threads (default 1)")
    a("--csv", default=str(ROOT / "study_logs" / "recipe_study.csv"))
    a("--png-dir", default=str(ROOT / "study_logs" / "png"))
    a("--speed-only", type=int, default=0, help="time this many steps (after 2 warm-up steps), print s/step, exit")
    a("--no-baselines", action="store_true")
    a("--summarize", action="store_true", help="print the CSV as a markdown table (one line per run and model) and exit")
    args = parser.parse_args()
    if args.summarize:
        return summarize(pathlib.Path(args.csv))
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    overrides = ast.literal_eval(args.unet)
    unet = dict(dm.TEACHING_UNET, **overrides)
    settings = {"tag": args.tag, "prediction": args.prediction, "shape": "x".join(map(str, shape)),
                "unet": repr(overrides), "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
                "decay": args.decay, "lr_floor": args.lr_floor if args.decay == "cosine" else "",
                "clip": args.clip, "ema": args.ema, "ema_warmup": args.ema_warmup, "tsample": args.tsample,
                "augment": args.augment, "sample_steps": args.sample_steps, "seed": args.seed,
                "budget": args.steps, "threads": torch.get_num_threads()}

    torch.manual_seed(args.seed)
    model = dm.UNet(**unet)
    ema = dm.UNet(**unet)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {n_params:,} parameters; "
          f"settings {settings}", flush=True)
    ref = None
    if not args.speed_only:
        ref = Reference(shape)
        if not args.no_baselines:
            noise = np.random.default_rng(0).standard_normal(shape).clip(-1, 1)
            blur = np.mean([dm.phantom(20_000 + i, shape)[0] for i in range(16)], 0)
            print("baselines at " + settings["shape"] + " (W1, tDice): " + ", ".join(
                f"{name} {ref.w1(x):.3f} / {ref.tdice(x):.2f}" for name, x in
                [("real phantom " + str(30_000 + i), dm.phantom(30_000 + i, shape)[0]) for i in range(8)]
                + [("blurred head", blur), ("noise", noise)]), flush=True)

    schedule = dm.Schedule()
    data = dm.PhantomDataset(n=None, shape=shape, seed=args.seed, augment=args.augment == "on")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema_pairs = list(zip(ema.state_dict().values(), model.state_dict().values()))
    scores = sorted(set(s for s in args.score if s <= args.steps))
    end = args.speed_only + 2 if args.speed_only else args.steps
    item, history, train_s, timed_steps = 0, [], 0.0, 0
    csv_path, png_dir = pathlib.Path(args.csv), pathlib.Path(args.png_dir)
    if not args.speed_only:
        print("step  s/step  loss(last 50)  model  W1 (4 samples)            tDice (4 samples)         recognisable",
              flush=True)
    model.train()
    for step in range(end):
        started = time.perf_counter()
        x0 = torch.stack([data[item + i] for i in range(args.batch)])
        item += args.batch
        g = step_generator(args.seed, step)
        t = draw_t(args.tsample, args.batch, g, schedule.T)
        eps = torch.randn(x0.shape, generator=g)
        x_t = schedule.add_noise(x0, eps, t)
        loss = F.mse_loss(model(x_t, t), dm.target(args.prediction, x0, eps, t, schedule))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step)) if args.ema_warmup == "on" else args.ema
            for e, p in ema_pairs:
                if e.is_floating_point():
                    e.lerp_(p, 1 - d)
                else:
                    e.copy_(p)
        history.append(loss.item())
        if step >= 2 or not args.speed_only:  # speed-only: skip 2 warm-up steps
            train_s += time.perf_counter() - started
            timed_steps += 1
        done = step + 1
        if args.speed_only:
            continue
        if done % 100 == 0 and done not in scores:
            print(f"{done:5d}  {train_s / timed_steps:6.3f}  {np.mean(history[-50:]):13.4f}", flush=True)
        if done in scores:
            recognised = False
            for which, net in [("ema", ema)] + ([("raw", model)] if args.raw else []):
                x, w1s, dices, ok = score(net, args, shape, ref)
                row = dict(settings, step=done, model=which, s_per_step=round(train_s / timed_steps, 4),
                           train_min=round(train_s / 60, 2), loss_last50=round(float(np.mean(history[-50:])), 5),
                           lr_now=lr_at(step, args), **{f"w1_{i}": round(w, 4) for i, w in enumerate(w1s)},
                           **{f"tdice_{i}": round(v, 4) for i, v in enumerate(dices)},
                           w1_min=round(min(w1s), 4), w1_max=round(max(w1s), 4),
                           tdice_min=round(min(dices), 4), tdice_max=round(max(dices), 4),
                           recognisable=ok, model_recognisable=int(ok >= 3), params=n_params,
                           command=" ".join(sys.argv[1:]))
                csv_path.parent.mkdir(parents=True, exist_ok=True)
                new = not csv_path.exists()
                with open(csv_path, "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(row))
                    if new:
                        w.writeheader()
                    w.writerow(row)
                png_dir.mkdir(parents=True, exist_ok=True)
                dm.save_slices_png(x[0], png_dir / f"{args.tag}_{which}_step{done:05d}.png",
                                   title=f"{args.tag} {args.prediction} {which} step {done}")
                print(f"{done:5d}  {train_s / timed_steps:6.3f}  {np.mean(history[-50:]):13.4f}  {which:5s}  "
                      f"{' '.join(f'{v:.3f}' for v in w1s):24s}  {' '.join(f'{v:.2f}' for v in dices):24s}  "
                      f"{ok}/4 {'yes' if ok >= 3 else 'no'}", flush=True)
                recognised |= which == "ema" and ok >= 3
            if recognised and args.stop_when_recognisable:
                break
    if args.speed_only:
        print(f"speed: {train_s / timed_steps:.3f} s/step over {timed_steps} steps ({settings['shape']}, batch "
              f"{args.batch}, {torch.get_num_threads()} thread(s), unet {overrides})", flush=True)


if __name__ == "__main__":
    main()
