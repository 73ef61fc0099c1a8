import numpy as np
import pytest
import torch

from micro_sam.training import ConvertToSamInputs, TrainableSAM, get_trainable_sam_model

from ._helpers import small_sam


def test_preprocess_matches_segment_anything_for_square_images():
    sam = small_sam()
    model = TrainableSAM(sam)
    x = torch.rand(2, 3, 64, 64) * 255
    processed, input_size = model.preprocess(x)
    assert input_size == (256, 256) and processed.shape == (2, 3, 256, 256)
    expected = sam.preprocess(torch.nn.functional.interpolate(x, (256, 256), mode="bilinear", align_corners=False,
                                                              antialias=True))
    assert torch.allclose(processed, expected, atol=1e-4)


def test_preprocess_keeps_the_aspect_ratio():
    model = TrainableSAM(small_sam())
    # Grayscale (one channel, broadcast to RGB), batch of 2, 64 x 32: resized to 256 x 128 and padded.
    x = torch.full((2, 1, 64, 32), 100.0)
    processed, input_size = model.preprocess(x)
    assert input_size == (256, 128)
    assert processed.shape == (2, 3, 256, 256)
    expected = (100.0 - model.sam.pixel_mean.flatten()) / model.sam.pixel_std.flatten()
    assert torch.allclose(processed[0, :, 10, 10], expected, atol=1e-4)
    assert torch.all(processed[:, :, :, 128:] == 0)


def test_forward_matches_sam_predictor():
    from segment_anything import SamPredictor

    sam = small_sam(seed=1).eval()
    model = TrainableSAM(sam)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(48, 64, 3)).astype("uint8")
    predictor = SamPredictor(sam)
    predictor.set_image(image)

    x = torch.from_numpy(image).permute(2, 0, 1).float()
    record = {"image": x, "original_size": (48, 64)}
    coords = torch.tensor([[[10.0, 20.0]], [[40.0, 5.0]]])  # (x, y) in the original image
    record["point_coords"] = model.transform.apply_coords_torch(coords, (48, 64))
    record["point_labels"] = torch.ones(2, 1, dtype=torch.int64)
    with torch.no_grad():
        embeddings, (record,) = model.image_embeddings_oft([record])
        output = model([record], embeddings, multimask_output=True)[0]
        masks, iou, low_res = predictor.predict_torch(
            predictor.transform.apply_coords_torch(coords, (48, 64)), torch.ones(2, 1), multimask_output=True,
            return_logits=True,
        )
    # The predictor resizes with PIL on uint8, the training model with torch on floats: close, not equal.
    assert torch.allclose(embeddings, predictor.features, atol=0.05)
    assert output["low_res_masks"].shape == (2, 3, 64, 64) and output["masks"].shape == (2, 3, 48, 64)
    with torch.no_grad():
        again = model([record], predictor.features, multimask_output=True)[0]
    assert torch.allclose(again["low_res_masks"], low_res, atol=1e-4)
    assert torch.allclose(again["iou_predictions"], iou, atol=1e-5)
    assert torch.allclose(again["masks"], masks, atol=1e-3)


def test_convert_to_sam_inputs_gives_prompts_of_the_sampled_objects():
    labels = np.zeros((40, 80), dtype="int64")
    labels[5:15, 10:30] = 3
    labels[20:35, 50:70] = 7
    x = torch.zeros(1, 1, 40, 80)
    y = torch.from_numpy(labels)[None, None].float()
    model = TrainableSAM(small_sam())
    convert = ConvertToSamInputs(transform=model.transform)

    (record,), (ids,) = convert(x, y, n_pos=2, n_neg=0, get_boxes=True)
    assert ids.tolist() == [3, 7]
    # Model input: the 40 x 80 image is resized by 256 / 80 = 3.2.
    assert torch.allclose(record["boxes"], torch.tensor([[10, 5, 30, 15], [50, 20, 70, 35]]) * 3.2)
    points = record["point_coords"] / 3.2  # back to (x, y) in the image
    for obj, label_id in enumerate(ids):
        for px, py in points[obj].round().long().tolist():
            assert labels[py, px] == label_id
    assert record["point_labels"].tolist() == [[1, 1], [1, 1]]

    (record,), (ids,) = convert(x, y, n_pos=0, n_neg=0, get_boxes=True, n_samples=1)
    assert len(ids) == 1 and ids[0] in (3, 7) and "point_coords" not in record

    with pytest.raises(ValueError, match="no objects"):
        convert(x, torch.zeros_like(y), 1, 0)


