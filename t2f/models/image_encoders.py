"""The recaptioner's image encoders: an image batch in, a grid of feature vectors out.

    encoder = build_image_encoder(cfg.recaptioner)     # .out_dim, .input_mean, .input_std
    fmap = encoder(normalised_images)                  # (B, D, grid, grid)

- `resnet101`: ImageNet ResNet-101 from a local file or the torch hub cache (never downloaded
  here), cut before its pooling and classifier (D = 2048). Frozen (optionally its top block
  trains); its batch-norm statistics always stay frozen, because the small batches of this
  method would make batch statistics noisy. `encoder_weights=random` builds the same shapes with
  random weights (always the same ones: seeded) and needs no file: for benchmarks and smoke
  runs, never for a real run.
- `small`: a few randomly initialised convolutions with batch norm; it always trains (tests, and
  a recaptioner without any pretrained encoder).
- `frozen_cnn`: any plain stack of conv -> batch norm -> ReLU blocks pretrained elsewhere, loaded
  from a .safetensors file and the description beside it (`<file>.json`, key "frozen_cnn",
  written by `frozen_cnn_spec`), frozen with its batch-norm statistics. The toy world ships one
  (t2f/toy/assets/backbone): its stand-in for the ImageNet CNN.

Frozen weights are reloaded from their source, never saved: the pretrained encoders hold their
`body` outside the module tree (`PretrainedBody`), so state dicts, checkpoints, DDP and DeepSpeed
never see the ~170 MB of a frozen ResNet-101. Only blocks that train are registered.
"""

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's file names for ResNet-101 IMAGENET1K_V1 and IMAGENET1K_V2, as they land in the hub cache
RESNET101_FILES = ("resnet101-63fe2227.pth", "resnet101-cd907fc2.pth")
RESNET_FEATURE_DIM = 2048
RESNET_TOP_BLOCK = 7  # index of layer4 in the ResNet body: what recaptioner.finetune_encoder trains
RANDOM_WEIGHTS = "random"  # recaptioner.encoder_weights value: real shapes, random init, no file
FROZEN_CNN_KEY = "frozen_cnn"  # the key of the description in the .json beside a frozen CNN's weights
ENCODERS = ("resnet101", "small", "frozen_cnn")


# ---------------------------------------------------------------------------- frozen outside the module tree


class PretrainedBody(nn.Module):
    """Base of the pretrained encoders: their `body` (an nn.Sequential) is held as a plain attribute.

    Like TextToFace's frozen synthesis: DDP, DeepSpeed, `accelerator.save_state` and
    `state_dict()` never see it, so no checkpoint carries frozen weights; `_apply` passes
    .to() / .half() on to it, and `train()` keeps it in eval mode (frozen batch-norm statistics).
    Blocks that train are registered as `trainable.<index in body>` and are saved like any layer.
    """

    def hold(self, body: nn.Sequential, trainable=()) -> None:
        self._body = [body.requires_grad_(False).eval()]
        self.trainable = nn.ModuleDict({str(i): body[i].requires_grad_(True) for i in trainable})

    @property
    def body(self) -> nn.Sequential:
        return self._body[0]

    def _frozen_blocks(self):
        return [block for i, block in enumerate(self.body) if str(i) not in self.trainable]

    def _apply(self, fn, recurse=True):
        for block in self._frozen_blocks():  # trainable blocks are reached as submodules
            block._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self.body.eval()  # batch norm keeps its pretraining statistics, also in blocks that train
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the body moved out of the tree carry `body.<i>.*`: the frozen
        # blocks are dropped (they are reloaded from their source), a trainable block is renamed.
        for key in [k for k in state_dict if k.startswith(prefix + "body.")]:
            index, _, rest = key[len(prefix + "body."):].partition(".")
            value = state_dict.pop(key)
            if index in self.trainable:
                state_dict[f"{prefix}trainable.{index}.{rest}"] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x))  # (B, D, grid, grid)


# ---------------------------------------------------------------------------- ResNet-101


