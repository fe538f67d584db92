"""The Ray object store as a fast, cluster-wide cache layer.

Objects ``ray.put`` inside a trial are owned by that trial's worker and die
with it, so the layer is a named, *detached* actor that calls ``ray.put``
itself: it owns every cached object and keeps it alive until eviction. Trials
on any node find the actor by name, fetch an ``ObjectRef`` from it, and read
the object from the object store (zero-copy on the same node, one transfer
from another node).

The actor keeps a least-recently-used order under an optional byte budget and
never evicts pinned keys. It holds only references and manifests: the bytes
live in the object store (spilling to disk under memory pressure, as Ray does).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import ray

from eeipu_ray.cache.manifest import Manifest

NAMESPACE = "eeipu_ray"
ACTOR_PREFIX = "eeipu-prefix-cache:"


@ray.remote(num_cpus=0, max_concurrency=32)
class PrefixCacheActor:
    """Owner of cached objects. Threaded: lookups do not wait behind large puts."""

    def __init__(self, byte_budget: int | None = None) -> None:
        self._lock = threading.Lock()
        # key -> (manifest_json, [ref], nbytes); order = LRU (oldest first)
        self._entries: OrderedDict[str, tuple[bytes, list[Any], int]] = OrderedDict()
        self._pins: set[str] = set()
        self._budget = byte_budget
        self._hits = 0
        self._misses = 0

    def put(self, key: str, manifest_json: bytes, parts: dict[str, Any]) -> bool:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return False
        # The actor puts the object itself: it becomes the owner.
        ref = ray.put(parts)
        nbytes = sum(int(getattr(v, "nbytes", len(v))) for v in parts.values())
        with self._lock:
            if key in self._entries:
                return False
            self._entries[key] = (manifest_json, [ref], nbytes)
            self._evict_locked()
        return True

    def get(self, key: str) -> tuple[bytes, list[Any]] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            # The ref is wrapped in a list so Ray passes the reference, not the value.
            return entry[0], entry[1]

    def manifest(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._entries.pop(key, None) is not None

    def pin(self, key: str) -> None:
        with self._lock:
            self._pins.add(key)

    def unpin(self, key: str) -> None:
        with self._lock:
            self._pins.discard(key)

    def pinned(self) -> list[str]:
        with self._lock:
            return sorted(self._pins)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._pins.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": sum(e[2] for e in self._entries.values()),
                "pinned": len(self._pins),
                "byte_budget": self._budget,
                "hits": self._hits,
                "misses": self._misses,
            }

    def _evict_locked(self) -> None:
        if self._budget is None:
            return
        total = sum(e[2] for e in self._entries.values())
        for key in list(self._entries):
            if total <= self._budget:
                break
            if key in self._pins:
                continue
            total -= self._entries.pop(key)[2]


class ObjectStoreLayer:
    """Client of the named cache actor; created lazily in each process."""

    def __init__(self, name: str, byte_budget: int | None = None) -> None:
        self.name = name
        self.byte_budget = byte_budget
        self._actor: Any = None

    @property
    def actor(self) -> Any:
        if self._actor is None:
            if not ray.is_initialized():
                ray.init(namespace=NAMESPACE)
            self._actor = PrefixCacheActor.options(
                name=ACTOR_PREFIX + self.name,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
            ).remote(self.byte_budget)
        return self._actor

    def get(self, key: str) -> tuple[Manifest, dict[str, Any]] | None:
        found = ray.get(self.actor.get.remote(key))
        if found is None:
            return None
        manifest_json, (ref,) = found
        try:
            parts = ray.get(ref, timeout=300)
        except ray.exceptions.ObjectLostError:
            self.delete(key)
            return None
        return Manifest.from_json(manifest_json, key), parts

    def manifest(self, key: str) -> Manifest | None:
        raw = ray.get(self.actor.manifest.remote(key))
        return None if raw is None else Manifest.from_json(raw, key)

    def contains(self, key: str) -> bool:
        return bool(ray.get(self.actor.contains.remote(key)))

    def put(self, key: str, manifest: Manifest, parts: dict[str, Any]) -> bool:
        return bool(ray.get(self.actor.put.remote(key, manifest.to_json(), parts)))

    def delete(self, key: str) -> None:
        ray.get(self.actor.delete.remote(key))

    def pin(self, key: str) -> None:
        ray.get(self.actor.pin.remote(key))

    def unpin(self, key: str) -> None:
        ray.get(self.actor.unpin.remote(key))

    def pinned(self) -> set[str]:
        return set(ray.get(self.actor.pinned.remote()))

    def stats(self) -> dict[str, Any]:
        return dict(ray.get(self.actor.stats.remote()))

    def clear(self) -> None:
        ray.get(self.actor.clear.remote())

    def kill(self) -> None:
        """Destroy the actor and every object it owns."""
        ray.kill(self.actor, no_restart=True)
        self._actor = None


