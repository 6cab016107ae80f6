"""Fixtures shared by the test modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from curvlab import device_routes, gram, mkl

ROUTES = ("MKL", "without MKL", "as on a GPU")


@pytest.fixture(params=ROUTES)
def routes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A test run on the CPU three times, once per set of routes curvlab takes by platform:

    * ``"MKL"``: where torch's CPU build links MKL (x86), its ``syrk`` and in-place Cholesky
      inverse (:mod:`curvlab.mkl`) with the other CPU routes;
    * ``"without MKL"``: a torch without MKL (macOS on Apple silicon, aarch64 Linux): the Gram by
      GEMMs, the damped inverse by ``cholesky_ex``, the other CPU routes;
    * ``"as on a GPU"``: every device but the CPU (:func:`curvlab.device_routes.cpu_tuned` false):
      plain torch ops, no MKL (:func:`curvlab.device_routes.plain_routes`).

    So the routes a CPU test reached no other way are checked against the same dense
    references; where MKL is absent, calling one of its routines fails the test."""
    if request.param != "MKL":
        def absent(*args: object, **kwargs: object) -> None:
            raise AssertionError(f"an MKL routine was called {request.param}")

        monkeypatch.setattr(mkl, "available", lambda routine, dtype: False)
        for module, names in ((mkl, ("syrk", "syrk_", "spd_inverse_")), (gram, ("syrk", "syrk_"))):
            for name in names:
                monkeypatch.setattr(module, name, absent)
    with device_routes.plain_routes() if request.param == "as on a GPU" else contextlib.nullcontext():
        yield request.param
