import random

import numpy as np
import pytest
import torch
import torch_em

from micro_sam.training import ConvertToSamInputs, JointSamTrainer, SamTrainer, TrainableSAM
from micro_sam.training.joint_sam_trainer import _shares_encoder
from micro_sam.training.sam_trainer import plain_metadata

from ._helpers import disk_images, small_sam, small_unetr


class _Loader(list):
    """A list of (x, y) batches with the attributes torch_em's trainer reads from a DataLoader."""

    batch_size = 1
    dataset = None


def _batches(n, with_decoder, shape=(64, 64), seed=0):
    from torch_em.transform.label import PerObjectDistanceTransform

    images, labels = disk_images(n, shape=shape, n_objects=4, seed=seed, radius=(5, 8))
    transform = PerObjectDistanceTransform(distances=True, boundary_distances=True, directed_distances=False,
                                           foreground=True, instances=True, min_size=0)
    batches = _Loader()
    for image, label in zip(images, labels):
        x = torch.from_numpy(image)[None, None].float()
        y = torch.from_numpy(transform(label))[None].float() if with_decoder else \
            torch.from_numpy(label.astype("float32"))[None, None]
        batches.append((x, y))
    return batches


def _trainer(tmp_path, with_decoder, n_sub_iteration=3, mask_prob=0.5, low_res_loss=True, seed=0):
    model = TrainableSAM(small_sam(seed=seed))
    loader = _batches(2, with_decoder)
    kwargs = dict(name="test", save_root=str(tmp_path), train_loader=loader, val_loader=loader, model=model,
                  device="cpu", lr_scheduler=None, logger=None, log_image_interval=100, mixed_precision=False,
                  convert_inputs=ConvertToSamInputs(model.transform), n_objects_per_batch=3,
                  n_sub_iteration=n_sub_iteration, compile_model=False, mask_prob=mask_prob,
                  low_res_loss=low_res_loss)
    if with_decoder:
        unetr = small_unetr(model.sam.image_encoder)
        params = list(model.parameters()) + [p for n, p in unetr.named_parameters() if not n.startswith("encoder")]
        loss = torch_em.loss.DiceBasedDistanceLoss(mask_distances_in_bg=True)
        return JointSamTrainer(unetr=unetr, instance_loss=loss, instance_metric=loss,
                               optimizer=torch.optim.AdamW(params, lr=1e-4), **kwargs)
    return SamTrainer(optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4), **kwargs)


def test_low_res_targets_are_area_averages(tmp_path):
    trainer = _trainer(tmp_path, False)
    objects = torch.zeros(1, 1, 1, 64, 64)
    objects[..., 8:16, 9:16] = 1  # rows 8-15, columns 9-15
    # The 64 x 64 image is resized to the 256 x 256 model input; its low-res logits are 64 x 64 too.
    (soft, binary), = trainer._loss_targets([{"input_size": (256, 256)}], objects)
    assert torch.equal(soft, objects[0])
    # A 128 x 128 image: 2 x 2 image pixels per low-res pixel.
    objects = torch.zeros(1, 1, 1, 128, 128)
    objects[..., 8:16, 9:16] = 1
    (soft, binary), = trainer._loss_targets([{"input_size": (256, 256)}], objects)
    assert soft.shape == (1, 1, 64, 64)
    assert torch.allclose(soft[0, 0, 4:8, 5:8], torch.ones(4, 3))
    assert torch.allclose(soft[0, 0, 4:8, 4], torch.full((4,), 0.5))
    assert float(soft.sum()) == pytest.approx(8 * 7 / 4)
    assert int(binary.sum()) == 4 * 4  # >= 0.5 keeps the half-covered column
    # An object smaller than a low-res pixel keeps its most covered pixel.
    objects = torch.zeros(1, 1, 1, 128, 128)
    objects[..., 41, 60] = 1
    (soft, binary), = trainer._loss_targets([{"input_size": (256, 256)}], objects)
    assert binary.sum() == 1 and binary[0, 0, 20, 30]


