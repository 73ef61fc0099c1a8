"""The image series annotator: annotate a list of images (or a folder) one after the other.

Each image is shown in the 2D (or 3D) annotator; "Next Image [N]" saves the committed objects as
``<output_folder>/<image name>.tif`` (``seg_<index>.tif`` for arrays) and opens the next image, "Previous Image
[P]" goes back (its saved segmentation is loaded). Embeddings go to ``<embedding_path>/<image name>.zarr`` and
are computed in the background when an image is opened.
"""
from __future__ import annotations

import os
import sys
from glob import glob
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from magicgui.widgets import Container

from .. import util
from . import _layers
from ._annotator import show_or_return
from ._background import show_error, show_info, show_warning
from .annotator_2d import Annotator2d, _prepare_state, _start_tool
from .annotator_3d import Annotator3d

#: File extensions the image series annotator opens (read with imageio / tifffile).
IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".jp2")

ImageList = Union[Sequence[Union[str, os.PathLike]], Sequence[np.ndarray]]


def _write_segmentation(path: str, segmentation: np.ndarray) -> None:
    """Write a label image as a zlib-compressed tif, atomically (a temporary file renamed at the end)."""
    import tifffile

    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.tmp.tif")
    try:
        tifffile.imwrite(tmp, np.asarray(segmentation), compression="zlib")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _ImageSeries:
    """The list of images of a series, where their results go, and moving between them in a tool."""

    def __init__(self, images: ImageList, output_folder, embedding_path, initial_segmentations, is_volumetric,
                 skip_segmented, tile_shape, halo):
        if len(images) == 0:
            raise ValueError("The image series is empty: pass at least one image.")
        if initial_segmentations is not None and len(initial_segmentations) != len(images):
            raise ValueError(f"There are {len(images)} images but {len(initial_segmentations)} initial "
                             "segmentations; pass one per image.")
        self.images, self.output_folder = list(images), os.fspath(output_folder)
        self.arrays = isinstance(self.images[0], np.ndarray)
        self.embedding_path = None if embedding_path is None else os.fspath(embedding_path)
        self.initial_segmentations = initial_segmentations
        self.ndim = 3 if is_volumetric else 2
        self.skip_segmented, self.tile_shape, self.halo = skip_segmented, tile_shape, halo
        self.index: Optional[int] = None
        self.tool = None
        self.model_args: Optional[dict] = None
        self.unreadable: set = set()
        os.makedirs(self.output_folder, exist_ok=True)

    def name(self, i: int) -> str:
        """How image ``i`` is called in messages (its file name)."""
        return f"image {i:05}" if self.arrays else os.path.basename(os.fspath(self.images[i]))

    def _stem(self, i: int, prefix: str) -> str:
        return f"{prefix}_{i:05}" if self.arrays else Path(self.images[i]).stem

    def save_path(self, i: int) -> str:
        """Where the segmentation of image ``i`` is saved."""
        return os.path.join(self.output_folder, self._stem(i, "seg") + ".tif")

    def embedding_file(self, i: int) -> Optional[str]:
        """The embedding cache of image ``i`` (None without ``embedding_path``)."""
        if self.embedding_path is None:
            return None
        return os.path.join(self.embedding_path, self._stem(i, "embedding") + ".zarr")

    def read(self, i: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The image and the segmentation to start from (saved result, else the initial segmentation)."""
        image = self.images[i] if self.arrays else util.load_image_data(os.fspath(self.images[i]))
        segmentation = None
        if os.path.exists(self.save_path(i)):
            segmentation = util.load_image_data(self.save_path(i))
        elif self.initial_segmentations is not None:
            initial = self.initial_segmentations[i]
            segmentation = initial if isinstance(initial, np.ndarray) else util.load_image_data(os.fspath(initial))
        return image, segmentation

    def next_index(self, start: int, step: int) -> Optional[int]:
        """The next image to open from ``start`` in direction ``step`` (skipping segmented ones going forward
        and unreadable ones)."""
        i = start
        while 0 <= i < len(self.images):
            segmented = self.skip_segmented and step > 0 and os.path.exists(self.save_path(i))
            if not segmented and i not in self.unreadable:
                return i
            i += step
        return None

    def read_next(self, start: Optional[int], step: int):
        """Read the image ``start`` or, if it cannot be read, the next readable one in direction ``step``.

        Returns:
            (index or None, image, segmentation, messages about the images that were skipped).
        """
        i, skipped = start, []
        while i is not None:
            try:
                image, segmentation = self.read(i)
                return i, image, segmentation, skipped
            except ValueError as error:
                skipped.append(f"{self.name(i)}: {error}")
                self.unreadable.add(i)
                i = self.next_index(i + step, step)
        return None, None, None, skipped

    # --- in the viewer ---------------------------------------------------------------------------------------
    def save_current(self) -> bool:
        """Save the committed objects of the open image; returns success (an error is shown otherwise)."""
        viewer = self.tool.viewer
        segmentation = viewer.layers[_layers.COMMITTED_OBJECTS].data
        if viewer.layers[_layers.CURRENT_OBJECT].data.any():
            show_warning(f"{self.name(self.index)}: the object in 'current_object' was not committed and is not "
                         "saved.")
        try:
            _write_segmentation(self.save_path(self.index), segmentation)
        except OSError as error:
            show_error(f"The segmentation of {self.name(self.index)} could not be saved to "
                       f"{self.save_path(self.index)!r}: {error}. The image stays open.")
            return False
        if not segmentation.any():
            show_warning(f"Nothing was committed in {self.name(self.index)}: an empty segmentation was saved.")
        return True

    def go(self, step: int):
        """Save the current image's objects and open the next (+1) or previous (-1) image in the background."""
        if not self.tool.ready(need_embeddings=False):
            return None
        if not self.save_current():
            return None
        target = self.next_index(self.index + step, step)
        if target is None:
            where = "last" if step > 0 else "first"
            show_info(f"This is the {where} image to annotate; all segmentations are saved in "
                      f"{self.output_folder!r}.")
            return None
        return self.open(target)

    def open(self, target: int):
        """Open image ``target`` in the tool (embeddings in the background); unreadable images are skipped."""
        state = self.tool.state
        step = 1 if self.index is None or target >= self.index else -1

        def work(pbar_init, pbar_update):
            if self.model_args is not None:  # started from the widget: the model is loaded here
                state.load_model(**self.model_args)
            i, skipped = target, []
            while True:
                i, image, segmentation, unreadable = self.read_next(i, step)
                skipped += unreadable
                if i is None:
                    return None, None, None, skipped
                try:
                    state.compute_embeddings(image, self.embedding_file(i), self.tile_shape, self.halo,
                                             pbar_init=pbar_init, pbar_update=pbar_update)
                    return i, image, segmentation, skipped
                except ValueError as error:  # e.g. an image of the wrong dimensionality
                    skipped.append(f"{self.name(i)}: {error}")
                    self.unreadable.add(i)
                    i = self.next_index(i + step, step)

        def done(result):
            i, image, segmentation, skipped = result
            for message in skipped:
                show_error(f"Skipped {message}")
            if i is None:
                show_info("There is no further image to annotate.")
                return
            self.show(i, image, segmentation)

        return self.tool.tasks.run(work, f"Open {self.name(target)}", on_returned=done)

    def show(self, i: int, image: np.ndarray, segmentation: Optional[np.ndarray]) -> None:
        """Show image ``i`` (its embeddings are in the state) with ``segmentation`` in committed_objects."""
        viewer, tool = self.tool.viewer, self.tool
        self.index = i
        if "image" in viewer.layers:
            viewer.layers["image"].data = image
        else:
            viewer.add_image(image, name="image")
        layer = viewer.layers["image"]
        tool.state.image_name = layer.name
        tool.state.image_scale = tuple(layer.scale)[-len(tool.state.image_shape):]
        tool.image_changed(segmentation_result=segmentation)
        self.widget.status.value = f"{self.name(i)} ({i + 1} / {len(self.images)})"

    def attach(self, tool) -> None:
        """Add the series widget (previous / next) and the keys N and P to the tool's viewer."""
        from magicgui.widgets import Container, Label, PushButton

        self.tool = tool
        status = Label(name="status", value="")
        previous_button = PushButton(name="previous_image", text="Previous Image [P]")
        next_button = PushButton(name="next_image", text="Next Image [N]")
        self.widget = Container(widgets=[status, previous_button, next_button], label="image series")
        previous_button.changed.connect(lambda *args: self.go(-1))
        next_button.changed.connect(lambda *args: self.go(1))
        viewer = tool.viewer
        viewer.window.add_dock_widget(self.widget, name="Image Series", area="left")
        for target in [viewer] + [viewer.layers[name] for name in (_layers.POINT_LAYER, _layers.SHAPE_LAYER)]:
            target.bind_key("n", lambda *args: self.go(1), overwrite=True)
            target.bind_key("p", lambda *args: self.go(-1), overwrite=True)


def image_series_annotator(
    images: ImageList,
    output_folder: str,
    model_type: str = util._DEFAULT_MODEL,
    embedding_path: Optional[str] = None,
    initial_segmentations: Optional[ImageList] = None,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    viewer=None,
    return_viewer: bool = False,
    precompute_amg_state: bool = False,
    checkpoint_path: Optional[str] = None,
    is_volumetric: bool = False,
    device: Optional[str] = None,
    prefer_decoder: bool = True,
    skip_segmented: bool = True,
):
    """Annotate a series of images (2D, or volumes with ``is_volumetric``) one after the other.

    Args:
        images: Image files or arrays.
        output_folder: Where the segmentations are saved (``<image name>.tif``, ``seg_<index>.tif`` for arrays).
        model_type: The model (``vit_t_demo`` works offline), or with ``checkpoint_path`` its architecture.
        embedding_path: A folder for the embedding caches of the images (``<image name>.zarr``).
        initial_segmentations: Segmentations (files or arrays, one per image) to start from.
        tile_shape: (y, x) tile shape for tiled embeddings.
        halo: (y, x) overlap of the tiles.
        viewer: A viewer to use (a new one by default).
        return_viewer: Return the viewer instead of starting napari's event loop.
        precompute_amg_state: Compute the automatic segmentation state of the first image at start.
        checkpoint_path: A model file (e.g. exported by the training UI).
        is_volumetric: The images are volumes (3D annotator).
        device: "cpu", "cuda", "mps"; None for the best available one.
        prefer_decoder: Use AIS when the model has a decoder (else AMG).
        skip_segmented: Start at (and go forward to) images that have no saved segmentation yet.

    Returns:
        The viewer with ``return_viewer``; None otherwise or when all images are segmented already.

    Raises:
        ValueError: No images, a number of initial segmentations that does not match, unreadable images.
    """
    series = _ImageSeries(images, output_folder, embedding_path, initial_segmentations, is_volumetric,
                          skip_segmented, tile_shape, halo)
    first = series.next_index(0, 1)
    if first is None:
        print(f"All {len(series.images)} images have a segmentation in {series.output_folder!r} already "
              "(skip_segmented=True): nothing to annotate.")
        return None
    first, image, segmentation, skipped = series.read_next(first, 1)
    if first is None:
        for message in skipped:
            print(f"Skipped {message}", file=sys.stderr)
        print("No image is left to annotate: the others have a segmentation already.")
        return None
    state = _prepare_state(image, series.ndim, series.embedding_file(first), model_type, tile_shape, halo,
                           precompute_amg_state, checkpoint_path, None, device, prefer_decoder)
    tool_class = Annotator3d if is_volumetric else Annotator2d
    viewer, tool = _start_tool(tool_class, image, state, viewer, segmentation, None, model_type, embedding_path,
                               checkpoint_path, device, tile_shape, halo)
    series.attach(tool)
    series.index = first
    series.widget.status.value = f"{series.name(first)} ({first + 1} / {len(series.images)})"
    tool._series = series
    for message in skipped:
        show_error(f"Skipped {message}")
    return show_or_return(viewer, return_viewer)


def _image_files(folder, pattern: str) -> List[str]:
    """The image files matching ``pattern`` in ``folder``; other files are skipped with a message."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"The input folder {folder!r} does not exist.")
    files = sorted(path for path in glob(os.path.join(folder, pattern)) if os.path.isfile(path))
    images = [path for path in files if path.lower().endswith(IMAGE_EXTENSIONS)]
    others = [os.path.basename(path) for path in files if path not in images]
    if not images:
        raise ValueError(f"No image files match {pattern!r} in {folder!r} (image files end with "
                         f"{', '.join(IMAGE_EXTENSIONS)}).")
    note = None
    if others:
        note = (f"Skipped {len(others)} files in {folder!r} that are not images: {', '.join(others[:10])}"
                f"{' ...' if len(others) > 10 else ''} (images end with {', '.join(IMAGE_EXTENSIONS)}).")
    return images, note


def image_folder_annotator(
    input_folder: str,
    output_folder: str,
    pattern: str = "*",
    initial_segmentation_folder: Optional[str] = None,
    initial_segmentation_pattern: str = "*",
    viewer=None,
    return_viewer: bool = False,
    **kwargs,
):
    """Annotate the images in a folder one after the other (see :func:`image_series_annotator`).

    Args:
        input_folder: The folder with the images; files that are not images are skipped (with a message).
        output_folder: Where the segmentations are saved.
        pattern: Glob pattern selecting the files in ``input_folder``.
        initial_segmentation_folder: A folder with segmentations to start from (sorted like the images).
        initial_segmentation_pattern: Glob pattern for ``initial_segmentation_folder``.
        viewer: A viewer to use (a new one by default).
        return_viewer: Return the viewer instead of starting napari's event loop.
        kwargs: Further arguments of :func:`image_series_annotator`.

    Returns:
        The viewer with ``return_viewer``, else None.

    Raises:
        ValueError: A missing folder, or no image files in it.
    """
    images, note = _image_files(input_folder, pattern)
    initial = None
    if initial_segmentation_folder is not None:
        initial, _ = _image_files(initial_segmentation_folder, initial_segmentation_pattern)
    viewer = image_series_annotator(images, output_folder, initial_segmentations=initial, viewer=viewer,
                                    return_viewer=True, **kwargs)
    if note is not None:
        if viewer is None:
            print(note, file=sys.stderr)
        else:
            show_warning(note)
    if viewer is None:
        return None
    return show_or_return(viewer, return_viewer)


class ImageSeriesAnnotator(Container):
    """Widget to start the image series annotator on a folder from napari (Plugins menu).

    Args:
        viewer: The napari viewer.
    """

    def __init__(self, viewer) -> None:
        from magicgui.widgets import CheckBox, ComboBox, FileEdit, LineEdit, PushButton, TupleEdit

        from ._embedding_widget import available_devices

        self._viewer = viewer
        super().__init__(widgets=[
            FileEdit(name="folder", mode="d", label="input folder", tooltip="The folder with the images."),
            FileEdit(name="output_folder", mode="d", label="output folder",
                     tooltip="Where the segmentations are saved (one tif per image)."),
            LineEdit(name="pattern", value="*", tooltip="Glob pattern of the images, e.g. *.tif."),
            ComboBox(name="model_type", choices=util.get_model_names(), value=util._DEFAULT_MODEL, label="model"),
            FileEdit(name="custom_weights", mode="r", nullable=True, filter="*.pt *.pth"),
            ComboBox(name="device", choices=available_devices(), value="auto"),
            FileEdit(name="embeddings_save_path", mode="d", nullable=True,
                     tooltip="A folder for the embedding caches of the images (reused next time)."),
            TupleEdit(name="tile_shape", value=(0, 0), tooltip="Tile shape (y, x); (0, 0): no tiling."),
            TupleEdit(name="halo", value=(0, 0)),
            CheckBox(name="is_volumetric", value=False, text="volumes (3D annotator)"),
            PushButton(name="run_button", text="Annotate Images"),
        ])
        self.run_button.changed.connect(lambda *args: self())
        self.series: Optional[_ImageSeries] = None

    def __call__(self):
        """Start annotating the folder's images (the first image's embeddings are computed in the background)."""
        from ._embedding_widget import tiling_inputs

        folder, output = self.folder.value, self.output_folder.value
        try:
            if folder is None or str(folder) in ("", "."):
                raise ValueError("Choose the input folder with the images.")
            if output is None or str(output) in ("", "."):
                raise ValueError("Choose the output folder for the segmentations.")
            images, note = _image_files(folder, self.pattern.value or "*")
            if note is not None:
                show_warning(note)
            tile_shape, halo = tiling_inputs(self.tile_shape.value, self.halo.value)
            series = _ImageSeries(images, output, self.embeddings_save_path.value, None, self.is_volumetric.value,
                                  True, tile_shape, halo)
        except (ValueError, OSError) as error:
            show_error(str(error))
            return None
        first = series.next_index(0, 1)
        if first is None:
            show_info(f"All images in {str(folder)!r} have a segmentation in {str(output)!r} already.")
            return None
        weights = self.custom_weights.value
        series.model_args = {"model_type": self.model_type.value, "device": self.device.value,
                             "checkpoint_path": None if weights in (None, "") else str(weights)}
        tool = (Annotator3d if series.ndim == 3 else Annotator2d)(self._viewer)
        self._viewer.window.add_dock_widget(tool, name="Image Series Annotator")
        series.attach(tool)
        self.series = series
        return series.open(first)


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point ``micro_sam.image_series_annotator``."""
    from .. import _cli

    return _cli.run_main(_main, argv, prog="micro_sam.image_series_annotator")


