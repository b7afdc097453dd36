"""Correctness helpers shared by every op's tests (and usable by anyone checking a kernel).

The oracle is PyTorch itself, run in fp64 on the CPU. A kernel result in fp32 or fp64 must match it
tightly; a result in fp16 or bf16 may be off by no more than twice what eager PyTorch is off by when it
runs the same computation in the same low precision.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._backends import KERNEL_BACKENDS
from ._cpu_isa import available_isas

LOW_PRECISION = (torch.float16, torch.bfloat16)
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6)}  # (rtol, atol)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max(|expected|), in fp64 (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected64.abs().max().item()
    error = (actual64 - expected64).abs().max().item()
    return error / scale if scale > 0 else error


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, eager: torch.Tensor | None = None,
                 name: str = "result") -> None:
    """Checks a kernel's ``actual`` against the fp64 oracle ``expected``.

    fp32/fp64: elementwise ``|a − e| ≤ atol + rtol·|e|`` (rtol 1e-5 for fp32). fp16/bf16: the relative
    error of ``actual`` is at most 2× that of ``eager`` (eager PyTorch in the same dtype), with a floor
    of one unit in the last place so that an exact eager result does not demand perfection. NaN and Inf
    must sit where the oracle has them.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = torch.isfinite(expected64)
    if not torch.equal(torch.isnan(actual64), torch.isnan(expected64)) or not torch.equal(
        actual64[~finite & ~torch.isnan(expected64)], expected64[~finite & ~torch.isnan(expected64)]
    ):
        raise AssertionError(f"{name}: NaN/Inf positions differ from the oracle")
    actual64, expected64 = actual64[finite], expected64[finite]
    if actual.dtype in LOW_PRECISION:
        if eager is None:
            raise ValueError(f"{name}: a {actual.dtype} result needs the eager result in the same dtype")
        limit = 2 * relative_error(eager.detach()[finite.to(eager.device)], expected64) + torch.finfo(actual.dtype).eps
        error = relative_error(actual64, expected64)
        if error > limit:
            raise AssertionError(f"{name}: relative error {error:.3g} exceeds 2x eager's ({limit:.3g}) in {actual.dtype}")
        return
    rtol, atol = TOLERANCES.get(actual.dtype, TOLERANCES[torch.float32])
    torch.testing.assert_close(actual64, expected64, rtol=rtol, atol=atol * max(1.0, expected64.abs().max().item() if expected64.numel() else 1.0), msg=lambda m: f"{name}: {m}")


def outputs_and_grads(fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
                      grad_outputs: Sequence[torch.Tensor] | None = None, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None):
    """Runs ``fn(*inputs)`` on copies of ``inputs`` (cast to ``dtype``/moved to ``device`` when given) and
    returns ``(outputs, grads)``: the outputs as a tuple and the gradients of every floating input that
    requires grad, for ``grad_outputs`` (seeded ones when None). Non-tensor inputs pass through."""
    copies = []
    for value in inputs:
        if isinstance(value, torch.Tensor):
            # .to keeps the memory format (channels_last stays channels_last).
            cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
            copy = value.detach().to(device=device or value.device, dtype=cast).requires_grad_(value.requires_grad)
            copies.append(copy)
        else:
            copies.append(value)
    outputs = fn(*copies)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    wants_grad = [c for c in copies if isinstance(c, torch.Tensor) and c.requires_grad]
    if not wants_grad:
        return outputs, ()
    differentiable = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
    if grad_outputs is None:
        generator = torch.Generator().manual_seed(0)
        grad_outputs = [torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in differentiable]
    grads = torch.autograd.grad(
        differentiable, wants_grad, [g.to(device=o.device, dtype=o.dtype) for g, o in zip(grad_outputs, differentiable)],
        allow_unused=True,
    )
    return tuple(o.detach() for o in outputs), grads


def cpu_isa_cases():
    """pytest params, one per CPU instruction set the native kernels can run on this machine (lowest
    first), each carrying the ``cpu_isa`` mark: a test taking one runs with the kernels capped at that
    instruction set (tests/conftest.py applies the mark), so every per-ISA path is tested on one machine."""
    import pytest

    return [pytest.param(isa, marks=pytest.mark.cpu_isa(isa), id=isa) for isa in available_isas()]


