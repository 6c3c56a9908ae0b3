"""The fused GPTQ/AWQ dequantize-matmul kernel (shards/triton_quant.py), run on CPU by Triton's interpreter in a
child process (as tests/test_triton_attention.py runs its kernel), against the torch dequantize-then-matmul of
the same layer: GPTQ 4 and 8 bits with group sizes 16, 32 and -1, desc_act's g_idx, AWQ, row-parallel slices,
float32 and bfloat16, row counts that are and are not whole tiles."""

import pytest
import torch

from tests.test_triton_attention import interpreter  # noqa: F401 (the fixture)

pytest.importorskip("triton", reason="triton is not installed (the test extra installs it)")

# (format, bits, group_size, desc_act, tp_rank, tp_size); 128 input channels, 80 outputs.
CASES = [("gptq", 4, 32, False, 0, 1), ("gptq", 4, 16, True, 1, 2), ("gptq", 8, -1, False, 0, 1),
         ("gptq", 8, 16, True, 0, 1), ("awq", 4, 32, False, 1, 2), ("awq", 4, 16, False, 0, 1)]


def compare(cases, dtype) -> list[float]:
    """Each case's worst |kernel - reference| / max |reference| over x of 3 and 37 rows."""
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
        ys = []
        for rows in (3, 37):
            x = torch.randn(rows, getattr(layer, "local", 128), generator=gen).to(dtype)
            # The torch path's weights (in `dtype`) and x, multiplied in float32: the kernel's only extra error is
            # its output's one rounding to `dtype` (half a bfloat16 ulp: at most 2**-8 of the largest value).
            expected = torch.nn.functional.linear(x.float(), method.dense(layer, dtype).float())
            method.triton_on_cpu = True
            got = method.apply(layer, x).float()
            method.triton_on_cpu = False
            ys.append(((got - expected).abs().max() / expected.abs().max()).item())
        out.append(max(ys))
    return out


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
def test_fused_kernel_matches_the_torch_path(interpreter, dtype, tolerance):  # noqa: F811
    errors = interpreter(compare, CASES, dtype)
    print(dict(zip(CASES, errors)))
    assert max(errors) <= tolerance
