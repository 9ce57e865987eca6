#!/usr/bin/env python3
"""The two commands, with set-up included: on a machine that has only Python,

    python run.py pipeline [rlhf pipeline options...]   # the main job, on the built-in task
    python run.py test [pytest options...]              # the test suite

Each first makes sure an environment exists with what it needs, installing only what is missing:

1. a virtual environment ``.venv`` in this folder (or ``$RLHF_VENV``), unless ``--python`` names
   an interpreter (an environment of yours) to use instead;
2. torch, only when the environment cannot import one (``torch==2.13.0``, from pip's default
   index, or ``$RLHF_TORCH_INDEX_URL``); a torch that is there is never replaced or upgraded;
3. this package, editable, with its test extras (``pip install --no-build-isolation -e ".[dev]"``,
   which compiles the C++ extension), when it is not installed from this folder or when
   ``pyproject.toml``, ``setup.py`` or ``csrc/`` changed since the last install.  What was
   installed is stamped in ``.venv-stamps/``: a second run skips pip altogether.

Then it runs ``python -m rlhf pipeline ...`` or ``python -m pytest -q ...`` in that environment
and exits with its exit code.  ``python run.py setup`` only sets up.

Options (before the command):
    --python PATH            use this interpreter's environment instead of .venv (for example
                             the one that has your CUDA build of torch); also $RLHF_PYTHON
    --system-site-packages   create .venv so that it sees the system's packages (a torch
                             installed there is reused, not downloaded); also
                             $RLHF_VENV_SYSTEM_SITE_PACKAGES=1
    --reinstall              install this package again even if nothing changed

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH_SPEC = os.environ.get("RLHF_TORCH_SPEC", "torch==2.13.0")
STAMPS = ROOT / ".venv-stamps"
COMMANDS = ("pipeline", "test", "setup")
USAGE = """usage: python run.py [--python PATH] [--system-site-packages] [--reinstall] {pipeline,test,setup} [args...]

  pipeline [args...]  set up if needed, then run `rlhf pipeline args...` (the main job)
  test [args...]      set up if needed, then run `python -m pytest -q args...`
  setup               only set up (create .venv, install torch when missing, install this package)