def backend_device_cases(cpu_dtypes=(torch.float32, torch.float64),
                         cuda_dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """pytest params ``(backend, device, dtype)`` for every kernel backend on every device. CUDA cases
    carry the ``cuda`` mark (skipped without a GPU); Triton on CPU (its interpreter) is fp32 only. The
    native CPU kernels run at the CPU's best instruction set, and again at each lower one the CPU can run
    (ids ``native-avx2-cpu-…``, with the ``cpu_isa`` mark)."""
    import pytest

    lower_isas = available_isas()[:-1]
    cases = []
    for backend in KERNEL_BACKENDS:
        for dtype in cpu_dtypes:
            if backend != "triton" or dtype == torch.float32:
                cases.append(pytest.param(backend, "cpu", dtype, id=f"{backend}-cpu-{str(dtype)[6:]}"))
            if backend == "native":
                cases.extend(pytest.param(backend, "cpu", dtype, marks=pytest.mark.cpu_isa(isa),
                                          id=f"{backend}-{isa}-cpu-{str(dtype)[6:]}") for isa in lower_isas)
        for dtype in cuda_dtypes:
            cases.append(pytest.param(backend, "cuda", dtype, marks=pytest.mark.cuda, id=f"{backend}-cuda-{str(dtype)[6:]}"))
    return cases


# ----------------------------------------------------------------------------------------------------
# Autograd beyond first-order reverse mode: the same transform applied to a fastdl function and to its
# PyTorch oracle must give the same numbers.

AUTOGRAD_TRANSFORMS = ("grad", "vjp", "vmap_grad", "jacrev", "jvp", "jacfwd", "forward_ad", "double_backward",
                       "batched_backward")


def _as_tuple(outputs) -> tuple:
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


def autograd_transform(name: str, fn: Callable, inputs: Sequence[torch.Tensor], seed: int = 0, *,
                       vectorized: bool = True) -> tuple:
    """``fn(*inputs)`` (tensors in, a tensor or tuple of tensors out) differentiated by the autograd
    transform ``name`` (one of :data:`AUTOGRAD_TRANSFORMS`), with every input as a differentiation
    variable; returns the flat tuple of resulting tensors. Cotangents and tangents are drawn from
    ``seed``, so two functions with the same output shapes are differentiated in the same directions.

    ``vmap_grad`` is per-sample gradients over two samples (the inputs and a perturbed copy, stacked),
    under ``torch.func.vmap``, or one sample after the other when not ``vectorized`` (for an oracle that
    vmap cannot run: torch's fp64 ``nn.LSTM``);
    ``forward_ad`` uses ``torch.autograd.forward_ad`` dual tensors (a missing tangent counts as zero, so a
    silently dropped tangent fails the comparison); ``double_backward`` is the gradient of
    ⟨∂L/∂inputs, w⟩ for a fixed w, through ``create_graph=True``; ``batched_backward`` is
    ``torch.autograd.grad(..., is_grads_batched=True)`` for two cotangents at once (a vmap over the
    backward: what ``torch.autograd.functional.jacobian(vectorize=True)`` does)."""
    import torch.func as func
    from torch.autograd import forward_ad

    inputs = tuple(t.detach() for t in inputs)
    generator = torch.Generator().manual_seed(seed)
    randn_like = lambda t: torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)  # noqa: E731
    outputs = _as_tuple(fn(*inputs))
    cotangents = tuple(randn_like(o) for o in outputs)
    tangents = tuple(randn_like(t) for t in inputs)
    directions = tuple(randn_like(t) for t in inputs)
    argnums = tuple(range(len(inputs)))

    def loss(*args):
        return sum((o * c).sum() for o, c in zip(_as_tuple(fn(*args)), cotangents))

    def flat(*args):
        return torch.cat([o.reshape(-1) for o in _as_tuple(fn(*args))])

    if name == "grad":
        return func.grad(loss, argnums=argnums)(*inputs)
    if name == "vjp":
        primals, pullback = func.vjp(fn, *inputs)
        return pullback(cotangents[0] if isinstance(primals, torch.Tensor) else cotangents)
    if name == "vmap_grad":
        batch = tuple(torch.stack([t, 0.9 * t + 0.1 * d]) for t, d in zip(inputs, directions))
        if vectorized:
            return func.vmap(func.grad(loss, argnums=argnums))(*batch)
        samples = [func.grad(loss, argnums=argnums)(*(t[i] for t in batch)) for i in range(2)]
        return tuple(torch.stack(per_input) for per_input in zip(*samples))
    if name == "jacrev":
        return func.jacrev(flat, argnums=argnums)(*inputs)
    if name == "jacfwd":
        return func.jacfwd(flat, argnums=argnums)(*inputs)
    if name == "jvp":
        return _as_tuple(func.jvp(fn, inputs, tangents)[1])
    if name == "forward_ad":
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(t, d) for t, d in zip(inputs, tangents)]
            results = [forward_ad.unpack_dual(o) for o in _as_tuple(fn(*duals))]
            return tuple(r.tangent if r.tangent is not None else torch.zeros_like(r.primal) for r in results)
    if name == "double_backward":
        leaves = [t.clone().requires_grad_() for t in inputs]
        grads = torch.autograd.grad(loss(*leaves), leaves, create_graph=True, allow_unused=True)
        inner = sum((g * w).sum() for g, w in zip(grads, directions) if g is not None and g.requires_grad)
        if not isinstance(inner, torch.Tensor):  # every gradient is constant: the second derivatives are zero
            return tuple(torch.zeros_like(t) for t in inputs)
        second = torch.autograd.grad(inner, leaves, allow_unused=True)
        return tuple(torch.zeros_like(t) if s is None else s for s, t in zip(second, inputs))
    if name == "batched_backward":
        leaves = [t.clone().requires_grad_() for t in inputs]
        batched = [torch.stack([c, randn_like(c)]) for c in cotangents]
        grads = torch.autograd.grad(_as_tuple(fn(*leaves)), leaves, batched, is_grads_batched=True, allow_unused=True)
        return tuple(torch.zeros((2, *t.shape), dtype=t.dtype) if g is None else g for g, t in zip(grads, inputs))
    raise ValueError(f"unknown autograd transform {name!r}; expected one of {', '.join(AUTOGRAD_TRANSFORMS)}")


