"""PEFT modules: micro_sam 1.8's parameter names, exact start at the pretrained model, and equality with the plain
computation (the updates merged into the weights of an unwrapped model), on the original and the fast paths."""
import copy
import importlib.util
import json
import os
import sys
import types
from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from micro_sam.models import peft_sam
from micro_sam.models.fast_attention import FastBlock, optimize_sam
from micro_sam.models.peft_sam import PEFT_Sam, check_peft_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_vit_sam(seed=0):
    """A 2-block ViT SAM (64 channels, 4 heads; a padded window block and a global block) for 256 x 256 inputs."""
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(depth=2, embed_dim=64, img_size=256, mlp_ratio=4,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=4, patch_size=16,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,), window_size=7, out_chans=32)
    with torch.no_grad():  # segment_anything starts the relative position tables at zero: make them matter
        for name, parameter in encoder.named_parameters():
            if "rel_pos" in name:
                parameter.normal_(0, 0.5)
    return Sam(image_encoder=encoder,
               prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256),
                                            mask_in_chans=4),
               mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=32, transformer=TwoWayTransformer(
                   depth=1, embedding_dim=32, mlp_dim=64, num_heads=2)),
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


def small_vit_t_sam(seed=0):
    """A narrow TinyViT SAM (vit_t's layout: a convolutional stage, then 1 + 2 + 1 attention blocks with padded
    7 x 7 windows) for 256 x 256 inputs."""
    from micro_sam.models.tiny_vit import TinyViT

    torch.manual_seed(seed)
    encoder = TinyViT(img_size=256, num_classes=0, embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1),
                      num_heads=(1, 2, 3, 4), window_sizes=(7, 7, 7, 7), drop_path_rate=0.0)
    with torch.no_grad():  # batch-norm statistics and attention biases away from their neutral start values
        for name, tensor in encoder.state_dict().items():
            if name.endswith(("running_mean", "attention_biases")):
                tensor.normal_(0, 0.1)
    return Sam(image_encoder=encoder,
               prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(16, 16), input_image_size=(256, 256),
                                            mask_in_chans=4),
               mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=256, transformer=TwoWayTransformer(
                   depth=1, embedding_dim=256, mlp_dim=64, num_heads=2)),
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


BUILDERS = {"vit": small_vit_sam, "vit_t": small_vit_t_sam}



def _encode(sam, seed=1):
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return sam.image_encoder(x)


def _randomize(module, scale=0.05, seed=2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale + (parameter == 1) * 1.0)


def _blocks(sam):
    from micro_sam.models._peft_layout import transformer_blocks

    return transformer_blocks(sam.image_encoder)


def _qkv_rows(block, part):
    """Row indices of ``part`` ("q", "k", "v") in the block's qkv weight, in the order of the merged-heads layout."""
    attn = block.attn
    if hasattr(attn, "key_dim"):  # TinyViT: per head [q | k | v]
        heads, kd, d = attn.num_heads, attn.key_dim, attn.d
        start = {"q": 0, "k": kd, "v": 2 * kd}[part]
        width = d if part == "v" else kd
        return torch.cat([torch.arange(h * (2 * kd + d) + start, h * (2 * kd + d) + start + width)
                          for h in range(heads)])
    dim = attn.qkv.in_features if hasattr(attn.qkv, "in_features") else attn.qkv.qkv_proj.in_features
    start = {"q": 0, "k": dim, "v": 2 * dim}[part]
    return torch.arange(start, start + dim)


def _mlp_linears(mlp):
    return (mlp.lin1, mlp.lin2) if hasattr(mlp, "lin1") else (mlp.fc1, mlp.fc2)


#
# Parameter names: micro_sam 1.8's (fixture from scripts/check_reference_peft_compat.py)
#

