"""Image editing from prompts: DiffEdit's automatic masks (Couairon et al. 2022).

The mask says where a target prompt changes what the model sees in an image; emaki's ordinary
inpainting then repaints that area with the target prompt.
"""

from emaki.edit.diffedit import (
    diffedit_map,
    diffedit_mask,
    diffedit_sigma,
    draw_noise,
    mask_to_images,
    threshold_map,
)

__all__ = [
    "diffedit_map",
    "diffedit_mask",
    "diffedit_sigma",
    "draw_noise",
    "mask_to_images",
    "threshold_map",
]
