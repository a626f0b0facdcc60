"""``./run.sh config [GROUP]``: every setting with its default, its allowed values and what
it does, from the declared schema (kit/schema) and the defaults (kit/conf/)."""
from __future__ import annotations

from kit.config import load_config, train_settings
from kit.schema import GROUPS, describe

# train's sections are listed with it (cv's --set reaches them as augment.*, features.*).
SECTIONS = ("augment", "features")


def add_arguments(parser):
    parser.add_argument("group", nargs="?", choices=[g for g in GROUPS if g not in SECTIONS],
                        help="one settings group (default: all of them)")
    parser.add_argument("--markdown", action="store_true",
                        help="print Markdown tables (the manual's) instead of plain text")


def defaults(group: str) -> dict:
    """The packaged defaults of ``group`` (train with its sections)."""
    return train_settings().resolve() if group == "train" else load_config(group)


def table(group: str, markdown: bool = False) -> str:
    """The settings of ``group`` as text: key, default, allowed values, description."""
    rows = describe(group, defaults(group))
    if markdown:
        lines = [f"### {group}", "", "| key | default | allowed | what it does |",
                 "|---|---|---|---|"]
        lines += [f"| `{k}` | `{_show(v)}` | {a} | {d} |".replace("\n", " ")
                  for k, v, a, d in rows]
        return "\n".join(lines)
    width = max(len(k) for k, *_ in rows)
    lines = [f"{group} (kit/conf/{group}.yaml; --set KEY=VALUE, --config FILE)"]
    for k, v, a, d in rows:
        lines.append(f"  {k:<{width}}  {_show(v)}")
        lines.append(f"  {'':<{width}}    {a}: {d}")
    return "\n".join(lines)


def _show(value) -> str:
    if isinstance(value, dict) and len(str(value)) > 60:
        return "{...} (see kit/conf/)"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return "\"\"" if value == "" else str(value)


def run(args) -> int:
    groups = [args.group] if args.group else [g for g in GROUPS if g not in SECTIONS]
    print("\n\n".join(table(g, args.markdown) for g in groups))
    return 0
