"""Self-attention guidance (SAG) as a guided denoiser.

Hong, Lee, Jang & Kim (2023), "Improving Sample Quality of Diffusion Models Using Self-Attention
Guidance" (ICCV). Classifier-free guidance pushes a sample towards the prompt; SAG pushes it away
from a *degraded* version of itself, in which the regions the model's self-attention attends to
most are blurred. Per sampling step, with ``D`` the model as an x0 denoiser (see
:mod:`emaki.sampling.denoisers`) and ``x = x0 + sigma * n``:

1. the ordinary CFG call, during which the mid block's first self-attention map is captured
   (of the unconditional rows when CFG runs them, of the prompt's rows when ``scale == 1``, as
   diffusers' ``StableDiffusionSAGPipeline`` does; the paper's eq. 25 uses the unconditional);
2. the mask ``M``: attention probabilities averaged over heads and summed over queries, i.e. how
   much attention each key position receives; above 1 (the average, since every query's row sums
   to 1) counts as salient. Reshaped to the mid block's resolution and upsampled (nearest) to the
   latent;
3. ``x0_hat = M * blur(D_ref) + (1 - M) * D_ref`` (Gaussian blur, kernel 9, sigma 1), where
   ``D_ref`` is the reference rows' x0 estimate, re-noised with the model's own noise estimate
   ``eps_ref = (x - D_ref) / sigma``: ``x_hat = x0_hat + sigma * eps_ref``;
4. one more model call on ``x_hat`` with the reference conditioning;
5. the guidance term.

The paper (eq. 16, 25) and diffusers guide the noise prediction::

    eps~ = eps_cfg(x) + s * (eps_ref(x) - eps_ref(x_hat)).

Derivation in x0 space, where ``eps(x) = (x - D(x)) / sigma`` for every parameterisation::

    D~ = x - sigma * eps~
       = D_cfg - s * [(x - D_ref(x)) - (x_hat - D_ref(x_hat))]
       = D_cfg + s * (x0_hat - D_ref(x_hat)),        since x - D_ref(x) = sigma eps_ref
                                                      = x_hat - x0_hat,

and the degraded input needs no division by sigma either: ``x_hat = x + (x0_hat - D_ref(x))``.
So SAG adds ``s`` times the part of the blurred estimate the model does not reproduce from the
degraded input. This equals diffusers exactly for epsilon-prediction models. For v-prediction
models diffusers adds ``s * (v_ref(x) - v_ref(x_hat))`` to the raw v output instead, which in x0
space is ``D_cfg + s * [(D_ref - D_ref(x_hat)) - (D_ref - x0_hat) / (1 + sigma^2)]``: it differs
from the paper's epsilon form by ``s * sigma^2 / (1 + sigma^2) * (D_ref - x0_hat)``. emaki uses
the paper's form for every parameterisation, because a denoiser does not know (and samplers must
not care) how the network parameterises its output.

Capturing the map needs a custom attention processor. :func:`capture_self_attention` installs it
on a weight-sharing clone of the UNet (:func:`emaki.adapters.clone.share_clone`); the shared
UNet is never touched. The capture processor leaves the layer's output exactly as the original
processor computes it and evaluates the attention probabilities alongside, so a SAG run with
``sag_scale = 0`` is bit-identical to plain CFG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from emaki.adapters.clone import share_clone
from emaki.conditioning import Conditioning
from emaki.errors import InvalidRequestError
from emaki.sampling.denoisers import Denoiser
from emaki.sampling.guidance import CFGDenoiser, GuidedCond


class AttentionCapture:
    """What the mid block's first self-attention saw during the latest UNet call.

    ``mass`` [B, N] is the attention each of the N = h * w key positions receives, averaged over
    heads and summed over queries; ``size`` is (h, w), the mid block's resolution for that call
    (recorded from the transformer's input, so any latent size works, odd ones included).
    ``calls`` counts UNet calls since the last :meth:`reset`. One capture belongs to one UNet
    clone, which one request uses from one thread at a time.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.mass: Tensor | None = None
        self.size: tuple[int, int] | None = None

    def reset(self) -> None:
        self.calls = 0
        self.mass = None

    def take(self) -> tuple[Tensor, tuple[int, int]]:
        """The map of the one UNet call since :meth:`reset`; an error for none or several."""
        if self.calls != 1 or self.mass is None or self.size is None:
            raise RuntimeError(
                f"self-attention guidance expected one UNet call per denoiser call, saw "
                f"{self.calls}; is the denoiser built on the clone from capture_self_attention?"
            )
        mass, size = self.mass, self.size
        self.reset()
        return mass, size

    def _record_size(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, C, h, w]
        self.size = (int(hidden.shape[-2]), int(hidden.shape[-1]))


class _CaptureProcessor:
    """Runs the layer's own processor, and records its self-attention map on the side."""

    def __init__(self, inner: Callable[..., Tensor], capture: AttentionCapture) -> None:
        self.inner = inner
        self.capture = capture

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        out = self.inner(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise RuntimeError("the captured layer must be a self-attention over [B, N, C] tokens")
        self.capture.mass = _key_mass(attn, hidden_states)
        self.capture.calls += 1
        return out


def _key_mass(attn: Any, hidden: Tensor) -> Tensor:
    """[B, N, C] tokens -> [B, N]: attention received per key, mean over heads, sum over queries.

    The probabilities are computed the way diffusers' own attention does (``softmax(q k^T *
    scale)``, upcast as the layer says), independently of the fused kernel the layer's processor
    may use, so that the mask does not depend on which attention implementation is installed.
    """
    b, n, _ = hidden.shape
    heads = attn.heads
    query = attn.head_to_batch_dim(attn.to_q(hidden))  # [B*heads, N, d]
    key = attn.head_to_batch_dim(attn.to_k(hidden))  # [B*heads, N, d]
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    query = query.reshape(b, heads, n, -1)
    key = key.reshape(b, heads, n, -1)
    # One head at a time: the full [B*heads, N, N] map of a large latent (SDXL at 1024 px:
    # N = 1024) would hold heads times more memory than this step needs.
    total = hidden.new_zeros(b, n, n, dtype=torch.float32)  # [B, N(queries), N(keys)]
    for h in range(heads):
        total += attn.get_attention_scores(query[:, h], key[:, h], None).float()
    return (total / heads).sum(dim=1)  # [B, N]


def _mid_self_attention(unet: UNet2DConditionModel) -> tuple[nn.Module, nn.Module]:
    """The mid block's first transformer and its first block's self-attention (``attn1``)."""
    mid = getattr(unet, "mid_block", None)
    attentions = getattr(mid, "attentions", None)
    blocks = getattr(attentions[0], "transformer_blocks", None) if attentions else None
    if not blocks:
        raise InvalidRequestError(
            "self-attention guidance needs a UNet whose middle block has a transformer "
            f"(attention); this UNet's middle block is {type(mid).__name__}"
        )
    return attentions[0], blocks[0].attn1


def capture_self_attention(
    unet: UNet2DConditionModel,
) -> tuple[UNet2DConditionModel, AttentionCapture]:
    """A weight-sharing clone of ``unet`` that reports its mid-block self-attention map.

    The clone's ``mid_block.attentions[0].transformer_blocks[0].attn1`` runs its processor
    unchanged and records the attention it computes; a forward pre-hook on that transformer, on
    the clone only, records the mid block's resolution. Pass an already adapted clone (LoRA,
    hypernetworks) to keep its patches; they are wrapped, not replaced. ``unet`` itself is left
    exactly as it was.
    """
    clone = share_clone(unet)
    capture = AttentionCapture()
    transformer, attn = _mid_self_attention(clone)
    attn.set_processor(_CaptureProcessor(attn.processor, capture))
    transformer.register_forward_pre_hook(capture._record_size, with_kwargs=True)
    return clone, capture


def gaussian_blur(x: Tensor, kernel_size: int = 9, sigma: float = 1.0) -> Tensor:
    """Per-channel Gaussian blur of [B, C, h, w], reflect-padded, as diffusers' SAG does.

    Separable (two 1-D passes), which equals the 2-D kernel (an outer product) exactly up to
    rounding. Latents no larger than the kernel radius cannot be reflect-padded; they are padded
    by replicating the edge instead.
    """
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, dtype=torch.float32)
    k = torch.exp(-0.5 * (taps / sigma) ** 2)
    k = (k / k.sum()).to(x.device, x.dtype)
    c, pad = x.shape[1], kernel_size // 2
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    y = F.pad(x, (pad, pad, pad, pad), mode=mode)  # [B, C, h + 2p, w + 2p]
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)  # down the rows
    return F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)  # across: [B, C, h, w]


