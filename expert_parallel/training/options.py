"""The launcher's command line and JSON config, generated from the ``TrainConfig`` tree.

Every leaf field of the tree (``training/config.py``) is an option: its name is the
field's (``--capacity-factor`` for ``model.moe.capacity_factor``), its type comes from
the annotation, its help from the field's docstring (read from the class source with
``ast``) and its default from the default ``TrainConfig``. A field added to ``MoEConfig``
(or any config in the tree) is therefore an option without touching this file. Three
small tables say what cannot be read off the dataclasses:

* ``DERIVED``: fields computed from another (``moe.hidden_size`` = ``model.d_model``);
* ``ALIASES``: extra names users know (``--expert-ffn-hidden``);
* ``FLAT_PREFIX``: a prefix for a section's flat names (the tuner's ``--capacity-*``).

When two sections have a field of the same name, the one nearer the top of the tree
keeps the flat name and the other is reachable as ``--<section>.<name>``.

Precedence: defaults < ``--config FILE`` (a JSON object with flat keys, or nested section
objects such as ``{"moe": {...}}``) < command-line options. ``none`` means None for
optional fields; a bool option alone (``--resume``) means true. ``--capacity_factor`` and
``--capacity-factor`` are the same option; abbreviations are not accepted.

Errors: an unknown option is one line naming it and the closest valid name, exit 2
(argparse's convention); a bad value is one line naming the option; a value a config
refuses raises its ``ValueError`` / ``TypeError`` (one line, naming the field).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import sys
import textwrap
import types
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from .config import TrainConfig
from .jsonio import read_json_object

Path = tuple[str, ...]

DERIVED: dict[Path, Path] = {("model", "moe", "hidden_size"): ("model", "d_model")}
"""Fields that are not options: their value is another field's."""
ALIASES: dict[Path, tuple[str, ...]] = {("model", "moe", "ffn_hidden_size"): ("expert_ffn_hidden",)}
"""Additional flat names of a field."""
FLAT_PREFIX: dict[Path, str] = {("tuner",): "capacity_"}
"""Prefix of the flat names of a section's fields."""
SECTION_TITLES: dict[Path, str] = {(): "training", ("model",): "model", ("model", "moe"): "moe",
                                   ("parallel",): "parallel", ("tuner",): "capacity tuner"}
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Option:
    """One leaf field of the config tree, as a launcher option."""

    path: Path
    names: tuple[str, ...]
    """Option names without ``--``, the first shown first (``capacity-factor``)."""
    annotation: Any
    default: Any
    doc: str
    section: Path

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    @property
    def key(self) -> str:
        """The flat JSON key (underscores)."""
        return self.names[0].replace("-", "_")


# ----------------------------------------------------------------------------- the tree


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each annotated field."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


@functools.lru_cache(maxsize=None)
def sections(root: type = TrainConfig) -> dict[Path, type]:
    """``{section path: its dataclass}`` of the tree under ``root`` (``()`` is the root)."""
    out: dict[Path, type] = {(): root}

    def walk(cls: type, prefix: Path) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _is_section(hints[f.name]):
                out[prefix + (f.name,)] = hints[f.name]
                walk(hints[f.name], prefix + (f.name,))

    walk(root, ())
    return out


@functools.lru_cache(maxsize=None)
def options(root: type = TrainConfig) -> tuple[Option, ...]:
    """Every option of the tree under ``root`` (default: the launcher's), in tree order."""
    leaves: list[tuple[Path, Any, Any, str, Path]] = []

    def walk(cls: type, obj: Any, prefix: Path) -> None:
        hints, docs = get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            path, value = prefix + (f.name,), getattr(obj, f.name)
            if _is_section(hints[f.name]):
                walk(hints[f.name], value, path)
            elif path not in DERIVED:
                leaves.append((path, hints[f.name], value, docs.get(f.name, ""), prefix))

    walk(root, root(), ())
    # Flat names: the leaf nearest the root wins a clash; the others keep a dotted name.
    flat = {}
    for path, *_ in sorted(leaves, key=lambda leaf: len(leaf[0])):
        name = FLAT_PREFIX.get(path[:-1], "") + path[-1]
        flat.setdefault(name, path)
    out = []
    for path, annotation, default, doc, section in leaves:
        name = FLAT_PREFIX.get(path[:-1], "") + path[-1]
        names = [name] if flat[name] == path else [f"{path[-2]}.{path[-1]}"]
        names += list(ALIASES.get(path, ()))
        out.append(Option(path, tuple(n.replace("_", "-") for n in names), annotation, default, doc, section))
    return tuple(out)


