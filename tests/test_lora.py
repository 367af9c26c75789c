"""LoRA files: analytic merges, weight sharing, diffusers/peft side by side, A1111 hash, errors.

Files are written by the tests in the real key formats (kohya's via :mod:`lora_fixtures`,
diffusers' by ``StableDiffusionPipeline.save_lora_weights``, peft's by ``save_pretrained``).
References are independent of emaki: the LoRA forward pass as kohya defines it
(``W x + m * alpha / r * up(down(x))``), diffusers' own LoRA loading, and peft's own merge.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict

from emaki.adapters.lora import LoraFile, apply_loras, read_lora
from emaki.errors import EmakiError, PickleRefusedError
from emaki.models.tiny import make_tiny_bundle
from emaki.pipelines.txt2img import Pipeline
from emaki.request import GenerationRequest
from lora_fixtures import kohya_layers, kohya_tensors, random_pair, save

ATTN = "down_blocks.0.attentions.0"
LINEAR = f"{ATTN}.transformer_blocks.0.attn1.to_q"  # Linear (32 -> 32)
CONV1X1 = f"{ATTN}.proj_in"  # 1x1 conv in sd1
CONV3X3 = "down_blocks.0.resnets.0.conv1"  # 3x3 conv, padding 1
TEXT_Q = "encoder.layers.0.self_attn.q_proj"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd1():
    return make_tiny_bundle("sd1", seed=0)


@pytest.fixture(scope="module")
def sd2():
    return make_tiny_bundle("sd2", seed=0)


def kohya_name(network: str, path: str) -> str:
    prefix = "lora_unet_" if network == "unet" else "lora_te_text_model_"
    return prefix + path.replace(".", "_")


def text_path(bundle, suffix: str) -> str:
    """The text encoder's module path ending in ``suffix`` (with or without ``text_model.``)."""
    names = [n for n, _ in bundle.text_encoder.named_modules() if n.endswith(suffix)]
    assert len(names) == 1
    return names[0]


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters())


# --- 1. analytic -----------------------------------------------------------------------------


def test_analytic_linear_conv1x1_conv3x3_and_text(sd1, tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    rank, alpha, te_mult, unet_mult = 4, 8.0, 0.5, 0.75  # scale alpha / rank = 2
    layers = {
        ("unet", LINEAR): sd1.unet.get_submodule(LINEAR),
        ("unet", CONV1X1): sd1.unet.get_submodule(CONV1X1),
        ("unet", CONV3X3): sd1.unet.get_submodule(CONV3X3),
        ("text", TEXT_Q): sd1.text_encoder.get_submodule(text_path(sd1, TEXT_Q)),
    }
    pairs, tensors = {}, {}
    for (network, path), module in layers.items():
        down, up = random_pair(module, rank, g)
        pairs[path] = (down, up)
        name = kohya_name(network, path)
        tensors |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(alpha),
        }
    lora = read_lora(save(tmp_path / "analytic.safetensors", tensors), sd1)
    assert lora.format == "kohya" and lora.name == "analytic" and len(lora.modules) == 4
    new = apply_loras(sd1, [(lora, te_mult, unet_mult)])
    s = alpha / rank

    # Linear: W' = W + m * s * up @ down (float64 reference).
    w0 = sd1.unet.get_submodule(LINEAR).weight.double()
    down, up = (t.double() for t in pairs[LINEAR])
    expect = w0 + unet_mult * s * up @ down
    torch.testing.assert_close(new.unet.get_submodule(LINEAR).weight.double(), expect)

    # The text encoder's Linear gets the text-encoder multiplier.
    w0 = sd1.text_encoder.get_submodule(text_path(sd1, TEXT_Q)).weight.double()
    down, up = (t.double() for t in pairs[TEXT_Q])
    got = new.text_encoder.get_submodule(text_path(sd1, TEXT_Q)).weight.double()
    torch.testing.assert_close(got, w0 + te_mult * s * up @ down)

    # Convolutions, by kohya's forward: conv(x, W') = conv(x, W) + m * s * up(down(x)).
    x = torch.randn(2, 32, 6, 6, generator=g)
    for path, padding in ((CONV1X1, 0), (CONV3X3, 1)):
        old, patched = sd1.unet.get_submodule(path), new.unet.get_submodule(path)
        down, up = pairs[path]
        lora_out = F.conv2d(F.conv2d(x, down, padding=padding), up)
        expect = old(x) + unet_mult * s * lora_out
        torch.testing.assert_close(patched(x), expect, atol=1e-5, rtol=1e-5)

    # Multiplier 0 on both networks: bit-identical weights.
    zero = apply_loras(sd1, [(lora, 0.0, 0.0)])
    for net in ("unet", "text_encoder"):
        before, after = getattr(sd1, net).state_dict(), getattr(zero, net).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_tucker_mid_locon_matches_its_forward(sd1, tmp_path) -> None:
    """LyCORIS 'cp' LoCon: down 1x1, mid kxk, up 1x1; the merge equals up(mid(down(x)))."""
    g = torch.Generator().manual_seed(2)
    name = kohya_name("unet", CONV3X3)
    down = torch.randn(3, 32, 1, 1, generator=g) * 0.2
    mid = torch.randn(3, 3, 3, 3, generator=g) * 0.2
    up = torch.randn(32, 3, 1, 1, generator=g) * 0.2
    tensors = {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_mid.weight": mid,
        f"{name}.lora_up.weight": up,
        f"{name}.alpha": torch.tensor(1.5),
    }
    lora = read_lora(save(tmp_path / "tucker.safetensors", tensors), sd1)
    new = apply_loras(sd1, [(lora, 1.0, 1.0)])
    x = torch.randn(1, 32, 5, 5, generator=g)
    branch = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    expect = sd1.unet.get_submodule(CONV3X3)(x) + 0.5 * branch  # scale 1.5 / 3
    torch.testing.assert_close(new.unet.get_submodule(CONV3X3)(x), expect, atol=1e-5, rtol=1e-5)


