"""TrainableSAM(gradient_checkpointing=True): the same embeddings and gradients, blocks recomputed in backward."""
import copy

import pytest
import torch

from micro_sam.models.peft_sam import PEFT_Sam
from micro_sam.training import TrainableSAM, frozen_parts_to_eval

from .test_peft_sam import small_vit_sam, small_vit_t_sam

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gradients(sam, checkpointing):
    torch.manual_seed(3)
    model = TrainableSAM(copy.deepcopy(sam), gradient_checkpointing=checkpointing).train()
    frozen_parts_to_eval(model)
    image = torch.randint(0, 256, (3, 256, 256), generator=torch.Generator().manual_seed(0)).float()
    embeddings, _ = model.image_embeddings_oft([{"image": image, "original_size": (256, 256)}])
    (embeddings ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return embeddings.detach(), grads


@pytest.mark.parametrize("family,peft", [("vit", {"rank": 2}), ("vit", None), ("vit_t", {"rank": 2}),
                                         ("vit_t", None)])
def test_same_embeddings_and_gradients(family, peft):
    sam = (small_vit_sam if family == "vit" else small_vit_t_sam)()
    if peft:
        sam = PEFT_Sam(sam, **peft).sam
    if peft:
        with torch.no_grad():
            for name, parameter in sam.named_parameters():
                if "w_b_linear" in name:
                    parameter.normal_(0, 0.1)
    expected, expected_grads = _gradients(sam, False)
    embeddings, grads = _gradients(sam, True)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=1e-4)
    assert set(grads) == set(expected_grads) and any(n.startswith("sam.image_encoder") for n in grads)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-3, msg=name)


def test_blocks_run_again_in_the_backward_pass():
    sam = PEFT_Sam(small_vit_sam(), rank=2).sam
    model = TrainableSAM(sam, gradient_checkpointing=True).train()
    calls = []
    for block in sam.image_encoder.blocks:  # counted in forward itself: the recomputation skips module hooks
        def counted(x, forward=block.forward):
            calls.append(1)
            return forward(x)
        block.forward = counted
    image = torch.zeros(3, 256, 256)
    embeddings, _ = model.image_embeddings_oft([{"image": image, "original_size": (256, 256)}])
    assert len(calls) == 2
    embeddings.sum().backward()
    assert len(calls) == 4  # each block recomputed once
    with torch.no_grad():  # no recomputation without gradients
        model.image_embeddings_oft([{"image": image, "original_size": (256, 256)}])
    assert len(calls) == 6
