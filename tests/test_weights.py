"""Checkpoint formats: NVlabs .pkl (read without running code), rosinality .pt, t2f safetensors, `t2f convert`."""

import argparse
import builtins
import collections
import io
import json
import math
import os
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from t2f.cli import main as cli_main
from t2f.config import GeneratorConfig
from t2f.models.generator import Generator, architecture, generator_from_config
from t2f.models.mapping import FullyConnectedLayer, MappingNetwork
from t2f.models.synthesis import SynthesisBlock, SynthesisLayer, SynthesisNetwork, ToRGBLayer
from t2f.models.weights import CheckpointError, detect_format, load_generator, save_generator

NVLABS_CLASS = {Generator: "Generator", MappingNetwork: "MappingNetwork", FullyConnectedLayer: "FullyConnectedLayer",
                SynthesisNetwork: "SynthesisNetwork", SynthesisBlock: "SynthesisBlock", SynthesisLayer: "SynthesisLayer",
                ToRGBLayer: "ToRGBLayer"}
INIT_KWARGS = dict(z_dim=16, c_dim=0, w_dim=16, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=2),
                   synthesis_kwargs=dict(channel_base=256, channel_max=32, num_fp16_res=1, conv_clamp=256))


def tiny_generator(seed=0):
    torch.manual_seed(seed)
    G = Generator(**INIT_KWARGS)
    with torch.no_grad():  # trained-looking weights, so every tensor influences the image
        for name, p in G.named_parameters():
            if name.endswith(("noise_strength", "bias")):
                p.normal_(0, 0.2)
        G.mapping.w_avg.normal_()
    return G.eval()


def same_image(G1, G2, seed=0):
    z = torch.randn(2, G1.z_dim, generator=torch.Generator().manual_seed(seed))
    ws = G1.mapping(z, truncation_psi=0.7)
    torch.testing.assert_close(G2.mapping(z, truncation_psi=0.7), ws, rtol=0, atol=0)
    torch.testing.assert_close(G2.synthesis(ws, noise_mode="const"), G1.synthesis(ws, noise_mode="const"), rtol=0, atol=0)


# ---------------------------------------------------------------------------- NVlabs-format pickles


@pytest.fixture
def nvlabs_modules(tmp_path, monkeypatch):
    """Stand-ins for NVlabs' `torch_utils.persistence` and `dnnlib` that leave a mark if anything calls them."""
    marker = tmp_path / "nvlabs_code_ran"

    def _reconstruct_persistent_obj(meta):
        marker.touch()

    class EasyDict(dict):
        pass

    for name, attrs in {"torch_utils": {},
                        "torch_utils.persistence": {"_reconstruct_persistent_obj": _reconstruct_persistent_obj},
                        "dnnlib": {}, "dnnlib.util": {"EasyDict": EasyDict}}.items():
        module = types.ModuleType(name)
        for attr, value in attrs.items():
            value.__module__, value.__qualname__ = name, attr
            setattr(module, attr, value)
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(marker=marker, reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)


class Persistent:
    """Pickles exactly like a torch_utils.persistence object: `_reconstruct_persistent_obj(meta)`."""

    def __init__(self, reconstruct, meta):
        self.reconstruct, self.meta = reconstruct, meta

    def __reduce__(self):
        return self.reconstruct, (self.meta,)


def as_record(module, fake, marker, init_kwargs=None):
    state = dict(module.__dict__)  # what NVlabs stores: the module's __dict__, children as records
    state["_modules"] = collections.OrderedDict((n, as_record(m, fake, marker)) for n, m in module._modules.items())
    state["_init_args"], state["_init_kwargs"] = (), fake.EasyDict(init_kwargs or {})
    source = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"  # would run if a loader exec'd module_src
    meta = dict(type="class", version=6, module_src=source, class_name=NVLABS_CLASS[type(module)], state=state)
    return Persistent(fake.reconstruct, meta)


def write_nvlabs_pickle(G, path, fake):
    kwargs = fake.EasyDict(INIT_KWARGS, mapping_kwargs=fake.EasyDict(INIT_KWARGS["mapping_kwargs"]),
                           synthesis_kwargs=fake.EasyDict(INIT_KWARGS["synthesis_kwargs"]))
    disc_state = dict(_parameters=collections.OrderedDict(w=torch.nn.Parameter(torch.randn(3))), _buffers={},
                      _modules={}, training=False, _init_args=(), _init_kwargs=fake.EasyDict(c_dim=0))
    disc = Persistent(fake.reconstruct,
                      dict(type="class", version=6, module_src="", class_name="Discriminator", state=disc_state))
    snapshot = dict(G=as_record(G, fake, fake.marker, kwargs), D=disc, G_ema=as_record(G, fake, fake.marker, kwargs),
                    augment_pipe=None, training_set_kwargs=fake.EasyDict(resolution=32))
    with open(path, "wb") as f:
        pickle.dump(snapshot, f)
    return path


