"""Loading checkpoint files without running code from them.

A checkpoint directory is input from the file system, and the sha256 manifest beside it
proves only that the files were not changed *after* the manifest was written: whoever
can plant a file can rewrite the manifest too. Python's ``pickle`` runs code named by the
file (``__reduce__``), so every pickle we read goes through a restricted loader:

* our own side files (``extra_rank<r>.pt``) hold tensors only and are read with
  ``torch.load(weights_only=True)`` (:func:`load_tensors`);
* ``torch.distributed.checkpoint`` in torch 2.13 reads its ``.metadata`` file with plain
  ``pickle.load`` (``FileSystemReader.read_metadata``), and items it stored as bytes with
  ``torch.load(weights_only=False)`` (``DefaultLoadPlanner.load_bytes``). Its tensor
  payloads are read with ``weights_only=True``. :class:`SafeFileSystemReader` unpickles
  the metadata with an allow-list of the plain classes DCP writes there (its metadata
  dataclasses, ``torch.Size``, dtypes, paths) and refuses any bytes item, which our
  writer never produces (every value we save is a tensor), or any storage path that
  leaves the checkpoint directory.

Anything else is an :class:`UnsafeCheckpointError` naming the file and the offending
global, raised before the object is built.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md

DCP_METADATA = ".metadata"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would run code (or read outside its directory) when loaded."""


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """A ``torch.save``'d ``{name: tensor}`` file, read with ``weights_only=True``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"{path}: refusing to load: it is not plain tensor data ({first})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise UnsafeCheckpointError(f"{path}: expected a {{name: tensor}} dict, got {type(obj).__name__}")
    return obj


def _allowed(module: str, name: str) -> Any:
    """The object ``module.name`` if DCP's metadata may reference it, else None."""
    if module == dcp_md.__name__:
        obj = getattr(dcp_md, name, None)
        return obj if isinstance(obj, type) else None
    if (module, name) == (dcp_fs.__name__, "_StorageInfo"):
        return dcp_fs._StorageInfo
    if module == "torch":
        obj = getattr(torch, name, None)
        if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
        return None
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout  # maps a layout's name to the layout
    if module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath",
                                        "PureWindowsPath"):
        return getattr(pathlib, name)
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed(module, name)
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self.path}: refusing to load: the DCP metadata references {module}.{name}, "
                "which is not part of a checkpoint's metadata")
        return obj


def read_dcp_metadata(checkpoint_dir: str) -> dcp_md.Metadata:
    """Unpickle ``checkpoint_dir/.metadata`` with the allow-list; check what it describes."""
    path = os.path.join(checkpoint_dir, DCP_METADATA)
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        md = _MetadataUnpickler(data, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # truncated / garbage: not loadable either way
        raise UnsafeCheckpointError(f"{path}: unreadable DCP metadata ({type(err).__name__}: {err})") from None
    if not isinstance(md, dcp_md.Metadata):
        raise UnsafeCheckpointError(f"{path}: expected DCP Metadata, got {type(md).__name__}")
    for key, item in md.state_dict_metadata.items():
        if not isinstance(item, dcp_md.TensorStorageMetadata):
            # DCP would torch.load(weights_only=False) such an item; we never write one.
            raise UnsafeCheckpointError(f"{path}: entry {key!r} is {type(item).__name__}, "
                                        "not a tensor; refusing to unpickle it")
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.path.isabs(rel) or os.path.normpath(rel).startswith(".."):
            raise UnsafeCheckpointError(f"{path}: storage path {rel!r} leaves the checkpoint directory")
    return md


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata is read by :func:`read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_md.Metadata:
        if kwargs.get("rank") is not None:
            raise UnsafeCheckpointError("per-rank DCP metadata files are not used by this project")
        md = read_dcp_metadata(str(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_md.StorageMeta()
        md.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return md


__all__ = ["UnsafeCheckpointError", "load_tensors", "read_dcp_metadata", "SafeFileSystemReader"]
