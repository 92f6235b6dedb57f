"""StyleGAN2 mapping + synthesis: shapes, NVlabs key names and semantics, fp16, truncation, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from t2f.models.generator import Generator, architecture, build_generator
from t2f.models.synthesis import conv2d_resample
from t2f.ops import setup_filter, upfirdn2d


def tiny_generator(resolution=64, channel_base=1024, channel_max=64, num_fp16_res=2, seed=0):
    torch.manual_seed(seed)
    G = Generator(z_dim=32, c_dim=0, w_dim=32, img_resolution=resolution, img_channels=3,
                  mapping_kwargs=dict(num_layers=4),
                  synthesis_kwargs=dict(channel_base=channel_base, channel_max=channel_max, num_fp16_res=num_fp16_res))
    with torch.no_grad():  # trained-looking weights: noise and biases matter, w_avg is not zero
        for name, p in G.named_parameters():
            if name.endswith(("noise_strength", "bias")):
                p.normal_(0, 0.1)
        G.mapping.w_avg.normal_()
    return G.eval()


@pytest.mark.parametrize("resolution, channel_base, channel_max", [(64, 1024, 64), (256, 1024, 32)])
def test_output_shapes_widths_and_num_ws(resolution, channel_base, channel_max):
    G = tiny_generator(resolution, channel_base, channel_max)
    assert G.num_ws == G.synthesis.num_ws == 2 * int(math.log2(resolution)) - 2
    widths = architecture(G)["channels"]
    assert widths == {str(r): min(channel_base // r, channel_max)
                      for r in [2**i for i in range(2, int(math.log2(resolution)) + 1)]}
    z = torch.randn(2, G.z_dim)
    ws = G.mapping(z)
    assert ws.shape == (2, G.num_ws, G.w_dim)
    img = G.synthesis(ws)
    assert img.shape == (2, 3, resolution, resolution) and img.dtype == torch.float32
    assert torch.isfinite(img).all() and img.std() > 0


def test_state_dict_uses_nvlabs_key_names():
    keys = set(tiny_generator().state_dict())
    expected = {
        "mapping.fc0.weight", "mapping.fc0.bias", "mapping.fc3.weight", "mapping.w_avg",
        "synthesis.b4.const", "synthesis.b4.resample_filter", "synthesis.b4.conv1.weight",
        "synthesis.b4.conv1.affine.weight", "synthesis.b4.conv1.affine.bias", "synthesis.b4.conv1.noise_const",
        "synthesis.b4.conv1.noise_strength", "synthesis.b4.conv1.bias", "synthesis.b4.torgb.weight",
        "synthesis.b8.conv0.affine.weight", "synthesis.b8.conv0.resample_filter", "synthesis.b8.torgb.weight",
        "synthesis.b8.torgb.affine.bias", "synthesis.b8.resample_filter", "synthesis.b64.conv1.noise_const",
    }
    assert expected <= keys
    assert not any(".conv0." in k for k in keys if k.startswith("synthesis.b4."))
    assert tiny_generator().state_dict()["synthesis.b64.conv1.noise_const"].shape == (64, 64)


def test_mapping_follows_equalised_learning_rate_semantics():
    G = tiny_generator()
    z = torch.randn(3, G.z_dim)
    x = z / z.square().mean(dim=1, keepdim=True).add(1e-8).sqrt()  # pixel norm
    for i in range(4):
        fc = getattr(G.mapping, f"fc{i}")
        pre = x @ (fc.weight * 0.01 / math.sqrt(fc.weight.shape[1])).t() + fc.bias * 0.01
        x = F.leaky_relu(pre, 0.2) * math.sqrt(2)
    ws = G.mapping(z)
    torch.testing.assert_close(ws, x.unsqueeze(1).expand(-1, G.num_ws, -1))


def test_fp16_blocks_are_finite_and_close_to_fp32():
    G = tiny_generator(num_fp16_res=2)
    ws = G.mapping(torch.randn(2, G.z_dim))
    seen = {}
    G.synthesis.b64.conv1.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    G.synthesis.fp16_on_cpu = True  # fp16 normally runs on CUDA only; force it to exercise the path on CPU
    img16 = G.synthesis(ws)
    assert seen["dtype"] == torch.float16  # the top resolutions really ran in half precision
    img32 = G.synthesis(ws, force_fp32=True)
    assert img16.dtype == torch.float32 and torch.isfinite(img16).all()
    assert (img16 - img32).abs().max() < 0.05 * img32.abs().max()
    G.synthesis.fp16_on_cpu = False
    torch.testing.assert_close(G.synthesis(ws), img32, rtol=0, atol=0)  # CPU default: fp32


def test_truncation_psi_zero_gives_the_w_avg_image():
    G = tiny_generator()
    images = G(torch.randn(3, G.z_dim), truncation_psi=0)
    expected = G.synthesis(G.mapping.w_avg.expand(3, G.num_ws, -1))
    torch.testing.assert_close(images, expected)
    torch.testing.assert_close(images[0], images[2])  # every z collapses onto the average face
    assert not torch.allclose(G(torch.randn(3, G.z_dim)), images)


def test_gradients_reach_w_while_the_generator_stays_frozen():
    G = tiny_generator().requires_grad_(False)
    G.synthesis.fp16_on_cpu = True  # the frozen fp16 path is what training uses on GPUs
    ws = G.mapping(torch.randn(2, G.z_dim)).detach().requires_grad_(True)
    G.synthesis(ws).square().mean().backward()
    assert ws.grad is not None and torch.isfinite(ws.grad).all() and ws.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in G.parameters())


def test_noise_modes():
    G = tiny_generator()
    ws = G.mapping(torch.randn(2, G.z_dim))
    const = G.synthesis(ws, noise_mode="const")
    torch.testing.assert_close(G.synthesis(ws, noise_mode="const"), const, rtol=0, atol=0)
    assert not torch.allclose(G.synthesis(ws, noise_mode="random"), const)
    assert not torch.allclose(G.synthesis(ws, noise_mode="none"), const)


def test_fused_and_unfused_modulated_convs_agree():
    G = tiny_generator()
    ws = G.mapping(torch.randn(3, G.z_dim))
    torch.testing.assert_close(G.synthesis(ws, fused_modconv=True), G.synthesis(ws, fused_modconv=False),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flip_weight", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_upsampling_conv_fast_path_matches_its_definition(flip_weight, groups):
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4 // groups, 3, 3)
    f = setup_filter([1, 3, 3, 1])
    fast = conv2d_resample(x, w, f, up=2, padding=1, groups=groups, flip_weight=flip_weight)
    up = upfirdn2d(x, f, up=2, padding=[3, 2, 3, 2], gain=4)  # zero-insert, FIR (pad = 1 + filter support)
    slow = F.conv2d(up, w if flip_weight else w.flip([2, 3]), groups=groups)
    assert fast.shape == (2, 6, 10, 10)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_update_emas_tracks_the_mean_w():
    G = tiny_generator()
    G.mapping.w_avg.zero_()
    z = torch.randn(8, G.z_dim)
    G.mapping(z, update_emas=True)
    expected = G.mapping(z)[:, 0].mean(dim=0) * (1 - G.mapping.w_avg_beta)
    torch.testing.assert_close(G.mapping.w_avg, expected)


def test_build_generator_inverts_architecture_and_rejects_inconsistent_records():
    G = tiny_generator()
    arch = architecture(G)
    assert build_generator(arch).state_dict().keys() == G.state_dict().keys()
    with pytest.raises(ValueError, match="num_ws"):
        build_generator({**arch, "num_ws": 99})
    with pytest.raises(ValueError, match="missing keys"):
        build_generator({k: v for k, v in arch.items() if k != "w_dim"})
