"""The training UI: finetune a model on annotated images from napari, and export it for the annotators.

The widget reads the data folders and settings, builds the datasets with
``micro_sam.training.default_sam_dataset``, trains with ``micro_sam.training.train_sam_for_configuration``
(the hardware table's settings) in a worker thread with a progress bar, and exports the best checkpoint with
``micro_sam.util.export_custom_sam_model``: the exported file loads in the annotators as custom weights.
"""
import os
import warnings
from pathlib import Path
from typing import Optional

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, LineEdit, PushButton, SpinBox, TupleEdit

from .. import util
from ._background import show_error, show_info


class _Signal:
    """What ``train_sam``'s ``pbar_signals`` needs of a signal: ``emit``."""

    def __init__(self, function):
        self.emit = function


class _ProgressSignals:
    """Adapts the tool's progress callbacks to ``train_sam``'s ``pbar_signals`` (total, update, description)."""

    def __init__(self, pbar_init, pbar_update):
        self._total, self._description = 0, "Training"
        self.pbar_total = _Signal(self._set_total)
        self.pbar_description = _Signal(self._set_description)
        self.pbar_update = _Signal(pbar_update)
        self._init = pbar_init

    def _set_total(self, total):
        self._total = int(total or 0)
        self._init(self._total, self._description)

    def _set_description(self, description):
        self._description = str(description)
        self._init(self._total, self._description)


def _is_set(value) -> bool:
    return value is not None and str(value) not in ("", ".")


