"""Tests for micro_sam.sample_data: synthetic generators, the bundled sample and downloads from a local server."""
import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from functools import partial

import imageio.v3 as imageio
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from micro_sam import sample_data

GENERATORS_2D = [sample_data.synthetic_nuclei_2d, sample_data.synthetic_cells_2d]


def _check_labels(labels, n_expected):
    """Consecutive ids 1..n, 0 = background, each object one 4-/6-connected component."""
    ids = np.unique(labels)
    assert ids[0] == 0
    np.testing.assert_array_equal(ids[1:], np.arange(1, n_expected + 1))
    structure = ndimage.generate_binary_structure(labels.ndim, 1)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        assert ndimage.label(labels[sl] == i, structure=structure)[1] == 1, f"object {i} is fragmented"


#
# Synthetic data
#

@pytest.mark.parametrize("generator", GENERATORS_2D + [sample_data.synthetic_nuclei_3d])
def test_synthetic_generators_are_deterministic(generator):
    shape = (128, 160) if generator is not sample_data.synthetic_nuclei_3d else (8, 96, 112)
    image1, labels1 = generator(shape, n_objects=12, seed=7)
    image2, labels2 = generator(shape, n_objects=12, seed=7)
    np.testing.assert_array_equal(image1, image2)
    np.testing.assert_array_equal(labels1, labels2)
    image3, labels3 = generator(shape, n_objects=12, seed=8)
    assert not np.array_equal(labels1, labels3)
    assert not np.array_equal(image1, image3)


@pytest.mark.parametrize("generator,shape,n", [
    (sample_data.synthetic_nuclei_2d, (256, 256), 30),
    (sample_data.synthetic_nuclei_2d, (100, 300), 7),
    (sample_data.synthetic_cells_2d, (256, 256), 20),
    (sample_data.synthetic_nuclei_3d, (12, 128, 128), 25),
])
def test_synthetic_labels_and_contrast(generator, shape, n):
    image, labels = generator(shape, n_objects=n, seed=1)
    assert image.shape == shape and labels.shape == shape
    assert image.dtype == np.uint8 and labels.dtype == np.uint32
    _check_labels(labels, n)
    fg, bg = image[labels > 0].mean(), image[labels == 0].mean()
    assert fg > 2.5 * bg, (fg, bg)
    # Every single object is brighter than the background on average.
    means = ndimage.mean(image, labels, np.arange(1, n + 1))
    assert means.min() > 1.3 * bg
    # Objects are not all identical: sizes and brightness vary.
    sizes = np.bincount(labels.ravel())[1:]
    assert sizes.std() > 0.1 * sizes.mean()
    assert means.std() > 2.0


def test_synthetic_nuclei_touch_and_vary():
    image, labels = sample_data.synthetic_nuclei_2d(seed=0)
    n = int(labels.max())
    assert 60 <= n <= 150  # default density at 512 x 512
    # Some objects touch: 4-neighbouring pixels with two different non-zero labels.
    a, b = labels[:, 1:], labels[:, :-1]
    touching = (a != b) & (a > 0) & (b > 0)
    assert touching.sum() > 20
    # Typical nucleus sizes: equivalent radius between ~5 and ~30 pixels.
    radii = np.sqrt(np.bincount(labels.ravel())[1:] / np.pi)
    assert 8 <= np.median(radii) <= 22
    assert radii.max() <= 30
    # Noise: the background is not flat.
    assert image[labels == 0].std() > 2.0


def test_synthetic_uint16_and_empty():
    image, labels = sample_data.synthetic_nuclei_2d((64, 64), n_objects=3, seed=0, dtype="uint16")
    assert image.dtype == np.uint16 and image.max() > 255
    image, labels = sample_data.synthetic_cells_2d((64, 64), n_objects=0, seed=0)
    assert labels.max() == 0 and image.dtype == np.uint8


@pytest.mark.parametrize("kwargs,match", [
    (dict(shape=(64,)), "shape"),
    (dict(shape=(8, 64)), "too small"),
    (dict(shape=(64, 64), n_objects=-1), "n_objects"),
    (dict(shape=(64, 64), n_objects=2.5), "n_objects"),
    (dict(shape=(32, 32), n_objects=40), "fit"),  # (gives up after 60 attempts per object)
    (dict(shape=(64, 64), dtype="float32"), "dtype"),
    (dict(shape=(64, 64), radius_range=(10, 5)), "radius_range"),
])
def test_synthetic_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_data.synthetic_nuclei_2d(**kwargs)


def test_synthetic_cells_too_many():
    with pytest.raises(ValueError, match="fit"):
        sample_data.synthetic_cells_2d((64, 64), n_objects=200)


