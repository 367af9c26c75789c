"""The recipe kinds as :class:`~emaki.train.loop.Task`\\ s: what each trains and how it is scored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from PIL import Image

from emaki.models.files import atomic_write_folder
from emaki.train.data import ImageBatches
from emaki.train.recipe import Recipe, VAEModelConfig


def make_task(recipe: Recipe, accelerator: Any) -> Any:
    if recipe.kind == "vae":
        return VAETask(recipe, accelerator)
    raise NotImplementedError(f"recipe kind {recipe.kind!r} is not trainable yet")


def vae_from_config(cfg: VAEModelConfig) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=64,
    )


def _to_pil(x: torch.Tensor) -> list[Image.Image]:
    arr = (
        ((x.float().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    return [Image.fromarray(a) for a in arr]


class VAETask:
    """The KL autoencoder from scratch: L1 reconstruction + KL (LDM's weighting) + optional edge L1.

    The loss is LDM's ``sum|x - x̂| / B + w·KL / B`` divided by the pixel count, so ``kl_weight``
    means what it means in the LDM configs (1e-6) while the reconstruction term reads as a mean L1.
    """

    def __init__(self, recipe: Recipe, accelerator: Any) -> None:
        assert isinstance(recipe.model, VAEModelConfig)
        self.recipe = recipe
        self.cfg = recipe.model
        torch.manual_seed(recipe.train.seed)
        self.vae = vae_from_config(self.cfg)
        if recipe.train.gradient_checkpointing:
            self.vae.enable_gradient_checkpointing()
        factor = 2 ** (len(self.cfg.block_out_channels) - 1)
        self.data = ImageBatches(
            recipe.data,
            recipe.train.batch_size,
            recipe.train.seed,
            accelerator.num_processes,
            accelerator.process_index,
            multiple=max(8, factor),
        )
        self.device = accelerator.device
        self._fixed = self.data.records[:8]

    def module(self) -> torch.nn.Module:
        return self.vae

    def next_batch(self) -> torch.Tensor:
        ids, size = self.data.next_ids()
        return self.data.load(ids, size).to(self.device)

    def loss(
        self, module: torch.nn.Module, x: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        post = module.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=generator, dtype=torch.float32).to(
            post.mean.device, post.mean.dtype
        )
        z = post.mean + post.std * eps
        rec = module.decode(z).sample.float()
        x = x.float()
        loss = (rec - x).abs().mean()
        pixels = x[0].numel()
        loss = loss + self.cfg.kl_weight * post.kl().float().mean() / pixels
        if self.cfg.edge_weight:
            dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
            dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
            edge = (dx(rec) - dx(x)).abs().mean() + (dy(rec) - dy(x)).abs().mean()
            loss = loss + self.cfg.edge_weight * edge
        return loss

    def data_state(self) -> dict[str, Any]:
        return self.data.state_dict()

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)

    def samples(self, module: torch.nn.Module) -> tuple[list[Image.Image], list[str]]:
        """Originals (top) and reconstructions (bottom) of the first 8 images, at the base size."""
        size = (self.recipe.data.resolution, self.recipe.data.resolution)
        x = self.data.load(list(range(len(self._fixed))), size).to(self.device)
        module.eval()
        rec = module.decode(module.encode(x).latent_dist.mean).sample
        module.train()
        originals, recs = _to_pil(x), _to_pil(rec)
        labels = ["original"] * len(originals) + ["reconstruction"] * len(recs)
        return originals + recs, labels

    def export(self, module: torch.nn.Module, dest: Path) -> Path:
        """Save the VAE as a diffusers ``AutoencoderKL`` folder with a measured ``scaling_factor``.

        The scaling factor is 1 / std of the latents (posterior means) of up to 256 training
        images, as Stable Diffusion's 0.18215 was chosen, so that scaled latents have unit variance.
        """
        module.eval()
        n = min(256, len(self.data.records))
        size = (self.recipe.data.resolution, self.recipe.data.resolution)
        latents = []
        with torch.no_grad():
            for start in range(0, n, 32):
                ids = list(range(start, min(n, start + 32)))
                latents.append(
                    module.encode(self.data.load(ids, size).to(self.device))
                    .latent_dist.mean.float()
                    .cpu()
                )
        std = float(torch.cat(latents).std())
        module.register_to_config(scaling_factor=round(1.0 / std, 5))

        def write(tmp: Path) -> None:
            module.save_pretrained(tmp, safe_serialization=True)
            (tmp / "training.json").write_text(
                json.dumps({"recipe": self.recipe.source, "latent_std": std}, indent=1)
            )

        return atomic_write_folder(Path(dest), write, overwrite=True)