class TrainingWidget(Container):
    """Finetune a SAM model on images and instance labels (napari: Plugins > micro_sam > Finetuning).

    Args:
        viewer: The napari viewer (only used for messages; the widget also works without one).
    """

    _long_running = True

    def __init__(self, viewer=None) -> None:
        from ..training import CONFIGURATIONS, find_best_configuration
        from ._background import TaskRunner
        from ._embedding_widget import available_devices

        self._viewer = viewer
        configuration = find_best_configuration()
        super().__init__(widgets=[
            FileEdit(name="raw_path", mode="d", label="images",
                     tooltip="A folder with the images (select the files with 'image key'), or a container file."),
            LineEdit(name="raw_key", value="", label="image key",
                     tooltip="A glob pattern in the folder (e.g. *.tif), or the dataset in a zarr / hdf5 file."),
            FileEdit(name="label_path", mode="d", label="labels", tooltip="The instance labels, like the images."),
            LineEdit(name="label_key", value="", label="label key"),
            ComboBox(name="configuration", choices=list(CONFIGURATIONS), value=configuration,
                     tooltip="The tested settings of the hardware closest to yours (the hardware table)."),
            CheckBox(name="with_segmentation_decoder", value=True, text="with segmentation decoder (AIS)"),
            ComboBox(name="device", choices=available_devices(), value="auto"),
            TupleEdit(name="patch_shape", value=(512, 512), tooltip="(y, x) size of the training patches."),
            FileEdit(name="raw_path_val", mode="d", nullable=True, label="validation images",
                     tooltip="Default: 10 % of the training images (at least one)."),
            FileEdit(name="label_path_val", mode="d", nullable=True, label="validation labels"),
            LineEdit(name="model_name", value="sam_model", label="model name",
                     tooltip="Checkpoints go to <save root>/checkpoints/<model name>/."),
            ComboBox(name="model_type", choices=util.get_model_names(), label="initial model",
                     value=CONFIGURATIONS[configuration]["model_type"],
                     tooltip="The model to start from (vit_t_demo works offline)."),
            FileEdit(name="custom_weights", mode="r", nullable=True, filter="*.pt *.pth",
                     tooltip="Start from these weights instead (their architecture is the initial model's)."),
            FileEdit(name="save_root", mode="d", nullable=True,
                     tooltip="Where checkpoints/<name>/ and logs go; default the working directory."),
            FileEdit(name="output_path", mode="w", nullable=True, filter="*.pt",
                     tooltip="The exported model file; default <save root>/<name>.pt."),
            SpinBox(name="n_epochs", value=100, min=1, max=10000),
            SpinBox(name="n_iterations", value=0, min=0, max=10000000,
                    tooltip="Train this many iterations instead of n_epochs (0: use n_epochs)."),
            PushButton(name="run_button", text="Start Training"),
        ])
        self.run_button.changed.connect(lambda *args: self())
        self.tasks = TaskRunner(on_busy_changed=lambda busy: setattr(self.run_button, "enabled", not busy))
        tasks = self.tasks
        self.native.destroyed.connect(lambda *args: tasks.close())
        #: The path of the last exported model.
        self.exported_path: Optional[str] = None

    def _validate(self) -> dict:
        """The training settings, or a ValueError saying what is missing."""
        from ..training import get_training_configuration

        missing = [label for label, value in (("images", self.raw_path.value), ("labels", self.label_path.value))
                   if not _is_set(value) or not os.path.exists(str(value))]
        if missing:
            raise ValueError(f"The path to the {' and the '.join(missing)} is missing or does not exist.")
        if _is_set(self.raw_path_val.value) != _is_set(self.label_path_val.value):
            raise ValueError("Give both the validation images and labels, or neither.")
        name = self.model_name.value.strip()
        if not name or os.sep in name:
            raise ValueError(f"The model name must be a non-empty name without {os.sep!r}, got {name!r}.")
        if _is_set(self.custom_weights.value) and not Path(self.custom_weights.value).is_file():
            raise ValueError(f"The custom weights {str(self.custom_weights.value)!r} are not a file.")
        if min(self.patch_shape.value) < 16:
            raise ValueError(f"The patch shape {self.patch_shape.value} is too small (at least 16 x 16).")
        save_root = str(self.save_root.value) if _is_set(self.save_root.value) else os.getcwd()
        output = str(self.output_path.value) if _is_set(self.output_path.value) else \
            os.path.join(save_root, f"{name}.pt")
        if os.path.splitext(output)[1] not in (".pt", ".pth"):
            raise ValueError(f"The output path must end with .pt or .pth, got {output!r}.")
        model_type, configuration = self.model_type.value, self.configuration.value
        try:
            get_training_configuration(configuration, model_type)
            tested = True
        except ValueError:
            tested = False
        return {
            "name": name, "model_type": model_type, "configuration": configuration, "tested": tested,
            "save_root": save_root, "output_path": output,
            "checkpoint_path": str(self.custom_weights.value) if _is_set(self.custom_weights.value) else None,
            "device": None if self.device.value == "auto" else self.device.value,
            "with_segmentation_decoder": self.with_segmentation_decoder.value,
            "patch_shape": tuple(int(p) for p in self.patch_shape.value),
            "n_epochs": self.n_epochs.value, "n_iterations": self.n_iterations.value or None,
        }

    def _loaders(self, settings: dict):
        import torch
        import torch_em

        from ..training import default_sam_dataset

        def dataset(raw, raw_key, label, label_key, is_train):
            return default_sam_dataset(
                raw_paths=str(raw), raw_key=raw_key or None, label_paths=str(label), label_key=label_key or None,
                patch_shape=settings["patch_shape"], is_train=is_train,
                with_segmentation_decoder=settings["with_segmentation_decoder"],
            )

        raw_key, label_key = self.raw_key.value.strip(), self.label_key.value.strip()
        train = dataset(self.raw_path.value, raw_key, self.label_path.value, label_key, True)
        if _is_set(self.raw_path_val.value):
            val = dataset(self.raw_path_val.value, raw_key, self.label_path_val.value, label_key, False)
        else:  # 10 % of the training patches (at least one) for validation
            n_val = max(1, int(0.1 * len(train)))
            generator = torch.Generator().manual_seed(0)
            train, val = torch.utils.data.random_split(train, [len(train) - n_val, n_val], generator=generator)
        loader = torch_em.segmentation.get_data_loader
        return loader(train, batch_size=1, shuffle=True, num_workers=0), \
            loader(val, batch_size=1, shuffle=True, num_workers=0)

    def __call__(self):
        """Start the training in the background; returns the worker (None if the settings are invalid)."""
        if self.tasks.busy:
            show_error("A training is running already.")
            return None
        try:
            settings = self._validate()
        except ValueError as error:
            show_error(str(error))
            return None

        def work(pbar_init, pbar_update):
            from ..training import get_training_configuration, train_sam, train_sam_for_configuration

            pbar_init(0, "Prepare the training data")
            train_loader, val_loader = self._loaders(settings)
            common = dict(name=settings["name"], train_loader=train_loader, val_loader=val_loader,
                          checkpoint_path=settings["checkpoint_path"], model_type=settings["model_type"],
                          with_segmentation_decoder=settings["with_segmentation_decoder"], device=settings["device"],
                          n_epochs=settings["n_epochs"], n_iterations=settings["n_iterations"],
                          save_root=settings["save_root"], pbar_signals=_ProgressSignals(pbar_init, pbar_update))
            if settings["tested"]:
                train_sam_for_configuration(configuration=settings["configuration"], **common)
            else:  # the configuration's tested settings, with the model the user chose
                tested = get_training_configuration(settings["configuration"])
                warnings.warn(f"The configuration {settings['configuration']!r} was tested with "
                              f"{tested['model_type']}, not {settings['model_type']}; its settings are used anyway.")
                train_sam(freeze=tested["freeze"] or None, n_objects_per_batch=tested["n_objects_per_batch"], **common)
            pbar_update(0)  # stop here if the tool was closed
            best = os.path.join(settings["save_root"], "checkpoints", settings["name"], "best.pt")
            util.export_custom_sam_model(best, model_type=settings["model_type"][:5],
                                         save_path=settings["output_path"],
                                         with_segmentation_decoder=settings["with_segmentation_decoder"])
            return settings["output_path"]

        def done(path):
            self.exported_path = path
            show_info(f"The training has finished; the model was exported to {path!r}. Load it in the annotators "
                      f"as custom weights (model {settings['model_type'][:5]}).")

        return self.tasks.run(work, "Training", on_returned=done)
