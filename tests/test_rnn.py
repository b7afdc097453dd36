"""LSTM / GRU / LSTMCell / GRUCell / lstm_cell / gru_cell on every backend against torch's own modules with
copied weights, fp64 oracle: outputs, final states and the gradients of input, initial states and every
parameter."""
import pytest
import torch
from hypothesis import strategies as st
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import fastdl
from fastdl.ops import GRU, LSTM, GRUCell, LSTMCell, gru_cell, lstm_cell
from fastdl.testing import (AUTOGRAD_TRANSFORMS, assert_close, assert_like_torch, assert_module_matches_torch,
                            assert_same_results, assert_transform_matches, backend_device_cases, cpu_isa_cases,
                            fuzz_backends, fuzz_test, outputs_and_grads, raised_by, torch_module_error_samples,
                            torch_module_samples, with_layout)

CASES = backend_device_cases()
FP32_CASES = [c for c in CASES if c.values[2] == torch.float32]
TORCH_TWIN = {LSTM: torch.nn.LSTM, GRU: torch.nn.GRU, LSTMCell: torch.nn.LSTMCell, GRUCell: torch.nn.GRUCell}


def _randn(*shape, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _twins(cls, seed=0, **kwargs):
    """(torch module in fp64, our module with the same weights)."""
    torch.manual_seed(seed)
    theirs = TORCH_TWIN[cls](**kwargs).double()
    ours = cls(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _check(ours, theirs, make_inputs, call, backend, device, dtype, use_backend):
    """Runs ``call(module, *inputs)`` on our module (backend/device/dtype) and on torch's (fp64 oracle,
    and in dtype as the low-precision yardstick) and compares outputs and all gradients."""
    names = [name for name, _ in theirs.named_parameters()]
    inputs = list(make_inputs()) + [p.detach().clone().requires_grad_() for _, p in theirs.named_parameters()]
    count = len(inputs) - len(names)

    def runner(module):
        return lambda *args: call(
            lambda *a: functional_call(module, dict(zip(names, args[count:])), a), *args[:count]
        )

    expected, expected_grads = outputs_and_grads(runner(theirs), inputs, dtype=torch.float64, device="cpu")
    eager, eager_grads = [None] * len(expected), [None] * len(expected_grads)
    if dtype in (torch.float16, torch.bfloat16):
        eager, eager_grads = outputs_and_grads(runner(theirs.to(device)), inputs, dtype=dtype, device=device)
    ours = ours.to(device=device, dtype=dtype)
    with use_backend(backend, device):
        actual, actual_grads = outputs_and_grads(runner(ours), inputs, dtype=dtype, device=device)
    for index, (a, e, low) in enumerate(zip(actual, expected, eager)):
        assert a.dtype == dtype
        assert_close(a, e, eager=low, name=f"output {index}")
    labels = [f"input {i}" for i in range(count)] + names
    for label, a, e, low in zip(labels, actual_grads, expected_grads, eager_grads):
        assert_close(a, e, eager=low, name=f"grad {label}")


# ------------------------------------------------------------------------------------------ sequences
# (module, constructor kwargs, T, B): 1–3 layers, bidirectional, batch_first, proj_size, no bias, seq
# length 1, batch 1. On CUDA, whole sequences of at most 8 rows run the persistent kernel (hidden 300 gives
# its blocks several units each) and the batch-9 cases the GEMM + pointwise loop.
SEQUENCES = [
    (LSTM, dict(input_size=5, hidden_size=300), 5, 4),
    (LSTM, dict(input_size=5, hidden_size=7), 3, 9),
    (GRU, dict(input_size=5, hidden_size=300), 5, 4),
    (GRU, dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True), 3, 9),
    (LSTM, dict(input_size=5, hidden_size=6), 4, 3),
    (LSTM, dict(input_size=5, hidden_size=6, num_layers=2, bidirectional=True), 3, 2),
    (LSTM, dict(input_size=4, hidden_size=5, num_layers=3, batch_first=True), 3, 2),
    (LSTM, dict(input_size=5, hidden_size=6, proj_size=3, num_layers=2, bidirectional=True), 3, 2),
    (LSTM, dict(input_size=5, hidden_size=6, bias=False), 1, 1),
    (GRU, dict(input_size=5, hidden_size=6), 4, 3),
    (GRU, dict(input_size=5, hidden_size=6, num_layers=2, bidirectional=True), 3, 2),
    (GRU, dict(input_size=4, hidden_size=5, num_layers=3, batch_first=True, bias=False), 3, 2),
    (GRU, dict(input_size=5, hidden_size=6), 1, 1),
]


def _sequence_id(value):
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items() if k not in ("input_size", "hidden_size"))
    return value.__name__ if isinstance(value, type) else str(value)


