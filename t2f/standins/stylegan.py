"""StyleGAN2 FFHQ-1024 config-f stand-ins: random weights in NVlabs' .pkl and rosinality's .pt layouts.

    G = ffhq_generator(seed=0)                     # our Generator, FFHQ config-f shapes, random weights
    write_nvlabs_pickle(G, "ffhq.pkl")             # {G, D, G_ema, augment_pipe, training_set_kwargs}
    write_rosinality_pt(G, "stylegan2-ffhq-config-f.pt")   # {g, d, g_ema, latent_avg}

Both files hold what the released ones hold, at their sizes (about 360 MB each): the generator
twice (G and G_ema, g and g_ema) and the config-f discriminator, whose key names and shapes are
NVlabs' (`b1024.fromrgb.weight`, ..., `b4.out.bias`) and rosinality's (`convs.0.0.weight`, ...,
`final_linear.1.bias`). The pickle's network objects are `torch_utils.persistence` records, as
NVlabs writes them; its `module_src` is a comment (t2f never reads it). t2f loads only the
generator, so the discriminators' values are random and unused: they are there for the sizes.
"""

import collections
import contextlib
import pickle
import sys
import types

import torch

from t2f.models.generator import Generator, build_generator, estimate_w_avg

CHANNEL_BASE, CHANNEL_MAX, RESOLUTION = 32768, 512, 1024
# What NVlabs' TF-converted ffhq.pkl was built with (legacy.py): fp32, no clamping.
MAPPING_KWARGS = dict(num_layers=8, embed_features=None, layer_features=None, activation="lrelu", lr_multiplier=0.01,
                      w_avg_beta=0.995)
SYNTHESIS_KWARGS = dict(channel_base=CHANNEL_BASE, channel_max=CHANNEL_MAX, num_fp16_res=0, conv_clamp=None,
                        architecture="skip", resample_filter=[1, 3, 3, 1], use_noise=True, activation="lrelu")
NVLABS_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")


