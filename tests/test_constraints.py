"""constraints.txt: the installed versions are the pinned ones, every direct dependency is pinned,
and the one private JAX API ov3 uses is fenced."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    found = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    assert all(len(f) == 2 for f in found), "constraints.txt: one name==version per line"
    return {canonical(n): v for n, v in found}


def direct_requirements() -> set[str]:
    """requirements.txt, setup.py's test extra and what .ci/run installs with --no-deps."""
    names = [line for line in (REPO / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for node in ast.walk(ast.parse((REPO / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EXTRAS":
            names += ast.literal_eval(node.value)["test"]
    ci = (REPO / ".ci" / "run").read_text()
    no_deps = re.search(r"--no-deps -c constraints\.txt ([^&]+)&&", ci)
    assert no_deps, ".ci/run installs its --no-deps packages with -c constraints.txt"
    names += no_deps.group(1).split()
    return {canonical(re.split(r"[<>=!~\[; ]", n.strip(), maxsplit=1)[0]) for n in names}


def test_installed_versions_are_the_pinned_ones():
    checked, wrong = 0, []
    for name, version in pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        checked += 1
        if installed.split("+")[0] != version:  # torch's CPU wheel is 2.13.0+cpu
            wrong.append(f"{name} {installed} (constraints.txt: {version})")
    assert checked >= 60, f"only {checked} pinned packages installed: not the CI environment"
    assert not wrong, "installed versions differ from constraints.txt (pip install -c constraints.txt ...): " + \
        ", ".join(wrong)


def test_every_direct_dependency_is_pinned():
    missing = direct_requirements() - set(pins())
    assert not missing, f"no pin in constraints.txt for {sorted(missing)}: regenerate it (see its header)"
    for cmd in ((REPO / ".ci" / "run").read_text(), (REPO / "README.md").read_text()):
        assert cmd.count("pip install -q -c constraints.txt -e '.[test]'") >= 1


def test_private_jax_api_is_fenced(monkeypatch, capsys):
    """Without jax._src.distributed, shutdown falls back to the public call and says so;
    without that either, one message naming the fix."""
    import jax
    from jax._src import distributed

    from ov3 import sharding
    from ov3.errors import Ov3Error
    assert sharding._distributed_state() is distributed.global_state
    monkeypatch.delattr(jax._src, "distributed")  # a jax that moved the module: the import fails
    monkeypatch.setitem(sys.modules, "jax._src.distributed", None)
    assert sharding._distributed_state() is None
    sharding.shutdown_distributed()  # not initialized: the public shutdown is a no-op here
    assert "has no jax._src.distributed.global_state" in capsys.readouterr().err
    monkeypatch.delattr(jax.distributed, "shutdown")
    with pytest.raises(Ov3Error, match="pip install -c constraints.txt"):
        sharding.shutdown_distributed()
