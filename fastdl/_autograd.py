"""When an op must leave its kernels for its composite: the same math in plain, differentiable PyTorch ops.

Every fastdl kernel is a ``torch.library`` custom op whose autograd formula is a backward kernel. That
covers first-order reverse mode (eager, ``torch.compile``, ``torch.export``) and nothing more:

* ``torch.func`` transforms (grad, vjp, vmap, jvp, jacrev, jacfwd, hessian, functional_call under them)
  cannot see through a custom op's generated autograd.Function;
* forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) would pass through it with no tangent,
  that is, a silent zero;
* a backward kernel is not itself differentiable, so gradients of gradients (double backward: gradient
  penalties, Hessian-vector products, second-order MAML) would have no graph.

So each op also has a *composite*, written in differentiable PyTorch ops with torch's own numerics, and
uses it exactly where the kernels cannot serve:

* a forward runs the composite instead of the custom op while :func:`composite_required` holds (a
  functorch transform or a forward-AD level is active), so every transform torch supports works, with
  PyTorch's speed rather than the kernels' — the kernels never see wrapped (batched, dual) tensors;
* a backward computes its gradients with differentiable PyTorch ops instead of the backward kernel while
  :func:`differentiable_backward_required` holds (``create_graph=True`` or a transform over the backward),
  so the gradient itself is recorded and can be differentiated again, to any order.

The plain first-order eager forward and backward never take these paths; their only cost is the check
itself, two C calls (tens of nanoseconds).
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad


def composite_required() -> bool:
    """Whether a forward must run as plain PyTorch ops: inside a ``torch.func`` transform, or while a
    forward-mode AD level (``torch.autograd.forward_ad.dual_level``) is open."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def differentiable_backward_required() -> bool:
    """Whether a backward must compute its gradients with differentiable PyTorch ops: autograd records the
    backward (``create_graph=True`` turns grad mode on while it runs), or a transform runs over it
    (``torch.autograd.grad(..., is_grads_batched=True)``, ``torch.func`` over a backward)."""
    return torch.is_grad_enabled() or composite_required()