def _main(argv: Optional[List[str]]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="micro_sam.image_series_annotator", description="Annotate the images in a folder one after the other.")
    parser.add_argument("-i", "--input_folder", required=True, help="The folder with the images.")
    parser.add_argument("-o", "--output_folder", required=True,
                        help="Where the segmentations are saved (one tif per image).")
    parser.add_argument("-p", "--pattern", default="*", help="Glob pattern of the images, e.g. '*.tif'.")
    parser.add_argument("--initial_segmentation_folder", help="A folder with segmentations to start from.")
    parser.add_argument("--initial_segmentation_pattern", default="*",
                        help="Glob pattern of the files in --initial_segmentation_folder.")
    parser.add_argument("-e", "--embedding_path", help="A folder for the embedding caches (recommended).")
    parser.add_argument("-m", "--model_type", default=util._DEFAULT_MODEL,
                        help=f"The model: one of {', '.join(util.get_model_names())}; with --checkpoint its "
                             "architecture.")
    parser.add_argument("-c", "--checkpoint", default=None, help="A model checkpoint file to load.")
    parser.add_argument("-d", "--device", default=None, help="'cpu', 'cuda', 'mps'; default: the best available.")
    parser.add_argument("--is_volumetric", action="store_true", help="The images are volumes (3D annotator).")
    parser.add_argument("--tile_shape", nargs=2, type=int, default=None, metavar=("Y", "X"))
    parser.add_argument("--halo", nargs=2, type=int, default=None, metavar=("Y", "X"))
    parser.add_argument("--precompute_amg_state", action="store_true")
    parser.add_argument("--prefer_decoder", action="store_false",
                        help="Pass this flag to use AMG even if the model has a decoder.")
    parser.add_argument("--skip_segmented", action="store_false",
                        help="Pass this flag to also open images that have a segmentation already.")
    args = parser.parse_args(argv)
    if (args.tile_shape is None) != (args.halo is None):
        parser.error("--tile_shape and --halo must be given together.")
    image_folder_annotator(
        args.input_folder, args.output_folder, args.pattern,
        initial_segmentation_folder=args.initial_segmentation_folder,
        initial_segmentation_pattern=args.initial_segmentation_pattern, embedding_path=args.embedding_path,
        model_type=args.model_type, tile_shape=args.tile_shape, halo=args.halo,
        precompute_amg_state=args.precompute_amg_state, checkpoint_path=args.checkpoint, device=args.device,
        is_volumetric=args.is_volumetric, prefer_decoder=args.prefer_decoder, skip_segmented=args.skip_segmented,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
