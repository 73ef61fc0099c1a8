"""Train the bundled demo model from scratch: a vit_t SAM with the AIS decoder, on synthetic microscopy images.

Everything is seeded: the random initial weights (written once to ``<save-root>/init_vit_t_<size>.pt``), the
training, validation and held-out images (``micro_sam.sample_data.synthetic_nuclei_2d`` / ``synthetic_cells_2d``,
alternating, 512 x 512) and the sampling of patches and prompts. The model runs at encoder input size 512
(``--image-size``; SAM: 1024), which makes every iteration about four times cheaper. Training is
``micro_sam.training.train_sam``; a run that was interrupted continues from ``latest.pt`` up to the requested total
number of iterations. The chosen checkpoint is exported in half precision as ``{"model_state", "decoder_state",
"image_size"}`` (by default to ``micro_sam/_data/vit_t_demo.pt``, registered in ``bundled_models.tsv``) and
evaluated on 8 held-out images:

- AIS: mean segmentation accuracy (``micro_sam.evaluation.metrics.mean_segmentation_accuracy``) of
  ``InstanceSegmentationWithDecoder`` with its default settings;
- interactive: IoU of the mask (best of three by predicted IoU) for one point prompt at each object's interior-most
  pixel (``micro_sam.evaluation.point_prompts``).

Stages (see the README for the runs that made the bundled file):

    # joint: SAM and the UNETR decoder together (JointSamTrainer), from random weights
    python scripts/train_demo_model.py --save-root runs/joint --objects 16 --sub-iterations 3 --lr 5e-4
    # interactive: prompt encoder + mask decoder on the frozen encoder of a joint export; the embeddings of the
    # (augmented) training images are computed once and reused (--embedding-cache), ~3.5 s per iteration
    python scripts/train_demo_model.py --stage interactive --init-from joint.pt --save-root runs/interactive --lr 1e-4
    # decoder: the UNETR decoder alone on the same frozen encoder, ~12 s per iteration
    python scripts/train_demo_model.py --stage decoder --init-from joint.pt --save-root runs/decoder --lr 1e-4
    # assemble: joint encoder + prompt parts of the interactive stage + UNETR decoder of the decoder stage
    python scripts/train_demo_model.py --stage assemble --init-from joint.pt \
        --prompt-parts-from runs/interactive/checkpoints/vit_t_demo/latest.pt \
        --decoder-from runs/decoder/checkpoints/vit_t_demo/latest.pt
    python scripts/train_demo_model.py --smoke         # 2 iterations end to end, output to a temporary folder

Broadened data (issue 23): ``--data styles`` trains on images in random looks (``micro_sam._synthetic_styles``,
domain randomisation: shapes, sizes, density, brightness and bit depth, edges, background, noise, blur) plus a
quarter of the old generators' images, all normalised as for inference; the decoder stage also gets images
without objects (``--empty-fraction``), which need the foreground cross entropy (``--foreground-bce-weight``)
because the Dice loss gives them no gradient. ``scripts/evaluate_demo_model.py`` scores a model on the held-out
styles of ``scripts/demo_model_styles.json``, images without objects, the old held-out images and a real image.

From scratch, micro_sam's Dice loss alone and a learning rate of 2e-4 left the mask decoder predicting the same
prompt-independent blob for every click for 150 iterations; the cross entropy term (``--bce-weight``,
``micro_sam.training.losses.DiceBCELoss``) and a learning rate of 1e-3 for the prompt parts made it follow the clicks
within 50 iterations. On this 2-core CPU a joint iteration (16 objects, 3 correction rounds, 512 x 512) takes
8-15 s, an interactive one about 5 s (one thread each).
"""
import argparse
import os
import random
import sys
import tempfile
import time
from typing import List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(ROOT, "micro_sam", "_data", "vit_t_demo.pt")
NAME = "vit_t_demo"


