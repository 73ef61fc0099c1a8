"""The ``micro_sam.train`` command: finetune SAM on images and instance labels, optionally with PEFT.

micro_sam 1.8's options, plus ``--n_iterations``, ``--lr``, ``--n_objects_per_batch``, ``--resume``, ``--checkpoint_name`` (an alias of
``--trained_model_name``), ``--quiet`` and the PEFT options ``--peft_method``, ``--peft_rank``, ``--peft_layers``
and ``--peft_update_matrices``. Everything that can be checked without training is checked first (settings, PEFT
arguments, file pairs and their shapes, the device, the output folders), so that bad input fails at once with
one line naming the problem and what is valid (exit code 2; a failure during training: exit code 1), the
convention of all micro_sam commands (:mod:`micro_sam._cli`). Training shows one named progress bar over the
iterations (:mod:`micro_sam._progress`: plain lines when the output is not a terminal).
"""
from __future__ import annotations

import os
from glob import glob
from typing import List, Optional, Sequence, Tuple

from .. import _cli

_PEFT_METHODS = ("lora", "fact", "ssf", "adaptformer", "attention", "bias", "layernorm", "classical")
_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
_CONTAINER_SUFFIXES = (".h5", ".hdf5", ".hdf", ".zarr", ".n5")


class _Silent:
    """napari-style progress signals that show nothing (``--quiet``)."""

    class _Signal:
        def emit(self, *args):
            pass

    pbar_total = pbar_update = pbar_description = _Signal()


class _ConsoleProgress:
    """napari-style progress signals (``pbar_total``, ``pbar_update``, ``pbar_description``) shown as one named bar
    of :func:`micro_sam._progress.progress_bar`, created when the trainer announces the number of iterations."""

    class _Signal:
        def __init__(self, function):
            self.emit = function

    def __init__(self, desc: str) -> None:
        self.desc, self.bar = desc, None
        self.pbar_total = self._Signal(self._total)
        self.pbar_update = self._Signal(self._update)
        self.pbar_description = self._Signal(lambda *args, **kwargs: None)

    def _total(self, total) -> None:
        from .._progress import progress_bar

        if self.bar is None:
            self.bar = progress_bar(int(total), self.desc)

    def _update(self, steps) -> None:
        if self.bar is not None:
            self.bar.update(int(steps))

    def close(self) -> None:
        """End the bar (its final line when the output is not a terminal)."""
        if self.bar is not None:
            self.bar.close()


