#!/usr/bin/env python3
"""Writes docs/commands/<command>.md, one page per `pyiommufd` command, from
the click definitions (the same text as `--help`). `--check` exits 1 when a
page is missing or out of date (the unit tier runs that check)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "commands"


HELP = ["-h", "--help"]  # the root group's help_option_names, which every subcommand inherits


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    ctx = click.Context(group, info_name=" ".join(("pyiommufd",) + path), help_option_names=HELP)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        yield path + (name,), command
        if isinstance(command, click.Group):
            yield from _commands(command, path + (name,))


def _help(path: tuple[str, ...], command: click.Command) -> str:
    from pyiommufd.cli import cli

    parent = click.Context(cli, info_name="pyiommufd", help_option_names=HELP)
    for name in path[:-1]:
        parent = click.Context(parent.command.get_command(parent, name), info_name=name, parent=parent,
                               help_option_names=HELP)
    ctx = click.Context(command, info_name=path[-1], parent=parent, terminal_width=100, max_content_width=100,
                        help_option_names=HELP)
    text = command.get_help(ctx)
    if isinstance(command, click.Group) and command.invoke_without_command and "[COMMAND]" not in text:
        text = text.replace(" COMMAND [ARGS]...", " [COMMAND] [ARGS]...", 1)  # click < 8.2 said it so
    return text


def pages() -> dict[str, str]:
    """File name -> Markdown text, for every visible command."""
    from pyiommufd.cli import cli

    out = {}
    index = ["# `pyiommufd` commands", "",
             "Generated from the click definitions by `tools/gen_command_docs.py`; the same text as "
             "`pyiommufd COMMAND --help`. Exit codes: `pyiommufd exit-codes` and the README.", ""]
    for path, command in _commands(cli):
        name = "-".join(path)
        title = " ".join(("pyiommufd",) + path)
        out[f"{name}.md"] = f"# `{title}`\n\n```\n{_help(path, command).rstrip()}\n```\n"
        index.append(f"* [`{title}`]({name}.md): {command.get_short_help_str(80)}")
    out["README.md"] = "\n".join(index) + "\n"
    return out


def stale() -> list[str]:
    want = pages()
    have = {p.name for p in OUT.glob("*.md")} if OUT.is_dir() else set()
    bad = [n for n, text in want.items() if not (OUT / n).is_file() or (OUT / n).read_text() != text]
    return sorted(bad + sorted(have - set(want)))


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        bad = stale()
        for name in bad:
            print(f"docs/commands/{name} is out of date: run tools/gen_command_docs.py", file=sys.stderr)
        return 1 if bad else 0
    OUT.mkdir(parents=True, exist_ok=True)
    want = pages()
    for p in OUT.glob("*.md"):
        if p.name not in want:
            p.unlink()
    for name, text in want.items():
        (OUT / name).write_text(text)
    print(f"wrote {len(want)} pages to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
