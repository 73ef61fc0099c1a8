"""The fast mask decoder computes segment_anything's MaskDecoder.forward (same weights) up to float rounding."""
import numpy as np
import pytest
import torch

from micro_sam.models import fast_mask_decoder as fmd
from micro_sam.models.build_sam import build_sam_vit_t


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    model = build_sam_vit_t(image_size=512).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _prompts(sam, n, seed, masks=False, boxes=False):
    g = torch.Generator().manual_seed(seed)
    size = sam.prompt_encoder.input_image_size[0]
    points = (torch.rand(n, 2, 2, generator=g) * size, torch.tensor([[1, 0]] * n))
    box = None
    if boxes:
        corner = torch.rand(n, 2, generator=g) * size / 2
        box = torch.cat([corner, corner + size / 4], dim=1)
    mask = torch.randn(n, 1, 4 * sam.prompt_encoder.image_embedding_size[0],
                       4 * sam.prompt_encoder.image_embedding_size[1], generator=g) if masks else None
    with torch.no_grad():
        return sam.prompt_encoder(points=points, boxes=box, masks=mask)


def _features(sam, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, 256) + tuple(sam.prompt_encoder.image_embedding_size), generator=g)


def _compare(ours, ref):
    (masks, iou), (ref_masks, ref_iou) = ours, ref
    assert masks.shape == ref_masks.shape and iou.shape == ref_iou.shape
    scale = float(ref_masks.abs().max())
    torch.testing.assert_close(masks, ref_masks, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(iou, ref_iou, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,multimask,masks,boxes", [
    (1, True, False, False), (1, False, False, False), (6, True, False, True), (3, False, True, False),
    (4, True, True, True),
])
def test_equals_mask_decoder(sam, n, multimask, masks, boxes):
    sparse, dense = _prompts(sam, n, seed=n, masks=masks, boxes=boxes)
    features, pe = _features(sam, 1), sam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        ref = sam.mask_decoder(features, pe, sparse, dense, multimask)
        for _ in range(2):  # the second call uses the cached first block
            _compare(fmd.decode_masks(sam.mask_decoder, features, pe, sparse, dense, multimask), ref)
    assert fmd.supports_fast_decoding(sam.mask_decoder)


def test_cache_follows_embeddings_and_weights(sam):
    sparse, dense = _prompts(sam, 2, seed=3)
    pe = sam.prompt_encoder.get_dense_pe()
    decoder = sam.mask_decoder
    features = _features(sam, 2)

    def check(feats):
        with torch.no_grad():
            _compare(fmd.decode_masks(decoder, feats, pe, sparse, dense, True), decoder(feats, pe, sparse, dense, True))

    check(features)
    features.mul_(-1.5)  # the same tensor, changed in place
    check(features)
    check(_features(sam, 5))  # another tensor
    check(features.clone())  # equal values in a new tensor: served from the cache, still correct
    layer = decoder.transformer.layers[0].cross_attn_token_to_image
    original = layer.k_proj.weight.clone()
    try:
        with torch.no_grad():
            layer.k_proj.weight.mul_(2.0)  # a weight update invalidates the cache
        check(features)
    finally:
        with torch.no_grad():
            layer.k_proj.weight.copy_(original)
    check(features)
    with torch.inference_mode():  # inference tensors have no version counter
        inference_features = _features(sam, 2)
        check(inference_features)
        check(inference_features)


def _grads(decode, model, features, pe, sparse, dense, multimask, seed):
    """Gradients of a random linear function of both outputs w.r.t. every decoder weight and every input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (features, sparse, dense)]
    model.zero_grad(set_to_none=True)
    masks, iou = decode(model.mask_decoder, inputs[0], pe, inputs[1], inputs[2], multimask)
    g = torch.Generator().manual_seed(seed)
    loss = (masks * torch.randn(masks.shape, generator=g)).sum() + (iou * torch.randn(iou.shape, generator=g)).sum()
    loss.backward()
    grads = {name: p.grad for name, p in model.mask_decoder.named_parameters()}
    grads.update(features=inputs[0].grad, sparse=inputs[1].grad, dense=inputs[2].grad)
    return (masks.detach(), iou.detach()), grads


@pytest.mark.parametrize("multimask,masks", [(True, False), (False, True)])
def test_gradients_equal_the_modules(multimask, masks):
    """Training runs the fast path under autograd: outputs and gradients (of the weights, the embedding and the
    prompt embeddings) equal the module's; the key bias, which cancels in the softmax, gets a zero gradient."""
    torch.manual_seed(1)
    model = build_sam_vit_t(image_size=256)
    sparse, dense = _prompts(model, 3, seed=0, masks=masks)
    features, pe = _features(model, 0), model.prompt_encoder.get_dense_pe()
    ours, grads = _grads(fmd.decode_masks, model, features, pe, sparse, dense, multimask, seed=4)
    assert ours[0].requires_grad is False and not fmd._FIRST_BLOCK_CACHE.get(model.mask_decoder)
    ref, ref_grads = _grads(lambda dec, *a: dec(*a), model, features, pe, sparse, dense, multimask, seed=4)
    _compare(ours, ref)
    assert set(grads) == set(ref_grads)
    for name, ref_grad in ref_grads.items():
        if ref_grad is None:  # unused by this output (e.g. the multimask tokens for a single mask)
            assert grads[name] is None or not grads[name].any(), name
            continue
        assert grads[name] is not None, name
        scale = float(ref_grad.abs().max())
        torch.testing.assert_close(grads[name], ref_grad, rtol=0, atol=1e-4 * scale + 1e-6, msg=name)


