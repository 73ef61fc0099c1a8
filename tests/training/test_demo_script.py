"""scripts/train_demo_model.py: assembling the bundled model from the checkpoints of its training stages."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo_model.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_assemble_takes_each_part_from_its_stage(tmp_path):
    script = _script()
    t = {name: torch.full((2,), float(i)) for i, name in enumerate("abcdefgh")}
    joint = tmp_path / "joint.pt"
    torch.save({"model_state": {"image_encoder.w": t["a"], "prompt_encoder.w": t["b"], "mask_decoder.w": t["c"]},
                "decoder_state": {"base.w": t["d"]}, "image_size": 512}, joint)
    interactive = tmp_path / "interactive.pt"  # a SamTrainer checkpoint: "sam." prefixed, no decoder
    torch.save({"model_state": {"sam.image_encoder.w": t["e"], "sam.prompt_encoder.w": t["f"],
                                "sam.mask_decoder.w": t["g"]}, "iteration": 3}, interactive)
    unetr = tmp_path / "unetr.pt"  # a train_instance_segmentation checkpoint: the UNETR with its encoder
    torch.save({"model_state": {"encoder.w": t["e"], "base.w": t["h"]}, "iteration": 5}, unetr)

    out = tmp_path / "assembled.pt"
    script.assemble(str(joint), str(out), prompt_parts_from=str(interactive), decoder_from=str(unetr))
    result = torch.load(out, weights_only=True)
    assert result["image_size"] == 512
    assert torch.equal(result["model_state"]["image_encoder.w"], t["a"])      # encoder of the joint stage
    assert torch.equal(result["model_state"]["prompt_encoder.w"], t["f"])     # prompt parts of the interactive one
    assert torch.equal(result["model_state"]["mask_decoder.w"], t["g"])
    assert list(result["decoder_state"]) == ["base.w"] and torch.equal(result["decoder_state"]["base.w"], t["h"])

    # a decoder stage that also trained the encoder: encoder and UNETR decoder from its checkpoint
    both = tmp_path / "both.pt"
    script.assemble(str(joint), str(both), decoder_from=str(unetr), encoder_from=str(unetr))
    result = torch.load(both, weights_only=True)
    assert torch.equal(result["model_state"]["image_encoder.w"], t["e"])
    assert torch.equal(result["model_state"]["prompt_encoder.w"], t["b"])
    assert torch.equal(result["decoder_state"]["base.w"], t["h"])
    with pytest.raises(ValueError, match="no UNETR trainer checkpoint"):
        script.assemble(str(joint), str(both), encoder_from=str(interactive))

    half = tmp_path / "half.pt"
    script.export_half_precision(str(out), str(half))
    exported = torch.load(half, weights_only=True)
    assert exported["image_size"] == 512 and exported["model_state"]["mask_decoder.w"].dtype == torch.float16
    resized = tmp_path / "resized.pt"
    script.assemble(str(half), str(resized), image_size=640)  # same weights, another encoder input size
    result = torch.load(resized, weights_only=True)
    assert result["image_size"] == 640 and torch.equal(result["model_state"]["mask_decoder.w"], t["g"].half())
    assert not list(tmp_path.glob("*.tmp-*"))


def test_assemble_stage_needs_the_base_model(capsys):
    import pytest

    with pytest.raises(SystemExit):
        _script().main(["--stage", "assemble", "--save-root", "unused"])
    assert "--stage assemble needs --init-from" in capsys.readouterr().err


def test_interactive_freeze_trains_the_encoder_end_with_frozen_batch_norms():
    from micro_sam.models.build_sam import _build_vit_t
    from micro_sam.training.trainable_sam import TrainableSAM

    script = _script()
    assert script._interactive_freeze(0, 256) == ["image_encoder"]
    sam = _build_vit_t(256)
    freeze = script._interactive_freeze(1, 256)
    for name, parameter in sam.named_parameters():
        parameter.requires_grad_(not any(name.startswith(prefix) for prefix in freeze))
    trainable = {name.split(".")[0] for name, p in sam.image_encoder.named_parameters() if p.requires_grad}
    assert trainable == {"layers", "neck"}
    assert all(name.startswith("3.") for name, p in sam.image_encoder.layers.named_parameters() if p.requires_grad)
    model = TrainableSAM(sam).train()
    norms = [m for m in sam.image_encoder.layers[3].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and sam.image_encoder.layers[3].blocks[0].mlp.training
    assert model.sam.mask_decoder.training
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        script._interactive_freeze(6, 256)


def test_styled_training_images_are_normalised_as_for_inference():
    from micro_sam._image import to_image
    from micro_sam.sample_data import synthetic_cells_2d, synthetic_nuclei_2d

    script = _script()
    images, labels = script._images(9, (96, 96), 500, data="styles", empty_fraction=0.0, min_objects=2)
    again, _ = script._images(9, (96, 96), 500, data="styles", empty_fraction=0.0, min_objects=2)
    for image, other in zip(images, again):
        np.testing.assert_array_equal(image, other)
    for i, (image, label) in enumerate(zip(images, labels)):
        assert image.dtype == np.uint8 and image.shape == label.shape == (96, 96)
        assert image.min() == 0 and image.max() >= 254  # stretched to the full range, as to_image does
        assert len(np.unique(label)) - 1 >= 2
    # every fourth image comes from the old generators (nuclei, cells, ...), normalised the same way
    nuclei, nuclei_labels = synthetic_nuclei_2d((96, 96), seed=500)
    np.testing.assert_array_equal(images[0], to_image(nuclei)[..., 0])
    np.testing.assert_array_equal(labels[0], nuclei_labels)
    np.testing.assert_array_equal(images[4], to_image(synthetic_cells_2d((96, 96), seed=504)[0])[..., 0])
    # images without objects only where asked for
    _, labels = script._images(40, (64, 64), 900, data="styles", empty_fraction=0.5)
    assert 5 < sum(label.max() == 0 for label in labels) < 25
