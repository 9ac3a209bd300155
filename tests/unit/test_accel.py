"""The KVM CPU model probe against the real QEMU binary (when KVM is usable here)."""

from __future__ import annotations

import pytest

from qvirtd.qemu import accel


@pytest.mark.skipif(not accel.kvm_usable(), reason="/dev/kvm is not usable here")
async def test_probe_picks_a_cpu_model_that_starts() -> None:
    accel._cpu_models.clear()
    model = await accel.kvm_cpu_model("qemu-system-x86_64")
    assert model in (accel.CPU_HOST, accel.CPU_HOST_NO_ARCH_CAPS)
    assert accel._starts_with("qemu-system-x86_64", model)
    # Cached: a second call does not probe again.
    assert await accel.kvm_cpu_model("qemu-system-x86_64") == model


async def test_tcg_gets_qemus_default_cpu() -> None:
    assert await accel.cpu_model("tcg", "qemu-system-x86_64") is None


def test_a_binary_that_does_not_start_falls_back_to_host() -> None:
    assert accel.probe_kvm_cpu("/nonexistent/qemu") == accel.CPU_HOST
