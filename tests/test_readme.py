"""README is the user's front page: short, every link resolving, every command of the CLI in its table."""

import argparse
import re
from pathlib import Path

from loraflow.cli.commands import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_a_front_page():
    assert len(README.splitlines()) <= 150


def test_every_relative_link_resolves():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
        missing = [link for link in links if not link.startswith("http") and not (doc.parent / link).exists()]
        assert missing == [], f"{doc.relative_to(ROOT)} links to missing files"


def test_command_table_lists_every_subcommand():
    subparsers = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    listed = set(re.findall(r"^\| `loraflow ([a-z-]+)", README, re.M))
    assert set(subparsers.choices) == listed
