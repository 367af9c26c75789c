"""Families as data: full-size configs, key maps and shape inference, tiny bundles, schedules."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from emaki.errors import ModelLoadError
from emaki.models import FAMILIES, get_family, make_tiny_bundle, tiny_configs
from emaki.models.components import empty_text_encoder, empty_unet, empty_vae
from emaki.models.detect import infer_configs
from emaki.models.keymap import clip_keymap, openclip_keymap, unet_keymap, vae_keymap

# Published parameter counts (SD 1.5 / SD 2.1 model cards and diffusers' configs).
FULL_SIZE_PARAMS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text": 340_387_840},
}


def meta_models(unet_cfg, vae_cfg, text_cfg):
    return empty_unet(unet_cfg), empty_vae(vae_cfg), empty_text_encoder(text_cfg)


def compvis_shapes(family, unet, vae, text):
    """A CompVis 'checkpoint' of meta tensors (shapes only) for the given meta models."""
    maps = [
        unet_keymap(unet.state_dict(), unet.config.layers_per_block, unet.config.up_block_types),
        vae_keymap(vae.state_dict(), len(vae.config.block_out_channels)),
        clip_keymap(text.state_dict()) if family == "sd1" else openclip_keymap(text.state_dict()),
    ]
    state = {}
    for keymap, model in zip(maps, (unet, vae, text)):
        state.update(keymap.to_compvis(model.state_dict()))
    return state


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_configs_have_the_published_parameter_counts(family):
    spec = get_family(family)
    unet, vae, text = meta_models(spec.unet_config, spec.vae_config, spec.text_encoder_config)
    assert {"unet": count(unet), "vae": count(vae), "text": count(text)} == FULL_SIZE_PARAMS[family]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_key_map_has_the_known_compvis_names(family):
    spec = get_family(family)
    state = compvis_shapes(
        family, *meta_models(spec.unet_config, spec.vae_config, spec.text_encoder_config)
    )
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.time_embed.2.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    }
    if family == "sd1":
        expected |= {
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (
                1280,
                768,
            ),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        }
        assert len(state) == 686 + 248 + 196
    else:
        expected |= {
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (
                1280,
                1024,
            ),
            "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
            "cond_stage_model.model.positional_embedding": (77, 1024),
            "cond_stage_model.model.ln_final.weight": (1024,),
        }
        assert "cond_stage_model.model.transformer.resblocks.23.ln_1.weight" not in shapes
    assert {k: shapes.get(k) for k in expected} == expected


def _comparable(config):
    """Config fields the shapes determine (sample_size is a default size, not a shape)."""
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in dict(config).items()
        if k != "sample_size"
    }


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("size", ["full", "tiny"])
def test_configs_are_inferred_back_from_shapes(family, size):
    spec = get_family(family)
    if size == "full":
        unet_cfg, vae_cfg, text_cfg = spec.unet_config, spec.vae_config, spec.text_encoder_config
    else:
        tiny = tiny_configs(family)
        unet_cfg, vae_cfg, text_cfg = tiny.unet, tiny.vae, tiny.text_encoder
    unet, vae, text = meta_models(unet_cfg, vae_cfg, text_cfg)
    state = compvis_shapes(family, unet, vae, text)
    if family == "sd2":  # a real SD 2.x file holds one more OpenCLIP layer than is used
        last = text.config.num_hidden_layers
        state[f"cond_stage_model.model.transformer.resblocks.{last}.ln_1.weight"] = torch.empty(
            text.config.hidden_size, device="meta"
        )
    inferred = infer_configs(state, family, "test")
    assert _comparable(unet.config) == _comparable({**unet.config, **inferred.unet})
    assert _comparable(vae.config) == _comparable({**vae.config, **inferred.vae})
    wanted = {k: v for k, v in text.config.to_dict().items() if k in inferred.text_encoder}
    assert {k: inferred.text_encoder[k] for k in wanted} == wanted
    rebuilt = empty_unet(inferred.unet)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in unet.state_dict().items()
    }


def test_full_size_sd2_file_trimmed_to_23_layers_keeps_them_all():
    spec = get_family("sd2")
    unet, vae, text = meta_models(spec.unet_config, spec.vae_config, spec.text_encoder_config)
    inferred = infer_configs(compvis_shapes("sd2", unet, vae, text), "sd2", "test")
    assert inferred.text_encoder["num_hidden_layers"] == 23
    assert inferred.text_ignored == ()


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_training_schedule_matches_diffusers(family):
    spec = get_family(family)
    reference = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).alphas_cumprod
    alphas = spec.alphas_cumprod()
    assert alphas.dtype == torch.float32 and alphas.shape == (1000,)
    assert torch.equal(alphas, reference)
    assert alphas[0].item() == pytest.approx(1 - 0.00085)
    assert alphas[-1].item() == pytest.approx(0.0047, abs=1e-4)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_tiny_bundle_is_deterministic_and_leaves_the_rng_alone(family):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = make_tiny_bundle(family, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = make_tiny_bundle(family, seed=7)
    c = make_tiny_bundle(family, seed=8)
    assert a.hash == b.hash != c.hash
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("family", "pad_id", "scheduler_cls"),
    [("sd1", 49407, PNDMScheduler), ("sd2", 0, DDIMScheduler)],
)
def test_tiny_bundle_fields(family, pad_id, scheduler_cls):
    bundle = make_tiny_bundle(family, prediction_type="v")
    assert bundle.family == family and bundle.prediction_type == "v_prediction"
    assert bundle.vae_scale_factor == 0.18215
    assert bundle.latent_downscale == 8 and bundle.latent_channels == 4
    assert bundle.tokenizer.pad_token_id == pad_id
    assert bundle.text_encoder.config.vocab_size == 49408
    assert bundle.unet.config.cross_attention_dim == bundle.text_encoder.config.hidden_size
    scheduler = scheduler_cls.from_config(dict(bundle.scheduler_config))
    assert scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(scheduler.alphas_cumprod, bundle.alphas_cumprod)
    assert bundle.source is None and bundle.spec is FAMILIES[family]
    with torch.no_grad():
        ids = bundle.tokenizer(
            ["a cat"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        cond = bundle.text_encoder(ids).last_hidden_state
        out = bundle.unet(torch.randn(1, 4, 8, 8), 999, cond).sample
        image = bundle.vae.decode(out / bundle.vae_scale_factor).sample
    assert image.shape == (1, 3, 64, 64)


def test_unknown_family_and_prediction_type_are_errors():
    with pytest.raises(ModelLoadError, match="sd1, sd2"):
        get_family("sdxl")
    with pytest.raises(ModelLoadError, match="unknown prediction type"):
        make_tiny_bundle("sd1", prediction_type="velocity")
