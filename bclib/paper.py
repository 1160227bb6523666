"""The paper's published numbers (Louizos, Ullrich & Welling 2017, Table 1) to set ours against.

Per ``(architecture, prior)``: test error %, compression after pruning (weights before /
weights kept), after precision reduction (32 x weights before / bits stored) and the pruned
architecture (conv filters, then fc inputs). Sources and how sure each number is:
``../shared/reference/paper.md`` of the project. The LeNet-300-100 row is recalled, not found
in a source; its pruning rate is not published (None).
"""
from __future__ import annotations

from typing import Optional, TypedDict


class Published(TypedDict):
    error: float
    rate_pruning: Optional[float]
    rate_precision: float
    architecture: Optional[str]


PAPER: dict[tuple[str, str], Published] = {
    ("lenet5_caffe", "nj"): {"error": 1.0, "rate_pruning": 108, "rate_precision": 361, "architecture": "8-13-88-13"},
    ("lenet5_caffe", "hs"): {"error": 1.0, "rate_pruning": 156, "rate_precision": 419, "architecture": "5-10-76-16"},
    ("lenet_300_100", "nj"): {"error": 1.8, "rate_pruning": None, "rate_precision": 58, "architecture": "278-98-13"},
    ("lenet_300_100", "hs"): {"error": 1.8, "rate_pruning": None, "rate_precision": 59, "architecture": "311-86-14"},
    ("vgg_cifar10", "nj"): {"error": 8.6, "rate_pruning": 14, "rate_precision": 56, "architecture": None},
    ("vgg_cifar10", "hs"): {"error": 9.0, "rate_pruning": 18, "rate_precision": 59, "architecture": None},
}
PRIOR_NAMES = {"nj": "BC-GNJ", "hs": "BC-GHS"}
