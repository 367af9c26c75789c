"""sd-webui-controlnet's unit settings as emaki ControlNet units.

The A1111 ControlNet extension describes a unit in two places that clients and old images carry:
its API (``alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`` in a txt2img or img2img
body, with the extension's field names) and its infotext (``ControlNet 0: "Module: canny, Model:
control_v11p_sd15_canny [d14c016b], Weight: 1, ..."``). Both name the preprocessor ("module") by
the extension's names and pass the preprocessor's two numeric settings as ``threshold_a`` and
``threshold_b``, whose meaning depends on the module. This module turns both into
:class:`~emaki.request.ControlNetUnit`\\ s:

* module names map onto emaki's preprocessors (:mod:`emaki.control.preprocess`): ``canny``,
  ``threshold``/``binary``, and the families ``softedge_*``/``hed``/``pidinet*``, ``lineart*``,
  ``scribble*``, ``invert*`` and ``seg_*``, whose network annotators emaki approximates
  classically; any other name is refused with the list of accepted ones, never silently replaced;
* ``threshold_a``/``threshold_b`` become the options they mean for that module (canny's low and
  high thresholds, threshold's level); the extension's "unused" value, -1, means the default;
* resize and control modes are accepted as the extension's indices or labels, including the
  older labels ("Inner Fit (Scale to Fit)", ``guessmode``);
* settings that do not change emaki's result are accepted and ignored (``pixel_perfect``,
  ``processor_res``: emaki runs the preprocessor at the generation's size; ``low_vram``);
  settings that would change it and that emaki does not do (unit masks, hires-only units) are
  refused with a message.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from PIL import Image

from emaki.control.preprocess import PREPROCESSORS
from emaki.errors import InvalidRequestError
from emaki.request import CONTROL_MODES, RESIZE_MODES, ControlNetUnit

#: Extension module name (exact) -> (emaki preprocessor, option of threshold_a, of threshold_b).
_EXACT: dict[str, tuple[str, str | None, str | None]] = {
    "none": ("none", None, None),
    "canny": ("canny", "low", "high"),
    "threshold": ("threshold", "level", None),
    "binary": ("threshold", "level", None),
    "hed": ("soft_edge", None, None),
    "pidinet": ("soft_edge", None, None),
}
#: Extension module name prefix -> emaki preprocessor (thresholds not mapped).
_FAMILIES: dict[str, str] = {
    "softedge": "soft_edge",
    "pidinet": "soft_edge",
    "hed": "soft_edge",
    "lineart": "lineart",
    "scribble": "scribble",
    "invert": "invert",
    "seg": "segmentation",
}
_RESIZE_LABELS = {
    **{label.lower(): i for i, label in enumerate(RESIZE_MODES[:3])},
    "inner fit (scale to fit)": 1,
    "scale to fit (inner fit)": 1,
    "outer fit (shrink to fit)": 2,
    "envelope (outer fit)": 2,
}
_CONTROL_LABELS = {label.lower(): i for i, label in enumerate(CONTROL_MODES)}


def module_of(name: str) -> tuple[str, str | None, str | None]:
    """emaki's preprocessor for an extension module name, and the options its thresholds set."""
    key = str(name).strip().lower()
    if key in _EXACT:
        return _EXACT[key]
    if key.replace("-", "_").replace(" ", "_") in PREPROCESSORS:
        return key.replace("-", "_").replace(" ", "_"), None, None
    for prefix, ours in _FAMILIES.items():
        if key.startswith(prefix):
            return ours, None, None
    accepted = ", ".join([*_EXACT, *(f"{p}*" for p in _FAMILIES)])
    raise InvalidRequestError(f"unknown ControlNet module {name!r}; emaki accepts: {accepted}")


