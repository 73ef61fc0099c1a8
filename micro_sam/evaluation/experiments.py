"""Standard prompt settings for the evaluation of prompt-based segmentation.

An experiment setting is a dictionary with the keys
``use_points`` (bool), ``use_boxes`` (bool), ``n_positives`` (int) and ``n_negatives`` (int).
"""

from typing import Dict, List, Optional

__all__ = ["full_experiment_settings", "default_experiment_settings", "get_experiment_setting_name"]

ExperimentSetting = Dict
ExperimentSettings = List[ExperimentSetting]
"""@private"""

_KEYS = ("use_points", "use_boxes", "n_positives", "n_negatives")


def _setting(use_points: bool, use_boxes: bool, n_positives: int, n_negatives: int) -> ExperimentSetting:
    return {"use_points": use_points, "use_boxes": use_boxes, "n_positives": n_positives, "n_negatives": n_negatives}


def full_experiment_settings(
    use_boxes: bool = False,
    positive_range: Optional[List[int]] = None,
    negative_range: Optional[List[int]] = None,
) -> ExperimentSettings:
    """All combinations of numbers of positive and negative point prompts.

    Args:
        use_boxes: Whether to add a box prompt to every point setting, and a box-only setting at the start.
        positive_range: The numbers of positive points. By default [1, 2, 4, 8, 16].
        negative_range: The numbers of negative points. By default [0, 1, 2, 4, 8, 16].

    Returns:
        The experiment settings: the box-only setting first (if `use_boxes`), then the point settings
            ordered by number of positives, then negatives. The combination of 0 positives and 0 negatives is skipped.
    """
    positive_range = [1, 2, 4, 8, 16] if positive_range is None else list(positive_range)
    negative_range = [0, 1, 2, 4, 8, 16] if negative_range is None else list(negative_range)

    settings = [_setting(False, True, 0, 0)] if use_boxes else []
    settings.extend(
        _setting(True, use_boxes, n_pos, n_neg)
        for n_pos in positive_range for n_neg in negative_range
        if n_pos != 0 or n_neg != 0
    )
    return settings


def default_experiment_settings() -> ExperimentSettings:
    """The default prompt settings: 1 positive point; 2 positive and 4 negative points;
    4 positive and 8 negative points; a single box.

    Returns:
        The four experiment settings, in this order.
    """
    return [
        _setting(True, False, 1, 0),
        _setting(True, False, 2, 4),
        _setting(True, False, 4, 8),
        _setting(False, True, 0, 0),
    ]


def get_experiment_setting_name(setting: ExperimentSetting) -> str:
    """Name of an experiment setting, used as sub-folder for its predictions.

    Args:
        setting: The experiment setting.

    Returns:
        "points/p{n_positives}-n{n_negatives}" for settings with points (also if a box is used in addition),
            "box/p0-n0" for box-only settings.

    Raises:
        ValueError: If the setting misses a key or uses neither points nor boxes.
    """
    missing = [key for key in _KEYS if key not in setting]
    if missing:
        raise ValueError(f"The experiment setting {setting} is missing the keys {missing}.")
    if not (setting["use_points"] or setting["use_boxes"]):
        raise ValueError(f"The experiment setting {setting} uses neither points nor boxes.")
    if setting["use_points"]:
        return f"points/p{setting['n_positives']}-n{setting['n_negatives']}"
    return "box/p0-n0"