def test_synthetic_data_matches_micro_sam_signature():
    image, labels = sample_data.synthetic_data((128, 96), seed=3)
    assert image.shape == (128, 96) and image.dtype == np.uint8
    assert labels.shape == (128, 96) and labels.dtype == np.uint64
    _check_labels(labels, int(labels.max()))
    assert labels.max() >= 5
    image2, labels2 = sample_data.synthetic_data(shape=(128, 96), seed=3)
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(labels, labels2)

    volume, vlabels = sample_data.synthetic_data((6, 64, 64), seed=0)
    assert volume.shape == vlabels.shape == (6, 64, 64)
    assert volume[vlabels > 0].mean() > 2 * volume[vlabels == 0].mean()

    # seed=None works (and is not required to be reproducible).
    image, labels = sample_data.synthetic_data((64, 64))
    assert labels.max() > 0
    with pytest.raises(ValueError, match="2 or 3"):
        sample_data.synthetic_data((2, 3, 64, 64))


def test_synthetic_speed():
    # Generous bounds (the targets are 0.5 s and 2 s on an idle core); they catch gross regressions only.
    for generator, limit in [(sample_data.synthetic_nuclei_2d, 3.0), (sample_data.synthetic_cells_2d, 3.0),
                             (sample_data.synthetic_nuclei_3d, 8.0)]:
        start = time.perf_counter()
        generator(seed=5)
        assert time.perf_counter() - start < limit, generator.__name__


#
# Bundled sample
#

def test_bundled_sample_is_generator_output():
    image_path, labels_path = sample_data.sample_image_path(), sample_data.sample_labels_path()
    assert os.path.getsize(image_path) < 300_000
    image, labels = tifffile.imread(image_path), tifffile.imread(labels_path)
    assert image.shape == labels.shape == (512, 512)
    assert image.dtype == np.uint8 and labels.dtype == np.uint32
    expected_image, expected_labels = sample_data.synthetic_nuclei_2d(**sample_data._SAMPLE_KWARGS)
    np.testing.assert_array_equal(labels, expected_labels)
    # Allow for rare last-bit float differences between platforms in the noise model.
    assert np.mean(image == expected_image) > 0.999

    layers = sample_data.sample_data_nuclei_2d()
    assert [layer[1]["name"] for layer in layers] == ["nuclei_2d", "nuclei_2d_labels"]
    assert layers[1][2] == "labels"
    np.testing.assert_array_equal(layers[0][0], image)


def test_import_is_light():
    code = "import sys, micro_sam.sample_data; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


#
# Downloads (local HTTP server only)
#

class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests_served = None  # set per server

    def do_GET(self):
        self.requests_served.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path, monkeypatch):
    """Serve tmp_path/'served' on 127.0.0.1; yields (base_url, served_dir, list of requested paths)."""
    served = tmp_path / "served"
    served.mkdir()
    requested = []
    handler = type("Handler", (_CountingHandler,), {"requests_served": requested})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served, requested
    finally:
        server.shutdown()
        server.server_close()


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _serve(served, name, data: bytes):
    path = served / name
    path.write_bytes(data)
    return path


def _tif_bytes(array):
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


def _png_bytes(array):
    return imageio.imwrite("<bytes>", array, extension=".png")


def _use_registry(monkeypatch, entries):
    monkeypatch.setattr(sample_data, "_load_registry", lambda: dict(entries))


def test_registry_lists_all_fetch_functions():
    registry = sample_data._load_registry()
    expected = {
        "fetch_image_series_example_data", "fetch_wholeslide_example_data", "fetch_livecell_example_data",
        "fetch_hela_2d_example_data", "fetch_3d_example_data", "fetch_tracking_example_data",
        "fetch_tracking_segmentation_data", "fetch_nucleus_3d_example_data",
        "fetch_wholeslide_histopathology_example_data",
    }
    assert set(registry) == expected
    for name, (url, sha) in registry.items():
        assert callable(getattr(sample_data, name))
        assert url.startswith("http") and len(sha) == 64 and int(sha, 16) >= 0
    with pytest.raises(ValueError, match="Unknown sample data 'fetch_nothing'"):
        sample_data._registry_entry("fetch_nothing")


def test_fetch_file_and_refetch(file_server, tmp_path, monkeypatch):
    base, served, requested = file_server
    volume = np.arange(2 * 8 * 8, dtype="uint16").reshape(2, 8, 8)
    src = _serve(served, "nuc.tif", _tif_bytes(volume))
    _use_registry(monkeypatch, {"fetch_nucleus_3d_example_data": (f"{base}/nuc.tif", _sha256(src))})

    save_dir = tmp_path / "new" / "folder"
    path = sample_data.fetch_nucleus_3d_example_data(save_dir)
    assert path == os.path.join(save_dir, "3d-nucleus-data.tif")
    np.testing.assert_array_equal(tifffile.imread(path), volume)
    assert requested == ["/nuc.tif"]

    # Second call: the verified local file is used, nothing is downloaded.
    assert sample_data.fetch_nucleus_3d_example_data(str(save_dir)) == path
    assert requested == ["/nuc.tif"]
    assert sorted(os.listdir(save_dir)) == ["3d-nucleus-data.tif"]


