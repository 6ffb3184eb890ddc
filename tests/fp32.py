"""Tolerances for fp32 results that two computations (or two machines) may sum in another order.

fp32 rounds each operation to a relative error of at most EPS (2**-23 ~ 1.2e-7). A sum of n terms computed in
another order (another vector width, matmul kernel, thread count, or chunking) may differ by up to about
n * EPS * the magnitude of its terms. So every comparison here allows

    atol = SLACK * depth * EPS * max|expected|

where `depth` is the number of terms in the longest chain of sums behind each compared value (the caller says
which), and SLACK covers terms larger than the result they cancel into. A real fault (a dropped chunk, a wrong
count, samples that see each other) moves values by a fraction of their size, orders of magnitude above that.

`FP32_TOLERANCE_REPORT=FILE` appends every comparison's observed error, in units of EPS * max|expected| against
the allowed SLACK * depth, so that the margins can be read off any machine.
"""
import json
import os

import torch

EPS = torch.finfo(torch.float32).eps
SLACK = 8


# The tiny test models (examples/tiny_qwen.py): 2 decoder layers, hidden 64, MLP 128.
TINY_LAYERS, TINY_WIDEST = 2, 128


def forward_depth(length, layers=TINY_LAYERS, widest=TINY_WIDEST):
    """Each output of a forward pass passes through a sum over the widest projection and the attention over the
    sequence in every decoder layer, and one more in lm_head."""
    return (layers + 1) * (widest + length)


def backward_depth(tokens, layers=TINY_LAYERS):
    """A weight's gradient sums over every token of the batch, once per decoder layer on the way back and once
    through lm_head."""
    return tokens * (layers + 1)


def fp32_atol(expected, depth):
    """The absolute tolerance for values of `expected`'s magnitude behind `depth` summed terms."""
    magnitude = torch.as_tensor(expected, dtype=torch.float64).abs().max().item()
    return SLACK * depth * EPS * magnitude


def assert_fp32_close(actual, expected, depth, what=""):
    """actual == expected up to fp32 rounding of `depth`-term sums done in another order."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    atol = fp32_atol(expected, depth)
    _report(actual, expected, depth, what)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}" if what else m)


def assert_changed_beyond_rounding(after, before, depth, what=""):
    """Training changed these values by more than fp32 rounding of `depth`-term sums could."""
    change = (torch.as_tensor(after, dtype=torch.float64) - torch.as_tensor(before, dtype=torch.float64)).abs().max()
    assert change > fp32_atol(before, depth), f"{what}: changed by {change.item():.3g} only"


def _report(actual, expected, depth, what):
    path = os.environ.get("FP32_TOLERANCE_REPORT")
    if not path or actual.shape != expected.shape:
        return
    unit = EPS * max(expected.abs().max().item(), 1e-300)
    observed = (actual - expected).abs().max().item() / unit
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    with open(path, "a") as f:
        f.write(json.dumps({"test": test, "what": what, "observed": round(observed, 2),
                            "allowed": float(SLACK * depth)})
                + "\n")
