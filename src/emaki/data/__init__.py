"""Datasets: open sources and user folders into a captioned, licensed, deduplicated image set."""

from emaki.data.manifest import Record, read_manifest
from emaki.data.sources import DataError

__all__ = ["DataError", "Record", "read_manifest"]
