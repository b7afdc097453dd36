"""spectral_norm / spectral_normalize on every backend against torch.nn.utils.parametrizations.spectral_norm
(run in fp64 as the oracle)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import fastdl
from fastdl.ops import spectral_norm, spectral_normalize
from fastdl.testing import (AUTOGRAD_TRANSFORMS, assert_close, assert_like_torch, assert_transform_matches,
                            backend_device_cases, cpu_isa_cases, fuzz_backends, fuzz_test)

CPU_CASES = [c for c in backend_device_cases() if c.values[1] == "cpu"]
CASES = backend_device_cases()
FP32_CASES = [c for c in CASES if c.values[2] == torch.float32]

# Every module type torch's spectral_norm documents, with weights small enough for Triton's interpreter.
MODULES = {
    "linear": lambda: nn.Linear(12, 10),
    "conv1d": lambda: nn.Conv1d(3, 6, 3),
    "conv2d": lambda: nn.Conv2d(3, 5, 3),
    "conv3d": lambda: nn.Conv3d(2, 4, 2),
    "conv_transpose1d": lambda: nn.ConvTranspose1d(4, 3, 3),
    "conv_transpose2d": lambda: nn.ConvTranspose2d(5, 3, 2),
    "conv_transpose3d": lambda: nn.ConvTranspose3d(3, 2, 2),
    "embedding": lambda: nn.Embedding(9, 6),
}


def _twins(make, dtype, device, n_power_iterations=1, dim=None, seed=0):
    """torch's parametrized module in fp64 (the oracle) and fastdl's in ``dtype``, with the same state."""
    torch.manual_seed(seed)
    oracle = torch_spectral_norm(make().double(), n_power_iterations=n_power_iterations, dim=dim)
    torch.manual_seed(seed)
    ours = spectral_norm(make().double(), n_power_iterations=n_power_iterations, dim=dim)
    ours.load_state_dict(oracle.state_dict())
    return oracle, ours.to(device=device, dtype=dtype)


def _sn_state(module):
    return module.parametrizations.weight[0], module.parametrizations.weight.original


def _sigma(module):
    """σ as the module applies it: ‖W‖ / ‖W / σ‖."""
    _, original = _sn_state(module)
    return original.detach().double().norm() / module.weight.detach().double().norm()


def _compare(oracle, ours, label):
    oracle_sn, oracle_original = _sn_state(oracle)
    ours_sn, ours_original = _sn_state(ours)
    assert_close(ours_sn._u, oracle_sn._u, name=f"{label}: _u")
    assert_close(ours_sn._v, oracle_sn._v, name=f"{label}: _v")
    expected_weight, actual_weight = oracle.weight, ours.weight
    assert_close(actual_weight.detach(), expected_weight.detach(), name=f"{label}: weight")
    sigma_error = abs(_sigma(ours).item() / _sigma(oracle).item() - 1)
    assert sigma_error < 1e-5, f"{label}: σ relative error {sigma_error:.3g}"


def _steps_and_grad(oracle, ours, steps, backend, device, use_backend):
    """``steps`` training-mode reads of the weight on both twins, then ∂L/∂W of a loss on the last one."""
    generator = torch.Generator().manual_seed(1)
    probe = torch.randn(_sn_state(oracle)[1].shape, generator=generator, dtype=torch.float64)  # .weight would step
    with use_backend(backend, device):
        for _ in range(steps - 1):
            oracle.weight, ours.weight  # noqa: B018  (each read is a power-iteration step)
        expected_grad = torch.autograd.grad((oracle.weight * probe).sum(), _sn_state(oracle)[1])[0]
        actual_grad = torch.autograd.grad((ours.weight * probe.to(device)).sum(), _sn_state(ours)[1])[0]
    # The final reads in _compare run one more step on both.
    return actual_grad, expected_grad


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize("module", ["linear", "conv2d"])
def test_training_steps_match_torch(backend, device, dtype, steps, module, use_backend):
    if dtype in (torch.float16, torch.bfloat16):
        pytest.skip("fp16/bf16 twins are compared in test_low_precision_matches_torch")
    oracle, ours = _twins(MODULES[module], dtype, device, n_power_iterations=2 if steps == 5 else 1)
    actual_grad, expected_grad = _steps_and_grad(oracle, ours, steps, backend, device, use_backend)
    assert_close(actual_grad, expected_grad, name="grad of the original weight")
    with use_backend(backend, device):
        _compare(oracle, ours, f"{module} after {steps} steps")


@pytest.mark.parametrize("backend,device,dtype", [c for c in CASES if c.values[2] in (torch.float32, torch.float64)])
@pytest.mark.parametrize("module", list(MODULES))
@pytest.mark.parametrize("dim", [None, -1])
def test_every_module_type_and_dim(backend, device, dtype, module, dim, use_backend):
    if backend == "triton" and dim is not None:
        pytest.skip("one dim per module type keeps the interpreter run short; dim=-1 is exercised natively")
    oracle, ours = _twins(MODULES[module], dtype, device, dim=dim)
    actual_grad, expected_grad = _steps_and_grad(oracle, ours, 2, backend, device, use_backend)
    assert_close(actual_grad, expected_grad, name="grad of the original weight")
    with use_backend(backend, device):
        _compare(oracle, ours, f"{module} dim={dim}")


@pytest.mark.parametrize("backend,device,dtype", [c for c in CASES if c.values[2] in (torch.float16, torch.bfloat16)])
def test_low_precision_matches_torch(backend, device, dtype, use_backend):
    oracle, ours = _twins(lambda: nn.Conv2d(8, 16, 3), dtype, device)
    eager = copy.deepcopy(oracle).to(device=device, dtype=dtype)
    with use_backend(backend, device):
        for _ in range(3):
            expected, actual, low = oracle.weight, ours.weight, eager.weight
    assert_close(actual.detach(), expected.detach(), eager=low.detach(), name="weight")


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_eval_mode_uses_stored_vectors(backend, device, dtype, use_backend):
    oracle, ours = _twins(MODULES["conv2d"], dtype, device)
    oracle.eval(), ours.eval()
    u_before, v_before = _sn_state(ours)[0]._u.clone(), _sn_state(ours)[0]._v.clone()
    with use_backend(backend, device):
        for _ in range(3):
            _compare(oracle, ours, "eval")
    assert torch.equal(_sn_state(ours)[0]._u, u_before) and torch.equal(_sn_state(ours)[0]._v, v_before)


def test_state_dict_round_trips_both_ways():
    torch.manual_seed(0)
    theirs = torch_spectral_norm(nn.Conv2d(3, 8, 4))
    ours = spectral_norm(nn.Conv2d(3, 8, 4))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for _ in range(3):
        theirs.weight
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)
    for _ in range(3):
        ours.weight
    back = torch_spectral_norm(nn.Conv2d(3, 8, 4))
    back.load_state_dict(ours.state_dict())
    back.eval(), ours.eval()
    torch.testing.assert_close(back.weight, ours.weight, rtol=1e-5, atol=1e-6)


def test_remove_parametrizations():
    torch.manual_seed(0)
    theirs = torch_spectral_norm(nn.Linear(20, 30)).eval()
    ours = spectral_norm(nn.Linear(20, 30)).eval()
    ours.load_state_dict(theirs.state_dict())
    parametrize.remove_parametrizations(theirs, "weight")
    parametrize.remove_parametrizations(ours, "weight")
    assert not parametrize.is_parametrized(ours) and isinstance(ours.weight, nn.Parameter)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)


def test_one_dimensional_weight_is_normalized_like_torch():
    torch.manual_seed(0)
    theirs = torch_spectral_norm(nn.Linear(5, 7), name="bias")
    torch.manual_seed(0)
    ours = spectral_norm(nn.Linear(5, 7), name="bias")
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.bias, theirs.bias)


def _functional_oracle(weight, u, v, n_power_iterations, eps, training, dim):
    matrix = weight.movedim(dim, 0).flatten(1)
    if training:
        for _ in range(n_power_iterations):
            u = F.normalize(matrix @ v, dim=0, eps=eps)
            v = F.normalize(matrix.T @ u, dim=0, eps=eps)
    return weight / torch.dot(u, matrix @ v), u, v


@pytest.mark.parametrize("backend,device,dtype", CPU_CASES + [c for c in FP32_CASES if c.values[1] == "cuda"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,dim", [((7, 5), 0), ((7, 5), 1), ((4, 3, 2, 5), 2), ((1, 33), 0), ((37, 70), 0)])
def test_functional_matches_oracle(backend, device, dtype, training, shape, dim, use_backend):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=generator, dtype=torch.float64)
    rows = shape[dim]
    u = F.normalize(torch.randn(rows, generator=generator, dtype=torch.float64), dim=0)
    v = F.normalize(torch.randn(weight.numel() // rows, generator=generator, dtype=torch.float64), dim=0)
    expected = _functional_oracle(weight, u, v, 3, 1e-12, training, dim)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    with use_backend(backend, device):
        actual = spectral_normalize(cast(weight), cast(u), cast(v), 3, 1e-12, training, dim=dim)
    for name, a, e in zip(("weight_sn", "u", "v"), actual, expected):
        assert_close(a, e, name=name)


def test_functional_does_not_modify_its_vectors():
    weight, u, v = torch.randn(6, 4), F.normalize(torch.randn(6), dim=0), F.normalize(torch.randn(4), dim=0)
    u0, v0 = u.clone(), v.clone()
    _, new_u, new_v = spectral_normalize(weight, u, v, 2)
    assert torch.equal(u, u0) and torch.equal(v, v0) and not torch.equal(new_u, u0)


def test_zero_weight_gives_torch_nan_pattern():
    theirs = torch_spectral_norm(nn.Linear(4, 3))
    ours = spectral_norm(nn.Linear(4, 3))
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        theirs.parametrizations.weight.original.zero_()
        ours.parametrizations.weight.original.zero_()
    assert_close(ours.weight.detach(), theirs.weight.detach().double(), name="weight of zeros")


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_deterministic(backend, device, dtype, use_backend):
    weight = torch.randn(64, 300, device=device, dtype=dtype, requires_grad=True)
    u, v = F.normalize(torch.randn(64, device=device, dtype=dtype), dim=0), F.normalize(torch.randn(300, device=device, dtype=dtype), dim=0)
    grad = torch.randn_like(weight)
    runs = []
    with use_backend(backend, device):
        for _ in range(2):
            weight_sn, new_u, new_v = spectral_normalize(weight, u, v, 2)
            (grad_weight,) = torch.autograd.grad(weight_sn, weight, grad)
            runs.append((weight_sn, new_u, new_v, grad_weight))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("isa", cpu_isa_cases())
def test_native_gradcheck_fp64(isa, use_backend):
    weight = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    u = F.normalize(torch.randn(3, dtype=torch.float64), dim=0)
    v = F.normalize(torch.randn(10, dtype=torch.float64), dim=0)
    # Eval mode only: in training mode u and v depend on W through the power iteration, which the gradient
    # ignores by design (as torch's does), so finite differences would not match it.
    with use_backend("native", "cpu"):
        assert torch.autograd.gradcheck(lambda w: spectral_normalize(w, u, v, 1, 1e-12, False, dim=1)[0], (weight,))
        u0 = F.normalize(torch.randn(5, dtype=torch.float64), dim=0)
        v0 = F.normalize(torch.randn(6, dtype=torch.float64), dim=0)
        assert torch.autograd.gradcheck(lambda w: spectral_normalize(w, u0, v0, 1, 1e-12, False, dim=0)[0], (weight,))


def _power_iteration_oracle(weight, u, v, dim, training):
    """W / uᵀWv with u, v from one no-grad power iteration on W's matrix view (dim as rows)."""
    matrix = weight.movedim(dim, 0).flatten(1)
    if training:
        with torch.no_grad():
            u = F.normalize(torch.mv(matrix, v), dim=0, eps=1e-12)
            v = F.normalize(torch.mv(matrix.t(), u), dim=0, eps=1e-12)
        u, v = u.detach(), v.detach()
    return weight / torch.vdot(u, torch.mv(matrix, v))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("transform", AUTOGRAD_TRANSFORMS)