def _parser():
    from .configurations import CONFIGURATIONS, RESOURCES

    parser = _cli.ArgumentParser(
        prog="micro_sam.train", description="Finetune Segment Anything on microscopy images and instance labels.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--images", required=True, nargs="+",
                      help="Image files, or folders / container files (hdf5, zarr) with --image_key.")
    data.add_argument("--labels", required=True, nargs="+", help="Instance label files, as for --images.")
    data.add_argument("--image_key", default=None,
                      help="Dataset name in hdf5/zarr files, or a glob pattern (e.g. '*.tif') in the folders.")
    data.add_argument("--label_key", default=None, help="As --image_key, for the labels.")
    data.add_argument("--val_images", nargs="+", default=None,
                      help="Validation images; default: 10%% of the training patches (at least one).")
    data.add_argument("--val_labels", nargs="+", default=None, help="Validation labels (with --val_images).")
    data.add_argument("--val_image_key", default=None)
    data.add_argument("--val_label_key", default=None)
    data.add_argument("--patch_shape", type=int, nargs="+", default=(512, 512), help="Patch (y, x); default 512 512.")
    data.add_argument("--preprocess", default=None, choices=("normalize_minmax", "normalize_percentile"),
                      help="Normalise images that are not 8 bit.")
    data.add_argument("--num_workers", type=int, default=1, help="Data loader processes.")

    model = parser.add_argument_group("model and training")
    names = ", ".join(list(CONFIGURATIONS) + [r for r in RESOURCES if r not in CONFIGURATIONS])
    model.add_argument("--configuration", default=None,
                       help=f"Hardware configuration, one of {names}; default: the closest match for this machine.")
    model.add_argument("--segmentation_decoder", default="instances",
                       help="'instances' (also train the decoder for automatic instance segmentation, default), "
                            "'instances_only' (only the decoder) or 'None' (only SAM's interactive parts).")
    model.add_argument("-m", "--model_type", default=None,
                       help="Model to start from (e.g. vit_b, vit_b_lm, vit_t); default: the configuration's.")
    model.add_argument("--checkpoint_path", default=None, help="Weights to start from instead of model_type's.")
    model.add_argument("-d", "--device", default=None, help="cpu, cuda or mps; default: the best available.")
    model.add_argument("--n_epochs", type=int, default=100, help="Epochs to train (default 100).")
    model.add_argument("--n_iterations", type=int, default=None, help="Iterations to train (overrides --n_epochs).")
    model.add_argument("--batch_size", type=int, default=None, help="Default: the configuration's.")
    model.add_argument("--lr", type=float, default=1e-5, help="Learning rate (default 1e-5).")
    model.add_argument("--n_objects_per_batch", type=int, default=None,
                       help="Objects per image for the interactive loss; default: the configuration's.")
    model.add_argument("--resume", action="store_true", help="Continue from latest.pt of this run.")

    peft = parser.add_argument_group("parameter-efficient finetuning of the image encoder")
    peft.add_argument("--peft_method", default=None,
                      help=f"Freeze the image encoder except for this PEFT method: {', '.join(_PEFT_METHODS)} "
                           "(see micro_sam.models.peft_sam).")
    peft.add_argument("--peft_rank", type=int, default=None, help="Rank for lora / fact (e.g. 4).")
    peft.add_argument("--peft_layers", type=int, nargs="+", default=None,
                      help="Transformer blocks to adapt (vit_b 0-11, vit_l 0-23, vit_h 0-31, vit_t 0-9); default all.")
    peft.add_argument("--peft_update_matrices", nargs="+", default=None,
                      help="For lora: which of q, k, v, mlp to update (default q v).")

    output = parser.add_argument_group("output")
    output.add_argument("-s", "--save_root", default=None, help="Folder for checkpoints and logs (default: here).")
    output.add_argument("--trained_model_name", "--checkpoint_name", dest="trained_model_name", default="sam_model",
                        help="Name of the run: checkpoints/<name>/ and logs/<name>/ (default sam_model).")
    output.add_argument("--output_path", default=None, help="Export the best model to this .pt / .pth file.")
    _cli.add_quiet_argument(output)
    return parser


#
# Checks before anything is loaded
#