def test_vit_b_parameter_names_equal_micro_sams():
    spec = importlib.util.spec_from_file_location("peft_compat", os.path.join(ROOT, "scripts",
                                                                              "check_reference_peft_compat.py"))
    compat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compat)
    with open(os.path.join(ROOT, "tests", "data", "peft_vit_b_keys.json")) as f:
        expected = json.load(f)
    ours = json.loads(json.dumps(compat.our_manifest()))
    assert set(ours) == set(expected)
    for setting in expected:
        for part in ("peft_sam", "sam", "trainable"):
            assert ours[setting][part] == expected[setting][part], (setting, part)


#
# A new PEFT model computes the pretrained one; wrapped layers equal merged weights
#

@pytest.mark.parametrize("family", ["vit", "vit_t"])
@pytest.mark.parametrize("module,kwargs", [
    ("lora", {"rank": 4}), ("lora", {"rank": 2, "update_matrices": ["q", "k", "v", "mlp"]}), ("fact", {"rank": 4}),
    ("ssf", {}), ("attention", {}), ("bias", {}), ("layernorm", {}), ("classical", {}),
])
def test_new_peft_model_computes_the_pretrained_model(family, module, kwargs):
    base = BUILDERS[family]()
    expected = _encode(base)
    wrapped = PEFT_Sam(copy.deepcopy(base), peft_module=module, **kwargs).sam.eval()
    assert torch.equal(_encode(wrapped), expected)
    optimize_sam(wrapped)
    assert torch.allclose(_encode(wrapped), expected, atol=1e-5, rtol=1e-4)


def _merge_lora(sam, wrapped, matrices):
    for block, wrapped_block in zip(_blocks(sam), _blocks(wrapped)):
        qkv = wrapped_block.attn.qkv
        weight = block.attn.qkv.weight
        for part in set(matrices) - {"mlp"}:
            update = getattr(qkv, f"w_b_linear_{part}").weight @ getattr(qkv, f"w_a_linear_{part}").weight
            weight[_qkv_rows(block, part)] += update
        if "mlp" in matrices:
            lora = wrapped_block.mlp
            first, second = _mlp_linears(block.mlp)
            first.weight += lora.w_b_linear_1.weight @ lora.w_a_linear_1.weight
            second.weight += lora.w_b_linear_2.weight @ lora.w_a_linear_2.weight


@pytest.mark.parametrize("family", ["vit", "vit_t"])
@pytest.mark.parametrize("matrices", [["q", "v"], ["k"], ["q", "k", "v", "mlp"]])
def test_lora_equals_merged_weights_on_original_and_fast_paths(family, matrices):
    base = BUILDERS[family]()
    wrapped = PEFT_Sam(copy.deepcopy(base), rank=3, update_matrices=matrices).sam.eval()
    for block in _blocks(wrapped):
        for i, part in enumerate(block.attn.qkv.update_matrices):
            _randomize(getattr(block.attn.qkv, f"w_b_linear_{part}"), scale=0.3, seed=5 + i)
        if "mlp" in matrices:
            _randomize(block.mlp.w_b_linear_1, seed=7), _randomize(block.mlp.w_b_linear_2, seed=8)
    with torch.no_grad():
        _merge_lora(base, wrapped, matrices)
    expected = _encode(base)
    assert (expected - _encode(BUILDERS[family]())).abs().max() > 1e-3  # the update matters (tolerance: 1e-5)
    assert torch.allclose(_encode(wrapped), expected, atol=1e-5, rtol=1e-4)
    if family == "vit":
        optimize_sam(wrapped)
        with torch.no_grad():
            fast = [isinstance(b, FastBlock) and b._fast_path_ok(torch.zeros(1, 16, 16, 64)) for b in _blocks(wrapped)]
        # a wrapped qkv is called by the fused attention; a wrapped MLP makes the block use the original forward
        assert fast == [("mlp" not in matrices)] * 2
        assert torch.allclose(_encode(wrapped), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["vit", "vit_t"])
