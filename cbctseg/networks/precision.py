"""How the networks compute on a device: fp16 autocast on a GPU, fp32 elsewhere, and storage to match.

Under autocast every convolution casts its input, weight and bias to fp16 before it runs, and normalisation
runs on the fp16 activations with its own fp32 parameters. Storing the convolutions' weights and the image in
fp16 up front therefore gives the same answer bit for bit, while the GPU holds half the bytes for them and
autocast keeps no fp16 copies of the weights during a pass (141.5 M parameters per ToothFairy2 fold: 566 MB
in fp32, 283 MB in fp16).

Networks stay contiguous (NCDHW), as nnU-Net's: channels-last (NDHWC) was slower eager on an H100 and is
unmeasured compiled; bench/probe.py's layout step measures it.
"""
from __future__ import annotations

import contextlib
import types

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype convolutions compute in on this device; None where the networks run in plain fp32."""
    return torch.float16 if torch.device(device).type == "cuda" else None


def autocast(device: torch.device):
    """How the networks run: fp16 autocast on a GPU, plain fp32 elsewhere."""
    dtype = autocast_dtype(device)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def input_dtype(device: torch.device) -> torch.dtype:
    """The dtype the networks' input is kept in: what the first convolution would cast it to anyway."""
    return autocast_dtype(device) or torch.float32


def store_convolutions_as(net: torch.nn.Module, dtype: torch.dtype) -> int:
    """Convert every convolution's (and transposed convolution's) parameters to dtype, in place; bytes saved.

    Only correct when the network then runs under autocast to dtype (which casts them anyway) and its input
    reaches a convolution first: nnU-Net's encoders all start with one. Normalisation keeps fp32 parameters.
    """
    saved = 0
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.modules.conv._ConvNd):
                for p in module.parameters(recurse=False):
                    if p.dtype != dtype:
                        saved += p.numel() * (p.element_size() - dtype.itemsize)
                        # as Module.to does for plain tensors; also works on fake tensors (bench/forward_memory.py)
                        p.data = p.data.to(dtype)
    return saved


def layout_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last_3d for a 5-D tensor stored channels-last (and not also contiguous), else contiguous_format."""
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def pointwise(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 convolution (weight (C, F, 1, 1, 1)) of x (N, F, ...) as one matrix product into a contiguous
    output (the same sums, fp32 rounding); the convolution itself for anything but contiguous fp32 without
    autocast."""
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or not x.is_contiguous()
            or torch.is_autocast_enabled(x.device.type)):
        return torch.nn.functional.conv3d(x, weight, bias)
    n, c = x.shape[:2]
    # detached: a weight that requires grad sends matmul down a path with a second output-sized tensor
    y = torch.matmul(weight.detach().reshape(weight.shape[0], c), x.reshape(n, c, -1))
    if bias is not None:
        y += bias.detach()[:, None]
    return y.view(n, weight.shape[0], *x.shape[2:])


def _pointwise(conv: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    return pointwise(conv.weight, conv.bias, x)


def segmentation_layers_as_matmul(net: torch.nn.Module) -> int:
    """Run the decoder's segmentation layers (1x1x1 convolutions) as matrix products; how many were changed.

    On the CPU, oneDNN writes a convolution's output in its blocked layout (channels padded to a block) and
    then converts it: the 43-channel output of a 160x320x320 window (2.8 GB in fp32) is held about twice over,
    3 GB more at the pass's peak (measured), and slower than the matrix product.
    """
    layers = getattr(getattr(net, "decoder", None), "seg_layers", None) or []
    changed = 0
    for conv in layers:
        if is_pointwise(conv):
            conv.forward = types.MethodType(_pointwise, conv)
            changed += 1
    return changed


def is_pointwise(conv: torch.nn.Module) -> bool:
    """Whether conv is a plain 1x1x1 3D convolution (a matrix product over its channels)."""
    return (isinstance(conv, torch.nn.Conv3d) and conv.kernel_size == (1, 1, 1) and conv.stride == (1, 1, 1)
            and conv.padding == (0, 0, 0) and conv.dilation == (1, 1, 1) and conv.groups == 1)


def prepare(net: torch.nn.Module, device: torch.device) -> int:
    """Store a network (already on device) as it computes there; bytes saved (0 where nothing changes)."""
    if torch.device(device).type == "cpu":
        segmentation_layers_as_matmul(net)
    dtype = autocast_dtype(device)
    return store_convolutions_as(net, dtype) if dtype is not None else 0
