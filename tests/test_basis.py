"""Rotations by one side's eigenbasis (:mod:`curvlab.basis`): a permutation of the unit vectors
rotates by gathering columns; every other basis by its product — the same results."""

from __future__ import annotations

import torch

from curvlab.basis import PERMUTATION_MIN_WIDTH, in_basis, out_of_basis, permutation_order

DT = torch.float64
WIDTH = PERMUTATION_MIN_WIDTH + 3


def test_a_permutation_gathers_and_every_other_basis_multiplies_with_the_same_result() -> None:
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(WIDTH, generator=gen)
    permutation = torch.eye(WIDTH, dtype=DT)[:, order]
    signed = permutation.clone()
    signed[:, 0] *= -1  # orthonormal, not a permutation
    rotation = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=gen, dtype=DT))[0]
    z = torch.randn(2, 5, WIDTH, generator=gen, dtype=DT)
    assert torch.equal(permutation_order(permutation), order)
    assert permutation_order(signed) is None and permutation_order(rotation) is None
    for u in (permutation, signed, rotation):
        torch.testing.assert_close(in_basis(z, u), z @ u, rtol=0, atol=1e-15)
        torch.testing.assert_close(out_of_basis(z, u), z @ u.mT, rtol=0, atol=1e-15)


def test_a_basis_changed_in_place_is_checked_again() -> None:
    u = torch.eye(WIDTH, dtype=DT)
    assert permutation_order(u) is not None
    u[0, 1] = 0.5
    assert permutation_order(u) is None
    z = torch.randn(4, WIDTH, dtype=DT)
    torch.testing.assert_close(in_basis(z, u), z @ u, rtol=0, atol=1e-15)