def _states(module, batch, seed):
    directions = 2 if module.bidirectional else 1
    proj = getattr(module, "proj_size", 0)
    h = _randn(module.num_layers * directions, batch, proj or module.hidden_size, seed=seed).requires_grad_()
    if isinstance(module, torch.nn.LSTM):
        return h, _randn(module.num_layers * directions, batch, module.hidden_size, seed=seed + 1).requires_grad_()
    return (h,)


def _rnn_call(module, x, *states):
    output, hidden = module(x, (states if len(states) == 2 else states[0]) if states else None)
    return (output,) + (tuple(hidden) if isinstance(hidden, tuple) else (hidden,))


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("cls,kwargs,T,B", SEQUENCES, ids=_sequence_id)
def test_sequence_matches_torch(cls, kwargs, T, B, backend, device, dtype, use_backend):
    theirs, ours = _twins(cls, **kwargs)
    shape = (B, T, kwargs["input_size"]) if kwargs.get("batch_first") else (T, B, kwargs["input_size"])
    make = lambda: (_randn(*shape).requires_grad_(),) + _states(theirs, B, seed=3)  # noqa: E731
    _check(ours, theirs, make, _rnn_call, backend, device, dtype, use_backend)


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES + [c for c in CASES if c.values[:3] == ("native", "cpu", torch.float64)])
@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_packed_unsorted_lengths_and_no_initial_state(cls, backend, device, dtype, use_backend):
    kwargs = dict(input_size=4, hidden_size=5, num_layers=2, bidirectional=True)
    if cls is LSTM:
        kwargs["proj_size"] = 3
    theirs, ours = _twins(cls, **kwargs)
    lengths = torch.tensor([3, 5, 1, 4])

    def call(module, padded, *states):
        packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
        output, hidden = module(packed, (states if len(states) == 2 else states[0]) if states else None)
        assert torch.equal(output.batch_sizes, packed.batch_sizes)
        assert torch.equal(output.unsorted_indices, packed.unsorted_indices)
        return (output.data,) + (tuple(hidden) if isinstance(hidden, tuple) else (hidden,))

    make = lambda: (_randn(5, 4, 4).requires_grad_(),) + _states(theirs, 4, seed=5)  # noqa: E731
    _check(ours, theirs, make, call, backend, device, dtype, use_backend)
    _check(ours, theirs, lambda: (_randn(5, 4, 4).requires_grad_(),), call, backend, device, dtype, use_backend)


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
@pytest.mark.parametrize("cls", [LSTM, GRU])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(cls, batch_first, backend, device, dtype, use_backend):
    theirs, ours = _twins(cls, input_size=4, hidden_size=5, num_layers=2, batch_first=batch_first)
    make = lambda: (_randn(3, 4).requires_grad_(),) + tuple(s[:, 0].detach().requires_grad_() for s in _states(theirs, 1, 7))  # noqa: E731
    _check(ours, theirs, make, _rnn_call, backend, device, dtype, use_backend)


