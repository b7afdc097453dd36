"""Spectral normalization (SN-GAN / WGAN discriminators): ``spectral_norm``, a drop-in twin of
``torch.nn.utils.parametrizations.spectral_norm``, and ``spectral_normalize``, its fused step.

The weight W is seen as a matrix: its dimension ``dim`` becomes the rows (H of them), all the other
dimensions, in order, the columns (C of them). With u ∈ ℝ^H and v ∈ ℝ^C the stored estimates of the
first singular vectors, normalize(x) = x / max(‖x‖, ε), each training step runs n power iterations

    u ← normalize(W v),    v ← normalize(Wᵀ u)

(eval mode skips them and uses u and v as stored), then

    σ = uᵀ W v,    W_SN = W / σ.

After an iteration σ needs no third matrix-vector product: with t = Wᵀu, v = t / max(‖t‖, ε), so
σ = uᵀ W v = (Wᵀu)ᵀ v = tᵀt / max(‖t‖, ε) = ‖t‖² / max(‖t‖, ε), and ‖t‖ comes with the iteration.
The kernels also fuse W v and Wᵀ(W v) into one pass over W: while row w_h is in cache they form
s_h = w_h · v and add s_h w_h to Wᵀs, so that u = s / max(‖s‖, ε) and Wᵀu = Wᵀs / max(‖s‖, ε).
A training step with one iteration thus reads W twice (the iteration, then W / σ) where torch's
parametrization reads it four times.

The gradient treats u and v as constants, as torch does (they come out of a no-grad power iteration):
with G = ∂L/∂W_SN,

    ∂L/∂W = G / σ − (⟨G, W⟩ / σ²) · u vᵀ      (u vᵀ laid out like W's matrix view)

Layers: kernels in ``csrc/cpu/spectral_norm.cpp``, ``csrc/cuda/spectral_norm.cu`` and
``triton_kernels/spectral_norm.py``; here the ``torch.library`` ops ``fastdl::spectral_normalize`` and
``fastdl::spectral_normalize_backward`` (fake kernels and autograd included, so
``torch.compile(fullgraph=True)`` keeps them whole), backend selection, the functional and the
parametrization. Eager calls on the native CPU backend take a shortcut around the custom op's Python
overhead and the dispatcher's, ``_eager_step`` (see :func:`_eager_native`).

Autograd saves W (the parameter, alive anyway, so this costs no memory), the updated u and v and the
0-dim σ: exactly what the gradient formula reads. σ is saved rather than rebuilt because rebuilding it
is another reduction over W. Beyond first-order eager autograd (fastdl/_autograd.py) the op runs its
composite — the reference power iteration on the detached weight, then W / uᵀWv — and a backward that
must be differentiable rebuilds σ from W, so that ∂σ/∂W reaches the second derivative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from .. import _extension
from .._autograd import composite_required, differentiable_backward_required
from .._backends import standard_kernels
from .._layout import in_format, preserved_format

__all__ = ["spectral_norm", "spectral_normalize"]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """σ's dtype: the weight's, but fp32 for fp16/bf16 weights (their kernels accumulate in fp32)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _matrix(weight: Tensor, dim: int) -> Tensor:
    """W's matrix view: dim ``dim`` as rows, the other dims flattened in order as columns."""
    return weight.movedim(dim, 0).flatten(1)


def _outer_like(u: Tensor, v: Tensor, weight: Tensor, dim: int) -> Tensor:
    """u vᵀ laid out like ``weight`` (the inverse of :func:`_matrix`)."""
    permuted_shape = (weight.shape[dim],) + weight.shape[:dim] + weight.shape[dim + 1:]
    return torch.outer(u, v).reshape(permuted_shape).movedim(0, dim)


def _reference_forward(weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float,
                       training: bool):
    # torch's parametrization, op for op, so that the reference gives its numbers.
    matrix = _matrix(weight, dim)
    if training:
        for _ in range(n_power_iterations):
            u = F.normalize(torch.mv(matrix, v), dim=0, eps=eps)
            v = F.normalize(torch.mv(matrix.H, u), dim=0, eps=eps)
    sigma = torch.vdot(u, torch.mv(matrix, v))
    return weight / sigma, u.clone(), v.clone(), sigma.to(_accumulation_dtype(weight.dtype))