def _seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _images(n: int, shape, seed: int, data: str = "synthetic", empty_fraction: float = 0.0, min_objects: int = 0):
    """n synthetic images with instance labels.

    ``data="synthetic"``: alternating ``synthetic_nuclei_2d`` and ``synthetic_cells_2d``, as generated. ``"styles"``:
    every fourth image from those two generators (alternating), the others in a random style of
    ``micro_sam._synthetic_styles.sample_training_style`` (``empty_fraction`` of them without objects); all images
    normalised to uint8 exactly as for inference (``micro_sam._image.to_image``: each image's minimum to 0, its
    maximum to 255), so that training sees what the model sees when it is used. A styled image with fewer than
    ``min_objects`` objects is drawn again (the interactive stages sample at least two objects per image).
    """
    from micro_sam._image import to_image
    from micro_sam._synthetic_styles import render_style, sample_training_style
    from micro_sam.sample_data import synthetic_cells_2d, synthetic_nuclei_2d

    images, labels = [], []
    for i in range(n):
        if data == "synthetic" or i % 4 == 0:
            generate = synthetic_nuclei_2d if (i if data == "synthetic" else i // 4) % 2 == 0 else synthetic_cells_2d
            image, label = generate(tuple(shape), seed=seed + i)
        else:
            rng = np.random.default_rng(seed + i)
            while True:
                image, label = render_style(sample_training_style(rng, empty_fraction), tuple(shape), rng)
                if len(np.unique(label)) - 1 >= min_objects:
                    break
        if data == "styles":
            image = to_image(image)[..., 0]
        images.append(image)
        labels.append(label)
    return images, labels


def _initial_checkpoint(save_root: str, seed: int, image_size: int) -> str:
    import torch

    from micro_sam.models.build_sam import build_sam_vit_t

    path = os.path.join(save_root, f"init_vit_t_{image_size}.pt")
    if not os.path.exists(path):
        torch.manual_seed(seed)
        os.makedirs(save_root, exist_ok=True)
        state = {"model_state": build_sam_vit_t(image_size=image_size).state_dict()}
        if image_size != 1024:
            state["image_size"] = image_size
        torch.save(state, path)
    return path


def _done_iterations(save_root: str) -> int:
    from micro_sam._checkpoints import safe_load

    latest = os.path.join(save_root, "checkpoints", NAME, "latest.pt")
    return int(safe_load(latest)["iteration"]) if os.path.exists(latest) else 0


_PROMPT_PARTS = ("prompt_encoder.", "mask_decoder.")


def _decoder_state_of(path: str) -> Optional[dict]:
    """The UNETR decoder state of a model file / SAM trainer checkpoint, or of a UNETR trainer checkpoint
    (``train_instance_segmentation``: the UNETR's state without its ``encoder.*`` part)."""
    from micro_sam._checkpoints import safe_load

    state = safe_load(path)
    if state.get("decoder_state") is not None:
        return state["decoder_state"]
    unetr = state.get("model_state", {})
    if any(k.startswith("encoder.") for k in unetr):
        return {k: v for k, v in unetr.items() if not k.startswith("encoder.")}
    return None


def _unetr_encoder_state(path: str) -> dict:
    """The image encoder of a UNETR trainer checkpoint (``encoder.*``) under SAM's names (``image_encoder.*``)."""
    from micro_sam._checkpoints import safe_load

    unetr = safe_load(path).get("model_state", {})
    encoder = {"image_encoder." + k[len("encoder."):]: v for k, v in unetr.items() if k.startswith("encoder.")}
    if not encoder:
        raise ValueError(f"{path} is no UNETR trainer checkpoint (no 'encoder.*' parameters).")
    return encoder


def assemble(base: str, output: str, prompt_parts_from: Optional[str] = None,
             decoder_from: Optional[str] = None, half: bool = False, image_size: Optional[int] = None,
             encoder_from: Optional[str] = None) -> None:
    """Write a model file ``{"model_state", "decoder_state"[, "image_size"]}`` built from checkpoints.

    ``base`` gives everything; ``prompt_parts_from`` replaces the prompt encoder and mask decoder (the result of
    the interactive stage), ``decoder_from`` the UNETR decoder state (a model file, a SAM trainer checkpoint or a
    UNETR trainer checkpoint), ``encoder_from`` the image encoder (a UNETR trainer checkpoint of a decoder stage
    that also trained the encoder). ``half``: floating tensors in float16. ``image_size``: record this encoder
    input size instead of the base's (vit_t's parameters do not depend on it; the model is rebuilt at this size
    when loaded). Written atomically.
    """
    import torch

    from micro_sam._checkpoints import safe_load, split_checkpoint

    model_state, decoder_state, state = split_checkpoint(safe_load(base), base)
    model_state = dict(model_state)
    if prompt_parts_from is not None:
        other, _, _ = split_checkpoint(safe_load(prompt_parts_from), prompt_parts_from)
        model_state.update((k, v) for k, v in other.items() if k.startswith(_PROMPT_PARTS))
    if encoder_from is not None:
        encoder = _unetr_encoder_state(encoder_from)
        own = {k for k in model_state if k.startswith("image_encoder.")}
        if set(encoder) != own:
            raise ValueError(f"The encoder of {encoder_from} does not fit {base}: {len(set(encoder) ^ own)} keys differ.")
        model_state.update(encoder)
    if decoder_from is not None:
        decoder_state = _decoder_state_of(decoder_from)
    if decoder_state is None:
        raise ValueError(f"No decoder_state in {decoder_from or base}.")

    def convert(tensors):
        return {k: (v.half() if half and torch.is_floating_point(v) else v) for k, v in tensors.items()}

    assembled = {"model_state": convert(model_state), "decoder_state": convert(decoder_state)}
    if image_size is not None:
        assembled["image_size"] = int(image_size)
    elif "image_size" in state:
        assembled["image_size"] = int(state["image_size"])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}"
    torch.save(assembled, tmp)
    os.replace(tmp, output)


