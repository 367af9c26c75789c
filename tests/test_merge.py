"""Checkpoint merger: formulas recomputed with plain torch on the input files, A1111's rules.

References are independent of the merger: expected tensors come from ``safetensors.load_file``
of the inputs and the formulas written out here; loaded networks are compared with the tiny
bundles' own modules; hashes are recomputed with hashlib.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from emaki.errors import EmakiError, PickleRefusedError
from emaki.models import load_model, make_tiny_bundle, save_diffusers, save_single_file
from emaki.models.cli import register, run_merge, run_models
from emaki.models.merge import MergeSpec, merge_checkpoints
from emaki.models.saving import bundle_to_compvis

VAE = "first_stage_model."
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def private_models_root(tmp_path, monkeypatch):
    """Hash caching must never touch the user's real models folder."""
    monkeypatch.setenv("EMAKI_MODELS", str(tmp_path / "models-root"))


@pytest.fixture(scope="module")
def bundles():
    return {seed: make_tiny_bundle("sd1", seed=seed) for seed in (1, 2, 3, 9)}


@pytest.fixture(scope="module")
def files(bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    paths = {
        name: save_single_file(bundles[seed], root / f"{name}.safetensors")
        for name, seed in (("A", 1), ("B", 2), ("C", 3))
    }
    paths["B_folder"] = save_diffusers(bundles[2], root / "B-diffusers")
    paths["sd2"] = save_single_file(make_tiny_bundle("sd2", seed=4), root / "sd2.safetensors")
    return paths


def spec(method="weighted_sum", alpha=0.3, a=None, b=None, c=None, **kw) -> MergeSpec:
    return MergeSpec(method=method, alpha=alpha, a=a, b=b, c=c, **kw)


def weighted(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    return (1 - alpha) * a.float() + alpha * b.float()


def add_difference(a, b, c, alpha: float) -> torch.Tensor:
    return a.float() + alpha * (b.float() - c.float())


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and torch.allclose(
        actual.float(), expected.float(), rtol=1e-6, atol=1e-7
    )


def only_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- formulas --------------------------------------------------------------------------------


def test_weighted_sum_matches_the_formula(files, tmp_path):
    out = merge_checkpoints(spec(a=files["A"], b=files["B"]), tmp_path / "ws.safetensors")
    a, b, merged = load_file(files["A"]), load_file(files["B"]), load_file(out)
    assert merged.keys() == a.keys()
    for key, value in merged.items():
        assert value.dtype == a[key].dtype, key
        assert close(value, weighted(a[key], b[key], 0.3)), key


def test_add_difference_matches_the_formula(files, tmp_path):
    out = merge_checkpoints(
        spec("add_difference", 0.7, files["A"], files["B"], files["C"]),
        tmp_path / "ad.safetensors",
    )
    a, b, c, merged = (load_file(p) for p in (files["A"], files["B"], files["C"], out))
    assert merged.keys() == a.keys()
    for key, value in merged.items():
        assert close(value, add_difference(a[key], b[key], c[key], 0.7)), key


@pytest.mark.parametrize("alpha, source", [(0.0, "A"), (1.0, "B")])
def test_alpha_0_and_1_reproduce_a_and_b_exactly(files, tmp_path, alpha, source):
    out = merge_checkpoints(
        spec(alpha=alpha, a=files["A"], b=files["B"]), tmp_path / "x.safetensors"
    )
    expected, merged = load_file(files[source]), load_file(out)
    assert merged.keys() == expected.keys()
    for key, value in merged.items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key


def test_diffusers_folder_input_is_merged_in_compvis_keys(files, tmp_path):
    out = merge_checkpoints(spec(a=files["A"], b=files["B_folder"]), tmp_path / "f.safetensors")
    a, b, merged = load_file(files["A"]), load_file(files["B"]), load_file(out)
    assert merged.keys() == a.keys()
    for key, value in merged.items():
        assert close(value, weighted(a[key], b[key], 0.3)), key
    recipe = json.loads(safe_open(str(out), "pt").metadata()["sd_merge_recipe"])
    assert recipe["models"]["B"]["name"] == "B-diffusers"
    assert recipe["models"]["B"]["hash"] == load_model(files["B_folder"]).hash


def test_merged_file_loads_and_generates(files, bundles, tmp_path):
    from emaki.pipelines.txt2img import Pipeline
    from emaki.request import GenerationRequest

    out = merge_checkpoints(
        spec(alpha=0.25, a=files["A"], b=files["B"]), tmp_path / "g.safetensors"
    )
    merged = load_model(out)
    assert merged.family == "sd1"
    for part in ("unet", "vae", "text_encoder"):
        ours = getattr(merged, part).state_dict()
        sa = getattr(bundles[1], part).state_dict()
        sb = getattr(bundles[2], part).state_dict()
        for key, value in ours.items():
            if value.is_floating_point():
                assert close(value, weighted(sa[key], sb[key], 0.25)), f"{part}.{key}"
    pipe = Pipeline(merged)
    size = pipe.native_size
    request = GenerationRequest(prompt="a red apple", steps=2, seed=7, width=size, height=size)
    image = pipe.generate(request).images[0]
    assert image.size == (size, size)


def test_fp16_output(files, tmp_path):
    out = merge_checkpoints(
        spec(alpha=0.4, a=files["A"], b=files["B"], dtype="fp16"), tmp_path / "h.safetensors"
    )
    a, b, merged = load_file(files["A"]), load_file(files["B"]), load_file(out)
    for key, value in merged.items():
        if a[key].is_floating_point():
            assert value.dtype == torch.float16, key
            assert torch.equal(value, weighted(a[key], b[key], 0.4).half()), key
        else:
            assert torch.equal(value, a[key]), key
    assert load_model(out, dtype=None).unet.dtype == torch.float16


def test_no_interpolation_keeps_a_and_converts(files, tmp_path):
    out = merge_checkpoints(
        spec("no_interpolation", 0.0, files["A"], dtype="fp16"), tmp_path / "n.safetensors"
    )
    a, merged = load_file(files["A"]), load_file(out)
    assert merged.keys() == a.keys()
    for key, value in merged.items():
        expected = a[key].half() if a[key].is_floating_point() else a[key]
        assert value.dtype == expected.dtype and torch.equal(value, expected), key


# --- baked VAE -------------------------------------------------------------------------------


def test_bake_compvis_vae_file(files, bundles, tmp_path):
    vae_state = {
        k.removeprefix(VAE): v
        for k, v in bundle_to_compvis(bundles[9]).items()
        if k.startswith(VAE)
    }
    vae_file = tmp_path / "other.vae.safetensors"
    save_file(vae_state, str(vae_file))
    out = merge_checkpoints(
        spec(a=files["A"], b=files["B"], bake_vae=vae_file), tmp_path / "v.safetensors"
    )
    a, b, merged = load_file(files["A"]), load_file(files["B"]), load_file(out)
    vae_file_tensors = load_file(vae_file)
    assert merged.keys() == a.keys()
    for key, value in merged.items():
        if key.startswith(VAE):
            assert torch.equal(value, vae_file_tensors[key.removeprefix(VAE)]), key
        else:
            assert close(value, weighted(a[key], b[key], 0.3)), key
    recipe = json.loads(safe_open(str(out), "pt").metadata()["sd_merge_recipe"])
    assert recipe["bake_in_vae"] == "other.vae"
    assert recipe["vae"]["hash"] == hashlib.sha256(vae_file.read_bytes()).hexdigest()[:10]


def test_bake_diffusers_vae_file(files, bundles, tmp_path):
    """A diffusers-keyed VAE: the merged model's VAE module equals the source module exactly."""
    source = bundles[9].vae
    vae_file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(vae_file))
    out = merge_checkpoints(
        spec("no_interpolation", 0.0, files["A"], bake_vae=vae_file), tmp_path / "dv.safetensors"
    )
    loaded = load_model(out)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.vae.state_dict()[key], value), key
    for key, value in bundles[1].unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[key], value), key