def test_nvlabs_pickle_loads_strictly_without_running_its_code(tmp_path, nvlabs_modules):
    G = tiny_generator()
    path = write_nvlabs_pickle(G, tmp_path / "network-snapshot.pkl", nvlabs_modules)
    assert b"torch_utils.persistence" in path.read_bytes() and b"_reconstruct_persistent_obj" in path.read_bytes()
    assert detect_format(path) == "nvlabs_pkl"
    loaded = load_generator(path)  # the stand-in modules stay importable: a lax loader would call them
    assert not nvlabs_modules.marker.exists()
    assert architecture(loaded) == {**architecture(G), "w_avg_beta": 0.995}  # NVlabs' default when unrecorded
    same_image(G, loaded)
    with pytest.raises(AssertionError):
        same_image(tiny_generator(seed=1), loaded)  # the comparison can tell generators apart


class Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_pickle_with_a_malicious_global_is_refused_before_it_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = Payload(os.system, f"touch {marker}") if kind == "os.system" else \
        Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": payload}))
    with pytest.raises(CheckpointError) as info:
        load_generator(path)
    assert kind.split(".")[1] in str(info.value) and "refused as unsafe" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
    if kind == "builtins.exec":  # the payload is real: a plain pickle.load would have run it
        pickle.loads(path.read_bytes())
        assert marker.exists()


class HiddenStorage:
    """Pickles like an NVlabs-era tensor storage: `torch.storage._load_from_bytes(torch.save bytes)`."""

    def __init__(self, payload):
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        self.data = buffer.getvalue()

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.data,)