def test_alpha_missing_means_rank(sd1, tmp_path) -> None:
    layers = [layer for layer in kohya_layers(sd1) if layer.path == LINEAR]
    lora = read_lora(save(tmp_path / "noalpha.safetensors", kohya_tensors(layers, alpha=None)), sd1)
    (module,) = lora.modules
    assert module.alpha == module.rank == 4 and module.scale == 1.0


# --- 2. sharing and isolation ------------------------------------------------------------------


def test_original_is_bit_identical_and_untouched_layers_share_storage(sd1, tmp_path) -> None:
    layers = kohya_layers(sd1)
    lora = read_lora(save(tmp_path / "full.safetensors", kohya_tensors(layers)), sd1)
    before = {net: state(getattr(sd1, net)) for net in ("unet", "text_encoder", "vae")}
    new = apply_loras(sd1, [(lora, 1.0, 1.0)])
    for net, tensors in before.items():
        after = getattr(sd1, net).state_dict()
        for key, tensor in tensors.items():
            assert torch.equal(after[key], tensor), f"{net}.{key} was written"
    assert new is not sd1 and new.unet is not sd1.unet and new.text_encoder is not sd1.text_encoder
    assert new.vae is sd1.vae and new.hash == sd1.hash
    patched = {f"{m.target.split('.', 1)[1]}.weight" for m in lora.modules}
    for net in ("unet", "text_encoder"):
        original, clone = params(getattr(sd1, net)), params(getattr(new, net))
        assert original.keys() == clone.keys()
        for key in original:
            if key in patched:
                assert clone[key].data_ptr() != original[key].data_ptr(), key
                assert not torch.equal(clone[key], original[key]), key
            else:
                assert clone[key].data_ptr() == original[key].data_ptr(), key
    assert len(patched) == len(layers)
    assert apply_loras(sd1, []) is sd1


# --- 3. side by side with diffusers ------------------------------------------------------------


def diffusers_pipe(bundle) -> StableDiffusionPipeline:
    """A diffusers pipeline on deep copies of the bundle's networks (LoRA loading patches them)."""
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", timestep_spacing="linspace",
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=copy.deepcopy(bundle.text_encoder),
        tokenizer=bundle.tokenizer, unet=copy.deepcopy(bundle.unet), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def emaki_image(bundle, size: int) -> np.ndarray:
    req = GenerationRequest(
        prompt="a red apple", negative_prompt="blurry", sampler="Euler", schedule="uniform",
        steps=3, cfg_scale=6.0, seed=1234, width=size, height=size,
    )  # fmt: skip
    return pixels(Pipeline(bundle).generate(req).images[0])


def diffusers_image(pipe: StableDiffusionPipeline, bundle, size: int) -> np.ndarray:
    shape = Pipeline(bundle).latent_format.latent_shape(size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1234))[None]
    image = pipe(
        "a red apple", negative_prompt="blurry", num_inference_steps=3, guidance_scale=6.0,
        latents=noise, output_type="pil",
    ).images[0]  # fmt: skip
    return pixels(image)


