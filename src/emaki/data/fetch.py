"""Fetch pinned source packages through the registries' ordinary clients, into a local cache.

``npm pack NAME@VERSION`` downloads an npm tarball (npm checks its registry integrity hash);
``apt-get download NAME=VERSION`` downloads a Debian package (apt checks the archive signatures).
Both are unpacked into ``CACHE/<registry>/<name>-<version>/`` with path-safe extraction. A package
already unpacked in the cache is used as it is, so a build can run offline once its packages are
cached (``--offline`` refuses to download at all).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from emaki.data.sources import DataError
from emaki.models.files import sha256_file


@dataclass(frozen=True)
class FetchedPackage:
    """An unpacked package: where its files are, and the sha256 of the archive it came from."""

    name: str
    version: str
    root: Path
    archive_sha256: str


def _safe_dirname(name: str) -> str:
    return name.replace("@", "").replace("/", "-").replace(":", "_")


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    if shutil.which(cmd[0]) is None:
        raise DataError(
            f"{cmd[0]} is needed to download {what} but is not installed "
            f"(Debian: apt-get install {'npm' if cmd[0] == 'npm' else 'apt'})"
        )
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise DataError(f"could not download {what} with {cmd[0]}: {tail}")
    return proc.stdout


def _done_marker(dest: Path) -> Path:
    return dest / ".emaki-fetched.json"


def _cached(dest: Path, name: str, version: str) -> FetchedPackage | None:
    marker = _done_marker(dest)
    if not marker.is_file():
        return None
    meta = json.loads(marker.read_text())
    return FetchedPackage(name, version, dest / meta["root"], meta["archive_sha256"])


def _cached_or_check(
    dest: Path, name: str, version: str, label: str, offline: bool
) -> FetchedPackage | None:
    """The cached package, or None after checking that downloading is allowed."""
    hit = _cached(dest, name, version)
    if hit is None:
        if offline:
            raise DataError(
                f"{label} is not in the cache {dest.parent.parent} and --offline forbids downloading"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
    return hit


def _finish(tmp: Path, dest: Path, root: str, sha: str) -> None:
    (tmp / ".emaki-fetched.json").write_text(json.dumps({"root": root, "archive_sha256": sha}))
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def fetch_npm(name: str, version: str, cache: Path, offline: bool = False) -> FetchedPackage:
    """Download (or reuse) ``name@version`` from npm and unpack it; returns its ``package/`` folder."""
    dest = cache / "npm" / f"{_safe_dirname(name)}-{version}"
    hit = _cached_or_check(dest, name, version, f"{name}@{version}", offline)
    if hit is not None:
        return hit
    with tempfile.TemporaryDirectory(dir=dest.parent) as work:
        workp = Path(work)
        out = _run(
            ["npm", "pack", f"{name}@{version}", "--json", "--pack-destination", str(workp)],
            workp,
            f"npm package {name}@{version}",
        )
        try:
            filename = json.loads(out)[0]["filename"]
        except (ValueError, KeyError, IndexError) as e:
            raise DataError(f"npm pack gave no file name for {name}@{version}") from e
        # npm names scoped tarballs "scope-name-version.tgz"; find the file whatever the spelling.
        tarballs = list(workp.glob("*.tgz"))
        archive = workp / Path(filename).name if (workp / Path(filename).name).exists() else None
        if archive is None and len(tarballs) == 1:
            archive = tarballs[0]
        if archive is None:
            raise DataError(f"npm pack did not write a tarball for {name}@{version}")
        sha = sha256_file(archive)
        unpacked = workp / "unpacked"
        unpacked.mkdir()
        try:
            with tarfile.open(archive) as tf:
                tf.extractall(unpacked, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"the npm tarball of {name}@{version} is corrupt: {e}") from e
        _finish(unpacked, dest, "package", sha)
    return FetchedPackage(name, version, dest / "package", sha)


def fetch_debian(package: str, version: str, cache: Path, offline: bool = False) -> FetchedPackage:
    """Download (or reuse) a Debian package at an exact version and unpack its files."""
    dest = cache / "debian" / f"{_safe_dirname(package)}-{_safe_dirname(version)}"
    hit = _cached_or_check(dest, package, version, f"{package}={version}", offline)
    if hit is not None:
        return hit
    with tempfile.TemporaryDirectory(dir=dest.parent) as work:
        workp = Path(work)
        _run(["apt-get", "download", f"{package}={version}"], workp, f"Debian package {package}")
        debs = list(workp.glob("*.deb"))
        if len(debs) != 1:
            raise DataError(f"apt-get download did not write one .deb for {package}")
        sha = sha256_file(debs[0])
        unpacked = workp / "unpacked"
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], workp, f"Debian package {package}")
        _finish(unpacked, dest, ".", sha)
    return FetchedPackage(package, version, dest, sha)
