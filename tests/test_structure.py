"""micro_sam._structure: is there anything in an image beyond noise (the gate before automatic segmentation)."""
import numpy as np
import pytest

from micro_sam._structure import has_signal, noise_significance, noise_threshold


def _disc(shape, centre, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_thresholds():
    assert noise_threshold((64, 64)) == noise_threshold((2000, 3000)) == 12.0
    assert noise_threshold((16, 16)) == pytest.approx(48.0)  # 4 times fewer pixels per axis: 4 times higher
    assert noise_threshold((32, 32)) == pytest.approx(24.0)


@pytest.mark.parametrize("value,dtype", [(0, "uint8"), (1000, "uint16"), (0.37, "float32"), (-5.5, "float64")])
def test_no_contrast(value, dtype):
    image = np.full((40, 50), value, dtype=dtype)
    assert noise_significance(image) == 0.0 and not has_signal(image)
    assert not has_signal(np.zeros((30, 30, 3), dtype=dtype))


NOISE = {
    "poisson 3 uint16": lambda rng, shape: rng.poisson(3, shape).astype("uint16"),
    "sparse counts 0.05": lambda rng, shape: rng.poisson(0.05, shape).astype("uint8"),
    "gaussian float32": lambda rng, shape: (10 + 0.05 * rng.standard_normal(shape)).astype("float32"),
    "camera uint16": lambda rng, shape: (100 + 2 * (rng.poisson(0.5, shape) + 1.5 * rng.standard_normal(shape))
                                         ).astype("uint16"),
    "bright uint8": lambda rng, shape: np.clip(20 + rng.poisson(100, shape) + 8 * rng.standard_normal(shape),
                                               0, 255).astype("uint8"),
}


@pytest.mark.parametrize("kind", list(NOISE))
@pytest.mark.parametrize("shape", [(16, 16), (24, 300), (64, 64), (256, 256), (777, 640)])
def test_pure_noise_has_no_signal(kind, shape):
    for seed in range(3):
        image = NOISE[kind](np.random.default_rng(seed), shape)
        assert not has_signal(image), (kind, shape, seed, noise_significance(image))


def test_large_noise_image():
    image = NOISE["camera uint16"](np.random.default_rng(0), (2048, 1536))
    assert noise_significance(image) < 8


@pytest.mark.parametrize("dark", [False, True])
def test_one_object_in_noise(dark):
    """One disc of radius 6 in 512 x 512 noise: found at a contrast of 3 noise standard deviations, not at 0.3."""
    rng = np.random.default_rng(1)
    disc = _disc((512, 512), (300, 200), 6)
    sign = -1 if dark else 1
    for contrast, expected in ((3.0, True), (0.3, False)):
        image = 100 + 5 * rng.standard_normal((512, 512)) + sign * contrast * 5 * disc
        assert has_signal(image.astype("float32")) is expected, (contrast, noise_significance(image))


def test_gradient_and_hot_pixels_are_no_objects():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:300, :400]
    image = 50 + 0.2 * xx + 0.1 * yy + 0.0005 * (xx - 150) ** 2 + 3 * rng.standard_normal((300, 400))
    assert not has_signal(image)
    hot = image.copy()
    hot[10:300:37, 7:400:41] = 4000  # isolated saturated pixels
    assert not has_signal(hot)
    hot[_disc(hot.shape, (150, 200), 8)] += 15  # a dim nucleus on the gradient
    assert has_signal(hot)


def test_channels_and_errors():
    rng = np.random.default_rng(3)
    image = rng.normal(10, 1, (128, 128, 3))
    assert not has_signal(image)
    image[..., 2] += 10 * _disc((128, 128), (60, 60), 10)
    assert has_signal(image)
    with pytest.raises(ValueError, match="image"):
        noise_significance(np.zeros((4, 8, 8, 3)))


def test_held_out_and_sample_images_have_signal():
    from micro_sam.sample_data import synthetic_cells_2d, synthetic_nuclei_2d, synthetic_styled_2d

    assert has_signal(synthetic_cells_2d(shape=(200, 260), seed=3)[0])
    assert has_signal(synthetic_nuclei_2d(shape=(256, 256), seed=0)[0])
    dim_tiny = {"radius_range": (3.5, 5), "coverage": 0.35, "clustering": 0.7, "photons": 30, "read_noise": 3}
    assert has_signal(synthetic_styled_2d((256, 256), seed=4, style=dim_tiny)[0])
