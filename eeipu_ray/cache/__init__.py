"""The prefix cache: memoized stage outputs, on a local directory, S3, or the Ray object store."""

from eeipu_ray.cache.codecs import Codec, CodecRegistry, Encoded, StreamPart
from eeipu_ray.cache.errors import CacheUnreachableError
from eeipu_ray.cache.fs_store import StoredEntry
from eeipu_ray.cache.manifest import EntryMeta, Manifest
from eeipu_ray.cache.prefix_cache import CacheHit, PrefixCache, StoreResult, default_cache_dir

__all__ = [
    "CacheHit",
    "CacheUnreachableError",
    "Codec",
    "CodecRegistry",
    "Encoded",
    "EntryMeta",
    "Manifest",
    "PrefixCache",
    "StoreResult",
    "StoredEntry",
    "StreamPart",
    "default_cache_dir",
]
