"""The links between README.md and docs/ resolve: each relative link's file exists and its
``#anchor`` is a heading of that file as GitHub renders the anchor (lower case, punctuation
but ``-`` and ``_`` dropped, spaces to ``-``)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/CLI.md", "docs/DESIGN.md", "docs/INTERNALS.md"]


def _text(path: str) -> str:
    """The file's text less its code blocks (a ``# comment`` there is no heading)."""
    return re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)


def _anchors(path: str) -> set:
    text = _text(path)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_relative_links_and_anchors_resolve():
    bad = []
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", _text(path))):  # inline code: ``a[i](x)`` is no link
            if re.match(r"\w+://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(dest):
                bad.append(f"{doc}: {target} (no file)")
            elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
                bad.append(f"{doc}: {target} (no heading)")
    assert bad == []