def resnet101_weight_candidates(encoder_weights: str = "") -> list[Path]:
    """The files tried, in order: `encoder_weights` when given, else the torch hub cache."""
    if encoder_weights:
        return [Path(os.path.expanduser(encoder_weights))]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return [cache / name for name in RESNET101_FILES]


def load_resnet101_state(encoder_weights: str = "") -> dict:
    """Read ImageNet ResNet-101 weights (a torch.save'd state_dict) without touching the network."""
    tried = resnet101_weight_candidates(encoder_weights)
    for path in tried:
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            return state.get("state_dict", state) if isinstance(state, dict) else state
    listing = "\n  ".join(str(p) for p in tried)
    raise FileNotFoundError(
        f"ResNet-101 ImageNet weights not found; tried:\n  {listing}\n"
        "Get them on a machine with internet:\n"
        "  python -c \"import torchvision; torchvision.models.resnet101(weights='IMAGENET1K_V1')\"\n"
        f"then copy {Path(torch.hub.get_dir()) / 'checkpoints' / RESNET101_FILES[0]} from that machine's "
        "torch hub cache into this one's (or set recaptioner.encoder_weights=<file>). "
        "For a run without pretrained weights use recaptioner.encoder=small "
        f"(or recaptioner.encoder_weights={RANDOM_WEIGHTS} to time the real shapes)."
    )


class ResNetEncoder(PretrainedBody):
    """ResNet-101 without its pooling and classifier, pooled to a grid×grid feature map."""

    input_mean, input_std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, grid: int, encoder_weights: str = "", finetune: bool = False):
        super().__init__()
        net = _resnet101(encoder_weights)
        self.hold(nn.Sequential(*list(net.children())[:-2]), trainable=[RESNET_TOP_BLOCK] if finetune else [])
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out_dim = RESNET_FEATURE_DIM
        self.finetune = finetune
        self.train(False)


def _resnet101(encoder_weights: str) -> nn.Module:
    import torchvision

    if encoder_weights == RANDOM_WEIGHTS:
        # Seeded: the weights are never saved, so a resumed run and `t2f generate` must rebuild the same ones.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return torchvision.models.resnet101(weights=None)
    net = torchvision.models.resnet101(weights=None)
    state = load_resnet101_state(encoder_weights)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        where = resnet101_weight_candidates(encoder_weights)
        raise ValueError(f"weights in {where} are not a torchvision ResNet-101 state_dict: {err}") from err
    return net


# ---------------------------------------------------------------------------- small, trained


class SmallEncoder(nn.Module):
    """A few strided convolutions, randomly initialised and trained: for tests and for a recaptioner
    without any pretrained encoder.

    Batch norm after every convolution: without it a small mouth (Smiling, Mouth_Slightly_Open)
    was never learnt in the toy demo's budget (a linear probe on this encoder, trained briefly on
    toy renders, read both far better with it). The generated-image pass reads with the running
    statistics of real images (TextToFace.read_generated).
    """

    input_mean, input_std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, channels: int, grid: int):
        super().__init__()
        half = max(channels // 2, 1)

        def conv(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(*conv(3, half, 2), *conv(half, channels, 2), *conv(channels, channels, 2),
                                  *conv(channels, channels, 1))
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x))  # (B, C, grid, grid)


# ---------------------------------------------------------------------------- pretrained elsewhere, frozen


def frozen_cnn_spec(prefix: str, strides, input_mean, input_std, heads=()) -> dict:
    """The description a frozen CNN's weights need beside them (under FROZEN_CNN_KEY in <file>.json).

    Block i is `<prefix><3i>` a bias-free k×k convolution with stride `strides[i]` and padding
    k // 2, `<prefix><3i+1>` its batch norm, then a ReLU; channels and k come from the weights.
    `input_mean` / `input_std` normalise [0, 1] images the way the network was trained. `heads`
    names the file's linear layers after the convolutions, in the order they were built (a
    classifier's head): loaded too, so every tensor of the file is checked, then dropped.
    """
    return {"prefix": prefix, "strides": [int(s) for s in strides], "heads": list(heads),
            "input_mean": [float(m) for m in input_mean], "input_std": [float(s) for s in input_std]}


