"""The optimised ViT encoder attention: same features and gradients as segment_anything's, same weights."""
import copy
import pickle
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling import image_encoder as sa_encoder

from micro_sam.models import fast_attention
from micro_sam.models.fast_attention import FastAttention, FastBlock, is_optimized, optimize_sam, restore_sam

from conftest import make_tiny_sam


def _randomize_rel_pos(module, seed=0):
    """segment_anything initialises the relative position tables with zeros; make them matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "rel_pos" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return module


def _reduced_vit_b(img_size=512, depth=2, global_attn_indexes=(1,)):
    """vit_b's width and heads (768 channels, 12 heads, 14x14 windows) with fewer blocks and a smaller image.

    At 512x512 the token grid is 32x32: the window blocks pad it to 42x42, the global block attends over 1024 tokens.
    """
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        depth=depth, embed_dim=768, img_size=img_size, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=12, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn_indexes,
        window_size=14, out_chans=256,
    )
    return _randomize_rel_pos(encoder).eval()


def _max_abs_diff(a, b):
    return (a - b).abs().max().item()


def test_tiny_sam_features_equal_and_weights_untouched():
    sam = _randomize_rel_pos(make_tiny_sam(seed=3))
    reference = copy.deepcopy(sam)
    state_before = {k: v.clone() for k, v in sam.state_dict().items()}
    assert optimize_sam(sam) is sam
    assert is_optimized(sam) and not is_optimized(reference)
    state_after = sam.state_dict()
    assert list(state_after) == list(state_before)
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert all(isinstance(m, sa_encoder.Attention) for m in sam.modules() if isinstance(m, FastAttention))

    x = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.image_encoder(x)
        actual = sam.image_encoder(x)
    assert expected.shape == (2, 256, 64, 64)
    assert _max_abs_diff(actual, expected) <= 1e-4


@pytest.mark.parametrize("chunk_elements", [1 << 25, 1 << 18, 300_000])
def test_reduced_vit_b_with_global_attention_equal(chunk_elements, monkeypatch):
    # Small chunk sizes force the row-chunked global attention (1 << 18: 1 row per chunk, 300000: uneven chunks).
    monkeypatch.setattr(FastAttention, "chunk_elements", chunk_elements)
    encoder = _reduced_vit_b()
    reference = copy.deepcopy(encoder)
    fast_attention.optimize_image_encoder(encoder)
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = reference(x)
        actual = encoder(x)
    assert _max_abs_diff(actual, expected) <= 1e-4


@pytest.mark.parametrize("mlp_chunk_elements", [1 << 22, 3072 * 100 + 7, 1])
def test_fast_block_equal_and_input_untouched(mlp_chunk_elements, monkeypatch):
    # The MLP in one chunk, in uneven chunks of 100 tokens, and token by token; window (padded) and global blocks.
    monkeypatch.setattr(fast_attention, "_MLP_CHUNK_ELEMENTS", mlp_chunk_elements)
    encoder = _reduced_vit_b(img_size=256, global_attn_indexes=(1,))
    reference = copy.deepcopy(encoder)
    fast_attention.optimize_image_encoder(encoder)
    assert [type(b) for b in encoder.blocks] == [FastBlock, FastBlock]
    tokens = torch.randn(2, 16, 16, 768, generator=torch.Generator().manual_seed(3))
    permuted = tokens.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # a channels-first tensor's view
    before = tokens.clone()
    with torch.no_grad():
        for block, expected_block in zip(encoder.blocks, reference.blocks):
            expected = expected_block(tokens)
            for x in (tokens, permuted):
                actual = block(x)
                assert actual.is_contiguous() and actual.shape == expected.shape
                assert _max_abs_diff(actual, expected) <= 1e-4
    assert torch.equal(tokens, before)


def test_fast_block_falls_back_under_autocast_hooks_and_autograd():
    encoder = _reduced_vit_b(img_size=256, depth=1, global_attn_indexes=())
    fast_attention.optimize_image_encoder(encoder)
    block = encoder.blocks[0]
    x = torch.randn(1, 16, 16, 768, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(block(x), sa_encoder.Block.forward(block, x))  # the original block forward
    seen = []
    handle = block.mlp.lin2.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        hooked = block(x)
    handle.remove()
    assert seen == [(1, 16, 16, 768)]  # the original forward ran: it calls mlp.lin2 as a module
    with torch.no_grad():
        assert _max_abs_diff(block(x), hooked) <= 1e-4
    out = encoder.blocks[0](x.requires_grad_())
    out.sum().backward()
    assert out.grad_fn is not None and x.grad is not None


def test_rows_per_chunk():
    # 12 heads, 64x64 grid, 4096 keys: one row holds 12 * 64 * 4096 = 3145728 bias entries.
    per_row = 12 * 64 * 4096
    assert fast_attention._rows_per_chunk(12, 64, 64, 4096, 64 * per_row) == 64
    assert fast_attention._rows_per_chunk(12, 64, 64, 4096, per_row) == 1
    assert fast_attention._rows_per_chunk(12, 64, 64, 4096, 1) == 1
    # 10 rows fit: 7 chunks are needed, spread evenly as 10 rows each (the last one 4).
    assert fast_attention._rows_per_chunk(12, 64, 64, 4096, 10 * per_row + 5) == 10
    # 40 rows fit: 2 chunks of 32 instead of 40 + 24.
    assert fast_attention._rows_per_chunk(12, 64, 64, 4096, 40 * per_row) == 32


def test_decomposed_attention_matches_explicit_formula():
    # A 3x5 grid, 2 heads, 4 channels: the explicit softmax(scale q k^T + bias) v with the bias built entry by entry.
    g = torch.Generator().manual_seed(0)
    h, w, c, heads = 3, 5, 4, 2
    q, k, v = (torch.randn(1, heads, h * w, c, generator=g) for _ in range(3))
    rel_pos_h, rel_pos_w = torch.randn(2 * h - 1, c, generator=g), torch.randn(2 * w - 1, c, generator=g)
    scale = 0.3
    bias = torch.zeros(1, heads, h * w, h * w)
    for i in range(h * w):
        for j in range(h * w):
            qh, qw, kh, kw = i // w, i % w, j // w, j % w
            bias[0, :, i, j] = q[0, :, i] @ rel_pos_h[qh - kh + h - 1] + q[0, :, i] @ rel_pos_w[qw - kw + w - 1]
    expected = torch.softmax(scale * q @ k.transpose(-1, -2) + bias, dim=-1) @ v
    for chunk in (1 << 20, 1):
        actual = fast_attention.decomposed_attention(q, k, v, (h, w), rel_pos_h, rel_pos_w, scale, chunk)
        assert _max_abs_diff(actual, expected) <= 1e-5
    # Without relative positions: plain attention.
    plain = fast_attention.decomposed_attention(q, k, v, (h, w), None, None, scale)
    assert _max_abs_diff(plain, torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v) <= 1e-5


@pytest.mark.parametrize("chunk_elements", [1 << 25, 300_000])
def test_gradients_match_in_training(chunk_elements, monkeypatch):
    monkeypatch.setattr(FastAttention, "chunk_elements", chunk_elements)
    encoder = _reduced_vit_b(img_size=256, global_attn_indexes=(0,)).train()
    reference = copy.deepcopy(encoder)
    fast_attention.optimize_image_encoder(encoder)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(5))
    (reference(x) * weights).sum().backward()
    (encoder(x) * weights).sum().backward()
    ref_grads = dict(reference.named_parameters())
    n_checked = 0
    for name, param in encoder.named_parameters():
        expected = ref_grads[name].grad
        assert param.grad is not None, name
        scale = expected.abs().max().item()
        assert scale > 0, name
        assert _max_abs_diff(param.grad, expected) <= 1e-4 * max(scale, 1.0), name
        n_checked += 1
    assert n_checked == len(ref_grads)
    assert any("rel_pos" in name for name in ref_grads)


def test_optimize_twice_restore_copy_and_pickle():
    sam = _randomize_rel_pos(make_tiny_sam(seed=1))
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = sam.image_encoder(x)
    optimize_sam(optimize_sam(sam))
    n_fast = sum(type(m) is FastAttention for m in sam.modules())
    assert n_fast == 1 and sum(type(m) is FastBlock for m in sam.modules()) == 1
    clone = copy.deepcopy(sam)
    loaded = pickle.loads(pickle.dumps(sam))
    assert is_optimized(clone) and is_optimized(loaded)
    with torch.no_grad():
        for model in (clone, loaded):
            assert _max_abs_diff(model.image_encoder(x), expected) <= 1e-4
    restore_sam(sam)
    assert not is_optimized(sam)
    assert all(type(m) is sa_encoder.Attention for m in sam.modules() if isinstance(m, sa_encoder.Attention))
    assert all(type(m) is sa_encoder.Block for m in sam.modules() if isinstance(m, sa_encoder.Block))


def test_vit_t_is_left_unchanged():
    from micro_sam.models.build_sam import sam_model_registry

    sam = sam_model_registry["vit_t"]()
    classes = [type(m) for m in sam.modules()]
    optimize_sam(sam)
    assert [type(m) for m in sam.modules()] == classes
    assert not is_optimized(sam)


def test_attention_dtype_context():
    sam = _randomize_rel_pos(make_tiny_sam(seed=2))
    optimize_sam(sam)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = sam.image_encoder(x)
        with fast_attention.attention_dtype(torch.bfloat16):
            reduced = sam.image_encoder(x)
        again = sam.image_encoder(x)
    assert reduced.dtype == torch.float32
    assert torch.equal(again, full)  # the context does not leak
    assert not torch.equal(reduced, full)  # the attention really ran in bfloat16
    relative = ((reduced - full).abs().mean() / full.abs().mean()).item()
    assert relative < 0.01


@pytest.mark.slow
def test_full_vit_b_features_equal():
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = _randomize_rel_pos(sam_model_registry["vit_b"]().eval())
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = sam.image_encoder(x)
        optimize_sam(sam)
        actual = sam.image_encoder(x)
    assert _max_abs_diff(actual, expected) <= 1e-4
    assert np.isfinite(actual.numpy()).all()
