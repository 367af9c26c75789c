"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

Three stages, one module each, in the order a generation uses them:

* :mod:`~emaki.control.preprocess`: control images from ordinary images (Canny edges, soft
  edges, line art, scribbles, thresholds, segmentation-style maps), without downloaded weights.
* :mod:`~emaki.control.model`: ControlNet weights from a diffusers folder or an original
  lllyasviel single file, strictly and offline.
* :mod:`~emaki.control.apply`: :class:`ControlUnit` (a ControlNet, its control image, weight and
  step window) and :class:`ControlledUNet`, the UNet with units attached as a model function for
  :class:`~emaki.sampling.denoisers.DiscreteDenoiser`.
"""

from __future__ import annotations

from emaki.control.apply import ControlledUNet, ControlUnit, hint_from_image
from emaki.control.model import load_controlnet
from emaki.control.preprocess import PREPROCESSORS, preprocess

__all__ = [
    "PREPROCESSORS",
    "ControlUnit",
    "ControlledUNet",
    "hint_from_image",
    "load_controlnet",
    "preprocess",
]
