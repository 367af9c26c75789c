"""Self-attention guidance and DiffEdit masks, side by side with diffusers and analytically.

Both sides get the same tiny SD 1.x networks (random weights), prompt embeddings, latents and
noise. diffusers' SAG pipeline uses DDIM in variance-preserving form; with ``set_alpha_to_one``
its last step lands on sigma = 0, so its final latents equal emaki's VE latents directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from diffusers.pipelines import StableDiffusionDiffEditPipeline, StableDiffusionSAGPipeline
from PIL import Image

from emaki.adapters.clone import share_clone
from emaki.conditioning import Conditioning
from emaki.edit import diffedit_map, diffedit_mask, diffedit_sigma, mask_to_images, threshold_map
from emaki.errors import InvalidRequestError
from emaki.models.tiny import make_tiny_bundle
from emaki.sampling.denoisers import DiscreteDenoiser, DiscreteSchedule
from emaki.sampling.guidance import CFGDenoiser, GuidedCond
from emaki.sampling.registry import get_sampler
from emaki.sampling.sag import (
    SelfAttentionGuidance,
    attention_mask,
    capture_self_attention,
    gaussian_blur,
)
from emaki.sampling.schedules import make_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 10


@pytest.fixture(scope="module")
def bundle():
    return make_tiny_bundle("sd1", seed=0)


@pytest.fixture(scope="module")
def embeds(bundle) -> dict[str, torch.Tensor]:
    """CLIP states [1, 77, 32] of a few prompts through the tiny text encoder."""
    out = {}
    for text in ("", "a cat on a sofa", "a dog on a sofa", "blurry"):
        ids = bundle.tokenizer(
            text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            out[text] = bundle.text_encoder(ids)[0]
    return out


def _apply(unet):
    def apply(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=cond.context, return_dict=False)[0]

    return apply


def _denoiser(bundle, unet) -> DiscreteDenoiser:
    return DiscreteDenoiser(_apply(unet), DiscreteSchedule(bundle.alphas_cumprod), "epsilon")


def _ddim(bundle) -> DDIMScheduler:
    return DDIMScheduler.from_config({**bundle.scheduler_config, "set_alpha_to_one": True})


def _noise(shape: tuple[int, ...], seed: int = 4) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- self-attention guidance -----------------------------------------------------------------


def _sag_emaki(bundle, cond, noise, scale, sag_scale):
    clone, capture = capture_self_attention(bundle.unet)
    guided = SelfAttentionGuidance(_denoiser(bundle, clone), capture, scale, sag_scale)
    sigmas = make_sigmas(DiscreteSchedule(bundle.alphas_cumprod), "ddim_uniform", STEPS)
    with torch.no_grad():
        return get_sampler("DDIM")(guided, noise * sigmas[0], sigmas, cond=cond)


def _sag_diffusers(bundle, pos, neg, noise, scale, sag_scale):
    # diffusers swaps the processor of the UNet it is given; give it a clone of its own.
    pipe = StableDiffusionSAGPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=share_clone(bundle.unet),
        scheduler=_ddim(bundle),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    sigmas = make_sigmas(DiscreteSchedule(bundle.alphas_cumprod), "ddim_uniform", STEPS)
    s0 = float(sigmas[0])
    h, w = noise.shape[-2:]
    return pipe(
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        height=8 * h,
        width=8 * w,
        num_inference_steps=STEPS,
        guidance_scale=scale,
        sag_scale=sag_scale,
        latents=noise * s0 / (1 + s0**2) ** 0.5,  # VP form of emaki's noise * sigma_max
        output_type="latent",
    ).images


@pytest.mark.parametrize(
    ("size", "scale"),
    [((8, 8), 7.5), ((9, 11), 7.5), ((10, 14), 1.0)],  # mid blocks 4x4, 5x6, 5x7
)
def test_sag_matches_diffusers(bundle, embeds, size, scale) -> None:
    pos, neg = embeds["a cat on a sofa"], embeds[""]
    noise = _noise((1, 4, *size))
    cond = GuidedCond(Conditioning(pos), Conditioning(neg))
    ours = _sag_emaki(bundle, cond, noise, scale, 0.75)
    theirs = _sag_diffusers(bundle, pos, neg, noise, scale, 0.75)
    plain = _sag_emaki(bundle, cond, noise, scale, 0.0)
    diff = float((ours - theirs).abs().max())
    effect = float((ours - plain).abs().max())
    print(f"SAG {size} cfg {scale}: max abs diff {diff:.2e}, SAG effect {effect:.3f}")
    assert effect > 0.05, "SAG changed nothing: the comparison would be vacuous"
    assert diff < 1e-4


def test_sag_scale_zero_is_plain_cfg_bit_for_bit(bundle, embeds) -> None:
    cond = GuidedCond(Conditioning(embeds["a cat on a sofa"]), Conditioning(embeds["blurry"]))
    noise = _noise((2, 4, 8, 8))
    ours = _sag_emaki(bundle, cond, noise, 7.5, 0.0)
    sigmas = make_sigmas(DiscreteSchedule(bundle.alphas_cumprod), "ddim_uniform", STEPS)
    with torch.no_grad():
        cfg = CFGDenoiser(_denoiser(bundle, bundle.unet), 7.5)
        plain = get_sampler("DDIM")(cfg, noise * sigmas[0], sigmas, cond=cond)
    assert torch.equal(ours, plain)


def test_shared_unet_is_untouched(bundle, embeds) -> None:
    unet = bundle.unet
    x, t = _noise((2, 4, 8, 8)), torch.tensor([500.0, 500.0])
    ctx = torch.cat([embeds["a cat on a sofa"], embeds[""]])
    with torch.no_grad():
        before_out = unet(x, t, encoder_hidden_states=ctx).sample
    before = dict(unet.attn_processors)
    transformer = unet.mid_block.attentions[0]
    cond = GuidedCond(Conditioning(ctx[:1]), Conditioning(ctx[1:]))
    _sag_emaki(bundle, cond, _noise((1, 4, 8, 8)), 7.5, 0.75)
    after = dict(unet.attn_processors)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert not transformer._forward_pre_hooks and not transformer._forward_hooks
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, before_out)


def test_sag_batch_rows_are_independent(bundle, embeds) -> None:
    """Two images in one batch get what each gets alone (masks and blur are per image)."""
    cond = GuidedCond(Conditioning(embeds["a cat on a sofa"]), Conditioning(embeds[""]))
    noise = _noise((2, 4, 9, 11))
    both = _sag_emaki(bundle, cond, noise, 7.5, 0.75)
    one = _sag_emaki(bundle, cond, noise[1:], 7.5, 0.75)
    assert float((both[1:] - one).abs().max()) < 1e-4  # latents ~20: batched rounding only


def test_sag_with_prompts_of_different_lengths(bundle, embeds) -> None:
    """A negative prompt of another length makes CFG run it as a separate call."""
    long_neg = torch.cat([embeds["blurry"], embeds[""]], dim=1)  # [1, 154, 32]
    cond = GuidedCond(Conditioning(embeds["a cat on a sofa"]), Conditioning(long_neg))
    out = _sag_emaki(bundle, cond, _noise((1, 4, 8, 8)), 7.5, 0.75)
    assert torch.isfinite(out).all()


def test_attention_mask_and_blur() -> None:
    mass = torch.tensor([[0.5, 1.5, 1.0, 2.0, 0.0, 1.01]])  # [1, 6] at a 2x3 mid block
    mask = attention_mask(mass, (2, 3), (4, 6))
    expected = torch.tensor([[0, 1, 0], [1, 0, 1]], dtype=torch.float32)
    assert torch.equal(mask[0, 0], expected.repeat_interleave(2, 0).repeat_interleave(2, 1))
    flat = torch.full((1, 4, 9, 7), 3.0)  # a constant image is its own blur
    assert torch.allclose(gaussian_blur(flat), flat, atol=1e-6)
    tiny = torch.randn(1, 4, 3, 3)  # smaller than the kernel radius: replicate padding
    assert gaussian_blur(tiny).shape == tiny.shape
    impulse = torch.zeros(1, 1, 11, 11)
    impulse[0, 0, 5, 5] = 1.0
    blurred = gaussian_blur(impulse)
    assert abs(float(blurred.sum()) - 1.0) < 1e-6  # mass-preserving away from the border
    assert torch.allclose(blurred[0, 0], blurred[0, 0].T, atol=1e-7)


def test_sag_needs_mid_block_attention(bundle) -> None:
    unet = share_clone(bundle.unet)
    unet.mid_block = None
    with pytest.raises(InvalidRequestError, match="middle block"):
        capture_self_attention(unet)


# --- DiffEdit --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_latents(bundle) -> torch.Tensor:
    """The tiny VAE's latent [1, 4, 10, 12] of a synthetic 80x96 picture (a disc on a ramp)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 80), torch.linspace(-1, 1, 96), indexing="ij")
    disc = ((xx - 0.3) ** 2 + yy**2 < 0.2).float()
    image = torch.stack([xx, yy, disc * 2 - 1])[None]  # [1, 3, 80, 96] in [-1, 1]
    with torch.no_grad():
        return bundle.vae.encode(image).latent_dist.mean * bundle.vae.config.scaling_factor