def _packed_call(module, lengths):
    """``fn(padded, *states)``: the module on the padded input packed with ``lengths`` (unsorted), returning
    the packed output's data and the final states."""
    def fn(x, *states):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        output, hidden = module(packed, states if len(states) == 2 else states[0])
        return (output.data,) + (tuple(hidden) if isinstance(hidden, tuple) else (hidden,))
    return fn


@pytest.mark.parametrize("isa", cpu_isa_cases())
def test_native_gradcheck_fp64(isa, use_backend):
    with use_backend("native", "cpu"):
        for cls, kwargs in [(LSTM, dict(proj_size=2, bidirectional=True)), (GRU, dict(bidirectional=True))]:
            torch.manual_seed(0)
            module = cls(3, 4, **kwargs).double()
            lengths = torch.tensor([3, 1, 2])
            x = _randn(3, 3, 3).requires_grad_()
            h = _states(module, 3, seed=1)
            assert torch.autograd.gradcheck(_packed_call(module, lengths), (x,) + h)
            assert torch.autograd.gradcheck(lambda x, *s: _rnn_call(module, x, *s), (x,) + h)
        x, hx, cx = _randn(2, 3).requires_grad_(), _randn(2, 4, seed=1).requires_grad_(), _randn(2, 4, seed=2).requires_grad_()
        weights = [_randn(16, 3, seed=3).requires_grad_(), _randn(16, 4, seed=4).requires_grad_(),
                   _randn(16, seed=5).requires_grad_(), _randn(16, seed=6).requires_grad_()]
        assert torch.autograd.gradcheck(lambda x, h, c, *w: lstm_cell(x, (h, c), *w), (x, hx, cx, *weights))
        weights = [w[:12] for w in weights[:2]] + [w[:12] for w in weights[2:]]
        weights = [w.detach().requires_grad_() for w in weights]
        assert torch.autograd.gradcheck(lambda x, h, *w: gru_cell(x, h, *w), (x, hx, *weights))


# ------------------------------------------------------------------------------------------ cells
CELLS = [(LSTMCell, 3, True), (LSTMCell, 1, False), (GRUCell, 3, True), (GRUCell, 2, False)]


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("cls,B,bias", CELLS, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_cell_matches_torch(cls, B, bias, backend, device, dtype, use_backend):
    theirs, ours = _twins(cls, input_size=5, hidden_size=7, bias=bias)

    def make():
        states = (_randn(B, 7, seed=1).requires_grad_(),)
        if cls is LSTMCell:
            states += (_randn(B, 7, seed=2).requires_grad_(),)
        return (_randn(B, 5).requires_grad_(),) + states

    def call(module, x, *states):
        out = module(x, states if len(states) == 2 else states[0])
        return out if isinstance(out, tuple) else (out,)

    _check(ours, theirs, make, call, backend, device, dtype, use_backend)


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
@pytest.mark.parametrize("cls", [LSTMCell, GRUCell])
def test_cell_unbatched_and_default_state(cls, backend, device, dtype, use_backend):
    theirs, ours = _twins(cls, input_size=5, hidden_size=4)

    def call(module, x):
        out = module(x)
        return out if isinstance(out, tuple) else (out,)

    _check(ours, theirs, lambda: (_randn(5).requires_grad_(),), call, backend, device, dtype, use_backend)


def test_functionals_match_torch():
    x, h, c = _randn(3, 5), _randn(3, 4, seed=1), _randn(3, 4, seed=2)
    w_ih, w_hh, b_ih, b_hh = _randn(16, 5, seed=3), _randn(16, 4, seed=4), _randn(16, seed=5), _randn(16, seed=6)
    for actual, expected in zip(lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh), torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)):
        assert_close(actual, expected)
    g = [w_ih[:12], w_hh[:12], b_ih[:12], b_hh[:12]]
    assert_close(gru_cell(x, h, *g), torch.gru_cell(x, h, *g))
    assert_close(gru_cell(x, h, g[0], g[1]), torch.gru_cell(x, h, g[0], g[1], None, None))


