"""K-FAC against the brute-force Gauss–Newton matrix, in float64."""

import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call, jacrev

from lqf_hub.errors import CurvatureError
from lqf_hub.solver.kfac import KFAC, symmetric_eigh

pytestmark = pytest.mark.usefixtures("float64")  # every tensor of these tests is float64


def _deltas(net: nn.Module) -> dict[str, nn.Parameter]:
    return {n: nn.Parameter(torch.zeros_like(p)) for n, p in net.named_parameters()}


def _kfac(net, x, *, ridge=0.0, damping=0.0, outputs="exact", batches=1) -> tuple[KFAC, dict]:
    w0, deltas = dict(net.named_parameters()), _deltas(net)
    kfac = KFAC(w0, deltas, ridge=ridge, damping=damping, outputs=outputs)
    for chunk in x.chunk(batches):
        kfac.accumulate(lambda p, chunk=chunk: functional_call(net, p, (chunk,)), chunk.shape[0])
    kfac.finalize()
    return kfac, deltas


def _jacobian(net, x) -> torch.Tensor:
    """Brute-force Jacobian of all outputs w.r.t. all parameters (registration order): [N·C, P]."""
    params = dict(net.named_parameters())
    jac = jacrev(lambda p: functional_call(net, p, (x,)))(params)  # name -> [N, C, *shape]
    n, c = x.shape[0], next(iter(jac.values())).shape[1]
    return torch.cat([jac[name].reshape(n * c, -1) for name in params], dim=1).detach()


def _ggn(net, x) -> torch.Tensor:
    """E_i[J_iᵀJ_i]: [P, P]."""
    j = _jacobian(net, x)
    return j.T @ j / x.shape[0]


def _preconditioned(kfac: KFAC, deltas: dict, grads: torch.Tensor) -> torch.Tensor:
    split = dict(zip(deltas, grads.clone().split([d.numel() for d in deltas.values()])))
    shaped = {n: g.reshape(deltas[n].shape) for n, g in split.items()}
    kfac.precondition(shaped)
    return torch.cat([g.flatten() for g in shaped.values()])


def _interleave_bias(net: nn.Module) -> torch.Tensor:
    """Permutation from [W (row-major), b] to K-FAC's per-output-row [W_o, b_o] ordering."""
    out, inp = net.weight.shape[0], net.weight[0].numel()
    order = []
    for o in range(out):
        order += list(range(o * inp, (o + 1) * inp)) + [out * inp + o]
    return torch.tensor(order)


def test_single_linear_layer_is_exact():
    torch.manual_seed(0)
    net = nn.Linear(6, 4)
    x = torch.randn(32, 6) * torch.tensor([1.0, 3.0, 0.1, 2.0, 1.0, 0.5])
    ridge = 1e-2
    kfac, deltas = _kfac(net, x, ridge=ridge, batches=4)
    ggn = _ggn(net, x)
    v = torch.randn(ggn.shape[0])
    expected = torch.linalg.solve(ggn + ridge * torch.eye(len(v)), v)
    perm = _interleave_bias(net)  # K-FAC's natural ordering, only to build the explicit Kronecker matrix
    block = kfac.blocks["weight"].eig
    a = block["basis_a"][0] @ torch.diag(block["eig_a"][0]) @ block["basis_a"][0].T
    b = block["basis_b"][0] @ torch.diag(block["eig_b"][0]) @ block["basis_b"][0].T
    torch.testing.assert_close(torch.kron(b, a), ggn[perm][:, perm], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_preconditioned(kfac, deltas, v), expected, rtol=1e-9, atol=1e-12)