def _composite_forward(weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float,
                       training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(W / σ, u, v) in differentiable PyTorch ops (fastdl/_autograd.py): the power iteration on the
    detached weight (u and v are constants of the gradient), σ = uᵀ W v with its graph."""
    _, u, v, _ = _reference_forward(weight.detach(), u, v, dim, n_power_iterations, eps, training)
    return weight / _differentiable_sigma(weight, u, v, dim), u, v


def _differentiable_sigma(weight: Tensor, u: Tensor, v: Tensor, dim: int) -> Tensor:
    """σ(W) = uᵀ W v for constant u and v, as a differentiable function of W."""
    return torch.vdot(u, torch.mv(_matrix(weight, dim), v))


def _reference_backward(grad: Tensor, weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
    acc = sigma.dtype
    coefficient = (grad.to(acc) * weight.to(acc)).sum() / (sigma * sigma)
    result = grad.to(acc) / sigma - coefficient * _outer_like(u.to(acc), v.to(acc), weight, dim)
    return result.to(weight.dtype)


def _native_forward(weight, u, v, dim, n_power_iterations, eps, training):
    return torch.ops.fastdl.spectral_norm_forward(weight, u, v, dim, n_power_iterations, eps, training)


def _native_backward(grad, weight, u, v, sigma, dim):
    return torch.ops.fastdl.spectral_norm_backward(grad, weight, u, v, sigma, dim)


def _triton_forward(weight, u, v, dim, n_power_iterations, eps, training):
    from ..triton_kernels.spectral_norm import spectral_norm_forward

    return spectral_norm_forward(weight, u, v, dim, n_power_iterations, eps, training)


def _triton_backward(grad, weight, u, v, sigma, dim):
    from ..triton_kernels.spectral_norm import spectral_norm_backward

    return spectral_norm_backward(grad, weight, u, v, sigma, dim)


_FORWARD = standard_kernels("fastdl.spectral_normalize", _native_forward, _triton_forward, _reference_forward)
_BACKWARD = standard_kernels("fastdl.spectral_normalize (backward)", _native_backward, _triton_backward, _reference_backward)


@torch.library.custom_op("fastdl::spectral_normalize", mutates_args=())
def _forward_op(weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float,
                training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kernel = _FORWARD.select(weight.device, weight.dtype)
    weight_sn, u, v, sigma = kernel.run(weight, u, v, dim, n_power_iterations, eps, training)
    return in_format(weight_sn, weight), u, v, sigma


@_forward_op.register_fake
def _(weight, u, v, dim, n_power_iterations, eps, training):
    sigma = weight.new_empty((), dtype=_accumulation_dtype(weight.dtype))
    return torch.empty_like(weight, memory_format=preserved_format(weight)), torch.empty_like(u), torch.empty_like(v), sigma


@torch.library.custom_op("fastdl::spectral_normalize_backward", mutates_args=())
def _backward_op(grad_output: Tensor, weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
    kernel = _BACKWARD.select(weight.device, weight.dtype)
    return in_format(kernel.run(grad_output, weight, u, v, sigma, dim), weight)


@_backward_op.register_fake
def _(grad_output, weight, u, v, sigma, dim):
    return torch.empty_like(weight, memory_format=preserved_format(weight))


def _setup_context(ctx, inputs, output) -> None:
    weight, dim = inputs[0], inputs[3]
    _, u, v, sigma = output
    # u and v are constants of the gradient (as in torch), σ is a by-product: none is differentiable.
    ctx.mark_non_differentiable(u, v, sigma)
    ctx.save_for_backward(weight, u, v, sigma)  # what ∂L/∂W reads (module docstring says why σ too)
    ctx.dim = dim


def _backward(ctx, grad_output: Tensor, *_):
    weight, u, v, sigma = ctx.saved_tensors
    if differentiable_backward_required():
        # The formula with σ rebuilt from W: the saved σ carries no graph, and ∂σ/∂W is part of the
        # second derivative.
        sigma = _differentiable_sigma(weight, u, v, ctx.dim).to(sigma.dtype)
        return _reference_backward(grad_output, weight, u, v, sigma, ctx.dim), None, None, None, None, None, None
    grad_weight = _backward_op(grad_output.contiguous(), weight, u, v, sigma, ctx.dim)
    return grad_weight, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# The native eager step, ``eager_step_python`` of csrc/cpu/spectral_norm.cpp: a builtin function that skips
# the dispatcher (see :func:`_eager_native`).
_eager_step = _extension._C.spectral_norm_eager_step if _extension.LOAD_ERROR is None else None


def _eager_native(weight: Tensor) -> bool:
    """Whether a step on ``weight`` may run as ``_eager_step``, the native CPU step with its autograd node
    in C++, called without the dispatcher. ``torch.library.custom_op`` spends ~35 µs of Python per call
    (argument re-packing, its generated autograd.Function, the dynamo guard around the implementation)
    and even a plain ``torch.ops`` call ~2.5 µs: several times, and a tenth of, the kernels themselves for
    SN-GAN-sized weights. Eager calls that would run the native CPU kernels thus skip them; traced code
    (torch.compile, export), CUDA, the other backends, and what ``_eager_step`` declines (tensor
    subclasses such as fake tensors, active torch-function or dispatch modes) go through
    ``fastdl::spectral_normalize``, and ``torch.func`` transforms and forward-mode AD run the composite
    (fastdl/_autograd.py). Kernels, saved tensors and gradient are the same either way; the C++ node's
    backward, like the op's, is differentiable PyTorch under ``create_graph``.
    """
    if not weight.is_cpu or torch.compiler.is_compiling() or composite_required():
        return False
    return _FORWARD.native_on_cpu(weight.dtype)


def _check(weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int, eps: float, dim: int) -> int:
    """Validates the functional's arguments (with torch's exception types); returns dim made non-negative."""
    for name, value in (("weight", weight), ("u", u), ("v", v)):
        if not isinstance(value, Tensor):
            raise TypeError(f"spectral_normalize: {name} must be a Tensor, got {type(value).__name__}")
    if weight.dim() < 2:
        raise ValueError(
            f"spectral_normalize: expected a weight of 2 or more dimensions, got shape {tuple(weight.shape)} "
            "(a 1-D weight needs no power iteration: it is F.normalize(weight, dim=0))"
        )
    if not weight.is_floating_point():
        raise TypeError(f"spectral_normalize: weight must be a real floating-point tensor, got {weight.dtype}")
    if not -weight.dim() <= dim < weight.dim():
        raise IndexError(
            f"spectral_normalize: dim out of range (expected to be in range of [-{weight.dim()}, {weight.dim() - 1}] "
            f"but got {dim})"
        )
    dim %= weight.dim()
    rows = weight.shape[dim]
    columns = weight.numel() // rows if rows else 0
    for name, value, length in (("u", u, rows), ("v", v, columns)):
        if value.dim() != 1 or value.shape[0] != length:
            raise RuntimeError(
                f"spectral_normalize: {name} must be a vector of length {length} for a weight of shape "
                f"{tuple(weight.shape)} and dim={dim}, got shape {tuple(value.shape)}"
            )
        if value.dtype != weight.dtype or value.device != weight.device:
            raise RuntimeError(
                f"spectral_normalize: {name} must have the weight's dtype and device ({weight.dtype}, {weight.device}), "
                f"got {value.dtype}, {value.device}"
            )
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int):
        raise TypeError(f"spectral_normalize: n_power_iterations must be an int, got {type(n_power_iterations).__name__}")
    if n_power_iterations <= 0:
        raise ValueError(
            f"spectral_normalize: expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}"
        )
    if not eps > 0:
        raise ValueError(f"spectral_normalize: eps must be positive, got {eps}")
    return dim


def spectral_normalize(weight: Tensor, u: Tensor, v: Tensor, n_power_iterations: int = 1, eps: float = 1e-12,
                       training: bool = True, dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    r"""One spectral-normalization step: ``(W / σ, u, v)`` with u and v updated when ``training``.

    W is seen as the matrix whose rows are indexed by ``dim`` (see the module docstring). In training
    mode ``n_power_iterations`` power iterations update u ← normalize(W v), v ← normalize(Wᵀ u); then

    .. math::
        \sigma = u^\top W v, \qquad W_{SN} = W / \sigma

    Returns new tensors (``u`` and ``v`` are not modified; in eval mode the returned u and v are the
    given ones). Differentiable in ``weight`` with u and v held constant, as torch's parametrization, to
    any order and in every autograd mode (``torch.func`` transforms and forward-mode AD run the composite;
    see ``fastdl/_autograd.py``).
    """
    dim = _check(weight, u, v, n_power_iterations, eps, dim)
    eps, training = float(eps), bool(training)
    if composite_required():
        weight_sn, new_u, new_v = _composite_forward(weight, u, v, dim, n_power_iterations, eps, training)
        return (weight_sn, new_u, new_v) if training else (weight_sn, u, v)
    if _eager_native(weight):
        new_u, new_v = (u.detach().clone(), v.detach().clone()) if training else (u, v)
        weight_sn = _eager_step(weight, new_u, new_v, dim, n_power_iterations, eps, training)
        if weight_sn is not NotImplemented:
            return weight_sn, new_u, new_v
    weight_sn, new_u, new_v, _ = _forward_op(weight, u, v, dim, n_power_iterations, eps, training)
    return (weight_sn, new_u, new_v) if training else (weight_sn, u, v)


class _SpectralNorm(parametrizations._SpectralNorm):
    """torch's spectral-norm parametrization module with its forward on fastdl's kernels.

    Subclassing keeps everything else torch's: the constructor (its checks, the random start of ``_u`` and
    ``_v`` and the 15 warm-up iterations, drawing the same random numbers), the buffer names (so
    state_dicts load both ways), ``right_inverse``, and ``isinstance`` checks of existing code.
    """

    def forward(self, weight: Tensor) -> Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        # The buffers straight from _buffers: nn.Module.__getattr__ would cost a microsecond for the two,
        # a tenth of a small weight's whole step. (torch's constructor checked dim, n_power_iterations and
        # eps once; the C++ step checks shapes and dtypes, at no measurable cost.)
        u, v = self._buffers["_u"], self._buffers["_v"]
        if _eager_native(weight):  # updates _u and _v in place itself
            weight_sn = _eager_step(weight, u, v, self.dim, self.n_power_iterations, self.eps, self.training)
            if weight_sn is not NotImplemented:
                return weight_sn
        arguments = (weight, u, v, self.dim, self.n_power_iterations, float(self.eps), self.training)
        if composite_required():
            weight_sn, new_u, new_v = _composite_forward(*arguments)
        else:
            weight_sn, new_u, new_v, _ = _forward_op(*arguments)
        if self.training:
            # In place, as torch does, so that DataParallel replicas update the original module's buffers.
            u.copy_(new_u)
            v.copy_(new_v)
        return weight_sn


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None) -> nn.Module:
    r"""Applies spectral normalization to ``module.<name>``: the same contract, buffers and state_dict
    keys as ``torch.nn.utils.parametrizations.spectral_norm``, computed by fastdl's fused kernels.

    .. math::
        W_{SN} = W / \sigma(W), \qquad \sigma(W) \approx u^\top W v

    with u, v refined by ``n_power_iterations`` power iterations each time the weight is read in
    training mode (eval mode uses them as stored). ``dim`` (the output dimension) defaults to 0, or 1
    for ConvTranspose{1,2,3}d. Returns the module; ``parametrize.remove_parametrizations`` undoes it.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        dim = 1 if isinstance(module, transposed) else 0
    parametrize.register_parametrization(module, name, _SpectralNorm(weight, n_power_iterations, dim, eps))
    return module