def _peft_kwargs(args, model_type: str) -> Optional[dict]:
    from ..models.peft_sam import check_peft_kwargs

    if args.peft_method is None:
        given = [flag for flag, value in (("--peft_rank", args.peft_rank), ("--peft_layers", args.peft_layers),
                                          ("--peft_update_matrices", args.peft_update_matrices)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need --peft_method (one of {', '.join(_PEFT_METHODS)}).")
        return None
    if args.peft_method not in _PEFT_METHODS:
        raise ValueError(f"Unknown --peft_method {args.peft_method!r}; choose one of {', '.join(_PEFT_METHODS)}.")
    kwargs = {"peft_module": args.peft_method}
    if args.peft_rank is not None:
        kwargs["rank"] = args.peft_rank
    if args.peft_layers is not None:
        kwargs["attention_layers_to_update"] = list(args.peft_layers)
    if args.peft_update_matrices is not None:
        if args.peft_method != "lora":
            raise ValueError("--peft_update_matrices only applies to --peft_method lora.")
        kwargs["update_matrices"] = list(args.peft_update_matrices)
    check_peft_kwargs(kwargs, model_type)
    return kwargs


def _check_settings(args) -> Tuple[str, str, bool, bool]:
    """(configuration, model_type, with_decoder, instances_only); ValueError for invalid settings."""
    from ..util import get_model_names
    from .configurations import find_best_configuration, get_training_configuration
    from .training import _parse_segmentation_decoder

    with_decoder, instances_only = _parse_segmentation_decoder(args.segmentation_decoder)
    configuration = args.configuration or find_best_configuration()
    model_type = args.model_type or get_training_configuration(configuration)["model_type"]
    if args.checkpoint_path is None and model_type not in get_model_names():
        raise ValueError(f"Unknown model_type {model_type!r}; registered models: {', '.join(get_model_names())}.")
    if args.checkpoint_path is not None and not os.path.isfile(args.checkpoint_path):
        raise ValueError(f"The checkpoint {args.checkpoint_path!r} does not exist.")
    get_training_configuration(configuration)  # the configuration must exist
    if args.n_iterations is None and args.n_epochs < 1:
        raise ValueError(f"--n_epochs must be at least 1, got {args.n_epochs}.")
    if args.n_iterations is not None and args.n_iterations < 1:
        raise ValueError(f"--n_iterations must be at least 1, got {args.n_iterations}.")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}.")
    if args.n_objects_per_batch is not None and args.n_objects_per_batch < 1:
        raise ValueError(f"--n_objects_per_batch must be at least 1, got {args.n_objects_per_batch}.")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}.")
    if len(args.patch_shape) != 2 or min(args.patch_shape) < 1:
        raise ValueError(f"--patch_shape must be two positive sizes (y x), got {' '.join(map(str, args.patch_shape))}.")
    if args.output_path and os.path.splitext(args.output_path)[1] not in (".pt", ".pth"):
        raise ValueError(f"--output_path must end with .pt or .pth, got {args.output_path!r} (bioimage.io export "
                         "is not part of this package).")
    if (args.val_images is None) != (args.val_labels is None):
        raise ValueError("--val_images and --val_labels must be given together.")
    return configuration, model_type, with_decoder, instances_only


def _expand(paths: Sequence[str], key: Optional[str], what: str) -> List[Tuple[str, Optional[str]]]:
    """(file, key inside it) for every image of the arguments: folders are globbed with ``key``."""
    items = []
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"The {what} path {path!r} does not exist.")
        if os.path.isdir(path) and not path.rstrip("/").endswith((".zarr", ".n5")):
            pattern = key or "*"
            files = sorted(f for f in glob(os.path.join(path, pattern)) if os.path.isfile(f))
            if not files:
                raise ValueError(f"No {what} match {os.path.join(path, pattern)!r}; set --{what[:-1]}_key to the "
                                 "file pattern (e.g. '*.tif').")
            items.extend((f, None) for f in files)
        else:
            if path.lower().endswith(_CONTAINER_SUFFIXES) and key is None:
                raise ValueError(f"{path!r} is a container file: give the dataset name with --{what[:-1]}_key.")
            items.append((path, key))
    return items


def _shape(path: str, key: Optional[str]) -> Tuple[int, ...]:
    """The array shape of an image file or a container dataset, read from the metadata where possible."""
    try:
        if key is not None:
            if path.lower().endswith((".h5", ".hdf5", ".hdf")):
                import h5py

                with h5py.File(path, "r") as f:
                    return tuple(f[key].shape)
            import zarr

            return tuple(zarr.open(path, mode="r")[key].shape)
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile

            with tifffile.TiffFile(path) as f:
                return tuple(f.series[0].shape)
        import imageio.v3 as imageio

        return tuple(imageio.improps(path).shape)
    except Exception as error:  # noqa: BLE001 - reported as a readable error
        raise ValueError(f"Cannot read {path!r}{f' (key {key!r})' if key else ''}: {error}") from None


