"""ControlNet: preprocessors on analytic images, strict loading, diffusers side by side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionControlNetPipeline
from PIL import Image
from safetensors.torch import save_file

from emaki.conditioning import Conditioning
from emaki.control import ControlledUNet, ControlUnit, hint_from_image, load_controlnet
from emaki.control.preprocess import ADE20K_PALETTE, PREPROCESSORS, canny, preprocess
from emaki.errors import InvalidRequestError, ModelLoadError, PickleRefusedError
from emaki.models.tiny import make_tiny_bundle
from emaki.sampling.denoisers import DiscreteDenoiser, DiscreteSchedule
from emaki.sampling.guidance import CFGDenoiser, GuidedCond
from emaki.sampling.registry import get_sampler
from emaki.sampling.schedules import make_sigmas
from emaki.sampling.types import StepInfo

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64  # image size; latents are 8x8 with the tiny VAE's four levels
#: Final-latent tolerance against diffusers, relative to the latents' largest magnitude (~40 for
#: these random tiny networks). emaki maps sigma -> timestep log-linearly, diffusers' Euler
#: linearly; without any ControlNet the two pipelines already differ by ~2e-6 relative.
REL_TOL = 1e-5


# --- analytic images -------------------------------------------------------------------------


def _square(value: int = 255, size: int = SIZE, box: tuple[int, int, int, int] = (20, 44, 16, 48)):
    """A flat square (rows y0:y1, columns x0:x1) of grey ``value`` on black."""
    y0, y1, x0, x1 = box
    arr = np.zeros((size, size, 3), np.uint8)
    arr[y0:y1, x0:x1] = value
    return Image.fromarray(arr)


def _grey(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image)
    assert (
        image.mode == "RGB"
        and (arr[..., 0] == arr[..., 1]).all()
        and (arr[..., 1] == arr[..., 2]).all()
    )
    return arr[..., 0].astype(np.int32)


def _ring(box: tuple[int, int, int, int], size: int = SIZE, width: int = 1) -> np.ndarray:
    """Bool mask of the pixels within ``width`` of the square's boundary (both sides)."""
    y0, y1, x0, x1 = box
    yy, xx = np.mgrid[0:size, 0:size]
    outer = (yy >= y0 - width) & (yy < y1 + width) & (xx >= x0 - width) & (xx < x1 + width)
    inner = (yy >= y0 + width) & (yy < y1 - width) & (xx >= x0 + width) & (xx < x1 - width)
    return outer & ~inner


BOX = (20, 44, 16, 48)


def test_canny_marks_the_square_border_and_nothing_else() -> None:
    edges = _grey(canny(_square(255, box=BOX))) > 0
    assert edges.shape == (SIZE, SIZE)
    assert not (edges & ~_ring(BOX)).any(), "edge pixels away from the border"
    y0, y1, x0, x1 = BOX
    # each side is traced over (almost) its whole length by a one-pixel line
    assert edges[y0 - 1 : y0 + 1, x0:x1].any(axis=0).mean() > 0.9
    assert edges[y1 - 1 : y1 + 1, x0:x1].any(axis=0).mean() > 0.9
    assert edges[y0:y1, x0 - 1 : x0 + 1].any(axis=1).mean() > 0.9
    assert edges[y0:y1, x1 - 1 : x1 + 1].any(axis=1).mean() > 0.9
    perimeter = 2 * ((y1 - y0) + (x1 - x0))
    assert perimeter - 8 <= edges.sum() <= perimeter + 8, "the line is not one pixel wide"


def test_canny_thresholds_are_opencv_sobel_units() -> None:
    # Contrast 30: L1 Sobel magnitude 4 * 30 = 120 along the sides, 6 * 30 = 180 at corners.
    faint = _square(30, box=BOX)
    assert _grey(canny(faint)).max() == 0  # nothing reaches high = 200
    full = _grey(canny(faint, low=100, high=150)) > 0  # corners seed, sides (120 > 100) follow
    assert full.sum() > 100
    corners = _grey(canny(faint, low=130, high=150)) > 0  # sides below low: corners only
    assert 0 < corners.sum() <= 12
    # L2 makes the corners weaker (sqrt(2) * 90 ~ 127 < 150), so nothing is strong any more
    assert _grey(canny(faint, low=100, high=150, l2=True)).max() == 0


