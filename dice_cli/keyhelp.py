"""``dice <command> --help``: the command's own keys, each with its default and a one-line description.

The descriptions are the comments next to each field in dice_cli/config.py (one home for defaults and
their meaning): a field's trailing comment, continued by comment lines below it that are indented past the
``#``, or else the comment block just above it. No Hydra and no torch here: ``commands`` feeds it the
composed config.

    dice gt --help
    dice train dataset=synthetic --help      # defaults as composed with that choice
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import tokenize
from typing import Any, Dict, List, Optional, Tuple

from .config import _dataclass_of, schema_fields

# continuation lines of a trailing comment are indented past the '#': "#      more text"
_CONTINUATION = "#  "


@functools.lru_cache(maxsize=None)
def _own_docs(cls) -> Dict[str, str]:
    """{field: description} from the comments in ``cls``'s own class body (not its bases)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: Dict[int, Tuple[int, str]] = {}          # line number -> (column, text) of each comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string)
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("class "))
    body = [(i + 1, line) for i, line in enumerate(lines)][head:]
    indent = None
    docs: Dict[str, str] = {}
    above: List[str] = []
    last: Optional[str] = None
    for no, line in body[1:]:
        stripped = line.strip()
        if not stripped:
            above, last = [], None
            continue
        col = len(line) - len(line.lstrip())
        if indent is None:
            indent = col
        if col < indent:
            break
        if col > indent and not stripped.startswith("#"):
            continue                                    # inside a method or a wrapped expression
        if stripped.startswith("#"):
            text = stripped
            if last is not None and text.startswith(_CONTINUATION):
                docs[last] += " " + text.lstrip("#").strip()
            else:
                above.append(text.lstrip("#").strip())
                last = None
            continue
        name = stripped.split(":", 1)[0].strip()
        if stripped.startswith(("def ", "@", '"""', "'")) or not name.isidentifier() or ":" not in stripped:
            above, last = [], None
            continue
        trailing = comments.get(no)
        if trailing is not None and trailing[0] > col:
            docs[name] = trailing[1].lstrip("#").strip()
            last = name
        elif above:
            docs[name] = " ".join(above)
            last = None
        else:
            last = None
        above = []
    return docs


def field_docs(schema) -> Dict[str, str]:
    """{field: one-line description} of a dataclass schema, its bases' comments included."""
    docs: Dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if dataclasses.is_dataclass(cls):
            docs.update(_own_docs(cls))
    return docs


def show_value(v: Any) -> str:
    """A value as it would be written on the command line (YAML flow style)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(show_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{show_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def key_rows(schema, values: Optional[dict], prefix: str = "", skip=()) -> List[Tuple[str, str, str]]:
    """(dotted key, current value, description) for every leaf key of ``schema``; ``values`` is the
    composed config (its values win over the schema's defaults). Fields named in ``skip`` are left out."""
    docs = field_docs(schema)
    defaults = {f.name: f for f in dataclasses.fields(schema)}
    rows: List[Tuple[str, str, str]] = []
    for name, tp in schema_fields(schema).items():
        if name in skip:
            continue
        sub = _dataclass_of(tp)
        value = (values or {}).get(name, _default(defaults[name]))
        if sub is not None:
            rows += key_rows(sub, value if isinstance(value, dict) else None, f"{prefix}{name}.")
            continue
        rows.append((prefix + name, show_value(value), docs.get(name, "")))
    return rows


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:        # type: ignore[misc]
        v = f.default_factory()                              # type: ignore[misc]
        return dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return None


def _table(rows: List[Tuple[str, str, str]]) -> List[str]:
    key_w = min(max(len(k) for k, _, _ in rows), 28)
    val_w = min(max(len(v) for _, v, _ in rows), 16)
    return [f"  {k:<{key_w}}  {v:<{val_w}}  {d}".rstrip() for k, v, d in rows]


def help_text(schema, values: Optional[dict], groups: Optional[Dict[str, List[str]]] = None,
              choices: Optional[Dict[str, Any]] = None) -> str:
    """The keys section of ``dice <command> --help``: the config groups (train, pipeline: ``groups``, with
    the ``choices`` made) and then every key of ``schema`` with its value in the composed ``values``."""
    lines: List[str] = []
    if groups:
        lines.append("Config groups (group=choice; the presets in configs/<group>/):")
        lines += _table([(g, show_value((choices or {}).get(g)), ", ".join(c)) for g, c in sorted(groups.items())])
        lines.append("")
    lines.append("Keys (key=value; the value shown is the default this command line composes to):")
    lines += _table(key_rows(schema, values))
    return "\n".join(lines)
