"""An independent float64 numpy restatement of the RepQ-ViT quantizer search (SPEC §2), for tests
to compare the library against. It shares no code with quant/: quantiles come from a partition of
the values and torch.quantile's interpolation rule (or numpy's, above 2^24 values), the errors are
float64 means. Where two candidates score within ``TIE`` of each other, or a zero point sits within
``TIE`` of a rounding boundary, float32 and float64 may choose differently: the result says so."""
import math
from dataclasses import dataclass

import numpy as np

PERCENTILES = (0.999, 0.9999, 0.99999)
TIE = 1e-5


def rank(p, n, rule='torch'):
    """(index below, index above, weight) of the p-quantile of n sorted values. 'torch': p rounded to
    float32 first (torch.quantile); 'numpy': p in float64 (numpy.percentile)."""
    pp = float(np.float32(p)) if rule == 'torch' else p
    r = pp * (n - 1)
    return math.floor(r), math.ceil(r), r - math.floor(r)


def quantiles_by_rule(values, ps, rules=('torch', 'numpy')):
    """{rule: linearly interpolated quantiles of all of ``values``}, float64, from one partition."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    ranks = {rule: [rank(p, flat.size, rule) for p in ps] for rule in rules}
    part = np.partition(flat, sorted({i for rs in ranks.values() for r in rs for i in r[:2]}))
    return {rule: [part[a] + w * (part[b] - part[a]) for a, b, w in rs] for rule, rs in ranks.items()}


def quantiles(values, ps, rule='torch'):
    return quantiles_by_rule(values, ps, (rule,))[rule]


@dataclass
class Choice:
    """The winning candidate: its index in PERCENTILES, its parameters, and whether float rounding
    could have chosen otherwise (``ambiguous``)."""
    index: int
    delta: float
    zero_point: float = 0.0
    ambiguous: bool = False


def _pick(scores):
    """(index of the smallest score, the earliest on an exact tie; whether another is within TIE)."""
    best = scores.index(min(scores))
    close = any(i != best and abs(s - scores[best]) <= TIE * abs(scores[best]) for i, s in enumerate(scores))
    return best, close


def uniform_search(values, n_bits, rule='torch'):
    """SPEC §2 uniform search over all of ``values``."""
    x = np.asarray(values, dtype=np.float64).ravel()
    bounds = quantiles(x, [q for p in PERCENTILES for q in (p, 1.0 - p)], rule)
    levels = 2 ** n_bits - 1
    scores, params, near_half = [], [], []
    for hi, lo in zip(bounds[0::2], bounds[1::2]):
        delta = (hi - lo) / levels
        ratio = -lo / delta
        zp = np.round(ratio)
        x_hat = (np.clip(np.round(x / delta) + zp, 0, levels) - zp) * delta
        scores.append(float(np.mean((x - x_hat) ** 2)) if delta > 0 else math.inf)
        params.append((delta, float(zp)))
        near_half.append(abs(abs(ratio - np.floor(ratio)) - 0.5) < TIE)
    best, close = _pick(scores)
    return Choice(best, params[best][0], params[best][1], close or near_half[best])


def log_sqrt2_dequant(values, delta, n_bits):
    x = np.asarray(values, dtype=np.float64)
    q = np.round(-2 * np.log2(np.maximum(x / delta, 1e-6)))
    masked = q >= 2 ** n_bits
    q = np.clip(q, 0, 2 ** n_bits - 1)
    out = 2.0 ** -np.ceil(q / 2) * (1 + (q % 2) * (math.sqrt(2) - 1)) * delta
    out[masked] = 0
    return out


def log_sqrt2_search(values, n_bits):
    """SPEC §2 log-√2 delta search: the quantile with the smallest error."""
    x = np.asarray(values, dtype=np.float64).ravel()
    deltas = quantiles(x, PERCENTILES)
    scores = [float(np.mean((x - log_sqrt2_dequant(x, d, n_bits)) ** 2)) if d > 0 else math.inf for d in deltas]
    best, close = _pick(scores)
    return Choice(best, deltas[best], ambiguous=close)