def test_autograd_transforms_of_the_functional(transform, dtype, training, backend, use_backend):
    """torch.func transforms, forward-mode AD and double backward of W / σ(W) (u, v constants of the
    gradient, as in torch), against the same formula in plain torch ops."""
    g = torch.Generator().manual_seed(16)
    weight = torch.randn(4, 3, 2, dtype=torch.float64, generator=g)
    u = F.normalize(torch.randn(3, dtype=torch.float64, generator=g), dim=0)
    v = F.normalize(torch.randn(8, dtype=torch.float64, generator=g), dim=0)

    def ours(w):
        return spectral_normalize(w, u.to(w.dtype), v.to(w.dtype), 1, 1e-12, training, dim=1)[0]

    with use_backend(backend, "cpu"):
        assert_transform_matches(transform, ours, lambda w: _power_iteration_oracle(w, u, v, 1, training), [weight],
                                 dtype=dtype)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("transform", AUTOGRAD_TRANSFORMS)
def test_autograd_transforms_of_the_module_match_torch(transform, backend, use_backend):
    """functional_call over the parametrized module in eval mode (where torch's parametrization supports
    every transform), side by side with torch's."""
    theirs, ours = _twins(lambda: nn.Linear(5, 4), torch.float64, "cpu")
    theirs.eval(), ours.eval()
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    names = ("parametrizations.weight.original", "bias")
    params = [dict(theirs.named_parameters())[name] for name in names]

    def call(module):
        return lambda x, w, b: functional_call(module, dict(zip(names, (w, b))), (x,))

    with use_backend(backend, "cpu"):
        assert_transform_matches(transform, call(ours), call(theirs), [x, *params])


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradgradcheck_fp64(backend, use_backend):
    weight = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    u = F.normalize(torch.randn(3, dtype=torch.float64), dim=0)
    v = F.normalize(torch.randn(10, dtype=torch.float64), dim=0)
    module = spectral_norm(nn.Linear(4, 3).double()).eval()  # the parametrization's eager step (C++ on native)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    original = module.parametrizations.weight.original
    with use_backend(backend, "cpu"):
        assert torch.autograd.gradgradcheck(lambda w: spectral_normalize(w, u, v, 1, 1e-12, False, dim=1)[0], (weight,))
        assert torch.autograd.gradgradcheck(
            lambda x, w: functional_call(module, {"parametrizations.weight.original": w}, (x,)), (x, original))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_wgan_gradient_penalty_matches_torch(backend, use_backend):
    """WGAN-GP through a spectrally normalized critic in training mode (the penalty's parameter gradient is
    a second derivative of the critic): every parameter gradient and the updated buffers match torch's."""
    torch.manual_seed(0)
    theirs = _spectral(_discriminator().double(), torch_spectral_norm)
    ours = _spectral(_discriminator().double(), spectral_norm)
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(18)
    real, fake = (torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=g) for _ in range(2))
    mix = torch.rand(3, 1, 1, 1, dtype=torch.float64, generator=g)
    results = []
    with use_backend(backend, "cpu"):
        for critic in (ours, theirs):
            between = (mix * real + (1 - mix) * fake).requires_grad_()
            (slope,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
            penalty = ((slope.flatten(1).norm(dim=1) - 1) ** 2).mean()
            loss = critic(fake).mean() - critic(real).mean() + 10 * penalty
            results.append((loss.detach(), torch.autograd.grad(loss, list(critic.parameters()))))
    (loss, grads), (expected_loss, expected_grads) = results
    assert_close(loss, expected_loss, name="loss")
    for (name, _), a, e in zip(theirs.named_parameters(), grads, expected_grads):
        assert_close(a, e, name=f"grad {name}")
    assert_close(ours.state_dict()["0.parametrizations.weight.0._u"], theirs.state_dict()["0.parametrizations.weight.0._u"])


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_opcheck(backend, use_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weight = torch.randn(6, 3, 2, 2, device=device, requires_grad=True)
    u = F.normalize(torch.randn(3, device=device), dim=0)
    v = F.normalize(torch.randn(24, device=device), dim=0)
    with use_backend(backend, device):
        for training in (True, False):
            torch.library.opcheck(torch.ops.fastdl.spectral_normalize.default, (weight, u, v, 1, 2, 1e-12, training))
        sigma = torch.tensor(1.7, device=device)
        grad = torch.randn(6, 3, 2, 2, device=device)
        torch.library.opcheck(torch.ops.fastdl.spectral_normalize_backward.default, (grad, weight.detach(), u, v, sigma, 1))


def _discriminator():
    return nn.Sequential(
        nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.1),
        nn.Conv2d(8, 16, 4, 2, 1), nn.LeakyReLU(0.1),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 1),
    )


