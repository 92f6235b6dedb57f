"""Run configuration: frozen dataclasses, YAML presets, dotted command-line overrides.

    cfg = load_config("toy", ["optim.lr=3e-4", "train.steps=200"])

A preset is a name from t2f/configs/ (`toy`, `mmcelebahq`, `celebatext`) or a path to a YAML
file. A YAML file may name a `base:` preset and override part of it. Unknown keys and values
of the wrong type are errors that name the key and the valid choices. String values may use
`${VAR}` or `${VAR:-default}` to read the environment (paths to weights and shards on a
cluster), expanded when the config is loaded and saved resolved with the run; `${T2F_PKG}` is
the installed package's folder (assets shipped with t2f, such as the toy generator).
"""

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what is allowed."""


@dataclass(frozen=True)
class DataConfig:
    shards: str = "shards/toy"  # folder or URL (https://, s3://, gs://, pipe:CMD {name}) of manifest.json and <split>-*.tar
    train_split: str = "train"
    eval_split: str = "test"
    resolution: int = 64  # images are decoded at this size (shards may store larger)
    batch_size: int = 32  # per process
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False  # sample shards with replacement (the default for multi-node)
    max_caption_tokens: int = 50  # C in METHOD.md
    use_precomputed_text: bool = True  # use text features stored in the shards when present
    max_bad_fraction: float = 0.01  # stop when corrupt + lost samples pass this share of those read (0..1)
    remote_retries: int = 3  # remote shards: reopens of a file after a failure, then it is skipped and counted as lost
    remote_timeout: float = 60.0  # http(s) shards: seconds without a byte before a read counts as failed


@dataclass(frozen=True)
class TextConfig:
    encoder: str = "openai/clip-vit-base-patch32"  # hub id or local folder
    pooling: str = "auto"  # auto | clip | mean: CLIP's projected embeds, or masked mean pooling
    max_length: int = 77
    local_files_only: bool = False  # also forced when HF_HUB_OFFLINE=1


@dataclass(frozen=True)
class GeneratorConfig:
    checkpoint: str = ""  # t2f safetensors, NVlabs .pkl or rosinality .pt; empty = random init
    z_dim: int = 512
    w_dim: int = 512
    resolution: int = 1024
    img_channels: int = 3
    channel_base: int = 32768
    channel_max: int = 512
    mapping_layers: int = 8
    num_fp16_res: int = 4
    conv_clamp: Optional[float] = 256.0
    impl: str = "auto"  # fused-op implementation: auto | ref | triton
    noise_mode: str = "const"  # synthesis noise in training: const | random | none
    truncation_psi: float = 1.0  # default truncation of sample grids, `t2f generate` and `t2f eval`


@dataclass(frozen=True)
class RecaptionerConfig:
    encoder: str = "resnet101"  # resnet101 | small (random init, trains) | frozen_cnn (pretrained conv stack, frozen)
    encoder_weights: str = ""  # resnet101: file (empty = torch hub cache; random = random init, benchmarks only);
                               # frozen_cnn: its .safetensors (+ .json beside it)
    finetune_encoder: bool = False  # train the top CNN block too
    feature_grid: int = 14  # L = grid^2 feature vectors
    input_size: int = 224
    small_channels: int = 64  # width of the small CNN variant
    embed_dim: int = 512  # m
    hidden_dim: int = 512  # n
    attention_dim: int = 512
    dropout: float = 0.5
    vocab: str = ""  # vocabulary JSON; empty = the one beside the shards' manifest


@dataclass(frozen=True)
class LossConfig:
    kl_weight: float = 1.0  # lambda_1
    trl_weight: float = 5.0  # lambda_2
    attention_weight: float = 1.0  # weight of the doubly stochastic penalty inside L_TRL
    w_reg_weight: float = 0.0  # distance of w to the pretrained mapping's w (off by default)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # The mapper is a copy of StyleGAN's mapping, whose weights are stored divided by its
    # equalised-lr multiplier (0.01): at optim.lr it moves ~100x slower than the CA head.
    # 1 keeps StyleGAN's own pace; 100 undoes the multiplier.
    mapper_lr_scale: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000
    recaptioner_warmup_steps: int = 0  # steps on real pairs only before the joint phase
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500  # 0 disables sample grids
    sample_captions: int = 8  # held-out captions in the grid (first of the eval split)
    samples_per_caption: int = 4
    ckpt_every: int = 500
    keep_last: int = 3
    eval_every: int = 0  # 0 disables periodic evaluation
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    ema_decay: float = 0.0  # EMA of the CA head + mapper used by samples/generate/eval; 0 = off
    # Seconds a rank waits for the others in a collective before the run fails (a peer stuck but alive,
    # or the link between nodes down); 0 = the backend's default (30 min gloo, 10 min NCCL). Must exceed
    # the longest one-rank pause: a sample grid, a periodic evaluation, a checkpoint write.
    dist_timeout_s: float = 0.0


@dataclass(frozen=True)
class WandbConfig:
    project: str = "t2f"
    entity: str = ""
    mode: str = "auto"  # auto (online when credentials exist, else offline) | online | offline | disabled


@dataclass(frozen=True)
class EvalConfig:  # `t2f eval` and the periodic evaluation (t2f/eval/evaluate.py)
    metrics: str = "fid,kid,lpips,diversity,bleu,clip_score,r_precision"  # comma list; toy shards add attributes,toy_fid
    protocol: str = "one"  # one: first caption of each test image | all: every caption | mmcelebahq: one random caption, 256px
    caption_seed: int = 0  # seeds the mmcelebahq protocol's caption draw (recorded beside every number)
    clip: str = ""  # CLIP with both towers for clip_score and r_precision; empty = text.encoder
    max_images: int = 0  # test images for `t2f eval`; 0 = the whole split
    subset: int = 500  # test images for the periodic evaluation during training
    batch_size: int = 16  # per process
    seed: int = 0
    truncation_psi: Optional[float] = None  # None = generator.truncation_psi
    resolution: int = 0  # compare at this size (generated images are resized); 0 = data.resolution
    inception: str = ""  # inception-2015-12-05.pt; empty = $T2F_CACHE, then clean-fid's /tmp
    lpips_alexnet: str = ""  # alexnet-owt-7be5be79.pth; empty = the torch hub cache
    lpips_linear: str = ""  # LPIPS v0.1 alex.pth; empty = the copy inside the lpips package
    stats_cache: str = ""  # real FID statistics; empty = $T2F_CACHE/fid_stats or ~/.cache/t2f/fid_stats
    toy_classifier: str = ""  # toy attribute classifier .safetensors; empty = the one shipped in t2f/toy/assets


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    recaptioner: RecaptionerConfig = field(default_factory=RecaptionerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------- loading


def load_config(preset: str, overrides=(), cls=Config):
    """Build a config from a preset name or YAML path plus `key.sub=value` overrides."""
    tree = _read_preset(preset, seen=())
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    return from_dict(cls, tree)


def from_dict(cls, tree: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from a nested dict, checking every key and type."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown key {prefix + unknown[0]!r} in {where}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in tree.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) for YAML, JSON and W&B."""
    return _plain(dataclasses.asdict(cfg))


