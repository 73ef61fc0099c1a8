"""Small SAM models and synthetic data for fast training tests."""
from functools import partial

import numpy as np
import torch


def small_sam(seed: int = 0, img_size: int = 256, dim: int = 256):
    """A one-block, 64-dim ViT SAM for ``img_size`` inputs: embeddings (B, dim, img_size/16, img_size/16).

    Everything downstream (mask decoder tokens, low-res masks, the UNETR decoder) shrinks with the input size,
    so a training iteration at 256 is roughly 16x cheaper than at SAM's 1024. ``dim`` is the width of the
    embeddings, prompt encoder and mask decoder (SAM: 256); smaller is faster still.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    grid = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size, patch_size=16, embed_dim=64, depth=1, num_heads=2, mlp_ratio=2, out_chans=dim,
            qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=8,
            global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=dim,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2 * dim, num_heads=8),
        ),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )
    return sam


def small_unetr(image_encoder, initial_features: int = 8):
    """micro_sam's UNETR configuration around ``image_encoder``, with a narrow decoder (fast)."""
    from torch_em.model import UNETR

    return UNETR(backbone="sam", encoder=image_encoder, out_channels=3, use_sam_stats=True,
                 final_activation="Sigmoid", use_skip_connection=False, resize_input=True,
                 initial_features=initial_features)


def disk_images(n: int, shape=(128, 128), n_objects: int = 6, seed: int = 0, radius=(7, 12)):
    """Bright, non-overlapping disks on a dark noisy background, with their instance labels (ids 1..n_objects)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for _ in range(n):
        label = np.zeros(shape, dtype="uint32")
        placed, attempts = 0, 0
        while placed < n_objects:
            attempts += 1
            if attempts > 10000:
                raise ValueError(f"Cannot place {n_objects} disks of radius {radius} in an image of shape {shape}.")
            r = rng.uniform(*radius)
            cy, cx = rng.uniform(r + 2, shape[0] - r - 2), rng.uniform(r + 2, shape[1] - r - 2)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
            grown = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 3) ** 2
            if label[grown].any():
                continue
            placed += 1
            label[disk] = placed
        image = 30 + 170 * (label > 0) + rng.normal(0, 10, shape)
        images.append(np.clip(image, 0, 255).astype("uint8"))
        labels.append(label)
    return images, labels
