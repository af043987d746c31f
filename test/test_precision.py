"""Storing convolutions and the input in the autocast dtype gives autocast's answer bit for bit, in half the bytes.

A GPU runs the networks under fp16 autocast; a CPU cannot, so these tests use the CPU's own autocast (bf16),
which casts convolutions the same way and leaves normalisation alone, as CUDA's does.
"""
from __future__ import annotations

import copy

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from cbctseg.networks import precision
from cbctseg.model.loading import ModelError, load_model

CPU = torch.device("cpu")


def _plain_unet() -> torch.nn.Module:
    """nnU-Net's other network family (the bundled weights are a residual encoder U-Net)."""
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv3d, 3, (1, 2, 2), (2, 2, 2), 5, (2, 2),
                         conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}).eval()


@pytest.mark.parametrize("family", ["residual encoder (bundled weights)", "plain conv"])
def test_stored_convolutions_answer_as_autocast_does(weights, family):
    if family.startswith("residual"):
        model = load_model(weights)
        nets, patch = model.networks, model.patch_size
    else:
        nets, patch = [_plain_unet()], (16, 32, 32)
    x = torch.randn((1, 1, *patch), generator=torch.Generator().manual_seed(0))
    for net in nets:
        stored = copy.deepcopy(net)
        saved = precision.store_convolutions_as(stored, torch.bfloat16)
        convs = sum(p.numel() for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)
                    for p in m.parameters(recurse=False))
        assert saved == 2 * convs  # 4 bytes -> 2 per convolution parameter
        norms = [m for m in stored.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
        assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected = net(x)
            assert torch.equal(stored(x.to(torch.bfloat16)), expected)
            assert torch.equal(stored(x), expected)


def test_the_cpu_keeps_fp32_and_a_gpu_gets_fp16(weights):
    model = load_model(weights)  # on the CPU: nothing changes
    assert model.input_dtype == torch.float32
    assert {p.dtype for net in model.networks for p in net.parameters()} == {torch.float32}
    net = copy.deepcopy(model.networks[0])
    assert precision.prepare(net, CPU) == 0
    # what load_model does on a GPU (the conversion itself does not need one)
    assert precision.prepare(net, torch.device("cuda")) > 0
    assert {type(m).__name__ for m in net.modules() for p in m.parameters(recurse=False)
            if p.dtype == torch.float16} == {"Conv3d", "ConvTranspose3d"}
    assert precision.input_dtype(torch.device("cuda")) == torch.float16
    assert precision.input_dtype(CPU) == torch.float32
