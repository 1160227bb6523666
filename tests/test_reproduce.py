"""``python -m bclib.reproduce --fast`` end to end on LeNet-300-100: files, trade-off, resuming, recompressing."""
import json

import pytest

from bclib import baselines, reproduce
from bclib.config import data_dir

pytestmark = pytest.mark.skipif(
    not (data_dir() / "MNIST" / "raw" / "train-images-idx3-ubyte").exists(), reason="MNIST not in BCLIB_DATA"
)


def test_fast_run_writes_results_and_resumes(tmp_path):
    reproduce.main(["--fast", "--out", str(tmp_path), "--only", "lenet_300_100-nj"])
    for name in ("lenet_300_100-plain.pt", "lenet_300_100-nj.pt", "lenet_300_100-nj-pruned.pt", "table.md"):
        assert (tmp_path / name).is_file(), name
    r = json.loads((tmp_path / "lenet_300_100-nj.json").read_text())
    assert r["fast"] and r["epochs"] == 2
    assert [p["max_drop"] for p in r["tradeoff"]] == list(reproduce.BUDGETS)
    assert r["tradeoff"][-1]["rate_precision"] == r["rate_precision"]
    assert all(p["rate_precision"] >= p["rate_pruning"] >= 1 for p in r["tradeoff"])
    table = (tmp_path / "table.md").read_text()
    # the matched (headline) row; the paper-table row and one per budget; a baselines column
    assert table.startswith("At the paper's error") and table.count("| LeNet-300-100 | BC-GNJ |") == 1
    assert table.count("| lenet_300_100 | BC-GNJ |") == 1 + len(reproduce.BUDGETS)
    assert "| groups chosen by | LeNet-300-100 BC-GNJ |" in table
    assert all(f"| {name} |" in table for name in baselines.METHODS.values())
    assert set(r["baselines"]) == {"error_plain", "norm", "plain", "fixed"}

    reproduce.main(["--fast", "--out", str(tmp_path), "--only", "lenet_300_100-nj", "--recompress"])
    again = json.loads((tmp_path / "lenet_300_100-nj.json").read_text())
    assert again.pop("compress_seconds") > 0
    assert again == {k: v for k, v in r.items() if k != "compress_seconds"}

    (tmp_path / "lenet_300_100-nj.pt").unlink()  # a finished run is read back, not recomputed
    assert reproduce.run("lenet_300_100", "nj", tmp_path, fast=True)["tradeoff"] == r["tradeoff"]
    assert not (tmp_path / "lenet_300_100-nj.pt").exists()


def test_recompress_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run it first without --recompress"):
        reproduce.recompress("lenet5_caffe", "hs", tmp_path)


def test_tables_accept_results_without_a_tradeoff():
    r = {"arch": "lenet_300_100", "prior": "hs", "error_compressed": 1.7, "rate_pruning": 5.6,
         "rate_precision": 17.0, "architecture": [[340, 130], [130, 21], [21, 10]], "bits": [[3, 7]]}  # fmt: skip
    assert "340-130-21 / 311-86-14" in reproduce.table([r])
    assert reproduce.tradeoff_table([r]).count("\n") == 2  # header rows only


def test_other_seeds_never_repeat_the_runs_own():
    """A seed-2 run's spread must not count its own headline again."""
    assert reproduce._other_seeds([2, 3, 4], 1) == [2, 3, 4]
    assert reproduce._other_seeds([2, 3, 4], 2) == [3, 4, 5]
    assert reproduce._other_seeds([2, 3], 3) == [2, 4]
    assert reproduce._other_seeds([], 2) == []
