"""FID through clean-fid's 'clean' protocol, on images held in memory, with cached real statistics.

    extractor = InceptionFeatures(device="cuda")             # or any `feature_extractor(name, fn)`
    gen = extract_features(extractor, generated_batches)      # (N, 2048) float64
    fid = fid_from_features(gen, real_features)               # clean-fid's Frechet distance

clean-fid's own entry points read image folders or call a z -> image generator; we generate from
captions on several ranks, so we use its parts instead: images are quantised to 8 bits (as if
saved as PNG), resized by its 'clean' resizer (PIL bicubic on float channels to 299x299) and fed
to its Inception wrapper (the TorchScript port of the TensorFlow Inception that FID is defined
with); the distance is its `frechet_distance`. Any other feature extractor (the toy world's
attribute classifier, a test's tiny network) plugs in through `feature_extractor(name, fn)`; its
name is part of the statistics cache key.

Real statistics (mean and covariance of the real images' features) cost a full pass over the
split, so `RealStatsCache` keeps them as .npz files keyed by a hash of everything they depend on.
KID (t2f/eval/kid.py) uses the same features: a meter with `keep_features` also keeps every row
with its image id (and caches the real ones).
"""

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from t2f.visual import to_uint8

CLEAN_MODE = "clean"
INCEPTION_FILE = "inception-2015-12-05.pt"
# clean-fid hard-codes this folder for its download (cleanfid/features.py, non-Windows)
CLEANFID_CACHE = Path("/tmp")


class InceptionWeightsMissing(FileNotFoundError):
    """The Inception TorchScript file is not on disk; the message says where to put it."""


# ---------------------------------------------------------------------------- feature extractors


class NamedExtractor:
    """A feature function with a stable name: images (B, 3, H, W) in [-1, 1] -> (B, F)."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)


def feature_extractor(name: str, fn) -> NamedExtractor:
    """Wrap `fn(images in [-1, 1]) -> (B, F)` so FID can use it and cache statistics under `name`."""
    return NamedExtractor(name, fn)


def inception_candidates(path: str = "") -> list[Path]:
    """Files tried for the Inception weights, in order: the configured path, $T2F_CACHE, clean-fid's cache."""
    if path:
        return [Path(os.path.expanduser(path))]
    tried = []
    if os.environ.get("T2F_CACHE"):
        tried.append(Path(os.environ["T2F_CACHE"]) / INCEPTION_FILE)
    return tried + [CLEANFID_CACHE / INCEPTION_FILE]


def find_inception(path: str = "") -> Path:
    from cleanfid.downloads_helper import inception_url

    tried = inception_candidates(path)
    for candidate in tried:
        if candidate.is_file():
            return candidate
    listing = "\n  ".join(str(p) for p in tried)
    raise InceptionWeightsMissing(
        f"FID needs the Inception weights {INCEPTION_FILE}; not found at:\n  {listing}\n"
        f"On a machine with internet: `wget {inception_url}` (clean-fid's file, 95 MB), copy it to one "
        f"of those paths (e.g. $T2F_CACHE/{INCEPTION_FILE}) or set eval.inception=/path/to/{INCEPTION_FILE}."
    )


class InceptionFeatures(NamedExtractor):
    """clean-fid's 'clean' Inception-v3 pool features (2048-d), without any download."""

    def __init__(self, path: str = "", device="cpu", batch_size: int = 64):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        weights = find_inception(path)
        if weights.name != INCEPTION_FILE:
            raise InceptionWeightsMissing(f"{weights}: clean-fid loads the Inception weights only under the "
                                          f"name {INCEPTION_FILE}; rename the file (same folder) and retry")
        with warnings.catch_warnings():  # torch.jit.load's deprecation: clean-fid's file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            self.model = InceptionV3W(str(weights.parent), download=False).eval().to(device)
        self.resize = build_resizer(CLEAN_MODE)
        self.device, self.batch_size = torch.device(device), batch_size
        super().__init__("clean-fid:inception-v3", self._features)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = to_uint8(images)  # (B, H, W, 3) uint8: clean-fid's input, as read from a PNG
        resized = np.stack([self.resize(p) for p in pixels])  # (B, 299, 299, 3) float32 in [0, 255]
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)  # (B, 3, 299, 299)
        return torch.cat([self.model(chunk) for chunk in x.split(self.batch_size)]).cpu()  # (B, 2048)


