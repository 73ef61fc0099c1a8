"""A cheap, exact stand-in for a SAM model with an AIS decoder, for the dask tests.

The image encoder packs the (resized, 512 x 512) first image channel losslessly into the (256, 32, 32)
embedding (pixel unshuffle); the decoder unpacks it, resizes it back to the tile and derives foreground, centre
and boundary distance maps from the bright connected components. Through the real embedding, tiling and AIS
code, the segmentation is then: every bright blob that the segmented region contains is one object. A real
model does the same with learned maps; this one costs milliseconds and its answer is known.

Workers import this module by name (``segmenter_factory=make_oracle``): multiprocessing's spawn passes the
test process's ``sys.path`` to the workers.
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

IMG_SIZE = 512
CALLS = [0]      # decoder calls in this process (one per segmented tile or block)


class _PackingEncoder(torch.nn.Module):
    img_size = IMG_SIZE

    def forward(self, x):
        # (B, 256, 32, 32): the whole first channel, + 1 (all-zero embeddings mean "not computed" to micro_sam)
        return F.pixel_unshuffle(x[:, :1], 16) + 1.0


class OracleSam(torch.nn.Module):
    """Only what ``SamPredictor`` and the embedding code use."""

    image_format = "RGB"
    mask_threshold = 0.0

    def __init__(self):
        super().__init__()
        self.image_encoder = _PackingEncoder()
        self.register_buffer("pixel_mean", torch.zeros(3, 1, 1))
        self.register_buffer("pixel_std", torch.ones(3, 1, 1))

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess(self, x):
        x = (x.float() - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, IMG_SIZE - x.shape[-1], 0, IMG_SIZE - x.shape[-2]))


def blob_maps(image: np.ndarray, threshold: float = 127.5) -> np.ndarray:
    """(3, H, W) foreground, centre and boundary distance maps of the bright blobs of a (H, W) image."""
    foreground = image > threshold
    labels, n = ndimage.label(foreground)
    distance = ndimage.distance_transform_edt(foreground)
    peak = np.zeros(n + 1)
    if n:
        peak[1:] = ndimage.maximum(distance, labels, np.arange(1, n + 1))
    normalised = np.where(foreground, 1.0 - distance / np.maximum(peak[labels], 1e-6), 1.0)
    return np.stack([foreground.astype("float32"), normalised, normalised]).astype("float32")


class OracleDecoder(torch.nn.Module):
    encoder_img_size = IMG_SIZE

    delay = 0.0
    blur = 0.0   # sigma of a blur at the model's input scale: the maps then depend on the tile size (as a real
                 # model's do, which sees small tiles magnified)

    def forward(self, features, input_size, original_size):
        import time

        CALLS[0] += 1
        time.sleep(self.delay)
        image = F.pixel_shuffle(features - 1.0, 16)[:, :, :input_size[0], :input_size[1]]
        if self.blur:
            image = torch.from_numpy(ndimage.gaussian_filter(image.numpy(), (0, 0, self.blur, self.blur)))
        image = F.interpolate(image, tuple(original_size), mode="bilinear", align_corners=False)
        return torch.from_numpy(blob_maps(image[0, 0].numpy()))[None]


def make_oracle(is_tiled: bool = False, delay: float = 0.0, blur: float = 0.0):
    """``segmenter_factory`` for ``micro_sam.distributed``: (predictor, AIS segmenter)."""
    from segment_anything import SamPredictor

    from micro_sam.instance_segmentation import get_instance_segmentation_generator

    predictor = SamPredictor(OracleSam())
    predictor.model_type, predictor.model_name, predictor._hash = "vit_b", "oracle", "xxh128:oracle"
    predictor.checkpoint_path = None
    decoder = OracleDecoder()
    decoder.delay, decoder.blur = delay, blur
    segmenter = get_instance_segmentation_generator(predictor, is_tiled=is_tiled, decoder=decoder,
                                                    segmentation_mode="ais")
    return predictor, segmenter


def make_scale_sensitive_oracle(is_tiled: bool = False):
    """The oracle with outlines that depend on the tile size (a blur of 12 pixels at its 512 pixel input scale):
    a tile laid out differently gives other maps near the blobs' borders."""
    return make_oracle(is_tiled, blur=12.0)


def make_slow_oracle(is_tiled: bool = False):
    """The oracle taking 0.4 s more per block (to interrupt a run in the middle)."""
    return make_oracle(is_tiled, delay=0.4)


def decoder_calls() -> int:
    """:data:`CALLS` of this process (run on the workers with ``client.run``)."""
    return CALLS[0]


def executing_tasks(dask_worker) -> int:
    """Tasks running on a worker (``client.run(executing_tasks)``)."""
    return dask_worker.state.executing_count


def blob_image(shape, blobs, seed=0):
    """A uint8 image of bright ellipsoidal blobs (value 150..250, texture) on a black background, and the labels.

    Args:
        shape: (Y, X) or (Z, Y, X).
        blobs: ``(center, radii)`` per blob; blobs must not touch.
    """
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    labels = np.zeros(shape, dtype="uint32")
    image = np.zeros(shape, dtype="uint8")
    for i, (center, radii) in enumerate(blobs, start=1):
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1
        labels[inside] = i
        image[inside] = rng.integers(200, 251)
    return image, labels


def random_blobs(shape, n, radius_range=(8, 20), gap=4, seed=0):
    """``n`` (or fewer) non-touching random blobs (at least ``gap`` pixels apart) for :func:`blob_image`."""
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(50 * n):
        if len(blobs) == n:
            break
        radii = tuple(float(rng.uniform(*radius_range)) for _ in shape)
        center = tuple(float(rng.uniform(r, s - r)) for r, s in zip(radii, shape))
        if all(np.linalg.norm(np.subtract(center, c)) > max(radii) + max(r) + gap for c, r in blobs):
            blobs.append((center, radii))
    return blobs
