"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from curvlab.approx import APPROXIMATIONS

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_api_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "curvlab.extract(" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    ds = namespace["ds"]
    assert set(ds.approximation.values) == set(APPROXIMATIONS)
    architectures = next(b for b in blocks if "resnet18" in b)
    exec(compile(architectures, "README.md", "exec"), namespace)  # noqa: S102
    stats = namespace["stats"]
    assert stats.engine == "autograd" and stats["layer1.0.bn1.weight"].kind == "parameter"
    assert stats["layer1.0.conv1"].coupled and stats["layer1.0.conv1"].convention_sqrt is not None
    ae = namespace["ae"]
    assert list(ae.module_type.values) == ["Conv2d", "ConvTranspose2d"]
    assert set(ae.block_kind.values) == {"kronecker"} and ae.rel_frobenius_error.notnull().all()
    lm = namespace["lm"]
    assert list(lm.module_type.values) == ["Embedding", "Linear", "Linear"]
    assert lm.rel_frobenius_error.notnull().all() and lm.attrs["num_examples"] == 6
    att = namespace["att"]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in namespace["encoder"].modules())
    for name in ("1.self_attn.in_proj", "1.self_attn.out_proj", "1.linear1"):
        assert att.block_kind.sel(layer=name).item() == "kronecker" and att.rel_frobenius_error.sel(layer=name).notnull().all()
