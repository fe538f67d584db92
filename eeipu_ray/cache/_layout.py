"""Names of the files in a store's entries, and the data folder a manifest names."""

from __future__ import annotations

import json
import re

MANIFEST = "manifest.json"
USED = "used"
#: An entry's key as it appears in a path: 64 hex characters.
KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def data_dir_of(raw: bytes) -> str | None:
    """The ``data_dir`` the manifest bytes ``raw`` name; ``None`` if they are no JSON object."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc.get("data_dir") if isinstance(doc, dict) else None