class _FixedPoints:
    """A prompt generator stand-in: always the positive point (x=10, y=5) and the negative one (x=0, y=3)."""

    def __init__(self):
        self.calls = []

    def __call__(self, segmentation, prediction):
        self.calls.append((segmentation.clone(), prediction.clone()))
        n = segmentation.shape[0]
        coords = torch.tensor([[[10, 5], [0, 3]]] * n)
        return coords, torch.tensor([[1, 0]] * n), None, None


def test_correction_points_in_the_model_frame(tmp_path):
    trainer = _trainer(tmp_path, False, mask_prob=1.0)
    trainer.prompt_generator = _FixedPoints()
    targets = [(torch.zeros(2, 1, 64, 64), torch.zeros(2, 1, 64, 64, dtype=torch.bool))]
    logits = torch.full((2, 3, 64, 64), -1.0)
    logits[1, 2, :4, :4] = 5.0
    iou = torch.tensor([[0.1, 0.9, 0.2], [0.1, 0.2, 0.9]])
    record = {"input_size": (256, 256), "original_size": (128, 128),
              "point_coords": torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]]), "point_labels": torch.ones(2, 1)}
    (record,) = trainer._update_prompts([record], [{"low_res_masks": logits, "iou_predictions": iou}], targets)
    # The best mask (by predicted IoU) of object 1 is its third: binarised, it is the 4 x 4 corner.
    _, prediction = trainer.prompt_generator.calls[0]
    assert prediction[0].sum() == 0 and prediction[1, 0, :4, :4].all() and prediction[1].sum() == 16
    # Low-res pixel (x, y) -> centre of its 4 x 4 block in the 256 x 256 model input.
    assert torch.allclose(record["point_coords"][0], torch.tensor([[1.0, 2.0], [41.5, 21.5], [1.5, 13.5]]))
    assert record["point_labels"].tolist() == [[1, 1, 0], [1, 1, 0]]
    assert torch.equal(record["mask_inputs"], logits[[0, 1], [1, 2]].unsqueeze(1))


def test_full_resolution_correction_points(tmp_path):
    trainer = _trainer(tmp_path, False, mask_prob=0.0, low_res_loss=False)
    trainer.prompt_generator = _FixedPoints()
    masks = torch.full((1, 1, 128, 128), -1.0)
    record = {"input_size": (256, 256), "original_size": (128, 128), "mask_inputs": torch.zeros(1, 1, 64, 64)}
    output = {"low_res_masks": torch.zeros(1, 1, 64, 64), "masks": masks, "iou_predictions": torch.ones(1, 1)}
    targets = [(torch.zeros(1, 1, 128, 128), torch.zeros(1, 1, 128, 128, dtype=torch.bool))]
    (record,) = trainer._update_prompts([record], [output], targets)
    assert torch.allclose(record["point_coords"], torch.tensor([[[20.0, 10.0], [0.0, 6.0]]]))
    assert "mask_inputs" not in record


def test_decoder_runs_on_the_shared_embeddings():
    model = TrainableSAM(small_sam())
    unetr = small_unetr(model.sam.image_encoder).eval()
    assert _shares_encoder(unetr, model)
    assert not _shares_encoder(small_unetr(small_sam().image_encoder), model)
    x = torch.rand(2, 1, 96, 64) * 255
    with torch.no_grad():
        processed, input_size = model.preprocess(x)
        shared = unetr.decode((model.sam.image_encoder(processed), None, None), input_size, (96, 64))
        direct = unetr(x)
    assert torch.allclose(shared, direct, atol=1e-5)


