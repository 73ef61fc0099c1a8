"""The micro_sam.train command: micro_sam 1.8's options, inputs checked before training, a LoRA run end to end."""
import numpy as np
import pytest
import tifffile
import torch

from micro_sam.training import training as training_module
from micro_sam.training import _train_cli

from ._helpers import disk_images

# micro_sam 1.8.14's options (``micro_sam.train --help`` of the reference installation)
REFERENCE_OPTIONS = [
    "--images", "--labels", "--image_key", "--label_key", "--val_images", "--val_labels", "--val_image_key",
    "--val_label_key", "--configuration", "--segmentation_decoder", "-d", "--device", "--patch_shape", "-m",
    "--model_type", "--checkpoint_path", "-s", "--save_root", "--trained_model_name", "--output_path", "--n_epochs",
    "--num_workers", "--batch_size", "--preprocess",
]


def test_accepts_micro_sams_options():
    options = {option for action in _train_cli._parser()._actions for option in action.option_strings}
    assert set(REFERENCE_OPTIONS) <= options
    assert {"--checkpoint_name", "--n_iterations", "--peft_method", "--peft_rank", "--peft_layers"} <= options
    args = _train_cli._parser().parse_args(["--images", "a.tif", "--labels", "b.tif", "--checkpoint_name", "run"])
    assert args.trained_model_name == "run" and tuple(args.patch_shape) == (512, 512) and args.n_epochs == 100


@pytest.fixture
def data(tmp_path):
    images, labels = disk_images(3, shape=(128, 128), n_objects=5, seed=3)
    paths = {"images": [], "labels": []}
    for i, (image, label) in enumerate(zip(images, labels)):
        for kind, array in (("images", image), ("labels", label)):
            path = tmp_path / kind / f"{i}.tif"
            path.parent.mkdir(exist_ok=True)
            tifffile.imwrite(path, array)
            paths[kind].append(str(path))
    return paths


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training starts: every bad input must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(training_module, "train_sam", refuse)
    monkeypatch.setattr(training_module, "train_instance_segmentation", refuse)


def _error(capsys, argv):
    code = training_module.main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("micro_sam.train: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("extra,message", [
    (["--configuration", "gtx9999"], "Unknown training resource 'gtx9999'. Tested resources: 'CPU_32GB'"),
    (["--model_type", "vit_q"], "Unknown model_type 'vit_q'; registered models: .*vit_b"),
    (["--peft_method", "loraa"], "Unknown --peft_method 'loraa'; choose one of lora, fact, ssf"),
    (["--peft_method", "lora", "--peft_rank", "0"], "LoRASurgery needs a positive integer rank, got rank=0"),
    (["--peft_method", "fact"], "FacTSurgery needs a positive integer rank, got rank=None"),
    (["--peft_method", "lora", "--peft_rank", "4", "--peft_layers", "3", "12"],
     r"attention_layers_to_update \[12\] out of range; valid indices: 0-11"),
    (["--peft_method", "lora", "--peft_rank", "4", "--peft_update_matrices", "q", "x"],
     r"Unknown update_matrices \['x'\]; choose from \['q', 'k', 'v', 'mlp'\]"),
    (["--peft_rank", "4"], "--peft_rank need --peft_method"),
    (["--segmentation_decoder", "semantic"], "segmentation_decoder must be 'instances', 'instances_only' or 'None'"),
    (["--n_iterations", "0"], "--n_iterations must be at least 1"),
    (["--output_path", "model.onnx"], "--output_path must end with .pt or .pth"),
    (["--patch_shape", "512"], "--patch_shape must be two positive sizes"),
    (["--n_epochs", "ten"], "argument --n_epochs: invalid int value: 'ten'"),
])
def test_bad_settings_fail_before_training(capsys, data, no_training, extra, message):
    import re

    line = _error(capsys, ["--images", *data["images"], "--labels", *data["labels"], "--patch_shape", "128", "128",
                           *extra])
    assert re.search(message, line), line


