"""KID (kernel inception distance) as clean-fid computes it, with the spread over its subsets.

    kid, kid_std = kid_from_features(generated, real, seed=0)   # (N, F) and (M, F) float arrays

Bińkowski et al.'s unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / F + 1)³, on
the same Inception features as FID, averaged over `num_subsets` random subsets of
min(N, M, `subset_size`) images of each set: clean-fid's `kernel_distance`, term for term and
draw for draw (`np.random.RandomState(seed)` drawing what clean-fid draws from the global
generator), so `np.random.seed(seed); cleanfid.fid.kernel_distance(real, generated)` gives the
same number. clean-fid returns the mean only; the standard deviation over the subsets is the ±
the KID literature reports (Bińkowski et al.; torch-fidelity's `kid_std`): the standard error of
a KID measured on subset-size samples. When a set holds no more images than a subset, every
subset holds all of it and the spread only reflects the other set's sampling (0 when both do).

The features must come in a fixed order (evaluate() sorts them by image id) so that the same
seed draws the same images on any number of ranks.
"""

import numpy as np

NUM_SUBSETS = 100  # clean-fid's defaults (cleanfid.fid.kernel_distance)
SUBSET_SIZE = 1000
KID_PROTOCOL = (f"clean-fid KID: unbiased MMD² with the cubic polynomial kernel on the FID features, mean over "
                f"{NUM_SUBSETS} random subsets of min(N, {SUBSET_SIZE}) images per set (seed eval.seed); kid_std = "
                "standard deviation over the subsets (the standard error of a KID on subset-size samples); "
                "generated vs real")


def subset_kids(generated: np.ndarray, real: np.ndarray, num_subsets: int = NUM_SUBSETS,
                subset_size: int = SUBSET_SIZE, seed: int = 0) -> np.ndarray:
    """(num_subsets,) MMD² estimates, each on `m` random images of both sets (clean-fid's draws)."""
    generated, real = np.asarray(generated, dtype=np.float64), np.asarray(real, dtype=np.float64)
    if generated.ndim != 2 or real.ndim != 2 or generated.shape[1] != real.shape[1]:
        raise ValueError(f"KID needs two (N, F) feature arrays of one width, got {generated.shape} and {real.shape}")
    width, m = generated.shape[1], min(generated.shape[0], real.shape[0], subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {generated.shape[0]} and {real.shape[0]}")
    rng = np.random.RandomState(seed % 2**32)
    out = np.empty(num_subsets)
    for i in range(num_subsets):
        # clean-fid's kernel_distance(feats1=real, feats2=generated) draws x from feats2 first
        x = generated[rng.choice(generated.shape[0], m, replace=False)]  # (m, F)
        y = real[rng.choice(real.shape[0], m, replace=False)]  # (m, F)
        within = _kernel(x, x, width) + _kernel(y, y, width)  # (m, m)
        across = _kernel(x, y, width)  # (m, m)
        out[i] = ((within.sum() - np.diag(within).sum()) / (m - 1) - across.sum() * 2 / m) / m
    return out


def _kernel(a: np.ndarray, b: np.ndarray, width: int) -> np.ndarray:
    k = a @ b.T / width + 1  # (m, m)
    return k * k * k  # (.)**3 without numpy's slow general power


def kid_from_features(generated, real, num_subsets: int = NUM_SUBSETS, subset_size: int = SUBSET_SIZE,
                      seed: int = 0) -> tuple[float, float]:
    """(KID, its standard deviation over the subsets)."""
    values = subset_kids(generated, real, num_subsets, subset_size, seed)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
