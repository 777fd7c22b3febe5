"""Backward: repeatability over 50 runs (the race test) and the memory bound at seqlen 32k."""

import pytest

import cuflash

pytestmark = pytest.mark.gpu


def _inputs(torch, b, s, h, hk, d, dtype, causal):
    q = torch.randn(b, s, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, s, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, s, hk, d, device="cuda", dtype=dtype)
    out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
    dout = torch.randn_like(out)
    return dout, q, k, v, out, lse


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fifty_runs_repeatable(dtype):
    torch = pytest.importorskip("torch")
    args = _inputs(torch, 2, 777, 6, 2, 64, getattr(torch, dtype), True)
    first = cuflash.attention_backward(*args, causal=True, deterministic=True)
    for _ in range(49):
        again = cuflash.attention_backward(*args, causal=True, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "deterministic backward differs between identical runs"
    # default mode: dK, dV bitwise equal (no atomics there); dQ equal up to fp32 summation order
    base = cuflash.attention_backward(*args, causal=True)
    for _ in range(49):
        dq, dk, dv = cuflash.attention_backward(*args, causal=True)
        assert torch.equal(dk, base[1]) and torch.equal(dv, base[2])
        tol = 2 * float(torch.finfo(dq.dtype).eps) * float(base[0].abs().max())
        assert float((dq.float() - base[0].float()).abs().max()) <= tol
    # and both modes agree to rounding
    assert float((first[0].float() - base[0].float()).abs().max()) <= tol


def test_backward_memory_seqlen_32k():
    """Peak extra memory of a backward (b=1, h=16, s=32k, d=128) is the fp32 dQ accumulator plus the
    LSE/D vectors, measured with torch's allocator statistics (cuflash allocates through torch)."""
    torch = pytest.importorskip("torch")
    b, s, h, d = 1, 32768, 16, 128
    dout, q, k, v, out, lse = _inputs(torch, b, s, h, h, d, torch.bfloat16, True)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, dq=dq, dk=dk, dv=dv)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    allowed = b * h * s * d * 4 + 2 * b * h * s * 4   # fp32 dQ accumulator + D (+ LSE-sized slack)
    assert extra <= allowed * 1.05 + (2 << 20), f"extra {extra / 2**20:.1f} MiB > allowed {allowed / 2**20:.1f} MiB"
    # an s x s matrix would be 32768^2 * 2 bytes = 2 GiB per head: nothing like it was allocated
    assert extra < 512 << 20
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    print(f"backward seqlen 32k: extra {extra / 2**20:.1f} MiB (allowed {allowed / 2**20:.1f} MiB)")
