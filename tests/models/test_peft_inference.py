"""Inference with a PEFT model through the fast paths (FastBlock / SDPA attention of get_sam_model, the lean mask
decoder of prompt-based and automatic segmentation) gives the masks of the unwrapped model whose weights have the
PEFT updates merged in."""
import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_sam

from micro_sam.models.fast_attention import FastBlock, optimize_sam
from micro_sam.models.peft_sam import PEFT_Sam

from .test_peft_sam import _blocks, _merge_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MATRICES = ["q", "k", "v"]


def _lora_and_merged(sam):
    """(LoRA model with random updates, the plain model with those updates merged into its weights)."""
    merged = copy.deepcopy(sam)
    lora = PEFT_Sam(sam, rank=2, update_matrices=MATRICES).sam.eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "w_b_linear" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        _merge_lora(merged, lora, MATRICES)
    return lora, merged.eval()


def _image():
    from micro_sam.sample_data import synthetic_nuclei_2d

    image, labels = synthetic_nuclei_2d((256, 256), seed=3)
    return image, labels


def _segment(predictor, image, labels, with_automatic=True):
    """Point and box masks for each object, the low-resolution logits, and automatic segmentation."""
    from micro_sam.instance_segmentation import AutomaticMaskGenerator
    from micro_sam.prompt_based_segmentation import segment_from_box, segment_from_points
    from micro_sam.util import precompute_image_embeddings

    embeddings = precompute_image_embeddings(predictor, image, verbose=False)
    masks, logits = [], []
    for object_id in range(1, 6):
        ys, xs = np.nonzero(labels == object_id)
        point = np.array([[int(np.median(ys)), int(np.median(xs))]])
        mask, _, logit = segment_from_points(predictor, point, np.array([1]), embeddings, return_all=True)
        masks.append(mask), logits.append(logit)
        box = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
        masks.append(segment_from_box(predictor, box, embeddings))
    automatic = None
    if with_automatic:
        amg = AutomaticMaskGenerator(predictor, points_per_side=4)
        amg.initialize(image, embeddings)
        automatic = amg.generate(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    return embeddings["features"], np.stack(masks), np.stack(logits), automatic


def _compare(lora_predictor, merged_predictor, with_automatic=True):
    image, labels = _image()
    features, masks, logits, automatic = _segment(lora_predictor, image, labels, with_automatic)
    e_features, e_masks, e_logits, e_automatic = _segment(merged_predictor, image, labels, with_automatic)
    features, e_features = np.asarray(features), np.asarray(e_features)
    np.testing.assert_allclose(features, e_features, atol=1e-4 * np.abs(e_features).max(), rtol=1e-4)
    np.testing.assert_allclose(logits, e_logits, atol=1e-3, rtol=1e-3)
    # masks: identical except where a logit lies within float rounding of the threshold
    assert np.mean(masks != e_masks) < 1e-4
    if with_automatic:
        assert automatic.max() > 0 and np.mean(automatic != e_automatic) < 1e-3


def test_lora_vit_on_the_fast_attention_path_gives_the_merged_models_masks():
    from segment_anything import SamPredictor

    lora, merged = _lora_and_merged(make_tiny_sam(seed=2))
    base_features = SamPredictor(make_tiny_sam(seed=2))
    optimize_sam(lora), optimize_sam(merged)
    with torch.no_grad():
        assert all(isinstance(b, FastBlock) and b._fast_path_ok(torch.zeros(1, 14, 14, 64)) for b in _blocks(lora))
    predictors = []
    for sam in (lora, merged):
        predictor = SamPredictor(sam)
        predictor.model_type, predictor.model_name, predictor._hash, predictor.checkpoint_path = \
            "vit_b", "vit_b_tiny", None, None
        predictors.append(predictor)
    # the LoRA update changes the result (so that the comparison means something)
    image, _ = _image()
    base_features.set_image(np.stack([image] * 3, axis=-1))
    predictors[1].set_image(np.stack([image] * 3, axis=-1))
    assert (base_features.features - predictors[1].features).abs().max() > 1e-2
    _compare(*predictors, with_automatic=False)


def test_lora_vit_t_from_get_sam_model_gives_the_merged_models_masks(tmp_path):
    """The bundled vit_t_demo (640 x 640 inputs) with LoRA updates, loaded by get_sam_model(peft_kwargs=...)."""
    from micro_sam import _checkpoints
    from micro_sam._registry import bundled_path, get_entry
    from micro_sam.models.build_sam import build_sam_vit_t
    from micro_sam.util import get_sam_model

    path = bundled_path(get_entry("vit_t_demo"))
    model_state, _, state = _checkpoints.split_checkpoint(_checkpoints.safe_load(path), str(path))
    sam = build_sam_vit_t(image_size=state["image_size"])
    sam.load_state_dict({key: value.float() for key, value in model_state.items()})
    lora, merged = _lora_and_merged(sam)
    for name, model in (("lora", lora), ("merged", merged)):
        torch.save({"model_state": model.state_dict(), "image_size": state["image_size"]}, tmp_path / f"{name}.pt")
    lora_predictor = get_sam_model("vit_t", checkpoint_path=tmp_path / "lora.pt", device="cpu",
                                   peft_kwargs={"rank": 2, "update_matrices": MATRICES})
    merged_predictor = get_sam_model("vit_t", checkpoint_path=tmp_path / "merged.pt", device="cpu")
    _compare(lora_predictor, merged_predictor)