def export_half_precision(checkpoint: str, output: str, decoder_from: Optional[str] = None) -> None:
    """Write ``{"model_state", "decoder_state"}`` of a checkpoint with floating tensors in float16.

    ``decoder_from``: take the decoder state from this file (for a checkpoint of the interactive stage).
    """
    assemble(checkpoint, output, decoder_from=decoder_from, half=True)


def register_bundled(output: str) -> None:
    """Write ``micro_sam/_data/bundled_models.tsv`` for the exported file (its name and xxh128 hash)."""
    from micro_sam._sam_loading import compute_hash

    registry = os.path.join(os.path.dirname(output), "bundled_models.tsv")
    row = [NAME, "vit_t", compute_hash(output).split(":", 1)[1], os.path.basename(output)]
    tmp = f"{registry}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("name\tarchitecture\txxh128\tfile\n" + "\t".join(row) + "\n")
    os.replace(tmp, registry)


def evaluate(model_path: str, images, labels, device: str) -> dict:
    """AIS mSA and point-prompt IoU of an exported model on held-out images."""
    from micro_sam.evaluation.metrics import mean_segmentation_accuracy
    from micro_sam.evaluation.point_prompts import point_prompt_ious
    from micro_sam.instance_segmentation import InstanceSegmentationWithDecoder, get_predictor_and_decoder
    from micro_sam.util import precompute_image_embeddings

    predictor, decoder = get_predictor_and_decoder("vit_t", checkpoint_path=model_path, device=device)
    segmenter = InstanceSegmentationWithDecoder(predictor, decoder)
    msa, ious = [], []
    for image, label in zip(images, labels):
        embeddings = precompute_image_embeddings(predictor, image, verbose=False)
        segmenter.initialize(image, image_embeddings=embeddings, verbose=False)
        msa.append(mean_segmentation_accuracy(segmenter.generate(), label))
        ious.extend(point_prompt_ious(predictor, image, label, image_embeddings=embeddings).values())
    return {"ais_msa": float(np.mean(msa)), "point_iou": float(np.mean(ious)), "n_images": len(images),
            "n_objects": len(ious)}


