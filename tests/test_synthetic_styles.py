"""micro_sam._synthetic_styles: the domain-randomised training images of the demo model and its held-out styles."""
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from micro_sam import _synthetic_styles as styles
from micro_sam.sample_data import synthetic_styled_2d

HELD_OUT = Path(__file__).resolve().parents[1] / "scripts" / "demo_model_styles.json"


def _check_labels(labels):
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(len(ids)))  # 0 and consecutive ids
    structure = ndimage.generate_binary_structure(2, 1)
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        assert ndimage.label(labels[box] == i, structure=structure)[1] == 1, f"object {i} is fragmented"


def test_training_styles_are_deterministic_varied_and_inside_their_ranges():
    kinds, dtypes = set(), set()
    for seed in range(60):
        style = styles.sample_training_style(np.random.default_rng(seed), empty_fraction=0.2)
        assert style == styles.sample_training_style(np.random.default_rng(seed), empty_fraction=0.2)
        kinds.add(style.kind)
        dtypes.add(style.dtype)
        if style.kind == "objects":
            assert styles.settings_outside_training(style) == {}, style
    assert kinds == {"objects", "noise", "background"} and dtypes == set(styles.DTYPES)

    style = styles.sample_training_style(np.random.default_rng(3), empty_fraction=0.0)
    a, labels_a = styles.render_style(style, (96, 128), np.random.default_rng(11))
    b, labels_b = styles.render_style(style, (96, 128), np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert a.shape == labels_a.shape == (96, 128) and a.dtype == np.dtype(style.dtype)
    assert labels_a.dtype == np.uint32 and labels_a.max() > 0
    _check_labels(labels_a)


def test_held_out_styles_lie_outside_the_training_ranges():
    spec = json.loads(HELD_OUT.read_text())
    names = [entry["name"] for entry in spec["styles"]]
    assert len(names) == len(set(names)) >= 6
    for entry in spec["styles"]:
        style = styles.style_from_dict(entry["style"])
        assert styles.settings_outside_training(style), f"{entry['name']} is inside the training ranges"
        assert min(entry["seeds"]) >= 7000  # training and validation images use seeds 42000 ...
    assert {styles.style_from_dict(e["style"]).kind for e in spec["empty"]} == {"blank", "constant", "noise"}


def test_settings_outside_training_names_the_setting():
    style = styles.Style(radius_range=(10.0, 16.0), aspect_range=(0.3, 1.0), psf_sigma=(0.6, 2.8))
    assert set(styles.settings_outside_training(style)) == {"aspect_min", "psf_sigma_max", "psf_anisotropy"}


def test_rendering_follows_the_settings():
    rng = np.random.default_rng(0)
    base = styles.Style(radius_range=(10.0, 14.0), aspect_range=(0.9, 1.0), coverage=0.2, irregularity=0.0,
                        photons=1000.0, background=0.1, read_noise=0.0, psf_sigma=(0.0, 0.0), texture=0.0,
                        edge_softness=0.0, brightness_spread=0.0, unevenness=0.0, dtype="float32")
    image, labels = styles.render_style(base, (256, 256), rng)
    _check_labels(labels)
    # photons: objects 1000 on a background of 100 (Poisson noise only)
    assert abs(np.median(image[labels > 0]) - 1100) < 60 and abs(np.median(image[labels == 0]) - 100) < 15
    # object sizes follow the radius range (objects cut by the border or hidden in part are smaller)
    areas = np.bincount(labels.ravel())[1:]
    assert np.pi * 10 ** 2 * 0.9 * 0.7 < np.median(areas) < np.pi * 14 ** 2 * 1.05

    # elongated objects: the ratio of the principal axes follows aspect_range
    _, elongated = styles.render_style(base.replace(aspect_range=(0.35, 0.4), max_overlap=0.0),
                                       (256, 256), np.random.default_rng(1))
    ratios = []
    for i, box in enumerate(ndimage.find_objects(elongated), start=1):
        ys, xs = np.nonzero(elongated[box] == i)
        eig = np.linalg.eigvalsh(np.cov(np.stack([ys, xs])))
        ratios.append(np.sqrt(eig[0] / eig[1]))
    assert 0.3 < np.median(ratios) < 0.45

    # a halo brightens the background next to objects, and it is not part of the labels
    glow, glow_labels = styles.render_style(base.replace(halo=0.4, halo_width=3.0), (256, 256),
                                            np.random.default_rng(0))
    ring = ndimage.binary_dilation(glow_labels > 0, iterations=2) & (glow_labels == 0)
    far = ~ndimage.binary_dilation(glow_labels > 0, iterations=20)
    assert np.median(glow[ring]) > np.median(glow[far]) + 150

    # clustering: objects lie closer to their nearest neighbour than when they are spread out
    def nearest_distance(lab):
        centres = np.array(ndimage.center_of_mass(lab > 0, lab, range(1, lab.max() + 1)))
        d = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        return np.median(d.min(axis=1))

    _, spread = styles.render_style(base.replace(coverage=0.1), (384, 384), np.random.default_rng(2))
    _, clustered = styles.render_style(base.replace(coverage=0.1, clustering=0.9), (384, 384),
                                       np.random.default_rng(2))
    assert nearest_distance(clustered) < 0.8 * nearest_distance(spread)


def test_acquisition_offset_gain_and_output_types():
    base = styles.Style(photons=50.0, background=0.2, read_noise=0.0, offset=100.0, gain=2.0, dtype="uint16",
                        psf_sigma=(1.0, 1.0), unevenness=0.0)
    image, labels = styles.render_style(base, (128, 128), np.random.default_rng(0))
    assert image.dtype == np.uint16 and abs(np.median(image[labels == 0]) - (100 + 2 * 10)) <= 3
    bright = base.replace(dtype="uint8", photons=500.0, offset=0.0, gain=1.0)
    image, _ = styles.render_style(bright, (128, 128), np.random.default_rng(0))
    assert image.dtype == np.uint8 and image.max() == 255  # clipped, as a saturated 8-bit camera
    image, _ = styles.render_style(base.replace(dtype="float32", gain=1e-3, offset=0.0), (64, 64),
                                   np.random.default_rng(0))
    assert image.dtype == np.float32 and image.max() < 1


def test_images_without_objects():
    rng = np.random.default_rng(0)
    for style, check in [
        (styles.Style(kind="blank", dtype="uint16"), lambda im: im.max() == 0),
        (styles.Style(kind="constant", dtype="float32", constant_value=0.37), lambda im: np.all(im == np.float32(0.37))),
        (styles.Style(kind="noise", photons=3.0, read_noise=1.0), lambda im: im.std() > 1),
        (styles.Style(kind="background", photons=100.0, out_of_focus=5, debris=20, gradient=0.5),
         lambda im: im.std() > 5),
    ]:
        image, labels = styles.render_style(style, (64, 96), rng)
        assert image.shape == labels.shape == (64, 96) and labels.max() == 0 and check(image), style.kind


def test_invalid_styles_are_rejected():
    with pytest.raises(ValueError, match="Unknown style settings"):
        styles.style_from_dict({"radius": 3})
    with pytest.raises(ValueError, match="kind"):
        styles.style_from_dict({"kind": "cells"})
    with pytest.raises(ValueError, match="radius_range"):
        styles.style_from_dict({"radius_range": [5, 3]})
    with pytest.raises(ValueError, match="dtype"):
        styles.Style().replace(dtype="int8")
    with pytest.raises(ValueError, match="star-shaped"):
        styles.Style(lobes=4, lobe_depth=0.7, irregularity=0.2).replace()


def test_sample_data_exposes_the_styles():
    image, labels = synthetic_styled_2d((96, 96), seed=5)
    again, _ = synthetic_styled_2d((96, 96), seed=5)
    np.testing.assert_array_equal(image, again)
    style = {"radius_range": (6, 9), "coverage": 0.3, "dtype": "uint16"}
    image, labels = synthetic_styled_2d((96, 96), seed=1, style=style)
    assert image.dtype == np.uint16 and labels.max() > 0
    with pytest.raises(ValueError, match="Unknown style settings"):
        synthetic_styled_2d((96, 96), seed=1, style={"colour": "red"})