def test_box_distortion_stays_in_the_image():
    labels = np.zeros((40, 80), dtype="int64")
    labels[0:10, 0:80] = 1
    convert = ConvertToSamInputs(transform=None, box_distortion_factor=0.5)
    np.random.seed(0)
    (record,), _ = convert(torch.zeros(1, 1, 40, 80), torch.from_numpy(labels)[None, None].float(), 0, 0, True)
    x0, y0, x1, y1 = record["boxes"][0].tolist()
    assert (x0, y0, x1) == (0, 0, 80) and 10 <= y1 <= 15


def test_get_trainable_sam_model_freezes_and_checks(vit_t_checkpoint):
    model = get_trainable_sam_model("vit_t", device="cpu", checkpoint_path=vit_t_checkpoint,
                                    freeze=["image_encoder", "prompt_encoder"])
    assert isinstance(model, TrainableSAM)
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mask_decoder"}
    with pytest.raises(ValueError, match="holds a vit_t model.*asks for vit_b"):
        get_trainable_sam_model("vit_b", device="cpu", checkpoint_path=vit_t_checkpoint)
    with pytest.raises(ValueError, match="Cannot freeze 'encoder'.*image_encoder, prompt_encoder, mask_decoder"):
        get_trainable_sam_model("vit_t", device="cpu", checkpoint_path=vit_t_checkpoint, freeze="encoder")
    with pytest.raises(ValueError, match="freeze=\\['image_encoder'\\] and peft_kwargs cannot be combined"):
        get_trainable_sam_model("vit_t", device="cpu", checkpoint_path=vit_t_checkpoint, peft_kwargs={"rank": 2},
                                freeze=["image_encoder"])


def test_frozen_parts_to_eval_switches_only_fully_frozen_submodules():
    from micro_sam.training import frozen_parts_to_eval

    frozen = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2), torch.nn.Dropout())
    mixed = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.Conv2d(2, 2, 1))
    model = torch.nn.Sequential(frozen, mixed, torch.nn.Dropout()).train()
    frozen.requires_grad_(False)
    mixed[0].requires_grad_(False)
    assert frozen_parts_to_eval(model) is model
    # the frozen block with its parameter-free dropout, and the frozen norm inside the partly trainable block
    assert [m.training for m in frozen] == [False, False, False] and not mixed[0].training
    # trainable layers and parameter-free modules outside frozen parts keep training mode
    assert mixed[1].training and mixed.training and model[2].training and model.training


def test_frozen_vit_t_encoder_keeps_its_batch_norm_statistics(vit_t_checkpoint):
    model = get_trainable_sam_model("vit_t", device="cpu", checkpoint_path=vit_t_checkpoint,
                                    freeze=["image_encoder"])
    norms = [m for m in model.sam.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms, "vit_t's TinyViT has batch norms"
    before = [m.running_mean.clone() for m in norms]
    model.train()
    assert model.sam.mask_decoder.training and not model.sam.image_encoder.training
    rng = np.random.default_rng(0)
    inputs = [{"image": torch.from_numpy(rng.integers(0, 255, (3, 64, 64)).astype("float32")),
               "original_size": (64, 64)}]
    embeddings, _ = model.image_embeddings_oft(inputs)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))
    model.eval()
    expected, _ = model.image_embeddings_oft(inputs)
    assert torch.allclose(embeddings, expected, atol=1e-5)


