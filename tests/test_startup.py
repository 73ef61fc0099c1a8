"""Start-up: what inference imports, and that the deferred torchvision import changes no result.

Loading a model with its AIS decoder and computing embeddings imports neither torchvision (deferred, see
micro_sam._segment_anything) nor torch_em's package with its trainer, tensorboard, elf and scikit-learn (the
decoder network is micro_sam.models.unetr_decoder).
"""
import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.parametrize("shape, target", [((300, 410, 3), 1024), ((512, 512, 3), 640), ((37, 1200, 3), 1024),
                                           ((1025, 999, 3), 640)])
def test_resize_equals_segment_anythings_transform(shape, target):
    from segment_anything.utils.transforms import ResizeLongestSide

    from micro_sam._segment_anything import resize_longest_side

    image = np.random.default_rng(0).integers(0, 255, shape, dtype="uint8")
    np.testing.assert_array_equal(resize_longest_side(image, target), ResizeLongestSide(target).apply_image(image))


_INFERENCE = """
import sys
import numpy as np
from micro_sam import util
from micro_sam.sample_data import synthetic_nuclei_2d
image = synthetic_nuclei_2d((96, 128), seed=0)[0]
from micro_sam.automatic_segmentation import get_predictor_and_segmenter
predictor, segmenter = get_predictor_and_segmenter(model_type="vit_t_demo", device="cpu")  # with the AIS decoder
features = util.precompute_image_embeddings(predictor, image, verbose=False)["features"]
print(sorted({m.split(".")[0] for m in sys.modules} & {"torchvision", "torch_em", "tensorboard", "elf", "sklearn"}))

# torchvision is still there when asked for: the real package, also behind segment_anything's resize.
import torchvision.ops
from segment_anything.utils import transforms
pil_image = transforms.to_pil_image(np.zeros((4, 6, 3), dtype="uint8"))
print(type(pil_image).__name__, pil_image.size, torchvision.ops.nms.__module__)
"""


def test_inference_does_not_import_torchvision_or_training_code():
    out = subprocess.run([sys.executable, "-c", _INFERENCE], capture_output=True, text=True, check=True).stdout
    imported, deferred = out.strip().splitlines()
    assert imported == "[]"
    assert deferred == "Image (6, 4) torchvision.ops.boxes"
