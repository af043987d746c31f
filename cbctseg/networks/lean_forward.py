"""nnU-Net's U-Net forward pass, run so that each activation is freed as soon as it has been used.

nnU-Net's decoder keeps every skip connection until the whole decoder has run and holds a concatenation's
two inputs beside it, and every block keeps its input while its submodules run. At full resolution (32
channels of 160x320x320 in fp16 are 1.05 GB each in the ToothFairy2 network) that makes the peak of an eager
pass. Here the same modules run in the same order with the same arithmetic (the answer is the same bit for
bit), but:

- the skip connection is copied into the concatenation's buffer and released before the upsampled tensor
  exists, and the upsampled tensor is released once copied;
- blocks run one module at a time, so each input is released as soon as its output exists, and a residual
  block releases its first convolution's output once the second has read it.

On the CPU, every 3D convolution with a kernel larger than one voxel runs through oneDNN. torch itself does so
for a batch of two windows or more, but sends one window's small deep-stage convolutions (fewer than 20480
batch x channel x depth x height values) down its slow im2col path: 40 % of a single window's CPU time on
the bundled network, whose forward pass takes 0.21 s instead of 0.37 s without it (1 thread). The answer is
that of nnU-Net's forward on a batch of two, bit for bit; on a single window it differs from torch's slow
path by float rounding only.

With `head_by_chunks`, the pass stops before the segmentation layer (a 1x1x1 convolution) and returns
`ChunkedLogits`: the decoder's last features, from which the layer computes the channels the stitcher reads, a
chunk at a time. The window's whole output (43 channels of 160x320x320: 2.8 GB in fp32 on the CPU, 1.4 GB in
fp16 on a GPU) never exists; the features it is computed from (4 to 32 channels) are held instead.

Eager only: a compiled graph (torch.compile, AOT package) already frees each buffer after its last use.
Networks of another structure (deep supervision, other decoders) run as they are.
"""
from __future__ import annotations

import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU, StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

from cbctseg.networks.precision import autocast, is_pointwise, pointwise


