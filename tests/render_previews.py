"""Render the notebooks in full, with their outputs, as read-only previews for instructors (a script).

    python tests/render_previews.py 01_parameterizations 05_inverse_problems
    python tests/render_previews.py 03_training 04_evaluation --threads 2     # 04 reuses 03's runs
    python tests/render_previews.py 00_quickstart --time-only --mirror FOLDER  # a budget, no preview

Each notebook runs once, in full (not the tests' smoke mode), in a fresh kernel, with the
reference answers to its exercises (DDPM_MINI_SOLUTIONS=1), offline (a fetch that the checkout
cannot serve fails), with static figures where the notebook would show widgets (DDPM_MINI_STATIC=1:
a saved page cannot run a slider), and with one data folder shared by the notebooks of this invocation, as a
class shares it. Its executed copy, outputs included, goes to docs/previews/<name>.ipynb with a
first cell that says when, where and how long it ran; GitHub and Colab show it without running
anything. The source notebooks in notebooks/ stay without outputs and are what CI executes;
tests/test_notebooks.py fails when a preview's code no longer matches its notebook.

--time-only runs and times a notebook without keeping a preview: for notebooks 00 and 02, which
need the published MedForj weights, point --mirror at a folder of stand-in files of the same
architecture (their cost per step does not depend on the weight values; their images are noise).
Each run appends {"notebook", "seconds", ...} to docs/previews/times.jsonl (--time-only: to stdout).
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PREVIEWS = ROOT / "docs" / "previews"


def _machine(threads: int) -> str:
    import torch
    cores = os.cpu_count()
    return (f"{platform.system()} {platform.machine()}, {cores} CPU cores, torch {torch.__version__}, "
            f"{'torch default threads' if threads == 0 else f'{threads} thread' + ('s' if threads > 1 else '')}")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "notebooks", "ddpm_mini.py"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "an unknown commit"


def header(name: str, minutes: float, machine: str, note: str) -> str:
    today = datetime.date.today().isoformat()
    return (f"> **Preview with outputs, for reading.** This copy of `notebooks/{name}.ipynb` was run in full "
            f"(not the tests' smoke mode, exercises with their reference answers) by `python "
            f"tests/render_previews.py {name}` on {today}, from commit {_commit()}: {minutes:.1f} minutes on "
            f"{machine}{note}. Open and run `notebooks/{name}.ipynb` itself; this copy is not kept up to date "
            f"by hand, and a test fails when its code no longer matches the notebook.")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="+", help="notebook names without .ipynb, e.g. 03_training")
    p.add_argument("--threads", type=int, default=1, help="DDPM_MINI_THREADS for the notebooks (default 1; "
                   "0: torch's default)")
    p.add_argument("--mirror", help="DDPM_MINI_MIRROR for fetches (a folder or URL); default: none, offline")
    p.add_argument("--data", type=pathlib.Path, help="the shared data folder (default: a new temporary one)")
    p.add_argument("--time-only", action="store_true", help="time the notebooks, keep no preview")
    p.add_argument("--note", default="", help="appended to the header's machine description, e.g. "
                   "'; another job shared the machine, so an upper bound'")
    args = p.parse_args()
    missing = [n for n in args.names if not (NOTEBOOKS / f"{n}.ipynb").is_file()]
    if missing:
        known = sorted(f.stem for f in NOTEBOOKS.glob("0*.ipynb"))
        raise SystemExit(f"render_previews: no notebook {', '.join(missing)} in {NOTEBOOKS}; known: {', '.join(known)}")
    if args.threads < 0:
        raise SystemExit(f"render_previews: --threads must be >= 0, got {args.threads}")

    import nbformat
    from nbclient import NotebookClient
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="ddpm-mini-previews-"))
    data = args.data or scratch / "data"
    os.environ.update({"DDPM_MINI_DATA": str(data), "DDPM_MINI_CACHE": str(scratch / "cache"),
                       "DDPM_MINI_MIRROR": args.mirror or "http://127.0.0.1:9",  # closed port: offline
                       "DDPM_MINI_SOLUTIONS": "1", "DDPM_MINI_STATIC": "1", "DDPM_MINI_THREADS": str(args.threads),
                       "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"})
    for key in ("DDPM_MINI_SMOKE", "OMP_NUM_THREADS"):
        os.environ.pop(key, None)
    machine = _machine(args.threads)
    PREVIEWS.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        nb = nbformat.read(str(NOTEBOOKS / f"{name}.ipynb"), as_version=4)
        client = NotebookClient(nb, timeout=7200, kernel_name="python3", coalesce_streams=True,  # one text per
                                resources={"metadata": {"path": str(NOTEBOOKS)}})  # stream, progress bars at their end
        start = time.perf_counter()
        client.execute()
        minutes = (time.perf_counter() - start) / 60
        record = dict(notebook=name, seconds=round(minutes * 60, 1), date=datetime.date.today().isoformat(),
                      machine=machine + args.note, commit=_commit(), preview=not args.time_only)
        if args.time_only:
            print(json.dumps(record), flush=True)
            continue
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(header(name, minutes, machine, args.note)))
        nb.metadata.pop("widgets", None)  # widget state: large, and GitHub cannot show it
        tmp = PREVIEWS / f".{name}.ipynb.part"
        nbformat.write(nb, str(tmp))
        tmp.replace(PREVIEWS / f"{name}.ipynb")  # no half-written preview
        with open(PREVIEWS / "times.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{name}: {minutes:.1f} min -> {PREVIEWS / (name + '.ipynb')}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
