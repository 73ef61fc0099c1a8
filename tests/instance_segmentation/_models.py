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


class _StubImageEncoder(torch.nn.Module):
    def __init__(self, img_size: int):
        super().__init__()
        self.img_size = img_size

    def forward(self, x):
        return torch.ones(x.shape[0], 256, self.img_size // 16, self.img_size // 16, device=x.device)


class _StubPromptEncoder(torch.nn.Module):
    def forward(self, points, boxes, masks):
        coords, _ = points
        return coords.float(), None

    def get_dense_pe(self):
        return None


class _StubMaskDecoder(torch.nn.Module):
    """Per point prompt: three low-res logit maps derived from a label image (see :class:`StubSam`)."""

    def __init__(self, sam):
        super().__init__()
        self.sam = sam

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output):
        logits, ious = self.sam.predict_low_res(sparse_prompt_embeddings[:, 0], image_embeddings)
        if not multimask_output:  # the single-mask output: the object itself
            return logits[:, :1], ious[:, :1]
        return logits, ious


class StubSam(torch.nn.Module):
    """A stand-in for ``Sam`` whose mask decoder "segments" the object of a known label image under each point.

    For a point on object ``k`` the three multimask outputs are the logits ``sdf_k`` (the object),
    ``sdf_k + 3 * slope`` (the object grown by 3 low-res pixels) and ``sdf_fg`` (all objects), where ``sdf`` is the
    signed distance to the boundary in low-res pixels (positive inside) times ``slope``; their predicted IoUs are
    ``ious``. For a point on background all three are the background's sdf with ``background_ious``.
    With ``tiling=(tile_shape, halo)`` the label image of the tile whose id is stored in the embeddings
    (``features[0, 0, 0, 0]``, see :func:`tiled_embeddings_with_ids`) is used. ``hits`` logs the label under
    each prompt.
    """

    mask_threshold = 0.0
    image_format = "RGB"

    def __init__(self, labels, img_size: int = 1024, slope: float = 20.0, ious=(0.96, 0.85, 0.8),
                 background_ious=(0.5, 0.5, 0.5), tiling=None):
        import numpy as np

        from micro_sam import _tiling

        super().__init__()
        self.image_encoder = _StubImageEncoder(img_size)
        self.prompt_encoder = _StubPromptEncoder()
        self.mask_decoder = _StubMaskDecoder(self)
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1))
        self.slope, self.ious, self.background_ious = slope, ious, background_ious
        self.hits = []
        labels = np.asarray(labels)
        if tiling is None:
            self.targets = {None: self._target(labels)}
        else:
            self.targets = {tile.tile_id: self._target(labels[tile.outer])
                            for tile in _tiling.iterate_tiles(labels.shape, *tiling)}
        self.input_hw = self.targets[next(iter(self.targets))][3]

    @property
    def device(self):
        return self.pixel_mean.device

    def _target(self, labels):
        import numpy as np
        from scipy import ndimage
        from segment_anything.utils.transforms import ResizeLongestSide

        size = self.image_encoder.img_size
        h, w = ResizeLongestSide.get_preprocess_shape(labels.shape[0], labels.shape[1], size)
        low = size // 4
        # The label at each low-res pixel centre (mapped back into the labels), 0 in the padding.
        ys = ((np.arange(low) + 0.5) * 4 * labels.shape[0] / h).astype(int)
        xs = ((np.arange(low) + 0.5) * 4 * labels.shape[1] / w).astype(int)
        inside = (ys[:, None] < labels.shape[0]) & (xs[None, :] < labels.shape[1])
        grid = np.zeros((low, low), dtype=labels.dtype)
        grid[inside] = labels[np.minimum(ys, labels.shape[0] - 1)[:, None],
                              np.minimum(xs, labels.shape[1] - 1)[None, :]][inside]

        def sdf(mask):
            dist = ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)
            return torch.from_numpy((dist * self.slope).astype("float32"))

        sdfs = {int(k): sdf(grid == k) for k in np.unique(grid)}
        return grid, sdfs, sdf(grid > 0), (h, w)

    def predict_low_res(self, coords, image_embeddings=None):
        key = None
        if None not in self.targets:
            key = int(round(float(image_embeddings[0, 0, 0, 0])))
        grid, sdfs, foreground, _ = self.targets[key]
        low = grid.shape[0]
        logits, ious = [], []
        for x, y in coords.tolist():
            k = int(grid[min(max(int(y / 4), 0), low - 1), min(max(int(x / 4), 0), low - 1)])
            self.hits.append(k)
            if k == 0:
                logits.append(torch.stack([sdfs[0]] * 3))
                ious.append(torch.tensor(self.background_ious))
            else:
                logits.append(torch.stack([sdfs[k], sdfs[k] + 3 * self.slope, foreground]))
                ious.append(torch.tensor(self.ious))
        return torch.stack(logits).to(self.device), torch.stack(ious).float().to(self.device)

    def preprocess(self, x):
        import torch.nn.functional as F
        size = self.image_encoder.img_size
        x = x.float()
        return F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))

    def postprocess_masks(self, masks, input_size, original_size):
        import torch.nn.functional as F
        size = self.image_encoder.img_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)


