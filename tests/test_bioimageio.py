"""Model export: ONNX encoder / decoder (same masks as the library) and bioimage.io packages (valid, offline)."""
import os
import socket
import zipfile

import numpy as np
import pytest
import torch

from micro_sam.bioimageio import bioengine_export, export_bioengine_model, export_onnx_model, export_sam_model
from micro_sam.bioimageio import _onnx, model_export
from micro_sam.sample_data import synthetic_nuclei_2d


@pytest.fixture
def no_network(monkeypatch):
    """Fail on any connection or name lookup that does not go to this machine."""
    attempts = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo
    local = ("127.0.0.1", "::1", "localhost")

    def guarded_connect(self, address):
        if isinstance(address, tuple) and address[0] not in local:
            attempts.append(address)
            raise OSError(f"network access attempted: {address}")
        return connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in local:
            attempts.append(host)
            raise OSError(f"name lookup attempted: {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


@pytest.fixture(scope="module")
def demo():
    """The bundled model, a non-square test image, its labels and the library's embeddings of it."""
    from micro_sam.util import get_sam_model, precompute_image_embeddings

    image, labels = synthetic_nuclei_2d(seed=0)
    image, labels = image[:, :400], labels[:, :400]
    predictor = get_sam_model("vit_t_demo", device="cpu")
    return predictor, image, labels, precompute_image_embeddings(predictor, image, verbose=False)


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def _onnx_decoder_masks(session, predictor, image, embeddings):
    """A function (points (x, y), labels) -> mask of the exported decoder, for ``image``'s embeddings."""
    grid = embeddings.shape[-1]

    def run(points_xy, point_labels):
        coords = predictor.transform.apply_coords(np.asarray(points_xy, "float64"), image.shape)
        masks, scores, low_res = session.run(None, {
            "image_embeddings": embeddings, "point_coords": coords[None].astype("float32"),
            "point_labels": np.asarray(point_labels, "float32")[None],
            "mask_input": np.zeros((1, 1, 4 * grid, 4 * grid), "float32"), "has_mask_input": np.zeros(1, "float32"),
            "orig_im_size": np.array(image.shape, "float32"),
        })
        assert masks.shape == (1, 1) + image.shape and low_res.shape == (1, 1, 4 * grid, 4 * grid)
        return masks[0, 0] > 0

    return run


def test_onnx_decoder_gives_the_library_masks(demo, tmp_path):
    import onnxruntime as ort

    from micro_sam.prompt_based_segmentation import segment_from_box, segment_from_points

    predictor, image, labels, library = demo
    folder = export_onnx_model("vit_t_demo", tmp_path, opset=17)
    assert sorted(os.listdir(folder)) == ["1", "config.pbtxt"] and os.listdir(os.path.join(folder, "1")) == [
        "model.onnx"]
    assert 'name: "sam-vit_t_demo-decoder"' in open(os.path.join(folder, "config.pbtxt")).read()
    session = ort.InferenceSession(os.path.join(folder, "1", "model.onnx"))
    onnx_mask = _onnx_decoder_masks(session, predictor, image, np.asarray(library["features"]))
    ious = []
    for label in np.unique(labels)[1:9]:
        ys, xs = np.nonzero(labels == label)
        box = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])  # [y0, x0, y1, x1]
        expected = segment_from_box(predictor, box, image_embeddings=library)[0]
        ious.append(_iou(onnx_mask([[box[1], box[0]], [box[3], box[2]]], [2, 3]), expected))
        assert expected.sum() > 0.5 * (labels == label).sum()  # the comparison is about real objects
        center = np.array([[ys[len(ys) // 2], xs[len(xs) // 2]]])  # one positive point: the ambiguous case
        expected = segment_from_points(predictor, center, np.array([1]), image_embeddings=library)[0]
        ious.append(_iou(onnx_mask([center[0, ::-1], [0, 0]], [1, -1]), expected))
        inside, outside = center[0], (max(ys.min() - 3, 0), max(xs.min() - 3, 0))  # two points, no box
        expected = segment_from_points(predictor, np.array([inside, outside]), np.array([1, 0]),
                                       image_embeddings=library)[0]
        ious.append(_iou(onnx_mask([inside[::-1], outside[::-1], [0, 0]], [1, 0, -1]), expected))
    assert min(ious) >= 0.99, ious


@pytest.mark.slow
def test_onnx_encoder_and_decoder_give_the_library_masks(demo, tmp_path):
    import onnxruntime as ort

    from micro_sam._image import to_image
    from micro_sam.prompt_based_segmentation import segment_from_box

    predictor, image, labels, library = demo
    export_bioengine_model("vit_t_demo", tmp_path, opset=17, encoder_backend="onnx")
    assert sorted(os.listdir(tmp_path)) == ["sam-vit_t_demo-decoder", "sam-vit_t_demo-encoder"]
    encoder = ort.InferenceSession(str(tmp_path / "sam-vit_t_demo-encoder" / "1" / "model.onnx"))
    decoder = ort.InferenceSession(str(tmp_path / "sam-vit_t_demo-decoder" / "1" / "model.onnx"))
    resized = predictor.transform.apply_image(to_image(image)).astype("float32").transpose(2, 0, 1)[None]
    embeddings = encoder.run(None, {"image": resized})[0]
    assert np.abs(embeddings - np.asarray(library["features"])).max() < 1e-3
    onnx_mask = _onnx_decoder_masks(decoder, predictor, image, embeddings)
    for label in np.unique(labels)[1:6]:
        ys, xs = np.nonzero(labels == label)
        box = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
        expected = segment_from_box(predictor, box, image_embeddings=library)[0]
        assert _iou(onnx_mask([[box[1], box[0]], [box[3], box[2]]], [2, 3]), expected) >= 0.99


@pytest.mark.parametrize("opset", [13, 21, 16.5])
def test_onnx_opset_out_of_range_fails_before_export(opset, tmp_path, monkeypatch):
    monkeypatch.setattr(bioengine_export, "_load_sam", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="opset"):
        export_onnx_model("vit_t_demo", tmp_path, opset=opset)
    with pytest.raises(ValueError, match="opset"):
        export_bioengine_model("vit_t_demo", tmp_path, opset=opset)
    assert not any(tmp_path.iterdir())


def test_opset_the_runtime_cannot_run_is_a_clear_error():
    import onnxruntime

    with pytest.raises(ValueError, match=f"onnxruntime {onnxruntime.__version__} cannot run ONNX opset 99"):
        _onnx.probe_runtime(99)
    _onnx.probe_runtime(17)  # fine


def test_onnx_export_refuses_an_existing_folder_and_leaves_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "sam-vit_t_demo-decoder").mkdir()
    monkeypatch.setattr(bioengine_export, "_load_sam", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="exists already"):
        export_onnx_model("vit_t_demo", tmp_path)
    with pytest.raises(ValueError, match="exists already"):
        export_bioengine_model("vit_t_demo", tmp_path, opset=17)  # checked before the encoder is exported
    assert sorted(os.listdir(tmp_path)) == ["sam-vit_t_demo-decoder"]
    with pytest.raises(ValueError, match="backend"):
        bioengine_export.export_image_encoder("vit_t_demo", tmp_path, backend="tensorflow")

    # a failure while writing removes the temporary folder
    def failing(folder):
        open(os.path.join(folder, "partial"), "w").close()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        bioengine_export._write_folder(str(tmp_path / "new-model"), failing)
    assert sorted(os.listdir(tmp_path)) == ["sam-vit_t_demo-decoder"]


def test_predictor_adaptor_matches_the_library(demo):
    from micro_sam._image import to_image
    from micro_sam.bioimageio.predictor_adaptor import PredictorAdaptor, join_state
    from micro_sam.prompt_based_segmentation import segment_from_box

    predictor, image, labels, embeddings = demo
    adaptor = PredictorAdaptor("vit_t", image_size=640)
    adaptor.load_state_dict(join_state(predictor.model.state_dict()))
    ids = np.unique(labels)[1:4]
    boxes = []
    for label in ids:
        ys, xs = np.nonzero(labels == label)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])  # XYXY
    expected = [segment_from_box(predictor, np.array([b[1], b[0], b[3], b[2]]), image_embeddings=embeddings)[0]
                for b in boxes]
    tensor = torch.from_numpy(to_image(image).transpose(2, 0, 1)[None].copy())
    masks, scores, features = adaptor(tensor, box_prompts=torch.tensor([boxes]))
    assert masks.shape == (1, len(ids), 1) + image.shape and masks.dtype == torch.uint8
    assert scores.shape == (1, len(ids), 1)
    assert np.abs(features.numpy() - np.asarray(embeddings["features"])).max() < 1e-4
    for mask, reference in zip(masks[0, :, 0].numpy().astype(bool), expected):
        assert _iou(mask, reference) >= 0.99
    with pytest.raises(ValueError, match="no instance segmentation decoder"):
        adaptor(tensor)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A random vit_t at encoder input size 256 (fast), without decoder: the package takes prompts."""
    from micro_sam.models.build_sam import sam_model_registry

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "vit_t_256.pt"
    torch.save({"model_state": sam_model_registry["vit_t"](image_size=256).state_dict(), "image_size": 256}, path)
    return path


def test_bioimageio_package_validates_and_runs_offline(small_checkpoint, tmp_path, no_network):
    from bioimageio.spec import load_model_description

    image, labels = synthetic_nuclei_2d(seed=1)
    output = tmp_path / "model.zip"
    export_sam_model(image[:128, :160], labels[:128, :160], "vit_t", "micro-sam-test", output,
                     checkpoint_path=small_checkpoint)  # raises when the bioimageio.core test does not pass
    assert no_network == []
    assert sorted(os.listdir(tmp_path)) == ["model.zip"]  # no temporary files left
    with zipfile.ZipFile(output) as package:
        names = set(package.namelist())
    assert {"rdf.yaml", "weights.pt", "README.md", "cover.png", "environment.yaml", "image.npy",
            "box_prompts.npy", "point_prompts.npy", "point_labels.npy", "mask_prompts.npy", "embeddings.npy",
            "masks.npy", "scores.npy"} <= names
    description = load_model_description(output, perform_io_checks=False)
    assert description.name == "micro-sam-test"
    assert [str(t.id) for t in description.inputs] == ["image", "box_prompts", "point_prompts", "point_labels",
                                                       "mask_prompts", "embeddings"]
    assert description.weights.pytorch_state_dict.architecture.kwargs == {"model_type": "vit_t", "image_size": 256}


def test_bioimageio_export_bad_input_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(model_export, "_load_weights", lambda *a: pytest.fail("loaded a model"))
    image, labels = np.zeros((32, 32), "uint8"), np.ones((32, 32), "uint8")
    (tmp_path / "exists.zip").write_bytes(b"old")
    cases = [
        ((image, labels, "vit_t_demo", "a-name", tmp_path / "exists.zip"), "exists already"),
        ((image, labels, "vit_t_demo", "a-name", tmp_path / "model.tar"), ".zip"),
        ((image, np.zeros_like(labels), "vit_t_demo", "a-name", tmp_path / "m.zip"), "no objects"),
        ((image, labels[:5], "vit_t_demo", "a-name", tmp_path / "m.zip"), "shape"),
        ((image, labels, "vit_t_demo", "abc", tmp_path / "m.zip"), "5 to 128 characters"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            export_sam_model(*args)
    assert (tmp_path / "exists.zip").read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["exists.zip"]


def test_missing_export_dependencies_are_clear_errors(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "bioimageio.core", None)
    with pytest.raises(ImportError, match=r"micro_sam\[export\]"):
        export_sam_model(np.zeros((8, 8)), np.ones((8, 8), "uint8"), "vit_t_demo", "a-name", tmp_path / "m.zip")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"micro_sam\[export\]"):
        export_onnx_model("vit_t_demo", tmp_path)


@pytest.mark.slow
def test_bioimageio_package_with_decoder_runs_instance_segmentation(tmp_path, no_network):
    import zipfile as zf

    image, labels = synthetic_nuclei_2d(seed=0)
    output = tmp_path / "ais.zip"
    export_sam_model(image[:256, :320], labels[:256, :320], "vit_t_demo", "micro-sam-demo-ais", output)
    assert no_network == []
    with zf.ZipFile(output) as package:
        masks = np.load(package.open("masks.npy"))
        names = set(package.namelist())
    assert "box_prompts.npy" not in names  # a model with decoder takes only the image
    assert masks.shape[1] > 10  # the automatic segmentation finds the nuclei


@pytest.mark.slow
def test_torchscript_encoder_matches_the_library(demo, tmp_path):
    from micro_sam._image import to_image

    predictor, image, _, library = demo
    folder = bioengine_export.export_image_encoder("vit_t_demo", tmp_path)
    assert "dims: [256, 40, 40]" in open(os.path.join(folder, "config.pbtxt")).read()
    encoder = torch.jit.load(os.path.join(folder, "1", "model.pt"))
    resized = predictor.transform.apply_image(to_image(image))
    x = predictor.model.preprocess(torch.from_numpy(resized).permute(2, 0, 1)[None].float())
    with torch.no_grad():
        features = encoder(x).numpy()
    assert np.abs(features - np.asarray(library["features"])).max() < 1e-3
