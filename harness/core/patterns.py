"""Picking cases by a pattern typed on the command line (``bench run --only``, ``bench profile --case``).

A case's label is the words ``bench run --dry-run`` prints for it
(``sdpa(backend=flash) cpu bfloat16 fwd B1 H8 L1024 D64 causal``, see
:meth:`harness.core.cases.Case.label`). A pattern is one or more words, and a case matches when
every word does, case-insensitively:

* a word of the label: the variant with its parameters, the variant's name alone (``sdpa``), one
  of its parameters (``backend=flash``), the device, dtype, mode, ``B1``, ``H8``, ``L1024``,
  ``D64`` or ``causal`` (whole words: ``float16`` does not match ``bfloat16``);
* a glob (``*``, ``?``, ``[``) matched against each of those words (``L4*``, ``block_sparse*``);
* the start of the case id, 6 characters or more (``3fa9c1``).

So ``naive``, ``"sdpa backend=math L1024"`` or ``"naive float16 L4096 causal"`` all work.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import TypeVar

from harness.core.cases import Case

_GLOB = set("*?[")
_HEAD = re.compile(r"^([^(\s]+)\((.*)\)$")
C = TypeVar("C", bound=Case)


def label_words(label: str) -> set[str]:
    """The words a pattern's word can be: the label's words, and the variant's name and parameters."""
    words = set(label.lower().split())
    head = label.lower().split(" ", 1)[0]
    if m := _HEAD.match(head):
        words.add(m.group(1))
        words.update(p for p in m.group(2).split(",") if p)
    return words


def word_matches(word: str, words: set[str], case_id: str) -> bool:
    word = word.lower()
    if _GLOB & set(word):
        return any(fnmatch.fnmatchcase(w, word) for w in words)
    return word in words or (len(word) >= 6 and case_id.lower().startswith(word))


def matches(pattern: str, label: str, case_id: str) -> bool:
    """Whether the case with this label and id matches ``pattern`` (every word of it)."""
    words = label_words(label)
    given = pattern.split()
    return bool(given) and all(word_matches(w, words, case_id) for w in given)


def select_cases(cases: Iterable[C], pattern: str) -> list[C]:
    """The cases that match ``pattern``, in their order."""
    return [c for c in cases if matches(pattern, c.label(), c.case_id)]