def test_unknown_layouts_fall_back():
    class Stub(torch.nn.Module):
        def forward(self, *args):
            return "called"

    assert not fmd.supports_fast_decoding(Stub())
    assert fmd.decode_masks(Stub(), None, None, None, None, True) == "called"


def test_predict_torch_equals_sam_predictor(sam):
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    rng = np.random.default_rng(0)
    image = (rng.random((300, 200, 3)) * 255).astype("uint8")
    predictor.set_image(image)
    coords = torch.as_tensor(predictor.transform.apply_coords(np.array([[[50.0, 60.0]], [[120.0, 200.0]]]),
                                                              image.shape[:2]), dtype=torch.float32)
    labels = torch.ones(2, 1, dtype=torch.int64)
    with torch.no_grad():
        ref = predictor.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    ours = fmd.predict_torch(predictor, coords, labels, multimask_output=True, return_logits=True)
    _compare(ours[1:], ref[1:])
    scale = float(ref[0].abs().max())
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-5 * scale)

    class Custom(SamPredictor):
        def predict_torch(self, *args, **kwargs):
            return "overridden"

    assert fmd.predict_torch(Custom(sam), coords, labels) == "overridden"
    with pytest.raises(RuntimeError, match="Set an image"):
        fmd.predict_torch(SamPredictor(sam), coords, labels)


@pytest.mark.parametrize("masks", [False, True])
def test_large_batches_are_decoded_in_chunks(sam, monkeypatch, masks):
    monkeypatch.setattr(fmd, "_CHUNK_ELEMENTS", 2 * 256 * 32 * 32)  # 2 prompts per chunk
    sparse, dense = _prompts(sam, 5, seed=11, masks=masks, boxes=True)
    features, pe = _features(sam, 4), sam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        _compare(fmd.decode_masks(sam.mask_decoder, features, pe, sparse, dense, True),
                 sam.mask_decoder(features, pe, sparse, dense, True))


@pytest.mark.parametrize("input_size,original_size", [
    ((512, 512), (256, 256)), ((341, 512), (200, 300)), ((512, 384), (1000, 750)), ((512, 512), (1100, 1100)),
])
def test_upscale_masks_equals_postprocess_masks(sam, input_size, original_size):
    low_res = torch.randn(3, 2, 128, 128, generator=torch.Generator().manual_seed(0)) * 5
    with torch.no_grad():
        ours = fmd.upscale_masks(sam, low_res, input_size, original_size)
        ref = sam.postprocess_masks(low_res, input_size, original_size)
    assert ours.shape == ref.shape == (3, 2) + original_size
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_dense_pe_cache_follows_weight_changes():
    torch.manual_seed(2)
    model = build_sam_vit_t(image_size=256)
    first = fmd.dense_pe(model.prompt_encoder)
    assert fmd.dense_pe(model.prompt_encoder) is first
    with torch.no_grad():
        model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(2)
    second = fmd.dense_pe(model.prompt_encoder)
    torch.testing.assert_close(second, model.prompt_encoder.get_dense_pe())
    assert not torch.equal(first, second)


def test_forward_hooks_on_decoder_layers_are_honoured(sam):
    """A hook on a layer the fast path folds away (here the first block's cross attention) must still run."""
    decoder = sam.mask_decoder
    embeddings = torch.randn(1, 256, 32, 32, generator=torch.Generator().manual_seed(7))
    sparse, dense = sam.prompt_encoder(points=(torch.tensor([[[100.0, 200.0]]]), torch.ones(1, 1)), boxes=None,
                                       masks=None)
    args = (embeddings, sam.prompt_encoder.get_dense_pe(), sparse, dense, True)
    seen = []
    handle = decoder.transformer.layers[0].cross_attn_token_to_image.register_forward_hook(
        lambda module, inputs, output: seen.append(output.shape))
    try:
        with torch.no_grad():
            masks, iou = fmd.decode_masks(decoder, *args)
            expected = decoder(*args)
    finally:
        handle.remove()
    assert seen == [(1, 7, 256), (1, 7, 256)]  # the fast call and the reference call both ran the hook
    torch.testing.assert_close(masks, expected[0])
    torch.testing.assert_close(iou, expected[1])
