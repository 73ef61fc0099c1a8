"""Simpler training schemes: one prompt per object, no correction rounds (``SimpleSamTrainer``, ``MedSAMTrainer``)."""
from __future__ import annotations

import random

from .sam_trainer import SamTrainer

__all__ = ["SimpleSamTrainer", "MedSAMTrainer"]


class SimpleSamTrainer(SamTrainer):
    """Train SAM with a single prompt per object (one point or one box) and a single prediction round.

    There are no correction points and no mask prompts (``n_sub_iteration=1``, ``mask_prob=0``). With both prompt
    types allowed, each iteration picks one at random.

    Args:
        use_points: Prompt with one positive point (three masks predicted).
        use_box: Prompt with the object's box (one mask predicted).
        kwargs: Arguments of :class:`~micro_sam.training.sam_trainer.SamTrainer` (without ``n_sub_iteration`` and
            ``mask_prob``).
    """

    def __init__(self, use_points: bool = True, use_box: bool = True, **kwargs):
        if not (use_points or use_box):
            raise ValueError("Choose at least one prompt type: use_points or use_box.")
        super().__init__(n_sub_iteration=1, mask_prob=0, **kwargs)
        self.use_points = use_points
        self.use_box = use_box

    def _get_prompt_and_multimasking_choices(self, current_iteration: int):
        point, box = (1, 0, False, True), (0, 0, True, False)
        if self.use_points and self.use_box:
            return random.choice([point, box])
        return point if self.use_points else box

    def _get_prompt_and_multimasking_choices_for_val(self, current_iteration: int):
        return self._get_prompt_and_multimasking_choices(current_iteration)


class MedSAMTrainer(SimpleSamTrainer):
    """The training scheme of MedSAM (https://arxiv.org/abs/2304.12306): box prompts only, one round."""

    def __init__(self, **kwargs):
        super().__init__(use_points=False, use_box=True, **kwargs)
