"""Text from a run directory, made safe for each output format: one function per format, used by
every writer of that format.

A run directory may come from anyone (a colleague's results, a CI artifact, a checkout of the
``bench-results`` branch), so a variant name, a status, a reason, a hostname or a commit message
read from it is data that must print as what it is, whatever characters it holds:

* :func:`terminal` — plain text for a terminal or a log: control characters (ESC starts the
  sequences that clear the screen, move the cursor, set the title or make OSC-8 links; BEL,
  backspace, carriage return, DEL, the C1 range) are shown as ``\\x1b``-style escapes, never sent;
  a newline too, unless the text may span lines; at most ``limit`` characters;
* :func:`rich` — the same, then Rich markup escaped (:func:`rich.markup.escape`), for anything
  given to a Rich console or table as markup: ``[/]`` or ``[link=…]`` in a name prints as itself;
* :func:`markdown` — one table cell or line of GitHub-flavoured Markdown: line breaks become spaces,
  ``|`` cannot end a cell, ``![`` cannot embed a remote image, ``<`` cannot open HTML, ``#``, ``*``,
  ``_``, `````, ``[``, ``]``, ``$`` and ``\\`` are backslash-escaped;
* :func:`xml` — text for an XML 1.0 document (the Atom feed): the characters XML 1.0 forbids
  (most C0 controls such as ``\\x0b`` and ESC, lone surrogates, U+FFFE/U+FFFF) are dropped, so the
  document stays well-formed (the serializer escapes ``<``, ``&`` and quotes);
* :func:`chart` — a label for matplotlib: mathtext is off for every chart (:mod:`reports.plots` sets
  ``text.parse_math = False`` and ``text.usetex = False``, so ``$…$`` is shown, not parsed) and control
  characters are shown escaped;
* :func:`literal` — a replacement text for :func:`re.sub`: data never becomes a template
  (a backslash in a label is not a group reference).

HTML pages escape through Jinja's autoescaping (:mod:`reports.templating`). This module imports
only the standard library (Rich when :func:`rich` is called).
"""

from __future__ import annotations

import re

#: Longest text printed for one field or one line of a message, by default.
MAX_LINE = 2000

# C0 controls but tab and newline, DEL, the C1 range; and the characters that reorder text or hide
# it (bidirectional overrides and isolates, zero-width and invisible formatting characters).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_CONTROL_AND_NEWLINES = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff\u2028\u2029]")
# XML 1.0, section 2.2: Char ::= #x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] | [#x10000-#x10FFFF]
_NOT_XML = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_NEWLINES = re.compile("[\r\n\u2028\u2029\x0b\x0c\x85]+")
# Markdown: characters that start emphasis, code, links, images, HTML, math, headings or end a cell.
_MARKDOWN = re.compile(r"([\\`*_\[\]#|!$~])")


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _shown(match: re.Match) -> str:
    c = match.group(0)
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def truncate(text: str, limit: int | None = MAX_LINE) -> str:
    """``text``, cut to ``limit`` characters with a note of how many were left out."""
    if limit is None or len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def terminal(value: object, *, newlines: bool = False, limit: int | None = MAX_LINE) -> str:
    """``value`` as text that cannot control a terminal: every control character (and a newline or
    carriage return unless ``newlines``) written as a visible escape (``\\x1b``), at most ``limit``
    characters (None: any length)."""
    text = _text(value)
    rx = _CONTROL if newlines else _CONTROL_AND_NEWLINES
    return truncate(rx.sub(_shown, text), limit)


def rich(value: object, *, newlines: bool = False, limit: int | None = MAX_LINE) -> str:
    """``value`` for Rich markup (a table cell, ``console.print``): :func:`terminal`, then
    :func:`rich.markup.escape`, so brackets in the data are never tags."""
    from rich.markup import escape as markup_escape

    return markup_escape(terminal(value, newlines=newlines, limit=limit))


def markdown(value: object, *, limit: int | None = MAX_LINE) -> str:
    """``value`` as the text of one Markdown table cell or line: no newline, no HTML, no image, link,
    heading, emphasis, code span or math from the data, and ``|`` never ends the cell."""
    # no newline (it would end the cell and start a block: a heading, an image): a space instead
    text = terminal(_NEWLINES.sub(" ", _text(value)), limit=limit)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN.sub(r"\\\1", text)


def markdown_code(value: object, *, limit: int | None = 200) -> str:
    """``value`` as a Markdown code span (a run id, a commit): backticks in it cannot end the span."""
    text = terminal(value, limit=limit).replace("`", "'")
    return f"`{text}`"


def xml(value: object) -> str:
    """``value`` without the characters XML 1.0 forbids (dropped), for an element's text or an attribute."""
    return _NOT_XML.sub("", _text(value))


def chart(value: object, *, limit: int | None = 300) -> str:
    """``value`` as a matplotlib label: control characters shown escaped (mathtext is off for every
    chart, see :mod:`reports.plots`, so ``$`` needs nothing)."""
    return terminal(value, limit=limit)


def literal(value: object) -> str:
    """``value`` as a :func:`re.sub` replacement that means itself (backslashes doubled)."""
    return _text(value).replace("\\", "\\\\")
