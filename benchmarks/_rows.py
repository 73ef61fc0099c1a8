"""The benchmark rows: what is measured, written against micro_sam's public API only.

The same code runs under this project and under the published micro_sam (1.8), so that both are measured
doing the same work on the same inputs. Each row runs in a fresh interpreter started by ``run.py``:
``prepare`` loads the model and builds the inputs (not timed), ``warmup`` runs once (not timed; it may be a
smaller call that touches the same code), then ``measure`` runs once and is timed.

Only the standard library is imported at module level, so that the import rows measure micro_sam's import.
"""
import gc
import importlib
import inspect
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

# Fixed inputs, identical for both packages.
IMAGE_SHAPE = (1024, 1024)
PROMPT_IMAGE_SHAPE = (512, 512)
N_PROMPTS = 10
TILED_SHAPE = (4096, 4096)
TILE_SHAPE, HALO = (1024, 1024), (256, 256)
VOLUME_SHAPE = (16, 512, 512)
SEED = 0
AMG_POINTS_PER_SIDE = 16  # micro_sam's default of 32 takes minutes per run on a 2-core CPU


class ModuleMissing(Exception):
    """A module or function the row needs does not exist in this micro_sam (yet)."""


class Unsupported(Exception):
    """This micro_sam has no such option (e.g. the reduced precision of the project)."""


