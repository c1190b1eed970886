"""Precision detection (``distributed/device.py``) with the CPU capability faked both ways.

``auto`` must mean bf16 autocast exactly where the CPU has AVX512-BF16 or AMX-BF16, fp32
elsewhere; explicit choices are taken as asked; the detection runs once and is cached.
"""

from __future__ import annotations

import pytest
import torch

from expert_parallel.distributed import device as dev

ZEN4_FLAGS = frozenset("fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni".split())
SPR_FLAGS = frozenset("fpu avx2 avx512f amx_tile amx_bf16 amx_int8".split())
AVX512_ONLY = frozenset("fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni".split())


@pytest.fixture
def fake_flags(monkeypatch):
    calls = {"n": 0}

    def install(flags: frozenset) -> dict:
        def read() -> frozenset:
            calls["n"] += 1
            return flags
        monkeypatch.setattr(dev, "_read_cpu_flags", read)
        dev.native_bf16.cache_clear()
        return calls

    yield install
    dev.native_bf16.cache_clear()  # the real machine's answer for later tests


@pytest.mark.parametrize("flags,native", [(ZEN4_FLAGS, True), (SPR_FLAGS, True),
                                          (AVX512_ONLY, False), (frozenset(), False)])
def test_auto_follows_native_bf16(fake_flags, flags, native) -> None:
    fake_flags(flags)
    p = dev.resolve_precision("auto", torch.device("cpu"))
    assert p.requested == "auto"
    assert p.name == ("bf16" if native else "fp32")
    assert p.autocast_dtype is (torch.bfloat16 if native else None)
    if native:
        assert any(f in p.reason for f in dev.NATIVE_BF16_CPU_FLAGS), p.reason
    else:
        assert "emulated" in p.reason


def test_detected_once(fake_flags) -> None:
    calls = fake_flags(ZEN4_FLAGS)
    for _ in range(3):
        dev.resolve_precision("auto", "cpu")
    assert calls["n"] == 1


@pytest.mark.parametrize("flags", [ZEN4_FLAGS, AVX512_ONLY])
def test_explicit_choices_are_taken_as_asked(fake_flags, flags) -> None:
    fake_flags(flags)
    assert dev.resolve_precision("fp32", "cpu").name == "fp32"
    bf16 = dev.resolve_precision("bf16", "cpu")
    assert bf16.name == "bf16" and bf16.autocast_dtype is torch.bfloat16
    # Asking for bf16 where it is emulated works, but the reason says so.
    assert ("emulated" in bf16.reason) == (flags is AVX512_ONLY)


def test_invalid_choice_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"dtype must be one of \['auto', 'bf16', 'fp32'\], got 'fp16'"):
        dev.resolve_precision("fp16", "cpu")


def test_cuda_without_a_gpu_is_fp32(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dev.native_bf16.cache_clear()
    try:
        p = dev.resolve_precision("auto", "cuda")
        assert p.name == "fp32" and "not available" in p.reason
    finally:
        dev.native_bf16.cache_clear()


def test_autocast_contexts(fake_flags) -> None:
    fake_flags(ZEN4_FLAGS)
    w = torch.randn(4, 4)
    with dev.resolve_precision("auto", "cpu").autocast("cpu"):
        assert (torch.randn(2, 4) @ w).dtype == torch.bfloat16
    # fp32 switches autocast off even inside an outer bf16 region.
    with torch.autocast("cpu", dtype=torch.bfloat16), dev.resolve_precision("fp32", "cpu").autocast("cpu"):
        assert (torch.randn(2, 4) @ w).dtype == torch.float32
    assert dev.resolve_precision("auto", "cpu").to_dict()["dtype"] == "bf16"


def test_real_cpuinfo_parses() -> None:
    # Whatever this machine is, detection returns a decision with a reason.
    dev.native_bf16.cache_clear()
    native, reason = dev.native_bf16("cpu")
    assert isinstance(native, bool) and reason
