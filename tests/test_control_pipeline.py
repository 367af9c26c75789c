"""ControlNet through the pipeline: models folder, preprocessing, windows, hires, infotext, errors.

The sampling-level comparison with diffusers is in test_control.py; here the whole txt2img job
(prompt text, seed, Euler with uniform spacing, decode) is compared with diffusers'
StableDiffusionControlNetPipeline on the same weights and control image.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image, ImageDraw

from emaki.cli import main
from emaki.control import hint_from_image, preprocess
from emaki.errors import InvalidRequestError, ModelLoadError
from emaki.imageio import read_infotext
from emaki.models.saving import save_diffusers
from emaki.models.tiny import make_tiny_bundle
from emaki.pipelines.txt2img import Pipeline
from emaki.request import ControlNetUnit, GenerationRequest, HiresFix, InitImage
from test_img2img import reference_pipeline, tiny_inpainting_bundle

from test_control import tiny_controlnet

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    bundle = make_tiny_bundle("sd1", seed=0)
    models = tmp_path_factory.mktemp("models")
    net = tiny_controlnet(bundle.unet, 1)
    net.save_pretrained(models / "controlnet" / "edges")
    return bundle, net, models, Pipeline(bundle, models=models)


def _drawing(size: int = SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 12, 40, 50], fill=(200, 30, 30))
    draw.ellipse([30, 8, 58, 36], fill=(30, 60, 200))
    return image


def _request(**control) -> GenerationRequest:
    unit = ControlNetUnit(model="edges", image=_drawing(), module="canny", **control)
    return GenerationRequest(
        prompt="a red apple", negative_prompt="blurry", sampler="Euler", schedule="uniform",
        steps=6, cfg_scale=6.0, seed=1234, width=SIZE, height=SIZE, control=(unit,),
    )  # fmt: skip


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    ("control", "diffusers_args"),
    [
        ({}, {}),
        (
            {"weight": 0.7, "guidance_start": 0.2, "guidance_end": 0.8},
            {
                "controlnet_conditioning_scale": 0.7,
                "control_guidance_start": 0.2,
                "control_guidance_end": 0.8,
            },
        ),
        ({"control_mode": 2}, {"guess_mode": True}),
    ],
)
def test_pipeline_matches_diffusers_controlnet_pipeline(setup, control, diffusers_args) -> None:
    bundle, net, _, pipe = setup
    ours = pipe.generate(_request(**control)).images[0]
    plain = pipe.generate(replace(_request(), control=())).images[0]
    ref = reference_pipeline(StableDiffusionControlNetPipeline, bundle, controlnet=net)
    hint = hint_from_image(preprocess("canny", _drawing()), SIZE, SIZE)
    noise = torch.randn((4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(1234))
    theirs = ref(
        "a red apple", negative_prompt="blurry", image=hint, num_inference_steps=6,
        guidance_scale=6.0, latents=noise[None], output_type="pil", **diffusers_args,
    ).images[0]  # fmt: skip
    diff = np.abs(_pixels(ours) - _pixels(theirs))
    assert diff.max() <= 1, f"max pixel diff {diff.max()}"
    # the effect exceeds the comparison's tolerance, so the comparison is not vacuous
    assert np.abs(_pixels(ours) - _pixels(plain)).max() > 1, "the ControlNet had no effect"


def test_control_modes_and_zero_weight(setup) -> None:
    _, _, _, pipe = setup
    plain = _pixels(pipe.generate(replace(_request(), control=())).images[0])
    zero = _pixels(pipe.generate(_request(weight=0.0)).images[0])
    assert np.array_equal(zero, plain)
    full = _pixels(pipe.generate(_request()).images[0])
    soft = _pixels(pipe.generate(_request(control_mode=1)).images[0])
    # "My prompt is more important" scales the residuals down: between no control and full
    assert 0 < np.abs(soft - plain).mean() < np.abs(full - plain).mean()


def test_hires_pass_gets_the_control_image_at_its_size(setup) -> None:
    _, _, _, pipe = setup
    req = replace(_request(), hires=HiresFix(scale=2.0, steps=3, denoising_strength=0.5))
    res = pipe.generate(req)
    assert res.images[0].size == (2 * SIZE, 2 * SIZE)


def test_infotext_names_the_units(setup) -> None:
    _, _, _, pipe = setup
    text = pipe.generate(_request(weight=0.5, control_mode=2)).infotexts[0]
    assert (
        'ControlNet 0: "Module: canny, Model: edges, Weight: 0.5, Resize Mode: Crop and resize, '
        'Guidance Start: 0.0, Guidance End: 1.0, Control Mode: ControlNet is more important"'
    ) in text


def test_errors_name_the_problem(setup) -> None:
    _, _, _, pipe = setup
    with pytest.raises(ModelLoadError, match="no controlnet model named 'nope'"):
        pipe.generate(replace(_request(), control=(replace(_request().control[0], model="nope"),)))
    with pytest.raises(InvalidRequestError, match="start and end"):
        pipe.generate(_request(guidance_start=0.8, guidance_end=0.2))
    with pytest.raises(InvalidRequestError, match="unknown ControlNet preprocessor"):
        pipe.generate(replace(_request(), control=(replace(_request().control[0], module="x"),)))
    with pytest.raises(InvalidRequestError, match="control mode"):
        pipe.generate(_request(control_mode=5))


def test_cli_control_flag(setup, tmp_path, capsys, monkeypatch) -> None:
    bundle, _, models, _ = setup
    monkeypatch.setenv("EMAKI_MODELS", str(models))
    model = save_diffusers(bundle, tmp_path / "m")
    _drawing().save(tmp_path / "drawing.png")
    out = tmp_path / "out"
    argv = ["generate", "a red apple", "--model", str(model), "--steps", "3", "--seed", "3",
            "--width", "64", "--height", "64", "--out", str(out),
            "--control", f"model=edges,image={tmp_path / 'drawing.png'},module=canny,weight=0.8,"
                         "low=50"]  # fmt: skip
    assert main(argv) == 0
    (png,) = out.glob("*.png")
    unit = read_infotext(png).params["ControlNet 0"]
    assert unit.startswith("Module: canny, Model: edges, Weight: 0.8") and "low: 50" in unit
    capsys.readouterr()
    assert main([*argv[:-1], "model=edges,weight=0.8"]) == 2
    assert "--control needs image=" in capsys.readouterr().err
    assert main([*argv[:-1], f"model=edges,image={tmp_path / 'drawing.png'},weight=x"]) == 2
    assert "weight" in capsys.readouterr().err


def test_server_native_job_with_a_controlnet(setup, tmp_path) -> None:
    """A queued job carries its ControlNet unit (image stored as an upload) and runs it."""
    import base64
    import io
    import time

    from fastapi.testclient import TestClient

    from emaki.server.app import create_app
    from emaki.server.config import Limits, ServerConfig

    _, _, _, pipe = setup
    buf = io.BytesIO()
    _drawing().save(buf, format="PNG")
    unit = {"model": "edges", "image": base64.b64encode(buf.getvalue()).decode(),
            "module": "canny", "weight": 0.5}  # fmt: skip
    config = ServerConfig(home=tmp_path / "server", limits=Limits(max_upload_bytes=2_000_000))
    with TestClient(create_app(config, pipe)) as client:
        body = {"prompt": "a red apple", "steps": 2, "width": SIZE, "height": SIZE, "seed": 1}
        job = client.post("/api/jobs", json={**body, "control": [unit]}).json()
        deadline = time.time() + 60
        while client.get(f"/api/jobs/{job['id']}").json()["state"] not in ("done", "failed"):
            assert time.time() < deadline
            time.sleep(0.05)
        done = client.get(f"/api/jobs/{job['id']}").json()
        assert done["state"] == "done", done
        assert "ControlNet 0" in str(done)
        bad = client.post("/api/jobs", json={**body, "control": [{"model": "edges"}]})
        assert bad.status_code == 400 and "base64 'image'" in bad.json()["detail"]


# -- sd-webui-controlnet compatibility: its API units, its infotext, --from ----------------------


def test_webui_api_units_map_onto_emaki_units() -> None:
    from emaki.control.webui import units_from_api

    drawing, init = _drawing(), Image.new("RGB", (SIZE, SIZE), "gray")
    seen: list[str] = []

    def decode(text: str, what: str) -> Image.Image:
        seen.append(f"{what}={text}")
        return drawing

    args = [
        {"enabled": True, "image": "AAA", "module": "canny", "model": "edges [d14c016b]",
         "threshold_a": 50, "threshold_b": 150, "weight": 0.6, "guidance_start": 0.1,
         "guidance_end": 0.9, "control_mode": "My prompt is more important",
         "resize_mode": "Just Resize", "pixel_perfect": True, "processor_res": 512},
        {"enabled": False, "image": "BBB", "module": "canny", "model": "edges"},
        {"input_image": {"image": "CCC", "mask": None}, "module": "softedge_pidinet",
         "model": "edges", "threshold_a": -1, "guessmode": True, "resize_mode": 2},
        {"module": "canny", "model": "edges", "threshold_a": -1, "threshold_b": -1},
    ]  # fmt: skip
    first, second, third = units_from_api({"ControlNet": {"args": args}}, decode, init)
    assert seen == ["ControlNet unit 0 image=AAA", "ControlNet unit 2 image=CCC"]
    assert (first.model, first.module, first.module_options) == (
        "edges",
        "canny",
        {"low": 50.0, "high": 150.0},
    )
    assert (first.weight, first.guidance_start, first.guidance_end) == (0.6, 0.1, 0.9)
    assert (first.control_mode, first.resize_mode) == (1, 0)
    assert (second.module, second.module_options, second.control_mode) == ("soft_edge", {}, 2)
    assert second.resize_mode == 2 and second.image is drawing
    assert third.image is init and third.module_options == {}  # -1: the preprocessor's default
    assert units_from_api({"controlnet": {"args": []}}, decode) == ()


@pytest.mark.parametrize(
    ("unit", "needle"),
    [
        ({"image": "A", "module": "depth_midas", "model": "edges"}, "unknown ControlNet module"),
        ({"image": "A", "module": "canny", "model": "None"}, "needs a model"),
        ({"module": "canny", "model": "edges"}, "needs an image"),
        ({"image": {"image": "A", "mask": "B"}, "model": "edges"}, "masks are not supported"),
        ({"image": "A", "model": "edges", "control_mode": "Loud"}, "unknown ControlNet control"),
        ({"image": "A", "model": "edges", "weight": "x"}, "weight must be a number"),
        ({"image": "A", "model": "edges", "hr_option": "High res only"}, "hr_option"),
        ("a positional list", "must be an object"),
    ],
)
def test_webui_api_unit_errors_name_the_problem(unit, needle) -> None:
    from emaki.control.webui import units_from_api

    with pytest.raises(InvalidRequestError, match=needle):
        units_from_api({"controlnet": {"args": [unit]}}, lambda text, what: _drawing())


def test_infotext_units_read_back_from_emaki_and_from_the_extension(setup) -> None:
    from emaki.control.webui import units_from_infotext
    from emaki.infotext import parse_infotext

    _, _, _, pipe = setup
    made = replace(_request().control[0], module_options={"low": 40, "sigma": 1.5}, weight=0.7,
                   guidance_end=0.6, control_mode=1, resize_mode=2)  # fmt: skip
    result = pipe.generate(replace(_request(), control=(made,)))
    info = parse_infotext(result.infotexts[0])
    (back,) = units_from_infotext(info.params)
    assert back == replace(made, image=None, module_options={"low": 40, "sigma": 1.5})
    extension = {"ControlNet 0": "Module: canny, Model: control_v11p_sd15_canny [d14c016b], "
                 "Weight: 1, Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, "
                 "Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, Pixel "
                 "Perfect: False, Control Mode: ControlNet is more important, Hr Option: Both"}  # fmt: skip
    (unit,) = units_from_infotext(extension)
    assert (unit.model, unit.module, unit.module_options) == (
        "control_v11p_sd15_canny", "canny", {"low": 100.0, "high": 200.0})  # fmt: skip
    assert (unit.control_mode, unit.resize_mode, unit.image) == (2, 1, None)


def test_from_recreates_a_controlnet_image_given_its_control_image(setup, tmp_path, capsys,
                                                                   monkeypatch) -> None:  # fmt: skip
    bundle, _, models, _ = setup
    monkeypatch.setenv("EMAKI_MODELS", str(models))
    model = save_diffusers(bundle, tmp_path / "m")
    _drawing().save(tmp_path / "drawing.png")
    first, again = tmp_path / "first", tmp_path / "again"
    common = ["--model", str(model), "--steps", "3", "--width", "64", "--height", "64"]
    assert main(["generate", "a red apple", *common, "--seed", "5", "--out", str(first),
                 "--control", f"model=edges,image={tmp_path / 'drawing.png'},module=canny,"
                              "weight=0.8,mode=2,low=50"]) == 0  # fmt: skip
    (png,) = first.glob("*.png")
    capsys.readouterr()
    assert main(["generate", "--from", str(png), *common, "--out", str(again)]) == 2
    err = capsys.readouterr().err
    assert "1 ControlNet unit(s) (0: model edges, module canny)" in err and "--control-image" in err
    assert main(["generate", "--from", str(png), *common, "--out", str(again),
                 "--control-image", str(tmp_path / "drawing.png")]) == 0  # fmt: skip
    (png2,) = again.glob("*.png")
    assert np.array_equal(_pixels(Image.open(png)), _pixels(Image.open(png2)))
    assert read_infotext(png2).params["ControlNet 0"] == read_infotext(png).params["ControlNet 0"]
    assert main(["generate", "x", *common, "--out", str(again), "--control-image", str(png)]) == 2
    assert "this image has none" in capsys.readouterr().err


def test_a1111_api_runs_controlnet_units_like_the_pipeline(setup, tmp_path) -> None:
    """``alwayson_scripts.controlnet`` gives the pipeline's image for the same unit; the
    extension's model and module routes list what emaki has; other scripts stay refused."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from emaki.server.app import create_app
    from emaki.server.config import Limits, ServerConfig

    _, _, _, pipe = setup
    buf = io.BytesIO()
    _drawing().save(buf, format="PNG")
    unit = {"enabled": True, "image": base64.b64encode(buf.getvalue()).decode(),
            "module": "canny", "model": "edges", "weight": 0.9, "control_mode": "Balanced",
            "resize_mode": "Crop and Resize", "threshold_a": 100, "threshold_b": 200}  # fmt: skip
    req = _request(weight=0.9)
    body = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": req.steps,
            "sampler_name": "Euler", "scheduler": "uniform", "cfg_scale": req.cfg_scale,
            "seed": req.seed, "width": SIZE, "height": SIZE}  # fmt: skip
    expected = _pixels(pipe.generate(req).images[0])
    config = ServerConfig(home=tmp_path / "server", limits=Limits(max_upload_bytes=2_000_000))
    with TestClient(create_app(config, pipe)) as client:
        r = client.post("/sdapi/v1/txt2img",
                        json={**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}})  # fmt: skip
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert np.array_equal(_pixels(got.convert("RGB")), expected)
        assert "ControlNet 0" in got.info["parameters"]
        plain = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
        assert plain != r.json()["images"][0]
        assert client.get("/controlnet/model_list").json() == {"model_list": ["edges"]}
        assert "canny" in client.get("/controlnet/module_list").json()["module_list"]
        bad = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ADetailer": {}}})
        assert bad.status_code == 400 and "ADetailer" in bad.json()["detail"]
        bad = client.post("/sdapi/v1/txt2img", json={
            **body, "alwayson_scripts": {"controlnet": {"args": [{**unit, "module": "openpose"}]}}})  # fmt: skip
        assert bad.status_code == 400 and "openpose" in bad.json()["detail"]


