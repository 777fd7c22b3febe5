"""PyTorch autograd and torch.compile: gradcheck on CPU float64 (reference), GPU gradients, no graph breaks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cuflash  # noqa: E402
import cuflash.torch as ct  # noqa: E402
from cuflash import reference  # noqa: E402

from .helpers import assert_fa_close, rounded  # noqa: E402


def _t(*shape, dtype=torch.float64, device="cpu", grad=True):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window_size=(2, 1)), dict(softcap=3.0),
                                  dict(causal=True, alibi=True)])
def test_gradcheck_cpu_float64(opts):
    opts = dict(opts)
    q, k, v = _t(1, 4, 4, 5), _t(1, 6, 2, 5), _t(1, 6, 2, 5)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(4, dtype=torch.float32)
    assert torch.autograd.gradcheck(lambda a, b, c: ct.attention(a, b, c, **opts), (q, k, v), eps=1e-6, atol=1e-5)


def test_attention_records_autograd_node():
    q, k, v = _t(1, 3, 2, 4), _t(1, 3, 2, 4), _t(1, 3, 2, 4)
    out = cuflash.attention(q, k, v, causal=True)
    assert out.grad_fn is not None
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape
    with torch.no_grad():
        assert cuflash.attention(q, k, v).grad_fn is None


def test_flash_attn_func_autograd_cpu():
    q, k, v = _t(2, 5, 2, 8), _t(2, 5, 2, 8), _t(2, 5, 2, 8)
    out = cuflash.flash_attn_func(q, k, v, causal=True)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    arrs = [x.detach().numpy() for x in (q, k, v)]
    o, lse = reference.attention(*arrs, causal=True, return_lse=True)
    rq, rk, rv = reference.attention_backward(g.numpy(), *arrs, o, lse, causal=True)
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-6)  # the saved lse is float32


class TwoLayer(torch.nn.Module):
    def __init__(self, d=32, h=2, device="cpu", dtype=torch.float32):
        super().__init__()
        self.h = h
        self.qkv1 = torch.nn.Linear(d, 3 * d, device=device, dtype=dtype)
        self.qkv2 = torch.nn.Linear(d, 3 * d, device=device, dtype=dtype)

    def layer(self, x, proj):
        b, s, d = x.shape
        q, k, v = proj(x).view(b, s, 3, self.h, d // self.h).unbind(2)
        return x + cuflash.flash_attn_func(q, k, v, causal=True).reshape(b, s, d)

    def forward(self, x):
        return self.layer(self.layer(x, self.qkv1), self.qkv2)


def _compile_check(device, dtype, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoLayer(device=device, dtype=dtype)
    x = torch.randn(2, 16, 32, device=device, dtype=dtype, requires_grad=True)
    eager = model(x)
    eager.sum().backward()
    g_eager = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fullgraph: a graph break is an error
    out = compiled(x)
    out.sum().backward()
    g_comp = [p.grad for p in model.parameters()] + [x.grad]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, eager, atol=tol, rtol=tol)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_torch_compile_fullgraph_cpu():
    _compile_check("cpu", torch.float32, "aot_eager")


@pytest.mark.gpu
def test_torch_compile_fullgraph_gpu():
    _compile_check("cuda", torch.bfloat16, "inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_autograd_gpu_matches_reference(dtype):
    from .helpers import to_numpy64

    rng = np.random.default_rng()
    q, k, v = (rounded(rng.standard_normal(s), dtype) for s in ((2, 113, 4, 64), (2, 203, 2, 64), (2, 203, 2, 64)))
    g = rounded(rng.standard_normal(q.shape), dtype)
    tq, tk, tv = (torch.tensor(x, device="cuda", dtype=getattr(torch, dtype), requires_grad=True) for x in (q, k, v))
    out = cuflash.attention(tq, tk, tv, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (tq, tk, tv), torch.tensor(g, device="cuda", dtype=getattr(torch, dtype)))
    o, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    refs = reference.attention_backward(g, q, k, v, o, lse, causal=True)
    # low-precision baseline: the reference backward on the forward output rounded to the dtype
    base = [rounded(x, dtype) for x in reference.attention_backward(g, q, k, v, rounded(o, dtype), lse, causal=True)]
    for name, got, ref, b in zip(("dq", "dk", "dv"), (dq, dk, dv), refs, base):
        assert_fa_close(to_numpy64(got), ref, b, dtype, what=name)