def test_kohya_file_matches_diffusers_load_lora_weights(sd1, tmp_path) -> None:
    """A LoCon kohya file (attention, 1x1, 3x3, text attention + MLP) at weight 0.6."""
    path = save(tmp_path / "kohya.safetensors", kohya_tensors(kohya_layers(sd1), alpha=2.0))
    size = Pipeline(sd1).native_size
    ref = diffusers_pipe(sd1)
    ref.load_lora_weights(str(path), adapter_name="k")
    ref.set_adapters(["k"], adapter_weights=[0.6])
    theirs = diffusers_image(ref, sd1, size)
    lora = read_lora(path, sd1)
    ours = emaki_image(apply_loras(sd1, [(lora, 0.6, 0.6)]), size)
    plain = emaki_image(sd1, size)
    assert np.abs(ours - plain).mean() > 2, "the LoRA should change the image"
    assert np.abs(ours - theirs).max() <= 1


def peft_configs() -> tuple[LoraConfig, LoraConfig]:
    unet = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, alpha_pattern={"proj_in": 2},
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"],
    )  # fmt: skip
    text = LoraConfig(
        r=2, lora_alpha=4, init_lora_weights=False, use_rslora=True,
        target_modules=["q_proj", "v_proj", "out_proj", "fc1"],
    )  # fmt: skip
    return unet, text


def save_diffusers_lora(bundle, folder: Path, *, metadata: bool = True) -> Path:
    """A LoRA trained-from-nothing the diffusers way, saved by diffusers itself."""
    unet_cfg, text_cfg = peft_configs()
    torch.manual_seed(5)
    unet, text = copy.deepcopy(bundle.unet), copy.deepcopy(bundle.text_encoder)
    unet.add_adapter(unet_cfg)
    text.add_adapter(text_cfg)
    extra = {}
    if metadata:  # what diffusers' training scripts pass (training_utils._collate_lora_metadata)
        extra = {
            "unet_lora_adapter_metadata": unet_cfg.to_dict(),
            "text_encoder_lora_adapter_metadata": text_cfg.to_dict(),
        }
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text),
        **extra,
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_diffusers_saved_peft_file_matches_diffusers(sd1, tmp_path) -> None:
    """alpha/r from the file's metadata, an alpha_pattern and rsLoRA; fused at lora_scale 0.8."""
    path = save_diffusers_lora(sd1, tmp_path / "peft")
    size = Pipeline(sd1).native_size
    ref = diffusers_pipe(sd1)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.8)
    theirs = diffusers_image(ref, sd1, size)
    lora = read_lora(path, sd1)
    assert lora.format == "peft"
    by_target = {m.target: m for m in lora.modules}
    assert by_target[f"unet.{CONV1X1}"].scale == 0.5  # alpha_pattern proj_in: 2 / 4
    assert by_target[f"unet.{LINEAR}"].scale == 2.0  # 8 / 4
    assert by_target[f"text.{text_path(sd1, TEXT_Q)}"].scale == pytest.approx(4 / math.sqrt(2))
    ours = emaki_image(apply_loras(sd1, [(lora, 0.8, 0.8)]), size)
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - emaki_image(sd1, size)).mean() > 2


def test_diffusers_file_without_metadata_has_scale_one(sd1, tmp_path) -> None:
    lora = read_lora(save_diffusers_lora(sd1, tmp_path / "old", metadata=False), sd1)
    assert all(m.alpha == m.rank for m in lora.modules)


def test_peft_save_pretrained_folder_matches_peft_merge(sd1, tmp_path) -> None:
    """peft's own adapter_model.safetensors + adapter_config.json; reference: merge_and_unload."""
    unet_cfg, _ = peft_configs()
    torch.manual_seed(6)
    model = get_peft_model(copy.deepcopy(sd1.unet), unet_cfg)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    lora = read_lora(tmp_path / "adapter" / "adapter_model.safetensors", sd1)
    new = apply_loras(sd1, [(lora, 0.0, 1.0)])
    reference = merged.state_dict()
    for key, value in new.unet.state_dict().items():
        torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=1e-5, msg=key)
    assert new.text_encoder is sd1.text_encoder