def assert_transform_matches(name: str, actual_fn: Callable, expected_fn: Callable, inputs: Sequence[torch.Tensor],
                             *, dtype: torch.dtype = torch.float64) -> None:
    """Runs :func:`autograd_transform` ``name`` on ``actual_fn`` (inputs cast to ``dtype``) and on
    ``expected_fn`` (the oracle, in fp64; per-sample gradients by a loop) and compares every resulting
    tensor with :func:`assert_close`."""
    cast = [t.detach().to(dtype) if t.is_floating_point() else t for t in inputs]
    oracle = [t.detach().double() if t.is_floating_point() else t for t in inputs]
    actual = autograd_transform(name, actual_fn, cast)
    expected = autograd_transform(name, expected_fn, oracle, vectorized=False)
    assert len(actual) == len(expected), f"{name}: {len(actual)} results, expected {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == dtype, f"{name} result {index}: dtype {a.dtype}, expected {dtype}"
        assert_close(a, e, name=f"{name} result {index}")


# ----------------------------------------------------------------------------------------------------
# PyTorch's own sample inputs (its ModuleInfo and OpInfo databases in torch.testing._internal), run side by
# side on a fastdl module or functional and on the torch one it replaces.


def torch_module_info(torch_class: type):
    """The ModuleInfo of ``torch_class`` in PyTorch's module database."""
    from torch.testing._internal.common_modules import module_db

    return next(info for info in module_db if info.module_cls is torch_class)


def torch_module_samples(torch_class: type, *, training: bool = True) -> list:
    """PyTorch's sample ModuleInputs for ``torch_class`` (fp64, CPU, requiring grad)."""
    info = torch_module_info(torch_class)
    return info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True, training=training)


