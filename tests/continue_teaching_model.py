"""Maintainer script (not a test): train a shipped teaching model further, from its own weights.

    python tests/continue_teaching_model.py teaching_sample --steps 1000 --out runs/teaching_sample_more
    python tests/continue_teaching_model.py teaching_sample --steps 1000 --out runs/teaching_sample_more --resume

A teaching run whose optimizer state was not kept (the GPU machine that trained it gave back only the
shipped file) cannot be resumed exactly. This starts a new run folder from the shipped EMA weights
(float16 on disk, trained in float32 here) with the recipe the file records (batch size, lr, EMA
decay, schedule, grid) and a fresh Adam state. The EMA starts at the shipped weights and moves at
the recorded decay from the first step (no EMA warm-up), so Adam's first, unscaled steps do not
reach it at full strength. The phantoms come from --seed (default 1: not the stream the model first
trained on). After that the folder is an ordinary run: --resume continues it exactly,
tests/bench_lab.py scores its checkpoints and tests/ship_teaching_models.py ships one (say in
--command what this run did; it adds the source's steps, seconds and loss history, which init.json
in the folder keeps with the start). --resume reads the start from init.json and the newest
checkpoint, not from the source (which may have been re-shipped from this very run); --lr X with
--resume lowers (or raises) the rate from the resumed step on.
"""
import argparse
import hashlib
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ddpm_mini as dm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="a teaching model: a manifest name (teaching_sample) or its .safetensors file")
    p.add_argument("--steps", type=int, required=True, help="steps of this run (counted from 0)")
    p.add_argument("--out", type=pathlib.Path, required=True, help="the new run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, default=1, help="phantom stream and noise (default 1)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--keep", type=int, default=100)
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--lr", type=float, help="learning rate (default: the source's); with --resume a new rate from the "
                   "resumed step on (dm.train's lr_steps), e.g. 1e-4 to finish")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    record = args.out / "init.json"
    if args.resume:  # the run folder says how it started: the source may have been re-shipped since
        if not record.exists():
            raise SystemExit(f"continue_teaching_model: {args.out} has no init.json: not a run this script started")
        started = {k: v for k, v in json.loads(record.read_text()).items() if k != "source"}
        if started["init"] != str(args.name):
            raise SystemExit(f"continue_teaching_model: {args.out} was started from {started['init']}, not {args.name}")
        ckpt = dm.latest_checkpoint(args.out)
        if ckpt is None:
            raise SystemExit(f"continue_teaching_model: {args.out} has no complete checkpoint to resume")
        model, meta = dm.load_model(ckpt / "model.safetensors", "cpu")  # train(resume=True) restores its state
    else:
        source = pathlib.Path(args.name) if pathlib.Path(args.name).is_file() else dm.fetch(args.name)
        model, meta = dm.load_model(source, "cpu")
        started = dict(init=str(args.name), sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
                       init_step=meta["step"], seed=args.seed, batch_size=int(meta["batch_size"]),
                       lr=float(meta["lr"]), ema_decay=float(meta["ema_decay"]), shape=list(meta["shape"]))
        if args.out.exists() and any(args.out.iterdir()):
            raise SystemExit(f"continue_teaching_model: {args.out} is not empty; --resume continues it")
        args.out.mkdir(parents=True, exist_ok=True)
        # how the source was trained, for tests/ship_teaching_models.py to add this run to
        source_meta = {k: meta[k] for k in ("step", "seconds", "command", "history", "history_every") if k in meta}
        record.write_text(json.dumps(started | {"source": source_meta}, indent=1) + "\n")
    model = model.float().train()
    data = dm.PhantomDataset(shape=tuple(started["shape"]), seed=started["seed"])
    lr = args.lr if args.lr is not None else float(meta["lr"])  # resumed: the run's newest rate
    result = dm.train(model, data, meta["prediction"], args.steps, batch_size=started["batch_size"], lr=lr,
                      ema_decay=started["ema_decay"], ema_warmup=False, out=args.out,
                      checkpoint_every=args.checkpoint_every, keep=args.keep, resume=args.resume, seed=started["seed"],
                      schedule=dm.Schedule.from_config(meta["schedule"]), device="cpu")
    print(f"{args.out}: {len(result.history)} steps from {args.name} (its step {meta['step']}); "
          f"checkpoint {result.checkpoint}")


if __name__ == "__main__":
    main()