def channels(res: int) -> int:
    return min(CHANNEL_BASE // res, CHANNEL_MAX)


def ffhq_generator(seed: int = 0) -> Generator:
    """Our Generator with the FFHQ-1024 config-f architecture, random weights, w_avg estimated."""
    torch.manual_seed(seed)
    G = build_generator(dict(z_dim=512, c_dim=0, w_dim=512, img_resolution=RESOLUTION, img_channels=3, mapping_layers=8,
                             mapping_lr_multiplier=0.01, w_avg_beta=0.995, channel_base=CHANNEL_BASE,
                             channel_max=CHANNEL_MAX, num_fp16_res=0, conv_clamp=None))
    with torch.no_grad():
        G.mapping.w_avg.copy_(estimate_w_avg(G.mapping))
    return G.eval()


def _blur() -> torch.Tensor:
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    return k.outer(k) / 64  # (4, 4), sum 1


# ---------------------------------------------------------------------------- NVlabs .pkl


class _EasyDict(dict):
    pass


def _reconstruct_persistent_obj(meta):  # only named in the pickle: never called by anyone
    raise RuntimeError("stand-in for torch_utils.persistence: not callable")


class _Persistent:
    """Pickles as NVlabs' torch_utils.persistence does: `_reconstruct_persistent_obj(meta)`."""

    def __init__(self, class_name: str, state: dict):
        self.meta = dict(type="class", version=6, module_src="# t2f stand-in: no code", class_name=class_name,
                         state=state)

    def __reduce__(self):
        return _reconstruct_persistent_obj, (self.meta,)


def _record(class_name, params=None, buffers=None, modules=None, init_kwargs=None) -> _Persistent:
    state = dict(training=False, _parameters=collections.OrderedDict(params or {}),
                 _buffers=collections.OrderedDict(buffers or {}), _non_persistent_buffers_set=set(),
                 _modules=collections.OrderedDict(modules or {}), _init_args=(),
                 _init_kwargs=_EasyDict(init_kwargs or {}))
    return _Persistent(class_name, state)


def _module_record(module: torch.nn.Module, init_kwargs=None) -> _Persistent:
    """A record of one of our modules (their class and attribute names are NVlabs'), tensors copied."""
    params = {k: torch.nn.Parameter(v.detach().clone(), requires_grad=False) for k, v in module._parameters.items()
              if v is not None}
    buffers = {k: v.clone() for k, v in module._buffers.items() if v is not None}
    children = {k: _module_record(m) for k, m in module._modules.items()}
    return _record(type(module).__name__, params, buffers, children, init_kwargs)


def _conv(c_in, c_out, k, bias=True):
    params = {"weight": torch.nn.Parameter(torch.randn(c_out, c_in, k, k), requires_grad=False)}
    if bias:
        params["bias"] = torch.nn.Parameter(torch.zeros(c_out), requires_grad=False)
    return _record("Conv2dLayer", params, {"resample_filter": _blur()})


def _fc(c_in, c_out):
    return _record("FullyConnectedLayer", {"weight": torch.nn.Parameter(torch.randn(c_out, c_in), requires_grad=False),
                                           "bias": torch.nn.Parameter(torch.zeros(c_out), requires_grad=False)})


def nvlabs_discriminator() -> _Persistent:
    """NVlabs' config-f residual discriminator (about 29 M parameters), random weights."""
    blocks = {}
    for res in [2**i for i in range(10, 2, -1)]:  # b1024 ... b8
        tmp, out = channels(res), channels(res // 2)
        parts = {"fromrgb": _conv(3, tmp, 1)} if res == RESOLUTION else {}
        parts.update(conv0=_conv(tmp, tmp, 3), conv1=_conv(tmp, out, 3), skip=_conv(tmp, out, 1, bias=False))
        blocks[f"b{res}"] = _record("DiscriminatorBlock", buffers={"resample_filter": _blur()}, modules=parts)
    c4 = channels(4)
    blocks["b4"] = _record("DiscriminatorEpilogue", modules={
        "mbstd": _record("MinibatchStdLayer"), "conv": _conv(c4 + 1, c4, 3), "fc": _fc(c4 * 16, c4), "out": _fc(c4, 1)})
    kwargs = dict(c_dim=0, img_resolution=RESOLUTION, img_channels=3, architecture="resnet", channel_base=CHANNEL_BASE,
                  channel_max=CHANNEL_MAX, num_fp16_res=0, conv_clamp=None, cmap_dim=None,
                  block_kwargs=_EasyDict(activation="lrelu", resample_filter=[1, 3, 3, 1], freeze_layers=0),
                  mapping_kwargs=_EasyDict(), epilogue_kwargs=_EasyDict(mbstd_group_size=4, mbstd_num_channels=1,
                                                                        activation="lrelu"))
    return _record("Discriminator", modules=blocks, init_kwargs=kwargs)


@contextlib.contextmanager
def _nvlabs_names():
    """NVlabs' globals, importable while pickling, so the pickle names them as the real one does."""
    added = [name for name in NVLABS_MODULES if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
    named = [(_reconstruct_persistent_obj, "torch_utils.persistence", "_reconstruct_persistent_obj"),
             (_EasyDict, "dnnlib.util", "EasyDict")]
    saved = [(obj, obj.__module__, obj.__qualname__) for obj, _, _ in named]
    for obj, module, name in named:
        obj.__module__, obj.__qualname__ = module, name
        setattr(sys.modules[module], name, obj)
    try:
        yield
    finally:
        for obj, module, name in saved:
            obj.__module__, obj.__qualname__ = module, name
        for name in added:
            del sys.modules[name]


def write_nvlabs_pickle(G: Generator, path) -> None:
    """A stylegan2-ada-pytorch snapshot: {G, D, G_ema, augment_pipe, training_set_kwargs}."""
    kwargs = dict(z_dim=G.z_dim, c_dim=0, w_dim=G.w_dim, img_resolution=G.img_resolution, img_channels=3,
                  mapping_kwargs=_EasyDict(MAPPING_KWARGS), synthesis_kwargs=_EasyDict(SYNTHESIS_KWARGS))
    with _nvlabs_names():
        snapshot = dict(G=_module_record(G, kwargs), D=nvlabs_discriminator(), G_ema=_module_record(G, kwargs),
                        augment_pipe=None, training_set_kwargs=_EasyDict(resolution=RESOLUTION))
        with open(path, "wb") as f:
            pickle.dump(snapshot, f)  # the default protocol, as NVlabs' training loop


# ---------------------------------------------------------------------------- rosinality .pt


def rosinality_generator(G: Generator) -> dict:
    """Our weights under rosinality stylegan2-pytorch's `g_ema` names and shapes."""
    sd, out = G.state_dict(), {}
    for i in range(G.mapping.num_layers):  # style.0 is the pixel norm
        out[f"style.{i + 1}.weight"], out[f"style.{i + 1}.bias"] = sd[f"mapping.fc{i}.weight"], sd[f"mapping.fc{i}.bias"]
    out["input.input"] = sd["synthesis.b4.const"][None]  # (1, C, 4, 4)
    resolutions = G.synthesis.block_resolutions
    layers = [("conv1", "b4.conv1")] + [(f"convs.{j}", f"b{res}.conv{j % 2}")
                                        for j, res in enumerate(r for r in resolutions[1:] for _ in range(2))]
    for index, (src, dst) in enumerate(layers):
        out[f"{src}.conv.weight"] = sd[f"synthesis.{dst}.weight"][None]  # (1, O, I, k, k)
        out[f"{src}.conv.modulation.weight"] = sd[f"synthesis.{dst}.affine.weight"]
        out[f"{src}.conv.modulation.bias"] = sd[f"synthesis.{dst}.affine.bias"]
        out[f"{src}.noise.weight"] = sd[f"synthesis.{dst}.noise_strength"].reshape(1)
        out[f"{src}.activate.bias"] = sd[f"synthesis.{dst}.bias"]
        out[f"noises.noise_{index}"] = sd[f"synthesis.{dst}.noise_const"][None, None]  # (1, 1, H, W)
        if dst.endswith("conv0"):
            out[f"{src}.conv.blur.kernel"] = _blur() * 4  # up-sampling blur: rosinality scales by factor²
    for i, res in enumerate(resolutions):
        src = "to_rgb1" if res == 4 else f"to_rgbs.{i - 1}"
        out[f"{src}.conv.weight"] = sd[f"synthesis.b{res}.torgb.weight"][None]
        out[f"{src}.conv.modulation.weight"] = sd[f"synthesis.b{res}.torgb.affine.weight"]
        out[f"{src}.conv.modulation.bias"] = sd[f"synthesis.b{res}.torgb.affine.bias"]
        out[f"{src}.bias"] = sd[f"synthesis.b{res}.torgb.bias"].reshape(1, -1, 1, 1)
        if res > 4:
            out[f"{src}.upsample.kernel"] = _blur() * 4
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def rosinality_discriminator() -> dict:
    """rosinality's Discriminator(1024, channel_multiplier=2) state dict, random weights."""
    sd = {"convs.0.0.weight": torch.randn(channels(RESOLUTION), 3, 1, 1), "convs.0.1.bias": torch.zeros(channels(RESOLUTION))}
    for i, res in enumerate([2**j for j in range(10, 2, -1)], start=1):  # ResBlocks 1024 -> 8
        c_in, c_out = channels(res), channels(res // 2)
        sd.update({f"convs.{i}.conv1.0.weight": torch.randn(c_in, c_in, 3, 3), f"convs.{i}.conv1.1.bias": torch.zeros(c_in),
                   f"convs.{i}.conv2.0.kernel": _blur(), f"convs.{i}.conv2.1.weight": torch.randn(c_out, c_in, 3, 3),
                   f"convs.{i}.conv2.2.bias": torch.zeros(c_out), f"convs.{i}.skip.0.kernel": _blur(),
                   f"convs.{i}.skip.1.weight": torch.randn(c_out, c_in, 1, 1)})
    c4 = channels(4)
    sd.update({"final_conv.0.weight": torch.randn(c4, c4 + 1, 3, 3), "final_conv.1.bias": torch.zeros(c4),
               "final_linear.0.weight": torch.randn(c4, c4 * 16), "final_linear.0.bias": torch.zeros(c4),
               "final_linear.1.weight": torch.randn(1, c4), "final_linear.1.bias": torch.zeros(1)})
    return sd


def write_rosinality_pt(G: Generator, path) -> None:
    """What rosinality's convert_weight.py --gen --disc writes: {g, d, g_ema, latent_avg}."""
    torch.save({"g": rosinality_generator(G), "d": rosinality_discriminator(), "g_ema": rosinality_generator(G),
                "latent_avg": G.mapping.w_avg.detach().clone()}, path)
