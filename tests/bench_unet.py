"""Benchmark: our U-Net against MONAI's DiffusionModelUNet, side by side in one run.

    python tests/bench_unet.py                               # CPU, fp32, 64^3 and 96x112x96
    python tests/bench_unet.py --device cuda --shapes 64,64,64 96,112,96 192,224,192   # fp16 autocast
    python tests/bench_unet.py --plain          # also our plain forward passes, UNet(fast=False)
    python tests/bench_unet.py --shapes 192,224,192 --rounds 1 --variants channels_last compile bf16

Variants (CPU speed-ups PyTorch offers, each on top of ours): channels_last (channels_last_3d
weights and input), compile (torch.compile, default mode; its compile time is in the warm-up, not
the timings), bf16 (CPU autocast to bfloat16; fast only where the CPU has native bf16, e.g.
AVX512-BF16 or AMX, which `lscpu` lists). Each variant's output is compared with ours: the
column "rel" is max |variant - ours| / max |ours|; fp32 variants are kept only within 1e-4.

Same weights (MEDFORJ_UNET, random but identical), same input, t = 500. Each
measurement runs in a fresh subprocess so peak memory is clean; ours and MONAI
alternate (with --plain: ours, MONAI, plain, then the reverse). Memory is the peak
above the level just before the forward pass (CPU: resident set size, with the peak counter reset through /proc/self/clear_refs;
CUDA: torch.cuda.max_memory_allocated). Prints medians and the ratios ours/MONAI.
Goals on a CPU: time <= 0.9x, peak memory <= 0.8x.
"""
import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time


#: Our U-Net's forward passes: the fast default, the plain one, and the CPU speed-up variants.
VARIANTS = ("ours", "plain", "channels_last", "compile", "bf16")


def rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args):
    import contextlib

    import torch
    from monai.networks.nets import DiffusionModelUNet

    import ddpm_mini as dm

    torch.manual_seed(0)
    ref = DiffusionModelUNet(**dm.MEDFORJ_UNET)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    if args.worker != "monai":
        model = dm.UNet(**dm.MEDFORJ_UNET, fast=args.worker != "plain")
        model.load_state_dict(ref.state_dict(), strict=True)
        del ref
    else:
        model = ref
    device = torch.device(args.device)
    model = model.to(device).eval()
    x = torch.randn(1, 1, *args.shape, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.full((1,), 500, device=device, dtype=torch.long)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
    if args.worker == "channels_last":
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif args.worker == "compile":
        model = torch.compile(model)
    elif args.worker == "bf16":
        amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def forward():
        with torch.inference_mode(), amp:
            out = model(x, t)
        if cuda:
            torch.cuda.synchronize()
        return out

    out = forward()  # warm-up (kernel selection, caches)
    del out
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        base = rss_bytes("VmRSS")
    out = forward()
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")) - base
    if args.save:
        torch.save(out.float().cpu(), args.save)
    del out
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    print(json.dumps({"times": times, "peak": peak}))


def run_one(which, shape, args, save):
    cmd = [sys.executable, __file__, "--worker", which, "--device", args.device, "--repeats", str(args.repeats),
           "--shape", *map(str, shape), "--save", str(save)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker {which} {shape} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", nargs="+", default=["64,64,64", "96,112,96"])
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (ours, MONAI) per shape")
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes per worker")
    p.add_argument("--plain", action="store_true", help="also time our U-Net's plain forward passes (UNet(fast=False))")
    p.add_argument("--variants", nargs="*", default=[], choices=VARIANTS[1:], help="speed-up variants of ours to time")
    p.add_argument("--worker", choices=("monai",) + VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--shape", type=int, nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import tempfile

    import torch
    extra = (["plain"] if args.plain else []) + [v for v in args.variants if v != "plain"]
    precision = "fp16 autocast" if args.device.startswith("cuda") else "fp32"
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"U-Net forward, MEDFORJ_UNET, batch 1, {precision}, {device_name}, torch {torch.__version__}; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'shape':>14} {'ours s':>8} {'MONAI s':>8} {'time':>6} {'ours MiB':>9} {'MONAI MiB':>9} {'memory':>7}"
          + "".join(f" | {v[:13]:>13} s {'time':>6} {'MiB':>6} {'memory':>7} {'rel':>8}" for v in extra))
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="bench_unet_"))
    for spec in args.shapes:
        shape = tuple(int(v) for v in spec.split(","))
        res = {"ours": [], "monai": [], **{v: [] for v in extra}}
        for r in range(args.rounds):
            for which in (list(res) if r % 2 == 0 else list(res)[::-1]):
                res[which].append(run_one(which, shape, args, scratch / f"{which}.pt"))
        out = {k: torch.load(scratch / f"{k}.pt") for k in res}
        t = {k: statistics.median(x for v in res[k] for x in v["times"]) for k in res}
        m = {k: min(v["peak"] for v in res[k]) for k in res}
        rel = {k: float((out[k] - out["ours"]).abs().max() / out["ours"].abs().max()) for k in extra}
        print(f"{'x'.join(map(str, shape)):>14} {t['ours']:8.3f} {t['monai']:8.3f} {t['ours'] / t['monai']:5.2f}x "
              f"{m['ours'] / 2**20:9.0f} {m['monai'] / 2**20:9.0f} {m['ours'] / m['monai']:6.2f}x"
              + "".join(f" | {t[v]:15.3f} {t[v] / t['monai']:5.2f}x {m[v] / 2**20:6.0f} {m[v] / m['monai']:6.2f}x "
                        f"{rel[v]:8.1e}" for v in extra), flush=True)

if __name__ == "__main__":
    main()
