"""The documentation: the site builds without warnings, and every public function and class has a docstring."""
import html
import importlib
import sys
import types
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import build_docs  # noqa: E402

sys.path.remove(str(ROOT / "scripts"))


def test_every_public_function_and_class_has_a_docstring():
    """Walks the whole package, so modules added later are covered; the napari tools are included if importable."""
    modules, skipped = build_docs.public_modules()
    assert "micro_sam.util" in modules and "micro_sam.training.sam_trainer" in modules
    assert not any(name.startswith("micro_sam._") for name in modules)
    for name, reason in skipped.items():  # only optional GUI dependencies may be missing
        assert name.startswith("micro_sam.sam_annotator"), (name, reason)
    assert build_docs.undocumented(modules) == []


def test_the_docstring_check_finds_what_is_missing(monkeypatch):
    module = types.ModuleType("micro_sam.fake_module", "A module.")

    def documented():
        """Has one."""

    def undocumented_function():
        pass

    class Documented:
        """Has one."""

        def method_without(self):
            pass

    class Undocumented:
        pass

    for obj in (documented, undocumented_function, Documented, Undocumented):
        obj.__module__ = module.__name__
        setattr(module, obj.__name__, obj)
    module._private = undocumented_function  # private names are not checked
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert build_docs.undocumented([module.__name__]) == [
        "micro_sam.fake_module.Documented.method_without", "micro_sam.fake_module.Undocumented",
        "micro_sam.fake_module.undocumented_function"]


def test_page_order_and_addresses():
    names = ["faq.md", "99_faq.md", "01_installation.md", "tracking.md", "annotator.md", "02_python_library.md"]
    ordered = sorted((Path(name) for name in names), key=build_docs.page_order)
    assert [p.name for p in ordered] == ["01_installation.md", "02_python_library.md", "annotator.md", "faq.md",
                                         "tracking.md", "99_faq.md"]
    assert build_docs.page_url(Path("docs/01_installation.md")) == "installation.html"
    assert build_docs.page_url(Path("docs/tracking.md")) == "tracking.html"


@pytest.mark.xdist_group("notebooks")  # on the worker that executed the notebooks
def test_site_builds_without_warnings(executed_notebooks, tmp_path):
    """The site from docs/*.md, the notebooks the notebook test executed, and the API reference of every module."""
    executed = tmp_path / "executed"
    executed.mkdir()
    for name, (notebook, error, _) in executed_notebooks.items():
        if error is not None:
            pytest.fail(f"the notebook {name} failed (see test_notebooks.py)")
        nbformat.write(notebook, executed / name)
    site = tmp_path / "site"
    assert build_docs.build(site, executed_notebooks=executed) == []

    pages = build_docs.narrative_pages(ROOT / "docs")
    assert [page.url for page in pages[:5]] == ["installation.html", "python_library.html", "command_line.html",
                                               "training.html", "evaluation.html"]
    for page in pages:
        text = (site / page.url).read_text()
        assert f"<title>{html.escape(page.title)} - micro_sam</title>" in text
        assert 'href="micro_sam.html"' in text  # the navigation leads to the API reference
    assert (site / "index.html").read_text() == (site / pages[0].url).read_text()
    training = (site / "training.html").read_text()
    assert "<td>A100</td>" in training and "<td>vit_h</td>" in training  # the generated hardware table
    assert 'href="notebook_finetuning.html"' in training  # the link to notebooks/finetuning.ipynb

    for name in executed_notebooks:  # every notebook with its figures
        page = (site / f"notebook_{Path(name).stem}.html").read_text()
        figures = sorted((site / "notebooks").glob(f"{Path(name).stem}_*.png"))
        assert figures and all(f'src="notebooks/{figure.name}"' in page for figure in figures)
        assert figures[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    modules, _ = build_docs.public_modules()
    for name in modules:  # an API page per public module, with the site's pages in its navigation
        api_page = site / (name.replace(".", "/") + ".html")
        assert api_page.is_file(), name
    util_page = (site / "micro_sam" / "util.html").read_text()
    assert 'href="../installation.html"' in util_page and "get_sam_model" in util_page
    assert importlib.import_module("micro_sam.util").get_sam_model.__doc__.split("\n")[0] in util_page
