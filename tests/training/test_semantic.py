"""Semantic segmentation: the Dice loss, SemanticSamTrainer on 2D and 3D models, the 3D wrappers' structure."""
import copy
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch.utils.data import DataLoader, TensorDataset

from micro_sam.models.sam_3d_wrapper import NDBlockWrapper, Sam3DWrapper, get_sam_3d_model
from micro_sam.models.simple_sam_3d_wrapper import SimpleSam3DWrapper, get_simple_sam_3d_model
from micro_sam.training import SemanticSamTrainer, TrainableSAM
from micro_sam.training.semantic_sam_trainer import CustomDiceLoss, SemanticMapsSamTrainer
from micro_sam.training.util import ConvertToSemanticSamInputs


def vit_sam(img_size=128, n_classes=3, depth=1, dim=32, seed=0):
    """A small ViT SAM whose decoder predicts ``n_classes`` masks (embeddings ``dim`` wide)."""
    torch.manual_seed(seed)
    grid = img_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=64, depth=depth, num_heads=2,
                                      mlp_ratio=2, out_chans=dim, qkv_bias=True, use_rel_pos=True, window_size=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), global_attn_indexes=()),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=n_classes, transformer_dim=dim, iou_head_hidden_dim=dim,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=dim, num_heads=2)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    )


