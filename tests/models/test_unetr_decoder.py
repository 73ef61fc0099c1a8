"""The torch_em-free AIS decoder network equals torch_em's UNETR decoder: same parameter names, same maps."""
import pytest
import torch

from micro_sam.instance_segmentation.decoder import DecoderAdapter, get_decoder, get_unetr


@pytest.fixture(scope="module")
def encoder():
    from conftest import make_tiny_sam

    return make_tiny_sam().image_encoder


@pytest.mark.parametrize("conv_transpose", [False, True])
def test_same_parameters_and_maps_as_torch_em(encoder, conv_transpose):
    from torch_em.model import UNETR

    torch.manual_seed(1)
    reference = UNETR(backbone="sam", encoder=encoder, out_channels=3, use_sam_stats=True,
                      final_activation="Sigmoid", use_skip_connection=False, use_conv_transpose=conv_transpose)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    decoder_state = {k: v for k, v in reference.state_dict().items() if not k.startswith("encoder.")}

    ours = get_decoder(encoder, decoder_state, device="cpu")
    assert type(ours.deconv1).__module__ == "micro_sam.models.unetr_decoder"
    assert sorted(ours.state_dict()) == sorted(decoder_state)
    theirs = DecoderAdapter(get_unetr(encoder, decoder_state, device="cpu")).eval()
    embeddings = torch.randn(2, 256, 8, 8)
    for batch_statistics in (True, False):
        ours.use_batch_statistics = theirs.use_batch_statistics = batch_statistics
        with torch.no_grad():
            expected = theirs(embeddings, (100, 128), (90, 115))
            torch.testing.assert_close(ours(embeddings, (100, 128), (90, 115)), expected, rtol=0, atol=1e-6)
            # The plain module path too (a forward hook turns the lean path of micro_sam.models.lean_unetr off).
            hooks = [m.out_conv.register_forward_hook(lambda *args: None) for m in (ours, theirs)]
            torch.testing.assert_close(ours(embeddings, (100, 128), (90, 115)),
                                       theirs(embeddings, (100, 128), (90, 115)), rtol=0, atol=1e-6)
            for hook in hooks:
                hook.remove()
    assert expected.shape == (2, 3, 90, 115)