def _diffedit_diffusers(bundle, latents, src, tgt, neg, seed: int, ratio: float) -> np.ndarray:
    pipe = StableDiffusionDiffEditPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=share_clone(bundle.unet),
        scheduler=DDIMScheduler.from_config(dict(bundle.scheduler_config)),
        safety_checker=None,
        feature_extractor=None,
        inverse_scheduler=DDIMInverseScheduler.from_config(dict(bundle.scheduler_config)),
        requires_safety_checker=False,
    )
    return pipe.generate_mask(
        image=latents,  # latents pass through, so the generator's first draw is the noise
        target_prompt_embeds=tgt,
        target_negative_prompt_embeds=neg,
        source_prompt_embeds=src,
        source_negative_prompt_embeds=neg,
        num_maps_per_mask=10,
        mask_encode_strength=0.5,
        mask_thresholding_ratio=ratio,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )  # [B, h, w] in {0, 1}


@pytest.mark.parametrize(("seed", "ratio"), [(0, 3.0), (7, 3.0), (7, 1.5)])
def test_diffedit_mask_matches_diffusers(bundle, embeds, image_latents, seed, ratio) -> None:
    src, tgt, neg = embeds["a cat on a sofa"], embeds["a dog on a sofa"], embeds[""]
    theirs = _diffedit_diffusers(bundle, image_latents, src, tgt, neg, seed, ratio)
    schedule = DiscreteSchedule(bundle.alphas_cumprod)
    sigma = diffedit_sigma(schedule, 0.5, 50)
    assert float(schedule.sigma_to_t(torch.tensor([sigma]))) == pytest.approx(481, abs=1e-3)
    denoiser = CFGDenoiser(_denoiser(bundle, bundle.unet), 7.5)
    source = GuidedCond(Conditioning(src), Conditioning(neg))
    target = GuidedCond(Conditioning(tgt), Conditioning(neg))
    with torch.no_grad():
        diff_map = diffedit_map(denoiser, image_latents, source, target, sigma=sigma, seed=seed)
    ours = threshold_map(diff_map, ratio)
    differing = float((ours[:, 0].numpy() != theirs).mean())
    # How close the nearest map value lies to the threshold, in units of the threshold:
    # rounding (~1e-6) can only flip pixels closer than that.
    level = 0.5 * ratio * diff_map.mean()
    margin = float(((diff_map - level).abs() / level).min())
    share = float(ours.mean())
    print(
        f"DiffEdit seed {seed} ratio {ratio}: mask {share:.1%}, {differing:.2%} of pixels differ;"
        f" nearest value to the threshold {margin:.1e} relative"
    )
    assert 0.0 < share < 1.0, "degenerate mask: the comparison would be vacuous"
    assert differing == 0.0