def test_vae_that_does_not_fit_is_an_error(files, tmp_path):
    vae_state = {
        k.removeprefix(VAE): v for k, v in load_file(files["A"]).items() if k.startswith(VAE)
    }
    vae_state["decoder.conv_out.weight"] = torch.zeros(3, 7, 3, 3)
    vae_file = tmp_path / "bad-vae.safetensors"
    save_file(vae_state, str(vae_file))
    out = tmp_path / "out.safetensors"
    with pytest.raises(EmakiError, match=re.escape("decoder.conv_out.weight")) as info:
        merge_checkpoints(spec(a=files["A"], b=files["B"], bake_vae=vae_file), out)
    assert "\n" not in str(info.value) and not out.exists()


# --- metadata --------------------------------------------------------------------------------


def a1111_legacy_hash(path: Path) -> str:
    data = path.read_bytes()[0x100000 : 0x100000 + 0x10000]
    return hashlib.sha256(data).hexdigest()[:8]


def test_metadata_names_the_inputs_and_keeps_history(files, tmp_path):
    first = merge_checkpoints(
        spec("add_difference", 0.5, files["A"], files["B"], files["C"], discard="^model_ema\\."),
        tmp_path / "first.safetensors",
    )
    metadata = safe_open(str(first), "pt").metadata()
    sha = {name: hashlib.sha256(files[name].read_bytes()).hexdigest() for name in "ABC"}
    recipe = json.loads(metadata["sd_merge_recipe"])
    assert recipe["method"] == "add_difference" and recipe["interp_method"] == "Add difference"
    assert recipe["alpha"] == 0.5 == recipe["multiplier"]
    assert recipe["primary_model_hash"] == sha["A"]
    assert recipe["secondary_model_hash"] == sha["B"]
    assert recipe["tertiary_model_hash"] == sha["C"]
    assert recipe["models"] == {
        name: {"name": f"{name}.safetensors", "hash": sha[name][:10]} for name in "ABC"
    }
    assert recipe["dtype"] == "keep" and recipe["discard"] == "^model_ema\\."
    assert recipe["vae"] is None and recipe["emaki_version"]
    models = json.loads(metadata["sd_merge_models"])
    assert models == {
        sha[name]: {
            "name": f"{name}.safetensors",
            "legacy_hash": a1111_legacy_hash(files[name]),
            "sd_merge_recipe": None,
        }
        for name in "ABC"
    }
    assert metadata["emaki.family"] == "sd1" and metadata["format"] == "pt"

    second = merge_checkpoints(spec(a=first, b=files["B"]), tmp_path / "second.safetensors")
    history = json.loads(safe_open(str(second), "pt").metadata()["sd_merge_models"])
    first_sha = hashlib.sha256(first.read_bytes()).hexdigest()
    assert history[first_sha]["sd_merge_recipe"] == recipe
    assert set(history) == {first_sha, sha["A"], sha["B"], sha["C"]}