def make_stub_predictor(labels, img_size: int = 1024, **kwargs):
    """A ``SamPredictor`` around :class:`StubSam` and matching (dummy) precomputed embeddings."""
    from segment_anything import SamPredictor

    sam = StubSam(labels, img_size=img_size, **kwargs)
    predictor = SamPredictor(sam)
    predictor.model_type, predictor.model_name, predictor._hash = "vit_b", "vit_b_stub", "xxh128:stub"
    predictor.checkpoint_path = None
    grid = img_size // 16
    embeddings = {"features": torch.zeros(1, 256, grid, grid).numpy(), "input_size": sam.input_hw,
                  "original_size": tuple(labels.shape[:2])}
    return predictor, embeddings


class StubDecoder(torch.nn.Module):
    """A stand-in for the AIS decoder that returns given maps (3, H, W) of the full image.

    With ``tiling=(tile_shape, halo)`` it returns the maps of the tile whose id is stored in the embeddings
    (``features[0, 0, 0, 0]``, see :func:`tiled_embeddings_with_ids`). With ``by_slice`` the maps are
    (3, Z, H, W): ``by_slice="features"`` reads the slice index from the embeddings the same way,
    ``by_slice="calls"`` assumes the slices are predicted in order 0, 1, ... (and repeats).
    """

    def __init__(self, maps, tiling=None, by_slice=False, encoder_img_size=None):
        super().__init__()
        self.maps = torch.as_tensor(maps, dtype=torch.float32)
        self.tiling, self.by_slice = tiling, by_slice
        if encoder_img_size is not None:
            self.encoder_img_size = encoder_img_size
        self.calls = 0

    def forward(self, input_, input_shape, original_shape):
        from micro_sam import _tiling

        self.calls += 1
        maps = self.maps
        key = int(round(float(input_[0, 0, 0, 0])))
        if self.by_slice == "calls":
            maps = maps[:, (self.calls - 1) % maps.shape[1]]
        elif self.by_slice:
            maps = maps[:, key]
        if self.tiling is not None:
            tile = _tiling.get_tile(key, tuple(maps.shape[1:]), *self.tiling)
            maps = maps[(slice(None),) + tile.outer]
        assert tuple(maps.shape[1:]) == tuple(original_shape), (maps.shape, original_shape)
        return maps[None].clone()


def tiled_embeddings_with_ids(shape, tile_shape, halo, img_size=1024, n_slices=None):
    """Tiled embeddings in micro_sam's layout (in-memory zarr) whose features hold their tile id (or, for
    ``n_slices``, 3D tiled embeddings whose features hold the tile id as well)."""
    import numpy as np
    import zarr
    from segment_anything.utils.transforms import ResizeLongestSide

    from micro_sam import _tiling

    root = zarr.group(store=zarr.storage.MemoryStore())
    features = root.create_group("features")
    features.attrs.update({"shape": list(shape), "tile_shape": list(tile_shape), "halo": list(halo)})
    grid = img_size // 16
    for tile in _tiling.iterate_tiles(shape, tile_shape, halo):
        hw = tuple(s.stop - s.start for s in tile.outer)
        lead = (1,) if n_slices is None else (n_slices, 1)
        array = features.create_array(str(tile.tile_id), shape=lead + (256, grid, grid), dtype="float32")
        array[...] = np.full(lead + (256, grid, grid), tile.tile_id, dtype="float32")
        array.attrs.update({"original_size": list(hw),
                            "input_size": list(ResizeLongestSide.get_preprocess_shape(hw[0], hw[1], img_size))})
    return {"features": features, "input_size": None, "original_size": None}
