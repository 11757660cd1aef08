"""The package layout (DESIGN §1): top-level folders install as subpackages of ``streamssm``.

- Run from the repository root, the checkout imports on its own: ``python -m streamssm`` and
  ``python -m pytest`` put the root first on sys.path, so its ``streamssm/`` folder shadows any
  install, and a non-editable install (``pip install .``) failed with ``No module named
  'streamssm.kernels'`` (the subpackages are folders beside it, not in it).
- Every package folder is in pyproject's package list (a plain ``pip install .`` once had no
  ``streamssm.commands``; editable installs hid it, commit 02256cd).
"""

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_checkout_imports_from_its_root_over_any_install():
    """``-S`` skips site-packages' .pth files, so no editable-install finder maps the subpackages:
    what remains is the checkout's ``streamssm/`` first on sys.path, as over a non-editable install
    (the dependencies still come from PYTHONPATH)."""
    site = os.pathsep.join(dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")))
    env = {**os.environ, "PYTHONPATH": site}
    code = ("import streamssm.kernels, streamssm.datamodules, streamssm.service.server, streamssm.commands.fit\n"
            "print(streamssm.kernels.__file__, streamssm.datamodules.__file__, streamssm.service.__file__)")
    run = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(ROOT / folder / "__init__.py") for folder in ("kernels", "datamodules", "service")]


def test_every_package_folder_is_in_the_package_list():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            if not any(part.startswith((".", "__")) for part in parts):
                found.add(".".join((package, *parts)))
    assert found - set(setuptools["packages"]) == set(), "package folders missing from [tool.setuptools] packages"
