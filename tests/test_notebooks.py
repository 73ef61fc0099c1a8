"""The example notebooks in notebooks/ run top to bottom, offline, on the CPU, as a user would run them.

Each notebook is executed with nbclient in a fresh ``python3`` kernel whose working directory is a temporary folder
(all three at once, by the session fixture ``executed_notebooks``, whose results the documentation build reuses);
any cell error fails the test. The notebooks are committed without outputs, which is checked as well.
"""
import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


# Text that each notebook prints when it ran through: facts about the data, not the model's quality.
EXPECTED_OUTPUT = {
    "interactive_segmentation.ipynb": ["96 labelled objects", "192 prompts in", "point prompts: mean IoU",
                                       "box prompts: mean IoU"],
    "automatic_segmentation.ipynb": ["96 labelled objects", "AIS: ", "AMG (16 x 16 points): ", "AIS, tiled: ",
                                     "AIS, 3D: "],
    "finetuning.ipynb": ["before finetuning: ", "checkpoint: ", " True", "exported ", "after finetuning: "],
}


def test_the_three_notebooks_exist():
    assert [path.name for path in NOTEBOOKS] == sorted(EXPECTED_OUTPUT)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: a code cell has outputs"


def _stream_text(notebook) -> str:
    return "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.outputs if output.output_type == "stream"
    )


@pytest.mark.xdist_group("notebooks")  # with the documentation build, which reuses the executed notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, executed_notebooks, tmp_path):
    # The notebooks run all at once in the session fixture `executed_notebooks` (conftest.py), offline, with one
    # torch thread each: when other work shares the CPU, two spinning OpenMP threads slow the notebooks down by an
    # order of magnitude (measured on the 2-core development machine), one thread does not.
    notebook, error, workdir = executed_notebooks[path.name]
    nbformat.write(notebook, tmp_path / path.name)  # the executed notebook, for inspection
    if error is not None:
        raise error  # nbclient's CellExecutionError holds the failing cell's traceback

    text = _stream_text(notebook)
    for expected in EXPECTED_OUTPUT[path.name]:
        assert expected in text, f"{path.name}: {expected!r} not in the output:\n{text[-3000:]}"
    # The notebooks write only into temporary folders, never into the working directory.
    assert os.listdir(workdir) == []
