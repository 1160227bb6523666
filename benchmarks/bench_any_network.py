"""CPU inference of pruned VGG and ResNet nets: dense vs pruned at batch 1 and 64, beside the MAC ratio.

    python benchmarks/bench_any_network.py [--threads 1] [--repeats 7] [--share 0.5 0.75] [--json PATH]

No CIFAR-10 here, so no trained posterior: each net (``bclib.models.vgg_cifar10``,
``resnet18_cifar``) is a fresh BC-GNJ net with random weights in which a share of every
layer's groups, chosen at random, gets a high ``log_alpha`` (``bclib.testing.sparsify``).
This measures what ``prune`` makes of such a pattern (the residual adds of a ResNet keep a
channel that any block keeps) and how its speed follows its multiply-adds; it says nothing
about accuracy.
Timings: medians of interleaved runs (``bclib.cost.time_forward``), same process, of the nets
as ``prune`` and ``dense`` build them and, "tuned", rewritten by ``bclib.runtime.faster_eager``
with each convolution on its fastest kernel at that batch size
(``bclib.runtime.tune_convolutions``, 3 timed calls per kernel), the dense net as the pruned one.
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from bclib import compression, cost, models
from bclib.atomic import atomic_write
from bclib.runtime import faster_eager, tune_convolutions
from bclib.testing import sparsify

NETS = ("vgg_cifar10", "resnet18_cifar")
BATCH_SIZES = (1, 64)


def sparse_net(arch: str, share: float, seed: int = 0) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(seed)
    net = models.build(arch, "nj").eval()
    return net, sparsify(net, share, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--share", type=float, nargs="+", default=[0.5, 0.75], help="share of groups pruned per layer")
    ap.add_argument("--json", default=None, help="write the rows here (atomically)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    example = torch.zeros(1, 3, 32, 32)
    rows = []
    print(f"# {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| net | pruned share | parameters dense / pruned | MACs dense / pruned | MAC ratio "
          "| speed-up batch 1 (as built / tuned) | batch 64 (as built / tuned) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch in NETS:
        for share in args.share:
            bayes, thresholds = sparse_net(arch, share)
            dense, pruned = compression.dense(bayes, example), compression.prune(bayes, thresholds, example)
            row = {"net": arch, "share": share,
                   "params": [sum(p.numel() for p in n.parameters()) for n in (dense, pruned)],
                   "macs": [cost.macs(n, example) for n in (dense, pruned)], "ms": {}}  # fmt: skip
            for b in BATCH_SIZES:
                x = torch.randn(b, 3, 32, 32)
                tuned = {f"{k} tuned": tune_convolutions(faster_eager(n), x, repeats=3)
                         for k, n in (("dense", dense), ("pruned", pruned))}  # fmt: skip
                row["ms"][b] = cost.time_forward({"dense": dense, "pruned": pruned, **tuned}, x, args.repeats)
            speed = [" / ".join(f"{row['ms'][b]['dense' + k] / row['ms'][b]['pruned' + k]:.1f}x" for k in ("", " tuned"))
                     for b in BATCH_SIZES]  # fmt: skip
            print(f"| {arch} | {share:g} | {row['params'][0]:,} / {row['params'][1]:,} | "
                  f"{row['macs'][0]:,} / {row['macs'][1]:,} | {row['macs'][0] / row['macs'][1]:.1f}x | "
                  f"{speed[0]} | {speed[1]} |", flush=True)  # fmt: skip
            rows.append(row)
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(rows, indent=2).encode()))


if __name__ == "__main__":
    main()