# ------------------------------------------------------------------------------------------ registration
def _op_samples(device):
    def r(*shape):
        return torch.randn(shape, device=device)

    T, B, H, P = 3, 2, 4, 3
    sizes = torch.tensor([2, 2, 1])
    return [
        (torch.ops.fastdl.lstm_gates.default, (r(B, 4 * H), r(B, 4 * H), r(B, H))),
        (torch.ops.fastdl.lstm_gates_backward.default, (r(B, H), r(B, H), r(B, 4 * H).sigmoid(), r(B, H), r(B, H))),
        (torch.ops.fastdl.gru_gates.default, (r(B, 3 * H), r(B, 3 * H), r(B, H))),
        (torch.ops.fastdl.gru_gates_backward.default, (r(B, H), r(B, 4 * H), r(B, H))),
        (torch.ops.fastdl.lstm_layer.default, (r(T, B, 4 * H), r(B, P), r(B, H), r(4 * H, P), r(P, H), sizes, True)),
        (torch.ops.fastdl.lstm_layer.default, (r(T, B, 4 * H), r(B, H), r(B, H), r(4 * H, H), None, None, False)),
        (torch.ops.fastdl.gru_layer.default, (r(T, B, 3 * H), r(B, H), r(3 * H, H), r(3 * H), sizes, False)),
        (torch.ops.fastdl.gru_layer.default, (r(T, B, 3 * H), r(B, H), r(3 * H, H), None, None, True)),
        (torch.ops.fastdl.lstm_layer_backward.default,
         (r(T, B, P), r(B, P), r(B, H), r(T, B, 4 * H), r(T, B, H), r(T, B, P), r(B, P), r(B, H), r(4 * H, P), r(P, H), sizes, False)),
        (torch.ops.fastdl.gru_layer_backward.default,
         (r(T, B, H), r(B, H), r(T, B, 4 * H), r(T, B, H), r(B, H), r(3 * H, H), True, None, True)),
    ]


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_opcheck(backend, use_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with use_backend(backend, device):
        for op, args in _op_samples(device):
            # Backward ops have no autograd formula of their own (the forward ops' differentiable backward is
            # the reference loop), so only forward ops get grads.
            differentiable = not op.name().endswith("_backward")
            args = tuple(a.requires_grad_(differentiable) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                         for a in args)
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    # Dynamo refuses every nn.RNNBase instance (ours subclass nn.LSTM / nn.GRU) unless allow_rnn is set;
    # with it, the model must trace as one graph through the fastdl ops.
    torch._dynamo.reset()
    torch.manual_seed(0)
    lstm, gru = LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3), GRU(6, 4)
    model = lambda x: gru(lstm(x)[0])[0]  # noqa: E731
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 2, 4, requires_grad=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        y = compiled(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    twin_lstm = torch.nn.LSTM(4, 5, num_layers=2, bidirectional=True, proj_size=3)
    twin_lstm.load_state_dict(lstm.state_dict())
    twin_gru = torch.nn.GRU(6, 4)
    twin_gru.load_state_dict(gru.state_dict())
    expected = twin_gru(twin_lstm(x)[0])[0]
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [LSTM, GRU, LSTMCell, GRUCell])
def test_weights_round_trip_and_repr(cls):
    kwargs = dict(input_size=5, hidden_size=6)
    if cls in (LSTM, GRU):
        kwargs.update(num_layers=2, bidirectional=True)
    if cls is LSTM:
        kwargs["proj_size"] = 4
    torch.manual_seed(0)
    source = TORCH_TWIN[cls](**kwargs)
    ours = cls(**kwargs)
    assert isinstance(ours, TORCH_TWIN[cls])
    ours.load_state_dict(source.state_dict())
    back = TORCH_TWIN[cls](**kwargs)
    back.load_state_dict(ours.state_dict())
    assert repr(ours).endswith(repr(source)[len(type(source).__name__):])
    for key, value in source.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x = torch.randn(3, 2, 5) if cls in (LSTM, GRU) else torch.randn(2, 5)
    torch.testing.assert_close(ours(x), back(x), rtol=1e-5, atol=1e-6)


