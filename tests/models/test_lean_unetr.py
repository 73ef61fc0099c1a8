"""The lean UNETR decoder computes torch_em's UNETR decoder (same weights) up to float rounding."""
import pytest
import torch
from torch import nn

import micro_sam.instance_segmentation.decoder as decoder_module
from micro_sam.instance_segmentation import get_decoder, get_unetr
from micro_sam.models import lean_unetr
from micro_sam.models.build_sam import build_sam_vit_t


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    encoder = build_sam_vit_t(image_size=256).image_encoder
    unetr = get_unetr(encoder, device="cpu")
    state = {k: v for k, v in unetr.state_dict().items() if not k.startswith("encoder.")}
    g = torch.Generator().manual_seed(1)
    for key, value in state.items():  # non-trivial running statistics and affine parameters
        if key.endswith(("running_mean", "bias")):
            state[key] = torch.randn(value.shape, generator=g) * 0.1
        elif key.endswith("running_var") or key.endswith("weight") and value.ndim == 1:  # batch norms
            state[key] = torch.rand(value.shape, generator=g) + 0.5
    return get_decoder(encoder, state, "cpu")


def _module_maps(adapter, embeddings, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(decoder_module, "maybe_decode", lambda *args: None)
        return adapter._decode(embeddings)


@pytest.mark.parametrize("batch,batch_statistics", [(1, True), (2, True), (1, False)])
def test_equals_module(adapter, monkeypatch, batch, batch_statistics):
    assert lean_unetr.supports_lean_decoding(adapter)
    embeddings = torch.randn(batch, 256, 16, 16, generator=torch.Generator().manual_seed(batch))
    adapter.use_batch_statistics = batch_statistics
    try:
        with torch.no_grad():
            context = decoder_module._batch_statistics(adapter) if batch_statistics else torch.no_grad()
            with context:
                ours = lean_unetr.decode(adapter, embeddings)
                ref = _module_maps(adapter, embeddings, monkeypatch)
            via_forward = adapter(embeddings, (256, 256), (256, 256))  # the adapter takes the lean path
    finally:
        adapter.use_batch_statistics = True
    assert ours.shape == ref.shape == (batch, 3, 256, 256)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(via_forward, ref, rtol=0, atol=1e-5)
    assert not torch.equal(ours[0], torch.full_like(ours[0], float(ours[0].flatten()[0])))  # not constant


def test_gradients_and_other_layouts_use_the_module(adapter, monkeypatch):
    embeddings = torch.randn(1, 256, 16, 16, requires_grad=True)
    assert lean_unetr.maybe_decode(adapter, embeddings) is None  # autograd needs the module's graph
    out = adapter(embeddings, (256, 256), (256, 256))
    out.sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0

    norm = adapter.decoder_head.block[0]
    adapter.decoder_head.block[0] = nn.GroupNorm(8, norm.num_features)  # a layout the lean path does not know
    try:
        assert not lean_unetr.supports_lean_decoding(adapter)
        with torch.no_grad():
            maps = adapter(embeddings.detach(), (256, 256), (256, 256))
            with decoder_module._batch_statistics(adapter):
                ref = _module_maps(adapter, embeddings.detach(), monkeypatch)
        torch.testing.assert_close(maps, ref, rtol=0, atol=1e-6)
    finally:
        adapter.decoder_head.block[0] = norm


def test_forward_hooks_use_the_module(adapter):
    seen = []
    embeddings = torch.randn(1, 256, 16, 16)
    handle = adapter.deconv4.register_forward_hook(lambda module, inputs, output: seen.append(output.shape[1:]))
    try:
        with torch.no_grad():
            assert lean_unetr.maybe_decode(adapter, embeddings) is None
            adapter(embeddings, (256, 256), (256, 256))
    finally:
        handle.remove()
    assert len(seen) == 1  # deconv4 ran as a module, so its hook saw its output
    with torch.no_grad():
        assert lean_unetr.maybe_decode(adapter, embeddings) is not None  # hook removed: the lean path again


def test_full_resolution_convs_other_than_3x3_use_the_module(adapter, monkeypatch):
    """The full-resolution convolutions run in chunks of rows, which needs torch_em's 3x3 / padding 1."""
    conv = adapter.decoder_head.block[4]
    adapter.decoder_head.block[4] = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=5, padding=2)
    try:
        assert not lean_unetr.supports_lean_decoding(adapter)
        embeddings = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            maps = adapter(embeddings, (256, 256), (256, 256))
            with decoder_module._batch_statistics(adapter):
                ref = _module_maps(adapter, embeddings, monkeypatch)
        torch.testing.assert_close(maps, ref, rtol=0, atol=1e-6)
    finally:
        adapter.decoder_head.block[4] = conv
    assert lean_unetr.supports_lean_decoding(adapter)


@pytest.mark.parametrize("height,rows", [(17, 5), (16, 4), (9, 64), (2, 1)])
def test_row_chunks_equal_whole_operations(height, rows):
    g = torch.Generator().manual_seed(height)
    x = torch.randn(2, 3, height, 7, generator=g)
    weight, bias = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    up = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    for r0, r1 in [(0, 2 * height), (0, 1), (3, 2 * height - 1), (2 * height - 2, 2 * height)]:
        if r1 > r0:
            torch.testing.assert_close(lean_unetr._interp_rows(x, r0, r1), up[:, :, r0:r1], rtol=0, atol=1e-6)
    out = torch.full((2, 4, 2 * height, 14), float("nan"))
    lean_unetr._conv_rows(lambda lo, hi: lean_unetr._interp_rows(x, lo, hi), 2 * height, weight, bias,
                          lambda r0, r1, chunk: out[:, :, r0:r1].copy_(chunk), rows=rows)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(up, weight, bias, padding=1), rtol=0, atol=1e-5)