# -- ControlNet with inpainting: inpainting models, "only masked" --------------------------------


def test_inpainting_model_with_a_controlnet_matches_diffusers(setup) -> None:
    """A 9-channel inpainting UNet with an ordinary ControlNet: the ControlNet sees the plain
    4-channel latent and the UNet the latent with the mask and the masked image, as in diffusers'
    StableDiffusionControlNetInpaintPipeline (everything masked, strength 1, same seed)."""
    from diffusers import StableDiffusionControlNetInpaintPipeline

    from emaki.latents import encode

    _, net, models, _ = setup
    bundle = tiny_inpainting_bundle()
    pipe = Pipeline(bundle, models=models)
    init = Image.new("RGB", (SIZE, SIZE), (90, 160, 220))
    mask = Image.new("L", (SIZE, SIZE), 255)
    req = replace(
        _request(), denoising_strength=1.0,
        init=InitImage(init, mask=mask, mask_blur=0, inpainting_fill=3),
    )  # fmt: skip
    ours = _pixels(pipe.generate(req).images[0])
    plain = _pixels(pipe.generate(replace(req, control=())).images[0])
    ref = reference_pipeline(StableDiffusionControlNetInpaintPipeline, bundle, controlnet=net)
    # the posterior mean of a contiguous tensor on both sides (see test_img2img.py)
    ref._encode_vae_image = lambda image, generator: encode(
        bundle.vae, image.contiguous(), pipe.latent_format, mean=True
    )
    hint = hint_from_image(preprocess("canny", _drawing()), SIZE, SIZE)
    theirs = _pixels(
        ref(
            "a red apple", negative_prompt="blurry", image=init, mask_image=mask,
            control_image=hint, strength=1.0, num_inference_steps=6, guidance_scale=6.0,
            controlnet_conditioning_scale=1.0,  # this pipeline's default is 0.5
            generator=torch.Generator().manual_seed(1234), output_type="pil",
        ).images[0]
    )  # fmt: skip
    assert np.abs(ours - theirs).max() <= 1, f"max pixel diff {np.abs(ours - theirs).max()}"
    assert np.abs(ours - plain).max() > 1, "the ControlNet had no effect"