def test_dropout_between_layers_in_training_only():
    torch.manual_seed(0)
    ours = LSTM(4, 8, num_layers=2, dropout=0.5)
    theirs = torch.nn.LSTM(4, 8, num_layers=2, dropout=0.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3, 4)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-5, atol=1e-6)
    ours.train()
    torch.manual_seed(1)
    first = ours(x)[0]
    torch.manual_seed(2)
    second = ours(x)[0]
    assert not torch.allclose(first, second), "training-mode dropout must change the output"
    single = LSTM(4, 8, num_layers=1, dropout=0.0).train()
    assert torch.equal(single(x)[0], single(x)[0])


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_deterministic(backend, device, dtype, use_backend):
    torch.manual_seed(0)
    module = LSTM(4, 6, num_layers=2, bidirectional=True).to(device)
    x = torch.randn(4, 5, 4, device=device, requires_grad=True)
    runs = []
    with use_backend(backend, device):
        for _ in range(2):
            y, (h, c) = module(x)
            grads = torch.autograd.grad((y.sum(), h.sum(), c.sum()), [x] + list(module.parameters()))
            runs.append((y, h, c) + grads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ------------------------------------------------------------------------- beyond first-order autograd
def _functional(module, count):
    """``fn(*inputs, *parameters)`` = the module on ``inputs`` (its first ``count`` arguments) with the
    given parameters, through functional_call; a tuple of states is one argument of the module."""
    names = [name for name, _ in module.named_parameters()]

    def run(*args):
        inputs = args[:count]
        call_args = (inputs[0], tuple(inputs[1:]) if len(inputs) > 2 else inputs[1]) if count > 1 else inputs
        output = functional_call(module, dict(zip(names, args[count:])), call_args)
        if isinstance(output, tuple):  # (output, hidden) or (h, c): flatten
            return tuple(t for part in output for t in (part if isinstance(part, tuple) else (part,)))
        return output

    return run


TRANSFORM_MODULES = {
    "lstm-cell": (LSTMCell, dict(input_size=3, hidden_size=4), lambda g: (_randn(2, 3, seed=g), _randn(2, 4, seed=g + 1),
                                                                         _randn(2, 4, seed=g + 2))),
    "gru-cell": (GRUCell, dict(input_size=3, hidden_size=4), lambda g: (_randn(2, 3, seed=g), _randn(2, 4, seed=g + 1))),
    "lstm": (LSTM, dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True),
             lambda g: (_randn(2, 3, 3, seed=g), _randn(4, 2, 2, seed=g + 1), _randn(4, 2, 4, seed=g + 2))),
    "gru": (GRU, dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True),
            lambda g: (_randn(3, 2, 3, seed=g), _randn(4, 2, 4, seed=g + 1))),
}


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("kind", list(TRANSFORM_MODULES))
@pytest.mark.parametrize("transform", AUTOGRAD_TRANSFORMS)
def test_autograd_transforms_match_torch(transform, kind, backend, use_backend):
    """functional_call over the parameters, with input and states differentiated too, side by side with
    torch's module: torch.func transforms, forward-mode AD and double backward."""
    cls, kwargs, make = TRANSFORM_MODULES[kind]
    theirs, ours = _twins(cls, **kwargs)
    ours.double()
    inputs = make(30)
    params = [p.detach() for p in theirs.parameters()]
    with use_backend(backend, "cpu"):
        assert_transform_matches(transform, _functional(ours, len(inputs)), _functional(theirs, len(inputs)),
                                 [*inputs, *params])


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("cls", [LSTM, GRU])
def test_gradgradcheck_fp64_packed(cls, backend, use_backend):
    torch.manual_seed(0)
    module = cls(3, 4, bidirectional=True, **(dict(proj_size=2) if cls is LSTM else {})).double()
    lengths = torch.tensor([3, 1, 2])
    x = _randn(3, 3, 3).requires_grad_()
    states = _states(module, 3, seed=31)
    with use_backend(backend, "cpu"):
        assert torch.autograd.gradgradcheck(_packed_call(module, lengths), (x, *states))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("cls", [LSTM, GRU, LSTMCell, GRUCell], ids=lambda c: c.__name__)