def test_fact_equals_merged_weights(family):
    base = BUILDERS[family]()
    wrapped = PEFT_Sam(copy.deepcopy(base), rank=4, peft_module="fact").sam.eval()
    with torch.no_grad():
        for block, fact in zip(_blocks(base), (b.attn.qkv for b in _blocks(wrapped))):
            _randomize(fact.FacTv, seed=3), _randomize(fact.q_FacTs, seed=4)
            for part, core in (("q", fact.q_FacTs), ("v", fact.v_FacTs)):
                block.attn.qkv.weight[_qkv_rows(block, part)] += fact.FacTv.weight @ core.weight @ fact.FacTu.weight
    expected = _encode(base)
    assert torch.allclose(_encode(wrapped), expected, atol=1e-5, rtol=1e-4)
    optimize_sam(wrapped)
    assert torch.allclose(_encode(wrapped), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["vit", "vit_t"])
def test_ssf_equals_scaled_weights(family):
    base = BUILDERS[family]()
    wrapped = PEFT_Sam(copy.deepcopy(base), peft_module="ssf").sam.eval()
    layers = [m for m in wrapped.image_encoder.modules() if isinstance(m, peft_sam.ScaleShiftLayer)]
    assert len(layers) == 6 * len(_blocks(base))  # qkv, proj, 2 MLP layers, 2 norms per block
    own = dict(base.image_encoder.named_modules())
    with torch.no_grad():
        for name, module in wrapped.image_encoder.named_modules():
            if not isinstance(module, peft_sam.ScaleShiftLayer):
                continue
            generator = torch.Generator().manual_seed(len(name))
            module.scale.copy_(1 + 0.2 * torch.randn(module.scale.shape, generator=generator))
            module.shift.copy_(0.2 * torch.randn(module.shift.shape, generator=generator))
            target = own[name]  # the unwrapped layer at the same place: y * s + t folded into weight and bias
            target.weight.mul_(module.scale.view(-1, *([1] * (target.weight.ndim - 1))))
            target.bias.mul_(module.scale).add_(module.shift)
    expected = _encode(base)
    assert torch.allclose(_encode(wrapped), expected, atol=1e-5, rtol=1e-4)
    optimize_sam(wrapped)
    assert torch.allclose(_encode(wrapped), expected, atol=1e-5, rtol=1e-4)


def test_adaptformer_on_vit_keeps_micro_sams_function():
    """micro_sam's AdaptFormer returns mlp(x) + x + adapter(x) for x = norm2(tokens); the block adds its residual."""
    base = small_vit_sam()
    wrapped = PEFT_Sam(copy.deepcopy(base), peft_module="adaptformer", projection_size=8).sam.eval()
    block, adapter = _blocks(wrapped)[0], _blocks(wrapped)[0].mlp
    _randomize(adapter.up_proj, seed=9)
    with torch.no_grad():
        adapter.alpha.fill_(0.5)
        tokens = torch.randn(1, 16, 16, 64)
        from segment_anything.modeling.image_encoder import window_partition, window_unpartition

        windows, pad = window_partition(block.norm1(tokens), block.window_size)
        x = tokens + window_unpartition(block.attn(windows), block.window_size, pad, (16, 16))
        n = block.norm2(x)
        adapted = 0.5 * adapter.up_proj(torch.relu(adapter.down_proj(n)))
        expected = x + adapter.mlp_proj(n) + n + adapted
        assert torch.allclose(block(tokens), expected, atol=1e-5)


def test_adaptformer_on_vit_t_is_a_parallel_branch():
    base = small_vit_t_sam()
    wrapped = PEFT_Sam(copy.deepcopy(base), peft_module="adaptformer").sam.eval()
    adapter = _blocks(wrapped)[2].mlp
    _randomize(adapter.up_proj, seed=9)
    tokens = torch.randn(2, 10, adapter.n_embd)
    with torch.no_grad():
        expected = adapter.mlp_proj(tokens) + adapter.up_proj(torch.relu(adapter.down_proj(adapter.mlp_proj.norm(tokens))))
        assert torch.allclose(adapter(tokens), expected, atol=1e-6)


#
# What trains
#

