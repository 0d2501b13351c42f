"""BG/NBD (Fader, Hardie & Lee 2005) and Gamma-Gamma (Fader & Hardie 2013), fitted by maximum
likelihood with scipy.optimize: the customer-value models of value.py.

A customer's summary is (x, t_x, T): x repeat purchases (purchase days after the first), t_x the
time from the first purchase to the last, T from the first purchase to the end of the
calibration period, in one time unit (value.py uses days). BG/NBD gives, per customer, the
probability of being alive and the expected purchases in the next t; Gamma-Gamma, from the mean
spend per purchase of customers with x > 0, the expected mean spend of a future purchase.

Parameters are fitted on their logarithms (all are positive), L-BFGS-B from a few starts; the
log-likelihoods are the papers' closed forms, written here from the formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special


@dataclass(frozen=True)
class BgNbd:
    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float = 0.0

    def p_alive(self, x, t_x, T) -> np.ndarray:
        x, t_x, T = (np.asarray(v, dtype=float) for v in (x, t_x, T))
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        with np.errstate(divide="ignore", over="ignore"):
            ratio = np.where(
                x > 0,
                np.exp(
                    np.log(a)
                    - np.log(np.maximum(b + x - 1, 1e-300))
                    + (r + x) * (np.log(alpha + T) - np.log(alpha + t_x))
                ),
                0.0,
            )
        return 1.0 / (1.0 + ratio)

    def expected_purchases(self, t, x, t_x, T) -> np.ndarray:
        """E[Y(t) | x, t_x, T]: expected purchases in the next t time units."""
        x, t_x, T = (np.asarray(v, dtype=float) for v in (x, t_x, T))
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        z = t / (alpha + T + t)
        hyp = special.hyp2f1(r + x, b + x, a + b + x - 1, z)
        head = (a + b + x - 1) / (a - 1)
        body = 1 - np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + T + t))) * hyp
        return head * body * self.p_alive(x, t_x, T)


def bgnbd_log_likelihood(params, x, t_x, T) -> np.ndarray:
    """Each customer's log-likelihood (FHL 2005, eq. 6 in logs)."""
    r, alpha, a, b = params
    g = special.gammaln
    a1 = g(r + x) - g(r) + r * np.log(alpha)
    a2 = g(a + b) + g(b + x) - g(b) - g(a + b + x)
    a3 = -(r + x) * np.log(alpha + T)
    with np.errstate(divide="ignore", invalid="ignore"):
        a4 = np.where(
            x > 0, np.log(a) - np.log(np.where(x > 0, b + x - 1, 1.0)) - (r + x) * np.log(alpha + t_x), -np.inf
        )
    return a1 + a2 + np.logaddexp(a3, a4)


def _distinct(*columns) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    rows, counts = np.unique(np.column_stack(columns), axis=0, return_counts=True)
    return tuple(rows.T), counts.astype(float)


def _fit(negll, starts) -> tuple[np.ndarray, float]:
    best = None
    for start in starts:
        res = optimize.minimize(negll, np.log(start), method="L-BFGS-B", bounds=[(-12, 12)] * len(start))
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise ValueError("the model did not converge")
    return np.exp(best.x), -float(best.fun)


def fit_bgnbd(x, t_x, T) -> BgNbd:
    x, t_x, T = (np.asarray(v, dtype=float) for v in (x, t_x, T))
    if len(x) < 3 or not (x > 0).any():
        raise ValueError("too few customers with repeat purchases to fit")
    scale = float(np.mean(T)) or 1.0  # α is in time units: start it near the data's scale
    # Customers with the same (x, t_x, T) (whole days) have the same likelihood: each distinct
    # summary once, weighted by how many customers have it.
    (x, t_x, T), weight = _distinct(x, t_x, T)

    def negll(logp):
        s = (weight * bgnbd_log_likelihood(np.exp(logp), x, t_x, T)).sum()
        return -s if np.isfinite(s) else 1e300

    params, ll = _fit(negll, [(1.0, scale / 10, 1.0, 1.0), (0.5, scale, 0.5, 2.0), (2.0, scale / 50, 2.0, 5.0)])
    return BgNbd(*map(float, params), log_likelihood=ll)


@dataclass(frozen=True)
class GammaGamma:
    p: float
    q: float
    gamma: float
    log_likelihood: float = 0.0

    def expected_spend(self, x, m) -> np.ndarray:
        """E[M | x, mean spend m]: a customer's expected mean spend per purchase (for x = 0 the
        population mean p·γ/(q-1))."""
        x, m = np.asarray(x, dtype=float), np.asarray(m, dtype=float)
        p, q, g = self.p, self.q, self.gamma
        return np.where(x > 0, p * (g + x * m) / (p * x + q - 1), p * g / (q - 1))


def gg_log_likelihood(params, x, m) -> np.ndarray:
    p, q, g = params
    px = p * x
    return (
        special.gammaln(px + q) - special.gammaln(px) - special.gammaln(q)
        + q * np.log(g) + (px - 1) * np.log(m) + px * np.log(x) - (px + q) * np.log(g + x * m)
    )  # fmt: skip


def fit_gamma_gamma(x, m) -> GammaGamma:
    """Fit on customers with x > 0 and m > 0 (the others are ignored)."""
    x, m = np.asarray(x, dtype=float), np.asarray(m, dtype=float)
    keep = (x > 0) & (m > 0)
    x, m = x[keep], m[keep]
    if len(x) < 3:
        raise ValueError("too few repeat customers to fit the spend model")
    mean = float(m.mean())
    (x, m), weight = _distinct(x, m)

    def negll(logp):
        s = (weight * gg_log_likelihood(np.exp(logp), x, m)).sum()
        return -s if np.isfinite(s) else 1e300

    params, ll = _fit(negll, [(1.0, 2.0, mean), (5.0, 3.0, mean * 2), (2.0, 5.0, mean / 2)])
    return GammaGamma(*map(float, params), log_likelihood=ll)
