"""The lean forward pass: nnU-Net's answer bit for bit, with fewer bytes alive at its peak."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from cbctseg.networks import lean_forward
from cbctseg.networks.compile_cache import maybe_compile
from cbctseg.model.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from live_memory import LiveBytes  # noqa: E402  (measurement code lives with the benchmark)

CPU = torch.device("cpu")
NORM = {"norm_op": torch.nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "nonlin": torch.nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}


def _networks(weights) -> dict[str, tuple[torch.nn.Module, tuple[int, ...]]]:
    """The bundled residual encoder U-Net and nnU-Net's plain one, random weights (norms included)."""
    model = load_model(weights)
    torch.manual_seed(0)
    plain = PlainConvUNet(1, 4, (8, 16, 32, 32), torch.nn.Conv3d, 3, (1, 2, 2, 2), (2, 2, 2, 2), 5, (2, 2, 1),
                          conv_bias=True, **NORM).eval()
    residual = ResidualEncoderUNet(1, 3, (8, 16, 32), torch.nn.Conv3d, 3, (1, 2, 2), (1, 2, 3), 5, (1, 1),
                                   conv_bias=True, **NORM).eval()
    for net in (plain, residual):
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.3)  # affine norms away from 1 and 0, so that every parameter matters
    return {"bundled": (model.networks[0], model.patch_size), "plain": (plain, (16, 32, 32)),
            "residual": (residual, (16, 32, 32))}


@pytest.fixture(scope="module")
def networks(weights):
    return _networks(weights)


@pytest.mark.parametrize("name", ["bundled", "plain", "residual"])
def test_the_lean_pass_answers_as_nnunets_forward_bit_for_bit(networks, name):
    net, patch = networks[name]
    lean = lean_forward.lean(net)
    assert isinstance(lean, lean_forward.LeanUNet)
    x = torch.randn((2, 1, *patch), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(lean(x), net(x))
        # one window: every convolution through oneDNN, as torch runs them for a batch of two, not its slow path
        assert torch.equal(lean(x[:1]), net(x)[:1])


def test_logits_by_chunks_are_the_segmentation_layers_output(networks):
    """The stitcher reads a window's logits a chunk of channels and a region at a time; each read is the
    segmentation layer's output there, and the whole output never exists."""
    net, patch = networks["bundled"]
    x = torch.randn((2, 1, *patch), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = lean_forward.lean(net)(x)
        chunked = lean_forward.lean(net, head_by_chunks=True)(x)
        assert isinstance(chunked, lean_forward.ChunkedLogits) and chunked.shape == full.shape
        assert chunked[1].shape == full[1].shape
        for window, channels, region in ((0, slice(None), ()), (1, slice(2, 5), (slice(3, 11), slice(None),
                                                                                slice(5, 40)))):
            part = chunked[window][(channels, *region)]
            assert part.is_contiguous()
            torch.testing.assert_close(part, full[window][(channels, *region)], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
def test_a_convolution_by_slabs_is_the_whole_convolution_bit_for_bit(networks):
    """A large window's full-resolution convolutions run slab by slab along z, each slab with its neighbouring
    slices or the zero padding at the volume's ends: the same output bit for bit, as torch's for a batch of two."""
    net, _ = networks["bundled"]
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3, 3, 3)
                and m.stride == (1, 1, 1) and m.in_channels > 1)
    x = torch.randn((1, conv.in_channels, 21, 24, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole = lean_forward.onednn_convolution(conv, x, slab_bytes=1 << 40)
        assert torch.equal(whole, conv(torch.cat([x, x]))[:1])
        for slab_bytes in (1, x.numel() * 4, x.numel() * 4 * 3):  # 1 slice, a few, most of the volume per slab
            assert torch.equal(lean_forward.onednn_convolution(conv, x, slab_bytes=slab_bytes), whole)


def _peak(run, x) -> int:
    tracker = LiveBytes()
    tracker.track(x)
    with torch.inference_mode(), tracker:
        y = run(x)
    del y
    return tracker.peak


@pytest.mark.parametrize("name", ["bundled", "plain"])
def test_the_lean_pass_holds_fewer_bytes_at_its_peak(networks, name):
    net, patch = networks[name]
    x = torch.randn((1, 1, *patch))
    full, lean = _peak(net, x), _peak(lean_forward.lean(net), x)
    # one full-resolution activation is the unit: nnU-Net's decoder holds about two more of them at its peak
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d)).out_channels
    activation = first * x[0, 0].numel() * x.element_size()
    assert full - lean >= activation, (full, lean, activation)


def test_other_networks_run_as_they_are():
    net = PlainConvUNet(1, 3, (8, 16, 32), torch.nn.Conv3d, 3, (1, 2, 2), (2, 2, 2), 5, (2, 2), conv_bias=True,
                        deep_supervision=True, **NORM)
    assert lean_forward.lean(net) is net
    conv = torch.nn.Conv3d(1, 2, 3)
    assert lean_forward.lean(conv) is conv


def test_eager_networks_are_run_lean_and_compiled_ones_are_not(weights):
    model = load_model(weights)
    backend = maybe_compile(model.networks, CPU, weights, 64, None)
    assert backend.describe()["compile"] is False
    assert all(isinstance(n, lean_forward.LeanUNet) and n.net is m for n, m in zip(backend.networks, model.networks))
