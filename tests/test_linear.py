"""fastdl._linear.linear — F.linear with fp32 CPU products on oneDNN, used by MultiheadAttention and
the LSTM/GRU input projections: values and gradients against F.linear in fp64, the fallbacks, opcheck."""
import pytest
import torch
import torch.nn.functional as F

from fastdl._linear import linear
from fastdl.testing import assert_close


def _operands(batch_shape, in_features, out_features, bias, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*batch_shape, in_features, generator=gen, dtype=dtype)
    weight = torch.randn(out_features, in_features, generator=gen, dtype=dtype)
    b = torch.randn(out_features, generator=gen, dtype=dtype) if bias else None
    return x, weight, b


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch_shape", [(7,), (3, 5), (2, 1, 4)], ids=str)
def test_matches_f_linear(batch_shape, bias):
    operands = _operands(batch_shape, 9, 13, bias, torch.float32)
    ours = [t.clone().requires_grad_() if t is not None else None for t in operands]
    oracle = [t.double().requires_grad_() if t is not None else None for t in operands]
    out = linear(*ours)
    expected = F.linear(*oracle)
    assert "fastdl_linear" in type(out.grad_fn).__name__, "the fp32 CPU product did not run on oneDNN"
    grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    leaves = [t for t in ours if t is not None]
    grads = torch.autograd.grad(out, leaves, grad.float())
    grads_expected = torch.autograd.grad(expected, [t for t in oracle if t is not None], grad)
    assert_close(out, expected, name="output")
    for name, a, e in zip(("input", "weight", "bias"), grads, grads_expected):
        assert_close(a, e, name=f"grad {name}")


def test_only_weight_gradient():
    # The backward op is asked for ∂W alone when neither the input nor the bias requires grad.
    x, weight, bias = _operands((4,), 6, 5, True, torch.float32)
    weight.requires_grad_()
    (grad_weight,) = torch.autograd.grad(linear(x, weight, bias).sum(), [weight])
    assert_close(grad_weight, torch.ones(5, 4, dtype=torch.float64) @ x.double(), name="grad weight")


@pytest.mark.parametrize("dtype,batch_shape", [(torch.float64, (3,)), (torch.float32, (0,))], ids=["float64", "empty"])
def test_falls_back_to_f_linear(dtype, batch_shape):
    x, weight, bias = _operands(batch_shape, 6, 5, True, dtype)
    out = linear(x, weight, bias)
    assert torch.equal(out, F.linear(x, weight, bias))


def test_opcheck():
    x, weight, bias = _operands((2, 5), 8, 12, True, torch.float32)
    x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    torch.library.opcheck(torch.ops.fastdl.linear.default, (x, weight, bias))
    torch.library.opcheck(torch.ops.fastdl.linear.default, (x, weight, None))
    grad = torch.randn(2, 5, 12)
    operands = (grad, x.detach(), weight.detach())
    torch.library.opcheck(torch.ops.fastdl.linear_backward.default, (*operands, True, True, True))
    torch.library.opcheck(torch.ops.fastdl.linear_backward.default, (*operands, False, True, False))
