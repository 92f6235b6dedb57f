"""The StyleGAN2 generator (mapping + synthesis) and the helpers that build one.

`Generator` mirrors NVlabs' G_ema: its state-dict keys (`mapping.fc0.weight`,
`synthesis.b4.const`, ...) are theirs, so official weights load key for key.
`architecture(G)` is the JSON-able description saved beside our safetensors checkpoints;
`build_generator(arch)` inverts it; `generator_from_config(cfg)` is what training code calls.
"""

import logging
import warnings

import torch
from torch import nn

from t2f.models.mapping import MappingNetwork
from t2f.models.synthesis import SynthesisNetwork, set_impl

log = logging.getLogger(__name__)

# Fields that shape the weights; `architecture()` adds the derived `num_ws` and `channels`.
ARCH_KEYS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels", "mapping_layers", "mapping_lr_multiplier",
             "w_avg_beta", "channel_base", "channel_max", "num_fp16_res", "conv_clamp")


class Generator(nn.Module):
    """z (B, z_dim) [+ c] -> mapping -> ws (B, num_ws, w_dim) -> synthesis -> image (B, C, H, W)."""

    def __init__(self, z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs=None, synthesis_kwargs=None):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, **(synthesis_kwargs or {}))
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, **(mapping_kwargs or {}))

    def forward(self, z, c=None, truncation_psi=1, truncation_cutoff=None, noise_mode="const", force_fp32=False,
                update_emas=False):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)  # (B, num_ws, w_dim)
        return self.synthesis(ws, noise_mode=noise_mode, force_fp32=force_fp32)  # (B, C, H, W)

    def set_impl(self, impl):
        """Choose the fused-op implementation ('auto' | 'ref' | 'triton') everywhere."""
        return set_impl(self, impl)


def architecture(G: Generator) -> dict:
    """Everything needed to rebuild `G` (JSON-able), plus derived facts for humans."""
    mapping, synthesis = G.mapping, G.synthesis
    return {
        "z_dim": G.z_dim,
        "c_dim": G.c_dim,
        "w_dim": G.w_dim,
        "img_resolution": G.img_resolution,
        "img_channels": G.img_channels,
        "mapping_layers": mapping.num_layers,
        "mapping_lr_multiplier": mapping.lr_multiplier,
        "w_avg_beta": mapping.w_avg_beta,
        "channel_base": synthesis.channel_base,
        "channel_max": synthesis.channel_max,
        "num_fp16_res": synthesis.num_fp16_res,
        "conv_clamp": synthesis.conv_clamp,
        "num_ws": G.num_ws,
        "channels": {str(res): ch for res, ch in synthesis.channels.items()},
    }


def build_generator(arch: dict, impl: str = "auto") -> Generator:
    """Randomly initialised Generator from an `architecture()` dict; ValueError if it is inconsistent."""
    missing = [key for key in ARCH_KEYS if key not in arch]
    unknown = sorted(set(arch) - set(ARCH_KEYS) - {"num_ws", "channels"})
    if missing or unknown:
        raise ValueError(f"architecture: missing keys {missing}, unknown keys {unknown}; expected {list(ARCH_KEYS)}")
    G = Generator(
        arch["z_dim"], arch["c_dim"], arch["w_dim"], arch["img_resolution"], arch["img_channels"],
        mapping_kwargs=dict(num_layers=arch["mapping_layers"], lr_multiplier=arch["mapping_lr_multiplier"],
                            w_avg_beta=arch["w_avg_beta"]),
        synthesis_kwargs=dict(channel_base=arch["channel_base"], channel_max=arch["channel_max"],
                              num_fp16_res=arch["num_fp16_res"], conv_clamp=arch["conv_clamp"], impl=impl),
    )
    built = architecture(G)
    for key in ("num_ws", "channels"):  # derived facts written by hand must agree with the build
        if key in arch and arch[key] != built[key]:
            raise ValueError(f"architecture: {key}={arch[key]} does not match the one these settings give ({built[key]})")
    return G.set_impl(impl)


def architecture_from_config(cfg) -> dict:
    """The architecture a `t2f.config.GeneratorConfig` describes (used when no checkpoint is given)."""
    return {
        "z_dim": cfg.z_dim, "c_dim": 0, "w_dim": cfg.w_dim, "img_resolution": cfg.resolution,
        "img_channels": cfg.img_channels, "mapping_layers": cfg.mapping_layers, "mapping_lr_multiplier": 0.01,
        "w_avg_beta": 0.998, "channel_base": cfg.channel_base, "channel_max": cfg.channel_max,
        "num_fp16_res": cfg.num_fp16_res, "conv_clamp": cfg.conv_clamp,
    }


def generator_from_config(cfg, device="cpu") -> Generator:
    """The generator a `GeneratorConfig` asks for, on `device`, in eval mode.

    With `cfg.checkpoint` set, the architecture comes from the file (a warning lists config fields
    that disagree with it) and only the compute precision (`num_fp16_res`, `conv_clamp`) and
    `impl` come from the config: they change no weights, and NVlabs' TF-converted FFHQ weights
    ship with fp16 off. Without a checkpoint, a randomly initialised generator is built.
    """
    if not cfg.checkpoint:
        return build_generator(architecture_from_config(cfg), impl=cfg.impl).to(device).eval()
    from t2f.models.weights import load_generator  # weights imports this module

    G = load_generator(cfg.checkpoint, device=device, impl=cfg.impl)
    arch = architecture(G)
    _warn_on_mismatch(cfg, arch)
    if (arch["num_fp16_res"], arch["conv_clamp"]) != (cfg.num_fp16_res, cfg.conv_clamp):
        log.info("%s: using num_fp16_res=%s conv_clamp=%s from the config (file has %s, %s)", cfg.checkpoint,
                 cfg.num_fp16_res, cfg.conv_clamp, arch["num_fp16_res"], arch["conv_clamp"])
        G.synthesis.set_precision(cfg.num_fp16_res, cfg.conv_clamp)
    return G.eval()


def _warn_on_mismatch(cfg, arch: dict) -> None:
    wanted = architecture_from_config(cfg)
    fields = {"z_dim": "z_dim", "w_dim": "w_dim", "img_resolution": "resolution", "img_channels": "img_channels",
              "channel_base": "channel_base", "channel_max": "channel_max", "mapping_layers": "mapping_layers"}
    diffs = [f"generator.{name}={wanted[key]} (file: {arch[key]})" for key, name in fields.items() if wanted[key] != arch[key]]
    if diffs:
        warnings.warn(f"{cfg.checkpoint}: the checkpoint's architecture wins over the config: {', '.join(diffs)}",
                      stacklevel=3)


@torch.no_grad()
def estimate_w_avg(mapping: MappingNetwork, num_samples: int = 10000, seed: int = 0) -> torch.Tensor:
    """Mean w over random z (the truncation centre when a checkpoint does not store one)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn([num_samples, mapping.z_dim], generator=gen).to(mapping.w_avg.device)
    c = torch.zeros([num_samples, mapping.c_dim], device=z.device) if mapping.c_dim else None
    return mapping(z, c)[:, 0].mean(dim=0)  # (w_dim,)