def _spectral(model, apply):
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            apply(layer)
    return model


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(compiler):
    torch.manual_seed(0)
    theirs = _spectral(_discriminator(), torch_spectral_norm)
    ours = _spectral(_discriminator(), spectral_norm)
    ours.load_state_dict(theirs.state_dict())
    compiled = torch.compile(ours, fullgraph=True, backend=compiler)
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):
        actual, expected = compiled(x), theirs(x)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        actual_grads = torch.autograd.grad(actual.sum(), list(ours.parameters()))
        expected_grads = torch.autograd.grad(expected.sum(), list(theirs.parameters()))
        for a, e in zip(actual_grads, expected_grads):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
    # The buffers were updated in place under compilation too.
    torch.testing.assert_close(ours.state_dict()["0.parametrizations.weight.0._u"],
                               theirs.state_dict()["0.parametrizations.weight.0._u"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_sn_gan_discriminator_step_matches_torch(backend, device, dtype, use_backend):
    torch.manual_seed(0)
    theirs = _spectral(_discriminator().double(), torch_spectral_norm)
    ours = _spectral(_discriminator().double(), spectral_norm)
    ours.load_state_dict(theirs.state_dict())
    ours.to(device=device, dtype=dtype)
    real, fake = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with use_backend(backend, device):
        for step in range(2):
            # A hinge loss with two forward passes, so that backward sees both weight computations.
            expected = F.relu(1 - theirs(real)).mean() + F.relu(1 + theirs(fake)).mean()
            actual = F.relu(1 - ours(real.to(device, dtype))).mean() + F.relu(1 + ours(fake.to(device, dtype))).mean()
            expected_grads = torch.autograd.grad(expected, list(theirs.parameters()))
            actual_grads = torch.autograd.grad(actual, list(ours.parameters()))
            assert_close(actual.detach(), expected.detach(), name=f"loss, step {step}")
            for (name, _), a, e in zip(theirs.named_parameters(), actual_grads, expected_grads):
                assert_close(a, e, name=f"grad {name}, step {step}")


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: spectral_normalize(torch.randn(5), torch.randn(5), torch.randn(1)), ValueError),
        (lambda: spectral_normalize(torch.randn(4, 3), torch.randn(4), torch.randn(3), 0), ValueError),
        (lambda: spectral_normalize(torch.randn(4, 3), torch.randn(4), torch.randn(3), dim=2), IndexError),
        (lambda: spectral_normalize(torch.randn(4, 3), torch.randn(3), torch.randn(3)), RuntimeError),
        (lambda: spectral_normalize(torch.randn(4, 3), torch.randn(4), torch.randn(3).double()), RuntimeError),
        (lambda: spectral_normalize(torch.randn(4, 3), torch.randn(4), torch.randn(3), 1.5), TypeError),
        (lambda: spectral_normalize(torch.randint(3, (4, 3)), torch.randn(4), torch.randn(3)), TypeError),
        (lambda: spectral_norm(nn.Linear(3, 4), n_power_iterations=0), ValueError),
        (lambda: spectral_norm(nn.Linear(3, 4), dim=2), IndexError),
        (lambda: spectral_norm(nn.Linear(3, 4), name="kernel"), ValueError),
    ],
    ids=["1d-weight", "zero-iterations", "dim", "u-length", "v-dtype", "float-iterations", "int-weight",
         "module-iterations", "module-dim", "module-name"],
)
def test_bad_input_raises_like_torch(call, error):
    with pytest.raises(error):
        call()