def test_pytorch_module_samples(cls, backend, use_backend):
    """PyTorch's own sample inputs for the module (its ModuleInfo): outputs and all gradients."""
    with use_backend(backend, "cpu"):
        for sample in torch_module_samples(TORCH_TWIN[cls]):
            assert_module_matches_torch(cls, TORCH_TWIN[cls], sample)


@pytest.mark.parametrize("cls", [LSTM, GRU, LSTMCell, GRUCell], ids=lambda c: c.__name__)
def test_pytorch_module_error_samples(cls):
    """PyTorch's own error inputs for the module: the exception type and message regex its tests expect."""
    for error in torch_module_error_samples(TORCH_TWIN[cls]):
        constructor, forward = error.module_error_input.constructor_input, error.module_error_input.forward_input
        with pytest.raises(error.error_type, match=error.error_regex):
            cls(*constructor.args, **constructor.kwargs).double()(*forward.args, **forward.kwargs)


# (id, fastdl call, torch call): the same mistake made with both; torch's exception type and message are
# expected (PyTorch's own tests match messages with regexes).
_W4, _W3 = torch.randn(20, 4), torch.randn(15, 4)
ERRORS = [
    ("lstm-rank4", lambda m: m(torch.randn(2, 3, 4, 5)), "LSTM"),
    ("lstm-input-size", lambda m: m(torch.randn(3, 2, 6)), "LSTM"),
    ("lstm-state-rank", lambda m: m(torch.randn(3, 2, 4), (torch.randn(1, 2, 5), torch.randn(2, 5))), "LSTM"),
    ("lstm-unbatched-state-rank", lambda m: m(torch.randn(3, 4), (torch.randn(1, 1, 5), torch.randn(1, 1, 5))), "LSTM"),
    ("lstm-state-not-a-pair", lambda m: m(torch.randn(3, 2, 4), torch.randn(1, 2, 5)), "LSTM"),
    ("lstm-cell-state-shape", lambda m: m(torch.randn(3, 2, 4), (torch.randn(1, 2, 5), torch.randn(1, 2, 6))), "LSTM"),
    ("lstm-sequence-length-0", lambda m: m(torch.randn(0, 2, 4)), "LSTM"),
    ("gru-state-batch", lambda m: m(torch.randn(3, 2, 4), torch.randn(1, 3, 5)), "GRU"),
    ("gru-state-rank", lambda m: m(torch.randn(3, 2, 4), torch.randn(2, 5)), "GRU"),
    ("gru-fp64-state", lambda m: m(torch.randn(3, 2, 4), torch.randn(1, 2, 5).double()), "GRU"),
    ("gru-fp64-input", lambda m: m(torch.randn(3, 2, 4).double()), "GRU"),
    ("gru-unbatched-length-0", lambda m: m(torch.randn(0, 4)), "GRU"),
    ("lstm-cell-rank3", lambda m: m(torch.randn(2, 3, 4)), "LSTMCell"),
    ("lstm-cell-state-rank3", lambda m: m(torch.randn(2, 4), (torch.randn(1, 2, 5), torch.randn(2, 5))), "LSTMCell"),
    ("lstm-cell-input-size", lambda m: m(torch.randn(2, 3)), "LSTMCell"),
    ("lstm-cell-hidden-size", lambda m: m(torch.randn(2, 4), (torch.randn(2, 6), torch.randn(2, 5))), "LSTMCell"),
    ("lstm-cell-cell-size", lambda m: m(torch.randn(2, 4), (torch.randn(2, 5), torch.randn(2, 6))), "LSTMCell"),
    ("lstm-cell-batch", lambda m: m(torch.randn(2, 4), (torch.randn(3, 5), torch.randn(3, 5))), "LSTMCell"),
    ("lstm-cell-unbatched-2d-state", lambda m: m(torch.randn(4), (torch.randn(1, 5), torch.randn(1, 5))), "LSTMCell"),
    ("gru-cell-state-rank3", lambda m: m(torch.randn(2, 4), torch.randn(1, 2, 5)), "GRUCell"),
    ("gru-cell-hidden-size", lambda m: m(torch.randn(2, 4), torch.randn(2, 6)), "GRUCell"),
    ("gru-cell-batch", lambda m: m(torch.randn(2, 4), torch.randn(3, 5)), "GRUCell"),
    ("lstm-cell-functional-input-size",
     lambda f: f(torch.randn(2, 3), (torch.randn(2, 5), torch.randn(2, 5)), _W4, torch.randn(20, 5)), "lstm_cell"),
    ("gru-cell-functional-batch", lambda f: f(torch.randn(2, 4), torch.randn(3, 5), _W3, torch.randn(15, 5)), "gru_cell"),
]
_OURS = {"LSTM": LSTM(4, 5), "GRU": GRU(4, 5), "LSTMCell": LSTMCell(4, 5), "GRUCell": GRUCell(4, 5),
         "lstm_cell": lstm_cell, "gru_cell": gru_cell}
