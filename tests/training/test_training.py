import os
import warnings

import numpy as np
import pytest
import torch

import micro_sam.instance_segmentation
from micro_sam.training import (
    TrainableSAM, default_sam_loader, export_instance_segmentation_model, train_instance_segmentation, train_sam,
    train_sam_for_configuration,
)
from micro_sam.training import training as training_module

from ._helpers import disk_images, small_sam, small_unetr


@pytest.fixture
def small_models(monkeypatch):
    """Make train_sam build the small test SAM (dim 64, 256 input) and a narrow UNETR; returns the built models."""
    built = {}

    def fake_trainable_sam_model(model_type="vit_b", device=None, checkpoint_path=None, freeze=None,
                                 return_state=False, **kwargs):
        sam = small_sam(seed=0, dim=built.get("dim", 64))
        for name, parameter in sam.named_parameters():
            if freeze and any(name.startswith(part) for part in freeze):
                parameter.requires_grad_(False)
        built["sam"] = sam
        model = TrainableSAM(sam).train()
        return (model, {}) if return_state else model

    def fake_get_unetr(image_encoder, decoder_state=None, device=None, **kwargs):
        unetr = small_unetr(image_encoder)
        if decoder_state is not None:
            unetr.load_state_dict({**unetr.state_dict(), **decoder_state})
        built["unetr"] = unetr
        return unetr

    monkeypatch.setattr(training_module, "get_trainable_sam_model", fake_trainable_sam_model)
    monkeypatch.setattr(micro_sam.instance_segmentation, "get_unetr", fake_get_unetr)
    return built


def _loaders(with_decoder, n_train=20, n_val=4, shape=(128, 128), seed=1, **kwargs):
    size = {"n_objects": 6} if shape[0] >= 128 else {"n_objects": 4, "radius": (5, 8)}
    images, labels = disk_images(4, shape=shape, seed=seed, **size)
    val_images, val_labels = disk_images(2, shape=shape, seed=seed + 1, **size)
    common = dict(raw_key=None, label_key=None, patch_shape=shape, with_segmentation_decoder=with_decoder)
    train = default_sam_loader(raw_paths=images, label_paths=labels, n_samples=n_train, shuffle=True, **common,
                               **kwargs)
    val = default_sam_loader(raw_paths=val_images, label_paths=val_labels, n_samples=n_val, is_train=False,
                             **common, **kwargs)
    return train, val, (val_images, val_labels)


def _point_prompt_iou(sam, images, labels):
    """Mean IoU of the mask chosen by predicted IoU, for one point prompt at each object's centre."""
    from segment_anything import SamPredictor

    from micro_sam.util import get_centers_and_bounding_boxes

    predictor = SamPredictor(sam.eval())
    ious = []
    for image, label in zip(images, labels):
        predictor.set_image(np.stack([image] * 3, axis=-1))
        centers, _ = get_centers_and_bounding_boxes(label)
        for object_id, (y, x) in centers.items():
            masks, scores, _ = predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
            mask, truth = masks[int(np.argmax(scores))], label == object_id
            ious.append((mask & truth).sum() / (mask | truth).sum())
    return float(np.mean(ious))


def _validation_losses(save_root, name):
    import csv

    with open(os.path.join(save_root, "logs", name, "metrics.csv")) as f:
        return [float(row["value"]) for row in csv.DictReader(f) if row["tag"] == "validation/loss"]


def _learn(tmp_path, n_iterations):
    np.random.seed(0), torch.manual_seed(0)
    train_loader, val_loader, (images, labels) = _loaders(False, n_train=20, n_val=4)
    before = _point_prompt_iou(small_sam(seed=0, dim=64), images, labels)
    train_sam("learn", "vit_b", train_loader, val_loader, n_iterations=n_iterations, n_objects_per_batch=4,
              with_segmentation_decoder=False, freeze=["image_encoder", "prompt_encoder"], device="cpu", lr=1e-3,
              n_sub_iteration=1, save_root=str(tmp_path), verify_n_labels_in_loader=2, early_stopping=None)
    state = torch.load(tmp_path / "checkpoints" / "learn" / "latest.pt", weights_only=True)
    sam = small_sam(seed=1, dim=64)
    sam.load_state_dict({k[len("sam."):]: v for k, v in state["model_state"].items()})
    return before, _point_prompt_iou(sam, images, labels), _validation_losses(str(tmp_path), "learn")