def _by_name(root: type) -> dict[str, Option]:
    return {n.replace("-", "_"): o for o in options(root) for n in o.names}


# ----------------------------------------------------------------------------- values


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(args) < len(get_args(annotation))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), optional
    return annotation, False


def type_label(annotation: Any) -> str:
    base, optional = _unwrap_optional(annotation)
    if get_origin(base) is Literal:
        label = "|".join(str(a) for a in get_args(base))
    elif base in (int, float, str, bool):
        label = base.__name__
    elif get_origin(base) in (tuple, list):
        label = f"{type_label(get_args(base)[0])},..."
    else:
        label = "value"
    return label + ("|none" if optional else "")


def convert(text: str, annotation: Any, option: Optional[str] = None) -> Any:
    """Parse the string ``text`` as ``annotation``; ``ValueError`` (naming ``option``)."""
    base, optional = _unwrap_optional(annotation)
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            if text.lower() in TRUE:
                return True
            if text.lower() in FALSE:
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if get_origin(base) is Literal:
            for choice in get_args(base):
                if str(choice) == text:
                    return choice
            raise ValueError
        if get_origin(base) in (tuple, list):
            item = get_args(base)[0]
            items = [convert(t.strip(), item, option) for t in text.split(",") if t.strip()]
            return tuple(items) if get_origin(base) is tuple else items
    except ValueError:
        where = f"--{option}: " if option else ""
        raise ValueError(f"{where}cannot parse {text!r} as {type_label(annotation)}") from None
    return text  # str, Any: the config validates it


