"""Single weights zeroed on top of group pruning: a probe of a shipped coded file's bytes and error.

    BCLIB_DATA=../shared/data OMP_NUM_THREADS=1 python tools/zero_weights.py lenet_300_100 nj 0 0.3 0.5 --epochs 10

Reads the run's headline coded file (``results/<arch>-<prior>-quantized.bc``, from
``reproduce --quantize``) and its fitted bits. For each fraction ``f``, the layer with the most
weights holds its smallest ``f`` of weights (by magnitude, its zeros counted) at zero; then the
net trains ``--epochs`` through its rounding with that mask (as ``bclib.quantize.train_on_grid``,
straight-through gradients, the run's seed and training split), is rounded to the same bits
and coded again (``bclib.coded``; written to ``--out`` and read back). Prints, per fraction:
the share of zeros in that layer, held-out and test error, coded bytes. ``f = 0`` is the
control: the same training with no weight held at zero. ``--ramp R`` holds ``f/R`` of them
in the first epoch, ``2f/R`` in the second and so on up to ``f``, the smallest chosen again
from the trained weights after every epoch (gradual magnitude pruning, Zhu & Gupta 2017);
without it the mask is chosen once, from the stored weights.
``--seeds`` trains each fraction with
other seeds (the order of the batches and the training's randomness) for the spread. Nothing is written to ``results/``.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
from torch import nn

from bclib import coded, quantize, reproduce
from bclib.compression import LayerBits, former_group_layers, quantized
from bclib.config import results_dir
from bclib.load_coded import load_coded


class _ZeroedOnGrid(nn.Module):
    """Parametrization: ``bclib.quantize``'s straight-through rounding to ``bits``, times ``mask``."""

    def __init__(self, bits: LayerBits, mask: torch.Tensor) -> None:
        super().__init__()
        self.on_grid, self.mask = quantize._OnGrid(bits), mask

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.on_grid(w) * self.mask


def smallest_zeroed(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """A 0/1 mask that holds the ``fraction`` of ``weight``'s entries with the smallest magnitude
    (ties at the cut included) at zero."""
    if not 0 <= fraction < 1:
        raise ValueError(f"a fraction of weights to zero must be in [0, 1), got {fraction!r}")
    a = weight.detach().abs()
    k = int(fraction * a.numel())
    return torch.ones_like(weight) if k == 0 else (a > a.flatten().kthvalue(k).values).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=["lenet_300_100", "lenet5_caffe"])
    ap.add_argument("prior", choices=["nj", "hs"])
    ap.add_argument("fractions", type=float, nargs="+", help="shares of the largest layer's weights to zero")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the run's own)")
    ap.add_argument("--ramp", type=int, default=1,
                    help="epochs over which the held share grows linearly to the fraction, the smallest "
                         "weights chosen again after every epoch (default 1: all held from the start, chosen once)")
    ap.add_argument("--out", type=Path, default=Path("results-levels"), help="the coded files")
    args = ap.parse_args()
    _, _, res = reproduce._finished(args.arch, args.prior, results_dir(), "tools/zero_weights.py")
    if "quantized" not in res:
        raise FileNotFoundError(f"{args.arch}-{args.prior} has no fitted bits: run python -m bclib.reproduce "
                                "--finetune, then --quantize first")  # fmt: skip
    q = res["quantized"]
    head = q["points"][q["headline"]]
    bits = [LayerBits(*b) for b in head["bits"]]
    stored = load_coded(results_dir() / q["file"])
    train_b, val_b, test_b = reproduce._split(args.arch, res["train_limit"], 128, res["seed"])
    layers = former_group_layers(stored)
    big = max(range(len(layers)), key=lambda i: layers[i].weight.numel())
    print(f"{args.arch}-{args.prior} headline file: {head['coded_bytes']:,} bytes, test error {head['error']:.2f} %; "
          f"zeroing in layer {big} ({layers[big].weight.numel():,} weights)", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for f, seed in itertools.product(args.fractions, args.seeds or [res["seed"]]):
        held = lambda epoch: f * min(1.0, (epoch + 1) / args.ramp)  # noqa: E731  (share held in epoch 0, 1, ...)
        masks = [smallest_zeroed(m.weight, held(0) if i == big else 0.0) for i, m in enumerate(layers)]
        epoch = 0

        def grow(grids: list[tuple[int, nn.Module]]) -> None:  # the next epoch's mask, by the current weights
            nonlocal epoch
            epoch += 1
            w = dict(grids)[big].parametrizations.weight.original
            masks[big].copy_(smallest_zeroed(w, held(epoch)))

        torch.manual_seed(seed)
        train_b.generator.manual_seed(seed)
        net = quantize.train_through(stored, train_b, args.epochs, args.lr,
                                     lambda i, layer: _ZeroedOnGrid(bits[i], masks[i]), grow if args.ramp > 1 else None)  # fmt: skip
        with torch.no_grad():
            for m, mask in zip(former_group_layers(net), masks):
                m.weight.mul_(mask)
        small = quantized(net, bits, quantize.BIAS_SIGNIFICAND)
        path = args.out / f"{args.arch}-{args.prior}-zeroed-{f:g}-seed{seed}.bc"
        path.write_bytes(coded.encode_network(small, bits).data)
        back = load_coded(path)
        zeros = (former_group_layers(back)[big].weight == 0).float().mean().item()
        print(f"  {f:g}, seed {seed}: {100 * zeros:.0f} % zeros, held-out error {reproduce._error(back, val_b):.2f} %, "
              f"test error {reproduce._error(back, test_b):.2f} %, {path.stat().st_size:,} bytes", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
