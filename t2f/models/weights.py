"""Load and save StyleGAN2 generators: t2f safetensors, NVlabs .pkl (safely), rosinality .pt.

    G = load_generator("stylegan2-ffhq-config-f.pkl")   # any of the three formats
    save_generator(G, "ffhq.safetensors")               # writes ffhq.safetensors + ffhq.json

Our format is `NAME.safetensors` (the G_ema state dict, NVlabs key names) plus the sidecar
`NAME.json` (`{"format": "t2f-generator", "version": 1, "architecture": {...}}`); the same JSON
is also embedded in the safetensors metadata, so a lone .safetensors still loads. NVlabs pickles
go through the restricted unpickler in nvlabs_pickle.py; rosinality files through
`torch.load(weights_only=True)`. docs/CHECKPOINTS.md describes the formats and the key mapping.
"""

import argparse
import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import safetensors.torch
import torch

from t2f.models import nvlabs_pickle
from t2f.models.generator import Generator, architecture, build_generator, estimate_w_avg
from t2f.ops import setup_filter

FORMATS = {
    "t2f": "t2f safetensors + JSON architecture (what `t2f convert` writes)",
    "nvlabs_pkl": "NVlabs stylegan2-ada-pytorch / stylegan3 network pickle (.pkl, G_ema is used)",
    "rosinality_pt": "rosinality stylegan2-pytorch torch.save file (.pt, g_ema + latent_avg)",
}
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # pre-zip torch.save


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, unsafe or not what its format promises."""


def checkpoint_paths(path) -> tuple[Path, Path]:
    """(NAME.safetensors, NAME.json) for a path given with or without the .safetensors suffix."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.parent / (path.name + ".safetensors"), path.parent / (path.name + ".json")


def detect_format(path) -> str:
    """'t2f' | 'nvlabs_pkl' | 'rosinality_pt', decided from the file's first bytes."""
    path = Path(path)
    if path.suffix == ".json" and checkpoint_paths(path)[0].is_file():
        return "t2f"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if len(head) < 8:
        raise CheckpointError(f"{path}: only {size} bytes; expected a StyleGAN2 checkpoint ({_format_list()})")
    if head.startswith(b"PK\x03\x04"):
        return "rosinality_pt"
    if head.startswith(TORCH_LEGACY_MAGIC):
        return "rosinality_pt"
    # safetensors before pickle: the file opens with its header's length, little-endian, so a header of
    # 0x380 bytes starts 80 03, which is also how a protocol-3 pickle starts. A pickle's ninth byte is
    # inside its first opcodes, never the "{" that opens a safetensors header.
    header_len = int.from_bytes(head[:8], "little")
    if 8 + header_len <= size and head[8:9] == b"{":
        return "t2f"
    if head[0] == 0x80:  # pickle protocol marker
        return "nvlabs_pkl"
    raise CheckpointError(f"{path}: not a checkpoint format t2f reads (first bytes {head[:8].hex()}); expected {_format_list()}")


def load_generator(path, device="cpu", impl="auto") -> Generator:
    """A Generator in eval mode from any supported checkpoint (freezing is the caller's choice)."""
    fmt = detect_format(path)
    loader = {"t2f": _load_t2f, "nvlabs_pkl": _load_nvlabs, "rosinality_pt": _load_rosinality}[fmt]
    G = loader(Path(path), impl)
    return G.to(device).eval()


def save_generator(G: Generator, path) -> tuple[Path, Path]:
    """Write NAME.safetensors + NAME.json atomically; returns both paths."""
    weights_path, json_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"format": "t2f-generator", "version": 1, "architecture": architecture(G)}, indent=2)
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in G.state_dict().items()}
    for target, write in ((weights_path, lambda p: safetensors.torch.save_file(tensors, str(p), metadata={"t2f": record})),
                          (json_path, lambda p: Path(p).write_text(record + "\n"))):
        tmp = target.with_name(target.name + ".tmp")
        write(tmp)
        os.replace(tmp, target)
    return weights_path, json_path


# ---------------------------------------------------------------------------- t2f safetensors


