"""emaki: open, offline text-to-image latent diffusion.

Public API (imported lazily so that `import emaki` stays cheap and has no side effects)::

    import emaki
    pipe = emaki.load_pipeline("path/to/model")
    result = pipe.generate(emaki.GenerationRequest(prompt="a red apple", steps=20))
    result.images[0].save("apple.png")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["GenerationRequest", "GenerationResult", "__version__", "load_pipeline"]

if TYPE_CHECKING:
    from emaki.pipelines.txt2img import GenerationResult, load_pipeline
    from emaki.request import GenerationRequest


def __getattr__(name: str) -> Any:
    if name == "load_pipeline":
        from emaki.pipelines.txt2img import load_pipeline

        return load_pipeline
    if name == "GenerationRequest":
        from emaki.request import GenerationRequest

        return GenerationRequest
    if name == "GenerationResult":
        from emaki.pipelines.txt2img import GenerationResult

        return GenerationResult
    raise AttributeError(f"module 'emaki' has no attribute {name!r}")
