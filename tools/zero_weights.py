"""Single weights zeroed on top of group pruning: a probe of a shipped coded file's bytes and error.

    BCLIB_DATA=../shared/data OMP_NUM_THREADS=1 python tools/zero_weights.py lenet_300_100 nj 0 0.3 0.5 --epochs 10
    BCLIB_DATA=../shared/data OMP_NUM_THREADS=1 python tools/zero_weights.py lenet_300_100 hs 0 0.72 --grid held

Without ``--grid``: starts from the run's headline coded file of fitted bits
(``results/<arch>-<prior>-quantized.bc``, from ``reproduce --quantize``) and trains it further
through its rounding (as ``bclib.quantize.train_on_grid``). With ``--grid POINT`` (``held``,
``headline`` or a point's index in the run's ``grid`` section, from ``reproduce --grid``):
starts from that point's pruned level and trains it through that point's uniform grid, on the
labels or distilled from the run's Bayesian network as ``--grid`` does, so that the fraction
0 with ``--grid``'s epochs and the point's seed gives the point's own file again.

For each fraction ``f``, the layer with the most weights holds its smallest ``f`` of weights
(by magnitude, its zeros counted) at zero while the net trains ``--epochs`` through its
rounding (straight-through gradients, the run's training split); it is then rounded and coded
again (``bclib.coded``; written to ``--out`` and read back). Prints, per fraction: the share of
zeros in that layer, held-out and test error, coded bytes. ``f = 0`` is the control: the same
training with no weight held at zero. ``--ramp R`` holds ``f/R`` of them in the first epoch,
``2f/R`` in the second and so on up to ``f``, the smallest chosen again from the trained
weights after every epoch (gradual magnitude pruning, Zhu & Gupta 2017); without it the mask
is chosen once, from the starting weights. ``--seeds`` trains each fraction with other seeds
(the order of the batches and the training's randomness) for the spread. Nothing is written
to ``results/``.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from bclib import coded, compression, quantize, reproduce, uniform_grid
from bclib.compression import LayerBits, former_group_layers, quantized
from bclib.config import results_dir
from bclib.load_coded import load_coded
from bclib.train import load_checkpoint


Spec = Sequence[Union[LayerBits, uniform_grid.GridStep]]


def fitted_bits_start(res: dict[str, Any]) -> tuple[nn.Module, Spec, str]:
    """The headline file of fitted bits: the net to train, its bits, a line about it."""
    if "quantized" not in res:
        raise FileNotFoundError(f"{res['arch']}-{res['prior']} has no fitted bits: run python -m bclib.reproduce "
                                "--finetune, then --quantize first")  # fmt: skip
    q = res["quantized"]
    head = q["points"][q["headline"]]
    return (load_coded(results_dir() / q["file"]), [LayerBits(*b) for b in head["bits"]],
            f"headline file of fitted bits: {head['coded_bytes']:,} bytes, test error {head['error']:.2f} %")  # fmt: skip


def grid_start(res: dict[str, Any], bayes_path: Path, point: str,
               x: torch.Tensor) -> tuple[nn.Module, Spec, str, dict[str, Any], Optional[nn.Module]]:  # fmt: skip
    """A grid point's pruned level, its steps, a line about it, the run's ``grid`` section (the
    settings it was made with) and the teacher."""
    if "grid" not in res:
        raise FileNotFoundError(f"{res['arch']}-{res['prior']} has no uniform grids: run python -m bclib.reproduce "
                                "--grid first")  # fmt: skip
    g, arch, prior = res["grid"], res["arch"], res["prior"]
    index = g[point] if point in ("held", "headline") else int(point) if point.isdigit() else None
    if index is None or index >= len(g["points"]):
        raise ValueError(f"--grid takes held, headline or a point's index below {len(g['points'])}; "
                         f"{arch}-{prior} has no point {point!r}")  # fmt: skip
    p = g["points"][index]
    levels, missing = reproduce._finetuned_levels(arch, prior, results_dir(), res, g["margin"], x.device, x, False)
    if p["level"] not in levels:
        raise FileNotFoundError(f"the fine-tuned level {p['level']} is not at hand (missing: {missing}; "
                                "python -m bclib.reproduce --finetune makes it)")  # fmt: skip
    model, thresholds, _, _ = levels[p["level"]]
    teacher = load_checkpoint(bayes_path)[0] if g["distil"] else None
    return (compression.prune(model, thresholds, x), [uniform_grid.GridStep(v) for v in p["steps"]],
            f"grid point {index} (level {p['level']}, budget {p['max_drop']:g}): {p['coded_bytes']:,} bytes, "
            f"test error {p['error']:.2f} %", g, teacher)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=["lenet_300_100", "lenet5_caffe"])
    ap.add_argument("prior", choices=["nj", "hs"])
    ap.add_argument("fractions", type=float, nargs="+", help="shares of the largest layer's weights to zero")
    ap.add_argument("--grid", metavar="POINT", help="start from this uniform-grid point: held, headline or an index")
    ap.add_argument("--epochs", type=int, help="epochs through the rounding (default: 3, or --grid's)")
    ap.add_argument("--lr", type=float, help="learning rate (default: 1e-3, or --grid's)")
    ap.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the run's own)")
    ap.add_argument("--ramp", type=int, default=1,
                    help="epochs over which the held share grows linearly to the fraction, the smallest "
                         "weights chosen again after every epoch (default 1: all held from the start, chosen once)")
    ap.add_argument("--out", type=Path, default=Path("results-levels"), help="the coded files")
    args = ap.parse_args()
    _, bayes_path, res = reproduce._finished(args.arch, args.prior, results_dir(), "tools/zero_weights.py")
    train_b, val_b, test_b = reproduce._split(args.arch, res["train_limit"], 128, res["seed"])
    teacher, epochs, lr = None, 3, 1e-3
    if args.grid is None:
        start, spec, about = fitted_bits_start(res)
        rounding: Callable[[int], nn.Module] = lambda i: quantize._OnGrid(spec[i])  # noqa: E731
        store = lambda net: quantized(net, spec, quantize.BIAS_SIGNIFICAND)  # noqa: E731
    else:
        start, spec, about, g, teacher = grid_start(res, bayes_path, args.grid, reproduce._example_input(val_b))
        epochs, lr = g["epochs"], g["lr"]
        rounding = lambda i: uniform_grid._OnStep(spec[i])  # noqa: E731
        store = lambda net: uniform_grid.on_steps(net, spec, quantize.BIAS_SIGNIFICAND).cpu()  # noqa: E731
    epochs = epochs if args.epochs is None else args.epochs
    lr = lr if args.lr is None else args.lr
    layers = former_group_layers(start)
    big = max(range(len(layers)), key=lambda i: layers[i].weight.numel())
    print(f"{args.arch}-{args.prior} {about}; zeroing in layer {big} ({layers[big].weight.numel():,} weights), "
          f"{epochs} epochs{', distilled' if teacher is not None else ''}", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for f, seed in itertools.product(args.fractions, args.seeds or [res["seed"]]):
        held = lambda epoch: f * min(1.0, (epoch + 1) / args.ramp)  # noqa: E731  (share held in epoch 0, 1, ...)
        masks = quantize.zero_masks(start, [held(0) if i == big else 0.0 for i in range(len(layers))])
        epoch = 0

        def grow(grids: list[tuple[int, nn.Module]]) -> None:  # the next epoch's mask, by the current weights
            nonlocal epoch
            epoch += 1
            w = dict(grids)[big].parametrizations.weight.original
            masks[big].copy_(quantize.smallest_zeroed(w, held(epoch)))

        torch.manual_seed(seed)
        train_b.generator.manual_seed(seed)
        net = quantize.train_through(start, train_b, epochs, lr, lambda i, layer: rounding(i),
                                     grow if args.ramp > 1 else None, teacher=teacher, masks=masks)  # fmt: skip
        kind = "zeroed" if args.grid is None else f"grid{args.grid}-zeroed"
        path = args.out / f"{args.arch}-{args.prior}-{kind}-{f:g}-seed{seed}.bc"
        path.write_bytes(coded.encode_network(store(net), spec).data)
        back = load_coded(path)
        zeros = (former_group_layers(back)[big].weight == 0).float().mean().item()
        print(f"  {f:g}, seed {seed}: {100 * zeros:.0f} % zeros, held-out error {reproduce._error(back, val_b):.2f} %, "
              f"test error {reproduce._error(back, test_b):.2f} %, {path.stat().st_size:,} bytes", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
