"""Training (finetuning) Segment Anything for microscopy.

Main entry points: :func:`train_sam` (interactive segmentation, optionally with the decoder for automatic
instance segmentation), :func:`train_sam_for_configuration` (with the settings tested for a hardware resource,
see :func:`get_training_configuration`), :func:`train_instance_segmentation` and the data helpers
:func:`default_sam_dataset` / :func:`default_sam_loader`. Parameter-efficient finetuning: ``peft_kwargs`` (see
:mod:`micro_sam.models.peft_sam`); semantic segmentation: :class:`SemanticSamTrainer`.
"""
from .configurations import CONFIGURATIONS, find_best_configuration, get_training_configuration
from .joint_sam_trainer import JointSamLogger, JointSamTrainer
from .sam_trainer import SamLogger, SamTrainer
from .semantic_sam_trainer import SemanticMapsSamTrainer, SemanticSamTrainer
from .simple_sam_trainer import MedSAMTrainer, SimpleSamTrainer
from .trainable_sam import TrainableSAM, frozen_parts_to_eval
from .training import (
    default_sam_dataset, default_sam_loader, export_instance_segmentation_model, train_instance_segmentation,
    train_sam, train_sam_for_configuration,
)
from .util import ConvertToSamInputs, get_trainable_sam_model, identity

__all__ = [
    "CONFIGURATIONS", "ConvertToSamInputs", "JointSamLogger", "JointSamTrainer", "MedSAMTrainer", "SamLogger",
    "SamTrainer", "SemanticMapsSamTrainer", "SemanticSamTrainer", "SimpleSamTrainer",
    "TrainableSAM", "default_sam_dataset", "default_sam_loader", "export_instance_segmentation_model",
    "find_best_configuration", "frozen_parts_to_eval",
    "get_trainable_sam_model", "get_training_configuration", "identity",
    "train_instance_segmentation", "train_sam", "train_sam_for_configuration",
]
