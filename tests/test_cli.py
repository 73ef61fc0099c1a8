"""The command lines: expected failures are one line on stderr and a non-zero exit code, checked before the model.

Every error case here runs with ``util.get_sam_model`` replaced by a function that fails the test, which proves that
the input, the model name, the device and the output are checked before any model is loaded.
"""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tifffile

from micro_sam import _cli, util
from micro_sam.sample_data import sample_image_path


def _one_error_line(capsys, prog, *fragments):
    """The captured stderr is exactly one line '<prog>: error: ...' containing every fragment."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err and "usage:" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- the shared wrapper ---------------------------------------------------------------------------------------
def test_run_main_exit_codes_and_one_line(capsys):
    def fails_with(error):
        def command(argv):
            raise error
        return command

    assert _cli.run_main(lambda argv: None, [], prog="p") == 0
    assert _cli.run_main(lambda argv: 3, [], prog="p") == 3
    assert _cli.run_main(fails_with(_cli.UsageError("bad argument")), [], prog="p") == 2
    _one_error_line(capsys, "p", "bad argument")
    assert _cli.run_main(fails_with(ValueError("first line\n  second line\n")), [], prog="p") == 1
    assert _one_error_line(capsys, "p") == "p: error: first line; second line"
    assert _cli.run_main(fails_with(RuntimeError("no GPU")), [], prog="p") == 1
    _one_error_line(capsys, "p", "no GPU")
    assert _cli.run_main(fails_with(PermissionError(13, "Permission denied")), [], prog="p") == 1
    _one_error_line(capsys, "p", "Permission denied")
    assert _cli.run_main(fails_with(KeyboardInterrupt()), [], prog="p") == 130
    assert capsys.readouterr().err == "p: interrupted\n"
    with pytest.raises(ZeroDivisionError):  # a bug is not an expected failure: its traceback stays
        _cli.run_main(lambda argv: 1 / 0, [], prog="p")


def test_run_main_traceback_on_request(monkeypatch):
    monkeypatch.setenv("MICRO_SAM_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad"):
        _cli.run_main(lambda argv: (_ for _ in ()).throw(ValueError("bad")), [], prog="p")


def test_warnings_are_one_clean_line(capsys):
    """An RGBA image gives one line 'prog: warning: ...', not a UserWarning with the source line."""
    from micro_sam._image import to_image

    rgba = np.random.default_rng(0).integers(0, 255, (8, 8, 4), dtype="uint8")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert _cli.run_main(lambda argv: to_image(rgba).shape == (8, 8, 3) and None, [], prog="p") == 0
    err = capsys.readouterr().err
    assert err == "p: warning: The image has 4 channels (RGBA?); only the first three are used.\n"


def test_argument_errors_are_one_line(capsys):
    parser = _cli.ArgumentParser(prog="p")
    parser.add_argument("-i", required=True)
    assert _cli.run_main(lambda argv: parser.parse_args(argv) and 0, [], prog="p") == 2
    _one_error_line(capsys, "p", "-i", "p --help")


def test_check_writable(tmp_path):
    _cli.check_writable(tmp_path / "missing" / "folders" / "out.tif")  # missing folders are fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(_cli.UsageError, match="is a file, not a folder"):
        _cli.check_writable(tmp_path / "file" / "out.tif")


# --- micro_sam.automatic_segmentation -------------------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(util, "get_sam_model", fail)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    import imageio.v3 as imageio

    folder = tmp_path_factory.mktemp("inputs")
    (folder / "notes.txt").write_text("not an image")
    with_nan = np.zeros((32, 32), dtype="float32")
    with_nan[3, 4] = np.nan
    tifffile.imwrite(folder / "nan.tif", with_nan)
    tifffile.imwrite(folder / "five_d.tif", np.zeros((2, 3, 4, 5, 6), dtype="uint8"))
    tifffile.imwrite(folder / "image.tif", np.zeros((32, 32), dtype="uint8"))
    imageio.imwrite(folder / "frames.png", np.zeros((32, 32), dtype="uint8"))
    return folder


PROG = "micro_sam.automatic_segmentation"


@pytest.mark.parametrize("arguments, fragments", [
    (["-i", "{d}/missing.tif"], ["the input path", "missing.tif", "does not exist"]),
    (["-i", "{d}/notes.txt"], ["Could not read the image", "not an image file", "(tif, png, jpg, ...)"]),
    (["-i", "{d}/nan.tif"], ["nan.tif", "NaN"]),
    (["-i", "{d}/five_d.tif"], ["shape (2, 3, 4, 5, 6)", "2D image"]),
    (["-i", "{d}/image.tif", "-m", "vit_b_Lm"], ["Unknown model_type 'vit_b_Lm'", "Did you mean 'vit_b_lm'",
                                                 "light microscopy: vit_b_lm", "get_model_names()"]),
    (["-i", "{d}/image.tif", "-c", "{d}/missing.pt", "-m", "vit_t"], ["checkpoint", "does not exist"]),
    (["-i", "{d}/image.tif", "-o", "{d}/image.tif/out.tif"], ["cannot write the output", "is a file"]),
    (["-i", "{d}/image.tif", "--center_distance_treshold", "0.4"],
     ["unknown parameter(s) --center_distance_treshold", "did you mean --center_distance_threshold"]),
    (["-i", "{d}/image.tif", "--tile_shape", "64", "64", "--halo", "8", "8"], ["tile_shape (64, 64)", "larger"]),
    (["-i", "{d}/image.tif", "--tile_shape", "16", "16"], ["--tile_shape and --halo"]),
    (["-i", "{d}/image.tif", "--tracking"], ["--tracking needs a time series"]),
    (["-i", "{d}/image.tif", "--mode", "xyz"], ["invalid choice: 'xyz'"]),
    ([], ["the following arguments are required: -i/--input_path"]),
])
def test_automatic_segmentation_errors_before_the_model(arguments, fragments, bad_inputs, no_model, capsys):
    from micro_sam.automatic_segmentation import main

    arguments = [a.format(d=bad_inputs) for a in arguments]
    if "-o" not in arguments:
        arguments += ["-o", str(bad_inputs / "out.tif")]
    if "-m" not in arguments:
        arguments += ["-m", "vit_t_demo"]
    assert main(arguments) == 2
    _one_error_line(capsys, PROG, *fragments)
    assert not (bad_inputs / "out.tif").exists()


def test_unavailable_device_is_one_line(bad_inputs, no_model, monkeypatch, capsys):
    import torch

    from micro_sam.automatic_segmentation import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["-i", str(bad_inputs / "image.tif"), "-o", str(bad_inputs / "out.tif"), "-m", "vit_t_demo",
                 "-d", "cuda"]) == 2
    _one_error_line(capsys, PROG, "'cuda' is not available")


def test_help_does_not_import_torch():
    """``--help`` parses the arguments without importing torch (what makes it fast)."""
    code = ("import sys\nfrom micro_sam.automatic_segmentation import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Missing folders are created" in " ".join(out.split())
    assert out.strip().splitlines()[-1] == "False"


def test_command_line_error_in_a_subprocess(tmp_path):
    """As a user sees it: one line on stderr, exit status 2, nothing on stdout."""
    result = subprocess.run([sys.executable, "-m", "micro_sam.automatic_segmentation", "-i",
                             str(tmp_path / "missing.tif"), "-o", str(tmp_path / "out.tif")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr


# --- micro_sam.precompute_embeddings and python -m micro_sam.sample_data -------------------------------------
def test_precompute_embeddings_errors_before_the_model(bad_inputs, no_model, capsys):
    from micro_sam.precompute_state import main

    prog = "micro_sam.precompute_embeddings"
    assert main(["-i", str(bad_inputs / "missing.tif"), "-e", str(bad_inputs / "e")]) == 2
    _one_error_line(capsys, prog, "does not exist")
    assert main(["-i", str(bad_inputs / "nan.tif"), "-e", str(bad_inputs / "e")]) == 2
    _one_error_line(capsys, prog, "NaN")
    assert main(["-i", str(bad_inputs / "image.tif"), "-e", str(bad_inputs / "e"), "-m", "vit_q"]) == 2
    _one_error_line(capsys, prog, "Unknown model_type 'vit_q'")
    assert main(["-i", str(bad_inputs / "image.tif"), "-e", str(bad_inputs / "notes.txt" / "e")]) == 2
    _one_error_line(capsys, prog, "cannot write the embedding cache")
    assert main(["-i", str(bad_inputs), "--pattern", "*.nothing", "-e", str(bad_inputs / "e")]) == 1
    _one_error_line(capsys, prog, "No files match")


def test_sample_data_command_writes_named_samples(tmp_path, capsys):
    from micro_sam.sample_data import SYNTHETIC_SAMPLES, main, synthetic_cells_2d

    assert main([]) == 0 and capsys.readouterr().out.strip() == sample_image_path()
    assert {"nuclei_2d", "cells_2d", "nuclei_3d"} <= set(SYNTHETIC_SAMPLES)
    assert main(["cells_2d", "-o", str(tmp_path), "--seed", "3"]) == 0
    image_path = capsys.readouterr().out.strip()
    assert image_path == str(tmp_path / "cells_2d_seed3.tif")
    image, labels = synthetic_cells_2d(seed=3)
    np.testing.assert_array_equal(tifffile.imread(image_path), image)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "cells_2d_seed3_labels.tif"), labels)
    assert main(["nuclei_3d", "-o", str(tmp_path), "--labels"]) == 0
    assert tifffile.imread(capsys.readouterr().out.strip()).shape == (16, 256, 256)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cells_2d_seed3.tif", "cells_2d_seed3_labels.tif", "nuclei_3d.tif", "nuclei_3d_labels.tif"]
    assert main(["no_such_sample"]) == 2
    _one_error_line(capsys, "python -m micro_sam.sample_data", "invalid choice: 'no_such_sample'")
    assert main(["--seed", "2"]) == 2
    _one_error_line(capsys, "python -m micro_sam.sample_data", "need a sample name")
