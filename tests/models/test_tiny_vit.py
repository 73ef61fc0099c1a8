import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from micro_sam.models import TinyViT, sam_model_registry
from micro_sam.models._testing import deterministic_fill_, deterministic_image
from micro_sam.models.attention import Attention, Conv2d_BN, relative_offset_index

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
# vit_t settings at a smaller input size: stages at 64, 32, 16, 16 pixels, so all windowed stages pad.
SMALL = dict(
    img_size=256, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7], drop_path_rate=0.0,
)


@pytest.fixture(scope="module")
def vit_t_encoder():
    return deterministic_fill_(sam_model_registry["vit_t"]().image_encoder).eval()


def test_relative_offset_index_2x2():
    idxs, n = relative_offset_index((2, 2))
    # positions (0,0), (0,1), (1,0), (1,1); offsets numbered (0,0)=0, (0,1)=1, (1,0)=2, (1,1)=3
    expected = [[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]]
    assert n == 4
    assert idxs.tolist() == expected


def _explicit_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    # float64 reference: per head the projection holds [query, key, value] channels one after another
    x = x.double()
    p = {k: v.double() for k, v in attn.state_dict().items() if v.is_floating_point()}
    b, n, c = x.shape
    h, kd = attn.num_heads, attn.key_dim
    x = F.layer_norm(x, (c,), p["norm.weight"], p["norm.bias"])
    qkv = (x @ p["qkv.weight"].T + p["qkv.bias"]).view(b, n, h, 3 * kd)
    q, k, v = (qkv[..., i * kd:(i + 1) * kd].transpose(1, 2) for i in range(3))
    bias = p["attention_biases"][:, attn.attention_bias_idxs]
    weights = torch.softmax(q @ k.transpose(-1, -2) / kd ** 0.5 + bias, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, h * kd)
    return out @ p["proj.weight"].T + p["proj.bias"]


def test_attention_matches_explicit_softmax():
    attn = deterministic_fill_(Attention(dim=12, key_dim=4, num_heads=3, attn_ratio=1, resolution=(3, 3)))
    x = deterministic_image((2, 9, 12), seed=5)
    expected = _explicit_attention(attn, x)
    attn.train()
    torch.testing.assert_close(attn(x).double(), expected, rtol=0, atol=1e-5)
    attn.eval()
    with torch.no_grad():
        torch.testing.assert_close(attn(x).double(), expected, rtol=0, atol=1e-5)
        # the cached bias follows in-place parameter updates
        attn.attention_biases.mul_(-2.0)
        torch.testing.assert_close(attn(x).double(), _explicit_attention(attn, x), rtol=0, atol=1e-5)


def test_conv2d_bn_eval_folding_follows_updates():
    layer = deterministic_fill_(Conv2d_BN(4, 6, kernel_size=3, padding=1)).eval()
    x = deterministic_image((2, 4, 5, 5), seed=3)

    def explicit():
        bn = layer.bn
        y = F.conv2d(x.double(), layer.c.weight.double(), padding=1)
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double()
        return (y - bn.running_mean.double()[:, None, None]) * scale[:, None, None] + bn.bias.double()[:, None, None]

    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), explicit(), rtol=0, atol=1e-5)
        layer.bn.running_var.mul_(4.0)
        torch.testing.assert_close(layer(x).double(), explicit(), rtol=0, atol=1e-5)
        state = {k: v * 0.5 if v.is_floating_point() else v for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
        torch.testing.assert_close(layer(x).double(), explicit(), rtol=0, atol=1e-5)
    # with gradients the folding is differentiable
    out = layer(x)
    out.sum().backward()
    assert layer.c.weight.grad is not None and layer.bn.weight.grad is not None


def test_vit_t_fingerprint_matches_mobile_sam(vit_t_encoder):
    # The fixture was computed with MobileSAM's encoder (scripts/make_tiny_vit_fixture.py).
    ref = np.load(os.path.join(DATA, "tiny_vit_fingerprint.npz"))
    with torch.no_grad():
        out = vit_t_encoder(deterministic_image((1, 3, 1024, 1024))).numpy()
    assert out.shape == tuple(ref["shape"]) == (1, 256, 64, 64)
    assert np.abs(out[0, :16, ::8, ::8] - ref["slice"]).max() <= 1e-4
    assert out.mean(dtype=np.float64) == pytest.approx(float(ref["mean"]), abs=1e-5)
    assert out.std(dtype=np.float64) == pytest.approx(float(ref["std"]), rel=1e-5)


def test_fast_inference_path_equals_autograd_path():
    model = deterministic_fill_(TinyViT(**SMALL)).eval()
    x = deterministic_image((2, 3, 256, 256), seed=11)
    with torch.no_grad():
        fast = model(x)
    with torch.inference_mode():
        in_inference_mode = model(x)
    # With gradients every cache and in-place shortcut is bypassed.
    slow = model(x.clone().requires_grad_(True))
    assert fast.shape == (2, 256, 16, 16)
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(fast, in_inference_mode, rtol=0, atol=0)
    # the two images of the batch are encoded independently
    with torch.no_grad():
        torch.testing.assert_close(model(x[1:]), fast[1:], rtol=0, atol=2e-5)


def test_cast_to_double_rebuilds_caches():
    model = deterministic_fill_(TinyViT(**SMALL)).eval()
    x = deterministic_image((1, 3, 256, 256), seed=2)
    with torch.no_grad():
        single = model(x)
        double = model.double()(x.double())
    assert double.dtype == torch.float64
    torch.testing.assert_close(single.double(), double, rtol=0, atol=2e-5)


def test_train_mode_gradients_reach_every_used_parameter():
    model = deterministic_fill_(TinyViT(**SMALL)).train()
    x = deterministic_image((2, 3, 256, 256), seed=4)
    out = model(x)
    assert int(model.layers[0].blocks[0].conv1.bn.num_batches_tracked) == 1
    (out * torch.linspace(-1.0, 1.0, out.numel()).view_as(out)).sum().backward()
    unused = {"norm_head.weight", "norm_head.bias", "head.weight", "head.bias"}  # classification head
    for name, param in model.named_parameters():
        if name in unused:
            assert param.grad is None
            continue
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, name


def test_wrong_input_size_raises():
    model = TinyViT(**SMALL).eval()
    with pytest.raises(ValueError, match="256"):
        model(torch.zeros(1, 3, 128, 128))


def test_forward_stages_compose_to_the_full_forward():
    model = deterministic_fill_(TinyViT(**SMALL)).eval()
    x = deterministic_image((1, 3, 256, 256), seed=5)
    with torch.no_grad():
        full = model(x)
        assert len(model.stages) == 5
        for k in range(len(model.stages) + 1):
            head = model.forward_stages(x, 0, k)
            torch.testing.assert_close(model.forward_stages(head, k), full, rtol=0, atol=2e-5)
        assert model.forward_stages(x, 0, 2).shape == (1, 32 * 32, 128)  # tokens after the first layer
    with pytest.raises(ValueError, match="5 stages"):
        model.forward_stages(x, 3, 2)