def semantic_images(n, shape=(128, 128), seed=0):
    """Bright disks (class 1) and dimmer squares (class 2) on a dark background, and their class labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    images, labels = [], []
    for _ in range(n):
        label = np.zeros(shape, dtype="int64")
        for _ in range(3):
            cy, cx = rng.uniform(16, shape[0] - 16, size=2)
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 1
            sy, sx = rng.integers(4, shape[0] - 24, size=2)
            label[sy:sy + 18, sx:sx + 18] = 2
        image = np.choose(label, [20, 220, 110]) + rng.normal(0, 8, shape)
        images.append(np.clip(image, 0, 255).astype("float32"))
        labels.append(label)
    return np.stack(images), np.stack(labels)


def _fit_and_losses(tmp_path, model, x, y, n_classes, iterations, lr=1e-3, trainer_class=SemanticSamTrainer,
                    **kwargs):
    """Loss on the batch, ``iterations`` trainer iterations on it, loss again."""
    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    trainer = trainer_class(
        name="semantic", train_loader=loader, val_loader=loader, model=model, device="cpu",
        optimizer=torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr),
        convert_inputs=ConvertToSemanticSamInputs(), num_classes=n_classes, mixed_precision=False,
        save_root=str(tmp_path), log_image_interval=10 ** 6, **kwargs,
    )
    convert = ConvertToSemanticSamInputs()

    def loss():
        model.eval()
        with torch.no_grad():
            return float(trainer._compute_loss(y, trainer._get_model_outputs(convert(x, y))))

    before = loss()
    trainer.fit(iterations=iterations)
    return before, loss(), trainer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_custom_dice_loss_known_values():
    target = torch.tensor([0, 1, 1, 0]).view(1, 1, 1, 4)
    loss = CustomDiceLoss(num_classes=2, softmax=False)
    perfect = torch.stack([target == 0, target == 1], dim=1).float().view(1, 2, 1, 4)
    assert float(loss(perfect, target)) == pytest.approx(0.0, abs=1e-6)
    # uniform 0.5: per class 2 * (0.5 * 2) / (4 * 0.25 + 2) = 2/3, loss (1 - 2/3) per class, summed
    assert float(loss(torch.full((1, 2, 1, 4), 0.5), target)) == pytest.approx(2 / 3, abs=1e-6)
    logits = torch.tensor([[10.0, -10, -10, 10], [-10, 10, 10, -10]]).view(1, 2, 1, 4)
    assert float(CustomDiceLoss(2)(logits, target)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="Expected predictions with 3 channels"):
        CustomDiceLoss(3)(logits, target)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        CustomDiceLoss(1)


def test_semantic_trainer_2d_reduces_the_loss(tmp_path):
    images, labels = semantic_images(2)
    x = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(labels)[:, None]
    model = TrainableSAM(vit_sam(n_classes=3))
    before, after, trainer = _fit_and_losses(tmp_path, model, x, y, 3, iterations=6, lr=3e-3)
    assert after < before - 0.1, (before, after)
    state = torch.load(tmp_path / "checkpoints" / "semantic" / "latest.pt", weights_only=True)
    assert state["iteration"] == 6
    with pytest.raises(ValueError, match="dice_weight must lie between 0 and 1"):
        SemanticSamTrainer(convert_inputs=None, num_classes=3, dice_weight=1.5)


def test_semantic_maps_trainer_uses_its_loss(tmp_path):
    images, labels = semantic_images(1)
    x = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1).contiguous()
    maps = torch.from_numpy((labels[:, None] == np.arange(2)[None, :, None, None]).astype("float32"))
    model = TrainableSAM(vit_sam(n_classes=2))
    before, after, _ = _fit_and_losses(tmp_path, model, x, maps, 2, iterations=4, lr=3e-3,
                                       trainer_class=SemanticMapsSamTrainer, loss=torch.nn.MSELoss(),
                                       metric=torch.nn.MSELoss())
    assert after < before


#
# 3D: Sam3DWrapper
#

def _volume(depth=4, size=128, seed=0):
    images, labels = semantic_images(depth, (size, size), seed=seed)
    x = torch.from_numpy(images)[None, None].expand(-1, 3, -1, -1, -1).contiguous()  # (1, 3, D, H, W)
    return x, torch.from_numpy(labels)[None, None]


def test_sam_3d_without_adapter_output_is_slicewise_sam():
    sam = vit_sam(n_classes=3).eval()
    slices, _ = _volume(depth=3)
    expected = []
    with torch.no_grad():
        for d in range(3):
            image = slices[0, :, d]
            embedding = sam.image_encoder(sam.preprocess(image[None]))
            sparse, dense = sam.prompt_encoder(None, None, None)
            low, _ = sam.mask_decoder(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, True)
            expected.append(sam.postprocess_masks(low, (128, 128), (128, 128)))
    model = Sam3DWrapper(copy.deepcopy(sam), freeze_encoder=False, model_type=None).eval()
    wrapper = model.sam_model.image_encoder.image_encoder.blocks[0]
    assert isinstance(wrapper, NDBlockWrapper)
    with torch.no_grad():
        wrapper.adapter_linear_up.weight.zero_(), wrapper.adapter_linear_up_2.weight.zero_()
        out = model([{"image": slices[0], "original_size": (128, 128)}], multimask_output=True)[0]
    assert out["masks"].shape == (1, 3, 3, 128, 128) and out["low_res_logits"].shape == (1, 3, 3, 32, 32)
    assert out["iou_predictions"].shape == (3, 3)
    assert torch.allclose(out["masks"][0], torch.stack([e[0] for e in expected], dim=1), atol=1e-4)


def test_sam_3d_adapters_mix_only_neighbouring_slices():
    """One block has two adapters with a depth kernel of 3: a change in slice 4 reaches slices 2-4 only."""
    model = Sam3DWrapper(vit_sam(n_classes=3), freeze_encoder=False, model_type=None).eval()
    x, _ = _volume(depth=5)
    encoder, preprocess = model.sam_model.image_encoder, model.sam_model.preprocess
    slices = x[0].transpose(0, 1)
    changed = slices.clone()
    changed[4] = 255 - changed[4]
    with torch.no_grad():
        a, b = encoder(preprocess(slices), 5), encoder(preprocess(changed), 5)
    difference = (a - b).abs().flatten(1).max(dim=1).values
    assert torch.all(difference[:2] == 0) and torch.all(difference[2:] > 1e-4)


def test_sam_3d_trains_with_the_semantic_trainer(tmp_path):
    x, y = _volume(depth=2)
    model = Sam3DWrapper(vit_sam(n_classes=3), freeze_encoder=True, model_type=None)
    assert not any(p.requires_grad for p in model.sam_model.image_encoder.parameters())
    before, after, _ = _fit_and_losses(tmp_path, model, x, y, 3, iterations=3, lr=3e-3)
    assert after < before


def test_sam_3d_model_types():
    with pytest.raises(ValueError, match="need a ViT encoder.*vit_t's TinyViT is not supported"):
        get_sam_3d_model("cpu", n_classes=3, image_size=512, model_type="vit_t")
    with pytest.raises(ValueError, match="model_type 'vit_b' has 768 channels, the encoder 64"):
        Sam3DWrapper(vit_sam(), freeze_encoder=False, model_type="vit_b")


#
# 3D: SimpleSam3DWrapper from a checkpoint, with LoRA
#

def test_simple_sam_3d_from_vit_t_checkpoint_with_lora(vit_t_checkpoint):
    model = get_simple_sam_3d_model("cpu", n_classes=3, image_size=256, lora_rank=2, model_type="vit_t",
                                    checkpoint_path=vit_t_checkpoint)
    assert isinstance(model, SimpleSam3DWrapper) and model.sam.image_encoder.img_size == 256
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"sam", "decoders", "out_conv"}
    encoder_trainable = [n for n, p in model.sam.image_encoder.named_parameters() if p.requires_grad]
    assert len(encoder_trainable) == 10 * 4  # A and B for q and v in each of vit_t's 10 attention blocks
    assert all("w_a_linear" in n or "w_b_linear" in n for n in encoder_trainable)
    reference = torch.load(vit_t_checkpoint, weights_only=True)
    assert torch.equal(model.sam.image_encoder.patch_embed.seq[0].c.weight,
                       reference["image_encoder.patch_embed.seq.0.c.weight"])
    # the pretrained projections went into the layers that LoRA wraps (micro_sam leaves them at random values)
    assert torch.equal(model.sam.image_encoder.layers[1].blocks[0].attn.qkv.qkv_proj.weight,
                       reference["image_encoder.layers.1.blocks.0.attn.qkv.weight"])
    frozen = get_simple_sam_3d_model("cpu", n_classes=2, image_size=256, freeze_encoder=True, model_type="vit_t",
                                     checkpoint_path=vit_t_checkpoint)
    assert not any(p.requires_grad for p in frozen.sam.image_encoder.parameters())


def test_simple_sam_3d_trains_with_the_semantic_trainer(tmp_path):
    sam = vit_sam(img_size=128, dim=256)
    model = SimpleSam3DWrapper(sam, num_classes=3, freeze_encoder=False)
    x, y = _volume(depth=2)
    x = (x - 100.0) / 60.0  # the simple wrapper gives the slices to the encoder as they are
    with torch.no_grad():
        masks = model([{"image": x[0]}], multimask_output=True)[0]["masks"]
        expected_features = torch.stack([sam.image_encoder(x[:, :, d]) for d in range(2)], dim=2)
        assert torch.equal(model._apply_image_encoder(x, 2), expected_features)
    assert masks.shape == (1, 3, 2, 128, 128)
    before, after, _ = _fit_and_losses(tmp_path, model, x, y, 3, iterations=2, lr=3e-3)
    assert after < before


@pytest.mark.slow
def test_get_sam_3d_model_from_a_vit_b_checkpoint(tmp_path):
    """vit_b weights (random) for a 256 x 256, 3-class 3D model with LoRA: position tables resized, the rest loaded."""
    from micro_sam.models.build_sam import build_sam_vit_b

    torch.manual_seed(0)
    base = build_sam_vit_b()
    with torch.no_grad():
        base.image_encoder.pos_embed.normal_()
    path = tmp_path / "vit_b.pt"
    torch.save(base.state_dict(), path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_sam_3d_model("cpu", n_classes=3, image_size=256, lora_rank=2, checkpoint_path=path)
    # 3 classes = SAM's 3 multimask outputs: after resizing the position tables every parameter fits
    assert not [w for w in caught if "do not fit" in str(w.message)]
    decoder = model.sam_model.mask_decoder
    assert torch.equal(decoder.mask_tokens.weight, base.mask_decoder.mask_tokens.weight)
    encoder = model.sam_model.image_encoder.image_encoder
    assert encoder.pos_embed.shape == (1, 16, 16, 768)
    expected = torch.nn.functional.interpolate(base.image_encoder.pos_embed.permute(0, 3, 1, 2), size=(16, 16),
                                               mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(encoder.pos_embed, expected, atol=1e-6)
    block = encoder.blocks[0].block
    assert torch.equal(block.attn.qkv.qkv_proj.weight, base.image_encoder.blocks[0].attn.qkv.weight)
    assert block.attn.qkv.w_a_linear_q.weight.requires_grad and not block.attn.qkv.qkv_proj.weight.requires_grad
    x, _ = _volume(depth=2, size=256)
    with torch.no_grad():
        out = model([{"image": x[0], "original_size": (256, 256)}], multimask_output=True)[0]
    assert out["masks"].shape == (1, 3, 2, 256, 256)