def test_sd2_kohya_file_matches_diffusers_network_outputs(sd2, tmp_path) -> None:
    """SD 2 (Linear proj_in/out): UNet and text-encoder outputs of diffusers' LoRA load."""
    path = save(tmp_path / "sd2.safetensors", kohya_tensors(kohya_layers(sd2), alpha=1.0))
    ref = diffusers_pipe(sd2)
    ref.load_lora_weights(str(path))
    new = apply_loras(sd2, [(read_lora(path, sd2), 1.0, 1.0)])
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    with torch.no_grad():
        ours_ctx = new.text_encoder(ids).last_hidden_state
        theirs_ctx = ref.text_encoder(ids).last_hidden_state
        plain_ctx = sd2.text_encoder(ids).last_hidden_state
        x = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.tensor([500, 20])
        ours = new.unet(x, t, encoder_hidden_states=theirs_ctx).sample
        theirs = ref.unet(x, t, encoder_hidden_states=theirs_ctx).sample
        plain = sd2.unet(x, t, encoder_hidden_states=theirs_ctx).sample
    torch.testing.assert_close(ours_ctx, theirs_ctx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours_ctx - plain_ctx).abs().mean() > 1e-2 and (ours - plain).abs().mean() > 1e-2


# --- 4. several LoRAs, per-network multipliers -------------------------------------------------


def expected_delta(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """float64 ``alpha / r * up @ down`` (linear layers) from a kohya state dict."""
    down = tensors[f"{name}.lora_down.weight"].double()
    up = tensors[f"{name}.lora_up.weight"].double()
    return float(tensors[f"{name}.alpha"]) / down.shape[0] * up @ down


def test_two_loras_sum_and_per_network_multipliers(sd1, tmp_path) -> None:
    linears = [
        layer
        for layer in kohya_layers(sd1, conv=False)
        if isinstance(layer.module, torch.nn.Linear)
    ]
    first = kohya_tensors(linears, rank=4, alpha=2.0, seed=10)
    second = kohya_tensors(linears[::2], rank=2, alpha=3.0, seed=11)  # shares half the layers
    a = read_lora(save(tmp_path / "a.safetensors", first), sd1)
    b = read_lora(save(tmp_path / "b.safetensors", second), sd1)
    new = apply_loras(sd1, [(a, 0.7, 0.7), (b, -0.3, -0.3)])
    for layer in linears:
        net = "unet" if layer.network == "unet" else "text_encoder"
        expect = layer.module.weight.double() + 0.7 * expected_delta(first, layer.kohya)
        if f"{layer.kohya}.alpha" in second:
            expect = expect - 0.3 * expected_delta(second, layer.kohya)
        got = getattr(new, net).get_submodule(layer.path).weight.double()
        torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-6, msg=layer.path)

    text_only = apply_loras(sd1, [(a, 1.0, 0.0)])
    assert text_only.unet is sd1.unet and text_only.text_encoder is not sd1.text_encoder
    unet_only = apply_loras(sd1, [(a, 0.0, 1.0)])
    assert unet_only.text_encoder is sd1.text_encoder and unet_only.unet is not sd1.unet
    text_layer = next(layer for layer in linears if layer.network == "text")
    got = text_only.text_encoder.get_submodule(text_layer.path).weight.double()
    expect = text_layer.module.weight.double() + expected_delta(first, text_layer.kohya)
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-6)


# --- key spellings -----------------------------------------------------------------------------

# CompVis (LDM) names of tiny sd1 layers, written out from the CompVis UNet layout (2 levels,
# 2 layers per block): input_blocks 1-2 level 0, 3 its downsampler, 4-5 level 1; output_blocks
# 0-2 up level 0 (upsampler in 2.1, no attention), 3-5 up level 1 (attention at index 1).
LDM_NAMES = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks_2_1_transformer_blocks_0_attn2_to_k": (
        "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"
    ),
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "middle_block_1_transformer_blocks_0_ff_net_0_proj": (
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"
    ),
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_3_1_proj_out": "up_blocks.1.attentions.0.proj_out",
    "output_blocks_5_1_transformer_blocks_0_attn1_to_out_0": (
        "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0"
    ),
    "out_2": "conv_out",
}


def test_ldm_style_unet_names_map_like_diffusers_names(sd1, tmp_path) -> None:
    g = torch.Generator().manual_seed(4)
    ldm, plain = {}, {}
    for ldm_name, path in LDM_NAMES.items():
        down, up = random_pair(sd1.unet.get_submodule(path), 2, g)
        for tensors, name in ((ldm, f"lora_unet_{ldm_name}"), (plain, kohya_name("unet", path))):
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
    from_ldm = read_lora(save(tmp_path / "ldm.safetensors", ldm), sd1)
    from_plain = read_lora(save(tmp_path / "plain.safetensors", plain), sd1)
    assert {m.target for m in from_ldm.modules} == {f"unet.{p}" for p in LDM_NAMES.values()}
    plain_by_target = {m.target: m for m in from_plain.modules}
    for module in from_ldm.modules:
        assert torch.equal(module.delta(), plain_by_target[module.target].delta())