def torch_module_error_samples(torch_class: type) -> list:
    """PyTorch's ErrorModuleInputs for ``torch_class``: a ModuleInput, whether construction or forward
    fails, and the exception type and message regex torch's own tests expect."""
    info = torch_module_info(torch_class)
    return info.module_error_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True, training=True)


def _fresh(value):
    """A copy of a (nested) argument with every tensor detached and cloned, keeping requires_grad."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t,
                    value)


def assert_module_matches_torch(our_class: type, torch_class: type, sample, *, eval_mode: bool = False) -> None:
    """Builds ``torch_class`` and ``our_class`` from ``sample.constructor_input`` with the same state, runs
    both on (copies of) ``sample.forward_input`` and compares every output and the gradients of every input
    and parameter (fp64, tight tolerance)."""
    from torch.utils._pytree import tree_leaves

    constructor, forward = sample.constructor_input, sample.forward_input
    theirs = torch_class(*constructor.args, **constructor.kwargs).double()
    ours = our_class(*constructor.args, **constructor.kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    if eval_mode:
        theirs.eval(), ours.eval()
    results = []
    for module in (theirs, ours):
        args, kwargs = _fresh(forward.args), _fresh(forward.kwargs)
        outputs = [t for t in tree_leaves(module(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
        leaves += list(module.parameters())
        differentiable = [o for o in outputs if o.requires_grad]
        generator = torch.Generator().manual_seed(0)
        cotangents = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in differentiable]
        grads = torch.autograd.grad(differentiable, leaves, cotangents, allow_unused=True) if differentiable else ()
        results.append(([o.detach() for o in outputs], grads))
    (expected, expected_grads), (actual, actual_grads) = results
    assert len(actual) == len(expected), f"{len(actual)} outputs, torch gives {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, name=f"output {index}")
    for index, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert (a is None) == (e is None), f"gradient {index}: {'none' if a is None else 'one'} where torch has the other"
        if a is not None:
            assert_close(a, e, name=f"gradient {index}")


def torch_op_samples(name: str) -> list:
    """PyTorch's SampleInputs (input, args, kwargs) for the op ``name`` of its OpInfo database, fp64 CPU,
    requiring grad."""
    from torch.testing._internal.common_methods_invocations import op_db

    info = next(op for op in op_db if op.name == name and op.variant_test_name == "")
    return list(info.sample_inputs("cpu", torch.float64, requires_grad=True))


def assert_function_matches_torch(ours: Callable, theirs: Callable, sample) -> None:
    """``ours`` and ``theirs`` on (copies of) a SampleInput: outputs and the gradients of every tensor
    argument that requires grad."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat, spec = tree_flatten((sample.input, sample.args, sample.kwargs))
    positions = [i for i, value in enumerate(flat) if isinstance(value, torch.Tensor)]

    def call(fn):
        def run(*tensors):
            values = list(flat)
            for position, tensor in zip(positions, tensors):
                values[position] = tensor
            input, args, kwargs = tree_unflatten(values, spec)
            return fn(input, *args, **kwargs)
        return run

    tensors = [flat[i] for i in positions]
    expected, expected_grads = outputs_and_grads(call(theirs), tensors)
    actual, actual_grads = outputs_and_grads(call(ours), tensors)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, name=f"output {index}")
    for index, (a, e) in enumerate(zip(actual_grads, expected_grads)):
        assert_close(a, e, name=f"gradient {index}")


# ----------------------------------------------------------------------------------------------------
# Differential fuzzing (hypothesis): random valid and invalid calls, each run by torch and by every kernel
# backend; where torch raises, fastdl must raise the same exception type, else match torch's numbers.

FUZZ_DTYPES = {"native": (torch.float32, torch.float64), "triton": (torch.float32,),
               "reference": (torch.float32, torch.float64)}


def fuzz_backends(device: str = "cpu") -> list[tuple[str, torch.dtype]]:
    """(backend, dtype) pairs to fuzz on ``device``: every available kernel backend in the dtypes it takes
    there (Triton on CPU is its interpreter: fp32)."""
    from ._backends import why_unavailable

    return [(name, dtype) for name, dtypes in FUZZ_DTYPES.items() if why_unavailable(name, device) is None
            for dtype in dtypes]