# --- A1111 key rules -------------------------------------------------------------------------


def test_inpainting_a_merged_with_a_normal_b(files, tmp_path):
    a = load_file(files["A"])
    conv = a[FIRST_CONV]
    extra = torch.randn(
        conv.shape[0], 5, *conv.shape[2:], generator=torch.Generator().manual_seed(1)
    )
    a[FIRST_CONV] = torch.cat([conv, extra], dim=1).contiguous()  # 9 channels, as SD inpainting
    inpaint = tmp_path / "inpaint.safetensors"
    save_file(a, str(inpaint))
    b = load_file(files["B"])
    out = merge_checkpoints(spec(alpha=0.5, a=inpaint, b=files["B"]), tmp_path / "m.safetensors")
    merged = load_file(out)
    assert merged[FIRST_CONV].shape == a[FIRST_CONV].shape
    assert close(merged[FIRST_CONV][:, :4], weighted(conv, b[FIRST_CONV], 0.5))
    assert torch.equal(merged[FIRST_CONV][:, 4:], extra)
    for key in a.keys() - {FIRST_CONV}:
        assert close(merged[key], weighted(a[key], b[key], 0.5)), key
    recipe = json.loads(safe_open(str(out), "pt").metadata()["sd_merge_recipe"])
    assert recipe["is_inpainting"] is True
    assert load_model(out).unet.config.in_channels == 9

    backwards = tmp_path / "backwards.safetensors"
    with pytest.raises(EmakiError, match="A must be the inpainting model") as info:
        merge_checkpoints(spec(alpha=0.5, a=files["B"], b=inpaint), backwards)
    assert FIRST_CONV in str(info.value) and not backwards.exists()


