"""The README's copy-paste snippets, by name, so that tests run exactly what a user copies.

A snippet is the first ```python block after a line ``<!-- snippet: NAME -->`` in README.md."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- snippet: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    if found is None:
        raise AssertionError(f"README.md has no snippet {name!r} (a ```python block after <!-- snippet: {name} -->)")
    return found.group(1)