_THEIRS = {"LSTM": torch.nn.LSTM(4, 5), "GRU": torch.nn.GRU(4, 5), "LSTMCell": torch.nn.LSTMCell(4, 5),
           "GRUCell": torch.nn.GRUCell(4, 5), "lstm_cell": torch.lstm_cell, "gru_cell": torch.gru_cell}


@pytest.mark.parametrize("call,target", [case[1:] for case in ERRORS], ids=[case[0] for case in ERRORS])
def test_bad_input_raises_like_torch(call, target):
    expected, actual = raised_by(lambda: call(_THEIRS[target])), raised_by(lambda: call(_OURS[target]))
    assert type(actual) is type(expected) and str(actual) == str(expected)


def test_lstm_state_dtype_raises_torch_dtype_message():
    """torch's own LSTM answers an fp64 state for fp32 input with a oneDNN-internal message; fastdl gives the
    dtype message torch's GRU gives for the same mistake (the same exception type)."""
    x, state = torch.randn(3, 2, 4), torch.randn(1, 2, 5)
    expected = raised_by(lambda: torch.nn.LSTM(4, 5)(x, (state.double(), state)))
    actual = raised_by(lambda: LSTM(4, 5)(x, (state.double(), state)))
    assert type(actual) is type(expected) is RuntimeError
    assert str(actual) == "mat1 and mat2 must have the same dtype, but got Double and Float"


def test_explicit_backend_that_cannot_run_says_why():
    with fastdl.backend("native"), pytest.raises(NotImplementedError) as info:
        LSTM(3, 4).half()(torch.randn(2, 1, 3, dtype=torch.float16))
    message = str(info.value)
    assert "dtype float16 is not supported on cpu" in message
    assert "reference: can run it" in message


# ----------------------------------------------------------------------------------------------------
# Differential fuzzing: random configurations (layers, directions, projections, bias, batch_first; invalid
# projection sizes included), inputs batched, unbatched, packed with random lengths or of a wrong rank,
# sequence lengths 0–4, states absent, given, of a wrong shape or dtype, non-contiguous inputs; on every
# backend against torch's module with the same weights: outputs and gradients of input, states and weights.