def test_canny_hysteresis_keeps_weak_edges_connected_to_strong_ones() -> None:
    arr = np.zeros((SIZE, SIZE, 3), np.uint8)
    arr[8:24, 8:24] = 255  # left half of a rectangle: strong edges (1020)
    arr[8:24, 24:40] = 25  # right half: weak edges (100 < 4 * 25 < 200), attached
    arr[40:56, 40:56] = 25  # a separate faint square: weak everywhere, no strong seed
    edges = _grey(canny(Image.fromarray(arr), low=90, high=200)) > 0
    assert edges[8:24, 38:41].any(axis=1).mean() > 0.8, "attached weak edge dropped"
    assert not edges[36:60, 36:60].any(), "isolated weak edge kept"


def test_canny_blur_and_bad_thresholds() -> None:
    noisy = np.asarray(_square(200), dtype=np.float64)
    noisy = noisy + np.random.default_rng(0).normal(0, 25, noisy.shape)
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    assert (_grey(canny(image, sigma=1.5)) > 0).sum() < (_grey(canny(image)) > 0).sum()
    with pytest.raises(InvalidRequestError, match="low <= high"):
        canny(image, low=200, high=100)


def test_threshold_and_scribble() -> None:
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (8, 1)))  # "L" mode input
    out = _grey(preprocess("threshold", ramp, level=100))
    assert (out[0] == np.where(np.arange(256) > 100, 255, 0)).all()
    assert (_grey(preprocess("threshold", ramp, level=100, invert=True)) == 255 - out).all()

    paper = np.full((SIZE, SIZE, 3), 255, np.uint8)
    paper[30, 10:50] = 0  # a one-pixel dark pen stroke on white paper
    strokes = _grey(preprocess("scribble", Image.fromarray(paper)))
    assert strokes[30, 10:50].min() == 255 and strokes.sum() == 40 * 255  # white on black
    thick = _grey(preprocess("scribble", Image.fromarray(paper), thicken=2)) > 0
    assert thick[28:33, 12:48].all() and not thick[26].any() and not thick[34].any()
    # light strokes on a dark ground are already the right way round
    assert (_grey(preprocess("scribble", Image.fromarray(255 - paper))) == strokes).all()


def test_soft_edge_is_smooth_around_the_border() -> None:
    soft = _grey(preprocess("soft_edge", _square(255, box=BOX)))
    row = soft[32]  # crosses the left side at x = 16 and the right at x = 48
    assert row[15:17].max() >= 250
    assert row[0] == 0 and row[32] == 0  # far from any edge
    assert ((row > 20) & (row < 230)).sum() >= 4, "not soft: no intermediate values"
    assert (np.diff(row[4:16]) >= 0).all() and (np.diff(row[17:28]) <= 0).all()  # falls off
    assert _grey(preprocess("soft_edge", _square(3, box=BOX))).max() < 60  # faint stays faint


def test_lineart_draws_on_the_dark_side_white_on_black() -> None:
    square = _square(255, box=BOX)
    lines = _grey(preprocess("lineart", square))
    outside_ring = _ring((19, 45, 15, 49), width=2) & ~_ring(BOX, width=0)
    assert lines[~_ring(BOX, width=4)].max() == 0  # nothing far from the edge
    assert lines[30:34, 14:16].min() > 100  # just outside the left side
    assert lines[30:34, 16:20].max() == 0  # the bright side has no line
    assert lines[outside_ring].mean() > 60
    drawing = _grey(preprocess("lineart", square, drawing=True))
    assert (drawing == 255 - lines).all()