def test_train_sam_learns(tmp_path, small_models):
    before, after, val_losses = _learn(tmp_path, n_iterations=80)
    assert len(val_losses) == 4  # one validation per epoch of 20 iterations
    assert val_losses[-1] < val_losses[0] - 0.05
    assert after > before + 0.05


@pytest.mark.slow
def test_train_sam_learns_to_segment(tmp_path, small_models):
    before, after, val_losses = _learn(tmp_path, n_iterations=300)
    print("validation losses", np.round(val_losses, 3), "point-prompt IoU", before, "->", after)
    assert val_losses[-1] < val_losses[0] - 0.2 and before < 0.05 and after > 0.4


def _checkpoint(tmp_path, name="run", which="latest"):
    return torch.load(tmp_path / "checkpoints" / name / f"{which}.pt", weights_only=True)


def test_checkpoints_resume_and_reload(tmp_path, small_models):
    train_loader, val_loader, _ = _loaders(True, n_train=2, n_val=1, shape=(64, 64))
    kwargs = dict(n_objects_per_batch=2, device="cpu", n_sub_iteration=2, save_root=str(tmp_path),
                  verify_n_labels_in_loader=1, with_segmentation_decoder=True)
    train_sam("run", "vit_b", train_loader, val_loader, n_iterations=4, **kwargs)
    state = _checkpoint(tmp_path)  # plain torch.load with weights_only: no pickled objects in the file
    assert (state["iteration"], state["epoch"]) == (4, 1)
    from micro_sam._checkpoints import safe_load

    assert safe_load(tmp_path / "checkpoints" / "run" / "best.pt")["iteration"] in (2, 4)

    train_sam("run", "vit_b", train_loader, val_loader, n_iterations=2, load_from_checkpoint="latest", **kwargs)
    assert _checkpoint(tmp_path)["iteration"] == 6
    train_sam("run", "vit_b", train_loader, val_loader, n_iterations=4, load_from_checkpoint="latest", **kwargs)
    state = _checkpoint(tmp_path)
    assert (state["iteration"], state["epoch"]) == (10, 4)
    # The optimizer and the scheduler continued: Adam counted 10 steps (for the parameters with a gradient in
    # every iteration), the scheduler saw 5 epochs.
    steps = [int(s["step"]) for s in state["optimizer_state"]["state"].values()]
    assert max(steps) == 10
    assert state["scheduler_state"]["last_epoch"] == 5

    # The weights reload into fresh models (state-dict level: the test SAM is no registered architecture).
    sam, unetr = small_sam(seed=3, dim=64), small_unetr(small_sam(seed=3, dim=64).image_encoder)
    sam.load_state_dict({k[len("sam."):]: v for k, v in state["model_state"].items()})
    unetr.load_state_dict({**unetr.state_dict(), **state["decoder_state"]})
    assert torch.equal(small_models["unetr"].out_conv.weight, unetr.out_conv.weight)
    assert all(not k.startswith("encoder") for k in state["decoder_state"])
    from micro_sam._checkpoints import split_checkpoint

    model_state, decoder_state, _ = split_checkpoint(state, "latest.pt")
    assert set(model_state) == set(sam.state_dict()) and decoder_state is state["decoder_state"]


def test_best_and_latest_of_one_epoch_are_written_once(tmp_path, small_models):
    import os

    from micro_sam._checkpoints import safe_load

    train_loader, val_loader, _ = _loaders(True, n_train=2, n_val=1, shape=(64, 64))
    kwargs = dict(n_objects_per_batch=2, device="cpu", n_sub_iteration=1, save_root=str(tmp_path),
                  verify_n_labels_in_loader=1, with_segmentation_decoder=True)
    folder = tmp_path / "checkpoints" / "once"
    train_sam("once", "vit_b", train_loader, val_loader, n_iterations=1, **kwargs)
    best, latest = folder / "best.pt", folder / "latest.pt"
    assert os.path.samefile(best, latest)  # the first epoch is the best one: the same file under both names
    first = safe_load(latest)
    assert first["iteration"] == 1 and "decoder_state" in first
    train_sam("once", "vit_b", train_loader, val_loader, n_iterations=1, load_from_checkpoint="latest", **kwargs)
    assert safe_load(latest)["iteration"] == 2
    best_state = safe_load(best)
    if best_state["iteration"] == 1:  # not improved: the new latest replaced the name only
        assert not os.path.samefile(best, latest)
        for key, value in first["model_state"].items():
            assert torch.equal(best_state["model_state"][key], value)
    else:
        assert os.path.samefile(best, latest)