def _trainable_encoder(sam):
    return {n[len("image_encoder."):] for n, p in sam.named_parameters() if p.requires_grad and
            n.startswith("image_encoder.")}


@pytest.mark.parametrize("family", ["vit", "vit_t"])
def test_selective_methods_unfreeze_the_named_parameters(family):
    base = BUILDERS[family]()
    names = {n: p for n, p in base.image_encoder.named_parameters()}
    block_prefixes = [n for n, m in base.image_encoder.named_modules() if m in _blocks(base)]
    last = block_prefixes[-1] + "."
    norms = ("norm1.", "norm2.") if family == "vit" else ("attn.norm.", "mlp.norm.")
    expected = {
        "attention": {n for n in names if any(n.startswith(f"{b}.attn.") for b in block_prefixes)},
        "bias": {n for n in names if n.endswith("bias") and any(n.startswith(b + ".") for b in block_prefixes)},
        "layernorm": {n for n in names if any(n.startswith(f"{b}.{norm}") for b in block_prefixes for norm in norms)},
        "classical": {n for n in names if n.startswith(last)},
    }
    for module, names_expected in expected.items():
        layers = [len(block_prefixes) - 1] if module == "classical" else None
        wrapped = PEFT_Sam(copy.deepcopy(base), peft_module=module, attention_layers_to_update=layers).sam
        assert names_expected and _trainable_encoder(wrapped) == names_expected, module
        assert all(p.requires_grad for n, p in wrapped.named_parameters() if not n.startswith("image_encoder."))


def test_lora_trains_only_its_matrices_and_reduces_the_loss():
    """Fit the LoRA matrices of block 1 to the output of a model whose query projection got a rank-1 update."""
    base = small_vit_sam()
    target_model = copy.deepcopy(base)
    with torch.no_grad():
        u, v = torch.randn(64, 1) * 0.3, torch.randn(1, 64) * 0.3
        target_model.image_encoder.blocks[1].attn.qkv.weight[:64] += u @ v
    target = _encode(target_model)
    model = PEFT_Sam(copy.deepcopy(base), rank=1, attention_layers_to_update=[1]).sam.train()
    assert _trainable_encoder(model) == {f"blocks.1.attn.qkv.w_{ab}_linear_{m}.weight" for ab in "ab" for m in "qv"}
    frozen_before = {n: p.detach().clone() for n, p in model.image_encoder.named_parameters() if not p.requires_grad}
    params = [p for n, p in model.image_encoder.named_parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=2e-2)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model.image_encoder(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0] and all(b < a for a, b in zip(losses, losses[1:]))
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.image_encoder.named_parameters()
               if n in frozen_before)


#
# Bad settings
#

def test_invalid_settings_name_what_is_valid():
    sam = small_vit_sam()
    with pytest.raises(ValueError, match="Unknown PEFT module 'loraa'.*'lora' \\(LoRASurgery\\)"):
        PEFT_Sam(sam, rank=2, peft_module="loraa")
    with pytest.raises(ValueError, match="positive integer rank, got rank=0"):
        PEFT_Sam(sam, rank=0)
    with pytest.raises(ValueError, match="FacTSurgery needs a positive integer rank, got rank=None"):
        PEFT_Sam(sam, peft_module="fact")
    with pytest.raises(ValueError, match=r"attention_layers_to_update \[2\] out of range.*0-1 \(this encoder has 2"):
        PEFT_Sam(sam, rank=2, attention_layers_to_update=[0, 2])
    with pytest.raises(ValueError, match=r"Unknown update_matrices \['o'\]; choose from \['q', 'k', 'v', 'mlp'\]"):
        PEFT_Sam(sam, rank=2, update_matrices=["q", "o"])
    with pytest.raises(ValueError, match="LoRASurgery does not take \\['dropout'\\]"):
        PEFT_Sam(sam, rank=2, dropout=0.1)
    with pytest.raises(ValueError, match="BiasSurgery takes no further arguments"):
        PEFT_Sam(sam, peft_module="bias", update_matrices=["q"])
    # nothing was changed by the refused calls
    assert not any(isinstance(m, peft_sam.AttentionLoRA) for m in sam.modules())
    assert all(p.requires_grad for p in sam.parameters())
    with pytest.raises(ValueError, match=r"valid indices: 0-31 \(this encoder has 32"):
        check_peft_kwargs({"rank": 2, "attention_layers_to_update": [32]}, "vit_h")
    with pytest.raises(ValueError, match=r"valid indices: 0-9"):
        check_peft_kwargs({"rank": 2, "attention_layers_to_update": [10]}, "vit_t_lm")
    assert check_peft_kwargs({"rank": 2, "peft_module": "lora"}, "vit_b")["peft_module"] is peft_sam.LoRASurgery


