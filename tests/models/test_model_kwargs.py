"""build_sam's num_multimask_outputs / image_size, get_sam_model's model_kwargs and flexible loading."""
import warnings

import pytest
import torch

from micro_sam.models.build_sam import build_sam, build_sam_vit_h, resize_position_tables

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_build_sam_is_vit_h_and_checks_its_arguments():
    assert build_sam is build_sam_vit_h
    with pytest.raises(ValueError, match="num_multimask_outputs must be a positive integer"):
        build_sam(num_multimask_outputs=0)
    with pytest.raises(ValueError, match="image_size must be a multiple of 16"):
        build_sam(image_size=500)


def test_resize_position_tables_to_another_grid():
    ramp = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 8, 8, 4)  # x coordinate, 8 x 8 grid
    state = {"image_encoder.pos_embed": ramp, "image_encoder.blocks.1.attn.rel_pos_h": torch.ones(15, 2),
             "image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(27, 2), "other": torch.zeros(3)}
    own = {"image_encoder.pos_embed": torch.zeros(1, 4, 4, 4), "image_encoder.blocks.1.attn.rel_pos_h":
           torch.zeros(7, 2), "image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(27, 2), "other": torch.zeros(3)}
    resized = resize_position_tables(state, own)
    assert resized["image_encoder.pos_embed"].shape == (1, 4, 4, 4)
    # a linear ramp halved in resolution: pixel centres 0.5, 2.5, 4.5, 6.5 (interior exact for bicubic)
    assert torch.allclose(resized["image_encoder.pos_embed"][0, 2, 1:3, 0], torch.tensor([2.5, 4.5]), atol=1e-5)
    assert torch.equal(resized["image_encoder.blocks.1.attn.rel_pos_h"], torch.ones(7, 2))
    assert resized["image_encoder.blocks.0.attn.rel_pos_h"] is state["image_encoder.blocks.0.attn.rel_pos_h"]
    assert resized["other"] is state["other"]


def test_get_sam_model_with_model_kwargs(vit_t_checkpoint):
    from micro_sam.util import get_sam_model

    with pytest.raises(ValueError, match=r"Unknown SAM construction parameters \['depth'\]; supported: "
                                         "num_multimask_outputs, image_size"):
        get_sam_model("vit_t", checkpoint_path=vit_t_checkpoint, depth=3)
    with pytest.raises(RuntimeError, match="does not match the model"):
        get_sam_model("vit_t", checkpoint_path=vit_t_checkpoint, device="cpu", num_multimask_outputs=5)
    checkpoint = torch.load(vit_t_checkpoint, weights_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, sam = get_sam_model("vit_t", checkpoint_path=vit_t_checkpoint, device="cpu", num_multimask_outputs=5,
                               image_size=256, flexible_load_checkpoint=True, return_sam=True)
    message = " ".join(str(w.message) for w in caught)
    assert "do not fit the model and keep their initial values" in message and "mask_tokens" in message
    assert sam.mask_decoder.num_mask_tokens == 6 and sam.image_encoder.img_size == 256
    own = sam.state_dict()
    fitting = [k for k, v in checkpoint.items() if own[k].shape == v.shape]
    assert len(fitting) > 0.95 * len(checkpoint)
    assert all(torch.equal(own[k], checkpoint[k]) for k in fitting)
    with torch.no_grad():
        low_res, iou = sam.mask_decoder(
            sam.image_encoder(torch.zeros(1, 3, 256, 256)), sam.prompt_encoder.get_dense_pe(),
            *sam.prompt_encoder(None, None, None), multimask_output=True,
        )
    assert low_res.shape == (1, 5, 64, 64) and iou.shape == (1, 5)
