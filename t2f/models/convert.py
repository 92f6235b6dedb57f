"""`t2f convert SRC DST`: turn a StyleGAN2 checkpoint into t2f's safetensors + JSON format.

Reads an NVlabs .pkl (without running any code stored in it), a rosinality .pt or a t2f
checkpoint, writes DST.safetensors + DST.json and prints the architecture it found.
"""

import argparse
import sys

DESCRIPTION = """\
Convert a StyleGAN2 generator checkpoint to t2f's format.

Formats read (detected from the file's contents, not its name):
  NVlabs .pkl    stylegan2-ada-pytorch / stylegan3 network pickles (e.g. stylegan2-ffhq-config-f.pkl);
                 G_ema is used. Read with a restricted unpickler that never imports or runs the
                 source code these pickles embed; any unexpected global is refused.
  rosinality .pt stylegan2-pytorch checkpoints (g_ema + latent_avg), read with
                 torch.load(weights_only=True); keys are renamed to NVlabs' layout.
  t2f            NAME.safetensors + NAME.json (re-saving normalises it).

Written: DST.safetensors (G_ema state dict, NVlabs key names) and DST.json (architecture).
See docs/CHECKPOINTS.md for details and where to get FFHQ weights."""


def describe(arch: dict) -> str:
    """Human-readable summary of an architecture dict."""
    widths = ", ".join(f"{res}:{ch}" for res, ch in arch["channels"].items())
    fp16 = f"fp16 in top {arch['num_fp16_res']} resolutions" if arch["num_fp16_res"] else "fp32 everywhere"
    return "\n".join([
        f"  resolution     {arch['img_resolution']}x{arch['img_resolution']}, {arch['img_channels']} channels",
        f"  z_dim / w_dim  {arch['z_dim']} / {arch['w_dim']} (c_dim {arch['c_dim']})",
        f"  num_ws         {arch['num_ws']}",
        f"  mapping        {arch['mapping_layers']} layers, lr multiplier {arch['mapping_lr_multiplier']}",
        f"  widths         {widths}  (channel_base {arch['channel_base']}, channel_max {arch['channel_max']})",
        f"  precision      {fp16}, conv_clamp {arch['conv_clamp']}",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="t2f convert", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint to read (.pkl, .pt or .safetensors)")
    parser.add_argument("dst", help="output name: writes DST.safetensors and DST.json (a .safetensors suffix is optional)")
    args = parser.parse_args(argv)

    from t2f.models.generator import architecture
    from t2f.models.weights import CheckpointError, detect_format, load_generator, save_generator

    try:
        fmt = detect_format(args.src)
        print(f"reading {args.src} ({fmt})")
        G = load_generator(args.src, device="cpu")
    except CheckpointError as error:
        print(f"t2f convert: {error}", file=sys.stderr)
        return 2
    try:
        weights_path, json_path = save_generator(G, args.dst)
    except OSError as error:
        print(f"t2f convert: cannot write {args.dst}: {error}", file=sys.stderr)
        return 2
    print("architecture:\n" + describe(architecture(G)))
    print(f"wrote {weights_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