def test_explicit_backend_that_cannot_run_says_why():
    weight = torch.randn(4, 3, dtype=torch.float16)
    with fastdl.backend("native"), pytest.raises(NotImplementedError) as info:
        spectral_normalize(weight, torch.randn(4, dtype=torch.float16), torch.randn(3, dtype=torch.float16))
    message = str(info.value)
    assert "dtype float16 is not supported on cpu" in message and "reference: can run it" in message


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_weight_under_no_grad_and_inference_mode(mode):
    torch.manual_seed(0)
    theirs = torch_spectral_norm(nn.Linear(20, 30))
    ours = spectral_norm(nn.Linear(20, 30))
    ours.load_state_dict(theirs.state_dict())
    with getattr(torch, mode)():
        for _ in range(3):
            expected, actual = theirs.weight, ours.weight
    assert not actual.requires_grad
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_sn_state(ours)[0]._u, _sn_state(theirs)[0]._u, rtol=1e-5, atol=1e-6)


def test_eager_shortcut_leaves_fake_tensors_and_dispatch_modes_to_the_custom_op():
    # The native eager step bypasses the dispatcher; what needs the dispatcher must reach the custom op.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    module = spectral_norm(nn.Linear(6, 5))
    with fastdl.backend("native"):
        with Recorder() as recorder:
            module.weight  # noqa: B018
        assert "fastdl.spectral_normalize.default" in recorder.ops
        with FakeTensorMode():
            weight, u, v = torch.randn(5, 6), torch.randn(5), torch.randn(6)
            weight_sn, new_u, new_v = spectral_normalize(weight, u, v)
        assert isinstance(weight_sn, FakeTensor) and weight_sn.shape == (5, 6) and new_v.shape == (6,)


