"""Every Triton kernel compiles for an H100 (sm_90) at the configurations the GPU path launches.

The other kernel tests run in Triton's interpreter, which checks the math but not what the
compiler accepts (types of constants, loop-carried values, reductions on int64). Triton compiles
ahead of time without a GPU (LLVM to PTX, then its bundled ptxas to a cubin), so this runs in CI.
It runs in a subprocess: kernels defined under TRITON_INTERPRET=1 cannot be compiled.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sdzero_kernels.full_kl import _full_kl_grad_kernel, _full_kl_stats_kernel
    from sdzero_kernels.teacher_topk import _topk_lse_kernel
    from sdzero_kernels.topk_kl import _row_max_sum_kernel, _softmax_scale_kernel, _topk_rows_kernel

    H100 = GPUTarget("cuda", 90, 32)
    cases = []
    for dtype in ("bf16", "fp32"):
        for k in (64, 256):
            cases.append((_topk_lse_kernel, dict(logits_ptr=f"*{dtype}", row_stride="i64", vocab="i32",
                inv_temp="fp32", id_offset="i32", keys_ptr="*i64", max_ptr="*fp32", sum_ptr="*fp32"),
                dict(K=k, K_PAD=k, BLOCK_V=2048)))
        cases.append((_row_max_sum_kernel, dict(x_ptr=f"*{dtype}", row_stride="i64", vocab="i32",
            inv_temp="fp32", max_ptr="*fp32", sum_ptr="*fp32"), dict(BLOCK_V=4096)))
        cases.append((_softmax_scale_kernel, dict(x_ptr=f"*{dtype}", row_stride="i64", vocab="i32",
            inv_temp="fp32", lse_ptr="*fp32", coef_ptr="*fp32", out_ptr=f"*{dtype}", out_stride="i64"),
            dict(BLOCK_V=4096)))
        cases.append((_full_kl_stats_kernel, dict(s_ptr=f"*{dtype}", s_stride="i64", t_ptr=f"*{dtype}",
            t_stride="i64", vocab="i32", inv_temp="fp32", stats_ptr="*fp32", num_rows="i32"), dict(BLOCK_V=2048)))
        cases.append((_full_kl_grad_kernel, dict(s_ptr=f"*{dtype}", s_stride="i64", t_ptr=f"*{dtype}",
            t_stride="i64", vocab="i32", inv_temp="fp32", lse_s_ptr="*fp32", lse_t_ptr="*fp32",
            reverse_ptr="*fp32", scale_ptr="*fp32", w_forward="fp32", out_ptr=f"*{dtype}", out_stride="i64"),
            dict(BLOCK_V=2048)))
    for bucket in (False, True):
        cases.append((_topk_rows_kernel, dict(z_ptr="*fp32", lt_ptr="*fp32", lse_ptr="*fp32", loss_ptr="*fp32",
            grad_ptr="*fp32", tail_coef_ptr="*fp32", w_forward="fp32"), dict(K=64, K_PAD=64, BUCKET=bucket)))

    for kernel, signature, constexprs in cases:
        signature.update({name: "constexpr" for name in constexprs})
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=H100, options={"num_warps": 8})
        assert compiled.asm["cubin"], kernel.__name__
        print("compiled", kernel.__name__, constexprs)
    print("all", len(cases))
    """
)


def test_every_kernel_compiles_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "all 14" in result.stdout, result.stdout