def fuzz_test(property_test: Callable, strategies: dict, examples: int, *, long: bool = False) -> Callable:
    """A pytest test running ``property_test`` on arguments drawn from ``strategies`` (hypothesis): the
    fast profile (CI) runs ``examples`` derandomized examples, the same ones every run; ``long=True`` is the
    long profile, marked ``slow`` (``FASTDL_SLOW_TESTS=1``): 25× as many fresh random examples. Failures
    shrink to a minimal example, printed with the ``@reproduce_failure`` blob that replays it."""
    import pytest
    from hypothesis import HealthCheck, given, settings

    profile = settings(max_examples=examples * (25 if long else 1), deadline=None, derandomize=not long,
                       database=None, print_blob=True, report_multiple_bugs=False,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    test = profile(given(**strategies)(property_test))
    return pytest.mark.slow(test) if long else test


def raised_by(call: Callable) -> Exception:
    """The exception ``call()`` raises (an AssertionError when it raises none), for comparing its type and
    words with torch's."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 (the caller compares the type)
        return error
    raise AssertionError("no exception raised")


def assert_like_torch(torch_call: Callable, our_call: Callable, compare: Callable) -> bool:
    """Runs ``torch_call()``; if it raises, ``our_call()`` must raise an exception of that type (returns
    False); else ``compare(our_call(), torch_result)`` (returns True)."""
    try:
        expected = torch_call()
    except Exception as error:  # noqa: BLE001 (any exception torch raises is the one to match)
        try:
            our_call()
        except Exception as ours:  # noqa: BLE001
            if not isinstance(ours, type(error)):
                raise AssertionError(f"torch raises {type(error).__name__} ({error}); fastdl raises "
                                     f"{type(ours).__name__} ({ours})") from ours
            return False
        raise AssertionError(f"torch raises {type(error).__name__} ({error}); fastdl raises nothing") from None
    compare(our_call(), expected)
    return True


FUZZ_LAYOUTS = ("contiguous", "channels_last", "transposed", "expanded", "sliced")


def layout_leaf_shape(layout: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of the leaf that :func:`with_layout` turns into an input of ``shape``."""
    shape = tuple(shape)
    if layout == "expanded" and shape:
        return (1,) + shape[1:]
    if layout == "sliced" and shape:
        return shape[:-1] + (2 * shape[-1],)
    return shape


def with_layout(leaf: torch.Tensor, layout: str, shape: Sequence[int]) -> torch.Tensor:
    """``leaf`` as an input of ``shape`` laid out as ``layout`` names (differentiably, so gradients reach
    the leaf): contiguous; channels_last (4-D, else contiguous); transposed (the last two dims' strides
    swapped, values unchanged); expanded (dim 0 broadcast: stride 0); sliced (every other element of the
    last dim)."""
    if layout == "channels_last" and leaf.dim() == 4:
        return leaf.contiguous(memory_format=torch.channels_last)
    if layout == "transposed" and leaf.dim() >= 2:
        return leaf.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded" and leaf.dim() >= 1:
        return leaf.expand(tuple(shape))
    if layout == "sliced" and leaf.dim() >= 1:
        return leaf[..., ::2]
    return leaf


def assert_same_results(actual, expected) -> None:
    """Compares two ``outputs_and_grads`` results (``actual`` in any dtype, ``expected`` the fp64 oracle)."""
    (outputs, grads), (expected_outputs, expected_grads) = actual, expected
    assert len(outputs) == len(expected_outputs), f"{len(outputs)} outputs, torch gives {len(expected_outputs)}"
    for index, (a, e) in enumerate(zip(outputs, expected_outputs)):
        assert_close(a, e, name=f"output {index}")
    for index, (a, e) in enumerate(zip(grads, expected_grads)):
        # No gradient (an input the graph does not reach) and a zero one are the same derivative.
        if a is None or e is None:
            assert all(t is None or not t.count_nonzero() for t in (a, e)), f"gradient {index}: none where the other is nonzero"
        else:
            assert_close(a, e, name=f"gradient {index}")
