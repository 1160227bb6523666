"""Fine-tuning with subnormal floats flushed to zero (bclib's default) and without, as a ratio in one run.

    BCLIB_DATA=../shared/data python benchmarks/bench_denormals.py [--epochs 5] [--threads 2]

Fine-tunes the shipped LeNet-300-100 BC-GNJ posterior at its shipped thresholds
(:func:`bclib.finetune.finetune`, seed 1) for ``--epochs`` epochs, once in a process started
with ``BCLIB_FLUSH_DENORMAL=0`` and once with the default (the setting must be made before
PyTorch starts its worker threads, hence one process each), alternating ``--repeats`` times.
Prints the seconds of each and the count of subnormal values left in Adam's first moments
without flushing: the cause of the difference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ONE_RUN = """
import json, sys, tempfile, time, torch
import bclib
from pathlib import Path
from bclib import finetune, reproduce
from bclib.config import results_dir
from bclib.train import load_checkpoint
torch.set_num_threads(int(sys.argv[2]))
res = reproduce._finished("lenet_300_100", "nj", results_dir(), "bench")[2]
train_b, val_b, _ = reproduce._split("lenet_300_100", res["train_limit"], 128, res["seed"])
bayes = load_checkpoint(results_dir() / "lenet_300_100-nj.pt")[0]
torch.manual_seed(res["seed"])
with tempfile.TemporaryDirectory() as tmp:
    state = Path(tmp) / "state.pt"  # the training state: Adam's moments at the end
    t0 = time.perf_counter()
    finetune.finetune(bayes, res["thresholds"], train_b, int(sys.argv[1]), example_input=val_b.x[:1],
                      state_path=state, progress=False)
    seconds = time.perf_counter() - t0
    adam = torch.load(state, weights_only=False)["optimizer"]["state"]
tiny = torch.finfo(torch.float32).tiny
m = [s["exp_avg"] for s in adam.values()]
print(json.dumps({"seconds": seconds, "subnormal": sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in m),
                  "moments": sum(t.numel() for t in m)}))
"""


def run(epochs: int, threads: int, flush: bool) -> dict:
    env = {**os.environ, "BCLIB_FLUSH_DENORMAL": "1" if flush else "0"}
    out = subprocess.run([sys.executable, "-c", ONE_RUN, str(epochs), str(threads)], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    runs: dict[bool, list[dict]] = {True: [], False: []}
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        for flush in (False, True):
            runs[flush].append(run(args.epochs, args.threads, flush))
    med = {f: statistics.median(r["seconds"] for r in rs) for f, rs in runs.items()}
    kept = runs[False][-1]
    print(f"fine-tuning LeNet-300-100 BC-GNJ, {args.epochs} epochs, {args.threads} threads, "
          f"median of {args.repeats} ({time.perf_counter() - t0:.0f} s in all)")
    print(f"subnormals kept:    {med[False]:.1f} s ({kept['subnormal']:,} of Adam's {kept['moments']:,} first "
          f"moments subnormal at the end)")
    print(f"flushed (default):  {med[True]:.1f} s, {med[False] / med[True]:.2f}x faster "
          f"({runs[True][-1]['subnormal']:,} subnormal)")  # fmt: skip


if __name__ == "__main__":
    main()