def _count_encoder_calls(model):
    calls = []
    model.sam.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_embedding_cache_reuses_embeddings_of_a_frozen_encoder():
    model = TrainableSAM(small_sam(), embedding_cache_size=2)
    model.sam.image_encoder.requires_grad_(False)
    model.train()
    calls = _count_encoder_calls(model)
    rng = np.random.default_rng(0)
    images = {name: torch.from_numpy(rng.integers(0, 255, (3, 32, 48)).astype("float32")) for name in "abc"}

    def embed(name):
        embeddings, (record,) = model.image_embeddings_oft([{"image": images[name].clone()}])
        return embeddings, record["input_size"]

    first, size = embed("a")
    again, size_again = embed("a")  # same content, another tensor: from the cache
    assert len(calls) == 1 and again is first and size_again == size == (171, 256)
    embed("b")
    embed("c")  # evicts "a", the least recently used
    assert len(calls) == 3
    recomputed, _ = embed("a")
    assert len(calls) == 4 and torch.equal(recomputed, first)
    assert not first.requires_grad
    model.load_state_dict(model.state_dict())  # new weights: the cached embeddings are stale
    embed("a")
    assert len(calls) == 5


def test_embedding_cache_keeps_the_output_of_frozen_leading_stages():
    from micro_sam.models.build_sam import _build_vit_t

    torch.manual_seed(0)
    sam = _build_vit_t(256)
    encoder = sam.image_encoder
    for stage in encoder.stages[:4]:  # patch embedding and three layers frozen; the last layer and neck train
        stage.requires_grad_(False)
    model = TrainableSAM(sam, embedding_cache_size=4).train()
    assert not encoder.layers[2].training and encoder.layers[3].training
    trunk_calls, rest_calls = [], []
    encoder.layers[2].register_forward_hook(lambda *args: trunk_calls.append(1))
    encoder.layers[3].register_forward_hook(lambda *args: rest_calls.append(1))
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 255, (3, 64, 64)).astype("float32"))

    first, _ = model.image_embeddings_oft([{"image": image.clone()}])
    second, (record,) = model.image_embeddings_oft([{"image": image.clone()}])
    assert len(trunk_calls) == 1 and len(rest_calls) == 2 and record["input_size"] == (256, 256)
    # the trainable part runs on the cached features, with gradients
    second.sum().backward()
    assert encoder.neck[0].weight.grad is not None and encoder.layers[3].blocks[0].mlp.fc1.weight.grad is not None
    assert all(p.grad is None for p in encoder.layers[2].parameters())
    with torch.no_grad():
        expected = encoder(model.preprocess(image[None])[0])
    torch.testing.assert_close(first.detach(), expected, rtol=0, atol=1e-4)  # no-grad fast path rounds
    torch.testing.assert_close(second.detach(), expected, rtol=0, atol=1e-4)
    # a trainable first stage: nothing can be cached
    encoder.patch_embed.requires_grad_(True)
    model.train()
    n_calls = len(trunk_calls)
    model.image_embeddings_oft([{"image": image.clone()}])
    assert len(trunk_calls) == n_calls + 1


def test_embedding_cache_is_bypassed_for_a_trainable_encoder():
    model = TrainableSAM(small_sam(), embedding_cache_size=8).train()
    calls = _count_encoder_calls(model)
    inputs = [{"image": torch.full((3, 32, 32), 7.0)}]
    for _ in range(2):
        embeddings, _ = model.image_embeddings_oft(inputs)
    assert len(calls) == 2 and embeddings.requires_grad
    with pytest.raises(ValueError, match="embedding_cache_size must be >= 0"):
        TrainableSAM(small_sam(), embedding_cache_size=-1)


def test_instance_segmentation_trainer_keeps_a_frozen_encoder_in_eval():
    from micro_sam.training.training import InstanceSegmentationTrainer

    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)
    trainer = object.__new__(InstanceSegmentationTrainer)
    trainer.model, trainer.loss, trainer._iteration, trainer.log_image_interval = model, torch.nn.MSELoss(), 1, 50
    model.train()  # as DefaultTrainer does at the start of each epoch
    trainer._forward_and_loss(torch.rand(4, 3) * 10, torch.zeros(4, 1))
    assert not model[0].training and model[1].training
    assert torch.equal(model[0].running_mean, torch.zeros(3))