def test_quantize_needs_bitsandbytes_and_cuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModuleNotFoundError, match="needs the 'bitsandbytes' package"):
        PEFT_Sam(small_vit_sam(), rank=2, quantize=True)

    class Linear4bit(torch.nn.Linear):  # stands in for bitsandbytes' layer: same constructor
        pass

    fake = types.SimpleNamespace(nn=types.SimpleNamespace(
        Linear4bit=Linear4bit, Params4bit=lambda data, requires_grad: torch.nn.Parameter(data, requires_grad)))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        PEFT_Sam(small_vit_sam(), rank=2, quantize=True)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    base = small_vit_sam()
    expected = _encode(base)
    wrapped = PEFT_Sam(copy.deepcopy(base), rank=2, quantize=True).sam.eval()
    encoder_linears = [m for m in wrapped.image_encoder.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in encoder_linears if isinstance(m, Linear4bit)]
    # every linear layer of the encoder is replaced (qkv, proj, lin1, lin2 per block); LoRA's matrices are not
    assert len(quantized) == 8 and len(encoder_linears) == 8 + 2 * 2 * 2
    assert torch.allclose(_encode(wrapped), expected, atol=1e-6)


@pytest.mark.parametrize("family", ["vit", "vit_t"])
@pytest.mark.parametrize("kwargs", [
    {"peft_module": "LoRASurgery", "rank": 3, "update_matrices": ["q", "v"]},
    {"peft_module": "LoRASurgery", "rank": 2, "update_matrices": ["k", "mlp"], "attention_layers_to_update": [1]},
    {"peft_module": "FacTSurgery", "rank": 5},
    {"peft_module": "SSFSurgery"},
    {"peft_module": "AdaptFormer", "projection_size": 16},
])
def test_peft_settings_are_read_back_from_parameter_names(family, kwargs):
    from micro_sam.models._peft_layout import infer_peft_kwargs

    state = PEFT_Sam(BUILDERS[family](), **kwargs).sam.state_dict()
    assert infer_peft_kwargs(state) == kwargs
    assert infer_peft_kwargs({f"sam.{k}": v for k, v in state.items()}) == kwargs
    assert infer_peft_kwargs(BUILDERS[family]().state_dict()) is None


def test_unwrapped_keys_name_the_plain_models_parameters():
    from micro_sam.models._peft_layout import unwrapped_key

    for family in ("vit", "vit_t"):
        plain = set(BUILDERS[family]().state_dict())
        for kwargs in ({"rank": 2, "update_matrices": ["q", "mlp"]}, {"peft_module": "ssf"},
                       {"peft_module": "adaptformer"}, {"peft_module": "fact", "rank": 2}):
            wrapped = PEFT_Sam(BUILDERS[family](), **kwargs).sam.state_dict()
            new = {k for k in wrapped if unwrapped_key(k) not in plain}
            assert {unwrapped_key(k) for k in wrapped} - {unwrapped_key(k) for k in new} == plain, kwargs
            assert all(any(part in k for part in ("w_a_", "w_b_", "FacT", "scale", "shift", "down_proj", "up_proj",
                                                    "alpha")) for k in new), kwargs
