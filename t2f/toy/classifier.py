"""Attribute classifier for toy faces: turns "does this face match its caption" into a number.

    model = load_classifier()                       # the weights shipped in t2f/toy/assets/
    probs = predict_attributes(images)              # images (B, 3, 64, 64) in [-1, 1] -> (B, A)
    feats = features(images)                        # (B, F) penultimate features (toy FID)
    FidFeatureExtractor()                           # clean-fid custom_feat_extractor, [0, 255] in

A small CNN (five 3x3 convolutions, global max pooling, one hidden layer) with one sigmoid per
attribute in ATTRIBUTES order. It trains on renders drawn fresh for every batch, so it never sees
a face twice; half of each batch is blurred so it also judges the softer faces a generator makes.
800 steps take about a minute on one CPU thread: `t2f toy classifier --out DIR` reproduces the
shipped weights bit for bit (seeded) and reports per-attribute accuracy on held-out renders
(classifier.json records both, and the training time).

Three are shipped: the judge (t2f/toy/assets, seed 0), which scores the demo, the second reader
(t2f/toy/assets/reader, `--seed 2`), which scores the same faces and is used by nothing else, and the backbone
(t2f/toy/assets/backbone, `--seed 1`), whose convolutions are the recaptioner's frozen image
encoder, the toy world's ImageNet CNN (recaptioner.encoder=frozen_cnn with encoder_weights
pointing at its .safetensors; classifier.json describes the convolutions for
t2f.models.image_encoders.FrozenCNN). Separate seeds keep the judge out of the training signal.
Pretrained on fresh, partly blurred renders, the backbone reads the tiny generator's soft faces
far better than a small encoder trained on the demo's training renders (README, Results); unlike
ImageNet's, its labels are the very attributes the captions name: an easier encoder than real
runs get.
"""

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from t2f.models.image_encoders import FROZEN_CNN_KEY, frozen_cnn_spec
from t2f.toy.attributes import ATTRIBUTES
from t2f.toy.render import SIZE, sample_batch

ASSETS = Path(__file__).parent / "assets"
WEIGHTS_NAME, INFO_NAME = "classifier.safetensors", "classifier.json"
# A second classifier (another seed): the recaptioner's pretrained encoder, never the judge.
BACKBONE = ASSETS / "backbone" / WEIGHTS_NAME
# A third (seed 2) that only evaluates: the second reader of the demo's faces (t2f/toy/metrics.py).
READER = ASSETS / "reader" / WEIGHTS_NAME
STRIDES = (2, 2, 2, 2, 1)  # 64 -> 32 -> 16 -> 8 -> 4 -> 4


class AttributeClassifier(nn.Module):
    """64x64 RGB in [-1, 1] -> attribute logits; `features` is the layer before the logits."""

    def __init__(self, num_attributes: int = len(ATTRIBUTES), width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.width = width
        chans = [3, width // 2, width, width * 2, width * 3, width * 4]
        layers = []
        for c_in, c_out, stride in zip(chans[:-1], chans[1:], STRIDES):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.hidden = nn.Linear(chans[-1], feature_dim)
        self.head = nn.Linear(feature_dim, num_attributes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = _to_input_size(images)  # (B, 3, 64, 64)
        # Max, not mean, over positions: an attribute is a small local part (a smile, a frame)
        # that may sit anywhere the face moves; max pooling learns those several times faster.
        x = self.convs(x).amax(dim=(2, 3))  # (B, C)
        return F.relu(self.hidden(x))  # (B, F)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, A) logits


def _to_input_size(images: torch.Tensor) -> torch.Tensor:
    """Accept any square size (clean-fid hands over larger images) by resizing to 64x64."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[-2:] != (SIZE, SIZE):
        images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return images


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, 64, 64, 3) uint8 -> (B, 3, 64, 64) float in [-1, 1], the generator's range."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


# ---------------------------------------------------------------------------- loading and use


def load_classifier(path=None, device="cpu") -> AttributeClassifier:
    """Frozen classifier from `path` (a .safetensors with its .json beside it; default: shipped)."""
    weights = Path(path) if path else ASSETS / WEIGHTS_NAME
    info_path = weights.with_suffix(".json")
    if not weights.is_file() or not info_path.is_file():
        raise FileNotFoundError(f"classifier weights {weights} or {info_path} missing; "
                                "rebuild them with `t2f toy classifier --out DIR`")
    info = json.loads(info_path.read_text())
    if tuple(info.get("attributes", ())) != ATTRIBUTES:
        raise ValueError(f"{info_path}: its attribute order {info.get('attributes')} is not the toy "
                         f"world's {list(ATTRIBUTES)}; retrain with `t2f toy classifier`")
    model = AttributeClassifier(**info["architecture"])
    state = {k: (v.float() if v.dtype.is_floating_point else v) for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state)
    return model.requires_grad_(False).eval().to(device)


@functools.lru_cache(maxsize=4)
def _shipped(device: str) -> AttributeClassifier:
    return load_classifier(device=device)


def predict_attributes(images: torch.Tensor, model: AttributeClassifier | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, A) probabilities, attributes in ATTRIBUTES order."""
    model = model or _shipped(str(images.device))
    with torch.no_grad():
        return torch.sigmoid(model(images.float()))


def features(images: torch.Tensor, model: AttributeClassifier | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, F) penultimate features."""
    model = model or _shipped(str(images.device))
    with torch.no_grad():
        return model.features(images.float())


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 3, H, W) images (reflect padding)."""
    radius = max(1, int(np.ceil(2.5 * sigma)))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=images.dtype) / sigma) ** 2)
    taps = (taps / taps.sum()).to(images.device)
    x = F.pad(images, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)  # (B, 3, H, W)


