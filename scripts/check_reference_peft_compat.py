"""Check that PEFT models of this package and of micro_sam 1.8 share parameter names and compute the same.

For each PEFT setting (LoRA with several matrix choices, FacT, SSF, AdaptFormer, the selective methods, a subset
of blocks) the script

1. builds vit_b on the meta device in both environments, wraps it with ``PEFT_Sam`` and compares the state-dict
   keys and shapes of ``PEFT_Sam`` and of ``PEFT_Sam(...).sam`` and the names of the trainable parameters;
2. builds a small ViT SAM (2 blocks, 64 channels) in one environment, sets all parameters (including LoRA's zero
   matrices) to random values, saves the wrapped model's state dict and the image encoder's output for a fixed
   input, loads the state dict strictly in the other environment and compares the outputs; in both directions.

With ``--write-fixture`` the (compressed) vit_b key manifest of micro_sam 1.8 is written to ``tests/data/peft_vit_b_keys.json``,
which ``tests/models/test_peft_sam.py`` compares against without the reference environment.

Usage: ``python scripts/check_reference_peft_compat.py [--reference-python /tmp/micro-sam-reference/bin/python]``
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "data", "peft_vit_b_keys.json")

SETTINGS = {
    "lora_qv": {"peft_module": "LoRASurgery", "rank": 4},
    "lora_qkv_mlp": {"peft_module": "LoRASurgery", "rank": 2, "update_matrices": ["q", "k", "v", "mlp"]},
    "lora_mlp_layers_0_11": {"peft_module": "LoRASurgery", "rank": 3, "update_matrices": ["mlp"],
                             "attention_layers_to_update": [0, 11]},
    "fact": {"peft_module": "FacTSurgery", "rank": 4},
    "ssf": {"peft_module": "SSFSurgery", "rank": 1},
    "adaptformer": {"peft_module": "AdaptFormer", "rank": 1, "projection_size": 16},
    "attention": {"peft_module": "AttentionSurgery"},
    "bias": {"peft_module": "BiasSurgery"},
    "layernorm": {"peft_module": "LayerNormSurgery"},
    "classical_last": {"peft_module": "ClassicalSurgery", "attention_layers_to_update": [11]},
}
SMALL_SETTINGS = {  # for the small model (2 blocks)
    name: ({**kw, "attention_layers_to_update": [1]} if "attention_layers_to_update" in kw else kw)
    for name, kw in SETTINGS.items()
}


def compress(entries):
    """A compact form of a key list: ``{template: [shape, block indices]}``, where the template has ``*`` for the
    block numbers (``peft_blocks.*.``, ``blocks.*.``) and shape is None for a list of plain names. Only the image
    encoder and the PEFT blocks are kept (prompt encoder and mask decoder are not touched by PEFT)."""
    compact = {}
    for entry in entries:
        key, shape = entry if isinstance(entry, list) else (entry, None)
        if "image_encoder" not in key and not key.startswith("peft_blocks"):
            continue
        numbers = re.findall(r"blocks\.(\d+)\.", key)
        template = re.sub(r"blocks\.\d+\.", "blocks.*.", key)
        slot = compact.setdefault(template, [shape, []])
        slot[1].append(".".join(numbers))
    return compact


def our_manifest():
    """The compressed vit_b manifest of this package, as stored in the fixture."""
    return {name: {part: compress(entries) for part, entries in value.items()} for name, value in _manifest().items()}


def _peft_kwargs(setting):
    import micro_sam.models.peft_sam as peft

    kwargs = dict(setting)
    kwargs["peft_module"] = getattr(peft, kwargs["peft_module"])
    return kwargs


def _manifest():
    """{setting: {"peft_sam": [[key, shape]...], "sam": [[key, shape]...], "trainable": [names]}} for vit_b."""
    import torch
    from micro_sam.models.peft_sam import PEFT_Sam
    from segment_anything.build_sam import build_sam_vit_b

    result = {}
    for name, setting in SETTINGS.items():
        with torch.device("meta"):
            sam = build_sam_vit_b(None)
            wrapped = PEFT_Sam(sam, **_peft_kwargs(setting))
        result[name] = {
            "peft_sam": [[k, list(v.shape)] for k, v in wrapped.state_dict().items()],
            "sam": [[k, list(v.shape)] for k, v in wrapped.sam.state_dict().items()],
            "trainable": sorted(n for n, p in wrapped.sam.named_parameters() if p.requires_grad),
        }
    return result


def _small_sam():
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    encoder = ImageEncoderViT(depth=2, embed_dim=64, img_size=256, mlp_ratio=4,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=4, patch_size=16,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=7, out_chans=32)
    return Sam(image_encoder=encoder,
               prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(16, 16),
                                            input_image_size=(256, 256), mask_in_chans=4),
               mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=32, transformer=TwoWayTransformer(
                   depth=1, embedding_dim=32, mlp_dim=64, num_heads=2)),
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def _save(folder):
    """Random small PEFT models: state dicts, the input and the encoder outputs."""
    import torch
    from micro_sam.models.peft_sam import PEFT_Sam

    torch.manual_seed(0)
    x = torch.randn(1, 3, 256, 256)
    torch.save(x, os.path.join(folder, "input.pt"))
    for name, setting in SMALL_SETTINGS.items():
        wrapped = PEFT_Sam(_small_sam(), **_peft_kwargs(setting)).eval()
        with torch.no_grad():
            for parameter in wrapped.parameters():
                parameter.copy_(torch.randn_like(parameter) * 0.1)
            out = wrapped.sam.image_encoder(x)
        torch.save(wrapped.sam.state_dict(), os.path.join(folder, f"{name}.pt"))
        torch.save(out, os.path.join(folder, f"{name}_out.pt"))


def _load_and_compare(folder):
    """Load the other environment's state dicts strictly; return the largest output difference per setting."""
    import torch
    from micro_sam.models.peft_sam import PEFT_Sam

    x = torch.load(os.path.join(folder, "input.pt"))
    diffs = {}
    for name, setting in SMALL_SETTINGS.items():
        wrapped = PEFT_Sam(_small_sam(), **_peft_kwargs(setting)).eval()
        wrapped.sam.load_state_dict(torch.load(os.path.join(folder, f"{name}.pt")), strict=True)
        with torch.no_grad():
            out = wrapped.sam.image_encoder(x)
        expected = torch.load(os.path.join(folder, f"{name}_out.pt"))
        diffs[name] = float((out - expected).abs().max() / expected.abs().max())
        try:  # this package: also with the fast attention / block of micro_sam.models.fast_attention
            from micro_sam.models.fast_attention import optimize_sam
        except ImportError:  # micro_sam 1.8
            continue
        optimize_sam(wrapped.sam)
        with torch.no_grad():
            out = wrapped.sam.image_encoder(x)
        diffs[f"{name} (fast attention)"] = float((out - expected).abs().max() / expected.abs().max())
    return diffs


