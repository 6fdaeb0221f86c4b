"""Maintainer script (not a test): turn finished teaching runs into the shipped teaching models.

    python tests/ship_teaching_models.py /work/runs/teaching_flow [/work/runs/teaching_sample ...]

For each run folder (a `python ddpm_mini.py train` output) it takes the EMA weights of the newest
checkpoint (or --step N) and writes weights/teaching_<prediction>.safetensors in float16, with the
metadata load_model needs (prediction, unet, schedule, shape) and how the model was trained (step,
seconds, batch_size, lr and lr_steps, ema_decay, seed, the train command from --command, and the
loss history as "history": the mean loss of every 10 steps). Before writing it checks that half
precision does not change what the model draws: 4 samples (20 DDIM steps, seed 0) from the float32 and the float16
weights must agree within --tolerance (max |difference|, intensities in [-1, 1]) and get the same
lab.PhantomScore verdicts. Then it writes the file's sha256 and size into the teaching_<prediction>
row of data_manifest.csv (creating the row if needed) and prints them.

    python tests/ship_teaching_models.py --rows-only weights/teaching_*.safetensors   # rows of files made elsewhere
"""
import argparse
import csv
import hashlib
import json
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "notebooks")]
import ddpm_mini as dm  # noqa: E402
from lab import PhantomScore  # noqa: E402
from conftest import repository  # noqa: E402  (tests/, this script's folder, is on sys.path)

#: Where a shipped file is downloaded from when the checkout's copy is absent (Colab): the
#: repository's raw files, at pyproject's address (tests/set_repo_url.py keeps the manifest on it).
RAW = repository().replace("https://github.com/", "https://raw.githubusercontent.com/", 1) + "/main/weights/"
CITATION = "ddpm-mini teaching models (this repository)"


def checkpoint(run: pathlib.Path, step):
    if step is None:
        return dm.latest_checkpoint(run)
    path = run / "checkpoints" / f"step_{step:06d}"
    if not (path / "ema.safetensors").exists():
        raise SystemExit(f"{path} is not a complete checkpoint")
    return path


def samples(model, meta):
    return dm.sample(model, meta["prediction"], shape=(4, 1, *meta["shape"]), steps=20,
                     schedule=dm.Schedule.from_config(meta["schedule"]), generator=torch.Generator().manual_seed(0),
                     progress=False)[:, 0]


def ship(run: pathlib.Path, args) -> dict:
    ckpt = checkpoint(run, args.step)
    model, meta = dm.load_model(ckpt / "ema.safetensors", "cpu")
    if (ckpt / "state.pt").exists():
        history = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)["history"].numpy()
    else:  # a checkpoint copied without its optimizer state: the run's history.csv up to this step
        history = np.loadtxt(run / "history.csv", delimiter=",", skiprows=1, ndmin=2)[:, 1][: int(meta["step"])]
    coarse = [float(f"{v:.4g}") for v in history[: len(history) // 10 * 10].reshape(-1, 10).mean(1)]
    name = f"teaching_{meta['prediction']}"
    out = ROOT / "weights" / f"{name}.safetensors"
    keep = {k: meta[k] for k in ("prediction", "shape", "step", "seed", "batch_size", "lr", "lr_steps", "ema_decay",
                                 "seconds") if k in meta}
    command = args.command.format(prediction=meta["prediction"])
    if (run / "init.json").exists():  # a run of tests/continue_teaching_model.py: add the model it started from
        source = json.loads((run / "init.json").read_text())["source"]
        keep["step"] = int(source["step"]) + int(meta["step"])
        keep["seconds"] = f"{float(source['seconds']) + float(meta['seconds']):.1f}"
        earlier = json.loads(source["history"]) if isinstance(source["history"], str) else source["history"]
        coarse = [float(v) for v in earlier] + coarse
        command = f"{source['command']}; then {command}"
    dm.save_weights(model, out, schedule=dm.Schedule.from_config(meta["schedule"]), dtype=torch.float16, **keep,
                    ema="true", command=command, history=coarse, history_every=10)
    half, half_meta = dm.load_model(out, "cpu")
    a, b = samples(model, meta), samples(half, half_meta)
    diff = float((a - b).abs().max())
    score = PhantomScore(tuple(meta["shape"]))
    verdict = [[score.recognisable(v.numpy()) for v in x] for x in (a, b)]
    tdice = [[round(score.tdice(v.numpy()), 3) for v in x] for x in (a, b)]
    print(f"{name}: step {meta['step']}; float32 vs float16 samples: max |diff| {diff:.4f}; "
          f"tDice {tdice[0]} vs {tdice[1]}; recognisable {sum(verdict[0])}/4 vs {sum(verdict[1])}/4", flush=True)
    if diff > args.tolerance or verdict[0] != verdict[1]:
        out.unlink()
        raise SystemExit(f"{name}: half precision changes the samples (max |diff| {diff:.4f} > {args.tolerance} "
                         "or other verdicts); nothing shipped")
    return manifest_row(out)


def manifest_row(out: pathlib.Path) -> dict:
    """The data_manifest.csv row of a shipped file: its sha256 and size as it is on disk."""
    _, meta = dm.load_model(out, "cpu")
    data = out.read_bytes()
    return {"name": out.stem, "kind": "weights", "group": "teaching", "url": RAW + out.name,
            "hash": "sha256:" + hashlib.sha256(data).hexdigest(), "verified": "true", "size": str(len(data)),
            "license": "MIT (this repository)", "citation": CITATION,
            "description": f"TEACHING_UNET, {meta['prediction']} prediction, EMA, float16; phantoms "
                           f"{'x'.join(map(str, meta['shape']))}, step {meta['step']} (docs/methods.md#teaching-models)"}


def update_manifest(rows: list) -> None:
    path = ROOT / "data_manifest.csv"
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields, table = reader.fieldnames, list(reader)
    names = [r["name"] for r in table]
    for row in rows:
        if row["name"] in names:
            table[names.index(row["name"])] = row
        else:
            table.append(row)
            names.append(row["name"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields} for r in table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="training output folders")
    parser.add_argument("--step", type=int, help="ship this checkpoint step (default: the newest)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="max |float32 - float16 sample| (default 0.05)")
    parser.add_argument("--command", default="python ddpm_mini.py train --phantoms --prediction {prediction} "
                        "--size 40 48 40 --batch-size 2 --lr 1e-3 --seed 0",
                        help="the training command recorded in the metadata ({prediction} is filled in)")
    parser.add_argument("--rows-only", action="store_true",
                        help="the arguments are shipped files (weights/teaching_*.safetensors): only (re)write their rows")
    args = parser.parse_args()
    rows = [manifest_row(f) if args.rows_only else ship(f, args) for f in args.runs]
    update_manifest(rows)
    print(json.dumps([{k: r[k] for k in ("name", "hash", "size")} for r in rows], indent=1))
    print("data_manifest.csv updated")


if __name__ == "__main__":
    main()
