"""Evaluation of Segment Anything models on microscopy data.

- `metrics`: object matching scores (mean segmentation accuracy, precision, recall, F1), pure numpy.
- `evaluation`: scores for folders / lists of predictions.
- `instance_segmentation`: grid search, inference and evaluation for automatic instance segmentation.
- `experiments`: the standard prompt settings for evaluating prompt-based segmentation.
- `inference`: prompt-based inference with prompts derived from the ground truth, incl. iterative prompting.
- `point_prompts`: IoU of the mask from one click inside each annotated object (`point_prompt_ious`).

Importing this package does not import torch.
"""

from .instance_segmentation import (
    run_instance_segmentation_inference,
    run_instance_segmentation_grid_search,
    run_instance_segmentation_grid_search_and_inference,
)
from .evaluation import (
    run_evaluation,
    run_evaluation_for_iterative_prompting,
)
from .inference import (
    run_inference_with_iterative_prompting,
    run_inference_with_prompts,
    precompute_all_embeddings,
    precompute_all_prompts,
)
from .experiments import (
    default_experiment_settings,
    full_experiment_settings,
    get_experiment_setting_name,
)
