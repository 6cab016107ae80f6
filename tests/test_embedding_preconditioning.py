"""The optimizers precondition ``nn.Embedding`` layers (``Wᵀ`` as the block's matrix, the token
frequencies as its input factor) up to ``truncate_above`` embeddings: exact steps against dense
references, factors by definition, and the first-order update named above that width."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian, jacrev

from curvlab.optim import EKFAC, KFAC, TEKFAC, TKFAC
from helpers import dense_ggn, dense_grad

DT = torch.float64
ALL = [KFAC, EKFAC, TKFAC, TEKFAC]
IDS = [c.__name__ for c in ALL]
VOCAB, DIM, CLASSES = 7, 3, 4

#: One step is the damped natural-gradient step of the batch's block (as tests/test_optim.py).
EXACT = dict(
    fisher="exact", stat_decay=0.0, stats_interval=1, eigen_interval=1, scale_interval=1,
    momentum=0.0, weight_decay=0.0, kl_clip=None, damping_strategy="exact", factor_dtype="float64",
)
pytestmark = pytest.mark.filterwarnings("ignore:.*is a multiple of eigen_interval:UserWarning")


class Tagger(nn.Module):
    """Token ids ``[N, T]`` → Embedding (``padding_idx``) → tanh → Linear → logits ``[N, C, T]``."""

    def __init__(self, vocab: int = VOCAB, padding_idx: int | None = 0) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, DIM, padding_idx=padding_idx), nn.Linear(DIM, CLASSES)

    def rest(self, z: Tensor) -> Tensor:
        return self.head(torch.tanh(z)).transpose(1, 2)

    def forward(self, ids: Tensor) -> Tensor:
        return self.rest(self.embed(ids))


def tagger(seed: int = 0, **kwargs) -> Tagger:
    torch.manual_seed(seed)
    return Tagger(**kwargs).to(DT)


def step(opt, model: nn.Module, loss_fn: nn.Module, ids: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    with opt.track(loss_fn):
        loss_fn(model(ids), y).backward()
    opt.step()


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_one_step_is_the_damped_natural_gradient(cls) -> None:
    """One example, one token: every method's embedding block is the exact Fisher block, so the
    embedding moves by −lr (F + λI)⁻¹ ∇ with F and ∇ of its weight from torch.func."""
    model = tagger()
    ids, y = torch.tensor([[3]]), torch.tensor([[2]])
    loss_fn = nn.CrossEntropyLoss()
    lr, lam = 0.3, 1e-2
    fisher, grad = dense_ggn(model, loss_fn, ids, y, "embed"), dense_grad(model, loss_fn, ids, y, "embed")
    expected = model.embed.weight.detach().flatten() - lr * torch.linalg.solve(
        fisher + lam * torch.eye(len(grad), dtype=DT), grad)
    opt = cls(model, lr=lr, damping=lam, **EXACT)
    assert [b.name for b in opt.blocks()] == ["embed", "head"]
    step(opt, model, loss_fn, ids, y)
    torch.testing.assert_close(model.embed.weight.detach().flatten(), expected, rtol=1e-10, atol=1e-12)


def kfac_by_definition(model: Tagger, loss_fn: nn.Module, ids: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``A = 1/(N·T) Σ_{n,t} e_{id} e_{id}ᵀ`` (padding tokens zero) and ``G = Σ_{n,t} J_{nt}ᵀ H_n
    J_{nt}``, ``J_{nt}`` the Jacobian of example ``n``'s logits at its embedded token ``t``."""
    n, t = ids.shape
    onehot = F.one_hot(ids, VOCAB).to(DT) * (ids != model.embed.padding_idx).unsqueeze(-1)
    a = torch.einsum("ntv,ntw->vw", onehot, onehot) / (n * t)
    z = model.embed(ids).detach()
    out = model.rest(z).detach()
    jac = jacrev(model.rest)(z)  # [N, C, T, N, T, E]
    hess = hessian(lambda o: loss_fn(o, y))(out)  # [N, C, T, N, C, T]
    g = z.new_zeros(DIM, DIM)
    for i in range(n):
        h = hess[i, :, :, i].reshape(CLASSES * t, CLASSES * t)
        for s in range(t):
            j = jac[i, :, :, i, s].reshape(CLASSES * t, DIM)
            g += j.T @ h @ j
    return a, g


def test_kfac_factors_are_the_token_frequencies_and_the_output_gram() -> None:
    """Three sequences of five tokens, a padding token among them: the embedding's KFAC factors
    are A and G by definition (A diagonal: no one-hot rows are multiplied out)."""
    model, loss_fn = tagger(), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, VOCAB, (3, 5), generator=gen), torch.randint(0, CLASSES, (3, 5), generator=gen)
    ids[0, 0] = ids[2, 3] = 0
    opt = KFAC(model, lr=0.1, **EXACT)
    a, g = kfac_by_definition(model, loss_fn, ids, y)
    step(opt, model, loss_fn, ids, y)
    approx = opt.approximations()["embed"]
    torch.testing.assert_close(approx.A, a, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(approx.G, g, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_a_step_inverts_the_approximation_the_optimizer_reports(cls) -> None:
    """Sequences, padding, statistics every other step: the embedding's weight moves by
    −lr·(K̂ + λ)⁻¹∇ of its block (the matrix ∇Wᵀ), K̂ the object ``approximations()`` returns."""
    model, loss_fn = tagger(), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(2)
    ids, y = torch.randint(0, VOCAB, (4, 6), generator=gen), torch.randint(0, CLASSES, (4, 6), generator=gen)
    opt = cls(model, lr=0.1, stats_interval=2, eigen_interval=2, momentum=0.0, kl_clip=None, factor_dtype="float64")
    for _ in range(3):
        step(opt, model, loss_fn, ids, y)
    approx = opt.approximations()["embed"]
    opt.zero_grad()
    loss_fn(model(ids), y).backward()  # step 3: no statistics
    before, grad = model.embed.weight.detach().clone(), model.embed.weight.grad.clone()
    opt.step()
    direction = approx.inv_mat_mul(grad.T, opt.damping, opt.damping_strategy).T
    torch.testing.assert_close(model.embed.weight.detach(), before - 0.1 * direction, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(direction, grad)


def test_an_embedding_above_truncate_above_takes_the_first_order_step_and_is_named() -> None:
    """Above ``truncate_above`` embeddings the input factor would be a truncated dense V × V
    matrix: SGD's update, named in the warning; ``truncate_above=0`` preconditions it."""
    model, loss_fn = tagger(vocab=40), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(3)
    ids, y = torch.randint(0, 40, (2, 4), generator=gen), torch.randint(0, CLASSES, (2, 4), generator=gen)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        opt = KFAC(model, lr=0.1, momentum=0.0, kl_clip=None, truncate_above=32)
        assert [b.name for b in opt.blocks()] == ["head"]
    assert [str(w.message) for w in said] == [
        "KFAC: 1 parameter(s) have no Kronecker block and get the first-order (SGD) update, as norm layers' affine "
        "parameters do — of nn.Embedding "
        "layers with more than truncate_above=32 embeddings (their input factor would be a dense V × V matrix, "
        "truncated; truncate_above=0 preconditions them whole): ['embed.weight'] (see curvlab.model_blocks)"]
    step(opt, model, loss_fn, ids, y)
    before = model.embed.weight.detach().clone()
    opt.zero_grad()
    loss_fn(model(ids), y).backward()
    grad = model.embed.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.embed.weight.detach(), before - 0.1 * grad, rtol=1e-12, atol=1e-15)
    assert [b.name for b in KFAC(model, truncate_above=0).blocks()] == ["embed", "head"]
