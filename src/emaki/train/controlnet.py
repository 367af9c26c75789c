"""Training a ControlNet (Zhang et al. 2023) for a trained model: ``kind = "controlnet"``.

The base model (``model.base``) stays frozen; the ControlNet starts as a copy of its UNet's
encoder whose outputs pass through zero-initialised convolutions (diffusers'
``ControlNetModel.from_unet``), so at step 0 the controlled model is exactly the base model, and
it learns to add residuals that make the base follow a control image. Each training image's
control image is made by the recipe's preprocessor (Canny edges, scribbles, ...) from the same
centre-cropped picture that its cached latent encodes, so the pair is aligned pixel for pixel;
the control images are computed once and cached in the run folder like the latents and text
states. The loss is the base model's denoising loss with the ControlNet's residuals added, so
gradients flow through the frozen UNet into the ControlNet only. As in the paper, a high
``data.caption_dropout`` (0.5) makes the ControlNet learn to read the image's content from the
control image alone.

Exported as a diffusers ``ControlNetModel`` folder, which ``--control model=PATH`` loads.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel
from PIL import Image

from emaki.errors import EmakiError
from emaki.models.files import atomic_write_file, atomic_write_folder
from emaki.train.data import load_fitted
from emaki.train.recipe import ControlNetModelConfig, Recipe, RecipeError
from emaki.train.tasks import UNetTask


def _check_preprocessor(name: str) -> None:
    from emaki.control.preprocess import preprocess

    try:
        preprocess(name, Image.new("RGB", (8, 8)))
    except EmakiError as e:
        raise RecipeError(f"model.preprocessor: {e}") from e


def load_controlnet_init(controlnet: ControlNetModel, folder: Path) -> None:
    """Start from a ControlNet folder's weights (``model.init``); it must have the same shapes."""
    from emaki.control.model import load_controlnet

    try:
        other = load_controlnet(folder, dtype=torch.float32)
    except EmakiError as e:
        raise RecipeError(f"model.init = {str(folder)!r}: {e}") from e
    own, theirs = controlnet.state_dict(), other.state_dict()
    for key, t in own.items():
        if key not in theirs or theirs[key].shape != t.shape:
            raise RecipeError(
                f"model.init = {str(folder)!r} does not fit this base model's ControlNet: "
                f"{key!r} is {'missing' if key not in theirs else 'of another shape'}"
            )
    controlnet.load_state_dict(theirs)