def test_diffedit_identical_prompts_give_an_empty_mask(bundle, embeds, image_latents) -> None:
    cond = GuidedCond(Conditioning(embeds["a cat on a sofa"]), Conditioning(embeds[""]))
    denoiser = CFGDenoiser(_denoiser(bundle, bundle.unet), 7.5)
    with torch.no_grad():
        mask = diffedit_mask(denoiser, image_latents, cond, cond, sigma=2.0, n_noise=3, seed=1)
    assert mask.shape == (1, 1, 10, 12)
    assert not mask.any()


def _region_model(region: torch.Tensor):
    """x0 = x / 2 + c * region, with c the conditioning's first value: only ``region`` differs."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        c = cond.context[:, 0, 0].reshape(-1, 1, 1, 1)  # [B, 1, 1, 1]
        return x / 2 + c * region

    return denoiser


def test_diffedit_finds_the_region_the_prompts_disagree_on() -> None:
    """Analytic: the map is |c_t - c_s| / sigma inside the region and 0 outside, so the mask is
    the region exactly (it covers 1/4 < 2/3 of the image, so it clears 0.5 * 3 * mean)."""
    region = torch.zeros(1, 1, 8, 8)
    region[..., 2:6, 1:5] = 1.0
    latents = torch.randn(2, 4, 8, 8)
    source = Conditioning(torch.zeros(1, 1, 1))
    target = Conditioning(torch.ones(1, 1, 1))
    mask = diffedit_mask(_region_model(region), latents, source, target, sigma=1.5, n_noise=4)
    assert torch.equal(mask, region.expand(2, 1, 8, 8))
    diff_map = diffedit_map(_region_model(region), latents, source, target, sigma=1.5, n_noise=4)
    assert torch.allclose(diff_map, region.expand(2, 1, 8, 8) / 1.5, atol=1e-6)


def test_diffedit_batch_chunks_and_per_image_prompts() -> None:
    """Per-image prompts follow their image; chunking noises changes nothing; images in a batch
    are normalised independently (diffusers normalises over the whole batch)."""
    region = torch.zeros(1, 1, 8, 8)
    region[..., :4, :] = 1.0
    latents = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 5, 4, 8, 8)
    source = Conditioning(torch.zeros(2, 1, 1))
    target = Conditioning(torch.tensor([1.0, 10.0]).reshape(2, 1, 1))  # image 1 differs 10x more
    model = _region_model(region)
    whole = diffedit_map(model, latents, source, target, sigma=1.0, n_noise=5, noise=noise)
    chunked = diffedit_map(
        model, latents, source, target, sigma=1.0, n_noise=5, noise=noise, noises_per_call=2
    )
    assert torch.allclose(whole, chunked)
    assert torch.allclose(whole[1], 10 * whole[0])
    mask = threshold_map(whole)
    assert torch.equal(mask[0], mask[1])  # per-image normalisation: both find the region
    assert torch.equal(mask[0], region[0])


def test_diffedit_image_whose_prompts_agree_gets_an_empty_mask() -> None:
    region = torch.zeros(1, 1, 8, 8)
    region[..., 3:, 2:7] = 1.0
    source = Conditioning(torch.zeros(2, 1, 1))
    target = Conditioning(torch.tensor([0.0, 2.0]).reshape(2, 1, 1))  # image 0: no change
    mask = diffedit_mask(_region_model(region), torch.randn(2, 4, 8, 8), source, target, sigma=3.0)
    assert not mask[0].any()
    assert torch.equal(mask[1], region[0])


def test_diffedit_noise_is_diffusers_draw() -> None:
    latents = torch.zeros(2, 4, 3, 5)
    noise = torch.randn(6, 4, 3, 5, generator=torch.Generator().manual_seed(3))
    from emaki.edit import draw_noise

    assert torch.equal(draw_noise(latents, 3, seed=3), noise.view(2, 3, 4, 3, 5))


def test_diffedit_sigma_and_errors(bundle) -> None:
    schedule = DiscreteSchedule(bundle.alphas_cumprod)
    sched = DDIMScheduler.from_config(dict(bundle.scheduler_config))
    sched.set_timesteps(20)
    for strength in (0.3, 0.5, 1.0):
        t = int(sched.timesteps[20 - int(20 * strength)])
        a = float(bundle.alphas_cumprod[t])
        assert diffedit_sigma(schedule, strength, 20) == pytest.approx(((1 - a) / a) ** 0.5)
    with pytest.raises(InvalidRequestError):
        diffedit_sigma(schedule, 0.0)
    with pytest.raises(InvalidRequestError):
        diffedit_sigma(schedule, 0.01, 50)  # int(0.5) = 0 steps: no noise
    with pytest.raises(InvalidRequestError):
        threshold_map(torch.ones(1, 1, 2, 2), ratio=0.0)


def test_mask_to_images() -> None:
    mask = torch.zeros(2, 1, 3, 4)
    mask[0, 0, 1, 2] = 1.0
    images = mask_to_images(mask, (32, 24))
    assert [im.size for im in images] == [(32, 24), (32, 24)]
    assert all(im.mode == "L" for im in images)
    arr = np.asarray(images[0])
    assert set(np.unique(arr)) == {0, 255}
    assert (arr[8:16, 16:24] == 255).all() and arr.sum() == 255 * 64
    assert np.asarray(images[1]).max() == 0
    assert isinstance(images[0], Image.Image)


def test_pipeline_sag_matches_diffusers_and_records_infotext(bundle) -> None:
    """``sag_scale`` through the whole txt2img job: the same image as diffusers' SAG pipeline."""
    import numpy as np

    from emaki.infotext import parse_infotext
    from emaki.pipelines.txt2img import Pipeline
    from emaki.request import GenerationRequest, request_from_params

    pipe = Pipeline(bundle)
    req = GenerationRequest(
        prompt="a cat on a sofa", sampler="DDIM", steps=STEPS, cfg_scale=7.5, seed=4,
        width=64, height=64, sag_scale=0.75,
    )  # fmt: skip
    res = pipe.generate(req)
    plain = pipe.generate(GenerationRequest(**{**req.__dict__, "sag_scale": 0.0})).images[0]
    ref = StableDiffusionSAGPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
        unet=share_clone(bundle.unet), scheduler=_ddim(bundle), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    s0 = float(make_sigmas(DiscreteSchedule(bundle.alphas_cumprod), "ddim_uniform", STEPS)[0])
    noise = _noise((1, 4, 8, 8), seed=4)
    theirs = ref(
        "a cat on a sofa", num_inference_steps=STEPS, guidance_scale=7.5, sag_scale=0.75,
        latents=noise * s0 / (1 + s0**2) ** 0.5, output_type="pil", height=64, width=64,
    ).images[0]  # fmt: skip
    ours = np.asarray(res.images[0], dtype=np.int16)
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
    assert np.abs(ours - np.asarray(plain, dtype=np.int16)).max() > 3, "SAG had no effect"
    info = parse_infotext(res.infotexts[0])
    assert info.params["SAG Guidance Scale"] == "0.75"
    assert request_from_params(info.prompt, info.negative_prompt, info.params).sag_scale == 0.75
    with pytest.raises(InvalidRequestError, match="self-attention guidance scale"):
        pipe.generate(GenerationRequest(prompt="x", sag_scale=-1.0))