def test_eigendecomposition_falls_back_when_lapack_does_not_converge(monkeypatch):
    """torch's eigh fails on some rank-deficient factors (seen with one thread): the fallback decomposes them."""
    torch.manual_seed(2)
    rows = torch.randn(5, 40)
    matrix = (rows.T @ rows).unsqueeze(0).float()  # rank 5 of 40: 35 repeated zero eigenvalues

    def fails(_):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    eigenvalues, vectors = symmetric_eigh(matrix, "test factor")
    assert eigenvalues.dtype == vectors.dtype == torch.float32
    reconstructed = vectors[0] @ torch.diag(eigenvalues[0]) @ vectors[0].T
    torch.testing.assert_close(reconstructed, matrix[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(vectors[0].T @ vectors[0], torch.eye(40, dtype=torch.float32), rtol=0, atol=1e-5)


def test_nan_eigenvalues_returned_without_an_error_fall_back_to_the_qr_algorithm(monkeypatch):
    """torch's eigh returned NaN without raising on a real rank-deficient factor: the fallback must still run."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.1), nn.Linear(8, 3))
    x = torch.randn(4, 6)  # fewer samples than inputs: rank-deficient factors
    v = torch.randn(sum(p.numel() for p in net.parameters()))
    expected = _preconditioned(*_kfac(net, x, ridge=1e-2, damping=1e-3), v)
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: (torch.full_like(eigh(m)[0], math.nan), eigh(m)[1]))
    kfac, deltas = _kfac(net, x, ridge=1e-2, damping=1e-3)
    torch.testing.assert_close(_preconditioned(kfac, deltas, v), expected, rtol=1e-10, atol=0)


def test_zero_factor_gives_zero_eigenvalues_and_an_orthonormal_basis():
    eigenvalues, vectors = symmetric_eigh(torch.zeros(2, 5, 5), "test factor")
    assert torch.equal(eigenvalues, torch.zeros(2, 5))
    torch.testing.assert_close(vectors.mT @ vectors, torch.eye(5).expand(2, 5, 5), rtol=0, atol=1e-15)


def test_layer_with_zero_inputs_is_preconditioned_by_the_ridge_alone():
    """A = 0: the block's curvature is zero, so only the ridge acts; without one the result is refused."""
    net = nn.Linear(4, 3, bias=False)
    x = torch.zeros(5, 4)
    v = torch.randn(12)
    kfac, deltas = _kfac(net, x, ridge=1e-2, damping=1e-3)
    torch.testing.assert_close(_preconditioned(kfac, deltas, v), v / 1e-2, rtol=1e-14, atol=0)
    kfac, deltas = _kfac(net, x, ridge=0.0, damping=1e-3)
    with pytest.raises(CurvatureError, match="preconditioned gradient of weight is not finite.*Raise the ridge"):
        _preconditioned(kfac, deltas, v)


def test_non_finite_gradient_passes_through_for_the_trainer_to_report():
    kfac, deltas = _kfac(nn.Linear(4, 3), torch.randn(8, 4), ridge=1e-2)
    v = torch.randn(15)
    v[3] = math.inf
    assert not torch.isfinite(_preconditioned(kfac, deltas, v)).all()


def test_near_singular_float32_factor_of_tiny_gradients():
    """Like the output-gradient factor that broke eigh on real data: float32, rank 20 of 300, tiny entries."""
    rows = torch.randn(300, 20, generator=torch.Generator().manual_seed(7))
    matrix = (rows @ rows.T * 1e-10).float().unsqueeze(0)
    eigenvalues, vectors = symmetric_eigh(matrix, "test factor")
    assert eigenvalues.dtype == vectors.dtype == torch.float32
    assert torch.isfinite(eigenvalues).all() and torch.isfinite(vectors).all()
    assert (eigenvalues >= 0).all()
    reconstructed = vectors[0] @ torch.diag(eigenvalues[0]) @ vectors[0].T
    assert float((reconstructed - matrix[0]).norm() / matrix[0].norm()) < 1e-5
    torch.testing.assert_close(vectors[0].T @ vectors[0], torch.eye(300, dtype=torch.float32), rtol=0, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_grouped_conv_with_one_output_location_is_exact(groups):
    """A conv whose kernel covers the input is a linear layer per group: K-FAC must be exact."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(4, 4, kernel_size=3, groups=groups), nn.Flatten())
    x = torch.randn(20, 4, 3, 3)
    kfac, deltas = _kfac(net, x, ridge=1e-3)
    ggn = _ggn(net, x)
    v = torch.randn(ggn.shape[0])
    expected = torch.linalg.solve(ggn + 1e-3 * torch.eye(len(v)), v)
    torch.testing.assert_close(_preconditioned(kfac, deltas, v), expected, rtol=1e-8, atol=1e-10)


def _cosine(a, b):
    return float((a @ b / (a.norm() * b.norm())).detach())


@pytest.mark.parametrize("outputs", ["exact", "sampled"])
def test_conv_net_direction_is_closer_to_newton(outputs):
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8).eval(), nn.LeakyReLU(0.1),
        nn.Conv2d(8, 8, 3, padding="same", groups=8), nn.LeakyReLU(0.1),  # depthwise
        nn.Conv2d(8, 6, 1, groups=2), nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(64, 3, 6, 6)
    ridge = 1e-4
    kfac, deltas = _kfac(net, x, ridge=ridge, damping=1e-3, outputs=outputs, batches=4)
    jacobian = _jacobian(net, x)
    hessian = jacobian.T @ jacobian / len(x) + ridge * torch.eye(jacobian.shape[1])
    grad = jacobian.T @ torch.randn(jacobian.shape[0]) / len(x)  # a gradient of the squared loss: Jᵀr
    newton = torch.linalg.solve(hessian, grad)
    kfac_direction = _preconditioned(kfac, deltas, grad)
    raw, ours = _cosine(grad, newton), _cosine(kfac_direction, newton)
    assert ours > raw + 0.2, (raw, ours)
    assert set(kfac.blocks) == {"0.weight", "3.weight", "5.weight", "9.weight"}
    assert set(kfac.diag_eig) == {"1.weight", "1.bias"}  # BatchNorm affine: diagonal


class _LayerScale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, channels).reshape(channels, 1, 1))

    def forward(self, x):
        return x * self.gamma


def test_diagonal_is_exact_and_independent_of_batching():
    """Norm scales and shifts (from the norm calls) and other tensors (from per-sample passes) get
    diag(E[JᵀJ]) exactly, however the samples are split into batches (processes see slices of a batch)."""
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.LeakyReLU(0.1), nn.GroupNorm(2, 4), _LayerScale(4),
        nn.Flatten(), nn.LayerNorm(64), nn.Linear(64, 3),
    )
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
        for norm in (net[1], net[3], net[6]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(12, 3, 6, 6)
    diagonal = torch.diagonal(_ggn(net, x))
    expected = dict(zip(dict(net.named_parameters()), diagonal.split([p.numel() for p in net.parameters()])))
    for batches in (1, 3):
        kfac, _ = _kfac(net, x, batches=batches)
        assert kfac.norm_names == {"1.weight", "1.bias", "3.weight", "3.bias", "6.weight", "6.bias"}
        assert set(kfac.diag_eig) == kfac.norm_names | {"4.gamma"}
        for name, diag in kfac.diag_eig.items():
            torch.testing.assert_close(diag.flatten(), expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer", ["block", "diagonal"])
def test_non_finite_statistics_are_refused_naming_the_layer(layer):
    if layer == "block":
        net, x = nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(0.1), nn.Linear(5, 3)), torch.ones(6, 4)
        factor = "input factor A of 0.weight"
    else:  # a layer scale: its curvature is a diagonal from per-sample gradients
        net, x = nn.Sequential(_LayerScale(4), nn.Flatten()), torch.ones(6, 4, 1, 1)
        factor = "diagonal curvature of 0.gamma"
    x[2, 1] = math.nan  # one bad pixel
    with pytest.raises(CurvatureError, match=f"{re.escape(factor)} is not finite.*Check the inputs for NaN"):
        _kfac(net, x)


def test_preconditioned_sgd_beats_plain_sgd_on_ill_conditioned_least_squares():
    torch.manual_seed(3)
    scales = torch.logspace(0, 2, 10)  # feature scales 1..100: condition number 1e4 of E[xxᵀ]
    x = torch.randn(256, 10) * scales
    w_true = torch.randn(3, 10)
    y = x @ w_true.T
    net = nn.Linear(10, 3)

    def steps_to_converge(precondition: bool) -> int:
        kfac, deltas = _kfac(net, x, ridge=0.0, damping=1e-6)
        w0 = dict(net.named_parameters())
        curvature = float(torch.linalg.eigvalsh(x.T @ x / len(x)).max()) + 1
        optimizer = torch.optim.SGD(deltas.values(), lr=0.5 if precondition else 1.0 / curvature, momentum=0.9)
        best = None
        for step in range(1, 3001):
            optimizer.zero_grad()
            out = functional_call(net, {n: w0[n] + d for n, d in deltas.items()}, (x,))
            loss = 0.5 * (out - y).square().sum(-1).mean()
            loss.backward()
            if precondition:
                kfac.precondition({n: d.grad for n, d in deltas.items()})
            optimizer.step()
            best = loss.item()
            if best < 1e-6:
                return step
        return step

    fast, slow = steps_to_converge(True), steps_to_converge(False)
    assert fast * 5 <= slow, (fast, slow)


def test_state_dict_round_trip_preconditions_identically():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(8, 3, 4, 4)
    kfac, deltas = _kfac(net, x, ridge=1e-2, damping=1e-2)
    restored = KFAC(dict(net.named_parameters()), deltas, ridge=1e-2, damping=1e-2)
    restored.load_state_dict(kfac.state_dict())
    v = torch.randn(sum(d.numel() for d in deltas.values()))
    assert torch.equal(_preconditioned(kfac, deltas, v), _preconditioned(restored, deltas, v))
    assert not math.isnan(float(v.sum()))


def test_state_dict_saved_with_safetensors_preconditions_bit_identically(tmp_path):
    """Checkpoints persist K-FAC with safetensors, which takes only contiguous tensors."""
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.Flatten(), nn.Linear(16, 3))
    x = torch.randn(8, 3, 4, 4)
    kfac, deltas = _kfac(net, x, ridge=1e-2, damping=1e-2)
    save_file(kfac.state_dict(), tmp_path / "kfac.safetensors")
    restored = KFAC(dict(net.named_parameters()), deltas, ridge=1e-2, damping=1e-2)
    restored.load_state_dict(load_file(tmp_path / "kfac.safetensors"))
    v = torch.randn(sum(d.numel() for d in deltas.values()))
    assert torch.equal(_preconditioned(kfac, deltas, v), _preconditioned(restored, deltas, v))


@pytest.mark.parametrize("outputs", ["exact", "sampled"])
def test_removing_images_equals_computing_over_the_others(outputs):
    """A K-FAC less some images' share is the K-FAC of the other images (what ``forget`` needs), however the
    images were batched: sampled output vectors follow each image's key, not its position."""
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
    x, keys = torch.randn(12, 3, 4, 4), torch.randint(0, 256, (12, 8), dtype=torch.uint8)
    gone = torch.tensor([1, 6, 7])
    kept = torch.tensor([i for i in range(12) if i not in gone])
    w0, deltas = dict(net.named_parameters()), _deltas(net)

    def statistics(rows, batches):
        kfac = KFAC(w0, deltas, ridge=0.0, damping=1e-2, outputs=outputs)
        for part in rows.chunk(batches):
            kfac.accumulate(lambda p, part=part: functional_call(net, p, (x[part],)), len(part), keys[part])
        return kfac

    full = statistics(torch.arange(12), 2)
    full.finalize()
    full.remove(statistics(gone, 2), count=12)
    rest = statistics(kept, 1)
    rest.finalize()
    assert set(full.blocks) == {"0.weight", "4.weight"} and set(full.diag_eig) == {"1.weight", "1.bias"}
    for name, block in rest.blocks.items():
        for factor in "ab":
            e, f = block.eig, full.blocks[name].eig
            expected = (e[f"basis_{factor}"] * e[f"eig_{factor}"].unsqueeze(-2)) @ e[f"basis_{factor}"].mT
            got = (f[f"basis_{factor}"] * f[f"eig_{factor}"].unsqueeze(-2)) @ f[f"basis_{factor}"].mT
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for name, diag in rest.diag_eig.items():
        torch.testing.assert_close(full.diag_eig[name], diag, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="keep at least one"):
        full.remove(statistics(torch.arange(12), 1), count=12)
    with pytest.raises(ValueError, match="other outputs"):
        other = KFAC(w0, deltas, ridge=0.0, damping=1e-2, outputs="exact" if outputs == "sampled" else "sampled")
        other.accumulate(lambda p: functional_call(net, p, (x[:2],)), 2, keys[:2])
        full.remove(other, count=12)


def test_a_damaged_state_is_refused_saying_what_is_wrong():
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.Flatten(), nn.Linear(16, 3))
    kfac, deltas = _kfac(net, torch.randn(8, 3, 4, 4), ridge=1e-2, damping=1e-2)
    state = kfac.state_dict()
    restored = KFAC(dict(net.named_parameters()), deltas, ridge=1e-2, damping=1e-2)
    weight = next(k.split("/")[1] for k in state if k.startswith("block/"))
    for damage, message in [
        (lambda s: s.pop(f"block/{weight}/basis_b"), rf"block {weight} lacks \['basis_b'\]"),
        (lambda s: s.update({f"block/{weight}/bias_index": torch.tensor(99)}), "bias index 99"),
        (lambda s: s.update({"diag/elsewhere.weight": torch.ones(2)}), "does not linearize: \\['elsewhere.weight'\\]"),
        (lambda s: s.update({"eigen": torch.ones(2)}), "neither block/<name>/<part> nor diag/<name>"),
    ]:
        damaged = dict(state)
        damage(damaged)
        with pytest.raises(ValueError, match=message):
            restored.load_state_dict(damaged)


def test_errors():
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="`outputs` must be 'exact' or 'sampled'"):
        KFAC(dict(net.named_parameters()), _deltas(net), ridge=0.0, damping=1.0, outputs="all")
    kfac = KFAC(dict(net.named_parameters()), _deltas(net), ridge=0.0, damping=1.0)
    with pytest.raises(RuntimeError, match="finalize"):
        kfac.precondition({})
    with pytest.raises(RuntimeError, match="saw no samples"):
        kfac.finalize()
