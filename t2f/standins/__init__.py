"""`t2f standins --out DIR`: random-weight stand-ins of every artefact a paper preset reads, in the real formats.

    t2f standins --out /tmp/standins        # ~2 GB, about a minute; prints the `export` lines to use them
    eval "$(t2f standins --out /tmp/standins --print-env)"

What DIR holds, and the variable that points a preset at it (README, "Real data"):

    clip-vit-base-patch32/                        CLIPModel, openai's config, save_pretrained     T2F_CLIP
    stylegan2/ffhq.pkl                            NVlabs snapshot {G, D, G_ema, ...}, 382 MB       T2F_STYLEGAN2
    stylegan2/stylegan2-ffhq-config-f.pt          rosinality {g, d, g_ema, latent_avg}, same net    (either file)
    torch/hub/checkpoints/resnet101-63fe2227.pth  torchvision ResNet-101 state dict                T2F_RESNET101, TORCH_HOME
    torch/hub/checkpoints/alexnet-owt-7be5be79.pth torchvision AlexNet (LPIPS trunk)                TORCH_HOME
    cache/inception-2015-12-05.pt                 TorchScript Inception-v3, clean-fid's interface  T2F_CACHE
    data/MM-CelebA-HQ/, data/CelebAText-HQ/       12 faces at 1024² (8 train, 4 test), 10 captions each, splits, attributes
    env.sh                                        the export lines; standins.json: what was written

Weights are random, so nothing trained on them means anything: they exist so that the full-size
path (shapes, key names, file layouts, sizes, load times, memory) runs end to end on any machine.
A directory that already holds a complete set (standins.json lists every file) is reused.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

VERSION = 1
CLIP_DIR = "clip-vit-base-patch32"
NVLABS_PKL = "stylegan2/ffhq.pkl"
ROSINALITY_PT = "stylegan2/stylegan2-ffhq-config-f.pt"
HUB = "torch/hub/checkpoints"
RESNET101 = f"{HUB}/resnet101-63fe2227.pth"
ALEXNET = f"{HUB}/alexnet-owt-7be5be79.pth"
INCEPTION = "cache/inception-2015-12-05.pt"
DATASETS = {"mmcelebahq": "data/MM-CelebA-HQ", "celebatext": "data/CelebAText-HQ"}
MANIFEST = "standins.json"


def environment(out: Path) -> dict:
    """The variables that point the paper presets (and t2f eval) at the stand-ins in `out`."""
    out = out.resolve()
    return {"T2F_CLIP": str(out / CLIP_DIR), "T2F_STYLEGAN2": str(out / NVLABS_PKL), "T2F_RESNET101": str(out / RESNET101),
            "TORCH_HOME": str(out / "torch"), "T2F_CACHE": str(out / "cache"), "HF_HUB_OFFLINE": "1"}


def is_complete(out: Path) -> bool:
    try:
        record = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return record.get("version") == VERSION and all((out / rel).exists() for rel in record.get("files", []))


def write_standins(out, progress: bool = True, force: bool = False) -> dict:
    """Write every stand-in into `out` (reused when complete and not `force`); returns environment(out)."""
    from tqdm import tqdm

    out = Path(out)
    if is_complete(out) and not force:
        return environment(out)
    (out / MANIFEST).unlink(missing_ok=True)  # written last: its presence marks a complete set
    parts = [("faces", _write_faces), ("CLIP ViT-B/32", _write_clip), ("StyleGAN2 FFHQ-1024", _write_stylegan2),
             ("ResNet-101", _write_resnet101), ("AlexNet", _write_alexnet), ("Inception", _write_inception)]
    files, tic = [], time.perf_counter()
    for name, write in tqdm(parts, desc="stand-ins", unit="part", disable=not progress):
        if progress:
            tqdm.write(f"[standins] {name}")
        files += write(out)
    env = environment(out)
    (out / "env.sh").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    record = {"version": VERSION, "seconds": round(time.perf_counter() - tic, 1), "files": files, "env": env,
              "datasets": {name: str(out / rel) for name, rel in DATASETS.items()}}
    (out / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return env


# ---------------------------------------------------------------------------- the parts


def _write_faces(out: Path) -> list[str]:
    from t2f.standins.faces import make_faces, write_celebatext, write_mmcelebahq

    faces = make_faces()
    write_mmcelebahq(out / DATASETS["mmcelebahq"], faces)
    write_celebatext(out / DATASETS["celebatext"], faces)
    return list(DATASETS.values())


def _write_clip(out: Path) -> list[str]:
    from t2f.standins.clip import write_clip
    from t2f.standins.faces import caption_corpus

    write_clip(out / CLIP_DIR, caption_corpus())
    return [f"{CLIP_DIR}/config.json", f"{CLIP_DIR}/model.safetensors", f"{CLIP_DIR}/tokenizer.json"]


def _write_stylegan2(out: Path) -> list[str]:
    from t2f.standins.stylegan import ffhq_generator, write_nvlabs_pickle, write_rosinality_pt

    (out / NVLABS_PKL).parent.mkdir(parents=True, exist_ok=True)
    G = ffhq_generator()
    _atomic(out / NVLABS_PKL, lambda path: write_nvlabs_pickle(G, path))
    _atomic(out / ROSINALITY_PT, lambda path: write_rosinality_pt(G, path))
    return [NVLABS_PKL, ROSINALITY_PT]


def _write_resnet101(out: Path) -> list[str]:
    import torchvision

    # zero_init_residual: torchvision's own option; random residual branches would blow the
    # features up through 33 blocks, and a finite loss keeps a stand-in run a real run
    return _save_state(out, RESNET101, lambda: torchvision.models.resnet101(weights=None, zero_init_residual=True))


def _write_alexnet(out: Path) -> list[str]:
    import torchvision

    return _save_state(out, ALEXNET, lambda: torchvision.models.alexnet(weights=None))


def _write_inception(out: Path) -> list[str]:
    (out / INCEPTION).parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = _InceptionStandIn()
    _measure_batch_norm(model.layers, torch.rand(8, 3, 299, 299) * 2 - 1)
    _atomic(out / INCEPTION, lambda path: torch.jit.script(model.eval()).save(str(path)))
    return [INCEPTION]


@torch.no_grad()
def _measure_batch_norm(net: torch.nn.Module, images: torch.Tensor, passes: int = 2) -> None:
    """Batch-norm statistics of `net` measured on `images`: with the initial ones (mean 0, variance
    1) random Inception features vanish (~1e-8) and FID is 0 for any two sets; measured, they keep a
    usable scale and differ between images."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the passes
    net.train()
    for _ in range(passes):
        net(images)
    for norm in norms:
        norm.momentum = 0.1
    net.eval()