# ---------------------------------------------------------------------------- features and distance


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to the 256 levels of an 8-bit PNG, so generated and real images match."""
    pixels = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    return pixels.float().div(127.5).sub(1.0).to(images.device)


@torch.no_grad()
def extract_features(extractor, images: torch.Tensor) -> np.ndarray:
    """Features of one batch of [-1, 1] images as float64 numpy (B, F), after 8-bit quantisation."""
    feats = extractor(quantize(images))  # (B, F)
    return torch.as_tensor(feats).detach().double().cpu().numpy()


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (F,), covariance (F, F)) as clean-fid computes them (unbiased covariance)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature vectors, got an array of shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    from cleanfid.fid import frechet_distance

    return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def fid_from_features(generated: np.ndarray, real: np.ndarray) -> float:
    return fid_from_stats(*statistics(generated), *statistics(real))


# ---------------------------------------------------------------------------- real statistics cache


def default_cache_dir() -> Path:
    """$T2F_CACHE/fid_stats, else $XDG_CACHE_HOME/t2f/fid_stats, else ~/.cache/t2f/fid_stats."""
    if os.environ.get("T2F_CACHE"):
        return Path(os.environ["T2F_CACHE"]) / "fid_stats"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "t2f" / "fid_stats"


def stats_key(parts: dict) -> str:
    """Stable 16-hex-digit hash of the JSON of `parts` (sorted keys)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RealStatsCache:
    """Real-image (mu, sigma) on disk: `<cache_dir>/<name>-<hash of parts>.npz`, parts stored inside."""

    def __init__(self, cache_dir=None):
        self.dir = Path(cache_dir) if cache_dir else default_cache_dir()

    def path(self, parts: dict) -> Path:
        name = str(parts.get("extractor", "features")).replace(":", "-").replace("/", "-")
        return self.dir / f"{name}-{stats_key(parts)}.npz"

    def load(self, parts: dict):
        """(mu, sigma) when cached for exactly these parts, else None."""
        data = self._read(parts)
        return None if data is None else (data["mu"], data["sigma"])

    def save(self, parts: dict, mu: np.ndarray, sigma: np.ndarray) -> Path:
        return self._write(parts, mu=mu, sigma=sigma)

    def load_features(self, parts: dict):
        """(ids, features) of the real images (KID needs them, not only their moments), or None."""
        data = self._read({**parts, "store": "features"})
        return None if data is None else (data["ids"].tolist(), data["features"])

    def save_features(self, parts: dict, ids: list, features: np.ndarray) -> Path:
        return self._write({**parts, "store": "features"}, ids=np.array(ids, dtype=str), features=features)

    def _read(self, parts: dict):
        path = self.path(parts)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["parts"])) != json.loads(json.dumps(parts, default=str)):
                return None  # a hash collision or a hand-edited file: recompute
            return {k: data[k] for k in data.files if k != "parts"}

    def _write(self, parts: dict, **arrays) -> Path:
        path = self.path(parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays, parts=np.array(json.dumps(parts, sort_keys=True, default=str)))
        os.replace(tmp, path)  # readers never see half a file
        return path


# ---------------------------------------------------------------------------- accumulating over batches and ranks


class FeatureMoments:
    """Count, sum and sum of outer products of feature vectors (float64): mergeable across ranks."""

    def __init__(self):
        self.n, self.total, self.outer = 0, None, None

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)  # (B, F)
        if f.shape[0] == 0:
            return
        if self.total is None:
            self.total, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.n += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f  # (F, F)

    def merge(self, other: "FeatureMoments") -> None:
        if other.n == 0:
            return
        if self.total is None:
            self.total, self.outer = np.zeros_like(other.total), np.zeros_like(other.outer)
        self.n += other.n
        self.total += other.total
        self.outer += other.outer

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, unbiased covariance), the same quantities as np.mean / np.cov(rowvar=False)."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (sigma + sigma.T) / 2  # exact symmetry for sqrtm


