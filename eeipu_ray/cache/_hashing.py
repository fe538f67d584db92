"""A file wrapper that checksums and counts the bytes written through it."""

from __future__ import annotations

import threading
from typing import Any

import xxhash

_OVERLAP_BYTES = 8 * 2**20


class HashingWriter:
    """File wrapper that checksums (xxh3-128) and counts what passes through."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self._hash = xxhash.xxh3_128()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes >= _OVERLAP_BYTES:
            # The write syscall releases the GIL: checksum while the kernel copies.
            failure: list[BaseException] = []

            def write_all() -> None:
                try:
                    self._fh.write(view)
                except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    failure.append(exc)

            writer = threading.Thread(target=write_all, name="eeipu-cache-write")
            writer.start()
            self._hash.update(view)
            writer.join()
            if failure:
                raise failure[0]
        else:
            self._hash.update(view)
            self._fh.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:  # the owner closes the real file
        self.closed = True

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