class ControlNetTask(UNetTask):
    """The ControlNet of a frozen base model, on cached latents, text states and control images."""

    def __init__(self, recipe: Recipe, accelerator: Any) -> None:
        assert isinstance(recipe.model, ControlNetModelConfig)
        from emaki.models.loading import load_model

        self.recipe = recipe
        self.cfg = cfg = recipe.model
        self.device = accelerator.device
        self.run_dir = Path(recipe.output)
        if not (Path(cfg.base) / "model_index.json").is_file():
            raise RecipeError(
                f"model.base = {str(cfg.base)!r} is not a model folder (a diffusers pipeline "
                "folder, e.g. src/emaki/default_model)"
            )
        _check_preprocessor(cfg.preprocessor)
        self.base = load_model(cfg.base)
        self.vae = self.base.vae.eval().requires_grad_(False).to(self.device)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        hint_factor = 2 ** (len(cfg.conditioning_channels) - 1)
        if hint_factor != self.vae_factor:
            raise RecipeError(
                f"model.conditioning_channels has {len(cfg.conditioning_channels)} widths, so the "
                f"hint encoder downsamples {hint_factor}x, but the base VAE's factor is "
                f"{self.vae_factor}x: give {self.vae_factor.bit_length()} widths"
            )
        self.tokenizer, self.text_encoder = self.base.tokenizer, self.base.text_encoder
        self.text_encoder.requires_grad_(False)
        self.text_id = f"{cfg.base}:{self.base.hash}"
        self.unet = self.base.unet.eval().requires_grad_(False).to(self.device)
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        self.data = self.batches(recipe, accelerator, multiple=self.vae_factor * unet_factor)
        torch.manual_seed(recipe.train.seed)
        self.controlnet = ControlNetModel.from_unet(
            self.unet, conditioning_embedding_out_channels=tuple(cfg.conditioning_channels)
        ).to(self.device)
        if cfg.init:
            load_controlnet_init(self.controlnet, Path(cfg.init))
        if recipe.train.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        self.controlnet.train().requires_grad_(True)
        self.scheduler = dict(self.base.scheduler_config)
        self.prediction_type = self.base.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise RecipeError(
                f"model.base predicts {self.prediction_type!r}; ControlNets train for epsilon "
                "or v_prediction models"
            )
        self.min_snr_gamma = cfg.min_snr_gamma
        self.noise_offset = cfg.noise_offset
        self._prepare_caches()
        self._hints: dict[tuple[int, int, int], torch.Tensor] = {}
        self._cache_hints()

    # control images ------------------------------------------------------------------------------

    def control_image(self, i: int, size: tuple[int, int]) -> Image.Image:
        """Record ``i``'s control image at ``size``: the preprocessor on its centre crop."""
        from emaki.control.preprocess import preprocess

        arr = load_fitted(
            Path(self.recipe.data.path) / self.data.records[i].file, size, None, False
        )
        return preprocess(self.cfg.preprocessor, Image.fromarray(arr)).convert("RGB")

    def _hint(self, i: int, size: tuple[int, int]) -> torch.Tensor:
        key = (i, *size)
        if key not in self._hints:
            arr = np.asarray(self.control_image(i, size), dtype=np.uint8)
            self._hints[key] = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        return self._hints[key]

    def _cache_hints(self) -> None:
        """Every record's control image at its bucket, computed once and kept in the run folder."""
        from safetensors.torch import load_file, save_file

        size_of = self.bucket_sizes()
        path = self._cache_file(
            "hints", self.manifest_sha(), self.cfg.preprocessor, self.recipe.data.resolution,
            self.recipe.data.bucketing,
        )  # fmt: skip
        if path.is_file():
            for key, t in load_file(str(path)).items():
                i, w, h = (int(x) for x in key.split("_"))
                self._hints[(i, w, h)] = t
            return
        from tqdm import tqdm

        ids = sorted(size_of)
        for i in tqdm(ids, desc="control images", unit="img", disable=len(ids) < 64):
            self._hint(i, size_of[i])
        tensors = {f"{i}_{w}_{h}": t for (i, w, h), t in self._hints.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp)), overwrite=True)

    # the Task protocol ---------------------------------------------------------------------------

    def module(self) -> torch.nn.Module:
        return self.controlnet

    def next_batch(self) -> dict[str, Any]:
        batch = super().next_batch()
        ids, size = batch["ids"], batch["size"]
        batch["hint"] = torch.stack([self._hint(i, size) for i in ids]).float() / 255.0
        return batch

    def loss(
        self, module: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator
    ) -> torch.Tensor:
        p = self.noised(batch, generator)
        down, mid = module(
            p["noisy"], p["t"], encoder_hidden_states=p["cond"],
            controlnet_cond=batch["hint"].to(self.device), return_dict=False,
        )  # fmt: skip
        pred = self.unet(
            p["noisy"], p["t"], encoder_hidden_states=p["cond"],
            down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid,
        ).sample  # fmt: skip
        return self.weighted_loss(pred, p)

    def sample_ids(self, count: int = 4) -> list[int]:
        """Records spread evenly over the dataset, the same at every sampling."""
        n = len(self.data.records)
        return sorted({round(k * (n - 1) / max(count - 1, 1)) for k in range(count)})

    def samples(self, module: torch.nn.Module) -> tuple[list[Image.Image], list[str]]:
        """For a few training images: the control image, then the base model guided by it."""
        from emaki.pipelines.txt2img import Pipeline
        from emaki.request import ControlNetUnit, GenerationRequest

        res = self.recipe.data.resolution
        images: list[Image.Image] = []
        labels: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:  # a models folder with this ControlNet
            module.eval()
            module.save_pretrained(str(Path(tmp) / "controlnet" / "training"))
            pipe = Pipeline(self.base, models=Path(tmp))
            for k, i in enumerate(self.sample_ids()):
                control = self.control_image(i, (res, res))
                caption = self.data.records[i].caption
                unit = ControlNetUnit(model="training", image=control, module="none", resize_mode=0)
                req = GenerationRequest(
                    prompt=caption, steps=self.recipe.log.sample_steps,
                    cfg_scale=self.recipe.log.sample_cfg, seed=k, width=res, height=res,
                    sampler="DPM++ 2M", schedule="karras", control=(unit,),
                )  # fmt: skip
                images += [control, *pipe.generate(req).images]
                labels += [f"control: {caption}", caption]
        module.train()
        return images, labels

    def export(self, module: torch.nn.Module, dest: Path) -> Path:
        """A diffusers ``ControlNetModel`` folder (config and safetensors weights)."""

        def write(tmp: Path) -> None:
            module.save_pretrained(str(tmp))
            info = {"recipe": self.recipe.source, "base": str(self.cfg.base),
                    "base_hash": self.base.hash, "preprocessor": self.cfg.preprocessor}  # fmt: skip
            (tmp / "training.json").write_text(json.dumps(info, indent=1))

        module.eval()
        return atomic_write_folder(Path(dest), write, overwrite=True)