def test_only_masked_inpainting_cuts_the_control_image_like_the_init_image(setup) -> None:
    """With "only masked" the control input is cut to the same region as the init image and
    brought to the generation size: the init image itself as the control image (module none)
    gives exactly the crop being generated; outside the mask the image is unchanged."""
    _, _, _, pipe = setup
    big = _drawing(128).resize((128, 96))
    mask = Image.new("L", big.size, 0)
    mask.paste(255, (70, 40, 100, 70))
    init = InitImage(big, mask=mask, mask_blur=0, inpaint_full_res=True,
                     inpaint_full_res_padding=8)  # fmt: skip
    unit = ControlNetUnit(model="edges", image=big, module="none")
    req = replace(_request(), init=init, denoising_strength=0.8, control=(unit,))
    r = pipe.resolve(req)
    state = pipe.init_state(r, pipe.bundle)
    assert state is not None and state.region is not None
    (got,) = pipe.control_units(r, pipe.bundle, r.width, r.height, state)
    assert torch.equal(got.hint, hint_from_image(state.image, SIZE, SIZE))
    # a control image of another size is first resized to the init image's size (its own
    # resize mode, here "just resize"), then cut the same way
    small = replace(unit, image=big.resize((64, 48)), resize_mode=0)
    (from_small,) = pipe.control_units(
        replace(r, request=replace(req, control=(small,))), pipe.bundle, r.width, r.height, state
    )
    assert np.abs(from_small.hint - got.hint).mean() < 0.1
    out = _pixels(pipe.generate(req).images[0])
    plain = _pixels(pipe.generate(replace(req, control=())).images[0])
    outside = _pixels(mask) == 0
    assert out.shape[:2] == (96, 128)
    assert np.array_equal(out[outside], _pixels(big)[outside])
    assert np.abs(out - plain)[~outside].max() > 1, "the ControlNet had no effect in the mask"