@pytest.mark.parametrize("with_decoder", [False, True])
def test_piecewise_backward_gives_the_gradients_of_the_summed_loss(tmp_path, with_decoder):
    from contextlib import nullcontext

    trainer = _trainer(tmp_path, with_decoder, n_sub_iteration=3, mask_prob=0.5)
    trainer._iteration = 1  # box prompts, then two correction rounds
    x, y = trainer.train_loader[0]
    modules = [trainer.model] + ([trainer.unetr] if with_decoder else [])

    def gradients():
        return [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]

    np.random.seed(1), random.seed(1)
    trainer.optimizer.zero_grad()
    trainer._train_step(x, y, nullcontext)
    piecewise = gradients()

    np.random.seed(1), random.seed(1)
    trainer.optimizer.zero_grad()
    labels = y[:, :1]
    n_pos, n_neg, boxes, multimask = trainer._get_prompt_and_multimasking_choices(1)
    inputs, ids = trainer.convert_inputs(x, labels, n_pos, n_neg, boxes, trainer.n_objects_per_batch)
    inputs, y_one_hot = trainer._preprocess_batch(inputs, labels, ids)
    embeddings, inputs = trainer.model.image_embeddings_oft(inputs)
    total = 0.0
    if with_decoder:
        total = trainer._instance_iteration(x, y[:, 1:], image_embeddings=embeddings,
                                            input_size=inputs[0]["input_size"])
    loss = trainer._compute_iterative_loss(inputs, y_one_hot, 3, multimask, image_embeddings=embeddings)[0]
    (total + loss).backward()
    summed = gradients()

    assert len(piecewise) == len(summed) > 0
    for a, b in zip(piecewise, summed):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_plain_metadata_keeps_only_data():
    metadata = {"name": "run", "n": 3, "lr": 1e-5, "flags": [True, None], "shape": (1, 2),
                "dataset": object(), "nested": {"loader": object(), "batch_size": 2}, "values": np.float32(0.5),
                "weights": torch.ones(2), "mixed": [1, object()]}
    plain = plain_metadata(metadata)
    assert plain == {"name": "run", "n": 3, "lr": 1e-5, "flags": [True, None], "shape": (1, 2),
                     "nested": {"batch_size": 2}, "values": 0.5, "weights": plain["weights"]}
    assert isinstance(plain["values"], float)


def test_commuted_upsamplers_compute_the_same_function():
    import copy

    from micro_sam.training.joint_sam_trainer import CommutedUpsampler2d, commute_upsamplers

    unetr = small_unetr(small_sam(dim=64).image_encoder).train()
    commuted = copy.deepcopy(unetr)
    assert commute_upsamplers(commuted) == 8  # 3 decoder levels, 4 deconv blocks, the output upsampler
    assert isinstance(commuted.deconv_out, CommutedUpsampler2d) and commute_upsamplers(commuted) == 0
    assert commuted.state_dict().keys() == unetr.state_dict().keys()
    # In double precision the two agree to rounding (float32 differs by ~1e-3 relative in the input gradient:
    # the normalisation layers amplify the different rounding of the reordered sums).
    embeddings = torch.randn(1, 64, 16, 16, dtype=torch.float64)
    outputs, grads = [], []
    for model in (unetr.double(), commuted.double()):
        x = embeddings.clone().requires_grad_()
        out = model.decode((x, None, None), (256, 256), (96, 96))
        (out * torch.linspace(0, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs.append(out.detach())
        grads.append((x.grad, model.base.block[1].weight.grad))
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_simple_trainers_use_one_prompt_and_one_round(tmp_path):
    from micro_sam.training import MedSAMTrainer, SimpleSamTrainer

    model = TrainableSAM(small_sam(dim=64))
    loader = _batches(1, False)
    kwargs = dict(name="simple", save_root=str(tmp_path), train_loader=loader, val_loader=loader, model=model,
                  optimizer=torch.optim.AdamW(model.parameters()), device="cpu", logger=None, mixed_precision=False,
                  convert_inputs=ConvertToSamInputs(model.transform), compile_model=False)
    medsam = MedSAMTrainer(**kwargs)
    assert (medsam.n_sub_iteration, medsam.mask_prob) == (1, 0.0)
    assert {medsam._get_prompt_and_multimasking_choices(i) for i in range(6)} == {(0, 0, True, False)}
    points = SimpleSamTrainer(use_box=False, **kwargs)
    assert {points._get_prompt_and_multimasking_choices_for_val(i) for i in range(6)} == {(1, 0, False, True)}
    random.seed(0)
    both = SimpleSamTrainer(**kwargs)
    assert len({both._get_prompt_and_multimasking_choices(i) for i in range(20)}) == 2
    with pytest.raises(ValueError, match="at least one prompt type"):
        SimpleSamTrainer(use_points=False, use_box=False, **kwargs)
