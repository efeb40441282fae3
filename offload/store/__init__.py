"""The packed store: aligned, checksummed per-Unit records plus manifest.json."""
from .format import FORMAT_VERSION, Manifest, read_manifest
from .pack import write_store

__all__ = ["FORMAT_VERSION", "Manifest", "read_manifest", "write_store"]
