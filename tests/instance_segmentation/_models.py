"""Small SAMs for fast tests of the decoder and the segmenters."""
from functools import partial

import torch


def make_small_sam(seed: int = 0, img_size: int = 256):
    """A one-block SAM working at ``img_size`` (embeddings (1, 256, img_size/16, img_size/16)).

    The UNETR decoder then predicts at ``img_size`` instead of 1024, which makes a decoder pass ~16x cheaper.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    grid = img_size // 16
    encoder = ImageEncoderViT(
        depth=1, embed_dim=64, img_size=img_size, mlp_ratio=2, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=2, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(), window_size=8,
        out_chans=256,
    )
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=512, num_heads=8), transformer_dim=256, iou_head_depth=3,
            iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def make_small_predictor(seed: int = 0, img_size: int = 256, model_type: str = "vit_b"):
    from segment_anything import SamPredictor

    predictor = SamPredictor(make_small_sam(seed, img_size))
    predictor.model_type = model_type
    predictor.model_name = f"{model_type}_small"
    predictor._hash = f"xxh128:small{seed}"
    predictor.checkpoint_path = None
    return predictor
