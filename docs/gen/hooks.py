"""MkDocs hooks (``hooks:`` in mkdocs.yml): the generated reference pages and the measured tables.

* ``on_files`` adds the reference pages of ``docs/gen/reference.py`` (suite keys, result columns,
  variants, command line: generated from the code's declarations at every build) and the index of
  measured tables (``docs/gen/measured.py``) as pages of the site.
* ``on_page_markdown`` replaces each ``{{ measured("name") }}`` line with the table in
  ``docs/data/name.json`` and each ``{{ generated("name") }}`` line with a table computed from the code.
  A problem (an absent or malformed table, an unknown name, a stray ``{{ … }}``) is logged as a
  warning naming the page and what to run, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import measured  # noqa: E402
import reference  # noqa: E402
from mkdocs.structure.files import File  # noqa: E402

#: A logger under "mkdocs": its warnings count for --strict.
log = logging.getLogger("mkdocs.hooks.attention_bench")
MEASURED_INDEX = "reference/measured.md"


def on_files(files, config):
    docs_dir = Path(config["docs_dir"])
    pages = {**{path: fn for path, fn in reference.PAGES.items()},
             MEASURED_INDEX: lambda: measured.index_page(docs_dir)}
    for path, fn in pages.items():
        if files.get_file_from_path(path) is not None:
            log.warning(f"docs/{path} is generated at build time: remove the file of that name")
            files.remove(files.get_file_from_path(path))
        files.append(File.generated(config, path, content=fn()))
    return files


def on_page_markdown(markdown, page, config, files):
    text, problems = measured.expand(markdown, page.file.src_uri)
    for problem in problems:
        log.warning(problem)
    return text