def _json_value(value: Any, opt: Option) -> Any:
    if isinstance(value, str) and opt.annotation is not str:
        return convert(value, opt.annotation, opt.names[0])
    base, _ = _unwrap_optional(opt.annotation)
    if get_origin(base) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _unknown(name: str, known: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"unknown {what} {name}" + (f"; did you mean {close[0]}?" if close else "")


def config_values(obj: Mapping[str, Any], source: str, section: Path = (),
                  root: type = TrainConfig) -> dict[Path, Any]:
    """``{path: value}`` from a JSON object: flat keys and nested section objects
    (``{"moe": {...}}`` or ``{"model": {"moe": {...}}}``), or ``"moe.top_k"`` keys."""
    by_name = _by_name(root)
    named = {p[-1]: p for p in sections(root) if p}
    out: dict[Path, Any] = {}
    for key, value in obj.items():
        norm = str(key).replace("-", "_")
        if isinstance(value, dict) and norm in named:
            out.update(config_values(value, source, named[norm], root))
            continue
        if "." in norm and norm.split(".", 1)[0] in named:  # "moe.capacity_factor"
            head, tail = norm.split(".", 1)
            out.update(config_values({tail: value}, source, named[head], root))
            continue
        opt = next((o for o in options(root) if o.section == section and o.path[-1] == norm), None) \
            if section else None
        opt = opt or by_name.get(norm)
        if opt is None and section + (norm,) in DERIVED:
            out[section + (norm,)] = value  # checked against its source in build_config
            continue
        if opt is None:
            known = sorted({n.replace("-", "_") for o in options(root) for n in o.names} | set(named))
            raise ValueError(f"{source}: " + _unknown(repr(key), [repr(k) for k in known], "key"))
        out[opt.path] = _json_value(value, opt)
    return out


def load_config_file(path: str) -> dict[Path, Any]:
    return config_values(read_json_object(path, "--config"), f"--config {path!r}")


def build_config(values: Mapping[Path, Any], root: type = TrainConfig) -> Any:
    """The config (``TrainConfig``) with ``values`` (``{path: value}``) over the defaults."""

    def build(cls: type, default: Any, prefix: Path) -> Any:
        hints, changes = get_type_hints(cls), {}
        for f in dataclasses.fields(cls):
            path = prefix + (f.name,)
            if _is_section(hints[f.name]):
                sub = build(hints[f.name], getattr(default, f.name), path)
                if sub is not getattr(default, f.name):
                    changes[f.name] = sub
            elif path in DERIVED:
                source = DERIVED[path]
                want = values.get(source, _get(root(), source))
                if path in values and values[path] != want:
                    raise ValueError(f"{'.'.join(path)} is derived from {'.'.join(source)}={want!r}, "
                                     f"got {values[path]!r}")
                if getattr(default, f.name) != want:
                    changes[f.name] = want
            elif path in values:
                changes[f.name] = values[path]
        return dataclasses.replace(default, **changes) if changes else default

    return build(root, root(), ())


def _get(obj: Any, path: Path) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def config_from(**flat: Any) -> TrainConfig:
    """``TrainConfig`` from flat (or section-qualified) keyword values, as in a JSON file:
    ``config_from(d_model=32, num_experts=4, ep_size=2)``."""
    return build_config(config_values(flat, "config_from"))


# ----------------------------------------------------------------------------- argparse


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and silent on ranks other than the first."""

    def __init__(self, *args: Any, quiet: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.quiet = quiet

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:  # type: ignore[override]
        if message and not self.quiet:
            sys.stderr.write(message)
        sys.exit(status)

    def print_help(self, file: Any = None) -> None:
        if not self.quiet:
            super().print_help(file)


def _plain(doc: str) -> str:
    """Docstring text for a terminal: without reST literal markers."""
    return doc.replace("``", "")


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def make_parser(prog: str = "train.py", quiet: bool = False, root: type = TrainConfig) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, quiet=quiet, allow_abbrev=False, argument_default=argparse.SUPPRESS,
                     usage="%(prog)s [--config FILE] [--OPTION VALUE ...]   (see the groups below)",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Train the MoE transformer with expert + data parallelism. Every "
                                 "option is a field of TrainConfig (expert_parallel/training/config.py); "
                                 "'none' means None, a bool option alone means true.")
    parser.add_argument("--config", metavar="FILE", help="JSON object of options (flat keys, or "
                        "section objects such as {\"moe\": {...}}); command-line options override it")
    groups = {}
    for opt in options(root):
        if opt.section not in groups:
            title = SECTION_TITLES.get(opt.section, ".".join(opt.section) or "options")
            cls = sections(root)[opt.section]
            doc = _plain((cls.__doc__ or "").strip().splitlines()[0]) if cls.__doc__ else ""
            derived = [f"{p[-1]} is set from {'.'.join(src)}" for p, src in DERIVED.items()
                       if p[:-1] == opt.section]
            doc = " ".join([doc] + [f"({d})." for d in derived]).strip()
            groups[opt.section] = parser.add_argument_group(f"{title} ({cls.__name__})", doc or None)
        base, _ = _unwrap_optional(opt.annotation)
        help_text = f"{_plain(opt.doc)} [{type_label(opt.annotation)}, default: {_show(opt.default)}]"
        kwargs: dict[str, Any] = dict(dest=opt.dest, help=help_text.replace("%", "%%"),
                                      metavar=type_label(opt.annotation).upper().replace("|NONE", "|none"),
                                      type=functools.partial(_arg_type, opt))
        if base is bool:
            kwargs.update(nargs="?", const=True)
        groups[opt.section].add_argument(*(f"--{n}" for n in opt.names), **kwargs)
    return parser


def _arg_type(opt: Option, text: str) -> Any:
    try:
        return convert(text, opt.annotation)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _normalise(argv: Sequence[str]) -> list[str]:
    """``--capacity_factor`` -> ``--capacity-factor`` (values are left alone)."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("_", "-") + eq + value
        out.append(arg)
    return out


def parse_args(argv: Sequence[str], quiet: bool = False, prog: str = "train.py") -> TrainConfig:
    """``TrainConfig`` from ``--config FILE`` and options. ``SystemExit(2)`` for an unknown
    option or an unparsable value (one line on stderr unless ``quiet``); ``ValueError`` /
    ``TypeError`` when a config refuses a value."""
    parser = make_parser(prog, quiet=quiet)
    ns, rest = parser.parse_known_args(_normalise(argv))
    if rest:
        arg = rest[0]
        if arg.startswith("-"):
            known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
            parser.error(_unknown(arg.split("=", 1)[0], known, "option"))
        parser.error(f"unexpected argument {arg!r}; options are --name value")
    given = vars(ns)
    values = load_config_file(given.pop("config")) if "config" in given else {}
    values.update({tuple(dest.split(".")): value for dest, value in given.items()})
    return build_config(values)


__all__ = ["Option", "options", "sections", "field_docs", "convert", "build_config", "config_values",
           "config_from", "load_config_file", "make_parser", "parse_args"]
