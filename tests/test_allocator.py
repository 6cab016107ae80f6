"""The command line's ``--malloc``: with ``reuse`` a freed large tensor's memory serves the next
one (no fresh mapping whose pages fault in again); ``default`` leaves glibc as it started; ``auto``
(the default) reuses for a model with a convolution."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest
from torch import nn

from curvlab.app.allocator import reuses_memory
from curvlab.app.cli import build_parser
from curvlab.app.models import build_model

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# In a fresh interpreter (the setting is process-wide): the new anonymous mappings of 64 MiB or
# more after a 256 MiB tensor is allocated, freed and allocated again.
PROBE = textwrap.dedent("""
    import sys, torch
    from curvlab.app.allocator import apply_malloc_option
    print(apply_malloc_option(sys.argv[1]))

    def big_mappings():
        out = set()
        for line in open("/proc/self/maps"):
            fields = line.split()
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if hi - lo >= 64 << 20 and (len(fields) < 6 or fields[5] == "[heap]"):
                out.add((lo, fields[5] if len(fields) > 5 else ""))
        return out

    before = big_mappings()
    a = torch.ones(64 << 20)  # 256 MiB
    del a
    b = torch.ones(64 << 20)
    print(sorted(kind for _, kind in big_mappings() - before))
""")


def probe(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_reuse_serves_large_tensors_from_the_heap_and_keeps_freed_memory() -> None:
    setting, new_mappings = probe("reuse")
    assert setting.startswith("glibc: no mmap, no trim")
    # no anonymous mmap: the heap grew instead (where in it the second tensor lands is the heap's
    # choice: the first one's memory, or next to it)
    assert "''" not in new_mappings


def test_default_leaves_glibc_mapping_large_tensors_afresh() -> None:
    setting, new_mappings = probe("default")
    assert setting == "default"
    assert "''" in new_mappings  # a fresh anonymous mapping for a 256 MiB tensor


@pytest.mark.parametrize(("command", "default"), [("train", "auto"), ("report", "default")])
def test_train_chooses_the_allocator_by_its_model_and_report_keeps_glibcs(command: str, default: str) -> None:
    parser, _ = build_parser()
    assert parser.parse_args([command]).malloc == default
    assert parser.parse_args([command, "--malloc", "reuse"]).malloc == "reuse"
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--malloc", "jemalloc"])


def test_auto_reuses_memory_for_convolutional_models_only() -> None:
    conv_nets = [build_model(name, (3, 32, 32), 10) for name in ("cnn", "resnet18", "vgg16-bn", "vit-tiny")]
    assert all(reuses_memory("auto", m) for m in conv_nets)
    assert not reuses_memory("auto", build_model("mlp", (1, 8, 8), 10))
    assert not reuses_memory("auto", None)  # a model the command line could not build
    assert reuses_memory("reuse", None) and not reuses_memory("default", conv_nets[0])
    assert reuses_memory("auto", nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Conv1d(1, 1, 3))))
    assert reuses_memory("auto", nn.Sequential(nn.Linear(4, 4), nn.ConvTranspose2d(1, 1, 3)))  # a decoder
