"""PEFT model files: a QLoRA checkpoint (packed 4-bit encoder weights) becomes a loadable LoRA model
(util.export_custom_qlora_model), a LoRA model with a decoder, and checkpoints shared with micro_sam 1.8 both ways."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from micro_sam.models.build_sam import build_sam_vit_t
from micro_sam.models.peft_sam import PEFT_Sam
from micro_sam.util import export_custom_qlora_model, get_sam_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_qlora_checkpoint_exports_to_a_lora_model(tmp_path):
    torch.manual_seed(0)
    base = build_sam_vit_t(image_size=256).eval()
    base_path = tmp_path / "base.pt"
    torch.save({"model_state": base.state_dict(), "image_size": 256}, base_path)

    # What a QLoRA trainer checkpoint holds: the encoder's linear weights in bitsandbytes' packed format (uint8,
    # (n / 2, 1)) with their quantization state, trained LoRA matrices and a trained mask decoder.
    trained = PEFT_Sam(copy.deepcopy(base), rank=2, update_matrices=["q", "v", "mlp"]).sam.eval()
    with torch.no_grad():
        for name, parameter in trained.named_parameters():
            if "w_b_linear" in name or name.startswith("mask_decoder."):
                parameter.add_(torch.randn_like(parameter) * 0.05)
    model_state = {}
    for key, value in trained.state_dict().items():
        if key.startswith("image_encoder.") and key.endswith("_proj.weight") or key.endswith(("fc1.weight", "fc2.weight")):
            model_state[f"sam.{key}"] = torch.zeros(value.numel() // 2, 1, dtype=torch.uint8)
            model_state[f"sam.{key}.absmax"] = torch.ones(value.numel() // 64)
            model_state[f"sam.{key}.quant_state.bitsandbytes__nf4"] = torch.zeros(16, dtype=torch.uint8)
        else:
            model_state[f"sam.{key}"] = value
    finetuned = tmp_path / "best.pt"
    decoder_state = {"base.weight": torch.ones(2)}
    torch.save({"model_state": model_state, "decoder_state": decoder_state, "iteration": 10}, finetuned)

    out = tmp_path / "lora.pt"
    export_custom_qlora_model(base_path, finetuned, "vit_t", out)
    predictor, state = get_sam_model("vit_t", checkpoint_path=out, device="cpu", return_state=True,
                                     peft_kwargs={"rank": 2, "update_matrices": ["q", "v", "mlp"], "quantize": True})
    assert torch.equal(state["decoder_state"]["base.weight"], decoder_state["base.weight"])
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(predictor.model.image_encoder(x), trained.image_encoder(x), atol=1e-5)
    loaded = predictor.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())

    with pytest.raises(ValueError, match="holds no LoRA parameters"):
        export_custom_qlora_model(base_path, base_path, "vit_t", tmp_path / "nothing.pt")
    assert not (tmp_path / "nothing.pt").exists()


def test_predictor_and_decoder_of_a_lora_model_equal_the_unetr_module(tmp_path):
    """A LoRA model with an AIS decoder: get_predictor_and_decoder(peft_kwargs=...) on precomputed embeddings gives
    the maps of torch_em's UNETR module run on the image with the same (wrapped) encoder."""
    import numpy as np
    from segment_anything import SamPredictor

    from micro_sam.instance_segmentation import get_predictor_and_decoder, get_unetr

    torch.manual_seed(1)
    sam = PEFT_Sam(build_sam_vit_t(image_size=256), rank=2).sam.eval()
    with torch.no_grad():
        for name, parameter in sam.named_parameters():
            if "w_b_linear" in name:
                parameter.normal_(0, 0.05)
    unetr = get_unetr(sam.image_encoder, device="cpu")
    decoder_state = {k: v for k, v in unetr.state_dict().items() if not k.startswith("encoder.")}
    path = tmp_path / "lora_with_decoder.pt"
    torch.save({"model_state": sam.state_dict(), "decoder_state": decoder_state, "image_size": 256}, path)

    predictor, decoder = get_predictor_and_decoder("vit_t", path, device="cpu", peft_kwargs={"rank": 2})
    image = np.random.default_rng(0).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    predictor.set_image(image)
    reference = SamPredictor(sam)
    reference.set_image(image)
    with torch.no_grad():
        maps = decoder(predictor.features, predictor.input_size, predictor.original_size)
        expected = unetr(torch.from_numpy(image).permute(2, 0, 1)[None].float())  # train mode: batch statistics
    torch.testing.assert_close(predictor.features, reference.features, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=1e-4)


REFERENCE_PYTHON = "/tmp/micro-sam-reference/bin/python"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(REFERENCE_PYTHON), reason="needs micro_sam 1.8.14 in /tmp/micro-sam-reference")
def test_peft_checkpoints_load_both_ways_with_micro_sam_1_8():
    """scripts/check_reference_peft_compat.py against micro_sam 1.8.14: for every PEFT method the parameter names and
    shapes are micro_sam's (vit_b) and random-weight state dicts load strictly in both directions with the same
    encoder output (about 6 min on a busy 2-core machine)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    result = subprocess.run([sys.executable, os.path.join(root, "scripts", "check_reference_peft_compat.py"),
                             "--reference-python", REFERENCE_PYTHON], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "ALL COMPATIBLE" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("this package -> micro_sam 1.8:") == 10
    assert result.stdout.count("micro_sam 1.8 -> this package:") == 20