@pytest.mark.parametrize("where", ["nvlabs storage bytes", "rosinality zip", "rosinality legacy"])
def test_payload_in_a_weights_file_is_refused_in_one_line_without_unsafe_advice(tmp_path, capsys, where):
    marker = tmp_path / "pwned"
    payload = Payload(os.system, f"touch {marker}")
    path = tmp_path / ("evil.pkl" if where.startswith("nvlabs") else "evil.pt")
    if where.startswith("nvlabs"):
        path.write_bytes(pickle.dumps({"G_ema": HiddenStorage(payload)}))
    else:
        torch.save({"g_ema": payload}, path, _use_new_zipfile_serialization=where.endswith("zip"))
    with pytest.raises(CheckpointError) as info:
        load_generator(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused as unsafe") and "system" in message
    assert len(message.splitlines()) == 1 and "weights_only=False" not in message and "False" not in message
    assert cli_main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "refused as unsafe" in err and "Traceback" not in err
    assert not marker.exists()
    # The payload is real: the loading torch's own advice suggests would have run it.
    torch.load(path, weights_only=False) if path.suffix == ".pt" else pickle.loads(path.read_bytes())
    assert marker.exists()


# ---------------------------------------------------------------------------- rosinality .pt


def to_rosinality(G):
    """Our weights under rosinality stylegan2-pytorch's g_ema names and shapes, mapped independently
    of the loader (t2f/models/weights.py) by the stand-in writer."""
    from t2f.standins.stylegan import rosinality_generator

    return rosinality_generator(G)


@pytest.mark.parametrize("zipfile", [True, False])
def test_rosinality_checkpoint_loads_strictly_and_matches(tmp_path, zipfile):
    G = tiny_generator()
    path = tmp_path / "550000.pt"
    data = {"g_ema": to_rosinality(G), "latent_avg": G.mapping.w_avg.clone(), "args": argparse.Namespace(size=32)}
    torch.save(data, path, _use_new_zipfile_serialization=zipfile)
    assert detect_format(path) == "rosinality_pt"
    loaded = load_generator(path)
    assert architecture(loaded)["channels"] == architecture(G)["channels"]
    assert architecture(loaded)["conv_clamp"] is None  # rosinality trains in fp32 without clamping
    loaded.synthesis.set_precision(1, 256)  # give it G's precision to compare bit for bit
    same_image(G, loaded)


def _upfirdn2d(x, kernel, up=1, pad=(0, 0)):
    """rosinality's upfirdn2d_native (op/upfirdn2d.py) for down=1 and pads >= 0."""
    batch, channels, h, w = x.shape
    out = F.pad(x.reshape(-1, h, 1, w, 1, 1), [0, 0, 0, up - 1, 0, 0, 0, up - 1]).view(-1, h * up, w * up, 1)
    out = F.pad(out, [0, 0, pad[0], pad[1], pad[0], pad[1]])
    out = out.permute(0, 3, 1, 2).reshape(-1, 1, out.shape[1], out.shape[2])  # (B*C, 1, H', W')
    out = F.conv2d(out, torch.flip(kernel, [0, 1]).view(1, 1, *kernel.shape))
    return out.reshape(batch, channels, *out.shape[2:])


def _modulated_conv(sd, name, x, w, demodulate=True, upsample=False, nvlabs_order=False):
    """rosinality ModulatedConv2d.forward (fused): scale * weight * style, then demodulate. With
    nvlabs_order, the scale is left out where demodulation cancels it and folded into the styles
    elsewhere (toRGB), as NVlabs and t2f compute it."""
    weight = sd[f"{name}.weight"]  # (1, O, I, k, k)
    _, out_ch, in_ch, k, _ = weight.shape
    batch, gain = x.shape[0], 1 / math.sqrt(in_ch * k * k)
    style = F.linear(w, sd[f"{name}.modulation.weight"] * (1 / math.sqrt(w.shape[1])), bias=sd[f"{name}.modulation.bias"] * 1)
    style = style.view(batch, 1, in_ch, 1, 1)
    weight = gain * weight * style if not nvlabs_order else weight * style if demodulate else weight * (style * gain)
    if demodulate:
        weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8).view(batch, out_ch, 1, 1, 1)
    x = x.reshape(1, batch * in_ch, *x.shape[2:])
    if upsample:
        weight = weight.transpose(1, 2).reshape(batch * in_ch, out_ch, k, k)
        out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
        return _upfirdn2d(out.view(batch, out_ch, *out.shape[2:]), sd[f"{name}.blur.kernel"], pad=(1, 1))
    out = F.conv2d(x, weight.reshape(batch * out_ch, in_ch, k, k), padding=k // 2, groups=batch)
    return out.view(batch, out_ch, *out.shape[2:])


def rosinality_synthesis(sd, ws, nvlabs_order=False):
    """rosinality Generator.forward(ws, input_is_latent=True, randomize_noise=False) with its CPU
    ops, transcribed from its model.py (checked bit-exact against it outside the suite)."""
    def styled(name, x, w, noise, upsample=False):
        out = _modulated_conv(sd, f"{name}.conv", x, w, upsample=upsample, nvlabs_order=nvlabs_order)
        out = out + sd[f"{name}.noise.weight"] * noise
        return F.leaky_relu(out + sd[f"{name}.activate.bias"].view(1, -1, 1, 1), negative_slope=0.2) * 2**0.5

    def to_rgb(name, x, w, skip=None):
        out = _modulated_conv(sd, f"{name}.conv", x, w, demodulate=False, nvlabs_order=nvlabs_order) + sd[f"{name}.bias"]
        return out if skip is None else out + _upfirdn2d(skip, sd[f"{name}.upsample.kernel"], up=2, pad=(2, 1))

    noise = [sd[f"noises.noise_{i}"] for i in range(sum(k.startswith("noises.") for k in sd))]
    out = styled("conv1", sd["input.input"].repeat(ws.shape[0], 1, 1, 1), ws[:, 0], noise[0])
    skip = to_rgb("to_rgb1", out, ws[:, 1])
    for j in range(sum(k.startswith("to_rgbs.") and k.endswith(".conv.weight") for k in sd)):
        i = 2 * j + 1
        out = styled(f"convs.{2 * j}", out, ws[:, i], noise[i], upsample=True)
        out = styled(f"convs.{2 * j + 1}", out, ws[:, i + 1], noise[i + 1])
        skip = to_rgb(f"to_rgbs.{j}", out, ws[:, i + 2], skip)
    return skip


# Measured max |ours - rosinality| / max |image|: 3e-7 to 7e-7 on this tiny generator (six seeds),
# about 1e-6 on config-f 1024 (1.0e-5 to 1.4e-5 absolute): rounding from operation order alone.
ROSINALITY_RTOL = 2e-6


def test_rosinality_conversion_matches_rosinality_code(tmp_path):
    G = tiny_generator()
    sd = to_rosinality(G)
    torch.save({"g_ema": sd, "latent_avg": G.mapping.w_avg.clone()}, tmp_path / "g.pt")
    loaded = load_generator(tmp_path / "g.pt")
    z = torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ws = loaded.mapping(z, truncation_psi=0.7)
        ours, theirs = loaded.synthesis(ws, noise_mode="const"), rosinality_synthesis(sd, ws)
        other = rosinality_synthesis(to_rosinality(tiny_generator(seed=1)), ws)
        assert torch.equal(ours, rosinality_synthesis(sd, ws, nvlabs_order=True))  # order is the whole difference
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= ROSINALITY_RTOL * scale
    assert (other - theirs).abs().max() > 1e-2 * scale  # the comparison can tell generators apart


def test_rosinality_checkpoint_without_latent_avg_estimates_it(tmp_path):
    G = tiny_generator()
    torch.save({"g_ema": to_rosinality(G)}, tmp_path / "g.pt")
    with pytest.warns(UserWarning, match="latent_avg"):
        loaded = load_generator(tmp_path / "g.pt")
    expected = G.mapping(torch.randn(10000, G.z_dim))[:, 0].mean(dim=0)
    torch.testing.assert_close(loaded.mapping.w_avg, expected, atol=0.05, rtol=0.05)


# ---------------------------------------------------------------------------- t2f format, errors, CLI


def test_t2f_safetensors_round_trip(tmp_path):
    G = tiny_generator()
    weights, sidecar = save_generator(G, tmp_path / "gen")
    assert (weights.name, sidecar.name) == ("gen.safetensors", "gen.json")
    record = json.loads(sidecar.read_text())
    assert record["format"] == "t2f-generator" and record["architecture"]["num_ws"] == G.num_ws
    assert detect_format(weights) == "t2f"
    same_image(G, load_generator(weights))
    sidecar.unlink()  # the architecture is also embedded in the safetensors metadata
    same_image(G, load_generator(weights))


def test_safetensors_whose_header_length_looks_like_a_pickle_marker_is_still_read_as_safetensors(tmp_path):
    """The first byte of a safetensors file is the low byte of its header's length: 0x80 for one header
    length in 256 (found when a wider toy generator would not load: "unsupported pickle protocol")."""
    import safetensors.torch

    G = tiny_generator()
    weights, _ = save_generator(G, tmp_path / "gen")
    tensors = safetensors.torch.load_file(str(weights))
    for pad in range(0, 2048, 8):  # headers are padded to 8 bytes, so every ninth try or so hits 0x..80
        path = tmp_path / "padded.safetensors"
        safetensors.torch.save_file(tensors, str(path), metadata={"t2f": json.dumps({"format": "t2f-generator",
                                    "version": 1, "architecture": architecture(G)}), "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length whose low byte is 0x80")
    assert detect_format(path) == "t2f"
    same_image(G, load_generator(path))


def test_damaged_files_give_clear_errors(tmp_path, nvlabs_modules):
    pkl = write_nvlabs_pickle(tiny_generator(), tmp_path / "net.pkl", nvlabs_modules)
    weights, _ = save_generator(tiny_generator(), tmp_path / "gen.safetensors")
    cases = {"truncated.pkl": pkl.read_bytes()[: pkl.stat().st_size // 2],
             "truncated.safetensors": weights.read_bytes()[:-100],
             "noise.bin": os.urandom(64), "empty.pkl": b"", "list.pkl": pickle.dumps([1, 2])}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match=name):
            load_generator(tmp_path / name)
    with pytest.raises(CheckpointError, match="no such file"):
        load_generator(tmp_path / "missing.pkl")
    assert not nvlabs_modules.marker.exists()


def test_convert_command_round_trip(tmp_path, nvlabs_modules, capsys):
    G = tiny_generator()
    src = write_nvlabs_pickle(G, tmp_path / "ffhq.pkl", nvlabs_modules)
    assert cli_main(["convert", str(src), str(tmp_path / "out" / "ffhq")]) == 0
    printed = capsys.readouterr().out
    assert "nvlabs_pkl" in printed and f"num_ws         {G.num_ws}" in printed and "4:32, 8:32, 16:16, 32:8" in printed
    same_image(G, load_generator(tmp_path / "out" / "ffhq.safetensors"))

    (tmp_path / "broken.pkl").write_bytes(src.read_bytes()[:1000])
    assert cli_main(["convert", str(tmp_path / "broken.pkl"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "broken.pkl" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["convert", "--help"])
    assert exit_info.value.code == 0 and "rosinality" in capsys.readouterr().out


def test_generator_from_config(tmp_path):
    G = tiny_generator()
    save_generator(G, tmp_path / "gen")
    cfg = GeneratorConfig(checkpoint=str(tmp_path / "gen.safetensors"), num_fp16_res=0, conv_clamp=None, impl="ref")
    with pytest.warns(UserWarning, match="resolution=1024"):
        loaded = generator_from_config(cfg)
    arch = architecture(loaded)
    assert arch["img_resolution"] == 32 and (arch["num_fp16_res"], arch["conv_clamp"]) == (0, None)
    assert loaded.synthesis.b32.conv1.impl == "ref"
    fresh = generator_from_config(GeneratorConfig(resolution=16, z_dim=8, w_dim=8, channel_base=64, channel_max=8,
                                                  mapping_layers=2))
    assert fresh(torch.randn(1, 8)).shape == (1, 3, 16, 16) and fresh.num_ws == 6


def test_rosinality_keys_without_a_counterpart_are_reported(tmp_path):
    sd = to_rosinality(tiny_generator())
    sd["convs.0.conv.extra_gate"] = torch.zeros(3)
    torch.save({"g_ema": sd, "latent_avg": torch.zeros(16)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd\.pt.*extra_gate"):
        load_generator(tmp_path / "odd.pt")
