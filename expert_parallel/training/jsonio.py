"""Reading a user's JSON file (``--config``, ``--deepspeed``) with named errors."""

from __future__ import annotations

import json
import os


def read_json_object(path: object, label: str) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming ``label`` and the path when the
    file is missing, is not JSON, or holds something other than an object."""
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"{label}: file {path!r} does not exist")
    try:
        with open(path) as fh:
            loaded = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{label}: {path!r} is not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{label}: {path!r} must hold a JSON object, got {type(loaded).__name__}")
    return loaded


__all__ = ["read_json_object"]