def _chain(m: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The modules m applies one after the other (its forward is exactly that chain), or None for any other m."""
    if type(m) is torch.nn.Sequential:
        return list(m)
    inner = {StackedConvBlocks: "convs", ConvDropoutNormReLU: "all_modules", StackedResidualBlocks: "blocks"}
    return [getattr(m, inner[type(m)])] if type(m) in inner else None


def _through_onednn(conv: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether conv runs on x through oneDNN here: a plain 3D convolution (kernel above one voxel, zero padding)
    on contiguous fp32 CPU tensors, without autocast, where torch has oneDNN."""
    return (type(conv) is torch.nn.Conv3d and x.device.type == "cpu" and x.dtype == torch.float32
            and conv.weight.dtype == torch.float32 and conv.kernel_size != (1, 1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and x.is_contiguous()
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)


def _run(m: torch.nn.Module, held: list[torch.Tensor]) -> torch.Tensor:
    """m applied to the tensor popped from `held`: the caller keeps no reference, so each input is released
    as soon as the module that reads it has run."""
    chain = _chain(m)
    if chain is not None:
        return _run_chain(chain, held)
    if type(m) is BasicBlockD:
        return _residual_block(m, held)
    if _through_onednn(m, held[-1]):
        return onednn_convolution(m, held.pop())
    return m(held.pop())


# oneDNN works on copies of a convolution's input and output in its blocked layouts, whose channels it pads to
# a block of 16: a full-resolution convolution of a 160x320x320 window with 1 or 4 channels held 1.3 GB at its
# peak for a 0.26 GB output. Convolutions whose copies would pass this many bytes run slab by slab along z.
SLAB_BYTES = 128 * 1024**2


def _blocked(channels: int) -> int:
    return -(-channels // 16) * 16


def onednn_convolution(conv: torch.nn.Conv3d, x: torch.Tensor, slab_bytes: int = SLAB_BYTES) -> torch.Tensor:
    """conv(x) through oneDNN; a stride-1 convolution padded to keep its depth runs slab by slab along z
    when oneDNN's copies of the whole would pass slab_bytes (each slab with its neighbouring slices, zeros
    beyond the volume, as the convolution's own padding)."""
    run = torch.ops.aten.mkldnn_convolution
    k, p = conv.kernel_size[0], conv.padding[0]
    per_slice = (_blocked(conv.in_channels) + _blocked(conv.out_channels)) * x[:, 0, 0].numel() * x.element_size()
    slices = max(1, slab_bytes // per_slice)
    if (slices >= x.shape[2] or conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) or k % 2 == 0
            or p != k // 2):
        return run(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
    depth = x.shape[2]
    out = torch.empty((x.shape[0], conv.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device)
    padding = (0, *conv.padding[1:])
    for z0 in range(0, depth, slices):
        z1 = min(depth, z0 + slices)
        lo, hi = max(0, z0 - p), min(depth, z1 + p)
        part = x[:, :, lo:hi]
        if z0 - lo < p or hi - z1 < p:
            part = torch.nn.functional.pad(part, (0, 0, 0, 0, p - (z0 - lo), p - (hi - z1)))
        out[:, :, z0:z1] = run(part.contiguous(), conv.weight, conv.bias, padding, conv.stride, conv.dilation,
                               conv.groups)
    return out


def _run_chain(modules: list[torch.nn.Module], held: list[torch.Tensor]) -> torch.Tensor:
    """modules applied in turn to the tensor popped from `held`, each output replacing its input there."""
    for m in modules:
        held.append(_run(m, held))
    return held.pop()


def _residual_block(block: BasicBlockD, held: list[torch.Tensor]) -> torch.Tensor:
    """BasicBlockD.forward, step by step: the first convolution's output is released once the second has read it."""
    x = held.pop()
    residual = block.skip(x)
    held.append(x)
    del x
    out = _run_chain([block.conv1, block.conv2], held)
    if block.apply_stochastic_depth:
        out = block.drop_path(out)
    if block.apply_se:
        out = block.squeeze_excitation(out)
    out += residual
    del residual
    return block.nonlin2(out)


def supported(net: torch.nn.Module) -> bool:
    """Whether net is a U-Net this module knows how to run: nnU-Net's encoders returning skips, its decoder."""
    enc, dec = getattr(net, "encoder", None), getattr(net, "decoder", None)
    return (type(enc) in (ResidualEncoder, PlainConvEncoder) and enc.return_skips and type(dec) is UNetDecoder
            and not dec.deep_supervision and len(dec.stages) == len(dec.transpconvs))


class ChunkedLogits:
    """A batch of windows' logits (B, C, *patch), held as the decoder's last features (B, F, *patch).

    Indexing with a window number gives that window's logits, also chunked; indexing one window's logits with
    (channels, *spatial slices) computes those channels with the segmentation layer, under the device's
    autocast as the network ran, and returns that tensor. The same sums as the layer itself (on the CPU
    `precision.pointwise`'s matrix product), for fewer output channels at a time."""

    def __init__(self, features: torch.Tensor, head: torch.nn.Conv3d, window: int | None = None):
        self.features, self.head, self.window = features, head, window
        spatial = features.shape[2:]
        self.shape = (head.out_channels, *spatial) if window is not None else \
            (features.shape[0], head.out_channels, *spatial)

    def is_contiguous(self) -> bool:
        return True  # each chunk is computed contiguous

    def __getitem__(self, key):
        if self.window is None:
            if not isinstance(key, int):
                raise TypeError("index a batch's ChunkedLogits by window first")
            return ChunkedLogits(self.features, self.head, range(self.features.shape[0])[key])
        channels, *spatial = key if isinstance(key, tuple) else (key,)
        # only the voxels asked for (a copy only where they are not the whole window)
        x = self.features[self.window][(slice(None), *spatial)].contiguous()[None]
        bias = self.head.bias[channels] if self.head.bias is not None else None
        with autocast(x.device):
            return pointwise(self.head.weight[channels], bias, x)[0]


class LeanUNet(torch.nn.Module):
    """A fold's network run lean; `net` is the network itself (its weights, unchanged). head_by_chunks: the
    forward pass returns ChunkedLogits instead of the logits."""

    def __init__(self, net: torch.nn.Module, head_by_chunks: bool = False):
        super().__init__()
        self.net = net
        self.head_by_chunks = head_by_chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor | ChunkedLogits:
        enc, dec = self.net.encoder, self.net.decoder
        held = [x]  # the caller still holds the input window
        if getattr(enc, "stem", None) is not None:
            held.append(_run(enc.stem, held))
        skips = []
        for stage in enc.stages:
            held.append(_run(stage, held))
            skips.append(held[-1])  # every stage's output is a skip connection
        held.clear()
        lres = skips.pop()
        for s, stage in enumerate(dec.stages):
            skip = skips.pop()
            up_channels = dec.transpconvs[s].out_channels
            cat = torch.empty((skip.shape[0], up_channels + skip.shape[1], *skip.shape[2:]), dtype=skip.dtype,
                              device=skip.device)
            cat[:, up_channels:] = skip
            del skip
            up = dec.transpconvs[s](lres)
            del lres
            if up.dtype != cat.dtype or up.shape[2:] != cat.shape[2:]:
                cat = torch.cat((up, cat[:, up_channels:]), 1)  # what nnU-Net does: never expected here
            else:
                cat[:, :up_channels] = up
            del up
            held.append(cat)
            del cat
            lres = _run(stage, held)
        head = dec.seg_layers[-1]
        if self.head_by_chunks and type(head) is torch.nn.Conv3d and is_pointwise(head):
            return ChunkedLogits(lres, head)
        return head(lres)


def lean(net: torch.nn.Module, head_by_chunks: bool = False) -> torch.nn.Module:
    """net wrapped to run lean, or net itself where its structure is not nnU-Net's U-Net."""
    return LeanUNet(net, head_by_chunks) if supported(net) else net