def _load_t2f(path: Path, impl: str) -> Generator:
    weights_path, json_path = checkpoint_paths(path)
    try:
        with safetensors.safe_open(str(weights_path), framework="pt") as f:
            embedded = (f.metadata() or {}).get("t2f")
        state = safetensors.torch.load_file(str(weights_path))
    except (OSError, safetensors.SafetensorError) as error:
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({error}); truncated copy?") from None
    text, source = (json_path.read_text(), json_path) if json_path.is_file() else (embedded, weights_path)
    if not text:
        raise CheckpointError(f"{weights_path}: no architecture found; expected {json_path.name} beside it "
                              "(written by `t2f convert` / save_generator)")
    try:
        arch = json.loads(text)["architecture"]
        G = build_generator(arch, impl=impl)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{source}: bad architecture record: {error}") from None
    return _load_strict(G, state, weights_path)


def _load_strict(G: Generator, state: dict, path: Path) -> Generator:
    own = G.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        hint = " (looks like a StyleGAN3 alias-free generator, which t2f does not implement)" if any(
            ".input." in k or ".L0_" in k for k in unexpected) else ""
        raise CheckpointError(f"{path}: weights do not fit a StyleGAN2 generator with architecture "
                              f"{architecture(G)}{hint}; missing {missing[:5]}, unexpected {unexpected[:5]}, "
                              f"shape mismatches {shapes[:5]}")
    G.load_state_dict(state, strict=True)
    return G


# ---------------------------------------------------------------------------- NVlabs .pkl

_NV_TOP = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")
_NV_MAPPING = dict(num_layers=8, embed_features=None, layer_features=None, activation="lrelu", lr_multiplier=0.01,
                   w_avg_beta=0.995)
_NV_SYNTHESIS = dict(channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None, architecture="skip",
                     resample_filter=[1, 3, 3, 1], use_noise=True, activation="lrelu", kernel_size=3)
_NV_SPEED_ONLY = ("fp16_channels_last", "fused_modconv_default", "channels_last")  # change no result


def _load_nvlabs(path: Path, impl: str) -> Generator:
    try:
        with open(path, "rb") as f:
            data = nvlabs_pickle.read_pickle(f)
    except nvlabs_pickle.UnsafePickleError as error:
        hint = (" This is a TensorFlow StyleGAN2 pickle: use the PyTorch release of the same network "
                "(see docs/CHECKPOINTS.md).") if "dnnlib.tflib" in str(error) else ""
        raise CheckpointError(f"{path}: refused as unsafe: {error}; the file was not loaded and nothing in it was run."
                              f"{hint}") from None
    except Exception as error:  # anything a damaged pickle can raise; reported, never half-loaded
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable NVlabs network pickle ({type(error).__name__}: {first_line}); "
                              "truncated download?") from None
    record = data.get("G_ema") if isinstance(data, dict) else data
    if not isinstance(record, nvlabs_pickle.PersistentRecord) or record.class_name != "Generator":
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: expected an NVlabs snapshot with a 'G_ema' Generator; found {found}")
    synthesis = (record.state.get("_modules") or {}).get("synthesis")
    if isinstance(synthesis, nvlabs_pickle.PersistentRecord) and "input" in (synthesis.state.get("_modules") or {}):
        raise CheckpointError(f"{path}: G_ema is a StyleGAN3 (alias-free) generator; t2f implements StyleGAN2 "
                              "(use a stylegan2-*.pkl, see docs/CHECKPOINTS.md)")
    try:
        kwargs = nvlabs_pickle.record_init_kwargs(record, _NV_TOP + ("mapping_kwargs", "synthesis_kwargs"))
        G = build_generator(_nvlabs_architecture(kwargs), impl=impl)
        state = nvlabs_pickle.record_state_dict(record)
    except (ValueError, KeyError, TypeError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path}: G_ema cannot be rebuilt as a t2f Generator: {error}") from None
    if "mapping.w_avg" not in state:
        state["mapping.w_avg"] = estimate_w_avg(_mapping_with(G, state))
    return _load_strict(G, state, path)


def _mapping_with(G: Generator, state: dict):
    G.mapping.load_state_dict({k[len("mapping."):]: v for k, v in state.items() if k.startswith("mapping.")}, strict=False)
    return G.mapping