def test_fetch_zip_unpacks_like_micro_sam(file_server, tmp_path, monkeypatch):
    base, served, requested = file_server
    images = [np.full((4, 5 + i), i, dtype="uint8") for i in range(3)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i, im in enumerate(images):
            zf.writestr(f"series/im{i}.tif", _tif_bytes(im))
        zf.writestr("README.txt", "not extracted")
    src = _serve(served, "series.zip", buffer.getvalue())
    _use_registry(monkeypatch, {"fetch_image_series_example_data": (f"{base}/series.zip", _sha256(src))})

    folder = sample_data.fetch_image_series_example_data(tmp_path / "data")
    assert folder == os.path.join(tmp_path / "data", "image-series.zip.unzip", "series")
    assert sorted(os.listdir(folder)) == ["im0.tif", "im1.tif", "im2.tif"]
    for i, im in enumerate(images):
        np.testing.assert_array_equal(tifffile.imread(os.path.join(folder, f"im{i}.tif")), im)
    assert sample_data.fetch_image_series_example_data(tmp_path / "data") == folder
    assert requested == ["/series.zip"]

    # The napari-style provider downloads into $MICROSAM_CACHEDIR/sample_data and returns one layer per image.
    monkeypatch.setenv("MICROSAM_CACHEDIR", str(tmp_path / "cache"))
    layers = sample_data.sample_data_image_series()
    assert [kwargs for _, kwargs in layers] == [{"name": "img-0"}, {"name": "img-1"}, {"name": "img-2"}]
    for (data, _), im in zip(layers, images):
        np.testing.assert_array_equal(data, im)
    assert os.path.isdir(tmp_path / "cache" / "sample_data" / "image-series.zip.unzip" / "series")


def test_fetch_zip_without_expected_content(file_server, tmp_path, monkeypatch):
    base, served, _ = file_server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("other/file.txt", "x")
    src = _serve(served, "bad.zip", buffer.getvalue())
    _use_registry(monkeypatch, {"fetch_tracking_segmentation_data": (f"{base}/bad.zip", _sha256(src))})
    with pytest.raises(RuntimeError, match="masks"):
        sample_data.fetch_tracking_segmentation_data(tmp_path / "data")


def test_sample_data_provider_returns_layer_list(file_server, tmp_path, monkeypatch):
    base, served, _ = file_server
    image = (np.arange(12 * 10) % 256).astype("uint8").reshape(12, 10)
    src = _serve(served, "hela.png", _png_bytes(image))
    _use_registry(monkeypatch, {"fetch_hela_2d_example_data": (f"{base}/hela.png", _sha256(src))})
    monkeypatch.setenv("MICROSAM_CACHEDIR", str(tmp_path / "cache"))
    layers = sample_data.sample_data_hela_2d()
    assert len(layers) == 1
    data, kwargs = layers[0]
    assert kwargs == {"name": "hela_2d"}
    np.testing.assert_array_equal(data, image)
    assert os.path.exists(tmp_path / "cache" / "sample_data" / "hela-2d-image.png")


def test_fetch_wrong_hash_leaves_nothing(file_server, tmp_path, monkeypatch):
    base, served, requested = file_server
    _serve(served, "img.png", _png_bytes(np.zeros((4, 4), dtype="uint8")))
    _use_registry(monkeypatch, {"fetch_livecell_example_data": (f"{base}/img.png", "0" * 64)})
    save_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="fetch_livecell_example_data.*hash"):
        sample_data.fetch_livecell_example_data(save_dir)
    assert requested == ["/img.png"]
    assert os.listdir(save_dir) == []  # neither the target nor a temporary file is left behind


def test_fetch_into_unwritable_directory_fails_before_download(file_server, tmp_path, monkeypatch):
    base, served, requested = file_server
    src = _serve(served, "img.png", _png_bytes(np.zeros((4, 4), dtype="uint8")))
    _use_registry(monkeypatch, {"fetch_hela_2d_example_data": (f"{base}/img.png", _sha256(src))})
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="save_directory"):
        sample_data.fetch_hela_2d_example_data(a_file)
    with pytest.raises(ValueError, match="save_directory"):
        sample_data.fetch_hela_2d_example_data(a_file / "sub")
    assert requested == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_fetch_into_read_only_directory(file_server, tmp_path, monkeypatch):
    base, served, requested = file_server
    src = _serve(served, "img.png", _png_bytes(np.zeros((4, 4), dtype="uint8")))
    _use_registry(monkeypatch, {"fetch_hela_2d_example_data": (f"{base}/img.png", _sha256(src))})
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="not writable"):
            sample_data.fetch_hela_2d_example_data(read_only)
    finally:
        read_only.chmod(0o755)
    assert requested == []


def test_module_prints_bundled_paths():
    import subprocess
    import sys

    from micro_sam.sample_data import sample_image_path, sample_labels_path

    run = [sys.executable, "-m", "micro_sam.sample_data"]
    image = subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip()
    labels = subprocess.run(run + ["--labels"], capture_output=True, text=True, check=True).stdout.strip()
    assert image == sample_image_path() and labels == sample_labels_path()
    assert os.path.isfile(image) and os.path.isfile(labels)
