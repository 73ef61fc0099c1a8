"""The README as written: its Python code runs, offline, and its commands are the ones that are tested.

- Every ```python block of the README runs as written, in a fresh namespace in an empty folder (the blocks write
  their files there) with an empty model cache: nothing is downloaded.
- The shell blocks: the first command (install, then segment the sample image) is run by
  ``tests/test_bundled_model.py::test_readme_first_command`` after the install, which this test checks against the
  README's text; the test command is the one ``.ci/run`` runs. The CPU-only installation block needs the network
  and is not run.
- The Python blocks of the documentation pages written with the README (quick start, library, evaluation) run too.
"""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(text: str, language: str):
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)


def _run(blocks, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MICROSAM_CACHEDIR", str(tmp_path / "cache"))
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{name} (python block {i + 1})", "exec"), namespace)
    return namespace


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = _blocks(README, "python")
    assert len(blocks) >= 1
    namespace = _run(blocks, "README.md", tmp_path, monkeypatch)
    # What the block claims: a mask from one click, a segmentation of the sample, a finetuned model that loads.
    assert namespace["mask"].shape == (1, 512, 512) and namespace["mask"].any()
    assert namespace["segmentation"].max() > 50
    assert (tmp_path / "my_model.pt").is_file() and (tmp_path / "checkpoints" / "my_model" / "best.pt").is_file()
    assert type(namespace["segmenter"]).__name__ == "AutomaticMaskGenerator"  # (trained without the AIS decoder)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.pt"))  # nothing downloaded


def test_readme_commands_are_the_tested_ones():
    shell = _blocks(README, "bash")
    first = shell[0].strip().splitlines()
    assert first[0] == ('pip install . && micro_sam.automatic_segmentation -i "$(python -m micro_sam.sample_data)" '
                        '-o segmentation.tif -m vit_t_demo --overlay')  # = test_readme_first_command's arguments
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = first[1].split("&&")[1].strip()
    assert test_command in ci.splitlines()  # the README's test command is CI's
    assert 'pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu' in README


@pytest.mark.parametrize("page", ["01_installation.md", "05_evaluation.md"])
def test_documentation_python_blocks_run(page, tmp_path, monkeypatch):
    blocks = _blocks((ROOT / "docs" / page).read_text(encoding="utf-8"), "python")
    assert blocks
    _run(blocks, f"docs/{page}", tmp_path, monkeypatch)


@pytest.mark.slow
def test_library_page_python_blocks_run(tmp_path, monkeypatch):
    blocks = _blocks((ROOT / "docs" / "02_python_library.md").read_text(encoding="utf-8"), "python")
    namespace = _run(blocks, "docs/02_python_library.md", tmp_path, monkeypatch)
    assert namespace["segmentation_3d"].shape == (4, 128, 128)
    assert os.listdir(tmp_path) == []