def _interactive_freeze(n_trained_stages: int, image_size: int) -> List[str]:
    """The ``freeze`` list of the interactive stage: the whole image encoder, or all but its last
    ``n_trained_stages`` stages and the neck. The batch norms of the trained stages stay frozen too, so that
    they keep normalising with their running statistics (batch size 1 would otherwise give each image its own)."""
    if n_trained_stages == 0:
        return ["image_encoder"]
    import torch

    from micro_sam.models.build_sam import _build_vit_t

    encoder = _build_vit_t(image_size).image_encoder
    name_of = {id(module): name for name, module in encoder.named_modules()}
    names = [name_of[id(stage)] for stage in encoder.stages]  # "patch_embed", "layers.0", ...
    if not 0 < n_trained_stages <= len(names):
        raise ValueError(f"--train-encoder-stages must be in [0, {len(names)}], got {n_trained_stages}.")
    frozen = names[:len(names) - n_trained_stages] + ["norm_head", "head"]  # the classification head is unused
    for name in names[len(names) - n_trained_stages:]:
        stage = encoder.get_submodule(name)
        frozen += [f"{name}.{sub}" for sub, module in stage.named_modules()
                   if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    return [f"image_encoder.{name}" for name in frozen]


def _train_and_export(args, parser, shape, output: str) -> None:
    """Run one training stage (continuing from ``latest.pt``) and export its checkpoint."""
    from micro_sam.training import default_sam_loader, train_instance_segmentation, train_sam
    from micro_sam.training.losses import DiceBCEDistanceLoss, DiceBCELoss

    joint, decoder_only = args.stage == "joint", args.stage == "decoder"
    # the interactive loss needs objects in every image: images without objects only for the decoder stage
    empty = args.empty_fraction if decoder_only else 0.0
    min_objects = 0 if decoder_only else 2
    train_images, train_labels = _images(args.n_train, shape, args.seed * 1000, args.data, empty, min_objects)
    val_images, val_labels = _images(args.n_val, shape, args.seed * 1000 + 500, args.data, empty, min_objects)
    if not joint and args.init_from is None:
        parser.error(f"--stage {args.stage} needs --init-from (the model whose image encoder is kept).")
    common = dict(raw_key=None, label_key=None, patch_shape=shape, with_segmentation_decoder=joint or decoder_only,
                  min_size=args.min_size)
    if decoder_only:
        common["train_instance_segmentation_only"] = True
    train_loader = default_sam_loader(raw_paths=train_images, label_paths=train_labels, shuffle=True, batch_size=1,
                                      n_samples=args.iterations_per_epoch, **common)
    val_loader = default_sam_loader(raw_paths=val_images, label_paths=val_labels, batch_size=1, is_train=False,
                                    n_samples=max(args.n_val, 1), **common)

    initial = args.init_from or _initial_checkpoint(args.save_root, args.seed, args.image_size)
    if args.prompt_parts_from is not None:
        if args.init_from is None:
            parser.error("--prompt-parts-from needs --init-from.")
        os.makedirs(args.save_root, exist_ok=True)
        initial = os.path.join(args.save_root, "init_assembled.pt")
        if not os.path.exists(initial):
            assemble(args.init_from, initial, prompt_parts_from=args.prompt_parts_from)
    done = _done_iterations(args.save_root)
    remaining = args.iterations - done
    print(f"{done} of {args.iterations} iterations done; training {max(remaining, 0)} more.")
    t_start = time.time()
    if remaining > 0 and decoder_only:
        train_instance_segmentation(
            name=NAME, model_type="vit_t", train_loader=train_loader, val_loader=val_loader,
            n_iterations=remaining, checkpoint_path=initial, lr=args.lr,
            freeze=_interactive_freeze(args.train_encoder_stages, args.image_size),
            save_root=args.save_root, device=args.device, early_stopping=None, verify_n_labels_in_loader=2,
            load_from_checkpoint="latest" if done > 0 else None,
            loss=DiceBCEDistanceLoss(args.foreground_bce_weight) if args.foreground_bce_weight else None,
        )
    elif remaining > 0:
        train_sam(
            name=NAME, model_type="vit_t", train_loader=train_loader, val_loader=val_loader,
            n_iterations=remaining, checkpoint_path=initial, with_segmentation_decoder=joint, lr=args.lr,
            freeze=None if joint else _interactive_freeze(args.train_encoder_stages, args.image_size),
            n_objects_per_batch=args.objects, n_sub_iteration=args.sub_iterations, save_root=args.save_root,
            device=args.device, early_stopping=None, verify_n_labels_in_loader=2,
            load_from_checkpoint="latest" if done > 0 else None,
            mask_loss=DiceBCELoss(args.bce_weight) if args.bce_weight else None,
            embedding_cache_size=0 if joint else args.embedding_cache,
        )
    if remaining > 0:
        elapsed = time.time() - t_start
        print(f"Trained {remaining} iterations in {elapsed:.1f} s ({elapsed / remaining:.2f} s/iteration, "
              "validation and checkpointing included).")

    best = os.path.join(args.save_root, "checkpoints", NAME, f"{args.export_checkpoint}.pt")
    if decoder_only:
        assemble(args.init_from, output, decoder_from=best, half=True,
                 encoder_from=best if args.train_encoder_stages else None)
    else:
        export_half_precision(best, output, decoder_from=None if joint else args.init_from)
    what = f"{args.init_from} with the decoder of {best}" if decoder_only else best
    print(f"Exported {what} (half precision) to {output} ({os.path.getsize(output) / 1e6:.1f} MB).")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save-root", default=None,
                        help="Checkpoints, logs and the initial weights (default: <micro_sam cache>/demo_training; "
                        "with --smoke a temporary folder).")
    parser.add_argument("--output", default=None, help=f"Exported model (default: {DEFAULT_OUTPUT}).")
    parser.add_argument("--iterations", type=int, default=20000, help="Total training iterations.")
    parser.add_argument("--iterations-per-epoch", type=int, default=200, help="Validation / checkpoint interval.")
    parser.add_argument("--patch", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=512,
                        help="Encoder input size (SAM: 1024). 512 makes training and inference 4x cheaper; "
                        "the exported model records it and is rebuilt at this size when loaded.")
    parser.add_argument("--n-train", type=int, default=64, help="Training images (half nuclei, half cells).")
    parser.add_argument("--n-val", type=int, default=8, help="Validation images.")
    parser.add_argument("--n-test", type=int, default=8, help="Held-out images for the final evaluation.")
    parser.add_argument("--objects", type=int, default=10, help="Objects per image for the interactive loss.")
    parser.add_argument("--sub-iterations", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4, help="Learning rate (training from scratch).")
    parser.add_argument("--bce-weight", type=float, default=1.0,
                        help="Weight of the cross entropy added to the Dice loss of the masks "
                        "(micro_sam.training.losses.DiceBCELoss); 0: micro_sam's Dice loss.")
    parser.add_argument("--export-checkpoint", choices=["best", "latest"], default="best",
                        help="The checkpoint to export (latest: after a change of the loss, whose validation "
                        "values are not comparable with the earlier best).")
    parser.add_argument("--init-from", default=None,
                        help="Start a new run from this model file ({model_state, decoder_state, image_size}, e.g. "
                        "an export of an earlier run's latest.pt) instead of random weights: a fresh optimizer, "
                        "e.g. for another learning rate.")
    parser.add_argument("--stage", choices=["joint", "interactive", "decoder", "assemble"], default="joint",
                        help="joint: everything (SAM and the UNETR decoder, JointSamTrainer); interactive: only the "
                        "prompt encoder and mask decoder on the frozen image encoder of --init-from (SamTrainer), "
                        "much cheaper per iteration, the export takes the decoder from --init-from; decoder: only "
                        "the UNETR decoder on that frozen encoder (train_instance_segmentation), the export takes "
                        "SAM from --init-from; assemble: no training, the export is --init-from with the prompt "
                        "encoder and mask decoder of --prompt-parts-from and the UNETR decoder of --decoder-from "
                        "(results of an interactive and a decoder stage on the same encoder).")
    parser.add_argument("--prompt-parts-from", default=None,
                        help="With --init-from: start the prompt encoder and mask decoder from this checkpoint "
                        "(e.g. an interactive stage trained on an earlier encoder); with --stage assemble: take "
                        "them from it.")
    parser.add_argument("--set-image-size", type=int, default=None,
                        help="--stage assemble: record this encoder input size in the output instead of that of "
                        "--init-from (same parameters; e.g. 640 to run the 512 x 512 images upscaled 1.25x, with "
                        "finer image tokens). Later stages started from the output train at this size.")
    parser.add_argument("--decoder-from", default=None,
                        help="--stage assemble: the UNETR decoder from this checkpoint or model file.")
    parser.add_argument("--embedding-cache", type=int, default=2048,
                        help="Interactive stage: image embeddings of the frozen encoder kept for reuse (distinct "
                        "augmented images, 1 MB each at --image-size 512; TrainableSAM's embedding_cache_size).")
    parser.add_argument("--train-encoder-stages", type=int, default=0,
                        help="Interactive and decoder stage: also train the last N of the encoder's 5 stages (patch "
                        "embedding, 4 layers) and its neck, their batch norms kept frozen; the embedding cache then "
                        "keeps the output of the frozen stages. The export holds the changed encoder; train the "
                        "part that was not trained on it afterwards (e.g. --stage decoder --init-from <export>).")
    parser.add_argument("--data", choices=["synthetic", "styles"], default="synthetic",
                        help="Training and validation images: synthetic: micro_sam.sample_data's nuclei and cells "
                        "generators; styles: a quarter of those, the rest in random styles (domain randomisation, "
                        "micro_sam._synthetic_styles), all normalised as for inference. The held-out images of "
                        "the final evaluation are always those of the synthetic generators.")
    parser.add_argument("--empty-fraction", type=float, default=0.1,
                        help="--data styles, --stage decoder: fraction of the styled images without objects "
                        "(blank, constant, noise, background only).")
    parser.add_argument("--min-size", type=int, default=25,
                        help="Objects smaller than this (pixels) are removed from the training labels.")
    parser.add_argument("--foreground-bce-weight", type=float, default=0.0,
                        help="--stage decoder: add this weight times the foreground's cross entropy to the UNETR "
                        "loss (micro_sam.training.losses.DiceBCEDistanceLoss); needed for images without objects, "
                        "which give the Dice loss no gradient. 0: micro_sam's loss.")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--smoke", action="store_true", help="2 iterations on small images, output to a temp dir.")
    args = parser.parse_args(argv)

    import torch

    if args.smoke:
        args.save_root = args.save_root or tempfile.mkdtemp(prefix="micro_sam_demo_smoke_")
        args.output = args.output or os.path.join(args.save_root, "vit_t_demo.pt")
        args.iterations, args.iterations_per_epoch = 2, 1
        args.patch, args.n_train, args.n_val, args.n_test = 256, 2, 1, 1
        args.objects, args.sub_iterations = 4, 2
    output = args.output or DEFAULT_OUTPUT
    if args.save_root is None:
        from micro_sam.util import get_cache_directory

        args.save_root = os.path.join(get_cache_directory(), "demo_training")

    _seed(args.seed)
    shape = (args.patch, args.patch)
    test_images, test_labels = _images(args.n_test, shape, seed=args.seed * 1000 + 900)  # always the old generator
    if args.stage == "assemble":
        if args.init_from is None:
            parser.error("--stage assemble needs --init-from (the model that gives everything else).")
        assemble(args.init_from, output, prompt_parts_from=args.prompt_parts_from,
                 decoder_from=args.decoder_from, half=True, image_size=args.set_image_size)
        print(f"Assembled {args.init_from} with the prompt parts of {args.prompt_parts_from} and the "
              f"decoder of {args.decoder_from} (half precision) to {output}.")
    else:
        _train_and_export(args, parser, shape, output)
    if os.path.abspath(output) == DEFAULT_OUTPUT:
        register_bundled(output)
        print(f"Registered {NAME} in micro_sam/_data/bundled_models.tsv.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quality = evaluate(output, test_images, test_labels, device)
    print(f"Held-out quality ({quality['n_images']} images, {quality['n_objects']} objects): "
          f"AIS mSA {quality['ais_msa']:.3f}, point-prompt IoU {quality['point_iou']:.3f}")
    return quality


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
