"""CLIP-style contrastive training of a text tower and an image tower (``kind = "text"``).

Used to choose and to make the default model's text encoder, and to measure it: a text encoder
that can name what is in held-out images, and that maps unseen phrasings near the right images,
is one a denoiser can follow. Two text towers:

* ``clip``: a small ``CLIPTextModelWithProjection`` trained from scratch with the real CLIP BPE
  tokenizer; its ``text_model`` is what a denoiser would condition on.
* ``minilm``: the pretrained MiniLM, frozen; only a linear projection of its masked-mean-pooled
  states is trained (LiT: "locked-image/text tuning", Zhai et al. 2022, with the text side locked).

The image tower is a small residual CNN trained from scratch. The loss is CLIP's symmetric
cross-entropy over the batch's image-caption similarities with a learned temperature.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from emaki.data.captions import name_words
from emaki.models.files import atomic_write_folder
from emaki.train.data import BatchesTask
from emaki.train.recipe import Recipe, TextModelConfig


class ImageTower(nn.Module):
    """Conv stem, then per width a stride-2 residual stage; global mean pool; linear projection."""

    def __init__(self, channels: list[int], dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.SiLU()]
        prev = channels[0]
        for ch in channels:
            layers.append(_Stage(prev, ch))
            prev = ch
        self.body = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(prev)
        self.proj = nn.Linear(prev, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x).mean(dim=(2, 3))
        return self.proj(self.norm(h))


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        groups = math.gcd(8, cout)
        self.down = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.block = nn.Sequential(
            nn.GroupNorm(groups, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
            nn.GroupNorm(groups, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return x + self.block(x)


class MiniLMTower(nn.Module):
    """Frozen MiniLM: masked mean of its token states, then a trainable projection."""

    def __init__(self, dim: int, max_tokens: int) -> None:
        super().__init__()
        from emaki.text.minilm import load_minilm

        self.tokenizer, encoder = load_minilm(max_tokens)
        object.__setattr__(self, "encoder", encoder)  # frozen: not a submodule, not in the state
        self.proj = nn.Linear(encoder.config.hidden_size, dim)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def pooled(self, texts: list[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for start in range(0, len(todo), 256):
            chunk = todo[start : start + 256]
            enc = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            states = self.encoder(**enc).last_hidden_state
            mask = enc.attention_mask.unsqueeze(-1).float()
            pooled = (states * mask).sum(1) / mask.sum(1)
            for t, v in zip(chunk, pooled):
                self._cache[t] = v
        return torch.stack([self._cache[t] for t in texts])

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.proj(self.pooled(texts).to(self.proj.weight.device))


class ClipTower(nn.Module):
    """A small CLIP text model with projection, trained from scratch, real CLIP tokenizer."""

    def __init__(self, cfg: TextModelConfig) -> None:
        super().__init__()
        from emaki.text.tokenizer import load_clip_tokenizer

        self.tokenizer = load_clip_tokenizer("eos")
        self.tokenizer.model_max_length = cfg.max_tokens
        config = CLIPTextConfig(
            vocab_size=self.tokenizer.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_tokens,
            projection_dim=cfg.projection_dim,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self.model = CLIPTextModelWithProjection(config)

    def forward(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        )  # fmt: skip
        dev = next(self.model.parameters()).device
        return self.model(input_ids=enc.input_ids.to(dev)).text_embeds


class ContrastivePair(nn.Module):
    def __init__(self, cfg: TextModelConfig) -> None:
        super().__init__()
        self.image = ImageTower(cfg.image_channels, cfg.projection_dim)
        self.text = (
            ClipTower(cfg)
            if cfg.text_encoder == "clip"
            else MiniLMTower(cfg.projection_dim, cfg.max_tokens)
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)))

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x).float(), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.text(texts).float(), dim=-1)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy of CLIP over a batch of matching (image, text) pairs."""
    logits = logit_scale.clamp(max=math.log(100)).exp() * img @ txt.t()
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class ContrastiveTask(BatchesTask):
    def __init__(self, recipe: Recipe, accelerator: Any) -> None:
        assert isinstance(recipe.model, TextModelConfig)
        self.recipe = recipe
        self.cfg = recipe.model
        self.device = accelerator.device
        torch.manual_seed(recipe.train.seed)
        self.pair = ContrastivePair(self.cfg)
        hold = self.cfg.holdout_style
        self.data = self.batches(
            recipe, accelerator, keep=(lambda r: r.style != hold) if hold else None
        )

    def module(self) -> torch.nn.Module:
        return self.pair

    def next_batch(self) -> dict[str, Any]:
        ids, size = self.data.next_ids()
        return {
            "images": self.data.load(ids, size).to(self.device),
            "captions": [self.data.records[i].caption for i in ids],
        }

    def loss(
        self, module: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator
    ) -> torch.Tensor:
        pair = module.module if hasattr(module, "module") else module
        img = pair.embed_images(batch["images"])
        txt = pair.embed_texts(batch["captions"])
        return clip_loss(img, txt, pair.logit_scale)

    def export(self, module: torch.nn.Module, dest: Path) -> Path:
        """``text_encoder/`` + ``tokenizer/`` (CLIP tower only), the whole pair, and its scores."""
        from safetensors.torch import save_file

        from emaki.eval.prompts import caption_vocabulary, paraphrases, unseen

        pair: ContrastivePair = module  # type: ignore[assignment]
        pair.eval()
        vocab = caption_vocabulary([r.caption for r in self.data.records])
        para = paraphrases()
        scores = retrieval_scores(
            pair,
            self.recipe,
            {
                "all_paraphrases": para,
                "unseen_word_paraphrases": [p for p in para if unseen(p["prompt"], vocab)],
            },
        )

        def write(tmp: Path) -> None:
            save_file(
                {k: v.contiguous() for k, v in pair.state_dict().items()},
                str(tmp / "pair.safetensors"),
            )
            if isinstance(pair.text, ClipTower):
                text = CLIPTextModel(pair.text.model.config)
                text.load_state_dict(pair.text.model.text_model.state_dict(), strict=False)
                text.save_pretrained(str(tmp / "text_encoder"))
                pair.text.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            (tmp / "scores.json").write_text(json.dumps(scores, indent=1))
            (tmp / "training.json").write_text(json.dumps({"recipe": self.recipe.source}, indent=1))

        return atomic_write_folder(Path(dest), write, overwrite=True)


