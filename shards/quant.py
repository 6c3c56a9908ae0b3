"""4-bit (and GPTQ 8-bit) linear weights: the formats, their (un)packing and dequantization, and the linear
methods that hold a rank's slice of them.

Formats (all dequantized in float32, then cast to the compute dtype, and a plain `F.linear`; on CUDA
shards/triton_quant.py's fused kernels dequantize the same way tile by tile):

- `bitsandbytes-nf4`: quantized at load time as bitsandbytes' `quantize_4bit(w, blocksize=64,
  quant_type="nf4", compress_statistics=double)` does it, on this rank's slice of each checkpoint tensor
  (`layer.nf4[shard_id]`, fused parts each their own), flattened row-major. A state: `weight` uint8
  [ceil(n / 2)], two codes a byte, the first element in the high nibble; `absmax` float32 [ceil(n / 64)], or
  with double quantization `absmax` uint8 codes of bitsandbytes' signed dynamic 8-bit map over blocks of 256
  of (absmax - offset) (the nearest code), with `absmax2` float32 [ceil(blocks / 256)] and the float32
  scalar `offset`; `shape`. Also read pre-quantized, as transformers' `save_pretrained` writes a
  `load_in_4bit` model (`quant_method` "bitsandbytes"): per linear `weight` uint8 [ceil(n / 2), 1] (the packed
  codes), `weight.absmax` (float32, or uint8 codes with double quantization), `weight.quant_map` (the code
  book), `weight.quant_state.bitsandbytes__nf4` (uint8 bytes of a JSON object: quant_type, blocksize, dtype,
  shape, and with double quantization nested_blocksize, nested_dtype, nested_offset), with double
  quantization `weight.nested_absmax` float32 and `weight.nested_quant_map`.
- `gptq` (AutoGPTQ's v1 checkpoints, bits 4 or 8): `qweight` int32 [in * bits / 32, out], packed along the
  input, element j of a word at bits [j * bits, (j + 1) * bits); `qzeros` int32 [groups, out * bits / 32],
  packed along the output the same way, storing zero - 1; `scales` float16 [groups, out]; `g_idx` int32 [in]
  (each input channel's group; with desc_act an arbitrary order). w[o, i] = scale[g, o] * (q[i, o] - zero[g, o]).
- `awq` (AutoAWQ's GEMM layout, 4 bits): `qweight` int32 [in, out / 8] and `qzeros` int32 [groups, out / 8],
  both packed along the output in the interleaved order AWQ_ORDER; `scales` float16 [groups, out].
  w[o, i] = scale[g, o] * (q[i, o] - zero[g, o]), g = i // group_size.

Each parameter a checkpoint fills carries its axes (`out_dim`, `out_div`, `in_dim`, `in_div`: which
checkpoint dimension holds output / input channels and how many channels one row or column of it covers),
so the parallel layers slice it without knowing the format. Row-parallel layers split input channels on
whole groups only.
"""

import functools
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shards.layers import read_slice

NF4_BLOCK = 64
NF4_DOUBLE_BLOCK = 256
# bitsandbytes' NF4 code book (the quantiles of N(0, 1), normalised to [-1, 1]).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # slot j of a packed word holds output channel AWQ_ORDER[j] of its 8
METHODS = ("bitsandbytes-nf4", "gptq", "awq")


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(True, 7, 8)): the double quantization's codes."""
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(data + [0, 1.0] + [0] * (256 - len(data) - 2)), dtype=torch.float32)


def _blockwise(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[blocks, block] of x in float32 (the last block zero-padded), and each block's absmax."""
    flat = x.reshape(-1).float()
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % block)).view(-1, block)
    return blocks, blocks.abs().max(dim=1).values


def _quantize_nf4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' quantize_4bit (its torch path, also its CPU one): x * (1 / absmax), then the code whose
    midpoints bracket it."""
    blocks, absmax = _blockwise(x, NF4_BLOCK)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[: x.numel()]
    code = NF4_CODE.to(x.device)
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8), absmax


def _quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' quantize_blockwise on CPU (its C kernel): x / absmax, the code at or left of it, moved
    right only when the right neighbour is strictly nearer."""
    blocks, absmax = _blockwise(x, NF4_DOUBLE_BLOCK)
    scaled = (blocks / absmax[:, None]).reshape(-1)[: x.numel()]
    code = dynamic_map().to(x.device)
    left = (torch.searchsorted(code, scaled, right=True) - 1).clamp(0, code.numel() - 2)
    nearer = (scaled - code[left + 1]).abs() < (scaled - code[left]).abs()
    return (left + nearer).to(torch.uint8), absmax