# ----------------------------------------------------------------------------------------------------
# Differential fuzzing: random module types and sizes (1s and odd sizes), dims (out of range included),
# iteration counts (≤ 0 included), eps, NaN weights, on every backend against torch's parametrization:
# training steps (forward and backward, the power iteration updating u and v) then an eval step.

FUZZ_MODULES = {
    "linear": lambda a, b, k: nn.Linear(a, b),
    "conv1d": lambda a, b, k: nn.Conv1d(a, b, k),
    "conv2d": lambda a, b, k: nn.Conv2d(a, b, k),
    "conv_transpose2d": lambda a, b, k: nn.ConvTranspose2d(a, b, k),
    "embedding": lambda a, b, k: nn.Embedding(a, b),
}
FUZZ_CALLS = dict(
    kind=st.sampled_from(list(FUZZ_MODULES)), first=st.integers(1, 6), second=st.integers(1, 6),
    kernel=st.integers(1, 3), dim=st.one_of(st.none(), st.integers(-4, 4)), n_power_iterations=st.integers(-1, 3),
    eps=st.sampled_from([1e-12, 1e-3, 0.5]), steps=st.integers(1, 2), nan_weight=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


def _fuzz_spectral_norm(kind, first, second, kernel, dim, n_power_iterations, eps, steps, nan_weight, seed):
    def build(apply, dtype):
        torch.manual_seed(seed)  # the same weights and the same random start of u and v
        module = FUZZ_MODULES[kind](first, second, kernel).double()
        if nan_weight:
            with torch.no_grad():
                module.weight.view(-1)[seed % module.weight.numel()] = float("nan")
        return apply(module, n_power_iterations=n_power_iterations, eps=eps, dim=dim).to(dtype)

    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, first, (2, 3), generator=g) if kind == "embedding"
         else torch.randn(2, first, *(kernel + 2,) * (1 if kind == "conv1d" else 2 if "2d" in kind else 0),
                          dtype=torch.float64, generator=g))

    def trajectory(module):
        """Per step: the output, every parameter gradient and u, v; eval mode last."""
        results = []
        for step in range(steps + 1):
            module.train(step < steps)
            inputs = x if kind == "embedding" else x.to(module.weight.dtype)
            out = module(inputs)
            grads = torch.autograd.grad(out.sum(), list(module.parameters()))
            state = module.parametrizations.weight[0]
            results.append((out.detach(), *grads, state._u.clone(), state._v.clone()))
        return results

    def compare(actual, expected):
        for step, (a_step, e_step) in enumerate(zip(actual, expected)):
            # fp32: a gradient that cancels to 0 (a 1×1 weight's) keeps the rounding of its terms, so the
            # tolerance follows the step's largest result rather than each tensor's.
            scale = max([1.0] + [e.abs().max().item() for e in e_step if e.numel() and e.isfinite().all()])
            for index, (a, e) in enumerate(zip(a_step, e_step)):
                if a.dtype == torch.float64:
                    assert_close(a, e, name=f"step {step}, result {index}")
                else:
                    torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5 * scale, equal_nan=True,
                                               msg=lambda m: f"step {step}, result {index}: {m}")

    for backend, dtype in fuzz_backends():
        def ours():
            module = build(spectral_norm, dtype)  # built in fp64, then cast: outside the backend's scope
            with fastdl.backend(backend):
                return trajectory(module)
        assert_like_torch(lambda: trajectory(build(torch_spectral_norm, torch.float64)), ours, compare)


test_fuzz_matches_torch = fuzz_test(_fuzz_spectral_norm, FUZZ_CALLS, examples=10)
test_fuzz_matches_torch_long = fuzz_test(_fuzz_spectral_norm, FUZZ_CALLS, examples=10, long=True)