@dataclass
class Context:
    """Where the shared inputs are (created once per benchmark run by ``run.py --make-inputs``)."""

    workdir: str

    def checkpoint(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.pt")


@dataclass
class Row:
    name: str
    description: str
    prepare: Callable[[Context], Tuple[Callable[[], object], Callable[[], object]]]
    baseline: Optional[str] = None  # row of the other package to compare with when it lacks this one
    per: int = 1  # the timed call does this many operations; the row reports the time of one


def _require(module: str, *names: str):
    """Import ``module`` and return the requested attributes; ModuleMissing when absent."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".") or e.name.startswith("micro_sam")):
            raise ModuleMissing(f"n/a (module missing: {e.name})") from e
        raise
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise ModuleMissing(f"n/a (missing in {module}: {', '.join(missing)})")
    return [getattr(mod, n) for n in names] if len(names) != 1 else getattr(mod, names[0])


def _rng():
    import numpy as np

    return np.random.default_rng(SEED)


def _image(shape):
    """A seeded, smooth-ish uint8 image (the content does not change the encoder's work)."""
    import numpy as np

    rng = _rng()
    small = rng.integers(0, 255, size=(shape[0] // 8, shape[1] // 8)).astype("float32")
    return np.kron(small, np.ones((8, 8), dtype="float32")).astype("uint8")[:shape[0], :shape[1]]


def _random_embeddings(original_shape, n_slices=None):
    """Embeddings with seeded random features, in micro_sam's format (no encoder run needed)."""
    rng = _rng()
    shape = (1, 256, 64, 64) if n_slices is None else (n_slices, 1, 256, 64, 64)
    scale = 1024 / max(original_shape)
    input_size = tuple(int(s * scale + 0.5) for s in original_shape)
    return {"features": rng.standard_normal(shape).astype("float32"),
            "input_size": input_size, "original_size": tuple(original_shape)}


def _get_model(model_type: str, ctx: Context, precision: Optional[str] = None, checkpoint: Optional[str] = None):
    get_sam_model = _require("micro_sam.util", "get_sam_model")
    kwargs = {}
    if precision is not None:
        if "precision" not in inspect.signature(get_sam_model).parameters:
            raise Unsupported("n/a (no precision option)")
        kwargs["precision"] = precision
    return get_sam_model(model_type=model_type, device="cpu",
                         checkpoint_path=ctx.checkpoint(checkpoint or model_type), **kwargs)


# --- import time -----------------------------------------------------------------------------------------
def _import_row(module):
    def prepare(ctx):
        def measure():
            importlib.import_module(module)
        return None, measure
    return prepare


# --- embeddings ------------------------------------------------------------------------------------------
def _embedding_row(model_type, precision=None):
    def prepare(ctx):
        precompute = _require("micro_sam.util", "precompute_image_embeddings")
        predictor = _get_model(model_type, ctx, precision)
        image = _image(IMAGE_SHAPE)

        def run():
            return precompute(predictor, image, verbose=False, ndim=2)
        return run, run
    return prepare


def _tiled_row(ctx):
    precompute = _require("micro_sam.util", "precompute_image_embeddings")
    predictor = _get_model("vit_t", ctx)
    image = _image(TILED_SHAPE)
    small = _image(IMAGE_SHAPE)

    def warmup():
        precompute(predictor, small, verbose=False, ndim=2)

    def measure():
        with tempfile.TemporaryDirectory() as tmp:
            precompute(predictor, image, save_path=os.path.join(tmp, "embeddings.zarr"), verbose=False, ndim=2,
                       tile_shape=TILE_SHAPE, halo=HALO)
    return warmup, measure


def _volume_row(ctx):
    precompute = _require("micro_sam.util", "precompute_image_embeddings")
    predictor = _get_model("vit_t", ctx)
    volume = _image((VOLUME_SHAPE[0] * VOLUME_SHAPE[1], VOLUME_SHAPE[2])).reshape(VOLUME_SHAPE)

    def warmup():
        precompute(predictor, volume[0], verbose=False, ndim=2)

    def measure():
        precompute(predictor, volume, verbose=False, ndim=3)
    return warmup, measure


# --- prompts ---------------------------------------------------------------------------------------------
def _prompt_row(kind):
    def prepare(ctx):
        segment_from_points, segment_from_box = _require(
            "micro_sam.prompt_based_segmentation", "segment_from_points", "segment_from_box"
        )
        import numpy as np

        predictor = _get_model("vit_t", ctx)
        embeddings = _random_embeddings(PROMPT_IMAGE_SHAPE)
        rng = _rng()
        h, w = PROMPT_IMAGE_SHAPE
        centers = rng.integers(32, min(h, w) - 32, size=(N_PROMPTS, 2))
        labels = np.ones(1, dtype="int64")

        def run_points(n):
            for center in centers[:n]:
                segment_from_points(predictor, center[None].astype("float64"), labels, image_embeddings=embeddings)

        def run_boxes(n):
            for y, x in centers[:n]:
                box = np.array([y - 24, x - 24, y + 24, x + 24], dtype="float64")
                segment_from_box(predictor, box, image_embeddings=embeddings)

        run = run_points if kind == "points" else run_boxes
        return (lambda: run(2)), (lambda: run(N_PROMPTS))
    return prepare


# --- automatic segmentation ------------------------------------------------------------------------------
def _amg_row(ctx):
    AutomaticMaskGenerator = _require("micro_sam.instance_segmentation", "AutomaticMaskGenerator")
    predictor = _get_model("vit_t", ctx)
    image = _image(PROMPT_IMAGE_SHAPE)
    embeddings = _random_embeddings(PROMPT_IMAGE_SHAPE)

    def run():
        amg = AutomaticMaskGenerator(predictor, points_per_side=AMG_POINTS_PER_SIDE)
        amg.initialize(image, image_embeddings=embeddings)
        return amg.generate()
    return run, run


def _ais_row(ctx):
    get_predictor_and_decoder, InstanceSegmentationWithDecoder = _require(
        "micro_sam.instance_segmentation", "get_predictor_and_decoder", "InstanceSegmentationWithDecoder"
    )
    predictor, decoder = get_predictor_and_decoder("vit_t", ctx.checkpoint("vit_t_ais"), device="cpu")
    image = _image(PROMPT_IMAGE_SHAPE)
    embeddings = _random_embeddings(PROMPT_IMAGE_SHAPE)

    def run():
        ais = InstanceSegmentationWithDecoder(predictor, decoder)
        ais.initialize(image, image_embeddings=embeddings)
        return ais.generate()
    return run, run


def _tiled_ais_row(ctx):
    InstanceSegmentationWithDecoder, TiledInstanceSegmentationWithDecoder, get_predictor_and_decoder = _require(
        "micro_sam.instance_segmentation", "InstanceSegmentationWithDecoder",
        "TiledInstanceSegmentationWithDecoder", "get_predictor_and_decoder",
    )
    predictor, decoder = get_predictor_and_decoder("vit_t", ctx.checkpoint("vit_t_ais"), device="cpu")
    image, small = _image(TILED_SHAPE), _image(PROMPT_IMAGE_SHAPE)

    def warmup():
        ais = InstanceSegmentationWithDecoder(predictor, decoder)
        ais.initialize(small)
        ais.generate()

    def measure():  # embeddings computed tile by tile in memory, as a user without an embedding path does
        ais = TiledInstanceSegmentationWithDecoder(predictor, decoder)
        ais.initialize(image, tile_shape=TILE_SHAPE, halo=HALO, verbose=False)
        return ais.generate()
    return warmup, measure


def _segment_3d_row(ctx):
    segment_mask_in_volume = _require("micro_sam.multi_dimensional_segmentation", "segment_mask_in_volume")
    import numpy as np

    predictor = _get_model("vit_t", ctx)
    n = VOLUME_SHAPE[0]
    embeddings = _random_embeddings(VOLUME_SHAPE[1:], n_slices=n)
    seed = np.zeros(VOLUME_SHAPE, dtype="uint32")
    yy, xx = np.mgrid[:VOLUME_SHAPE[1], :VOLUME_SHAPE[2]]
    z = n // 2
    seed[z][(yy - 256) ** 2 + (xx - 256) ** 2 < 60 ** 2] = 1

    def run():
        return segment_mask_in_volume(seed.copy(), predictor, embeddings, np.array([z]), stop_lower=False,
                                      stop_upper=False, iou_threshold=0.0, projection="mask")
    return run, run


# --- training --------------------------------------------------------------------------------------------
def _training_row(ctx):
    train_sam, default_sam_loader = _require("micro_sam.training", "train_sam", "default_sam_loader")
    import numpy as np

    rng = _rng()
    images, labels = [], []
    yy, xx = np.mgrid[:256, :256]
    for i in range(2):
        label = np.zeros((256, 256), dtype="uint32")
        for k, (cy, cx) in enumerate(rng.integers(40, 216, size=(6, 2)), start=1):
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < 20 ** 2] = k
        image = (label > 0) * 150.0 + rng.normal(40, 10, size=(256, 256))
        images.append(np.clip(image, 0, 255).astype("float32"))
        labels.append(label)

    def loader():
        return default_sam_loader(raw_paths=images, raw_key=None, label_paths=labels, label_key=None,
                                  patch_shape=(256, 256), with_segmentation_decoder=False, batch_size=1,
                                  n_samples=1, shuffle=False, num_workers=0)

    def run():
        with tempfile.TemporaryDirectory() as tmp:
            train_sam(name="bench", model_type="vit_t", train_loader=loader(), val_loader=loader(), n_epochs=1,
                      n_iterations=1, n_objects_per_batch=2, n_sub_iteration=2, with_segmentation_decoder=False,
                      checkpoint_path=ctx.checkpoint("vit_t"), device="cpu", save_root=tmp,
                      verify_n_labels_in_loader=None)
    return run, run


ROWS = [
    Row("import_micro_sam", "import micro_sam (fresh interpreter)", _import_row("micro_sam")),
    Row("import_util", "import micro_sam.util (fresh interpreter)", _import_row("micro_sam.util")),
    Row("embed_vit_b", "embedding vit_b 1024x1024, float32", _embedding_row("vit_b")),
    Row("embed_vit_b_bf16", "embedding vit_b 1024x1024, bfloat16", _embedding_row("vit_b", "bfloat16"),
        baseline="embed_vit_b"),
    Row("embed_vit_t", "embedding vit_t 1024x1024, float32", _embedding_row("vit_t")),
    Row("embed_vit_t_bf16", "embedding vit_t 1024x1024, bfloat16", _embedding_row("vit_t", "bfloat16"),
        baseline="embed_vit_t"),
    Row("prompt_point", f"point prompt, one call (mean of {N_PROMPTS}), vit_t", _prompt_row("points"),
        per=N_PROMPTS),
    Row("prompt_box", f"box prompt, one call (mean of {N_PROMPTS}), vit_t", _prompt_row("boxes"), per=N_PROMPTS),
    Row("amg", f"AMG initialize + generate ({AMG_POINTS_PER_SIDE}x{AMG_POINTS_PER_SIDE} points), 512x512, vit_t",
        _amg_row),
    Row("ais", "AIS initialize + generate, 512x512, vit_t", _ais_row),
    Row("tiled_4096", "tiled embeddings 4096x4096 (16 tiles), vit_t, zarr", _tiled_row),
    Row("tiled_ais_4096", "tiled embeddings + AIS 4096x4096 (16 tiles), vit_t, in memory", _tiled_ais_row),
    Row("embed_3d_16", "embeddings of a 16x512x512 stack, vit_t", _volume_row),
    Row("segment_3d_16", "segment_mask_in_volume over 16 slices", _segment_3d_row),
    Row("train_iteration", "train_sam vit_t: 1 iteration + 1 validation sample", _training_row),
]
ROWS_BY_NAME = {row.name: row for row in ROWS}


def _reset_peak_memory() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> Optional[float]:
    """A memory field of /proc/self/status (``VmHWM``: peak resident set, ``VmRSS``: current) in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_memory_mb() -> Optional[float]:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(name: str, workdir: str) -> dict:
    """Run one row in this interpreter; a dict with status, seconds, peak_mb and the micro_sam used."""
    row = ROWS_BY_NAME[name]
    ctx = Context(workdir)
    result = {"row": name, "status": "ok", "seconds": None, "peak_mb": None, "start_mb": None}
    try:
        warmup, measure = row.prepare(ctx)
        if warmup is not None:
            warmup()
        gc.collect()
        if _reset_peak_memory():  # the peak of the measured call alone; start_mb: resident before it
            result["start_mb"] = _status_mb("VmRSS")
        start = time.perf_counter()
        measure()
        result["seconds"] = (time.perf_counter() - start) / row.per
        result["peak_mb"] = _peak_memory_mb()
    except (ModuleMissing, Unsupported) as e:
        result["status"] = str(e)
    import sys

    micro_sam = sys.modules.get("micro_sam")
    if micro_sam is None:
        try:
            import micro_sam
        except ImportError:
            micro_sam = None
    result["micro_sam"] = None if micro_sam is None else {
        "version": getattr(micro_sam, "__version__", "?"), "path": os.path.dirname(micro_sam.__file__)
    }
    return result
