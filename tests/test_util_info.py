"""micro_sam.util's micro_sam 1.8 names (lazy, no torch at import) and the micro_sam.info report / command."""
import os
import subprocess
import sys

import pooch
import pytest
import xxhash

from micro_sam import _info, _registry
from _local_server import serve_directory


def test_util_import_is_cheap_and_lazy_names_resolve():
    code = (
        "import sys, micro_sam.util as u\n"
        "heavy = [m for m in ('torch', 'torchvision', 'segment_anything', 'skimage') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert u.VIT_T_SUPPORT is True\n"
        "assert {'SamPredictor', 'sam_model_registry', 'micro_sam_info'} <= set(dir(u))\n"
        "try:\n    u.not_a_name\nexcept AttributeError as e:\n    assert 'not_a_name' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr

    # the names resolve to the objects micro_sam 1.8 exposed (here: torch is imported by the test session anyway)
    import segment_anything
    import torchvision.ops

    import micro_sam.util as u
    from micro_sam.util import SamPredictor, batched_nms, sam_model_registry

    assert SamPredictor is segment_anything.SamPredictor and batched_nms is torchvision.ops.batched_nms
    assert set(sam_model_registry) >= {"vit_t", "vit_b", "vit_l", "vit_h"}
    assert "SamPredictor" in vars(u)  # resolved once, then a plain module attribute


def test_info_groups_models_and_marks_downloads(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MICROSAM_CACHEDIR", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vit_b_lm").write_bytes(b"x")
    from micro_sam.util import micro_sam_info

    micro_sam_info()
    text = capsys.readouterr().out
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0].startswith("micro_sam ")
    assert str(tmp_path) in text and "(set by MICROSAM_CACHEDIR)" in text
    assert "vit_b_lm (vit_b, with instance segmentation decoder, downloaded)" in lines
    assert "vit_l_lm (vit_l, with instance segmentation decoder)" in lines  # not in the cache
    assert "vit_t_demo (vit_t, with instance segmentation decoder)" in lines  # the bundled file has one
    assert "vit_b (vit_b)" in lines  # original SAM: no decoder
    # each model is listed under its family
    light = lines.index("Light microscopy")
    assert lines.index("vit_b_lm (vit_b, with instance segmentation decoder, downloaded)") > light
    assert lines.index("vit_b (vit_b)") < light
    assert "default device: cpu" in lines or any(line.startswith("cuda:0") for line in lines)


@pytest.fixture
def served_registry(monkeypatch, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "model.pt").write_bytes(b"model bytes")
    (served / "decoder.pt").write_bytes(b"decoder bytes")
    digest = {name: xxhash.xxh128((served / name).read_bytes()).hexdigest() for name in ("model.pt", "decoder.pt")}
    with serve_directory(served) as (url, requests):
        entries = {
            "vit_t_fake": _registry.ModelEntry("vit_t_fake", "vit_t", f"{url}/model.pt", digest["model.pt"]),
            "vit_t_fake_decoder": _registry.ModelEntry("vit_t_fake_decoder", "vit_t", f"{url}/decoder.pt",
                                                       digest["decoder.pt"]),
            "vit_t_other": _registry.ModelEntry("vit_t_other", "vit_t", f"{url}/missing.pt", "0" * 32),
        }
        monkeypatch.setattr(_registry, "registry", lambda: entries)
        monkeypatch.setenv("MICROSAM_CACHEDIR", str(tmp_path / "cache"))
        monkeypatch.setattr(pooch.get_logger(), "disabled", True)  # its handler may hold a closed capture stream
        yield tmp_path / "cache" / "models", requests


def test_info_download_fetches_model_and_decoder(served_registry, capsys):
    models_dir, requests = served_registry
    assert _info.main(["--download", "models", "vit_t_fake", "--quiet"]) == 0
    assert (models_dir / "vit_t_fake").read_bytes() == b"model bytes"
    assert (models_dir / "vit_t_fake_decoder").read_bytes() == b"decoder bytes"
    assert sorted(requests) == ["/decoder.pt", "/model.pt"]
    out = capsys.readouterr().out
    assert "vit_t_fake (vit_t, with instance segmentation decoder)" in out  # the report comes first
    assert out.strip().endswith(f"Downloaded 1 model(s) into {models_dir.parent}.")
    assert _info.main([]) == 0
    assert "vit_t_fake (vit_t, with instance segmentation decoder, downloaded)" in capsys.readouterr().out


def test_info_download_rejects_unknown_names_before_downloading(served_registry, capsys):
    models_dir, requests = served_registry
    assert _info.main(["--download", "models", "vit_t_fake", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("micro_sam.info: error:") and len(err.strip().splitlines()) == 1
    assert "Unknown model(s) 'nope'" in err and "vit_t_fake" in err
    assert requests == [] and not models_dir.exists()
    assert _info.main(["--download", "everything"]) == 2
    assert "expects 'models'" in capsys.readouterr().err


def test_info_download_failure_is_one_line_error(served_registry, capsys):
    models_dir, _ = served_registry
    assert _info.main(["--download", "models", "vit_t_other", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("micro_sam.info: error: the download failed")
    assert not (models_dir / "vit_t_other").exists()