def test_text_model_prefix_is_optional(sd1, tmp_path) -> None:
    g = torch.Generator().manual_seed(5)
    path = text_path(sd1, "encoder.layers.1.mlp.fc2")
    down, up = random_pair(sd1.text_encoder.get_submodule(path), 2, g)
    bare = path.removeprefix("text_model.")
    for name in (f"lora_te_text_model_{bare}", f"lora_te_{bare}"):
        key = name.replace(".", "_")
        tensors = {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}
        lora = read_lora(save(tmp_path / "te.safetensors", tensors), sd1)
        assert [m.target for m in lora.modules] == [f"text.{path}"]


def test_old_diffusers_spellings_read_like_peft(sd1, tmp_path) -> None:
    """``lora.down`` / ``lora_linear_layer`` / attention-processor ``to_q_lora`` files."""
    g = torch.Generator().manual_seed(6)
    block = f"{ATTN}.transformer_blocks.0.attn2"
    te_attn = text_path(sd1, "encoder.layers.1.self_attn").removeprefix("text_model.")
    processors = ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora")
    entries = [  # (network, parent module, layer, attention-processor name, down, up)
        ("unet", block, leaf, proc, *random_pair(sd1.unet.get_submodule(f"{block}.{leaf}"), 2, g))
        for leaf, proc in zip(("to_q", "to_k", "to_v", "to_out.0"), processors)
    ]
    for leaf, proc in zip(("q_proj", "k_proj", "v_proj", "out_proj"), processors):
        module = sd1.text_encoder.get_submodule(text_path(sd1, f"{te_attn}.{leaf}"))
        entries.append(("text", te_attn, leaf, proc, *random_pair(module, 2, g)))

    def spelled(style: str) -> dict[str, torch.Tensor]:
        out = {}
        for network, parent, leaf, proc, down, up in entries:
            text = network == "text"
            head = f"text_encoder.text_model.{parent}" if text else f"unet.{parent}"
            if style == "peft":
                names = (f"{head}.{leaf}.lora_A.weight", f"{head}.{leaf}.lora_B.weight")
            elif style == "lora":
                mid = "lora_linear_layer" if text else "lora"
                names = (f"{head}.{leaf}.{mid}.down.weight", f"{head}.{leaf}.{mid}.up.weight")
            else:  # save_attn_procs (no prefix, ".processor.") / old text-encoder processors
                base = head if text else f"{parent}.processor"
                names = (f"{base}.{proc}.down.weight", f"{base}.{proc}.up.weight")
            out |= {names[0]: down, names[1]: up}
        return out

    read = {
        style: read_lora(save(tmp_path / f"{style}.safetensors", spelled(style)), sd1)
        for style in ("peft", "lora", "procs")
    }
    assert read["peft"].format == "peft" and read["procs"].format == "diffusers"
    reference = {m.target: m for m in read["peft"].modules}
    assert len(reference) == 8
    for style in ("lora", "procs"):
        got = {m.target: m for m in read[style].modules}
        assert got.keys() == reference.keys(), style
        for target, module in got.items():
            assert torch.equal(module.delta(), reference[target].delta()), (style, target)


# --- hashes and pickles ------------------------------------------------------------------------


def test_hash_is_a1111s_lora_hash(sd1, tmp_path) -> None:
    """A1111's ``Lora hashes``: kohya's "addnet" hash (tensor bytes after the header)."""
    layers = [layer for layer in kohya_layers(sd1) if layer.path == LINEAR]
    tensors = kohya_tensors(layers)
    path = save(tmp_path / "h.safetensors", tensors, {"ss_output_name": "h"})
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + header :]).hexdigest()[:12]
    assert read_lora(path, sd1).hash == expected
    other = save(tmp_path / "h2.safetensors", tensors, {"ss_output_name": "renamed", "x": "y"})
    assert other.read_bytes() != data and read_lora(other, sd1).hash == expected
    claimed = save(tmp_path / "h3.safetensors", tensors, {"sshs_model_hash": "ab" * 32})
    assert read_lora(claimed, sd1).hash == expected  # a metadata claim is not trusted
    pickled = tmp_path / "h.pt"
    torch.save(tensors, pickled)
    lora = read_lora(pickled, sd1, allow_pickle=True)
    assert lora.hash == hashlib.sha256(pickled.read_bytes()).hexdigest()[:12]
    assert torch.equal(lora.modules[0].delta(), read_lora(path, sd1).modules[0].delta())


