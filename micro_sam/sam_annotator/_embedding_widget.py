"""The embedding widget (model, device, tiling, cache path) and the automatic segmentation widget.

Both start their work in the background (``tool.tasks``) with a progress bar in napari; the result is put into
the state and the layers on the main thread.
"""

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from magicgui.widgets import CheckBox, Container, FloatSpinBox, PushButton, SpinBox

from .. import util
from . import _layers
from ._background import show_error, show_info, show_warning
from ._state import SEGMENTATION_MODES, spatial_shape


def available_devices() -> list:
    """The device choices of this machine: "auto", "cpu", and "cuda" / "mps" when available."""
    import torch

    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def tiling_inputs(tile_shape: Tuple[int, int], halo: Tuple[int, int]):
    """Widget values to (tile_shape, halo): (0, 0) means no tiling.

    Raises:
        ValueError: Only one tile size set, or a halo without tiles.
    """
    tile_shape, halo = tuple(int(t) for t in tile_shape), tuple(int(h) for h in halo)
    if tile_shape == (0, 0):
        if any(halo):
            raise ValueError(f"A halo {halo} was set without a tile shape; set the tile shape too, or the halo to 0.")
        return None, None
    if 0 in tile_shape:
        raise ValueError(f"Set both tile sizes (y, x) for tiling, got {tile_shape}; (0, 0) means no tiling.")
    return tile_shape, halo


def compute_embeddings(
    tool,
    image_layer,
    model_type: str = util._DEFAULT_MODEL,
    custom_weights: Optional[Path] = None,
    device: str = "auto",
    embeddings_save_path: Optional[Path] = None,
    tile_shape: Tuple[int, int] = (0, 0),
    halo: Tuple[int, int] = (0, 0),
    automatic_segmentation_mode: str = "auto",
):
    """Load the model and compute (or load) the embeddings of ``image_layer`` in the background.

    Invalid settings are reported before any work starts. Returns the worker (None if nothing started).
    """
    state = tool.state
    if not tool.ready(need_embeddings=False):
        return None
    if image_layer is None:
        show_error("There is no image layer to compute embeddings for; open an image first.")
        return None
    try:
        shape = spatial_shape(image_layer.data.shape, state.ndim, image_layer.rgb)
        tile_shape, halo = tiling_inputs(tile_shape, halo)
        if automatic_segmentation_mode not in SEGMENTATION_MODES:
            raise ValueError(f"Unknown automatic segmentation mode {automatic_segmentation_mode!r}.")
        if custom_weights is not None and not Path(custom_weights).is_file():
            raise ValueError(f"The custom weights {str(custom_weights)!r} are not a file.")
    except ValueError as error:
        show_error(f"{image_layer.name!r}: {error}")
        return None
    data, rgb, name = image_layer.data, image_layer.rgb, image_layer.name
    scale = tuple(image_layer.scale)[-len(shape):]
    save_path = None if embeddings_save_path in (None, "") else str(embeddings_save_path)
    checkpoint = None if custom_weights in (None, "") else str(custom_weights)

    def work(pbar_init, pbar_update):
        pbar_init(0, f"Load the model {model_type}")
        state.load_model(model_type, checkpoint, device, prefer_decoder=automatic_segmentation_mode != "amg")
        state.set_segmentation_mode(automatic_segmentation_mode)
        state.compute_embeddings(data, save_path, tile_shape, halo, rgb=rgb, pbar_init=pbar_init,
                                 pbar_update=pbar_update)

    def done(_):
        state.image_scale, state.image_name = scale, name
        tool.image_changed()
        show_info(f"Computed the embeddings of {name!r} with the model {state.model_name!r}"
                  + ("" if save_path is None else f" (cached in {save_path!r})") + ".")

    return tool.tasks.run(work, "Compute image embeddings", on_returned=done)


def embedding_widget(tool):
    """The 'Compute Embeddings' widget: image layer, model, custom weights, device, cache path, tiling."""
    import napari
    from magicgui import magicgui

    @magicgui(
        call_button="Compute Embeddings",
        image={"label": "image layer"},
        model_type={"choices": util.get_model_names(), "label": "model",
                    "tooltip": "vit_t_demo works offline; other models are downloaded on first use. With custom "
                               "weights: their architecture (vit_t, vit_b, ...)."},
        custom_weights={"mode": "r", "filter": "*.pt *.pth", "tooltip": "A model file, e.g. from the training UI."},
        device={"choices": available_devices()},
        embeddings_save_path={"mode": "d", "tooltip": "A zarr folder to cache the embeddings (reused next time)."},
        tile_shape={"tooltip": "Tile shape (y, x) for large images; (0, 0): no tiling."},
        halo={"tooltip": "Overlap (y, x) of the tiles."},
        automatic_segmentation_mode={"choices": list(SEGMENTATION_MODES),
                                     "tooltip": "auto: AIS when the model has a decoder, else AMG."},
    )
    def embeddings(
        image: napari.layers.Image,
        model_type: str = util._DEFAULT_MODEL,
        custom_weights: Optional[Path] = None,
        device: str = "auto",
        embeddings_save_path: Optional[Path] = None,
        tile_shape: Tuple[int, int] = (0, 0),
        halo: Tuple[int, int] = (0, 0),
        automatic_segmentation_mode: str = "auto",
    ):
        return compute_embeddings(tool, image, model_type, custom_weights, device, embeddings_save_path,
                                  tile_shape, halo, automatic_segmentation_mode)

    layers = tool.viewer.layers
    layers.events.inserted.connect(embeddings.reset_choices)
    layers.events.removed.connect(embeddings.reset_choices)
    embeddings.reset_choices()
    embeddings._long_running = True
    return embeddings


