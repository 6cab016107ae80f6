"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from curvlab import gram, mkl


@pytest.fixture(params=["MKL", "without MKL"])
def blas(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A test run twice: with the MKL routines that torch's x86 CPU build links
    (:mod:`curvlab.mkl`: ``syrk``, the in-place Cholesky inverse), and as on a torch without MKL
    — macOS on Apple silicon, aarch64 Linux, and every GPU — where curvlab takes its torch
    routes instead (a Gram by GEMMs, a damped inverse by ``cholesky_ex``).  Those runs no CPU test
    reached otherwise; without MKL, calling an MKL routine fails the test."""
    if request.param == "without MKL":
        def absent(*args: object, **kwargs: object) -> None:
            raise AssertionError("an MKL routine was called on a torch without MKL")

        monkeypatch.setattr(mkl, "available", lambda routine, dtype: False)
        for module, names in ((mkl, ("syrk", "syrk_", "spd_inverse_")), (gram, ("syrk", "syrk_"))):
            for name in names:
                monkeypatch.setattr(module, name, absent)
    return request.param
