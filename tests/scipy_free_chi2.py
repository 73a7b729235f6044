"""Pearson's chi-square goodness-of-fit p-value without SciPy (regularised upper
incomplete gamma by series / continued fraction, as in Numerical Recipes)."""

from __future__ import annotations

import math

import torch


def _upper_regularized_gamma(a: float, x: float) -> float:
    if x < a + 1:
        term = total = 1.0 / a
        for n in range(1, 1000):
            term *= x / (a + n)
            total += term
            if term < total * 1e-14:
                break
        return 1.0 - total * math.exp(-x + a * math.log(x) - math.lgamma(a))
    b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = 1 / (an * d + b)
        c = b + an / c
        h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return _upper_regularized_gamma((len(observed) - 1) / 2, statistic / 2)