class FidFeatureExtractor(nn.Module):
    """clean-fid's `custom_feat_extractor` for a toy FID: images (B, 3, H, W) in [0, 255] -> (B, F).

    clean-fid calls it as `model(batch.to(device))`, so move it to that device first.
    """

    def __init__(self, model: AttributeClassifier | None = None):
        super().__init__()
        self.model = model or load_classifier()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return features(images.float() / 127.5 - 1.0, self.model)  # (B, F)


def evaluate(model: AttributeClassifier, num_images: int = 2000, seed: int = 12345, batch: int = 250,
             blur_sigma: float = 0.0) -> dict:
    """Per-attribute accuracy of `model` on `num_images` fresh renders from `seed` (optionally blurred)."""
    rng = np.random.default_rng(seed)
    correct, done = np.zeros(len(ATTRIBUTES)), 0
    while done < num_images:
        images, targets = sample_batch(rng, min(batch, num_images - done))
        x = images_to_tensor(images)
        probs = predict_attributes(blur(x, blur_sigma) if blur_sigma > 0 else x, model).numpy()
        correct += ((probs > 0.5) == (targets > 0.5)).sum(axis=0)
        done += len(images)
    per_attribute = {name: float(c / done) for name, c in zip(ATTRIBUTES, correct)}
    return {"mean": float(np.mean(list(per_attribute.values()))), "per_attribute": per_attribute,
            "num_images": done, "seed": seed, "blur_sigma": blur_sigma}


def _degrade(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur half the batch and add faint noise: generated faces are softer than renders, and the
    classifier must judge those too."""
    b = images.shape[0]
    sigma = 0.3 + 0.9 * torch.rand((), generator=gen).item()
    soft = torch.rand(b, 1, 1, 1, generator=gen) < 0.5
    x = torch.where(soft, blur(images, sigma), images)
    noise = torch.randn(x.shape, generator=gen) * 0.04 * torch.rand(b, 1, 1, 1, generator=gen)
    return (x + noise).clamp(-1.0, 1.0)  # (B, 3, 64, 64)


# ---------------------------------------------------------------------------- training


def train_classifier(steps: int = 800, batch_size: int = 48, lr: float = 3e-3, seed: int = 0,
                     progress: bool = True) -> AttributeClassifier:
    """Fit a fresh classifier on `steps` batches of new renders (seeded: same seed, same weights)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    bar = tqdm(range(steps), desc="classifier", disable=not progress)
    for _ in bar:
        images, targets = sample_batch(rng, batch_size)
        logits = model(_degrade(images_to_tensor(images), gen))  # (B, A)
        loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.requires_grad_(False).eval()


def save_classifier(model: AttributeClassifier, out_dir, info: dict) -> Path:
    """Write classifier.safetensors (fp16: small enough to ship) and classifier.json beside it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.dtype.is_floating_point else v).detach().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    arch = {"num_attributes": model.head.out_features, "width": model.width,
            "feature_dim": model.hidden.out_features}
    full = {"attributes": list(ATTRIBUTES), "architecture": arch, FROZEN_CNN_KEY: convolutions_spec(), **info}
    (out / INFO_NAME).write_text(json.dumps(full, indent=2) + "\n")
    return out / WEIGHTS_NAME


def convolutions_spec() -> dict:
    """How FrozenCNN rebuilds `convs` from the weights: the recaptioner's encoder, without this module."""
    return frozen_cnn_spec("convs.", STRIDES, input_mean=(0.5, 0.5, 0.5), input_std=(0.5, 0.5, 0.5),  # reads [-1, 1]
                           heads=("hidden", "head"))


def build_classifier(out_dir, steps: int = 800, batch_size: int = 48, seed: int = 0,
                     eval_images: int = 2000) -> dict:
    """Train, evaluate on held-out renders, save; returns the info written to classifier.json."""
    # One thread: on a shared 2-core machine a second intra-op thread mostly spin-waits, and the
    # training ran several times slower with two threads than with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.time()
        model = train_classifier(steps=steps, batch_size=batch_size, seed=seed)
        train_seconds = time.time() - start
    finally:
        torch.set_num_threads(threads)
    # The reloaded fp16 weights are the ones users get, so they are the ones measured.
    save_classifier(model, out_dir, {})
    shipped = load_classifier(Path(out_dir) / WEIGHTS_NAME)
    accuracy = evaluate(shipped, num_images=eval_images)
    blurred = evaluate(shipped, num_images=eval_images, blur_sigma=1.0)
    info = {"accuracy": accuracy, "accuracy_blur_sigma_1": blurred, "training": {
        "steps": steps, "batch_size": batch_size, "seed": seed, "optimizer": "AdamW one-cycle lr 3e-3",
        "data": "fresh renders every batch (t2f.toy.render.sample_batch); half of each batch "
                "Gaussian-blurred (sigma 0.3-1.2), faint noise",
        "seconds": round(train_seconds, 1), "torch_threads": 1,
        "command": f"t2f toy classifier --out {out_dir} --steps {steps} --batch-size {batch_size} --seed {seed}"}}
    save_classifier(model, out_dir, info)
    return info