def test_resume_with_another_architecture_fails(tmp_path, small_models):
    train_loader, val_loader, _ = _loaders(False, n_train=2, n_val=1, shape=(64, 64))
    kwargs = dict(n_objects_per_batch=2, device="cpu", n_sub_iteration=1, save_root=str(tmp_path),
                  verify_n_labels_in_loader=1, with_segmentation_decoder=False)
    train_sam("run", "vit_b", train_loader, val_loader, n_iterations=2, **kwargs)
    small_models["dim"] = 32
    with pytest.raises(ValueError, match="does not fit the model being trained.*another model architecture"):
        train_sam("run", "vit_b", train_loader, val_loader, n_iterations=2, load_from_checkpoint="latest", **kwargs)
    assert _checkpoint(tmp_path)["iteration"] == 2
    with pytest.raises(ValueError, match="does not exist"):
        train_sam("run", "vit_b", train_loader, val_loader, n_iterations=2,
                  load_from_checkpoint=str(tmp_path / "missing.pt"), **kwargs)


def test_another_architecture_checkpoint_fails_before_training(tmp_path, vit_t_checkpoint):
    train_loader, val_loader, _ = _loaders(False, n_train=2, n_val=1, shape=(64, 64))
    with pytest.raises(ValueError, match="holds a vit_t model"):
        train_sam("run", "vit_b", train_loader, val_loader, n_iterations=2, checkpoint_path=vit_t_checkpoint,
                  n_objects_per_batch=2, with_segmentation_decoder=False, device="cpu", save_root=str(tmp_path),
                  verify_n_labels_in_loader=1)
    assert not (tmp_path / "checkpoints").exists()


class _Batches(list):
    batch_size = 1


def _custom_loader(x, y):
    return _Batches([(torch.as_tensor(x, dtype=torch.float32)[None, None],
                      torch.as_tensor(y, dtype=torch.float32)[None, None])])


@pytest.mark.parametrize("make,message", [
    (lambda im, lab: (im, lab > 0), "binary or semantic mask"),
    (lambda im, lab: (im, lab / 2.0), "non-integer values"),
    (lambda im, lab: (im, np.zeros_like(lab)), "without any object"),
    (lambda im, lab: (im.astype("float32") * 20, lab), r"values in \[.*\]; SAM needs values in \[0, 255\]"),
    (lambda im, lab: (im / 255.0 - 0.5, lab), "remove a normalisation"),
    (lambda im, lab: (im, np.where(lab > 2, 0, lab)), "at most 2 objects.*fewer than n_objects_per_batch=5"),
])
def test_bad_input_fails_before_training(tmp_path, small_models, make, message):
    images, labels = disk_images(1, shape=(64, 64), n_objects=4, radius=(5, 8))
    x, y = make(images[0], labels[0])
    loader = _custom_loader(x, y)
    with pytest.raises(ValueError, match=message):
        train_sam("bad", "vit_b", loader, loader, n_iterations=1, n_objects_per_batch=5,
                  with_segmentation_decoder=False, device="cpu", save_root=str(tmp_path))
    assert "sam" not in small_models  # nothing was built, let alone trained


def test_decoder_targets_must_match(tmp_path, small_models):
    train_loader, val_loader, _ = _loaders(False, n_train=2, n_val=1, shape=(64, 64))
    with pytest.raises(ValueError, match=r"expected \(B, 4, H, W\) with instance labels and the 3 decoder targets"):
        train_sam("bad", "vit_b", train_loader, val_loader, n_iterations=1, n_objects_per_batch=2,
                  with_segmentation_decoder=True, device="cpu", save_root=str(tmp_path))


def test_train_sam_for_configuration(monkeypatch):
    calls = []
    monkeypatch.setattr(training_module, "train_sam", lambda **kwargs: calls.append(kwargs))
    images, labels = disk_images(2, shape=(64, 64), n_objects=4, radius=(5, 8))
    common = dict(raw_paths=images, raw_key=None, label_paths=labels, label_key=None, patch_shape=(64, 64),
                  with_segmentation_decoder=False, n_samples=4)
    loader = default_sam_loader(**common)

    train_sam_for_configuration("run", loader, loader, configuration="A100", model_type="vit_l")
    kwargs = calls.pop()
    assert kwargs["model_type"] == "vit_l" and kwargs["n_objects_per_batch"] == 30 and kwargs["freeze"] is None
    assert kwargs["train_loader"].batch_size == 2 and kwargs["val_loader"] is loader

    train_sam_for_configuration("run", loader, loader, configuration="gtx1080", n_objects_per_batch=3)
    kwargs = calls.pop()
    assert kwargs["model_type"] == "vit_b" and kwargs["freeze"] == ["image_encoder"]
    assert kwargs["n_objects_per_batch"] == 3 and kwargs["train_loader"] is loader

    user_loader = default_sam_loader(batch_size=4, **common)
    with pytest.warns(UserWarning, match="batch size 4.*tested with batch size 1"):
        train_sam_for_configuration("run", user_loader, loader, configuration="CPU")
    assert calls.pop()["train_loader"] is user_loader

    with pytest.raises(ValueError, match="not tested on the resource 'CPU_32GB'"):
        train_sam_for_configuration("run", loader, loader, configuration="CPU", model_type="vit_h")

    monkeypatch.setattr(training_module, "find_best_configuration", lambda: "rtx5000")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_sam_for_configuration("run", loader, loader)
    assert calls.pop()["n_objects_per_batch"] == 10