def test_pipeline_diffedit_inpaints_where_the_prompts_differ(bundle) -> None:
    """An init image with a source prompt and no mask: DiffEdit's mask, then ordinary inpainting
    (pixels outside the mask kept exactly); identical prompts are a clear error."""
    import numpy as np

    from emaki.infotext import parse_infotext
    from emaki.pipelines.txt2img import Pipeline
    from emaki.request import GenerationRequest, InitImage

    pipe = Pipeline(bundle)
    image = pipe.generate(
        GenerationRequest(prompt="a cat on a sofa", steps=4, seed=1, width=64, height=64)
    ).images[0]
    init = InitImage(image, diffedit_source="a cat on a sofa", mask_blur=0)
    req = GenerationRequest(
        prompt="a dog on a sofa", init=init, denoising_strength=0.8, steps=6, seed=2,
        sampler="Euler", cfg_scale=7.0,
    )  # fmt: skip
    res = pipe.generate(req)
    r = pipe.resolve(req)
    b, text = pipe.adapted(r)
    mask = pipe.diffedit(r, b, text, pipe.conditioning(r, text)).request.init.mask
    m = np.asarray(mask) > 127
    assert 0 < m.mean() < 1, "the mask should cover part of the image"
    out, src = np.asarray(res.images[0]), np.asarray(image)
    assert np.array_equal(out[~m], src[~m])
    assert not np.array_equal(out[m], src[m])
    same = pipe.generate(
        GenerationRequest(**{**req.__dict__, "init": InitImage(image, mask=mask, mask_blur=0)})
    )
    assert np.array_equal(np.asarray(same.images[0]), out)
    assert parse_infotext(res.infotexts[0]).params["DiffEdit source"] == "a cat on a sofa"
    with pytest.raises(InvalidRequestError, match="DiffEdit found nothing to change"):
        pipe.generate(GenerationRequest(**{**req.__dict__, "prompt": "a cat on a sofa"}))
    with pytest.raises(InvalidRequestError, match="not both"):
        pipe.generate(
            GenerationRequest(
                **{**req.__dict__, "init": InitImage(image, mask=mask, diffedit_source="x")}
            )
        )
