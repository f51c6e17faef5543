"""Generated sections of the docs: a benchmark rewrites the text between its markers and keeps the rest."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, text: str, title: str = "") -> None:
    """Replace what lies between `<!-- {name}:begin -->` and `<!-- {name}:end -->` in `path` with `text`; the
    markers are appended when missing, and a missing file starts with `title`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    content = path.read_text() if path.exists() else title
    if begin not in content:
        content += f"\n{begin}\n{end}\n"
    before, rest = content.split(begin, 1)
    _, after = rest.split(end, 1)
    path.write_text(f"{before}{begin}\n{text}\n{end}{after}")
