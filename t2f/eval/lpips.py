"""LPIPS (AlexNet, v0.1) from local files only: the paper's paired distance and sample diversity.

    model = load_lpips(device="cuda")              # AlexNet from the torch hub cache, linear layers
    d = lpips_distance(model, generated, real)     # from the lpips package: (B,) distances

Paired (METHOD.md, the paper's protocol): a generated image vs the real image of the caption it
was generated from; lower is closer. Diversity: two samples of the same caption; higher is more
varied. Images are (B, 3, H, W) in [-1, 1], the range LPIPS expects.

The lpips package would fetch ImageNet AlexNet weights through torchvision on first use; here
the model is built with a random trunk and both state dicts are loaded by us (weights_only=True),
so nothing is downloaded and a missing file is named with how to stage it.
"""

import os
import warnings
from pathlib import Path

import torch

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision AlexNet_Weights.IMAGENET1K_V1
MIN_SIZE = 32
# lpips' AlexNet trunk keeps torchvision's `features` layers in five slices: index -> slice
_ALEX_SLICES = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


class LpipsWeightsMissing(FileNotFoundError):
    """A weight file LPIPS needs is not on disk; the message names it and how to stage it."""


def alexnet_candidates(path: str = "") -> list[Path]:
    """Files tried for the ImageNet AlexNet: the configured path, else the torch hub cache."""
    if path:
        return [Path(os.path.expanduser(path))]
    return [Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE]


def linear_candidates(path: str = "") -> list[Path]:
    """Files tried for the LPIPS v0.1 linear layers: the configured path, else the lpips package's copy."""
    if path:
        return [Path(os.path.expanduser(path))]
    import lpips

    return [Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"]


def _first_existing(tried: list[Path], what: str, how: str) -> Path:
    for path in tried:
        if path.is_file():
            return path
    listing = "\n  ".join(str(p) for p in tried)
    raise LpipsWeightsMissing(f"LPIPS needs {what}; not found at:\n  {listing}\n{how}")


def load_lpips(alexnet_weights: str = "", linear_weights: str = "", device="cpu"):
    """A frozen lpips.LPIPS(net='alex', version 0.1) with both weight files read from disk."""
    import lpips

    alex = _first_existing(
        alexnet_candidates(alexnet_weights), f"ImageNet AlexNet weights ({ALEXNET_FILE})",
        "On a machine with internet: `python -c \"import torchvision; torchvision.models.alexnet(weights='IMAGENET1K_V1')\"` "
        f"then copy $TORCH_HOME/hub/checkpoints/{ALEXNET_FILE} (default ~/.cache/torch/hub/checkpoints/) to the same "
        "place here, or set eval.lpips_alexnet=/path/to/file.")
    linear = _first_existing(
        linear_candidates(linear_weights), "the LPIPS v0.1 AlexNet linear layers (alex.pth)",
        "They ship with the pip package `lpips` (lpips/weights/v0.1/alex.pth): reinstall it, or set "
        "eval.lpips_linear=/path/to/alex.pth.")
    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" for the random trunk
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(pretrained=False, net="alex", version="0.1", pnet_rand=True, verbose=False)
    trunk = torch.load(alex, map_location="cpu", weights_only=True)
    heads = torch.load(linear, map_location="cpu", weights_only=True)
    state = {**_trunk_state(trunk, alex), **{k: v for k, v in heads.items() if k.startswith("lin")}}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # `lins.N` is a ModuleList view of the same layers as `linN`: loaded once through `linN`
    wanted = [k for k in missing if k.startswith(("net.", "lin")) and not k.startswith("lins.")]
    if wanted or unexpected:
        raise ValueError(f"LPIPS weights {alex} / {linear} do not fit AlexNet LPIPS v0.1: "
                         f"missing {wanted[:4]}, unexpected {unexpected[:4]}")
    return model.requires_grad_(False).eval().to(device)


def _trunk_state(alexnet_state: dict, path: Path) -> dict:
    """torchvision AlexNet `features.{i}.*` -> lpips `net.slice{k}.{i}.*` (classifier layers dropped)."""
    state = alexnet_state.get("state_dict", alexnet_state)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue
        index = int(parts[1])
        if index not in _ALEX_SLICES:
            raise ValueError(f"{path}: unexpected AlexNet layer {key!r} (not torchvision's AlexNet)")
        out[f"net.slice{_ALEX_SLICES[index]}.{index}.{parts[2]}"] = value
    if len(out) != 2 * len(_ALEX_SLICES):
        raise ValueError(f"{path}: expected torchvision AlexNet weights (features.0 ... features.10), "
                         f"found {sorted(state)[:6]}")
    return out


@torch.no_grad()
def lpips_distance(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) LPIPS between matching images of `a` and `b`, both (B, 3, H, W) in [-1, 1]."""
    if a.shape != b.shape:
        raise ValueError(f"LPIPS compares images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[-2:]) < MIN_SIZE:  # AlexNet's strided layers shrink smaller images to nothing
        raise ValueError(f"LPIPS (AlexNet) needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(a.shape[-2:])}")
    device = next(model.parameters()).device
    return model(a.float().to(device), b.float().to(device)).reshape(-1).cpu()  # (B,)