def test_bad_data_fails_before_training(capsys, data, no_training, tmp_path):
    common = ["--patch_shape", "128", "128"]
    line = _error(capsys, ["--images", *data["images"], "--labels", *data["labels"][:2], *common])
    assert "3 training images but 2 label images; every image needs its label image" in line
    wrong = tmp_path / "wrong.tif"
    tifffile.imwrite(wrong, np.zeros((100, 128), "uint32"))
    line = _error(capsys, ["--images", *data["images"], "--labels", *data["labels"][:2], str(wrong), *common])
    assert f"has shape (128, 128), its labels '{wrong}' have shape (100, 128)" in line
    line = _error(capsys, ["--images", *data["images"], "--labels", *data["labels"], "--patch_shape", "256", "256"])
    assert "is smaller than the patch shape (256, 256); use --patch_shape at most (128, 128)" in line
    folder = str(tmp_path / "images")
    line = _error(capsys, ["--images", folder, "--image_key", "*.png", "--labels", *data["labels"], *common])
    assert "No images match" in line and "*.png" in line
    line = _error(capsys, ["--images", str(tmp_path / "missing.tif"), "--labels", data["labels"][0], *common])
    assert "The images path" in line and "does not exist" in line
    line = _error(capsys, ["--images", *data["images"], "--labels", *data["labels"], "--val_images",
                           data["images"][0], *common])
    assert "--val_images and --val_labels must be given together" in line
    # folders with a pattern pair up in sorted order
    assert _train_cli.check_image_label_pairs([folder], [str(tmp_path / "labels")], "*.tif", "*.tif", (128, 128)) == 3


def test_lora_run_trains_exports_and_loads_back(capsys, data, tmp_path, vit_t_checkpoint):
    """Train LoRA (rank 2) on vit_t through the command, export it, load it with get_sam_model(peft_kwargs=...)."""
    from micro_sam._checkpoints import safe_load
    from micro_sam.models.build_sam import build_sam_vit_t
    from micro_sam.models.peft_sam import PEFT_Sam
    from micro_sam.util import get_sam_model

    base = safe_load(vit_t_checkpoint)
    start = tmp_path / "vit_t_256.pt"  # the same weights at encoder input size 256 (cheap)
    torch.save({"model_state": base, "image_size": 256}, start)
    output = tmp_path / "lora_model.pt"
    torch.manual_seed(0), np.random.seed(0)
    threads = torch.get_num_threads()
    try:
        code = training_module.main([
            "--images", *data["images"][:2], "--labels", *data["labels"][:2], "--val_images", data["images"][2],
            "--val_labels", data["labels"][2], "--patch_shape", "128", "128", "-m", "vit_t", "--checkpoint_path",
            str(start), "--configuration", "CPU", "--segmentation_decoder", "None", "--n_iterations", "2",
            "--lr", "1e-3", "--peft_method", "lora", "--peft_rank", "2", "--save_root", str(tmp_path),
            "--checkpoint_name", "lora_run", "--output_path", str(output), "--device", "cpu", "--num_workers", "0",
            "--n_objects_per_batch", "3",
        ])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "model_type 'vit_t' was not tested on the resource 'CPU_32GB'; tested model types: vit_b. Using the " \
           "settings of its vit_b row." in out
    assert "micro_sam.train: 2 image(s); training SAM from vit_t with the 'CPU' configuration" in out
    assert "'peft_module': 'lora', 'rank': 2" in out and f"saved at {output}" in out
    # progress: one named bar over the iterations (plain lines, as stderr is not a terminal here)
    assert "micro_sam.train lora_run: 2/2 in " in captured.err and "\r" not in captured.err

    exported = safe_load(output)
    state = exported["model_state"]
    assert exported["image_size"] == 256
    lora_b = [v for k, v in state.items() if "w_b_linear" in k]
    assert len(lora_b) == 20 and all(v.abs().sum() > 0 for v in lora_b)  # B started at zero and was trained
    base_qkv = "image_encoder.layers.1.blocks.0.attn.qkv.weight"
    assert torch.equal(state[base_qkv.replace("qkv.weight", "qkv.qkv_proj.weight")], base[base_qkv])  # frozen

    predictor = get_sam_model("vit_t", checkpoint_path=output, device="cpu", peft_kwargs={"rank": 2})
    trained = safe_load(tmp_path / "checkpoints" / "lora_run" / "best.pt")["model_state"]
    reference = PEFT_Sam(build_sam_vit_t(image_size=256), rank=2).sam.eval()
    reference.load_state_dict({k[len("sam."):]: v for k, v in trained.items()})
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(predictor.model.image_encoder(x), reference.image_encoder(x), atol=1e-5)
    with pytest.raises(RuntimeError, match="looks like a PEFT model trained with peft_kwargs=.*'rank': 2"):
        get_sam_model("vit_t", checkpoint_path=output, device="cpu")
    with pytest.raises(RuntimeError, match="holds no PEFT parameters: load it without peft_kwargs"):
        get_sam_model("vit_t", checkpoint_path=start, device="cpu", peft_kwargs={"rank": 2})