def test_segmentation_paints_colour_regions_with_ade20k_colours() -> None:
    arr = np.zeros((32, 48, 3), np.uint8)
    arr[:, :16], arr[:, 16:32], arr[:, 32:] = (200, 30, 30), (30, 200, 30), (20, 20, 200)
    arr[:8, :16] = (205, 35, 25)  # a near-identical shade joins its region
    seg = np.asarray(preprocess("segmentation", Image.fromarray(arr), k=3))
    colours = {tuple(c) for c in seg.reshape(-1, 3)}
    assert len(colours) == 3 and colours <= set(ADE20K_PALETTE)
    for band in (seg[:, :16], seg[:, 16:32], seg[:, 32:]):
        assert len({tuple(c) for c in band.reshape(-1, 3)}) == 1
    again = np.asarray(preprocess("segmentation", Image.fromarray(arr), k=3))
    assert (seg == again).all()  # deterministic
    few = np.asarray(preprocess("segmentation", Image.fromarray(arr), k=8, sigma=0))
    assert len({tuple(c) for c in few.reshape(-1, 3)}) == 4  # k is an upper bound
    assert len(ADE20K_PALETTE) == 150 and ADE20K_PALETTE[0] == (120, 120, 120)


@pytest.mark.parametrize("name", sorted(PREPROCESSORS))
def test_every_preprocessor_keeps_size_and_returns_rgb(name: str) -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (23, 37, 4), dtype=np.uint8), "RGBA")
    out = preprocess(name, image)
    assert out.mode == "RGB" and out.size == (37, 23)


def test_preprocess_errors_name_what_is_accepted() -> None:
    image = _square()
    with pytest.raises(InvalidRequestError, match="accepted: canny, soft_edge"):
        preprocess("hed", image)
    with pytest.raises(InvalidRequestError, match=r"option.*foo.*accepted: low, high, sigma, l2"):
        preprocess("canny", image, foo=1)
    with pytest.raises(InvalidRequestError, match="low must be a finite number"):
        preprocess("canny", image, low="a")
    with pytest.raises(InvalidRequestError, match="k must be an integer"):
        preprocess("segmentation", image, k=2.5)
    with pytest.raises(InvalidRequestError, match=r"k must be 1..150"):
        preprocess("segmentation", image, k=0)
    assert preprocess("Soft-Edge", image, sigma=2).size == image.size  # names are forgiving


# --- tiny ControlNets ------------------------------------------------------------------------


def tiny_controlnet(unet, seed: int) -> ControlNetModel:
    """A ControlNet copied from ``unet`` whose zero convolutions are *not* zero (so it acts)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet)
        hint = net.controlnet_cond_embedding
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, hint.conv_out]:
            torch.nn.init.normal_(conv.weight, std=0.05)
            torch.nn.init.normal_(conv.bias, std=0.05)
        for param in net.down_blocks.parameters():  # not quite the UNet's encoder
            param.add_(torch.randn_like(param) * 0.02)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def sd1():
    return make_tiny_bundle("sd1", seed=0)


@pytest.fixture(scope="module")
def sd2():
    return make_tiny_bundle("sd2", seed=0)


@pytest.fixture(scope="module")
def nets(sd1):
    return tiny_controlnet(sd1.unet, 1), tiny_controlnet(sd1.unet, 2)


def _outputs(net: ControlNetModel, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, net.config.cross_attention_dim, generator=g)
    hint = torch.rand(2, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        down, mid = net(x, torch.tensor([10.0, 700.0]), ctx, hint, return_dict=False)
    return [*down, mid]


def _assert_same_outputs(a: ControlNetModel, b: ControlNetModel) -> None:
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        assert torch.equal(x, y)
    assert float(_outputs(a)[-1].abs().max()) > 0


# --- loading ---------------------------------------------------------------------------------

#: lllyasviel's ResBlock names of the layers diffusers' ResnetBlock2D calls norm1, conv1, ...
_RESBLOCK = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def original_layout(net: ControlNetModel, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of ``net`` under the module names of lllyasviel's ``cldm.ControlNet``.

    Built by walking the architecture (not from emaki's key map): ``time_embed`` is a
    Sequential(linear, SiLU, linear); ``input_blocks`` lists conv_in, then per level each
    (ResBlock[, SpatialTransformer]) and a downsampler ``op``; the hint block is a Sequential of
    convolutions with SiLUs between them; one zero convolution per input block, one after the
    middle block. Transformer internals have the same names on both sides.
    """
    modules: list[tuple[str, torch.nn.Module]] = [
        ("time_embed.0", net.time_embedding.linear_1),
        ("time_embed.2", net.time_embedding.linear_2),
        ("input_blocks.0.0", net.conv_in),
    ]

    def resblock(where: str, block: torch.nn.Module) -> None:
        for name, child in block.named_children():
            if name in _RESBLOCK:
                modules.append((f"{where}.{_RESBLOCK[name]}", child))

    n = 1
    for down in net.down_blocks:
        for j, res in enumerate(down.resnets):
            resblock(f"input_blocks.{n}.0", res)
            if hasattr(down, "attentions"):
                modules.append((f"input_blocks.{n}.1", down.attentions[j]))
            n += 1
        if down.downsamplers is not None:
            modules.append((f"input_blocks.{n}.0.op", down.downsamplers[0].conv))
            n += 1
    resblock("middle_block.0", net.mid_block.resnets[0])
    modules.append(("middle_block.1", net.mid_block.attentions[0]))
    resblock("middle_block.2", net.mid_block.resnets[1])
    hint = net.controlnet_cond_embedding
    for i, conv in enumerate([hint.conv_in, *hint.blocks, hint.conv_out]):
        modules.append((f"input_hint_block.{2 * i}", conv))
    for i, conv in enumerate(net.controlnet_down_blocks):
        modules.append((f"zero_convs.{i}.0", conv))
    modules.append(("middle_block_out.0", net.controlnet_mid_block))
    state = {
        f"{prefix}{where}.{name}": tensor.clone()
        for where, module in modules
        for name, tensor in module.state_dict().items()
    }
    assert len(state) == len(net.state_dict()), "the walk missed or repeated a tensor"
    return state