def _worker(mode, folder):
    if mode == "manifest":
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump(_manifest(), f)
    elif mode == "save":
        _save(folder)
    elif mode == "compare":
        with open(os.path.join(folder, "diffs.json"), "w") as f:
            json.dump(_load_and_compare(folder), f)


def _run(python, mode, folder, ours):
    env = dict(os.environ)
    if ours:
        env["PYTHONPATH"] = ROOT
        cwd = ROOT
    else:
        env.pop("PYTHONPATH", None)
        cwd = folder  # not the repository: the reference env must import its own micro_sam
    code = f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r}); " \
           f"import check_reference_peft_compat as c; c._worker({mode!r}, {folder!r})"
    subprocess.run([python, "-c", code], check=True, env=env, cwd=cwd)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", default="/tmp/micro-sam-reference/bin/python")
    parser.add_argument("--write-fixture", action="store_true", help=f"Write {FIXTURE} from this package.")
    args = parser.parse_args()

    ok = True
    with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as ref_dir:
        _run(sys.executable, "manifest", ours_dir, ours=True)
        _run(args.reference_python, "manifest", ref_dir, ours=False)
        with open(os.path.join(ours_dir, "manifest.json")) as f:
            ours = json.load(f)
        with open(os.path.join(ref_dir, "manifest.json")) as f:
            reference = json.load(f)
        for name in SETTINGS:
            for part in ("peft_sam", "sam", "trainable"):
                same = compress(ours[name][part]) == compress(reference[name][part])
                ok &= same
                print(f"vit_b {name:22s} {part:9s} keys/shapes {'identical' if same else 'DIFFER'} "
                      f"({len(ours[name][part])} entries)")
        if args.write_fixture:
            with open(FIXTURE, "w") as f:
                json.dump({name: {part: compress(entries) for part, entries in value.items()}
                           for name, value in reference.items()}, f, separators=(",", ":"))
            print(f"wrote {FIXTURE}")

        for source, target in (("micro_sam 1.8", "this package"), ("this package", "micro_sam 1.8")):
            save_dir, load_dir = (ref_dir, ref_dir) if source == "micro_sam 1.8" else (ours_dir, ours_dir)
            _run(args.reference_python if source == "micro_sam 1.8" else sys.executable, "save", save_dir,
                 ours=source != "micro_sam 1.8")
            _run(sys.executable if target == "this package" else args.reference_python, "compare", load_dir,
                 ours=target == "this package")
            with open(os.path.join(load_dir, "diffs.json")) as f:
                diffs = json.load(f)
            for name, diff in diffs.items():
                ok &= diff < 1e-5
                print(f"{source} -> {target}: {name:40s} loads strictly, relative output difference {diff:.1e}")
    print("ALL COMPATIBLE" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
