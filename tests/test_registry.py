"""Model registry and verified downloads, against a small HTTP server on 127.0.0.1."""
import functools
import http.server
import os
import threading

import pytest
import torch
import xxhash

from micro_sam import _registry
from micro_sam.util import get_model_names, get_sam_model


def _xxh128(path):
    return xxhash.xxh128(open(path, "rb").read()).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/broken"):  # announce more bytes than are sent, then hang up
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.connection.close()
            return
        self.server.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()


@pytest.fixture
def fake_registry(monkeypatch, tmp_path, server, vit_t_checkpoint):
    root, url, httpd = server
    (root / "model.pt").write_bytes(vit_t_checkpoint.read_bytes())
    decoder = {"base.weight": torch.ones(3)}
    torch.save(decoder, root / "decoder.pt")
    (root / "other.pt").write_bytes(b"not the file the registry promises")
    entries = {
        "vit_t_fake": _registry.ModelEntry("vit_t_fake", "vit_t", f"{url}/model.pt", _xxh128(root / "model.pt")),
        "vit_t_fake_decoder": _registry.ModelEntry("vit_t_fake_decoder", "vit_t", f"{url}/decoder.pt",
                                                   _xxh128(root / "decoder.pt")),
        "vit_t_corrupt": _registry.ModelEntry("vit_t_corrupt", "vit_t", f"{url}/other.pt", "0" * 32),
        "vit_t_broken": _registry.ModelEntry("vit_t_broken", "vit_t", f"{url}/broken.pt", "0" * 32),
    }
    monkeypatch.setattr(_registry, "registry", lambda: entries)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MICROSAM_CACHEDIR", str(cache))
    return entries, cache, httpd


def test_shipped_registry_has_every_model():
    names = get_model_names()
    for name in ["vit_b", "vit_l", "vit_h", "vit_t", "vit_b_lm", "vit_t_lm", "vit_b_em_organelles",
                 "vit_b_histopathology", "vit_b_medical_imaging"]:
        assert name in names
    assert not any(n.endswith("_decoder") for n in names)
    entry = _registry.registry()["vit_b_lm_decoder"]
    assert entry.known_hash == "xxh128:708b15ac620e235f90bb38612c4929ba"
    pooch_registry = _registry.models().registry
    assert pooch_registry["vit_b"] == "xxh128:6923c33df3637b6a922d7682bfc9a86b"


def test_cache_directory_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MICROSAM_CACHEDIR", str(tmp_path / "x"))
    assert _registry.get_cache_directory() == str(tmp_path / "x")
    monkeypatch.delenv("MICROSAM_CACHEDIR")
    assert "micro_sam" in _registry.get_cache_directory()


def test_download_model_and_decoder(fake_registry):
    entries, cache, httpd = fake_registry
    predictor, state = get_sam_model(model_type="vit_t_fake", return_state=True, device="cpu")
    assert predictor.model_name == "vit_t_fake" and predictor.model_type == "vit_t"
    assert predictor._hash == entries["vit_t_fake"].known_hash
    assert torch.equal(state["decoder_state"]["base.weight"], torch.ones(3))
    assert sorted(os.listdir(cache / "models")) == ["vit_t_fake", "vit_t_fake_decoder"]
    n_requests = len(httpd.requests)
    get_sam_model(model_type="vit_t_fake")  # cached: no new download
    assert len(httpd.requests) == n_requests


def test_wrong_hash_leaves_no_file(fake_registry):
    entries, cache, _ = fake_registry
    with pytest.raises(ValueError, match="(?i)hash"):
        get_sam_model(model_type="vit_t_corrupt")
    assert not (cache / "models").exists() or os.listdir(cache / "models") == []


def test_interrupted_download_leaves_no_file(fake_registry):
    entries, cache, _ = fake_registry
    with pytest.raises(Exception):
        get_sam_model(model_type="vit_t_broken")
    assert not (cache / "models").exists() or os.listdir(cache / "models") == []