def test_ema_keys_follow_a1111(files, tmp_path):
    """model_ema.* is merged when A and B have it, copied when only A has it, dropped by discard."""

    def with_ema(path: Path, shift: float) -> dict[str, torch.Tensor]:
        tensors = load_file(path)
        ema = {
            "model_ema." + k.removeprefix("model.").replace(".", ""): v + shift
            for k, v in tensors.items()
            if k.startswith("model.diffusion_model.")
        }
        ema["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
        return tensors | ema

    a, b = with_ema(files["A"], 1.0), with_ema(files["B"], -1.0)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    both = load_file(
        merge_checkpoints(
            spec(alpha=0.3, a=tmp_path / "a.safetensors", b=tmp_path / "b.safetensors"),
            tmp_path / "both.safetensors",
        )
    )
    only_a = load_file(
        merge_checkpoints(
            spec(alpha=0.3, a=tmp_path / "a.safetensors", b=files["B"]), tmp_path / "oa.safetensors"
        )
    )
    ema_keys = [k for k in a if k.startswith("model_ema.") and a[k].is_floating_point()]
    assert ema_keys
    for key in ema_keys:
        assert close(both[key], weighted(a[key], b[key], 0.3)), key
        assert torch.equal(only_a[key], a[key]), key
    assert torch.equal(both["model_ema.num_updates"], a["model_ema.num_updates"])
    discarded = load_file(
        merge_checkpoints(
            spec(alpha=0.3, a=tmp_path / "a.safetensors", b=files["B"], discard="^model_ema\\."),
            tmp_path / "d.safetensors",
        )
    )
    assert discarded.keys() == load_file(files["A"]).keys()


def test_pickled_input_with_the_opt_in(files, tmp_path):
    ckpt = tmp_path / "b.ckpt"
    torch.save({"state_dict": load_file(files["B"])}, ckpt)
    out = tmp_path / "p.safetensors"
    with pytest.raises(PickleRefusedError, match="--allow-pickle") as info:
        merge_checkpoints(spec(a=files["A"], b=ckpt), out)
    assert "\n" not in str(info.value) and not out.exists()
    merge_checkpoints(spec(a=files["A"], b=ckpt), out, allow_pickle=True)
    a, b, merged = load_file(files["A"]), load_file(files["B"]), load_file(out)
    for key, value in merged.items():
        assert close(value, weighted(a[key], b[key], 0.3)), key


# --- errors ----------------------------------------------------------------------------------


def _shape_mismatch(files, tmp_path) -> MergeSpec:
    b = load_file(files["B"])
    key = "model.diffusion_model.out.2.bias"
    b[key] = torch.zeros(b[key].shape[0] + 1)
    save_file(b, str(tmp_path / "odd.safetensors"))
    return spec(a=files["A"], b=tmp_path / "odd.safetensors")


ERRORS = {
    "sd1 with sd2": (lambda f, t: spec(a=f["A"], b=f["sd2"]), "different families"),
    "weighted sum without B": (lambda f, t: spec(a=f["A"]), "second model"),
    "add difference without C": (
        lambda f, t: spec("add_difference", 0.5, f["A"], f["B"]),
        "third model",
    ),
    "shape mismatch": (_shape_mismatch, "model.diffusion_model.out.2.bias"),
    "missing input": (lambda f, t: spec(a=f["A"], b=t / "nope.safetensors"), "nope.safetensors"),
    "bad regex": (lambda f, t: spec(a=f["A"], b=f["B"], discard="(["), "regular expression"),
    "infinite alpha": (lambda f, t: spec(alpha=float("inf"), a=f["A"], b=f["B"]), "finite"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_and_leave_no_file(files, tmp_path, case):
    make, message = ERRORS[case]
    request = make(files, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(EmakiError, match=re.escape(message)) as info:
        merge_checkpoints(request, out_dir / "merged.safetensors")
    assert "\n" not in str(info.value)
    assert only_files(out_dir) == set()


def test_existing_destination_is_kept(files, tmp_path):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(EmakiError, match="already exists") as info:
        merge_checkpoints(spec(a=files["A"], b=files["B"]), out)
    assert "\n" not in str(info.value)
    assert out.read_bytes() == b"precious" and only_files(tmp_path) == {"exists.safetensors"}
    merge_checkpoints(spec(a=files["A"], b=files["B"]), out, overwrite=True)
    assert load_file(out).keys() == load_file(files["A"]).keys()


def test_output_must_be_safetensors(files, tmp_path):
    with pytest.raises(EmakiError, match=re.escape(".safetensors only")):
        merge_checkpoints(spec(a=files["A"], b=files["B"]), tmp_path / "out.ckpt")
    assert only_files(tmp_path) == set()


# --- CLI -------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emaki")
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_merge_and_models(files, tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    (root / "checkpoints").mkdir(parents=True)
    out = root / "checkpoints" / "mix.safetensors"
    args = parser().parse_args(
        ["merge", str(files["A"]), str(files["B"]), str(files["C"]), "--method", "add-difference",
         "--alpha", "0.5", "--fp16", "-o", str(out)]
    )  # fmt: skip
    assert run_merge(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    a, b, c, merged = (load_file(p) for p in (files["A"], files["B"], files["C"], out))
    for key, value in merged.items():
        if a[key].is_floating_point():
            assert torch.equal(value, add_difference(a[key], b[key], c[key], 0.5).half()), key

    # a model named in the models folder, merged with --method none
    args = parser().parse_args(
        ["merge", "mix", "--method", "none", "-o", str(tmp_path / "copy.safetensors")]
    )
    with pytest.raises(EmakiError, match="no such file"):  # the default root has no 'mix'
        run_merge(args)
    monkeypatch.setenv("EMAKI_MODELS", str(root))
    assert run_merge(args) == 0
    capsys.readouterr()
    copy = load_file(tmp_path / "copy.safetensors")
    assert copy.keys() == merged.keys() and all(torch.equal(copy[k], merged[k]) for k in copy)
    args = parser().parse_args(["models", "checkpoints", "--root", str(root), "--json", "--hashes"])
    assert run_models(args) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["models"] == [
        {
            "kind": "checkpoints",
            "name": "mix",
            "path": str(out),
            "size": out.stat().st_size,
            "hash": hashlib.sha256(out.read_bytes()).hexdigest()[:12],
        }
    ]
    assert run_models(parser().parse_args(["models", "--root", str(root)])) == 0
    text = capsys.readouterr().out
    assert "checkpoints/ (1)" in text and "mix" in text and "lora/ (0)" in text