def read_frozen_cnn(weights: str) -> tuple[dict, dict]:
    """(description, float32 state of the whole file) from `weights` and the .json beside it."""
    from safetensors.torch import load_file

    path = Path(os.path.expanduser(weights))
    info_path = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"recaptioner.encoder_weights: {path} not found; point it at a frozen CNN's "
                                ".safetensors (the toy preset's: ${T2F_PKG}/toy/assets/backbone/classifier.safetensors)")
    try:
        spec = json.loads(info_path.read_text())[FROZEN_CNN_KEY]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{info_path}: missing, or without a {FROZEN_CNN_KEY!r} description "
                         "(see t2f.models.image_encoders.frozen_cnn_spec); it must sit beside the weights") from None
    state = {k: (v.float() if v.dtype.is_floating_point else v) for k, v in load_file(str(path)).items()}
    return spec, state


class FrozenCNN(PretrainedBody):
    """A pretrained conv -> batch norm -> ReLU stack (see `frozen_cnn_spec`), frozen with its
    batch-norm statistics as the ResNet is, pooled to a grid×grid feature map."""

    def __init__(self, weights: str, grid: int):
        super().__init__()
        spec, state = read_frozen_cnn(weights)
        # The whole network is built in the file's order, heads included: the heads check the file
        # and keep the random stream of whatever is initialised after the encoder as it was when the
        # toy world built its whole classifier here (same decoder init, same demo numbers).
        body = _conv_stack(spec, state, weights)
        whole = nn.ModuleDict({spec["prefix"].rstrip("."): body, **_linear_heads(spec, state, weights)})
        try:
            whole.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{weights}: the weights do not match their {FROZEN_CNN_KEY!r} description: {err}") from None
        self.hold(body)
        self.out_dim = body[-3].out_channels
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.input_mean, self.input_std = tuple(spec["input_mean"]), tuple(spec["input_std"])
        self.train(False)


def _conv_stack(spec: dict, state: dict, weights: str) -> nn.Sequential:
    layers, c_in = [], 3
    for i, stride in enumerate(spec["strides"]):
        key = f"{spec['prefix']}{3 * i}.weight"
        if key not in state:
            raise ValueError(f"{weights}: no tensor {key!r} for block {i} of its {FROZEN_CNN_KEY!r} description")
        c_out, _, k, _ = state[key].shape
        layers += [nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers)


def _linear_heads(spec: dict, state: dict, weights: str) -> dict:
    heads = {}
    for name in spec.get("heads", ()):
        if f"{name}.weight" not in state:
            raise ValueError(f"{weights}: no tensor '{name}.weight' for the head its {FROZEN_CNN_KEY!r} description names")
        out_features, in_features = state[f"{name}.weight"].shape
        heads[name] = nn.Linear(in_features, out_features)
    return heads


def build_image_encoder(cfg) -> nn.Module:
    """The encoder a RecaptionerConfig names; a wrong name or a missing file is a one-line error."""
    if cfg.encoder == "resnet101":
        return ResNetEncoder(cfg.feature_grid, cfg.encoder_weights, cfg.finetune_encoder)
    if cfg.encoder == "small":
        return SmallEncoder(cfg.small_channels, cfg.feature_grid)
    if cfg.encoder == "frozen_cnn":
        if not cfg.encoder_weights or cfg.encoder_weights == RANDOM_WEIGHTS:
            raise ValueError("recaptioner.encoder=frozen_cnn needs recaptioner.encoder_weights=<file>.safetensors "
                             "(the toy preset's: ${T2F_PKG}/toy/assets/backbone/classifier.safetensors)")
        return FrozenCNN(cfg.encoder_weights, cfg.feature_grid)
    renamed = " ('toy' is now frozen_cnn with recaptioner.encoder_weights=<its .safetensors>)" if cfg.encoder == "toy" else ""
    raise ValueError(f"recaptioner.encoder must be one of {', '.join(ENCODERS)}, got {cfg.encoder!r}{renamed}")
