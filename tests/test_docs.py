"""The documentation's Python code blocks run, so the docs cannot drift from the code.

Every ```` ```python ```` block of a page in ``docs/`` (and of ``README.md``) is executed with ``mktestdocs``, the
blocks of one page in one namespace, in order, as a reader would paste them. ``bash``, ``yaml`` and ``text``
blocks are not executed. Each page runs in its own temporary directory, so logs and checkpoints stay out of the
repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mktestdocs import check_md_file, grab_code_blocks

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = [page for page in PAGES if grab_code_blocks(page.read_text(encoding="utf-8"), lang="python")]


def test_docs_pages_have_runnable_blocks():
    """Test that the pages with Python examples are found (a renamed folder must not skip them all)."""
    assert len(RUNNABLE) >= 10, [page.name for page in RUNNABLE]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(page.relative_to(ROOT)) for page in RUNNABLE])
def test_docs_python_blocks_run(page, tmp_path, monkeypatch):
    """Test that every Python block of the page runs, the page's blocks in one namespace."""
    monkeypatch.chdir(tmp_path)
    check_md_file(page, memory=True)
