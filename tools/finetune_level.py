"""One fine-tuning level of a finished run, with other epochs or learning rate than ``--finetune``'s.

    BCLIB_DATA=../shared/data OMP_NUM_THREADS=1 python tools/finetune_level.py lenet_300_100 nj 0.03 --epochs 30

Runs :func:`bclib.reproduce._finetune_level` (threshold search within the held-out budget,
fine-tuning with those groups fixed, evaluation from the float16 file) on the shipped
posterior ``results/<arch>-<prior>.pt`` with its seed and data split, and prints the point:
test error after precision reduction (the paper's bits), rates, kept architecture. State and
checkpoint go to ``--out`` (resumable), never into ``results/``: the shipped runs keep
``_finetune_settings``' epochs. For trying a setting before changing those.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bclib import reproduce
from bclib.config import results_dir
from bclib.train import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch", choices=["lenet_300_100", "lenet5_caffe"])
    ap.add_argument("prior", choices=["nj", "hs"])
    ap.add_argument("budget", type=float, help="held-out accuracy budget of the threshold search, e.g. 0.03")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=Path("results-levels"), help="state, checkpoint and point JSON")
    args = ap.parse_args()
    _, bayes_path, res = reproduce._finished(args.arch, args.prior, results_dir(), "tools/finetune_level.py")
    batches = reproduce._split(args.arch, res["train_limit"], 128, res["seed"])
    bayes = load_checkpoint(bayes_path)[0]
    state = args.out / f"{args.arch}-{args.prior}-{args.budget:g}-{args.epochs}ep-lr{args.lr:g}"
    state.mkdir(parents=True, exist_ok=True)
    s = {"epochs": args.epochs, "lr": args.lr}
    p = reproduce._finetune_level(bayes, args.arch, args.prior, args.budget, s, res["seed"], batches, state)
    reproduce._atomic_json(p, state / "point.json")
    arch = "-".join(str(i) for i, _ in p["architecture"])
    print(f"{args.arch}-{args.prior} budget {args.budget:g}, {args.epochs} epochs at lr {args.lr:g}: test error "
          f"{p['error_compressed']:.2f} % (held-out {p['held_out_error_compressed']:.2f} %), "
          f"x{p['rate_pruning']:.1f} pruning, x{p['rate_precision']:.0f} with precision, kept {arch}, "
          f"{p['train_seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
