"""4-bit (and GPTQ 8-bit) linear weights: the formats, their (un)packing and dequantization, and the linear
methods that hold a rank's slice of them.

Formats (all dequantized in float32, then cast to the compute dtype; the matmul is a plain `F.linear`):

- `bitsandbytes-nf4`: quantized at load time as bitsandbytes' `quantize_4bit(w, blocksize=64,
  quant_type="nf4", compress_statistics=double)` does it, on this rank's slice of each checkpoint tensor
  (`layer.nf4[shard_id]`, fused parts each their own), flattened row-major. A state: `weight` uint8
  [ceil(n / 2)], two codes a byte, the first element in the high nibble; `absmax` float32 [ceil(n / 64)], or
  with double quantization `absmax` uint8 codes of bitsandbytes' signed dynamic 8-bit map over blocks of 256
  of (absmax - offset) (the nearest code), with `absmax2` float32 [ceil(blocks / 256)] and the float32
  scalar `offset`; `shape`.
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
from torch import nn

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


def nf4_dequantize(state: dict[str, torch.Tensor], shape, dtype) -> torch.Tensor:
    absmax = state["absmax"]
    if "offset" in state:
        absmax = _unblockwise(absmax, state["absmax2"], dynamic_map(), NF4_DOUBLE_BLOCK) + state["offset"]
    packed = state["weight"]
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: math.prod(shape)]
    return _unblockwise(q, absmax, NF4_CODE, NF4_BLOCK).view(shape).to(dtype)


def unpack(packed: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """int32 words -> their 32 / bits unsigned values along `dim`: slot j (bits [j * bits, (j + 1) * bits))
    holds channel `order[j]` of its word's channels (default: channel j)."""
    values = (packed.unsqueeze(-1) >> torch.arange(0, 32, bits, device=packed.device)) & (2**bits - 1)
    if order is not None:
        values = values[..., torch.argsort(torch.tensor(order))]
    return values.movedim(-1, dim + 1).flatten(dim, dim + 1)


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
            raise ValueError(f"quantization_config quant_method {method!r} is not supported (gptq, awq)")
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


class NF4Method:
    """NF4 at load time. Each checkpoint tensor's slice on this rank (q, k, v, gate, up, o, down) is quantized
    as soon as it is read, into its own state, `layer.nf4[shard_id]`, equal to bitsandbytes' quantize_4bit of
    that slice: the same blocks as transformers' (one Linear4bit per checkpoint tensor) at TP 1, and no rank
    ever holds more than one float slice. `weight` is an empty parameter: it carries the loader and the
    checkpoint name."""

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
        layer.nf4[shard_id] = nf4_quantize(part, self.double) | {"shape": tuple(part.shape)}
        return read

    def dense(self, layer, dtype) -> torch.Tensor:
        parts = [nf4_dequantize(state, state["shape"], dtype) for state in layer.nf4.values()]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class GroupMethod:
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

    def dense(self, layer, dtype) -> torch.Tensor:
        c = self.config
        order = AWQ_ORDER if c.method == "awq" else None
        if c.method == "gptq":
            q = unpack(layer.qweight, c.bits, 0)  # [in, out]
            zeros = unpack(layer.qzeros, c.bits, 1) + 1
        else:
            q = unpack(layer.qweight, c.bits, 1, order)
            zeros = unpack(layer.qzeros, c.bits, 1, order)
        if hasattr(layer, "g_idx"):
            g = layer.g_idx.long()
        else:
            g = torch.arange(q.shape[0], device=q.device) // layer.group_size
        w = (q - zeros[g]).float() * layer.scales[g].float()
        return w.t().to(dtype)


def linear_method(config: QuantConfig | None):
    if config is None:
        return None
    return NF4Method(config) if config.method == "bitsandbytes-nf4" else GroupMethod(config)