def test_diffusers_folder_loads(nets, tmp_path) -> None:
    nets[0].save_pretrained(tmp_path / "cn", safe_serialization=True)
    _assert_same_outputs(load_controlnet(tmp_path / "cn"), nets[0])


def test_original_sd1_file_with_prefix(nets, tmp_path) -> None:
    path = tmp_path / "control_sd15_tiny.safetensors"
    save_file(original_layout(nets[0], "control_model."), path)
    loaded = load_controlnet(path)
    assert loaded.config.use_linear_projection is False and loaded.config.attention_head_dim == 8
    _assert_same_outputs(loaded, nets[0])


def test_original_sd2_file_without_prefix(sd2, tmp_path) -> None:
    net = tiny_controlnet(sd2.unet, 3)
    path = tmp_path / "control_sd21_tiny.safetensors"
    save_file(original_layout(net), path)
    loaded = load_controlnet(path)
    config = loaded.config
    assert config.use_linear_projection and list(config.attention_head_dim) == [1, 2]
    assert config.cross_attention_dim == 64 and list(config.block_out_channels) == [64, 128]
    assert tuple(config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    _assert_same_outputs(loaded, net)


def test_controlnet_1_0_file_with_a_bundled_model_and_yaml(nets, tmp_path) -> None:
    state = original_layout(nets[0], "control_model.")
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 2)
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2)
    state["betas"] = torch.zeros(3)
    path = tmp_path / "control_sd15_shuffle.safetensors"
    save_file(state, path)
    (tmp_path / "control_sd15_shuffle.yaml").write_text(
        "model:\n  params:\n    control_stage_config:\n      params:\n"
        "        global_average_pooling: True\n"
    )
    loaded = load_controlnet(path)
    assert loaded.config.global_pool_conditions is True


def _broken(nets, tmp_path, edit, name: str = "cn.safetensors"):
    state = original_layout(nets[0], "control_model.")
    edit(state)
    path = tmp_path / name
    save_file(state, path)
    return path


