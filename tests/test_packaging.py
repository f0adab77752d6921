"""pyproject's hand-kept `packages` list matches the folders that package-dir maps, so no subpackage
(or data file) is left out of the wheel while editable installs still import it.

scripts/check-wheel proves the same on a built wheel; this is the fast check that names the fix.
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]


def mapped_folders() -> dict[str, Path]:
    """Every package that package-dir puts in the namespace, with its folder: each mapped folder and
    each folder beneath it that holds Python files (unless package-dir maps that name elsewhere)."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIR.items():
        base = ROOT / folder
        for path in [base, *sorted(p for p in base.rglob("*") if p.is_dir())]:
            rel = path.relative_to(base).parts
            if any(part == "__pycache__" or part.startswith(".") for part in rel):
                continue
            if rel and not any(path.rglob("*.py")):
                continue
            if any(".".join((package, *rel[:i])) in PACKAGE_DIR for i in range(1, len(rel) + 1)):
                continue  # mapped elsewhere: that folder is the package, this one is not shipped
            found[".".join((package, *rel))] = path
    return found


def test_packages_list_names_every_mapped_package() -> None:
    folders = mapped_folders()
    listed = set(SETUPTOOLS["packages"])
    missing = sorted(set(folders) - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    extra = sorted(listed - set(folders))
    assert not extra, f"[tool.setuptools] packages names packages with no folder: {extra}"


def test_every_package_folder_is_a_regular_package() -> None:
    """A folder without __init__.py imports as a namespace package from the source tree and is
    missing from the wheel."""
    bare = sorted(
        name for name, path in mapped_folders().items() if not (path / "__init__.py").is_file()
    )
    assert not bare, f"add an __init__.py to {bare}"


def test_package_data_covers_every_other_file() -> None:
    """Files other than modules ship only where [tool.setuptools.package-data] names them."""
    data: dict[str, list[str]] = SETUPTOOLS.get("package-data", {})
    left_out = []
    for name, path in mapped_folders().items():
        for file in sorted(p for p in path.iterdir() if p.is_file()):
            if file.suffix in (".py", ".pyc"):
                continue
            if not any(fnmatch.fnmatch(file.name, pat) for pat in data.get(name, [])):
                left_out.append(str(file.relative_to(ROOT)))
    assert not left_out, f"not in the wheel (add to package-data, or move out): {left_out}"
