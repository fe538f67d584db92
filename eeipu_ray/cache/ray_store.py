"""The Ray object store as a fast, cluster-wide cache layer.

Objects ``ray.put`` inside a trial are owned by that trial's worker and die
with it, so the layer is a named, *detached* actor that calls ``ray.put``
itself: it owns every cached object and keeps it alive until eviction. Trials
on any node, in any job and any namespace, find the actor by name (it lives in
the fixed namespace :data:`NAMESPACE`), fetch an ``ObjectRef`` from it, and read
the object from the object store (zero-copy on the same node, one transfer
from another node).

The actor is placed on the head node (it outlives worker nodes), never in the
placement group of the trial that first uses it.

The actor keeps a least-recently-used order under an optional byte budget and
never evicts pinned keys. It holds only references and manifests: the bytes
live in the object store (spilling to disk under memory pressure, as Ray does).

The layer is a best-effort accelerator: when the actor dies, is killed, or an
object is lost, reads are misses and writes are skipped (both logged); nothing
is raised into a trial. The durable layer behind it, if any, stays authoritative.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import ray
from ray.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    ObjectStoreFullError,
    OutOfDiskError,
    RayActorError,
)

from eeipu_ray.cache.manifest import Manifest

logger = logging.getLogger("eeipu_ray.cache")

NAMESPACE = "eeipu_ray"
ACTOR_PREFIX = "eeipu-prefix-cache:"
#: Seconds to wait for a bookkeeping call on the actor (lookups, pins, stats).
CALL_TIMEOUT_S = 120.0
#: Seconds to wait for a put or for fetching an object (may cross nodes or be
#: restored from spilled storage).
TRANSFER_TIMEOUT_S = 600.0
_RECONNECT_ATTEMPTS = 3
_HEAD_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource


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
        """Own a copy of ``parts`` under ``key``; False if present or not storable."""
        nbytes = sum(memoryview(v).nbytes for v in parts.values())
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return False
        if self._budget is not None and nbytes > self._budget and key not in self._pins:
            # It would be evicted at once: do not copy it into the object store at all.
            return False
        try:
            # The actor puts the object itself: it becomes the owner.
            ref = ray.put(parts)
        except (ObjectStoreFullError, OutOfDiskError):
            return False
        with self._lock:
            if key in self._entries:
                return False
            self._entries[key] = (manifest_json, [ref], nbytes)
            self._evict_locked()
            return key in self._entries

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
            self._evict_locked()  # a pin may have been what kept the layer over budget

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
                "node_id": ray.get_runtime_context().get_node_id(),
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
    """Client of the named cache actor; connects lazily in each process.

    Pickling keeps the name, the budget and the cluster address, never the
    actor handle: an unpickled copy finds the actor again by name.

    Args:
        name: The layer's name; the actor is ``"eeipu-prefix-cache:<name>"`` in
            namespace :data:`NAMESPACE`.
        byte_budget: Bytes the actor may hold (LRU eviction, pins kept). Only
            the process that creates the actor sets it.
        address: Ray cluster address to connect to when this process is not
            connected yet. By default ``$RAY_ADDRESS`` (which a Ray worker using
            the layer exports to the processes it spawns), then, in an unpickled
            copy, the cluster the original was used in.
    """

    def __init__(
        self, name: str, byte_budget: int | None = None, address: str | None = None
    ) -> None:
        self.name = name
        self.byte_budget = byte_budget
        self._address = address
        # (pid, gcs address) of the cluster this layer last used.
        self._used_cluster: tuple[int, str] | None = None
        self._actor: Any = None
        self._actor_session: tuple[int, str, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_actor": None, "_actor_session": None}

    def __repr__(self) -> str:
        return f"ObjectStoreLayer({self.name!r})"

    @property
    def actor_name(self) -> str:
        return ACTOR_PREFIX + self.name

    # ------------------------------------------------------------ connection
    @property
    def actor(self) -> Any:
        """The actor's handle; connects to Ray and creates the actor if needed."""
        if self._actor is not None and self._actor_session != _session():
            self._actor = None  # Ray was shut down (and maybe started again) since
        if self._actor is None:
            self._connect()
            self._actor_session = _session()
            try:
                self._actor = ray.get_actor(self.actor_name, namespace=NAMESPACE)
            except ValueError:  # none yet: create it (a racing creator's actor wins)
                self._actor = PrefixCacheActor.options(
                    name=self.actor_name,
                    namespace=NAMESPACE,
                    lifetime="detached",
                    get_if_exists=True,
                    # An explicit strategy also keeps the actor out of the caller's
                    # placement group: a Tune trial's group is removed when the trial
                    # ends, and every actor in it with it.
                    scheduling_strategy=_head_node_strategy(),
                ).remote(self.byte_budget)
        return self._actor

    def _connect(self) -> None:
        if not ray.is_initialized():
            # A process Ray did not start (a stage's subprocess, a script): join the
            # cluster the layer was used in, or $RAY_ADDRESS; only with neither does
            # ray.init look for a local cluster or start one.
            address = self._address or os.environ.get("RAY_ADDRESS") or None
            used = self._used_cluster
            if address is None and used is not None and used[0] != os.getpid():
                address = used[1]  # an unpickled copy: the original's cluster
            if address is None:
                logger.warning(
                    "object-store layer %r: Ray is not initialized and no cluster "
                    "address is known; ray.init() joins or starts a local cluster, "
                    "whose cache dies with it",
                    self.name,
                )
            ray.init(
                address=address,
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        address = ray.get_runtime_context().gcs_address
        self._used_cluster = (os.getpid(), address)
        if _in_worker_process():
            # Processes a stage spawns inherit it and join this cluster, not a new one.
            # Never in a driver: a later ray.init() there must be free to start afresh.
            os.environ.setdefault("RAY_ADDRESS", address)

    def _call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """``ray.get(actor.<method>.remote(*args))``, finding the actor again (or
        creating a fresh, empty one) if it died or was killed."""
        attempt = 1
        while True:
            try:
                return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout)
            except RayActorError as exc:
                self._actor = None
                if attempt >= _RECONNECT_ATTEMPTS:
                    raise
                logger.warning(
                    "object-store layer %r: cache actor unavailable (%s); its "
                    "entries are lost, reconnecting",
                    self.name,
                    type(exc).__name__,
                )
                time.sleep(0.2 * attempt)  # let a killed actor's name be released
                attempt += 1

    def _best_effort(
        self, method: str, *args: Any, default: Any, timeout: float = CALL_TIMEOUT_S
    ) -> Any:
        try:
            return self._call(method, *args, timeout=timeout)
        except (RayActorError, GetTimeoutError) as exc:
            logger.warning(
                "object-store layer %r: %s failed (%s); treated as a miss", self.name, method, exc
            )
            return default

    # ----------------------------------------------------------------- reads
    def get(self, key: str) -> tuple[Manifest, dict[str, Any]] | None:
        found = self._best_effort("get", key, default=None)
        if found is None:
            return None
        manifest_json, (ref,) = found
        try:
            parts = ray.get(ref, timeout=TRANSFER_TIMEOUT_S)
        except ObjectLostError as exc:
            # The object is gone (its node died, or the actor was killed meanwhile).
            logger.warning(
                "object-store layer %r: entry %s lost (%s); dropped as a miss",
                self.name,
                key[:12],
                type(exc).__name__,
            )
            self._best_effort("delete", key, default=False)
            return None
        except GetTimeoutError:
            logger.warning(
                "object-store layer %r: fetching entry %s timed out after %.0fs; treated as a miss",
                self.name,
                key[:12],
                TRANSFER_TIMEOUT_S,
            )
            return None
        return Manifest.from_json(manifest_json, key), parts

    def manifest(self, key: str) -> Manifest | None:
        raw = self._best_effort("manifest", key, default=None)
        return None if raw is None else Manifest.from_json(raw, key)

    def contains(self, key: str) -> bool:
        return bool(self._best_effort("contains", key, default=False))

    # ---------------------------------------------------------------- writes
    def put(self, key: str, manifest: Manifest, parts: dict[str, Any]) -> bool:
        """Store a copy owned by the actor. False when the key was present, the
        entry exceeds the budget, or the layer is unavailable (logged)."""
        return bool(
            self._best_effort(
                "put", key, manifest.to_json(), parts, default=False, timeout=TRANSFER_TIMEOUT_S
            )
        )

    def delete(self, key: str) -> None:
        self._best_effort("delete", key, default=False)

    def pin(self, key: str) -> None:
        self._call("pin", key)

    def unpin(self, key: str) -> None:
        self._call("unpin", key)

    def pinned(self) -> set[str]:
        return set(self._call("pinned"))

    def keys(self) -> list[str]:
        return list(self._call("keys"))

    def stats(self) -> dict[str, Any]:
        """``entries``, ``bytes``, ``pinned``, ``byte_budget``, ``hits``, ``misses``,
        and the ``node_id`` the actor (the owner of the objects) runs on."""
        return dict(self._call("stats"))

    def clear(self) -> None:
        self._call("clear")

    def kill(self, wait_s: float = 30.0) -> bool:
        """Destroy the actor and every object it owns; False if there was none.

        Waits (up to ``wait_s``) until the name is free, so that the next use
        creates a fresh, empty actor.
        """
        self._actor = None
        self._connect()
        try:
            handle = ray.get_actor(self.actor_name, namespace=NAMESPACE)
        except ValueError:
            return False
        ray.kill(handle, no_restart=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                ray.get_actor(self.actor_name, namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.05)
        return True


def _head_node_strategy() -> Any:
    """Place the actor on the head node: it lives as long as the cluster, while
    worker nodes (and the objects the actor owns there) may be scaled away. The
    head node is found as Ray Serve finds it (its ``node:__internal_head__``
    resource). The affinity is hard: the actor needs no CPU, so the head node can
    always take it, and Ray 2.60 placed most actors elsewhere under a soft one."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    for node in ray.nodes():
        if node.get("Alive") and _HEAD_RESOURCE in node.get("Resources", {}):
            return NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
    return "DEFAULT"


def _session() -> tuple[int, str, str] | None:
    """Identifies this process's current Ray connection (a handle is only valid in it)."""
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    return os.getpid(), context.gcs_address, context.get_job_id()


def _in_worker_process() -> bool:
    """Whether this process is a Ray worker (a task, an actor, a Tune trial), not a driver."""
    return getattr(ray._private.worker.global_worker, "mode", None) == ray.WORKER_MODE
