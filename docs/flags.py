"""The README's table of the flags people use most, written from the parsers' own help, so that the
two cannot drift: `python docs/flags.py` prints it; tests/test_docs.py checks that README.md holds it."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drn.cli import train_parser  # noqa: E402
from search.cli import parser as search_parser  # noqa: E402

# (flag, the tools that take it); the help shown is the first tool's
COMMON = [("--target-flops", ("drn-search", "drn-train")), ("--arch", ("drn-search", "drn-train")),
          ("--dataset", ("drn-search", "drn-train")), ("--data-dir", ("drn-search", "drn-train")),
          ("--epochs", ("drn-search", "drn-train")), ("--finetune-epochs", ("drn-search", "drn-train")),
          ("--backbone", ("drn-search",)), ("--backbone-epochs", ("drn-search",)),
          ("--num-samples", ("drn-search",)), ("--gpus-per-trial", ("drn-search",)),
          ("--storage", ("drn-search",)), ("--resume", ("drn-search",)), ("--mlflow-uri", ("drn-search",)),
          ("--init", ("drn-train",))]
START, END = "<!-- flags: python docs/flags.py -->", "<!-- /flags -->"


def helps(parser: argparse.ArgumentParser) -> dict[str, tuple[str, str]]:
    """flag -> (its usage, e.g. `--arch NAME`, its help as --help prints it)."""
    fmt = parser._get_formatter()
    out = {}
    for action in parser._actions:
        if action.help is argparse.SUPPRESS:
            continue
        usage = fmt._format_action_invocation(action).split(", ")[-1]
        for flag in action.option_strings:
            out[flag] = (usage, fmt._expand_help(action) if action.help else "")
    return out


def table() -> str:
    tools = {"drn-train": helps(train_parser()), "drn-search": helps(search_parser())}
    rows = [START, "| flag | in | what it does |", "|---|---|---|"]
    for flag, where in COMMON:
        usage, help_ = tools[where[0]][flag]
        cell = " ".join(help_.split()).replace("|", "\\|")
        rows.append(f"| `{usage.replace('|', chr(92) + '|')}` | {', '.join(where)} | {cell} |")
    return "\n".join([*rows, END])


if __name__ == "__main__":
    print(table())
