"""Fixtures for the napari tools: a display (Xvfb when there is none), the demo model, test images.

The tools need napari, a Qt binding and an OpenGL-capable display. Without napari the tests are skipped with the
reason, except in CI (``CI=true``), where a missing napari or display is an error. When no display is set, an
Xvfb server is started for the session (Mesa gives it software OpenGL; ``QT_QPA_PLATFORM=offscreen`` alone has
no OpenGL for napari's canvas).
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if IN_CI:
    import napari  # noqa: F401 - in CI a missing napari must fail, not skip
else:
    pytest.importorskip("napari", reason="the annotation tools need napari: pip install 'micro_sam[gui]'")
    pytest.importorskip("pytestqt", reason="the GUI tests need pytest-qt: pip install 'micro_sam[test]'")

# Imported while no OpenGL context exists (see micro_sam.sam_annotator._import_torch_before_opengl).
import micro_sam.sam_annotator  # noqa: E402, F401


def _start_xvfb():
    """Start Xvfb on a free display; returns the process (DISPLAY is set) or None when Xvfb is missing."""
    executable = shutil.which("Xvfb")
    if executable is None:
        return None
    read_fd, write_fd = os.pipe()
    process = subprocess.Popen(
        [executable, "-displayfd", str(write_fd), "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        display = pipe.readline().strip()
    if not display:
        process.kill()
        return None
    os.environ["DISPLAY"] = f":{display}"
    return process


def _display_session():
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
            del os.environ["QT_QPA_PLATFORM"]  # napari's canvas needs OpenGL
        process = _start_xvfb()
        if process is None:
            message = ("no display: set DISPLAY or install Xvfb (Debian: apt-get install xvfb libgl1-mesa-dri "
                       "libegl1 libxkbcommon-x11-0 libxcb-cursor0 ...; see .ci/run)")
            if IN_CI:
                pytest.fail(f"The GUI tests cannot run in CI: {message}.", pytrace=False)
            pytest.skip(f"The GUI tests need a display: {message}.", allow_module_level=True)
        return process
    return None


_XVFB = _display_session()


def pytest_unconfigure(config):
    if _XVFB is not None:
        _XVFB.terminate()
        _XVFB.wait(timeout=10)


@pytest.fixture(scope="session")
def demo_checkpoint():
    """The bundled vit_t_demo predictor and its checkpoint state, loaded once."""
    from micro_sam import util

    return util.get_sam_model(model_type="vit_t_demo", device="cpu", return_state=True)


@pytest.fixture(scope="session")
def demo_model(demo_checkpoint):
    """The bundled vit_t_demo predictor and its AIS decoder."""
    from micro_sam.instance_segmentation import get_decoder

    predictor, state = demo_checkpoint
    return predictor, get_decoder(predictor.model.image_encoder, state["decoder_state"], device="cpu")


@pytest.fixture
def cached_demo_model(monkeypatch, demo_checkpoint):
    """``util.get_sam_model`` gives the loaded vit_t_demo: the tools take their own loading path, minus the cost."""
    from micro_sam import util

    original = util.get_sam_model

    def get_sam_model(model_type=util._DEFAULT_MODEL, device=None, checkpoint_path=None, return_sam=False,
                      return_state=False, **kwargs):
        if model_type == "vit_t_demo" and checkpoint_path is None and not return_sam:
            predictor, state = demo_checkpoint
            return (predictor, state) if return_state else predictor
        return original(model_type=model_type, device=device, checkpoint_path=checkpoint_path,
                        return_sam=return_sam, return_state=return_state, **kwargs)

    monkeypatch.setattr(util, "get_sam_model", get_sam_model)
    yield
    # A module first imported during the test (e.g. micro_sam.training.util, by the training widget) bound the
    # stand-in with `from ..util import get_sam_model`: give it the real function again.
    for module in list(sys.modules.values()):
        if getattr(module, "__dict__", {}).get("get_sam_model") is get_sam_model:
            module.get_sam_model = original


@pytest.fixture(scope="session")
def nuclei_2d():
    """The 512 x 512 synthetic nuclei image of the bundled sample and its labels."""
    from micro_sam.sample_data import synthetic_nuclei_2d

    return synthetic_nuclei_2d(seed=0)


@pytest.fixture(scope="session")
def nuclei_3d():
    """A small synthetic nuclei volume (8 x 384 x 384) and its labels."""
    from micro_sam.sample_data import synthetic_nuclei_3d

    return synthetic_nuclei_3d((8, 384, 384), seed=1)


def iou(a, b) -> float:
    """IoU of two binary masks."""
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.fixture
def notifications():
    """The messages napari shows during a test, as (severity, text) pairs."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)
    return lambda: [(str(n.severity), str(n.message)) for n in notification_manager.records[start:]]