FUZZ_CALLS = dict(
    kind=st.sampled_from(["LSTM", "GRU", "LSTMCell", "GRUCell"]), input_size=st.integers(1, 3),
    hidden_size=st.integers(1, 4), num_layers=st.integers(1, 2), bidirectional=st.booleans(), bias=st.booleans(),
    batch_first=st.booleans(), proj_size=st.integers(0, 4), form=st.sampled_from(["batched", "unbatched", "packed",
                                                                                    "rank-4"]),
    length=st.integers(0, 4), batch=st.integers(1, 3), states=st.sampled_from(["none", "given", "wrong-shape",
                                                                              "wrong-dtype"]),
    layout=st.sampled_from(["contiguous", "transposed"]), seed=st.integers(0, 2**31 - 1),
)


def _fuzz_rnn(kind, input_size, hidden_size, num_layers, bidirectional, bias, batch_first, proj_size, form, length,
              batch, states, layout, seed):
    cell = kind.endswith("Cell")
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, bias=bias)
    if not cell:
        kwargs.update(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first)
    if kind == "LSTM":
        kwargs["proj_size"] = proj_size
    ours_class = {"LSTM": LSTM, "GRU": GRU, "LSTMCell": LSTMCell, "GRUCell": GRUCell}[kind]
    try:
        theirs, ours = _twins(ours_class, seed=seed % 1000, **kwargs)
    except ValueError:  # torch's constructor refused the configuration; ours is that same constructor
        return
    g = torch.Generator().manual_seed(seed)
    if cell:
        shape = {"batched": (batch, input_size), "unbatched": (input_size,)}.get(form, (1, batch, input_size))
    else:
        time_major = (length, batch) if not batch_first else (batch, length)
        shape = {"batched": (*time_major, input_size), "unbatched": (length, input_size),
                 "packed": (length, batch, input_size)}.get(form, (1, length, batch, input_size))
    leaves = [torch.randn(shape, dtype=torch.float64, generator=g)]
    lengths = torch.randint(1, max(length, 1) + 1, (batch,), generator=g)
    lengths[0] = length
    state_count = 2 if kind in ("LSTM", "LSTMCell") else 1
    if states != "none":
        directions = 2 if bidirectional and not cell else 1
        state_batch = () if form == "unbatched" else (batch,)
        for index in range(state_count):
            size = proj_size if kind == "LSTM" and proj_size and index == 0 else hidden_size
            state_shape = ((num_layers * directions,) if not cell else ()) + state_batch + (size,)
            if states == "wrong-shape" and index == state_count - 1:
                state_shape = state_shape[:-1] + (size + 1,)
            leaves.append(torch.randn(state_shape, dtype=torch.float64, generator=g))
    names = [name for name, _ in theirs.named_parameters()]
    count = len(leaves)
    leaves += [p.detach().clone() for p in theirs.parameters()]
    leaves = [t.requires_grad_() for t in leaves]

    def call(module):
        def run(*tensors):
            x = with_layout(tensors[0], layout, shape)
            hx = tensors[1:count]
            if states == "wrong-dtype":
                hx = tuple(t.float() if t.dtype == torch.float64 else t.double() for t in hx)
            hx = None if not hx else (tuple(hx) if state_count == 2 else hx[0])
            if form == "packed":
                x = pack_padded_sequence(x, lengths, enforce_sorted=False)
            output = functional_call(module, dict(zip(names, tensors[count:])), (x, hx))
            flat = output if isinstance(output, tuple) else (output,)
            flat = [part.data if hasattr(part, "batch_sizes") else part for part in flat]
            return tuple(t for part in flat for t in (part if isinstance(part, tuple) else (part,)))
        return run

    for backend, dtype in fuzz_backends():
        def run():
            with fastdl.backend(backend):
                return outputs_and_grads(call(ours.to(dtype)), leaves, dtype=dtype)
        assert_like_torch(lambda: outputs_and_grads(call(theirs), leaves), run, assert_same_results)


test_fuzz_matches_torch = fuzz_test(_fuzz_rnn, FUZZ_CALLS, examples=25)
test_fuzz_matches_torch_long = fuzz_test(_fuzz_rnn, FUZZ_CALLS, examples=25, long=True)