def _nvlabs_architecture(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    mapping = {**_NV_MAPPING, **dict(kwargs.pop("mapping_kwargs", None) or {})}
    top = {key: kwargs.pop(key) for key in _NV_TOP}
    synthesis = {**_NV_SYNTHESIS, **(kwargs.pop("synthesis_kwargs", None) or {}), **kwargs}  # NVlabs forwards extras
    for name in _NV_SPEED_ONLY:
        synthesis.pop(name, None)
    unknown = sorted(set(mapping) - set(_NV_MAPPING)) + sorted(set(synthesis) - set(_NV_SYNTHESIS))
    if unknown:
        raise ValueError(f"unsupported constructor arguments {unknown}")
    w_dim = top["w_dim"]
    fixed = {"mapping activation": (mapping["activation"], "lrelu"), "architecture": (synthesis["architecture"], "skip"),
             "resample_filter": (list(synthesis["resample_filter"]), [1, 3, 3, 1]),
             "use_noise": (synthesis["use_noise"], True), "activation": (synthesis["activation"], "lrelu"),
             "kernel_size": (synthesis["kernel_size"], 3)}
    for name in ("embed_features", "layer_features"):  # None means w_dim in NVlabs' code
        fixed[name] = (mapping[name], mapping[name] if mapping[name] in (None, w_dim) else w_dim)
    for name, (value, supported) in fixed.items():
        if value != supported:
            raise ValueError(f"{name}={value!r} is not supported (t2f implements StyleGAN2 config-f: {supported!r})")
    return dict(top, mapping_layers=mapping["num_layers"], mapping_lr_multiplier=mapping["lr_multiplier"],
                w_avg_beta=mapping["w_avg_beta"] if mapping["w_avg_beta"] is not None else 0.995,
                channel_base=synthesis["channel_base"], channel_max=synthesis["channel_max"],
                num_fp16_res=synthesis["num_fp16_res"], conv_clamp=synthesis["conv_clamp"])


# ---------------------------------------------------------------------------- rosinality .pt


def _load_rosinality(path: Path, impl: str) -> Generator:
    try:  # train.py checkpoints also pickle their argparse options, harmless plain data
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        unsafe = nvlabs_pickle.refused_global(error)
        if unsafe:  # torch's own message would advise weights_only=False, i.e. running the payload
            raise CheckpointError(f"{path}: refused as unsafe: it asks for '{unsafe}', which a weights file never "
                                  "needs; the file was not loaded and nothing in it was run.") from None
        reason = nvlabs_pickle.torch_load_reason(error)
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed ({type(error).__name__}"
                              f"{': ' + reason if reason else ''}); truncated or not a rosinality .pt?") from None
    if not isinstance(data, dict) or "g_ema" not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: expected a rosinality stylegan2-pytorch checkpoint with 'g_ema'; found {found}")
    try:
        arch, state = rosinality_to_t2f(data["g_ema"])
        G = build_generator(arch, impl=impl)
    except KeyError as error:
        raise CheckpointError(f"{path}: g_ema is not a rosinality StyleGAN2 generator: missing key {error}") from None
    except ValueError as error:
        raise CheckpointError(f"{path}: g_ema is not a rosinality StyleGAN2 generator: {error}") from None
    for name, value in G.state_dict().items():  # FIR filters are fixed buffers rosinality keeps elsewhere
        if name.endswith("resample_filter"):
            state[name] = value
    if data.get("latent_avg") is not None:
        state["mapping.w_avg"] = data["latent_avg"].reshape(-1).float()
    else:
        warnings.warn(f"{path}: no latent_avg stored; estimating w_avg from 10000 random z", stacklevel=3)
        state["mapping.w_avg"] = estimate_w_avg(_mapping_with(G, state))
    return _load_strict(G, state, path)


def rosinality_to_t2f(sd: dict) -> tuple[dict, dict]:
    """rosinality g_ema state dict -> (architecture, our state dict without FIR buffers and w_avg).

    Kernels are copied unflipped: rosinality's up-sampling conv, like NVlabs', is a transposed
    (true) convolution, and both ports flipped the TF weights when converting them.
    """
    sd = _TrackedDict(sd)
    n_mlp = sum(1 for k in sd if k.startswith("style.") and k.endswith(".weight"))
    num_up = sum(1 for k in sd if k.startswith("to_rgbs.") and k.endswith(".conv.weight"))
    resolutions = [2**i for i in range(2, num_up + 3)]
    out = {}
    for i in range(n_mlp):  # style.0 is the pixel norm; same equalised-lr parametrisation as NVlabs
        out[f"mapping.fc{i}.weight"], out[f"mapping.fc{i}.bias"] = sd[f"style.{i + 1}.weight"], sd[f"style.{i + 1}.bias"]
    out["synthesis.b4.const"] = sd["input.input"][0]
    _styled_conv(sd, "conv1", "synthesis.b4.conv1", sd["noises.noise_0"], out)
    _to_rgb(sd, "to_rgb1", "synthesis.b4.torgb", out)
    for i, res in enumerate(resolutions[1:]):
        blur = sd[f"convs.{2 * i}.conv.blur.kernel"]
        for kernel in (blur, sd[f"to_rgbs.{i}.upsample.kernel"]):
            if kernel.shape != (4, 4) or not torch.allclose(kernel, setup_filter([1, 3, 3, 1]) * 4):
                raise ValueError(f"blur kernel at resolution {res} is not [1,3,3,1] (unsupported)")
        _styled_conv(sd, f"convs.{2 * i}", f"synthesis.b{res}.conv0", sd[f"noises.noise_{2 * i + 1}"], out)
        _styled_conv(sd, f"convs.{2 * i + 1}", f"synthesis.b{res}.conv1", sd[f"noises.noise_{2 * i + 2}"], out)
        _to_rgb(sd, f"to_rgbs.{i}", f"synthesis.b{res}.torgb", out)
    unused = sorted(set(sd) - sd.used)
    if unused:
        raise ValueError(f"keys with no StyleGAN2 counterpart: {unused[:5]}")
    widths = {res: out[f"synthesis.b{res}.conv1.weight"].shape[0] for res in resolutions}
    channel_base, channel_max = _channel_rule(widths)
    w_dim = sd["style.1.weight"].shape[0]
    arch = dict(z_dim=sd["style.1.weight"].shape[1], c_dim=0, w_dim=w_dim, img_resolution=resolutions[-1],
                img_channels=sd["to_rgb1.conv.weight"].shape[1], mapping_layers=n_mlp, mapping_lr_multiplier=0.01,
                w_avg_beta=0.995, channel_base=channel_base, channel_max=channel_max, num_fp16_res=0, conv_clamp=None)
    return arch, {k: v.float() for k, v in out.items()}


class _TrackedDict(dict):
    """A dict that remembers which keys were read, so leftovers can be reported."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


def _styled_conv(sd, src, dst, noise, out):
    out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]  # (1, O, I, k, k) -> (O, I, k, k)
    out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
    out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
    out[f"{dst}.noise_strength"] = sd[f"{src}.noise.weight"].reshape([])
    out[f"{dst}.noise_const"] = noise[0, 0]  # (1, 1, H, W) -> (H, W)
    out[f"{dst}.bias"] = sd[f"{src}.activate.bias"]


def _to_rgb(sd, src, dst, out):
    out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
    out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
    out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
    out[f"{dst}.bias"] = sd[f"{src}.bias"].reshape(-1)  # (1, C, 1, 1) -> (C,)


def _channel_rule(widths: dict) -> tuple[int, int]:
    """(channel_base, channel_max) with min(base // res, max) == widths[res] at every resolution."""
    channel_max = max(widths.values())
    below = [res * ch for res, ch in widths.items() if ch < channel_max]
    channel_base = max(below) if below else channel_max * max(widths)  # the smallest base that fits
    if any(min(channel_base // res, channel_max) != ch for res, ch in widths.items()):
        raise ValueError(f"channel widths {widths} follow no min(channel_base // res, channel_max) rule")
    return channel_base, channel_max


def _format_list() -> str:
    return "; ".join(f"{name}: {text}" for name, text in FORMATS.items())