class FeatureBank:
    """Feature rows with the id of their image, mergeable across ranks; `stacked()` sorts by id, so the
    same images come out in the same order on any number of ranks (KID draws its subsets from it)."""

    def __init__(self):
        self.ids, self.rows = [], []

    def add(self, ids, features: np.ndarray) -> None:
        if ids is None or len(ids) != len(features):
            raise ValueError("KID needs the id of every image whose features it keeps")
        self.ids += [str(i) for i in ids]
        self.rows.append(np.asarray(features, dtype=np.float32))  # (B, F): Inception's own precision

    def merge(self, other: "FeatureBank") -> None:
        self.ids += other.ids
        self.rows += other.rows

    def stacked(self) -> tuple[list, np.ndarray]:
        order = sorted(range(len(self.ids)), key=self.ids.__getitem__)
        features = np.concatenate(self.rows) if self.rows else np.zeros((0, 0), np.float32)
        return [self.ids[i] for i in order], features[order]


class FidMeter:
    """FID (and KID) of generated vs real images seen batch by batch, real statistics from/to a cache.

        meter = FidMeter(extractor, parts, cache)   # parts: what the real statistics depend on
        meter.add_generated(images, ids); meter.add_real(images, ids)   # add_real is a no-op when cached
        fid = meter.compute()                        # saves the real statistics when it made them
        kid, kid_std = meter.kid(seed)               # with keep_features=True: every feature row is kept

    `parts` must say everything that changes the real set (shards, split, resolution, subset,
    protocol); the extractor's name is added to it. FID needs only the moments of the features;
    KID needs the features themselves, so with `keep_features` the real ones are cached too.
    """

    def __init__(self, extractor, parts: dict, cache: RealStatsCache | None = None, use_cache: bool = True,
                 keep_features: bool = False):
        self.extractor, self.cache, self.keep_features = extractor, cache, keep_features
        self.parts = {**parts, "extractor": extractor.name, "fid_mode": CLEAN_MODE}
        use = cache is not None and use_cache
        self.real_stats = cache.load(self.parts) if use else None
        self.real_features = cache.load_features(self.parts) if use and keep_features else None
        # Whether add_real collects features; on other ranks evaluate() sets it from rank 0's cache.
        self.collect_real = self.needs_real
        self.real_from_cache = not self.needs_real
        self.generated, self.real = FeatureMoments(), FeatureMoments()
        self.generated_bank, self.real_bank = FeatureBank(), FeatureBank()

    @property
    def needs_real(self) -> bool:
        return self.real_stats is None or (self.keep_features and self.real_features is None)

    def add_generated(self, images: torch.Tensor, ids=None) -> None:
        features = extract_features(self.extractor, images)
        self.generated.add(features)
        if self.keep_features:
            self.generated_bank.add(ids, features)

    def add_real(self, images: torch.Tensor, ids=None) -> None:
        if self.collect_real:
            features = extract_features(self.extractor, images)
            self.real.add(features)
            if self.keep_features:
                self.real_bank.add(ids, features)

    def compute(self) -> float:
        if self.real_stats is None:
            self.real_stats = self.real.statistics()
            if self.cache is not None:
                self.cache.save(self.parts, *self.real_stats)
        return fid_from_stats(*self.generated.statistics(), *self.real_stats)

    def kid(self, seed: int = 0, **subsets) -> tuple[float, float]:
        """(KID, its standard deviation over the subsets) of the kept features (t2f/eval/kid.py; `subsets`:
        num_subsets, subset_size)."""
        from t2f.eval.kid import kid_from_features

        if not self.keep_features:
            raise ValueError("KID needs FidMeter(..., keep_features=True)")
        if self.real_features is None:
            self.real_features = self.real_bank.stacked()
            if self.cache is not None:
                self.cache.save_features(self.parts, *self.real_features)
                if self.real_stats is None:  # KID alone: cache FID's statistics too, or the next run reads the images again
                    self.real_stats = self.real.statistics()
                    self.cache.save(self.parts, *self.real_stats)
        return kid_from_features(self.generated_bank.stacked()[1], self.real_features[1], seed=seed, **subsets)

    def moments(self) -> tuple:
        """What another rank needs to `merge` this one (plain numpy; picklable without the extractor)."""
        return self.generated, self.real, self.generated_bank, self.real_bank

    def use_moments(self, per_rank: list) -> None:
        """Replace this meter's moments by the sum of every rank's `moments()` (its own included)."""
        self.generated, self.real = FeatureMoments(), FeatureMoments()
        self.generated_bank, self.real_bank = FeatureBank(), FeatureBank()
        for generated, real, generated_bank, real_bank in per_rank:
            self.generated.merge(generated)
            self.real.merge(real)
            self.generated_bank.merge(generated_bank)
            self.real_bank.merge(real_bank)