@torch.no_grad()
def retrieval_scores(
    pair: ContrastivePair, recipe: Recipe, paraphrase_sets: dict[str, list[dict]]
) -> dict[str, dict[str, Any]]:
    """Zero-shot identity retrieval on the held-out style, and retrieval of each paraphrase set.

    Held-out: each held-out image is ranked against the plain names of all identities it could
    be (those of the held-out set); top-1 / top-5 accuracy. Paraphrases: each paraphrase prompt is
    ranked against the same identity names' mean image embeddings; a hit if a target identity is
    in the top 5. The held-out images are embedded once; each set's entry repeats the held-out
    figures next to its own.
    """
    from emaki.train.data import load_fitted, load_records, to_tensor

    cfg: TextModelConfig = recipe.model  # type: ignore[assignment]
    held = [
        r
        for r in load_records(recipe.data)
        if cfg.holdout_style and r.style == cfg.holdout_style and r.name
    ]
    base: dict[str, Any] = {"holdout_style": cfg.holdout_style, "holdout_images": len(held)}
    if not held:
        return {key: dict(base) for key in paraphrase_sets}
    names = sorted({r.name for r in held})
    index = {n: i for i, n in enumerate(names)}
    txt = pair.embed_texts([name_words(n) for n in names])
    res = (recipe.data.resolution, recipe.data.resolution)
    dev = next(pair.parameters()).device
    img_chunks = []
    for start in range(0, len(held), 128):
        chunk = held[start : start + 128]
        x = to_tensor(
            [load_fitted(Path(recipe.data.path) / r.file, res, None, False) for r in chunk]
        )
        img_chunks.append(pair.embed_images(x.to(dev)).cpu())
    imgs = torch.cat(img_chunks)
    sims = imgs @ txt.cpu().t()
    target = torch.tensor([index[r.name] for r in held])
    top5 = sims.topk(min(5, len(names)), dim=1).indices
    base["identities"] = len(names)
    base["top1"] = float((top5[:, 0] == target).float().mean())
    base["top5"] = float((top5 == target[:, None]).any(1).float().mean())
    protos = torch.zeros(len(names), imgs.shape[1])
    protos.index_add_(0, target, imgs)
    protos = F.normalize(protos, dim=-1)
    out: dict[str, dict[str, Any]] = {}
    for key, paraphrases in paraphrase_sets.items():
        entry = dict(base)
        usable = [p for p in paraphrases if any(t in index for t in p["targets"])]
        if usable:
            ptxt = pair.embed_texts([p["prompt"] for p in usable]).cpu()
            ranks = (ptxt @ protos.t()).topk(min(5, len(names)), dim=1).indices
            hits = [
                any(names[j] in p["targets"] for j in ranks[k].tolist())
                for k, p in enumerate(usable)
            ]
            entry["paraphrases"] = len(usable)
            entry["paraphrase_top5"] = sum(hits) / len(hits)
        out[key] = entry
    return out