def attention_mask(
    mass: Tensor, size: tuple[int, int], latent_size: tuple[int, int], threshold: float = 1.0
) -> Tensor:
    """[B, N] key mass at the mid block's (h, w) -> float {0, 1} mask [B, 1, H, W] of the latent.

    A key is salient when it receives more than ``threshold`` (1.0: more than the average) of
    the queries' attention; nearest upsampling, as diffusers (``F.interpolate``'s default).
    """
    b, n = mass.shape
    if n != size[0] * size[1]:
        raise RuntimeError(f"attention over {n} tokens does not match the mid block's {size}")
    mask = (mass > threshold).float().reshape(b, 1, *size)  # [B, 1, h, w]
    return F.interpolate(mask, size=latent_size, mode="nearest")  # [B, 1, H, W]


@dataclass
class _Call:
    """One batched inner call of the CFG step: its rows' negative flags, output and map."""

    negative: Tensor  # bool [n*B]
    denoised: Tensor  # [n*B, C, H, W]
    mass: Tensor  # [n*B, N]
    size: tuple[int, int]


class SelfAttentionGuidance:
    """Classifier-free guidance plus self-attention guidance (Hong et al. 2023), as a denoiser.

    Called like :class:`~emaki.sampling.guidance.CFGDenoiser` with a
    :class:`~emaki.sampling.guidance.GuidedCond`; ``scale`` and ``rescale`` mean what they mean
    there (CFG itself runs through ``CFGDenoiser``, so AND parts and rescaling work unchanged).
    ``inner`` must be built on the UNet clone returned with ``capture`` by
    :func:`capture_self_attention`. The result is ``D_cfg + sag_scale * (x0_hat - D_ref(x_hat))``
    (derivation in the module docstring); it costs one extra model call on B rows per step.
    ``sag_scale = 0`` returns plain CFG, bit for bit. ``blur_sigma``, ``blur_kernel`` and
    ``mask_threshold`` default to diffusers' fixed values (1.0, 9, 1.0); A1111's SAG extension
    calls the last one "SAG Mask Threshold".
    """

    def __init__(
        self,
        inner: Denoiser,
        capture: AttentionCapture,
        scale: float,
        sag_scale: float,
        rescale: float = 0.0,
        *,
        blur_sigma: float = 1.0,
        blur_kernel: int = 9,
        mask_threshold: float = 1.0,
    ) -> None:
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise InvalidRequestError(
                f"SAG blur kernel must be odd and positive, got {blur_kernel}"
            )
        if blur_sigma <= 0:
            raise InvalidRequestError(f"SAG blur sigma must be positive, got {blur_sigma}")
        self.inner = inner
        self.capture = capture
        self.scale = float(scale)
        self.sag_scale = float(sag_scale)
        self.rescale = float(rescale)
        self.blur_sigma = float(blur_sigma)
        self.blur_kernel = int(blur_kernel)
        self.mask_threshold = float(mask_threshold)

    def __call__(self, x: Tensor, sigma: Tensor, cond: GuidedCond) -> Tensor:
        if self.sag_scale == 0.0:
            return CFGDenoiser(self.inner, self.scale, self.rescale)(x, sigma, cond)
        calls: list[_Call] = []  # per step, so no state outlives this call

        def recording(xb: Tensor, sb: Tensor, cb: Conditioning) -> Tensor:
            self.capture.reset()
            out = self.inner(xb, sb, cb)
            mass, size = self.capture.take()
            calls.append(_Call(cb.negative_rows(), out, mass, size))
            return out

        guided = CFGDenoiser(recording, self.scale, self.rescale)(x, sigma, cond)
        d_ref, mass, size, ref_cond = _reference(calls, cond, x.shape[0])
        latent_size = (x.shape[-2], x.shape[-1])
        mask = attention_mask(mass, size, latent_size, self.mask_threshold).to(x)  # [B, 1, H, W]
        blurred = gaussian_blur(d_ref, self.blur_kernel, self.blur_sigma)
        x0_hat = mask * blurred + (1 - mask) * d_ref  # blur only where attention is salient
        x_hat = x + (x0_hat - d_ref)  # = x0_hat + sigma * eps_ref, re-noised to this sigma
        d_hat = self.inner(x_hat, sigma, ref_cond)
        return guided + self.sag_scale * (x0_hat - d_hat)


def _reference(
    calls: list[_Call], cond: GuidedCond, b: int
) -> tuple[Tensor, Tensor, tuple[int, int], Conditioning]:
    """The rows SAG degrades: the unconditional ones if CFG ran them, else the prompt's.

    Returns (x0 estimate [B, C, H, W], key mass [B, N], mid size, their conditioning).
    """
    for call in calls:
        rows = call.negative.to(call.denoised.device)
        if rows.any():  # CFG batches the negative (repeated to B) as one contiguous block
            ref = cond.negative.as_negative().repeat_to(b)
            return call.denoised[rows], call.mass[rows.to(call.mass.device)], call.size, ref
    if len(calls) != 1:
        raise RuntimeError(f"expected one conditional model call, saw {len(calls)}")
    call = calls[0]
    return call.denoised, call.mass, call.size, cond.positive.repeat_to(b)
