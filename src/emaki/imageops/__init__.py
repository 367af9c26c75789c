"""Image operations with A1111's semantics: img2img resize modes, inpainting masks, fills."""