def test_settings_reach_the_training(capsys, data, monkeypatch, tmp_path):
    """The configuration's settings, the PEFT options and --quiet as train_sam receives them (training replaced)."""
    calls = []
    monkeypatch.setattr(training_module, "train_sam", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(training_module, "_export_helper", lambda *args: "best.pt")
    argv = ["--images", *data["images"], "--labels", *data["labels"], "--patch_shape", "128", "128",
            "--configuration", "gtx1080", "--save_root", str(tmp_path), "--num_workers", "0"]
    peft = ["--peft_method", "lora", "--peft_rank", "4", "--peft_layers", "10", "11", "--peft_update_matrices", "q",
            "k", "v"]
    assert training_module.main(argv + peft + ["--quiet"]) == 0
    kwargs = calls.pop()
    assert kwargs["model_type"] == "vit_b" and kwargs["n_objects_per_batch"] == 10
    assert kwargs["freeze"] is None  # the GTX1080Ti row freezes the image encoder: PEFT trains part of it
    assert kwargs["peft_kwargs"] == {"peft_module": "lora", "rank": 4, "attention_layers_to_update": [10, 11],
                                     "update_matrices": ["q", "k", "v"]}
    assert kwargs["train_loader"].batch_size == 1 and kwargs["pbar_signals"] is not None
    assert "micro_sam.train:" not in capsys.readouterr().out
    assert training_module.main(argv) == 0
    kwargs = calls.pop()
    assert kwargs["freeze"] == ["image_encoder"] and kwargs["peft_kwargs"] is None
    assert isinstance(kwargs["pbar_signals"], _train_cli._ConsoleProgress)
    assert "training SAM and the decoder from vit_b with the 'gtx1080' configuration" in capsys.readouterr().out
    # without validation data: a random 10 % (at least one) of the training patches validates, disjoint from training
    train, val = kwargs["train_loader"].dataset, kwargs["val_loader"].dataset
    assert len(val) == max(1, int(0.1 * (len(train) + len(val)))) and not set(train.indices) & set(val.indices)
    # without --configuration: the closest match for this machine
    from micro_sam.training.configurations import find_best_configuration

    no_configuration = [a for a in argv if a not in ("--configuration", "gtx1080")]
    assert training_module.main(no_configuration) == 0
    assert f"with the {find_best_configuration()!r} configuration" in capsys.readouterr().out


def test_failure_during_training_is_one_line_with_exit_code_1(capsys, data, monkeypatch, tmp_path):
    def fail(**kwargs):
        raise RuntimeError("out of memory\nwhile training")

    monkeypatch.setattr(training_module, "train_sam", fail)
    code = training_module.main(["--images", *data["images"], "--labels", *data["labels"], "--patch_shape", "128",
                                 "128", "--save_root", str(tmp_path), "--num_workers", "0", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == ["micro_sam.train: error: out of memory; while training"]