def _save_state(out: Path, rel: str, build) -> list[str]:
    """A torchvision model's state dict, saved as the hub cache holds it."""
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    _atomic(out / rel, lambda tmp: torch.save(build().state_dict(), tmp))
    return [rel]


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


class _InceptionStandIn(torch.nn.Module):
    """clean-fid's TorchScript interface: `layers` maps (B, 3, 299, 299) in [-1, 1] to (B, 2048, 1, 1)
    pool features; `forward(x, return_features)` takes [0, 255] images of any size."""

    BLOCKS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
              "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
              "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")

    def __init__(self):
        import torchvision

        super().__init__()
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        self.layers = torch.nn.Sequential(*[getattr(net, name) for name in self.BLOCKS])

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128).flatten(1)  # (B, 2048)


# ---------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="t2f standins", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write (reused when it already holds a complete set)")
    parser.add_argument("--force", action="store_true", help="rewrite everything, even a complete set")
    parser.add_argument("--print-env", action="store_true", help="print only the export lines (for eval \"$(...)\")")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        env = write_standins(out, progress=not args.print_env, force=args.force)
    except OSError as err:
        print(f"t2f standins: cannot write {err.filename or out}: {err.strerror or err}; choose another --out", file=sys.stderr)
        return 2
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    if args.print_env:
        print(exports, end="")
        return 0
    print(f"stand-ins in {out.resolve()} (random weights, real formats). To use them:\n{exports}"
          f"datasets: {out.resolve() / DATASETS['mmcelebahq']}  {out.resolve() / DATASETS['celebatext']}")
    return 0
