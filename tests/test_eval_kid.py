"""KID (t2f/eval/kid.py, FidMeter(keep_features=True)): clean-fid's number for the same draws, near 0
for one distribution and growing with a shift, a spread over its subsets, real features cached,
and the same value whatever order (rank split) the features arrived in."""

import numpy as np
import pytest
import torch

from t2f.eval.fid import FidMeter, RealStatsCache, feature_extractor
from t2f.eval.kid import kid_from_features, subset_kids


def _features(seed: int, n: int = 300, width: int = 16, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, width)) + shift


def test_kid_is_clean_fids_kernel_distance_for_the_same_draws():
    from cleanfid.fid import kernel_distance

    generated, real = _features(1, shift=0.3), _features(2, n=250)
    np.random.seed(7)  # clean-fid draws from numpy's global generator; ours from RandomState(seed)
    expected = kernel_distance(real, generated, num_subsets=20, max_subset_size=100)
    kid, std = kid_from_features(generated, real, num_subsets=20, subset_size=100, seed=7)
    assert kid == pytest.approx(expected, rel=1e-9)
    assert std > 0 and std == pytest.approx(subset_kids(generated, real, 20, 100, seed=7).std(ddof=1))


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    real, subsets = _features(0), dict(num_subsets=50, subset_size=100)
    same, same_std = kid_from_features(_features(1), real, **subsets)
    near, _ = kid_from_features(_features(1, shift=0.2), real, **subsets)
    far, _ = kid_from_features(_features(1, shift=0.6), real, **subsets)
    assert abs(same) < same_std < near < far  # unbiased: "same" scatters around 0 within the spread
    # subsets as large as both sets are the sets themselves: no spread left (README: not an error bar then)
    assert kid_from_features(_features(1, n=50), real[:50], num_subsets=5)[1] == pytest.approx(0, abs=1e-15)
    with pytest.raises(ValueError, match="at least 2 images"):
        kid_from_features(_features(1, n=1), real)


def _extractor():
    def fn(images):
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)  # (B, 6)

    return feature_extractor("test-kid-6d", fn)


def _images(seed: int, n: int = 40, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=g) * 1.6 - 0.8 + shift).clamp(-1, 1)


def test_meter_keeps_features_by_id_so_the_rank_split_does_not_change_kid(tmp_path):
    real, fake = _images(0), _images(1, shift=0.2)
    ids_real, ids_fake = [f"{i:03d}" for i in range(40)], [f"{i:03d}#0000" for i in range(40)]
    one = FidMeter(_extractor(), {"split": "test"}, RealStatsCache(tmp_path / "a"), keep_features=True)
    one.add_real(real, ids_real)
    one.add_generated(fake, ids_fake)

    # two "ranks", each with every other image, merged in the wrong order
    ranks = [FidMeter(_extractor(), {"split": "test"}, None, keep_features=True) for _ in range(2)]
    for r, meter in enumerate(ranks):
        meter.add_real(real[r::2], ids_real[r::2])
        meter.add_generated(fake[r::2], ids_fake[r::2])
    merged = FidMeter(_extractor(), {"split": "test"}, RealStatsCache(tmp_path / "b"), keep_features=True)
    merged.use_moments([ranks[1].moments(), ranks[0].moments()])
    # subsets of 10 of the 40 images: which ones a seed draws depends on the order of the rows
    assert merged.kid(seed=0, subset_size=10) == pytest.approx(one.kid(seed=0, subset_size=10), rel=1e-6)
    assert merged.compute() == pytest.approx(one.compute(), rel=1e-6)


def test_real_features_are_cached_for_kid_and_reused(tmp_path):
    cache, parts = RealStatsCache(tmp_path), {"split": "test", "resolution": 8}
    first = FidMeter(_extractor(), parts, cache, keep_features=True)
    first.add_real(_images(0), [f"{i:03d}" for i in range(40)])
    first.add_generated(_images(1), [f"{i:03d}#0000" for i in range(40)])
    kid = first.kid(seed=0)
    assert len(list(tmp_path.glob("*.npz"))) == 2  # KID's features and FID's moments, even when only KID was asked
    fid = first.compute()

    second = FidMeter(_extractor(), parts, cache, keep_features=True)
    assert not second.needs_real and second.real_from_cache
    second.add_real(_images(5), [f"{i:03d}" for i in range(40)])  # ignored: cached
    second.add_generated(_images(1), [f"{i:03d}#0000" for i in range(40)])
    assert second.kid(seed=0) == pytest.approx(kid, rel=1e-9) and second.compute() == pytest.approx(fid, rel=1e-9)

    # FID statistics alone in the cache are not enough for KID: the real images are read again
    fid_only = RealStatsCache(tmp_path / "fid-only")
    meter = FidMeter(_extractor(), parts, fid_only)
    meter.add_real(_images(0))
    meter.add_generated(_images(1))
    meter.compute()
    assert FidMeter(_extractor(), parts, fid_only, keep_features=True).needs_real