def save_config(cfg, path) -> None:
    """Write the resolved config as YAML (the record that makes a run reproducible)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        f.flush()
        os.fsync(f.fileno())  # a crash after the rename must not leave an empty config.yaml
    os.replace(tmp, path)


def available_presets() -> list[str]:
    """The training presets in t2f/configs/: YAML files made of config sections. The Accelerate
    and DeepSpeed files beside them are not presets, whatever their names."""
    sections = {f.name for f in dataclasses.fields(Config)} | {"base"}
    names = []
    for path in PRESET_DIR.glob("*.yaml"):
        try:
            tree = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(tree, dict) and tree and set(tree) <= sections:
            names.append(path.stem)
    return sorted(names)


# ---------------------------------------------------------------------------- helpers


def _read_preset(preset: str, seen: tuple) -> dict:
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"config {preset!r} not found (looked for {path}); presets: {', '.join(available_presets())}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path}: top level must be a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    merged = _read_preset(str(base), seen + (path.resolve(),))
    _merge(merged, tree)
    return merged


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _parse_override(item: str):
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
    node[parts[-1]] = value


_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand_env(text: str, key: str) -> str:
    def sub(match):
        name, default = match.group(1), match.group(2)
        if name == "T2F_PKG" and name not in os.environ:
            return str(Path(__file__).parent)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{key}: environment variable {name} is not set (used as ${{{name}}})")

    return _ENV.sub(sub, text)


def _coerce(hint, value, key: str):
    """Check `value` against type `hint`; allow int -> float and list -> tuple."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(inner, value, key)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, str):
        return _expand_env(value, key)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r} ({type(value).__name__})")


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
