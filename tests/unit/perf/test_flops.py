"""Device peaks by exact model: ``device_peak_flops`` never takes one device for another."""

from __future__ import annotations

import pytest

from pretrain.perf.flops import device_model, device_peak_flops

# torch.cuda.get_device_name() as the devices report themselves -> the model in the table
NAMES = [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L40", "L40"),
    ("NVIDIA A10G", "A10G"),
    ("NVIDIA A10", "A10"),
    ("Tesla V100-SXM2-16GB", "V100 SXM"),
    ("Tesla V100-PCIE-32GB", "V100 PCIe"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
]


@pytest.mark.parametrize("name, model", NAMES)
def test_each_device_name_is_its_own_model(name, model):
    assert device_model(name) == model


def test_l40s_is_not_an_l4_and_pcie_or_nvl_parts_are_not_the_sxm_one():
    assert device_peak_flops("NVIDIA L40S", "bf16") == pytest.approx(362.05e12)
    assert device_peak_flops("NVIDIA L4", "bf16") == pytest.approx(121e12)
    sxm = device_peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert device_peak_flops("NVIDIA H100 PCIe", "bf16") < sxm
    assert device_peak_flops("NVIDIA H200 NVL", "bf16") < device_peak_flops("NVIDIA H200", "bf16") == sxm


def test_an_unknown_device_or_a_missing_path_gives_none():
    assert device_peak_flops("Some Future Accelerator 9000", "bf16") is None
    assert device_peak_flops("NVIDIA A1000", "bf16") is None  # not an A100, not an A10
    assert device_peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # V100 has no bf16
    with pytest.raises(ValueError, match="precision"):
        device_peak_flops("NVIDIA L4", "int8")
