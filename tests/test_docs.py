"""The docs agree with the code: docs/commands.md is the CLI's own --help, and no relative link
in the Markdown pages points to a missing file.

Regenerate the command reference with ``python tests/test_docs.py``.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "commands.md"
COMMANDS = ("pretrain", "finetune", "eval", "clip", "shards", "embed", "search", "dedup", "predict", "export", "show", "demo",
            "models")


def render() -> str:
    """Every sub-command's --help, as argparse prints it at 100 columns."""
    os.environ["COLUMNS"] = "100"          # argparse wraps to the terminal's width
    from keel.cli import build_parser
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    parts = ["# Command reference\n",
             "Generated from the CLI's own `--help` (`python tests/test_docs.py`); a test keeps the two equal.\n",
             "## keel\n", "```text\n" + parser.format_help().rstrip() + "\n```\n"]
    for name in COMMANDS:
        parts += [f"## keel {name}\n", "```text\n" + subs[name].format_help().rstrip() + "\n```\n"]
    return "\n".join(parts)


def test_command_reference_is_the_cli_help():
    assert REFERENCE.is_file(), "docs/commands.md is missing: run python tests/test_docs.py"
    assert REFERENCE.read_text() == render(), "docs/commands.md is out of date: run python tests/test_docs.py"


def test_no_broken_relative_links():
    pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, "broken links: " + ", ".join(broken)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    REFERENCE.write_text(render())
    print(f"wrote {REFERENCE}")