"""


def say(msg: str) -> None:
    print(f"run.py: {msg}", file=sys.stderr, flush=True)


def fail(msg: str, code: int = 2) -> None:
    print(f"run.py: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse(argv: list[str]):
    opts = {"python": os.environ.get("RLHF_PYTHON") or None,
            "system_site": os.environ.get("RLHF_VENV_SYSTEM_SITE_PACKAGES", "0") not in ("", "0"),
            "reinstall": False}
    i = 0
    while i < len(argv) and argv[i] not in COMMANDS:
        a = argv[i]
        if a in ("-h", "--help"):
            print(USAGE + "\n" + __doc__.split("Options (before the command):")[1].split("Standard library")[0])
            sys.exit(0)
        elif a == "--python":
            if i + 1 >= len(argv):
                fail("--python needs a path to a Python interpreter")
            opts["python"] = argv[i + 1]
            i += 1
        elif a.startswith("--python="):
            opts["python"] = a.split("=", 1)[1]
        elif a == "--system-site-packages":
            opts["system_site"] = True
        elif a == "--reinstall":
            opts["reinstall"] = True
        elif not a.startswith("-"):
            fail(f"unknown command {a!r}: expected one of {', '.join(COMMANDS)}\n{USAGE}")
        else:
            fail(f"unknown option {a!r} (options go before the command)\n{USAGE}")
        i += 1
    if i >= len(argv):
        fail(f"missing command\n{USAGE}")
    return opts, argv[i], argv[i + 1:]


def venv_python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_interpreter(opts) -> Path:
    if opts["python"]:
        py = Path(opts["python"]).expanduser()
        if not py.exists():
            fail(f"--python {py}: no such interpreter")
        return py
    env_dir = Path(os.environ.get("RLHF_VENV") or ROOT / ".venv")
    py = venv_python(env_dir)
    if not py.exists():
        how = " (with the system's site packages)" if opts["system_site"] else ""
        say(f"creating the virtual environment {env_dir}{how}")
        try:
            venv.EnvBuilder(with_pip=True, system_site_packages=opts["system_site"]).create(env_dir)
        except Exception as e:  # e.g. Debian's python3 without python3-venv (no ensurepip)
            fail(f"could not create a virtual environment in {env_dir}: {e}\n"
                 "  install your distribution's venv package (e.g. python3-venv), or pass "
                 "--python /path/to/python to use an existing environment")
    return py


# One query of the target environment: what is importable, and from where.
_PROBE = r"""
import importlib.util, json, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
spec = importlib.util.find_spec("rlhf_kernels")
print(json.dumps({
    "torch": version("torch") if importlib.util.find_spec("torch") else None,
    "setuptools": version("setuptools"),
    "wheel": version("wheel"),
    "package": version("rlhf-kernels"),
    "package_origin": spec.origin if spec else None,
    "pytest": importlib.util.find_spec("pytest") is not None,
    "executable": sys.executable,
}))
"""


def probe(py: Path) -> dict:
    out = subprocess.run([str(py), "-c", _PROBE], capture_output=True, text=True, cwd=str(Path.home()))
    if out.returncode != 0:
        fail(f"{py} does not run: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def pip(py: Path, *args: str) -> None:
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *args]
    say("$ " + " ".join(cmd[1:]))
    rc = subprocess.call(cmd, cwd=str(ROOT))
    if rc != 0:
        fail(f"pip failed (exit code {rc}); see its output above", code=rc)


def sources_digest() -> str:
    """What an install depends on: the build files and every file under csrc/."""
    h = hashlib.sha256()
    files = [ROOT / "pyproject.toml", ROOT / "setup.py"]
    csrc = ROOT / "csrc"
    if csrc.is_dir():
        files += sorted(p for p in csrc.rglob("*") if p.is_file())
    for p in files:
        if p.exists():
            h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def stamp_path(py: Path) -> Path:
    key = hashlib.sha256(str(py.absolute()).encode()).hexdigest()[:16]
    return STAMPS / f"{key}.json"


def ensure_installed(py: Path, reinstall: bool) -> None:
    stamp = stamp_path(py)
    digest = sources_digest()
    try:
        old = json.loads(stamp.read_text())
    except (OSError, ValueError):
        old = {}
    if not reinstall and old.get("digest") == digest and old.get("python") == str(py.absolute()):
        # Nothing changed since the last install: check (without pip) that our package and
        # torch are still the ones there, and skip pip.
        info = probe(py)
        origin = info["package_origin"]
        if origin and Path(origin).resolve().is_relative_to(ROOT) and info["torch"] and info["pytest"]:
            return
    else:
        info = probe(py)
    if info["torch"] is None:
        index = os.environ.get("RLHF_TORCH_INDEX_URL")
        say(f"no torch in {info['executable']}: installing {TORCH_SPEC} (first run only; about a minute)")
        pip(py, "-q", TORCH_SPEC, *(["--index-url", index] if index else []))
        info = probe(py)
    if not info["setuptools"] or int(info["setuptools"].split(".")[0]) < 69 or not info["wheel"]:
        pip(py, "-q", "setuptools>=69", "wheel")
    origin = info["package_origin"]
    ours = origin is not None and Path(origin).resolve().is_relative_to(ROOT)
    why = ("--reinstall" if reinstall else "not installed" if origin is None
           else f"installed from {Path(origin).parent.parent}" if not ours
           else "pyproject.toml, setup.py or csrc/ changed" if old.get("digest") != digest
           else "test extras missing" if not info["pytest"] else "no stamp")
    say(f"installing this package, editable, with the test extras ({why}); "
        "this compiles the C++ extension (about a minute)")
    # Never let pip replace the torch that is there (a CUDA build stays a CUDA build).
    STAMPS.mkdir(exist_ok=True)
    constraint = STAMPS / "torch-constraint.txt"
    constraint.write_text(f"torch=={info['torch']}\n")
    pip(py, "-q", "--no-build-isolation", "-c", str(constraint), "-e", ".[dev]")
    stamp.write_text(json.dumps({"digest": digest, "python": str(py.absolute()), "torch": info["torch"]},
                                indent=1) + "\n")


def main(argv: list[str]) -> int:
    opts, command, rest = parse(argv)
    py = ensure_interpreter(opts)
    ensure_installed(py, opts["reinstall"])
    if command == "setup":
        say(f"ready: {py}")
        return 0
    if command == "pipeline":
        cmd = [str(py), "-m", "rlhf", "pipeline", *rest]
    else:
        cmd = [str(py), "-m", "pytest", "-q", *rest]
    sys.stdout.flush()
    try:
        return subprocess.call(cmd, cwd=str(ROOT))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
