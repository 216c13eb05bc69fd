"""The tiny real data set of the tests: this machine's APT index, its smaller Packages files only.

`launch/make_debian_xmc.py` builds it in about a second: ~2,500 training rows (package descriptions,
Depends/Recommends/Tag/Section labels), ~2,000 labels, 2,000 tf-idf features, in both of its forms
(JSON lines of text and the XMC bag-of-words files).
"""

from __future__ import annotations

from pathlib import Path

from launch.make_debian_xmc import build, find_index_files


def build_tiny_debian(out: Path) -> Path:
    packages, translations = find_index_files()
    assert len(packages) >= 2, "needs the APT index (setup.sh runs `apt-get update`)"
    smaller = sorted(packages, key=lambda f: Path(f).stat().st_size)[:-1]
    build(out, index_files=smaller, translation_files=translations, max_features=2000)
    return out
