"""The fused dequantize-matmul kernels (shards/triton_quant.py), run on CPU by Triton's interpreter in a child
process (as tests/test_triton_attention.py runs its kernel), against the torch path's dequantized weights of the
same layer: GPTQ 4 and 8 bits with group sizes 16, 32 and -1, desc_act's g_idx, AWQ, row-parallel slices; NF4
quantized at load time (fused shards, rows that are not whole blocks, double quantization) and pre-quantized
slices that keep the blocks around them; float32 and bfloat16, row counts that are and are not whole tiles."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the test extra installs it)")

# (format, bits, group_size, desc_act, tp_rank, tp_size); 128 input channels, 80 outputs.
CASES = [("gptq", 4, 32, False, 0, 1), ("gptq", 4, 16, True, 1, 2), ("gptq", 8, -1, False, 0, 1),
         ("gptq", 8, 16, True, 0, 1), ("awq", 4, 32, False, 1, 2), ("awq", 4, 16, False, 0, 1)]


def _worst(method, layer, dtype, gen) -> float:
    """|kernel - reference| / max |reference| over x of 3 and 37 rows; the reference is the torch path's weights
    (in `dtype`) and x multiplied in float32: the kernel's only extra error is its output's one rounding to
    `dtype` (half a bfloat16 ulp: at most 2**-8 of the largest value)."""
    worst = 0.0
    for rows in (3, 37):
        x = torch.randn(rows, getattr(layer, "local", layer.in_features), generator=gen).to(dtype)
        expected = torch.nn.functional.linear(x.float(), method.dense(layer, dtype).float())
        method.triton_on_cpu = True
        got = method.apply(layer, x).float()
        method.triton_on_cpu = False
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
    return worst


def nf4_cases(dtype) -> list[float]:
    import bitsandbytes.functional as bnb

    from shards.layers import ColumnParallelLinear, RowParallelLinear
    from shards.parallel import ParallelGroups
    from shards.quant import QuantConfig, linear_method

    gen, out = torch.Generator().manual_seed(0), []
    for double in (False, True):  # load time: q and k fused, rows of 96 (not whole blocks)
        method = linear_method(QuantConfig("bitsandbytes-nf4", double=double))
        layer = ColumnParallelLinear(96, [("q", 40, [(0, 40)]), ("k", 24, [(0, 24)])], bias=False, dtype=dtype,
                                     quant=method)
        for shard, rows in (("q", 40), ("k", 24)):
            layer.weight.weight_loader(layer.weight, torch.randn(rows, 96, generator=gen).to(dtype), shard)
        out.append(_worst(method, layer, dtype, gen))
        # pre-quantized: a row-parallel slice starting mid-block (columns [96, 192) of rows of 192)
        method = linear_method(QuantConfig("bitsandbytes-nf4", double=double, prequantized=True))
        layer = RowParallelLinear(192, 24, ParallelGroups(tp_rank=1, tp_size=2), dtype, method)
        q, state = bnb.quantize_4bit(torch.randn(24, 192, generator=gen).to(dtype), blocksize=64,
                                     compress_statistics=double, quant_type="nf4")
        parts = {k.removeprefix("weight."): v for k, v in state.as_dict(packed=True).items()} | {"weight": q}
        for param in layer.parameters():
            param.weight_loader(param, parts[param.checkpoint_name.removeprefix("weight.")])
        out.append(_worst(method, layer, dtype, gen))
    return out


def compare(cases, dtype) -> list[float]:
    """Each case's worst error (`_worst`)."""
    from shards.layers import ColumnParallelLinear, RowParallelLinear
    from shards.parallel import ParallelGroups
    from shards.checkpoint import QUANTIZATIONS, _random_quantized, _quantized_specs
    from shards.quant import GroupMethod, QuantConfig
    from shards.triton_attention import INTERPRETED

    assert INTERPRETED
    out = []
    for fmt, bits, group, desc_act, rank, tp in cases:
        name = "awq" if fmt == "awq" else f"gptq-int{bits}"
        qc = QUANTIZATIONS[name] | {"group_size": group, "desc_act": desc_act}
        config = QuantConfig.resolve({"quantization_config": qc}, None)
        method = GroupMethod(config)
        gen = torch.Generator().manual_seed(bits + group)
        if tp == 1:
            layer = ColumnParallelLinear(128, [(None, 80, [(0, 80)])], bias=False, dtype=dtype, quant=method)
        else:
            layer = RowParallelLinear(128, 80, ParallelGroups(tp_rank=rank, tp_size=tp), dtype, method)
        for spec_name, shape, kind in _quantized_specs([("x.q_proj.weight", (80, 128), "matrix")], qc):
            param = getattr(layer, spec_name.rsplit(".", 1)[1], None)  # g_idx without desc_act: not read
            if param is not None:
                param.weight_loader(param, _random_quantized(shape, kind, 0.02, gen, qc))
        out.append(_worst(method, layer, dtype, gen))
    return out


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
def test_fused_kernel_matches_the_torch_path(interpreter, dtype, tolerance):
    errors = interpreter(compare, CASES, dtype)
    print(dtype, dict(zip(CASES, errors)))
    assert max(errors) <= tolerance
    errors = interpreter(nf4_cases, dtype)
    print(dtype, "nf4 (load time, pre-quantized; plain, double):", errors)
    assert max(errors) <= tolerance
