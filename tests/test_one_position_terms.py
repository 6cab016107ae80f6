"""A per-position loss has a root column per term.  At a layer that nothing after it mixes across
positions (the output head), every term reaches one position, and the statistics of the
per-sample ``M_k`` take a one-position route (:func:`curvlab.extract.maths.one_position_samples`);
where positions are mixed, the general route.  Both against torch.func's dense GGN in float64,
with a vocabulary wide enough that the embedding's eigenbasis, a permutation, rotates by
gathering (:mod:`curvlab.basis`)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.basis import PERMUTATION_MIN_WIDTH
from curvlab.optim import EKFAC, TEKFAC
from helpers import dense_ggn

DT = torch.float64
VOCAB, CLASSES, DIM, N, T = PERMUTATION_MIN_WIDTH + 44, 5, 3, 3, 4


class Tagger(nn.Module):
    """Token ids ``[N, T]`` → Embedding → Linear → tanh (→ a running sum over positions when
    ``causal``) → Linear, the logits as ``[N·T, C]`` rows."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.embed, self.mix, self.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, CLASSES)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.embed(ids)))
        if self.causal:  # each position sees those before it: a term reaches every earlier position
            h = h.cumsum(1)
        return self.head(h).reshape(-1, CLASSES)


def tagger_and_batch(causal: bool, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = Tagger(causal).to(DT)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (N, T), generator=gen)
    ids[1, 2] = ids[0, 1]  # a token twice
    return model, ids, torch.randint(0, CLASSES, (N * T,), generator=gen)


def orthogonal(n: int, gen: torch.Generator) -> Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))[0]


def dense_per_term_empirical(model: nn.Module, ids: Tensor, y: Tensor, layer: str) -> Tensor:
    """``1/(N·T) Σ_{n,t} ∇ℓ_{nt} ∇ℓ_{ntᵀ}``: one gradient per loss term, by torch.func."""
    params = dict(model.named_parameters())
    names = [k for k in params if k.rsplit(".", 1)[0] == layer]

    def losses(*tensors: Tensor) -> Tensor:
        out = torch.func.functional_call(model, {**params, **dict(zip(names, tensors))}, (ids,))
        return nn.functional.cross_entropy(out, y, reduction="none")

    jac = torch.func.jacrev(losses, argnums=tuple(range(len(names))))(*(params[k].detach() for k in names))
    rows = torch.cat([j.reshape(len(y), -1) for j in jac], 1)
    return rows.T @ rows / len(y)


@pytest.mark.parametrize("causal, fisher", [(False, "exact"), (False, "empirical"), (True, "exact")],
                         ids=["positionwise", "positionwise-empirical", "causal"])
def test_the_statistics_of_the_terms_are_those_of_the_dense_ggn(causal: bool, fisher: str) -> None:
    """TKFAC's exact partial traces, EKFAC's rescaling ``diag(Qᵀ F Q)`` (the embedding in the
    permutation basis of its input factor) and the square root, of every layer: those of F (the
    GGN; the empirical Fisher's column per term takes the embedding's one-position route too)."""
    model, ids, y = tagger_and_batch(causal)
    loss_fn, gen = nn.CrossEntropyLoss(), torch.Generator().manual_seed(5)
    blocks = {"embed": (DIM, VOCAB), "mix": (DIM, DIM + 1), "head": (CLASSES, DIM + 1)}
    bases = {name: (orthogonal(d_out, gen), orthogonal(d_in, gen)) for name, (d_out, d_in) in blocks.items()}
    bases["embed"] = (bases["embed"][0], torch.eye(VOCAB, dtype=DT)[:, torch.randperm(VOCAB, generator=gen)])
    stats = curvlab.extract(model, loss_fn, ids, y, fisher=fisher, stats=("sqrt", "tkfac", "kfe"),
                            eigenbases=bases, engine="autograd")
    dense = dense_ggn if fisher == "exact" else lambda model, loss_fn, ids, y, name: dense_per_term_empirical(
        model, ids, y, name)
    for name, (d_out, d_in) in blocks.items():
        block, fisher = stats[name], dense(model, loss_fn, ids, y, name)
        inverse = torch.argsort(block.layout.permutation())
        in_matrix_order = fisher[inverse][:, inverse].reshape(d_out, d_in, d_out, d_in)
        torch.testing.assert_close(block.tkfac.delta_phi, torch.einsum("odoe->de", in_matrix_order), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(block.tkfac.delta_psi, torch.einsum("odpd->op", in_matrix_order), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(block.tkfac.delta, fisher.trace(), rtol=1e-10, atol=1e-13)
        q = torch.kron(*(u.contiguous() for u in bases[name]))  # (kron needs contiguous inputs)
        rotated = q.T @ in_matrix_order.reshape(d_out * d_in, -1) @ q
        torch.testing.assert_close(block.kfe_scaling, rotated.diagonal().reshape(d_out, d_in), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(block.dense_fisher(), fisher, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("cls, causal", [(EKFAC, True), (TEKFAC, False)], ids=["EKFAC", "TEKFAC"])
def test_a_step_in_the_permutation_basis_is_the_dense_damped_inverse(cls, causal: bool) -> None:
    """The embedding's eigenbasis is a permutation — its input factor diagonal: EKFAC's token
    counts; TEKFAC's δΦ = Σ M_kᵀM_k where each term reaches one position —: the step moves its
    weight by −lr·(K̂ + λI)⁻¹∇, K̂ the dense matrix of the approximation the optimizer reports."""
    model, ids, y = tagger_and_batch(causal)
    loss_fn, lr, lam = nn.CrossEntropyLoss(), 0.2, 1e-2
    opt = cls(model, lr=lr, damping=lam, damping_strategy="exact", fisher="exact", stats_interval=2,
              eigen_interval=4, scale_interval=2, momentum=0.0, kl_clip=None, factor_dtype="float64")
    for _ in range(3):
        opt.zero_grad()
        with opt.track(loss_fn):
            loss_fn(model(ids), y).backward()
        opt.step()
    approx = opt.approximations()["embed"]
    basis = approx.eigenbasis()[1]
    assert bool(((basis == 0) | (basis == 1)).all())  # the unit vectors, permuted
    opt.zero_grad()
    loss_fn(model(ids), y).backward()  # step 3: no statistics
    before, grad = model.embed.weight.detach().clone().flatten(), model.embed.weight.grad.flatten()
    opt.step()
    dense = approx.to_dense()
    expected = before - lr * torch.linalg.solve(dense + lam * torch.eye(len(grad), dtype=DT), grad)
    torch.testing.assert_close(model.embed.weight.detach().flatten(), expected, rtol=1e-10, atol=1e-13)