def test_instance_segmentation_training_and_export(tmp_path, small_models, monkeypatch):
    from segment_anything import SamPredictor

    train_loader, val_loader, _ = _loaders(True, n_train=2, n_val=1, shape=(64, 64),
                                           train_instance_segmentation_only=True)
    assert next(iter(train_loader))[1].shape[1] == 3
    from micro_sam.training import training as training_module

    commuted = []
    original = training_module.commute_upsamplers
    monkeypatch.setattr(training_module, "commute_upsamplers", lambda model: commuted.append(original(model)))
    train_instance_segmentation("ais", "vit_b", train_loader, val_loader, n_iterations=2, device="cpu",
                                save_root=str(tmp_path), verify_n_labels_in_loader=1)
    assert commuted == [8]  # the UNETR's upsamplers convolve before they interpolate (same function, faster)
    trained = tmp_path / "checkpoints" / "ais" / "best.pt"
    state = torch.load(trained, weights_only=True)["model_state"]
    assert any(k.startswith("encoder.") for k in state) and any(k.startswith("decoder.") for k in state)

    base = small_sam(seed=7, dim=64)
    monkeypatch.setattr(micro_sam.util, "get_sam_model", lambda **kwargs: SamPredictor(base))
    output = tmp_path / "exported.pt"
    export_instance_segmentation_model(trained, output, "vit_b")
    exported = torch.load(output, weights_only=True)
    assert set(exported) == {"model_state", "decoder_state"}
    assert torch.equal(exported["model_state"]["image_encoder.patch_embed.proj.weight"],
                       state["encoder.patch_embed.proj.weight"])
    assert torch.equal(exported["model_state"]["mask_decoder.iou_token.weight"],
                       base.mask_decoder.iou_token.weight)
    assert torch.equal(exported["decoder_state"]["out_conv.weight"], state["out_conv.weight"])


@pytest.mark.slow
def test_vit_t_training_exports_a_micro_sam_model(tmp_path, vit_t_checkpoint):
    """One iteration of vit_t with the full UNETR decoder; the export loads with micro_sam's model loaders."""
    from micro_sam.instance_segmentation import get_predictor_and_decoder
    from micro_sam.util import export_custom_sam_model, get_sam_model

    train_loader, val_loader, _ = _loaders(True, n_train=1, n_val=1, shape=(64, 64))
    train_sam("vit_t_run", "vit_t", train_loader, val_loader, n_iterations=1, checkpoint_path=vit_t_checkpoint,
              n_objects_per_batch=2, n_sub_iteration=1, device="cpu", save_root=str(tmp_path),
              verify_n_labels_in_loader=1, lr=1e-3)
    best = tmp_path / "checkpoints" / "vit_t_run" / "best.pt"
    state = torch.load(best, weights_only=True)
    exported = tmp_path / "exported.pt"
    export_custom_sam_model(best, "vit_t", exported, with_segmentation_decoder=True)

    predictor = get_sam_model(model_type="vit_t", checkpoint_path=exported, device="cpu")
    assert predictor.model_type == "vit_t"
    trained = state["model_state"]["sam.mask_decoder.iou_token.weight"]
    assert torch.equal(predictor.model.mask_decoder.iou_token.weight, trained)
    initial = torch.load(vit_t_checkpoint, weights_only=True)["mask_decoder.iou_token.weight"]
    assert not torch.equal(trained, initial)  # it was trained
    predictor, decoder = get_predictor_and_decoder("vit_t", checkpoint_path=exported, device="cpu")
    assert torch.equal(decoder.out_conv.weight, state["decoder_state"]["out_conv.weight"])
