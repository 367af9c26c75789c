"""The evaluator: an identity classifier trained only on real images (``kind = "classifier"``).

It answers "does this image show what the prompt named?" for generated images, and its
penultimate features give a Fréchet distance between generated and real images. FID's usual
Inception network cannot be downloaded here, so emaki trains its own feature extractor, on the
same kind of images it evaluates, and reports its accuracy on a held-out real style next to every
score, so that a generated image's score can be read against what the evaluator does on real ones.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from emaki.data.manifest import Record, read_manifest
from emaki.errors import EmakiError
from emaki.models.files import atomic_write_folder
from emaki.train.contrastive import ImageTower
from emaki.train.data import BatchesTask, to_tensor
from emaki.train.recipe import ClassifierModelConfig, Recipe


class EvaluatorError(EmakiError):
    """An evaluator folder is missing or does not fit the data."""


class Classifier(nn.Module):
    def __init__(self, channels: list[int], feature_dim: int, classes: int) -> None:
        super().__init__()
        self.features = ImageTower(channels, feature_dim)
        self.head = nn.Linear(feature_dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self.features(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (for the Fréchet distance)."""
        return F.silu(self.features(x))


def identity_classes(records: list[Record], holdout_style: str, min_styles: int) -> list[str]:
    """Identities shown in at least ``min_styles`` training styles, sorted."""
    styles: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.name and r.style != holdout_style:
            styles[r.name].add(r.style)
    return sorted(n for n, s in styles.items() if len(s) >= min_styles)


class ClassifierTask(BatchesTask):
    def __init__(self, recipe: Recipe, accelerator: Any) -> None:
        assert isinstance(recipe.model, ClassifierModelConfig)
        self.recipe = recipe
        self.cfg = cfg = recipe.model
        self.device = accelerator.device
        records = read_manifest(recipe.data.path)
        self.classes = identity_classes(records, cfg.holdout_style, cfg.min_styles)
        if len(self.classes) < 2:
            raise EvaluatorError(
                f"fewer than 2 identities appear in {cfg.min_styles} training styles; lower model.min_styles"
            )
        self.index = {n: i for i, n in enumerate(self.classes)}
        self.held = [r for r in records if r.style == cfg.holdout_style and r.name in self.index]
        self.data = self.batches(
            recipe,
            accelerator,
            keep=lambda r: r.name in self.index and r.style != cfg.holdout_style,
        )
        torch.manual_seed(recipe.train.seed)
        self.net = Classifier(cfg.image_channels, cfg.feature_dim, len(self.classes))

    def module(self) -> torch.nn.Module:
        return self.net

    def next_batch(self) -> dict[str, Any]:
        ids, size = self.data.next_ids()
        labels = torch.tensor([self.index[self.data.records[i].name] for i in ids])
        return {
            "images": self.data.load(ids, size).to(self.device),
            "labels": labels.to(self.device),
        }

    def loss(
        self, module: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator
    ) -> torch.Tensor:
        logits = module(batch["images"]).float()
        return F.cross_entropy(logits, batch["labels"], label_smoothing=self.cfg.label_smoothing)

    def export(self, module: torch.nn.Module, dest: Path) -> Path:
        module.eval()
        evaluator = Evaluator(module, self.classes, self.recipe.data.resolution)  # type: ignore[arg-type]
        held = self.held
        scores: dict[str, Any] = {
            "classes": len(self.classes),
            "holdout_style": self.cfg.holdout_style,
        }
        if held:
            images = load_real_images(self.recipe.data.path, held)
            top1, top5 = evaluator.accuracy(images, [[r.name] for r in held])
            scores.update({"holdout_images": len(held), "holdout_top1": top1, "holdout_top5": top5})

        def write(tmp: Path) -> None:
            save_file(
                {k: v.contiguous() for k, v in module.state_dict().items()},
                str(tmp / "classifier.safetensors"),
            )
            config = {
                "image_channels": self.cfg.image_channels,
                "feature_dim": self.cfg.feature_dim,
                "resolution": self.recipe.data.resolution,
                "classes": self.classes,
                "dataset": str(self.recipe.data.path),
                "scores": scores,
            }
            (tmp / "evaluator.json").write_text(json.dumps(config, indent=1))

        return atomic_write_folder(Path(dest), write, overwrite=True)


def zoom_crops(x: torch.Tensor, rng: np.random.Generator, smallest: float = 0.8) -> torch.Tensor:
    """Each image cropped to a random square of ``smallest``..1 of its side, resized back."""
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for i in range(n):
        s = rng.uniform(smallest, 1.0)
        ch, cw = max(1, round(h * s)), max(1, round(w * s))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        out[i] = F.interpolate(
            crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True
        )[0]
    return out


class Evaluator:
    """A trained classifier with its class names; scores images against named identities."""

    def __init__(self, net: Classifier, classes: list[str], resolution: int) -> None:
        self.net = net.eval()
        self.classes = classes
        self.index = {n: i for i, n in enumerate(classes)}
        self.resolution = resolution

    @classmethod
    def load(cls, folder: Path) -> Evaluator:
        folder = Path(folder)
        try:
            config = json.loads((folder / "evaluator.json").read_text())
            state = load_file(str(folder / "classifier.safetensors"))
        except (OSError, ValueError) as e:
            raise EvaluatorError(
                f"{folder} is not an evaluator folder (train one with a classifier recipe): {e}"
            ) from e
        net = Classifier(config["image_channels"], config["feature_dim"], len(config["classes"]))
        net.load_state_dict(state)
        ev = cls(net, config["classes"], config["resolution"])
        ev.config = config
        return ev

    def _batch(self, images: list[Image.Image]) -> torch.Tensor:
        size = (self.resolution, self.resolution)
        arrays = []
        for im in images:
            im = im.convert("RGB")
            if im.size != size:
                im = im.resize(size, Image.Resampling.LANCZOS)
            arrays.append(np.asarray(im, dtype=np.uint8))
        return to_tensor(arrays)

    @torch.no_grad()
    def logits_and_features(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        outs, feats = [], []
        for start in range(0, len(images), 128):
            x = self._batch(images[start : start + 128])
            f = self.net.embed(x)
            feats.append(f)
            outs.append(self.net.head(f))
        return torch.cat(outs), torch.cat(feats)

    def accuracy(self, images: list[Image.Image], targets: list[list[str]]) -> tuple[float, float]:
        """Top-1 and top-5 accuracy: a hit when one of the image's target identities is ranked there."""
        logits, _ = self.logits_and_features(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit1 = hit5 = 0
        for k, names in enumerate(targets):
            want = {self.index[n] for n in names if n in self.index}
            ranked = top[k].tolist()
            hit1 += ranked[0] in want
            hit5 += any(j in want for j in ranked)
        n = max(1, len(targets))
        return hit1 / n, hit5 / n

    def features(self, images: list[Image.Image]) -> np.ndarray:
        return self.logits_and_features(images)[1].double().numpy()


def load_real_images(folder: Path, records: list[Record]) -> list[Image.Image]:
    return [Image.open(Path(folder) / r.file).convert("RGB") for r in records]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula).

    ``|μa - μb|² + tr(Σa + Σb - 2 (Σa Σb)^½)``, the matrix square root taken through the
    eigen-decomposition of ``Σa^½ Σb Σa^½`` (symmetric, so real and stable).
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    wa, va = np.linalg.eigh(cov_a)
    sqrt_a = (va * np.sqrt(np.clip(wa, 0, None))) @ va.T
    middle = sqrt_a @ cov_b @ sqrt_a
    wm = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(wm, 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)
