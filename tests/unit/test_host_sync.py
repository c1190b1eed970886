"""The marked host-sync region, the host-traffic audit and the sync-free host_ints."""

from __future__ import annotations

import pytest
import torch

from expert_parallel.moe.permute import exclusive_offsets, host_ints
from expert_parallel.profiling.host_sync import (
    HOST_SYNCS,
    audit_host_traffic,
    host_sync,
    in_marked_region,
)


def test_host_sync_counts_and_marks_its_region() -> None:
    before = HOST_SYNCS["unit_test"]
    assert not in_marked_region()
    with host_sync("unit_test"):
        assert in_marked_region()
        with host_sync("unit_test"):
            assert in_marked_region()
        assert in_marked_region()
    assert not in_marked_region()
    assert HOST_SYNCS["unit_test"] == before + 2
    with pytest.raises(KeyError):
        with host_sync("unit_test"):
            raise KeyError("boom")
    assert not in_marked_region()  # left even on an exception


def test_audit_tells_marked_from_stray_reads_with_their_sites() -> None:
    t = torch.arange(4)
    with audit_host_traffic() as traffic:
        with host_sync("unit_test"):
            t.tolist()
        int(t[0])
        t.sum().item()
        bool(t.any())
    assert len(traffic.marked_reads) == 1
    assert len(traffic.unmarked_reads) == 3 and traffic.reads == 4
    assert all("test_host_sync.py" in s for s in traffic.marked_reads + traffic.unmarked_reads)


def test_audit_records_host_built_and_deviceless_tensors() -> None:
    with audit_host_traffic() as traffic:
        torch.tensor([1, 2, 3], device="cpu")      # host data -> device: a copy
        torch.as_tensor(5, device="cpu")           # the same
        host_ints([1, 2], torch.device("cpu"))     # sanctioned: staged on CUDA
        torch.as_tensor(torch.ones(2, device="cpu"))  # already a tensor: keeps its device
        torch.arange(3)                            # no device=: the CPU on a GPU run
        torch.zeros(2, device="cpu")
        torch.ones(2, device="cpu").new_zeros(3)   # inherits its device
    assert len(traffic.host_to_device) == 2
    assert len(traffic.implicit_device) == 1  # the arange
    assert all("test_host_sync.py" in s for s in traffic.host_to_device + traffic.implicit_device)


def test_audit_restores_torch_even_on_error() -> None:
    originals = (torch.Tensor.tolist, torch.Tensor.__bool__, torch.tensor, torch.as_tensor)
    with pytest.raises(RuntimeError):
        with audit_host_traffic():
            raise RuntimeError("boom")
    assert (torch.Tensor.tolist, torch.Tensor.__bool__, torch.tensor, torch.as_tensor) == originals
    with audit_host_traffic() as traffic:
        pass
    torch.arange(2).tolist()
    assert traffic.reads == 0 and traffic.implicit_device == []


def test_host_ints_on_cpu() -> None:
    out = host_ints((3, 0, 2), torch.device("cpu"))
    assert out.dtype == torch.int64 and out.tolist() == [3, 0, 2]
    assert exclusive_offsets([3, 0, 2], torch.device("cpu")).tolist() == [0, 3, 3]
    assert host_ints([], torch.device("cpu")).shape == (0,)