def sync_embedding_widget(widget, model_type=None, save_path=None, checkpoint_path=None, device=None,
                          tile_shape=None, halo=None, image_layer=None) -> None:
    """Show the settings a tool was started with in its embedding widget."""
    if image_layer is not None:
        widget.image.value = image_layer
    if model_type is not None and model_type in widget.model_type.choices:
        widget.model_type.value = model_type
    if save_path is not None and not isinstance(save_path, dict):
        widget.embeddings_save_path.value = str(save_path)
    if checkpoint_path is not None:
        widget.custom_weights.value = str(checkpoint_path)
    if device is not None and str(device) in widget.device.choices:
        widget.device.value = str(device)
    if tile_shape is not None:
        widget.tile_shape.value = tuple(int(t) for t in tile_shape)
    if halo is not None:
        widget.halo.value = tuple(int(h) for h in halo)


# --- automatic segmentation ----------------------------------------------------------------------------------
class AutoSegmentWidget(Container):
    """The 'Automatic Segmentation' widget: AIS settings with a decoder, AMG settings otherwise.

    Calling the widget runs the segmentation (of the image, the current slice, or with ``apply_to_volume``
    the whole volume) in the background; the result goes to ``auto_segmentation``.
    """

    _long_running = True

    def __init__(self, tool, volumetric: bool):
        def threshold(name, value, tooltip):
            return FloatSpinBox(name=name, value=value, min=0.0, max=1.0, step=0.01, tooltip=tooltip)

        self._tool, self.volumetric = tool, volumetric
        self.ais = Container(name="ais_settings", widgets=[
            threshold("center_distance_thresh", 0.5, "Seeds need a centre distance below this value."),
            threshold("boundary_distance_thresh", 0.5, "Seeds need a boundary distance below this value."),
        ])
        self.amg = Container(name="amg_settings", widgets=[
            threshold("pred_iou_thresh", 0.88, "Keep masks with a predicted IoU above this value."),
            threshold("stability_score_thresh", 0.95, "Keep masks with a stability score above this value."),
            threshold("box_nms_thresh", 0.7, "Boxes overlapping more than this are duplicates."),
        ])
        common = [SpinBox(name="min_object_size", value=100, min=0, max=100000, tooltip="Remove smaller objects.")]
        if volumetric:
            common.insert(0, CheckBox(name="apply_to_volume", value=False, text="Apply to Volume",
                                      tooltip="Segment the whole volume (slices merged in 3D), not only this slice."))
            common += [SpinBox(name="gap_closing", value=2, min=0, max=10, tooltip="Close gaps of this many slices."),
                       SpinBox(name="min_extent", value=2, min=0, max=10, tooltip="Remove objects in fewer slices.")]
        run_button = PushButton(name="run_button", text="Automatic Segmentation")
        super().__init__(widgets=[self.ais, self.amg] + common + [run_button])
        run_button.changed.connect(lambda *args: self())
        self._on_image_changed()

    def _on_image_changed(self) -> None:
        """Show the AIS or the AMG settings, whichever the current model and mode use."""
        with_decoder = self._tool.state.with_decoder
        self.ais.visible, self.amg.visible = with_decoder, not with_decoder
        self.ais._inactive, self.amg._inactive = not with_decoder, with_decoder

    def _generate_kwargs(self) -> dict:
        if self._tool.state.with_decoder:
            return {"center_distance_threshold": self.ais.center_distance_thresh.value,
                    "boundary_distance_threshold": self.ais.boundary_distance_thresh.value}
        return {name: getattr(self.amg, name).value
                for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")}

    def __call__(self):
        """Run the automatic segmentation in the background; returns the worker (None if it cannot run)."""
        from ._widgets import current_slice

        tool = self._tool
        if not tool.ready():
            return None
        state, viewer = tool.state, tool.viewer
        self._on_image_changed()
        kwargs, min_size = self._generate_kwargs(), self.min_object_size.value
        whole_volume = self.volumetric and self.apply_to_volume.value
        z = current_slice(viewer) if self.volumetric and not whole_volume else None
        gap_closing = self.gap_closing.value if self.volumetric else None
        min_extent = self.min_extent.value if self.volumetric else None

        def work(pbar_init, pbar_update):
            if whole_volume:
                return state.segment_volume_automatically(min_size, gap_closing, min_extent, pbar_init=pbar_init,
                                                          pbar_update=pbar_update, **kwargs)
            return state.segment_automatically(z, min_size, pbar_init=pbar_init, pbar_update=pbar_update, **kwargs)

        def done(segmentation):
            layer = viewer.layers[_layers.AUTO_SEGMENTATION]
            if z is None:
                layer.data = segmentation
            else:
                layer.data[z] = segmentation
                layer.refresh()
            _layers.select_layer(viewer, _layers.AUTO_SEGMENTATION)
            if not np.any(segmentation):
                hint = "" if state.with_decoder else " and 'pred_iou_thresh' / 'stability_score_thresh'"
                show_warning(f"The automatic segmentation found no objects; try a smaller 'min_object_size'{hint}.")

        return tool.tasks.run(work, "Automatic segmentation", on_returned=done)