def test_bad_files_give_one_line_errors(nets, tmp_path) -> None:
    def drop(state):
        del state["control_model.zero_convs.3.0.weight"]

    def extra(state):
        state["control_model.zero_convs.9.0.weight"] = torch.zeros(1)

    def reshape(state):
        state["control_model.middle_block_out.0.bias"] = torch.zeros(3)

    cases = [
        (drop, "1 missing key: control_model.zero_convs.3.0.weight"),
        (extra, "1 unexpected key: control_model.zero_convs.9.0.weight"),
        (reshape, r"control_model.middle_block_out.0.bias is \(3,\), expected \(64,\)"),
    ]
    for edit, message in cases:
        with pytest.raises(ModelLoadError, match=message) as info:
            load_controlnet(_broken(nets, tmp_path, edit))
        assert "\n" not in str(info.value)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_controlnet(garbage)
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2)}, other)
    with pytest.raises(ModelLoadError, match="not a ControlNet"):
        load_controlnet(other)
    diffusers_keys = tmp_path / "alone" / "weights.safetensors"
    diffusers_keys.parent.mkdir()
    save_file({k: v.contiguous() for k, v in nets[0].state_dict().items()}, diffusers_keys)
    with pytest.raises(ModelLoadError, match=r"need their config.json"):
        load_controlnet(diffusers_keys)
    with pytest.raises(ModelLoadError, match="no such file"):
        load_controlnet(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"config.json"):
        load_controlnet(tmp_path / "empty")


def test_pickles_are_refused_unless_allowed(nets, tmp_path) -> None:
    path = tmp_path / "control_v11p_sd15_tiny.pth"
    torch.save(original_layout(nets[0]), path)
    with pytest.raises(PickleRefusedError, match="pickled"):
        load_controlnet(path)
    _assert_same_outputs(load_controlnet(path, allow_pickle=True), nets[0])


# --- sampling with ControlNets ---------------------------------------------------------------


def _hint(kind: str) -> torch.Tensor:
    rng = np.random.default_rng(5)
    arr = np.zeros((SIZE, SIZE, 3), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, SIZE - 20, 2)
        arr[y : y + 20, x : x + 20] = rng.integers(60, 256, 3)
    image = preprocess(kind, Image.fromarray(arr))
    return hint_from_image(image, SIZE, SIZE)


def _embeddings(seed: int) -> torch.Tensor:
    return torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(seed))


def _noise(batch: int) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(7))


def run_diffusers(bundle, nets, hints, steps, cfg, batch, **control) -> torch.Tensor:
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", timestep_spacing="linspace",
    )  # fmt: skip
    single = len(nets) == 1
    pipe = StableDiffusionControlNetPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
        unet=bundle.unet, controlnet=nets[0] if single else list(nets), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    # diffusers multiplies given latents by init_noise_sigma (= sigma_max for linspace spacing)
    return pipe(
        prompt_embeds=_embeddings(1), negative_prompt_embeds=_embeddings(2),
        image=hints[0] if single else list(hints), num_inference_steps=steps,
        guidance_scale=cfg, num_images_per_prompt=batch, latents=_noise(batch),
        output_type="latent", **control,
    ).images  # fmt: skip


def run_emaki(bundle, units, steps, cfg, batch) -> torch.Tensor:
    schedule = DiscreteSchedule(bundle.alphas_cumprod)
    sigmas = make_sigmas(schedule, "uniform", steps)
    controlled = ControlledUNet(bundle.unet, units, steps)
    denoiser = CFGDenoiser(DiscreteDenoiser(controlled, schedule, bundle.prediction_type), cfg)
    cond = GuidedCond(Conditioning(_embeddings(1)), Conditioning(_embeddings(2)))
    x = _noise(batch) * sigmas[0]
    sampler = get_sampler("Euler")
    return sampler(denoiser, x, sigmas, cond=cond, callback=controlled.on_step)