# -- ControlNet with MultiDiffusion: each window gets its part of the control image ---------------


def _wide_drawing() -> Image.Image:
    """128x64: the drawing and its mirror image, so that no two windows see the same hint."""
    wide = Image.new("RGB", (2 * SIZE, SIZE), "white")
    wide.paste(_drawing(), (0, 0))
    wide.paste(_drawing().transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(90), (SIZE, 0))
    return wide


@pytest.mark.parametrize("circular", [False, True])
@torch.no_grad()
def test_multidiffusion_gives_each_window_its_part_of_the_control_image(setup, circular) -> None:
    """One MultiDiffusion evaluation with a ControlNet equals its windows evaluated alone, each
    with its own columns of the hint (cut here by index, wrapping round for the circular
    window), averaged where they overlap."""
    from emaki.conditioning import Conditioning
    from emaki.control import ControlledUNet, ControlUnit
    from emaki.sampling.denoisers import DiscreteDenoiser
    from emaki.sampling.multidiffusion import MultiDiffusion

    bundle, net, _, pipe = setup
    g = torch.Generator().manual_seed(5)
    hint = torch.rand(1, 3, SIZE, 2 * SIZE, generator=g)  # every column different
    x = torch.randn(1, 4, 8, 16, generator=g) * 3
    sigma = torch.tensor([3.0])
    cond = Conditioning(torch.randn(1, 77, bundle.unet.config.cross_attention_dim, generator=g))

    def denoiser(h: torch.Tensor) -> tuple[DiscreteDenoiser, ControlledUNet]:
        controlled = ControlledUNet(bundle.unet, [ControlUnit(net, h)], total_steps=4)
        return DiscreteDenoiser(controlled, pipe.schedule, bundle.prediction_type), controlled

    def alone(left: int, hint_left: int) -> torch.Tensor:
        cols = [(left + j) % 16 for j in range(8)]
        own = hint[..., [(hint_left * 8 + j) % (2 * SIZE) for j in range(SIZE)]]
        return denoiser(own)[0](x[..., cols], sigma, cond)

    whole, controlled = denoiser(hint)
    md = MultiDiffusion(
        whole, window=8, stride=4, circular=circular, on_window=controlled.set_window
    )
    out = md(x, sigma, cond)
    assert controlled.window is None  # reset after the evaluation
    lefts = [0, 4, 8, 12] if circular else [0, 4, 8]
    acc, count = torch.zeros_like(x), torch.zeros(16)
    for left in lefts:
        cols = [(left + j) % 16 for j in range(8)]
        acc[..., cols] += alone(left, left)
        count[cols] += 1
    torch.testing.assert_close(out, acc / count, rtol=1e-6, atol=1e-6)
    # the crop matters: the middle window with the hint's first columns gives something else
    # (the tiny ControlNet's residuals are small, but far above the tolerance above)
    assert float((alone(4, 4) - alone(4, 0)).abs().max()) > 1e-4


def test_panorama_with_a_controlnet_through_the_pipeline(setup) -> None:
    from emaki.request import TiledDiffusion

    _, _, _, pipe = setup
    unit = ControlNetUnit(model="edges", image=_wide_drawing(), module="canny")
    req = replace(_request(), width=2 * SIZE, control=(unit,), tiled=TiledDiffusion())
    res = pipe.generate(req)
    plain = pipe.generate(replace(req, control=())).images[0]
    assert res.images[0].size == (2 * SIZE, SIZE)
    assert np.abs(_pixels(res.images[0]) - _pixels(plain)).max() > 1
    assert "ControlNet 0" in res.infotexts[0] and "MultiDiffusion: " in res.infotexts[0]
