"""The openly licensed image sources that ``emaki data build`` can assemble, pinned for reproducibility.

Every source is a package of a public registry (npm or Debian), fetched at build time through the
registry's own client (``npm pack``, ``apt-get download``) at the exact version named here, so that
one command rebuilds the same dataset. Licenses and the attribution each requires are recorded here
and copied into every manifest line.

Apple and Facebook emoji images are not openly licensed and are never used: no source below
contains them (``emoji-datasource`` is used only for its names and categories, never its images).
"""

from __future__ import annotations

from dataclasses import dataclass

from emaki.errors import EmakiError


class DataError(EmakiError):
    """A dataset could not be built or read (bad source, missing tool, unreadable folder)."""


@dataclass(frozen=True)
class IconSet:
    """An Iconify JSON icon set on npm (``@iconify-json/<key>``): SVG bodies with CLDR-style names."""

    key: str
    version: str
    license: str
    attribution: str
    style: str
    default: bool = True

    @property
    def package(self) -> str:
        return f"@iconify-json/{self.key}"


@dataclass(frozen=True)
class DebianSvgSource:
    """A Debian package of SVG drawings whose file names serve as titles."""

    key: str
    package: str
    version: str
    license: str
    attribution: str
    style: str
    default: bool = False


@dataclass(frozen=True)
class NpmPackage:
    """A plain npm package used for metadata (names, keywords), never for images."""

    name: str
    version: str
    license: str


ICON_SETS: tuple[IconSet, ...] = (
    IconSet(
        "twemoji",
        "1.2.5",
        "CC-BY-4.0",
        "Twemoji by Twitter, Inc. and other contributors (github.com/jdecked/twemoji), CC BY 4.0",
        "twemoji style",
    ),
    IconSet(
        "noto",
        "1.2.9",
        "Apache-2.0",
        "Noto Emoji by Google Inc. (github.com/googlefonts/noto-emoji), Apache License 2.0",
        "noto emoji style",
    ),
    IconSet(
        "noto-v1",
        "1.2.5",
        "Apache-2.0",
        "Noto Emoji (first edition) by Google Inc., Apache License 2.0",
        "old noto emoji style",
    ),
    IconSet(
        "fluent-emoji-flat",
        "1.2.6",
        "MIT",
        "Fluent Emoji by Microsoft Corporation (github.com/microsoft/fluentui-emoji), MIT",
        "fluent flat style",
    ),
    IconSet(
        "fluent-emoji",
        "1.2.7",
        "MIT",
        "Fluent Emoji (3D) by Microsoft Corporation (github.com/microsoft/fluentui-emoji), MIT",
        "fluent 3d style",
    ),
    IconSet(
        "fxemoji",
        "1.2.2",
        "Apache-2.0",
        "FxEmoji by Mozilla (github.com/mozilla/fxemoji), Apache License 2.0",
        "firefox emoji style",
    ),
    IconSet(
        "emojione",
        "1.2.3",
        "CC-BY-4.0",
        "Emoji One (github.com/EmojiTwo/emojitwo), CC BY 4.0",
        "emojione style",
    ),
    IconSet(
        "streamline-emojis",
        "1.2.4",
        "CC-BY-4.0",
        "Streamline Emojis by Streamline (github.com/webalys-hq/streamline-vectors), CC BY 4.0",
        "streamline style",
    ),
    # ShareAlike: usable, but a model trained on it may carry the ShareAlike obligation, so it is
    # left out of the default build.
    IconSet(
        "openmoji",
        "1.2.29",
        "CC-BY-SA-4.0",
        "OpenMoji (openmoji.org), CC BY-SA 4.0",
        "openmoji style",
        default=False,
    ),
)

DEBIAN_SOURCES: tuple[DebianSvgSource, ...] = (
    DebianSvgSource(
        "openclipart",
        "openclipart-svg",
        "1:0.18+dfsg-19",
        "public-domain",
        "Open Clip Art Library (openclipart.org), public domain, via Debian openclipart-svg",
        "clipart",
    ),
)

EMOJI_DATASOURCE = NpmPackage("emoji-datasource", "16.0.0", "MIT")
EMOJILIB = NpmPackage("emojilib", "4.0.3", "MIT")

ALL_SOURCES: dict[str, IconSet | DebianSvgSource] = {
    s.key: s for s in (*ICON_SETS, *DEBIAN_SOURCES)
}


def default_source_keys() -> list[str]:
    return [k for k, s in ALL_SOURCES.items() if s.default]


def resolve_sources(spec: str | None) -> list[IconSet | DebianSvgSource]:
    """Parse ``--sources``: comma-separated keys, ``default`` or ``all``; unknown keys name the choices."""
    if spec is None or spec.strip() == "":
        return []
    keys: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "default":
            keys.extend(default_source_keys())
        elif part == "all":
            keys.extend(ALL_SOURCES)
        elif part in ALL_SOURCES:
            keys.append(part)
        else:
            raise DataError(
                f"unknown source {part!r}; known sources: default, all, " + ", ".join(ALL_SOURCES)
            )
    seen: dict[str, IconSet | DebianSvgSource] = {}
    for k in keys:
        seen.setdefault(k, ALL_SOURCES[k])
    return list(seen.values())