def _spatial(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The shape without a colour axis (RGB(A) last or first)."""
    if len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4:
        return shape[:2]
    if len(shape) == 3 and shape[0] == 3 and min(shape[1:]) > 4:
        return shape[1:]
    return shape


def _settings(configuration: str, model_type: str, quiet: bool) -> dict:
    """The configuration's settings for the model; its vit_b row (with a note) for a model not tested on it."""
    from .configurations import get_training_configuration

    try:
        return get_training_configuration(configuration, model_type)
    except ValueError as error:
        if not quiet:
            print(f"micro_sam.train: note: {error} Using the settings of its vit_b row.")
        return get_training_configuration(configuration)


def check_image_label_pairs(images: Sequence[str], labels: Sequence[str], image_key: Optional[str],
                            label_key: Optional[str], patch_shape: Sequence[int], which: str = "training") -> int:
    """Check that images and labels pair up: the same number of images, and each label image of its image's shape
    (without colour axis), at least as large as the patch.

    Args:
        images: The ``--images`` arguments (files, folders or container files).
        labels: The ``--labels`` arguments.
        image_key: ``--image_key``: a glob pattern for folders or the dataset name in container files.
        label_key: ``--label_key``.
        patch_shape: The (y, x) patch size.
        which: "training" or "validation", for the messages.

    Returns:
        The number of image / label pairs.

    Raises:
        ValueError: Missing files, different counts or shapes, images smaller than the patch.
    """
    image_items = _expand(images, image_key, "images")
    label_items = _expand(labels, label_key, "labels")
    if len(image_items) != len(label_items):
        raise ValueError(f"{len(image_items)} {which} images but {len(label_items)} label images; every image needs "
                         f"its label image (paired in sorted order), e.g. {image_items[0][0]!r} and "
                         f"{label_items[0][0]!r}.")
    for (image, ikey), (label, lkey) in zip(image_items, label_items):
        image_shape, label_shape = _spatial(_shape(image, ikey)), _shape(label, lkey)
        if image_shape != label_shape:
            raise ValueError(f"The {which} image {image!r} has shape {image_shape}, its labels {label!r} have shape "
                             f"{label_shape}; they must be the same.")
        if any(s < p for s, p in zip(image_shape[-2:], patch_shape)):
            raise ValueError(f"The {which} image {image!r} ({image_shape}) is smaller than the patch shape "
                             f"{tuple(patch_shape)}; use --patch_shape at most {image_shape[-2:]}.")
    return len(image_items)


#
# The command
#

def run(argv: Optional[Sequence[str]] = None) -> str:
    """Parse the arguments, check them, train and export; returns the path of the trained (or exported) model.

    Raises:
        micro_sam._cli.UsageError: Invalid arguments or data (a ``ValueError``), before anything is loaded.
    """
    args = _parser().parse_args(argv)
    try:
        configuration, model_type, with_decoder, instances_only = _check_settings(args)
        peft_kwargs = _peft_kwargs(args, model_type)
        n_train = check_image_label_pairs(args.images, args.labels, args.image_key, args.label_key, args.patch_shape)
        if args.val_images is not None:
            check_image_label_pairs(args.val_images, args.val_labels, args.val_image_key, args.val_label_key,
                                    args.patch_shape, "validation")
    except _cli.UsageError:
        raise
    except ValueError as error:
        raise _cli.UsageError(str(error)) from None
    args.device = _cli.check_device(args.device)
    _cli.check_writable(os.path.join(args.save_root or ".", "checkpoints", args.trained_model_name), "checkpoint folder")
    if args.output_path:
        _cli.check_writable(args.output_path, "output")

    import torch_em
    from torch.utils.data import random_split

    from . import training
    from .data import default_sam_dataset
    from .util import get_raw_transform

    def one_or_list(paths):
        return paths[0] if len(paths) == 1 else list(paths)

    dataset_kwargs = dict(patch_shape=tuple(args.patch_shape), with_segmentation_decoder=with_decoder,
                          train_instance_segmentation_only=instances_only,
                          raw_transform=get_raw_transform(args.preprocess))
    dataset = default_sam_dataset(one_or_list(args.images), args.image_key, one_or_list(args.labels),
                                  args.label_key, **dataset_kwargs)
    if args.val_images is None:
        n_val = max(1, int(0.1 * len(dataset)))
        train_dataset, val_dataset = random_split(dataset, lengths=[len(dataset) - n_val, n_val])
    else:
        train_dataset = dataset
        val_dataset = default_sam_dataset(one_or_list(args.val_images), args.val_image_key,
                                          one_or_list(args.val_labels), args.val_label_key, is_train=False,
                                          **dataset_kwargs)
    settings = _settings(configuration, model_type, args.quiet)
    batch_size = args.batch_size or settings["batch_size"]
    train_loader = torch_em.segmentation.get_data_loader(train_dataset, batch_size=batch_size, shuffle=True,
                                                         num_workers=args.num_workers)
    val_loader = torch_em.segmentation.get_data_loader(val_dataset, batch_size=1, shuffle=True,
                                                       num_workers=args.num_workers)

    freeze = list(settings["freeze"])
    if peft_kwargs is not None:  # PEFT trains (parts of) the image encoder
        freeze = [part for part in freeze if part != "image_encoder"]
    n_objects = args.n_objects_per_batch or settings["n_objects_per_batch"]
    extra = {"n_epochs": args.n_epochs, "n_iterations": args.n_iterations, "device": args.device,
             "save_root": args.save_root, "lr": args.lr, "freeze": freeze or None, "peft_kwargs": peft_kwargs,
             "checkpoint_path": args.checkpoint_path, "model_type": model_type}
    if args.resume:
        extra["load_from_checkpoint"] = "latest"
    progress = _Silent() if args.quiet else _ConsoleProgress(f"micro_sam.train {args.trained_model_name}")
    extra["pbar_signals"] = progress
    if not args.quiet:
        what = "the decoder only" if instances_only else "SAM and the decoder" if with_decoder else "SAM"
        peft = "" if peft_kwargs is None else f", PEFT {peft_kwargs}"
        print(f"micro_sam.train: {n_train} image(s); training {what} from {model_type} with the {configuration!r} "
              f"configuration (batch size {batch_size}, {n_objects} objects per image{peft}); "
              f"checkpoints in {os.path.join(args.save_root or '.', 'checkpoints', args.trained_model_name)}")
    try:
        if instances_only:
            training.train_instance_segmentation(name=args.trained_model_name, train_loader=train_loader,
                                                 val_loader=val_loader, **extra)
        else:
            training.train_sam(name=args.trained_model_name, train_loader=train_loader, val_loader=val_loader,
                               with_segmentation_decoder=with_decoder, n_objects_per_batch=n_objects, **extra)
    finally:
        if isinstance(progress, _ConsoleProgress):
            progress.close()
    if instances_only and args.output_path:
        trained = os.path.join(args.save_root or ".", "checkpoints", args.trained_model_name, "best.pt")
        training.export_instance_segmentation_model(trained, args.output_path, model_type, args.checkpoint_path)
        return args.output_path
    return training._export_helper(args.save_root, args.trained_model_name, args.output_path, model_type,
                                   with_decoder)


def _main(argv: Optional[Sequence[str]]) -> int:
    final_path = run(argv)
    print(f"Training has finished. The trained model is saved at {final_path}.")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``micro_sam.train`` console script.

    Args:
        argv: The arguments; None reads them from ``sys.argv``.

    Returns:
        The exit code: 0 done, 2 invalid arguments or data (one line on stderr, before anything is loaded), 1 a
        failure during training, 130 interrupted (see :mod:`micro_sam._cli`).
    """
    return _cli.run_main(_main, argv, prog="micro_sam.train")