CASES = {
    "plain": dict(scales=[1.0], starts=[0.0], ends=[1.0], guess=False, cfg=6.0, batch=1),
    "scale and window": dict(scales=[0.6], starts=[0.2], ends=[0.7], guess=False, cfg=6.0, batch=2),
    "two units": dict(scales=[1.0, 0.7], starts=[0.0, 0.3], ends=[0.8, 1.0], guess=False, cfg=5.0, batch=1),
    "guess mode": dict(scales=[0.8], starts=[0.0], ends=[1.0], guess=True, cfg=4.0, batch=2),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_controlnet_pipeline(sd1, nets, case: str) -> None:
    """Same UNet, ControlNets, embeddings, Euler steps, noise and hints as diffusers."""
    c = CASES[case]
    n = len(c["scales"])
    hints = [_hint("canny"), _hint("soft_edge")][:n]
    units = [
        ControlUnit(net, hint, scale, start, end, c["guess"])
        for net, hint, scale, start, end in zip(
            nets, hints, c["scales"], c["starts"], c["ends"], strict=False
        )
    ]
    steps = 6
    with torch.no_grad():
        ours = run_emaki(sd1, units, steps, c["cfg"], c["batch"])
        theirs = run_diffusers(
            sd1, nets[:n], hints, steps, c["cfg"], c["batch"],
            controlnet_conditioning_scale=c["scales"][0] if n == 1 else c["scales"],
            control_guidance_start=c["starts"][0] if n == 1 else c["starts"],
            control_guidance_end=c["ends"][0] if n == 1 else c["ends"],
            guess_mode=c["guess"],
        )  # fmt: skip
        plain = run_emaki(sd1, [], steps, c["cfg"], c["batch"])
    diff = float((ours - theirs).abs().max())
    scale = float(theirs.abs().max())
    effect = float((ours - plain).abs().max())
    print(f"{case}: max |emaki - diffusers| = {diff:.2e} (latent scale {scale:.1f}), "
          f"control effect {effect:.2e}")  # fmt: skip
    assert diff < REL_TOL * scale, f"max abs diff {diff:.2e} at latent scale {scale:.1f}"
    assert effect > 1e-3 * scale, "the ControlNet has no visible effect: a vacuous comparison"


def test_step_window_follows_diffusers_rule(nets) -> None:
    unit = ControlUnit(nets[0], torch.zeros(1, 3, SIZE, SIZE), start=0.2, end=0.7)
    assert [i for i in range(10) if unit.active_at(i, 10)] == [2, 3, 4, 5, 6]
    controlled = ControlledUNet(None, [unit], total_steps=10)
    seen = []
    for i in range(10):
        seen.append(bool(controlled.active_units()))
        controlled.on_step(StepInfo(i, 10, 1.0, torch.zeros(1), torch.zeros(1)))
    assert [i for i, active in enumerate(seen) if active] == [2, 3, 4, 5, 6]


def test_zero_weight_and_all_negative_guess_mode_leave_the_unet_alone(sd1, nets) -> None:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 500.0])
    cond = Conditioning(torch.cat([_embeddings(1), _embeddings(2)]))
    hint = _hint("canny")
    with torch.no_grad():
        plain = sd1.unet(x, t, encoder_hidden_states=cond.context).sample
        zero = ControlledUNet(sd1.unet, [ControlUnit(nets[0], hint, 0.0)], 4)(x, t, cond)
        guess = ControlUnit(nets[0], hint, guess_mode=True)
        negative = ControlledUNet(sd1.unet, [guess], 4)(x, t, cond.as_negative())
        mixed = Conditioning(cond.context, torch.tensor([False, True]))
        half = ControlledUNet(sd1.unet, [guess], 4)(x, t, mixed)
    assert torch.equal(zero, plain)
    assert torch.equal(negative, plain)
    assert not torch.allclose(half[0], plain[0]) and torch.allclose(half[1], plain[1], atol=1e-6)


def test_unit_and_hint_errors(sd1, nets) -> None:
    hint = _hint("canny")
    with pytest.raises(InvalidRequestError, match="0 <= start < end <= 1"):
        ControlUnit(nets[0], hint, start=0.8, end=0.3)
    with pytest.raises(InvalidRequestError, match=r"\[1, 3, H, W\]"):
        ControlUnit(nets[0], hint[0])
    with pytest.raises(InvalidRequestError, match=r"values in \[0, 1\]"):
        ControlUnit(nets[0], hint * 255)
    unit = ControlUnit(nets[0], hint_from_image(Image.new("RGB", (48, 64)), 48, 64))
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(InvalidRequestError, match="is 48x64, but this generation needs 64x64"):
        ControlledUNet(sd1.unet, [unit], 4)(x, torch.tensor([1.0]), Conditioning(_embeddings(1)))
    resized = hint_from_image(Image.new("RGB", (100, 30), (255, 0, 0)), SIZE, 32, resize_mode=1)
    assert resized.shape == (1, 3, 32, SIZE) and float(resized[0, 0].min()) == 1.0