def module_list() -> list[str]:
    """Module names to list to clients (the extension's ``/controlnet/module_list``)."""
    return [*_EXACT, "softedge_hed", "lineart_standard", "scribble_hed", "invert", "seg_ofade20k"]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidRequestError(f"ControlNet {what} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise InvalidRequestError(f"ControlNet {what} must be a number, got {value!r}") from None


def _mode(value: Any, labels: dict[str, int], what: str) -> int:
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        if value.strip().lower() not in labels:
            raise InvalidRequestError(
                f"unknown ControlNet {what} {value!r}; accepted: {', '.join(map(repr, labels))}"
            )
        return labels[value.strip().lower()]
    number = _number(value, what)
    if not number.is_integer():
        raise InvalidRequestError(f"ControlNet {what} must be an index or a label, got {value!r}")
    return int(number)


def model_name(name: Any) -> str:
    """``"control_v11p_sd15_canny [d14c016b]"`` -> ``"control_v11p_sd15_canny"``."""
    text = re.sub(r"\s*\[[0-9a-fA-F]{6,}\]$", "", str(name or "").strip())
    if not text or text.lower() == "none":
        raise InvalidRequestError("a ControlNet unit needs a model (got none)")
    return text


def unit_from_settings(
    settings: dict[str, Any], image: Image.Image | None, *, where: str = "ControlNet unit"
) -> ControlNetUnit:
    """One unit from the extension's settings (snake_case names, as its API sends them).

    Settings emaki does not know are ignored, as the extension's versions add many; settings
    whose value would ask for something emaki does not do are refused.
    """
    s = dict(settings)
    module, opt_a, opt_b = module_of(s.get("module") or "none")
    hr = s.get("hr_option")
    if hr not in (None, "", "Both", 0):
        raise InvalidRequestError(f"{where}: hr_option {hr!r} is not supported (only 'Both')")
    options: dict[str, Any] = {}
    for key, option in (("threshold_a", opt_a), ("threshold_b", opt_b)):
        if option is not None and s.get(key) is not None:
            value = _number(s[key], key)
            if value != -1:
                options[option] = value
    if module != "none":  # options given by emaki's own names (emaki's infotext writes them)
        accepted = list(inspect.signature(PREPROCESSORS[module]).parameters)[1:]
        options.update({k: v for k, v in s.items() if k in accepted})
    control_mode = (
        2
        if s.get("guessmode")
        else _mode(s.get("control_mode", 0), _CONTROL_LABELS, "control mode")
    )
    unit = ControlNetUnit(
        model=model_name(s.get("model")),
        image=image,
        module=module,
        module_options=options,
        weight=_number(s.get("weight", 1.0), "weight"),
        guidance_start=_number(s.get("guidance_start", 0.0), "guidance start"),
        guidance_end=_number(s.get("guidance_end", s.get("guidance", 1.0)), "guidance end"),
        control_mode=control_mode,
        resize_mode=_mode(s.get("resize_mode", 1), _RESIZE_LABELS, "resize mode"),
    )
    if image is not None:
        unit.validate()
    return unit


def units_from_api(
    scripts: dict[str, Any],
    decode: Callable[[str, str], Image.Image],
    fallback: Image.Image | None = None,
) -> tuple[ControlNetUnit, ...]:
    """The enabled units of ``alwayson_scripts`` (its ``controlnet`` entry, any case).

    ``decode(base64_text, what)`` turns an image field into an image; a unit without an image
    uses ``fallback`` (the img2img init image, as the extension does) or is an error.
    """
    entry = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None)
    if entry is None:
        return ()
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise InvalidRequestError('alwayson_scripts.controlnet must be {"args": [unit, ...]}')
    units = []
    for i, settings in enumerate(args):
        where = f"ControlNet unit {i}"
        if not isinstance(settings, dict):
            raise InvalidRequestError(f"{where} must be an object of the extension's fields")
        if settings.get("enabled", True) is False:
            continue
        raw = settings.get("image", settings.get("input_image"))
        if isinstance(raw, dict):
            if raw.get("mask"):
                raise InvalidRequestError(f"{where}: unit masks are not supported")
            raw = raw.get("image")
        if raw:
            image = decode(raw, f"{where} image")
        elif fallback is not None:
            image = fallback
        else:
            raise InvalidRequestError(f"{where} needs an image (field 'image', base64)")
        units.append(unit_from_settings(settings, image, where=where))
    return tuple(units)


def units_from_infotext(params: dict[str, str]) -> tuple[ControlNetUnit, ...]:
    """Units (without images: the PNG does not store them) from ``ControlNet N`` infotext keys,
    as the extension and emaki write them."""
    units = []
    for i in range(len(params)):
        text = params.get(f"ControlNet {i}")
        if text is None:
            break
        settings: dict[str, Any] = {}
        for part in text.strip().strip('"').split(","):
            key, sep, value = part.partition(":")
            if not sep:
                raise InvalidRequestError(f"infotext 'ControlNet {i}' is unreadable: {text!r}")
            name = "_".join(key.strip().lower().split())
            value = value.strip()
            try:
                settings[name] = int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:
                settings[name] = {"true": True, "false": False}.get(value.lower(), value)
        units.append(unit_from_settings(settings, None, where=f"infotext 'ControlNet {i}'"))
    return tuple(units)