# --- 5. errors ---------------------------------------------------------------------------------

Q = kohya_name("unet", LINEAR)


def _pair(prefix: str) -> dict[str, torch.Tensor]:
    down, up = torch.zeros(2, 32), torch.zeros(32, 2)
    return {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up}


ERROR_CASES = {
    "sdxl": (_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"), "SDXL"),
    "sdxl-te2": (_pair("lora_te2_text_model_encoder_layers_0_mlp_fc1"), "SDXL"),
    "loha": (
        {f"{Q}.hada_w1_a": torch.zeros(32, 2), f"{Q}.hada_w1_b": torch.zeros(2, 32)},
        "LoHa networks are not supported",
    ),
    "lokr": ({f"{Q}.lokr_w1": torch.zeros(4, 4), f"{Q}.lokr_w2": torch.zeros(8, 8)}, "LoKr"),
    "dora": ({**_pair(Q), f"{Q}.dora_scale": torch.ones(32, 1)}, "DoRA"),
    "ia3": ({f"{Q}.weight": torch.zeros(32), f"{Q}.on_input": torch.tensor(0)}, "IA3"),
    "oft": ({f"{Q}.oft_blocks": torch.zeros(4, 8, 8)}, "OFT"),
    "peft-dora": (
        {
            f"unet.{LINEAR}.lora_A.weight": torch.zeros(2, 32),
            f"unet.{LINEAR}.lora_B.weight": torch.zeros(32, 2),
            f"unet.{LINEAR}.lora_magnitude_vector": torch.ones(32),
        },
        "DoRA",
    ),
    "unknown-layer": (_pair("lora_unet_down_blocks_9_nothing_here"), "names no layer"),
    "missing-up": ({f"{Q}.lora_down.weight": torch.zeros(2, 32)}, "up weight"),
    "bad-kernel": (
        {
            f"{Q}.lora_down.weight": torch.zeros(2, 32, 3, 3),
            f"{Q}.lora_up.weight": torch.zeros(32, 2, 1, 1),
        },
        "kernel",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_files_are_one_line_errors_naming_the_file(sd1, tmp_path, case: str) -> None:
    tensors, needle = ERROR_CASES[case]
    path = save(tmp_path / f"bad-{case}.safetensors", tensors)
    with pytest.raises(EmakiError) as info:
        read_lora(path, sd1)
    message = str(info.value)
    assert needle in message and path.name in message and "\n" not in message


def test_sd2_lora_on_sd1_names_the_first_key(sd1, sd2, tmp_path) -> None:
    tensors = kohya_tensors(kohya_layers(sd2))
    path = save(tmp_path / "for-sd2.safetensors", tensors)
    read_lora(path, sd2)  # fits its own family
    with pytest.raises(EmakiError) as info:
        read_lora(path, sd1)
    message = str(info.value)
    assert "for-sd2.safetensors" in message and "another model family" in message
    assert "key lora_" in message and "\n" not in message


def test_truncated_file_and_pickle_without_opt_in(sd1, tmp_path) -> None:
    layers = [layer for layer in kohya_layers(sd1) if layer.path == LINEAR]
    good = save(tmp_path / "good.safetensors", kohya_tensors(layers))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(EmakiError, match=r"cut\.safetensors"):
        read_lora(cut, sd1)
    pickled = tmp_path / "pickled.pt"
    torch.save(kohya_tensors(layers), pickled)
    with pytest.raises(PickleRefusedError, match=r"pickled\.pt"):
        read_lora(pickled, sd1)
    with pytest.raises(EmakiError, match=r"missing\.safetensors"):
        read_lora(tmp_path / "missing.safetensors", sd1)


def test_a_lora_read_for_one_model_is_refused_by_another(sd1, sd2, tmp_path) -> None:
    layers = [layer for layer in kohya_layers(sd2) if layer.path == CONV1X1]
    lora: LoraFile = read_lora(save(tmp_path / "x.safetensors", kohya_tensors(layers)), sd2)
    with pytest.raises(EmakiError, match="another model"):
        apply_loras(sd1, [(lora, 1.0, 1.0)])