def _unblockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    values = code.to(q.device)[q.long()]
    n = values.numel()
    values = torch.nn.functional.pad(values, (0, -n % block)).view(-1, block) * absmax[:, None]
    return values.reshape(-1)[:n]


def nf4_quantize(w: torch.Tensor, double: bool) -> dict[str, torch.Tensor]:
    """bitsandbytes' quantize_4bit(w, 64, compress_statistics=double, quant_type="nf4"), as tensors."""
    q, absmax = _quantize_nf4(w)
    q = torch.nn.functional.pad(q, (0, q.numel() % 2), value=7)  # an odd count's last nibble: code 0.0
    out = {"weight": (q[::2] << 4) | q[1::2]}
    if not double:
        return out | {"absmax": absmax}
    offset = absmax.mean()
    out["absmax"], out["absmax2"] = _quantize_dynamic(absmax - offset)
    return out | {"offset": offset}


def nf4_absmax(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A state's float32 absmax, one a block of 64 (double quantization's codes dequantized)."""
    if "offset" not in state:
        return state["absmax"]
    return _unblockwise(state["absmax"], state["absmax2"], dynamic_map(), NF4_DOUBLE_BLOCK) + state["offset"]


def nf4_dequantize(state: dict[str, torch.Tensor], shape, dtype) -> torch.Tensor:
    """A state's weight [shape] in `dtype`. A state may cover more than its weight (a pre-quantized slice keeps
    the whole blocks around it): its codes viewed as `rows` rows, each starts `skip` elements early."""
    absmax = nf4_absmax(state)
    packed = state["weight"]
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    values = torch.nn.functional.pad(NF4_CODE.to(q.device)[q.long()], (0, -q.numel() % NF4_BLOCK))
    values = (values.view(-1, NF4_BLOCK) * absmax[:, None]).view(state.get("rows", 1), -1)
    skip = state.get("skip", 0)
    return values[:, skip : skip + math.prod(shape) // values.shape[0]].reshape(shape).to(dtype)


def unpack(packed: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """int32 words -> their 32 / bits unsigned values along `dim`: slot j (bits [j * bits, (j + 1) * bits))
    holds channel `order[j]` of its word's channels (default: channel j)."""
    slots = range(32 // bits) if order is None else [order.index(c) for c in range(32 // bits)]
    shifts = torch.tensor([bits * j for j in slots], dtype=torch.int32, device=packed.device)
    shape = [1] * (packed.dim() + 1)
    shape[dim + 1] = -1
    values = (packed.unsqueeze(dim + 1) >> shifts.view(shape)) & (2**bits - 1)  # int32, the word's channels at dim + 1
    return values.flatten(dim, dim + 1)


def pack(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """The inverse of `unpack`: unsigned values (< 2**bits) along `dim` -> int32 words."""
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.unflatten(-1, (v.shape[-1] * bits // 32, 32 // bits))
    if order is not None:
        v = v[..., order]
    words = (v << torch.arange(0, 32, bits)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).movedim(-1, dim).contiguous()


@dataclass(frozen=True)
class QuantConfig:
    """What the linear layers store: `method` in METHODS; for NF4 whether absmax is quantized too."""

    method: str
    bits: int = 4
    group_size: int = NF4_BLOCK
    desc_act: bool = False
    sym: bool = True
    double: bool = False
    prequantized: bool = False  # NF4 read from a bitsandbytes checkpoint rather than quantized at load time

    @property
    def name(self) -> str:
        """The name reported by ModelInfo, /v1/models and the model_info metric."""
        if self.method == "gptq":
            return f"gptq-int{self.bits}"
        return self.method + ("-double" if self.double else "")

    @classmethod
    def resolve(cls, raw: dict, requested: str | None, double: bool = False) -> "QuantConfig | None":
        """The checkpoint's quantization_config (GPTQ, AWQ), or the load-time quantization asked for."""
        qc = raw.get("quantization_config")
        if qc:
            method = qc.get("quant_method")
            if requested is not None:
                raise ValueError(f"the checkpoint is already quantized ({method}): drop --quantization {requested}")
            if method == "gptq":
                if qc.get("bits") not in (4, 8) or qc.get("checkpoint_format", "gptq") != "gptq":
                    raise ValueError(f"GPTQ with bits={qc.get('bits')}, checkpoint_format="
                                     f"{qc.get('checkpoint_format')!r} is not supported (bits 4 or 8, format gptq)")
                return cls("gptq", qc["bits"], qc.get("group_size", -1), bool(qc.get("desc_act")),
                           bool(qc.get("sym", True)))
            if method == "awq":
                if qc.get("bits", 4) != 4 or str(qc.get("version", "gemm")).lower() != "gemm" \
                        or not qc.get("zero_point", True):
                    raise ValueError(f"AWQ {json.dumps(qc)} is not supported (4 bits, GEMM, zero points)")
                return cls("awq", 4, qc.get("group_size", -1))
            if method == "bitsandbytes":
                if not qc.get("load_in_4bit") or qc.get("bnb_4bit_quant_type") != "nf4" \
                        or qc.get("bnb_4bit_quant_storage", "uint8") != "uint8":
                    raise ValueError(f"bitsandbytes {json.dumps(qc)} is not supported (load_in_4bit, nf4, uint8 "
                                     "storage)")
                return cls("bitsandbytes-nf4", double=bool(qc.get("bnb_4bit_use_double_quant")), prequantized=True)
            raise ValueError(f"quantization_config quant_method {method!r} is not supported (gptq, awq, "
                             "bitsandbytes)")
        if requested is None:
            return None
        if requested != "bitsandbytes-nf4":
            raise ValueError(f"--quantization {requested!r}: load-time quantization is bitsandbytes-nf4 "
                             "(GPTQ and AWQ are read from a pre-quantized checkpoint's config.json)")
        return cls("bitsandbytes-nf4", double=double)


def _param(shape, dtype, out_dim, out_div, in_dim, in_div) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.out_dim, p.out_div, p.in_dim, p.in_div = out_dim, out_div, in_dim, in_div
    return p


class _Method:
    """On CUDA the matmul is a fused kernel of shards/triton_quant.py (`triton_on_cpu`: tests set it under
    Triton's interpreter); elsewhere dequantize, then matmul."""

    triton_on_cpu = False

    def apply(self, layer, x: torch.Tensor, bias=None) -> torch.Tensor:
        """x @ W.T (+ bias)."""
        if not (x.is_cuda or self.triton_on_cpu):
            return F.linear(x, self.dense(layer, x.dtype), bias)
        y = self.fused(layer, x)
        return y if bias is None else y + bias


class NF4Method(_Method):
    """NF4 at load time. Each checkpoint tensor's slice on this rank (q, k, v, gate, up, o, down) is quantized
    as soon as it is read, into its own state, `layer.nf4[shard_id]` (a list of states, in row order), equal to
    bitsandbytes' quantize_4bit of that slice: the same blocks as transformers' (one Linear4bit per checkpoint
    tensor) at TP 1, and no rank ever holds more than one float slice. `weight` is an empty parameter: it
    carries the loader and the checkpoint name."""

    def __init__(self, config: QuantConfig):
        self.double = config.double

    def create(self, layer: nn.Module, out: int, inp: int, dtype, loader, parts: int, full_in: int) -> None:
        layer.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
        layer.weight.weight_loader = lambda param, source, shard_id=None: self._load(layer, out, source, shard_id)
        layer.nf4, layer.nf4_dtype = {}, dtype

    def _load(self, layer, out, source, shard_id) -> int:
        if hasattr(layer, "shards"):  # column-parallel: this tensor's row ranges, concatenated
            part = torch.cat(layer.read_rows(source, shard_id, (0, layer.in_features)))
        else:
            part = layer.read_columns(source, (out, 0))
        read = part.numel() * part.element_size()
        part = part.to(device=layer.weight.device, dtype=layer.nf4_dtype)
        layer.nf4[shard_id] = [nf4_quantize(part, self.double) | {"shape": tuple(part.shape)}]
        return read

    def states(self, layer) -> list[dict]:
        """The layer's NF4 states in output-channel order."""
        return [state for shard in (layer.shards if hasattr(layer, "shards") else [None]) for state in layer.nf4[shard]]

    def dense(self, layer, dtype) -> torch.Tensor:
        parts = [nf4_dequantize(state, state["shape"], dtype) for state in self.states(layer)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def fused(self, layer, x: torch.Tensor, **tiles) -> torch.Tensor:
        from shards.triton_quant import nf4_matmul

        parts = [nf4_matmul(x, state, **tiles) for state in self.states(layer)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


# A pre-quantized NF4 weight's tensors as transformers' save_pretrained writes a bitsandbytes Linear4bit
# (`quant_map` and `nested_quant_map` are bitsandbytes' fixed NF4 and dynamic maps: not read).
NF4_PARTS = {"weight": "weight", "absmax": "weight.absmax", "quant_state": "weight.quant_state.bitsandbytes__nf4",
             "nested_absmax": "weight.nested_absmax"}


class PrequantizedNF4Method(NF4Method):
    """NF4 weights read from a checkpoint saved by transformers with bitsandbytes (`quant_method`
    "bitsandbytes", `load_in_4bit`). A weight's blocks of 64 run along its flattened [out, in] layout, so a
    rank's slice is a set of whole blocks plus a few elements of the blocks at its edges: the rank keeps those
    whole blocks (exact: nothing is requantized) and `skip`s the extra elements when it dequantizes. A
    column-parallel slice is one contiguous run of elements (any rows work); a row-parallel slice is a run in
    every row, which lines up with blocks only when a row is whole blocks (`in % 64 == 0`, true of every Qwen2
    size), and is refused otherwise. Double-quantized absmax is dequantized to float32 as it is read
    (bitsandbytes' own first step; 0.5 instead of 0.13 bits a weight), since a slice's blocks seldom line up with
    the blocks of 256 absmax. A row-parallel rank reads the whole packed tensor (4 bits a weight) and keeps its
    columns."""

    def create(self, layer: nn.Module, out: int, inp: int, dtype, loader, parts: int, full_in: int) -> None:
        layer.nf4, layer.nf4_parts = {}, {}
        for part, name in NF4_PARTS.items():
            if part == "nested_absmax" and not self.double:
                continue
            param = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)
            param.checkpoint_name = name
            param.weight_loader = functools.partial(self._read, layer, out, part)
            setattr(layer, name.split(".")[0] if part == "weight" else "weight_" + part, param)

    def _pieces(self, layer, out, shard_id) -> tuple[tuple[int, int], list[tuple[int, int, int, tuple]]]:
        """The full checkpoint shape and this rank's (rows, first, end, shape) runs: in each of `rows` rows of
        the flattened weight (1 row: all of it), elements [first, end)."""
        inp = layer.in_features
        if hasattr(layer, "shards"):
            full, ranges, _ = layer.shards[shard_id]
            return (full, inp), [(1, f * inp, (f + n) * inp, (n, inp)) for f, n in ranges]
        if layer.local == inp:
            return (out, inp), [(1, 0, out * inp, (out, inp))]
        if inp % NF4_BLOCK:
            raise ValueError(
                f"tensor_parallel_size={layer.groups.tp_size} gives this rank input channels [{layer.first}, "
                f"{layer.first + layer.local}) of {inp}, but a pre-quantized NF4 weight's rows of {inp} are not "
                f"whole blocks of {NF4_BLOCK}: its row-parallel slices would not line up with its blocks")
        return (out, inp), [(out, layer.first, layer.first + layer.local, (out, layer.local))]

    def _read(self, layer, out, part, param, source, shard_id=None) -> int:
        (rows, cols), pieces = self._pieces(layer, out, shard_id)
        n = rows * cols
        if part == "weight":
            size = (n + 1) // 2
            got = []
            for r, first, end, _ in pieces:
                a, b = first // NF4_BLOCK * NF4_BLOCK // 2, min(-(-end // NF4_BLOCK) * NF4_BLOCK // 2, size)
                if r == 1:
                    got.append(read_slice(source, (size, 1), 0, a, b - a).reshape(-1))
                else:  # whole rows of cols / 2 bytes
                    got.append(read_slice(source, (size, 1)).view(r, cols // 2)[:, a:b].reshape(-1))
            value = got
        elif part == "absmax":
            value = read_slice(source, (-(-n // NF4_BLOCK),))
        elif part == "nested_absmax":
            value = read_slice(source, (-(-n // (NF4_BLOCK * NF4_DOUBLE_BLOCK)),))
        else:
            value = json.loads(bytes(torch.as_tensor(source[:]).tolist()))
            expected = ("nf4", NF4_BLOCK, [rows, cols])
            if (value.get("quant_type"), value.get("blocksize"), value.get("shape")) != expected:
                raise ValueError(f"bitsandbytes quant_state {value} is not NF4 in blocks of {NF4_BLOCK} of shape "
                                 f"{[rows, cols]}")
        parts = layer.nf4_parts.setdefault(shard_id, {})
        parts[part] = value
        if len(parts) == 3 + self.double:
            self._finish(layer, pieces, layer.nf4_parts.pop(shard_id), shard_id)
        return sum(t.numel() * t.element_size() for t in (value if part == "weight" else [value])
                   if isinstance(t, torch.Tensor))

    def _finish(self, layer, pieces, parts, shard_id) -> None:
        """The rank's states from the checkpoint's parts, on the layer's device."""
        device, absmax = layer.weight.device, parts["absmax"]
        if self.double:
            absmax = _unblockwise(absmax, parts["nested_absmax"], dynamic_map(), NF4_DOUBLE_BLOCK) \
                + torch.tensor(parts["quant_state"]["nested_offset"])
        states = []
        for (r, first, end, shape), weight in zip(pieces, parts["weight"]):
            b0, b1 = first // NF4_BLOCK, -(-end // NF4_BLOCK)
            if r == 1:
                scales = absmax[b0:b1]
            else:
                scales = absmax.view(r, -1)[:, b0:b1].reshape(-1)
            states.append({"weight": weight.to(device), "absmax": scales.float().to(device), "shape": shape,
                           "rows": r, "skip": first - b0 * NF4_BLOCK})
        layer.nf4[shard_id] = states


class GroupMethod(_Method):
    """GPTQ and AWQ: integer codes with per-group scales and zero points, read as stored."""

    def __init__(self, config: QuantConfig):
        self.config = config
        self.pack = 32 // config.bits

    def group(self, inp: int) -> int:
        return self.config.group_size if self.config.group_size > 0 else inp

    def create(self, layer: nn.Module, out: int, inp: int, dtype, loader, parts: int, full_in: int) -> None:
        """`full_in`: the unsplit input size (GPTQ group_size -1 is one group over all of it)."""
        c, pack, g = self.config, self.pack, self.group(full_in)
        whole = c.method == "gptq" and c.desc_act  # any channel may be in any group: keep every group's row
        groups = full_in // g if whole else -(-inp // g)
        group_in = (None, 1) if whole else (0, g)
        if c.method == "gptq":
            params = {"qweight": _param((inp // pack, out), torch.int32, 1, 1, 0, pack)}
        else:
            params = {"qweight": _param((inp, out // pack), torch.int32, 1, pack, 0, 1)}
        params["qzeros"] = _param((groups, out // pack), torch.int32, 1, pack, *group_in)
        params["scales"] = _param((groups, out), torch.float16, 1, 1, *group_in)
        if whole:
            params["g_idx"] = _param((inp,), torch.int32, None, 1, 0, 1)
        layer.group_size = g
        for name, p in params.items():
            p.weight_loader = loader
            setattr(layer, name, p)

    def fused(self, layer, x: torch.Tensor, **tiles) -> torch.Tensor:
        from shards.triton_quant import group_matmul

        c = self.config
        return group_matmul(x, layer.qweight, layer.qzeros, layer.scales, getattr(layer, "g_idx", None),
                            layer.group_size, c.bits, c.method == "awq", **tiles)

    def dense(self, layer, dtype) -> torch.Tensor:
        c = self.config
        order = AWQ_ORDER if c.method == "awq" else None
        if c.method == "gptq":
            q = unpack(layer.qweight, c.bits, 0)  # [in, out]
            zeros = unpack(layer.qzeros, c.bits, 1) + 1
        else:
            q = unpack(layer.qweight, c.bits, 1, order)
            zeros = unpack(layer.qzeros, c.bits, 1, order)
        scales = layer.scales.float()
        groups, rows = scales.shape[0], q.shape[0]
        if not hasattr(layer, "g_idx") and rows == groups * layer.group_size:  # whole groups: broadcast, in place
            w = q.float()
            w.view(groups, -1, w.shape[1]).sub_(zeros[:, None]).mul_(scales[:, None])
            return w.t().to(dtype)
        g = layer.g_idx.long() if hasattr(layer, "g_idx") else torch.arange(rows, device=q.device) // layer.group_size
        return ((q - zeros[g]).float() * scales[g]).t().to(dtype)


def linear_method(config: QuantConfig | None):
    if config is None:
        return None
    if config.method == "bitsandbytes-nf4":
        return PrequantizedNF4Method(config) if config.prequantized else NF4Method(config)
    return GroupMethod(config)
