"""Uniform grids trained on the labels and distilled from the run's Bayesian net, side by side.

    BCLIB_DATA=../shared/data OMP_NUM_THREADS=1 BCLIB_RESULTS=results/seeds/seed4 \
        python tools/distill_grid.py lenet_300_100 nj --level 0.01 --budgets 0.02 --seeds 2 3 4 5 6 7

For a finished run (``reproduce --grid``'s inputs: ``results/<arch>-<prior>.json``, its
fine-tuned level from ``state/finetune/`` or the headline, ``BCLIB_RESULTS`` for another seed's
folder) and each budget and training seed, :func:`bclib.uniform_grid.fit_steps` twice on the
pruned level: trained through the rounding on the labels (as ``--grid`` for LeNet-5-Caffe), and
with the run's Bayesian network (its posterior means) as the teacher
(:func:`bclib.quantize.distillation_loss`, temperature 2; as ``--grid`` for LeNet-300-100),
for ``--grid``'s epochs through the rounding or ``--epochs``.
Prints coded bytes and test error of each; nothing is written to ``results/``.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bclib import compression, reproduce
from bclib.config import results_dir
from bclib.train import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=["lenet_300_100", "lenet5_caffe"])
    ap.add_argument("prior", choices=["nj", "hs"])
    ap.add_argument("--level", default=None, help="fine-tuned level, e.g. 0.01 or 0.01+0.0025 (default: the headline)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.001, 0.003, 0.006, 0.01, 0.02])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4], help="training seeds")
    ap.add_argument("--epochs", type=int, default=None, help="epochs through the rounding (default: --grid's)")
    args = ap.parse_args()
    out = results_dir()
    _, bayes_path, result = reproduce._finished(args.arch, args.prior, out, "tools/distill_grid.py")
    s = reproduce._grid_settings(args.arch, False)
    if args.epochs is not None:
        s["epochs"] = args.epochs
    batches = reproduce._split(args.arch, result["train_limit"], 128, result["seed"])
    x = reproduce._example_input(batches[1])
    levels, missing = reproduce._finetuned_levels(args.arch, args.prior, out, result, s["margin"], x.device, x, False)
    ft = result["finetuned"]
    headline = reproduce._level_stem(args.arch, args.prior, ft["points"][ft["headline"]])
    name = args.level or headline.removeprefix(f"{args.arch}-{args.prior}-")
    if name not in levels:
        ap.error(f"level {name} is not at hand (levels: {sorted(levels)}; missing: {missing}; --finetune makes them)")
    model, thresholds, _, about = levels[name]
    pruned = compression.prune(model, thresholds, x)
    teacher = load_checkpoint(bayes_path)[0]
    print(f"{args.arch}-{args.prior} seed {result['seed']}, level {name} ({about['rate_pruning']:.1f}x), "
          f"{s['epochs']} epochs: "
          "coded bytes, test error % (labels | distilled)", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        for budget in args.budgets:
            for seed in args.seeds:
                row = [reproduce._grid_point(pruned, budget, s, seed, batches, Path(d) / "grid.bc", teacher=t)
                       for t in (None, teacher)]  # fmt: skip
                print(f"  budget {budget:g}, training seed {seed}: "
                      + " | ".join(f"{p['coded_bytes']:,} B {p['error']:.2f} %" for p in row), flush=True)


if __name__ == "__main__":
    main()
