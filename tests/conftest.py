"""Shared fixtures: small SAM models built in the tests, saved in the checkpoint formats micro_sam reads."""
import os

import numpy as np
import pytest
import torch

# Under pytest-xdist (the README's test command runs `-n 2`) the workers share the CPU cores: each gets its share
# of torch threads, so that no OpenMP threads spin against each other (on 2 cores: one thread per worker).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))  # for subprocesses


def pytest_collection_modifyitems(items):
    """Start the notebooks first: they are the longest unit of work (under xdist, one worker runs them)."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


def make_tiny_sam(seed: int = 0):
    """A SAM with a one-block, 64-dim ViT encoder: same interfaces and output shapes as vit_b, ~50x faster."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        depth=1, embed_dim=64, img_size=1024, mlp_ratio=2, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=2, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(), window_size=14,
        out_chans=256,
    )
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=512, num_heads=8), transformer_dim=256, iou_head_depth=3,
            iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def make_tiny_predictor(seed: int = 0, model_type: str = "vit_b", model_hash: str = "xxh128:tiny0"):
    from segment_anything import SamPredictor

    predictor = SamPredictor(make_tiny_sam(seed))
    predictor.model_type = model_type
    predictor.model_name = f"{model_type}_tiny"
    predictor._hash = model_hash
    predictor.checkpoint_path = None
    return predictor


@pytest.fixture
def tiny_predictor():
    return make_tiny_predictor()


@pytest.fixture(scope="session")
def vit_t_checkpoint(tmp_path_factory):
    """A randomly initialised vit_t SAM, saved as a plain state dict."""
    from micro_sam.models.build_sam import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_t"]()
    path = tmp_path_factory.mktemp("checkpoints") / "vit_t_random.pt"
    torch.save(sam.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def vit_t_predictor(vit_t_checkpoint):
    from micro_sam.util import get_sam_model

    return get_sam_model(model_type="vit_t", checkpoint_path=vit_t_checkpoint, device="cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def one_torch_thread():
    """Run a test single-threaded (small models: on a shared CPU, thread synchronisation costs more than it gains).

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def executed_notebooks(tmp_path_factory):
    """The notebooks of notebooks/, executed once per test session, all at once (see scripts/build_docs.py).

    Returns ``{name: (executed notebook, error or None, working directory)}``; the notebook test checks them and
    the documentation test builds the site from them, so that CI runs each notebook once. Everything is offline:
    the micro_sam cache and temporary files are in the session's temporary folder.
    """
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    try:
        from build_docs import execute_notebooks
    finally:
        sys.path.remove(str(root / "scripts"))
    base = tmp_path_factory.mktemp("notebooks")
    (base / "tmp").mkdir()
    paths = sorted((root / "notebooks").glob("*.ipynb"))
    notebooks, errors = execute_notebooks(
        paths, workdir=base / "work", timeout=300,
        environment={"MICROSAM_CACHEDIR": str(base / "cache"), "TMPDIR": str(base / "tmp")},
    )
    return {path.name: (notebook, error, base / "work" / path.stem)
            for path, notebook, error in zip(paths, notebooks, errors)}
