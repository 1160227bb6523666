"""Training-step cost of the Bayesian layers against the plain network, as ratios from one run.

    python benchmarks/bench_train.py [--arch lenet_300_100] [--steps 100] [--repeats 5]

Each network is trained with the same loop (bclib.train.train: Adam, lr 1e-3, batch 128,
data preloaded as tensors) on the same random MNIST-shaped batches. Rounds alternate between
the networks, so machine load hits all of them alike; the median time per step is reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bclib import data, models, train


def time_steps(net: torch.nn.Module, batches: data.TensorBatches) -> float:
    """Seconds per training step for one pass over ``batches``."""
    t0 = time.perf_counter()
    train.train(net, batches, 1, n_data=60000, progress=False)
    return (time.perf_counter() - t0) / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="lenet_300_100", choices=sorted(models.ARCHITECTURES))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    n = args.steps * args.batch_size
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    batches = data.TensorBatches(x, y, args.batch_size, shuffle=True)
    nets = {"plain": models.build(args.arch, None), "nj": models.build(args.arch, "nj"), "hs": models.build(args.arch, "hs")}
    times: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(args.repeats + 1):  # the first round warms up
        for k, net in nets.items():
            times[k].append(time_steps(net, batches))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    print(f"{args.arch}, batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| network | ms per step | ratio to plain |\n| --- | --- | --- |")
    for k, t in med.items():
        print(f"| {k} | {1000 * t:.2f} | {t / med['plain']:.2f}x |")


if __name__ == "__main__":
    main()
