"""The configuration reference page, generated from conf/ and the schema (never copied by hand).

    python scripts/config_reference.py                       print the page (Markdown)
    python scripts/config_reference.py --out configs.md      write it

The docs build calls `render()` from docs/hooks/reference.py, so the site's Configuration page is
made from the configs of the checkout it is built from; tests/test_docs.py checks that every group
option and every key appears in it.

For each config group (a folder of conf/): its options (one word each: `data=folder`), every key
each option sets with its value as written in the file (interpolations included) and the comment
beside or above it, which option each command's config picks by default, and the allowed values
where defect_detection/schema.py states them (types, bounds, Literal choices): the checks every run
passes before any data is read. The same for the commands' own configs (train.yaml, predict.yaml,
...). Values come from OmegaConf.load of each file (structure, unresolved); descriptions from the
comments, which OmegaConf does not keep, read line by line. The output depends only on the files,
so the page is the same on every build.
"""

from __future__ import annotations

import argparse
import re
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# The commands' own configs (conf/*.yaml), in the order a new user meets them.
PRIMARY = ("train", "predict", "eval", "data_summary", "explain_cmd", "compare", "promote", "monitor",
           "review", "challenge")
SCRIPT = "scripts/config_reference.py"


# -- reading the files ------------------------------------------------------------------------------

# `key: value  # comment`; a key is quoted, or plain (not a list item `- ...` nor a flow value)
_KEY = re.compile(r"^(?P<indent> *)(?P<key>\"[^\"]+\"|'[^']+'|[^\s#:'\"\-\[{][^:#]*?)"
                  r":(?:\s+(?P<rest>.*))?$")


def _split_comment(text: str) -> tuple[str, str | None, int | None]:
    """(value, inline comment, the comment's column in `text`): a `#` after whitespace and outside
    quotes starts a comment."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1:].strip(), i
    return text.rstrip(), None, None


def _balanced(text: str) -> bool:
    return text.count("[") == text.count("]") and text.count("{") == text.count("}")


def read_annotations(path: Path) -> dict:
    """What OmegaConf drops: the file's leading comment (its description), its `# @package`, and per
    key path the comments beside and directly above it, and its value exactly as written (single-line
    values only)."""
    lines = path.read_text().splitlines()
    header: list[str] = []
    package = None
    i = 0
    while i < len(lines) and lines[i].lstrip().startswith("#"):
        text = lines[i].strip()[1:]
        if text.strip().startswith("@package"):
            package = text.strip().split(None, 1)[1].strip()
        else:
            header.append(text[1:] if text.startswith(" ") else text)
        i += 1
    notes: dict[tuple, list[str]] = {}
    raw: dict[tuple, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    inline_at: tuple[tuple, int] | None = None  # (path, column) of the last key's inline comment
    depth = 0  # open brackets of a flow value that continues on the next lines
    for line in lines[i:]:
        stripped = line.strip()
        if depth > 0:
            depth += line.count("[") + line.count("{") - line.count("]") - line.count("}")
            continue
        if not stripped:
            pending, inline_at = [], None
            continue
        if stripped.startswith("#"):
            column = len(line) - len(line.lstrip())
            if inline_at and column == inline_at[1]:  # the comment beside a key, continued
                notes[inline_at[0]].append(stripped[1:].strip())
            else:
                pending.append(stripped[1:].strip())
                inline_at = None
            continue
        match = _KEY.match(line)
        if not match:  # a block list item (`- metric: val/loss`): part of its key's value
            pending, inline_at = [], None
            continue
        indent, key = len(match["indent"]), match["key"].strip("\"'")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key_path = (*[k for _, k in stack], key)
        stack.append((indent, key))
        value, comment, column = _split_comment(match["rest"] or "")
        notes[key_path] = [*pending, *([comment] if comment else [])]
        pending = []
        inline_at = (key_path, len(line) - len(match["rest"] or "") + column) if comment else None
        if value and _balanced(value):
            raw[key_path] = value
        elif value:
            depth = value.count("[") + value.count("{") - value.count("]") - value.count("}")
    return {"header": header, "package": package,
            "notes": {k: " ".join(v) for k, v in notes.items() if v}, "raw": raw}


def _leaves(node, prefix: tuple = ()) -> Iterable[tuple[tuple, object]]:
    """(path, value) of every leaf; an empty mapping and any list are leaves."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, (*prefix, str(key)))
    else:
        yield prefix, node


def _flow(value) -> str:
    """A value as YAML flow text (for values the file spreads over several lines)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return "''" if value == "" else str(value)


def read_config(path: Path, prefix: tuple = ()) -> dict:
    """One YAML file: its defaults list, its keys (under `prefix`, the package it lands in) with
    their value as written and their comments, its description."""
    notes = read_annotations(path)
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    defaults = data.pop("defaults", []) if isinstance(data, dict) else []
    if notes["package"] is not None:
        package = notes["package"]
        prefix = () if package == "_global_" else tuple(package.split("."))
    keys = []
    mapping_notes = {p: n for p, n in notes["notes"].items()}
    used_parent_notes: set[tuple] = set()
    for key_path, value in _leaves(data):
        if not key_path:
            continue
        parents = [key_path[:n] for n in range(1, len(key_path))]
        inherited = [mapping_notes[p] for p in parents if p in mapping_notes and p not in used_parent_notes]
        used_parent_notes.update(p for p in parents if p in mapping_notes)
        text = " ".join([*inherited, *([mapping_notes[key_path]] if key_path in mapping_notes else [])])
        raw = notes["raw"].get(key_path)
        keys.append({"key": ".".join((*prefix, *key_path)), "value": raw if raw is not None else _flow(value),
                     "note": text})
    return {"name": path.stem, "defaults": defaults, "keys": keys, "header": notes["header"],
            "package": notes["package"]}


def _defaults_choices(defaults: list) -> dict[str, str | None]:
    """{group: option} of a primary config's defaults list (`_self_` left out)."""
    out = {}
    for entry in defaults:
        if isinstance(entry, dict):
            for group, option in entry.items():
                out[str(group)] = option
    return out


def collect(conf_dir: Path = CONF) -> dict:
    """Every group (a folder of conf/, nested ones as `hydra/launcher`) with its options, and every
    primary config, read from the files."""
    primaries = {name: read_config(conf_dir / f"{name}.yaml") for name in PRIMARY
                 if (conf_dir / f"{name}.yaml").is_file()}
    extra = sorted(p.stem for p in conf_dir.glob("*.yaml") if p.stem not in PRIMARY)
    primaries.update({name: read_config(conf_dir / f"{name}.yaml") for name in extra})
    groups = {}
    for folder in sorted(p for p in conf_dir.rglob("*") if p.is_dir()):
        files = sorted(folder.glob("*.yaml"))
        if not files:
            continue
        group = folder.relative_to(conf_dir).as_posix()
        prefix = tuple(group.split("/"))
        groups[group] = {"options": {f.stem: read_config(f, prefix) for f in files}}
    for group, info in groups.items():
        info["chosen"] = {name: _defaults_choices(p["defaults"])[group] for name, p in primaries.items()
                          if group in _defaults_choices(p["defaults"])}
    order = list(_defaults_choices(primaries["train"]["defaults"])) if "train" in primaries else []
    ranked = sorted(groups, key=lambda g: (order.index(g) if g in order else len(order), g))
    return {"groups": {g: groups[g] for g in ranked}, "primaries": primaries}


# -- the schema ------------------------------------------------------------------------------------

def _type_text(annotation) -> str:
    origin = typing.get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{_flow(v)}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in typing.get_args(annotation))
    if origin is list:
        args = typing.get_args(annotation)
        return f"list of {_type_text(args[0])}" if args else "list"
    if origin is dict or annotation is dict:
        return "mapping"
    names = {bool: "true / false", int: "integer", float: "number", str: "text"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field) -> list[str]:
    """A pydantic field's constraints as words (`>= 1`, `< 1`, `3 items`)."""
    out, length = [], {}
    for meta in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value:g}" if isinstance(value, (int, float)) else f"{sign} {value}")
        for attr in ("min_length", "max_length"):
            if getattr(meta, attr, None) is not None:
                length[attr] = getattr(meta, attr)
    if length:
        lo, hi = length.get("min_length"), length.get("max_length")
        if lo == hi:
            out.append(f"{lo} items")
        elif hi is None:
            out.append(f"at least {lo} item{'s' if lo != 1 else ''}")
        else:
            out.append(f"{lo or 0} to {hi} items")
    return out


def _model_of(annotation):
    from pydantic import BaseModel

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _walk_schema(model, prefix: str, out: dict) -> None:
    from pydantic_core import PydanticUndefined

    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _model_of(field.annotation)
        if nested is not None:
            _walk_schema(nested, f"{key}.", out)
            continue
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        has_default = not field.is_required() and default is not PydanticUndefined
        out[key] = {"allowed": ", ".join([_type_text(field.annotation), *_bounds(field)]),
                    "default": _flow(default) if has_default else None, "schema": model.__name__}


def schema_rules() -> dict[str, dict]:
    """{dotted key: allowed values, schema default, schema class} of every field the schema states:
    the composed train config (TrainSchema, which also checks the data group of defect-eval and
    defect-data) and predict.yaml's prediction_log."""
    from defect_detection import schema

    out: dict[str, dict] = {}
    _walk_schema(schema.TrainSchema, "", out)
    _walk_schema(schema.PredictionLogSchema, "prediction_log.", out)
    return out


# -- the commands behind the configs ---------------------------------------------------------------

def config_commands(root: Path = ROOT) -> dict[str, str]:
    """{primary config: command} from pyproject's [project.scripts] and each entry point's
    `@hydra.main(config_name=...)`."""
    out = {}
    for command, target in console_scripts(root).items():
        module = target.split(":")[0]
        source = root / "src" / Path(*module.split(".")).with_suffix(".py")
        found = re.search(r"config_name=\"([^\"]+)\"", source.read_text()) if source.is_file() else None
        if found:
            out[found.group(1)] = command
    return out


def console_scripts(root: Path = ROOT) -> dict[str, str]:
    """pyproject.toml's [project.scripts]: {command: module:function}."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(root / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"].get("scripts", {}))


# -- the page --------------------------------------------------------------------------------------

def _code(text: str) -> str:
    text = str(text)
    if "`" in text:
        return f"`` {text} ``"
    return f"`{text}`"


def _prose(text: str) -> str:
    """Comment text as inline Markdown: `code` spans kept, everything else escaped (a comment is
    text, not Markdown: `<run_id>`, `*.png` and `|` must show as typed)."""
    if "\\`" in text or text.count("`") % 2:
        parts = [text]
        spans = False
    else:
        parts = text.split("`")
        spans = True
    out = []
    for n, part in enumerate(parts):
        if spans and n % 2:
            out.append(_code(part))
            continue
        part = part.replace("\\", "\\\\").replace("`", "\\`")
        part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        for ch in "*_[]":
            part = part.replace(ch, "\\" + ch)
        out.append(part)
    return "".join(out).replace("|", "\\|")


def _header(lines: list[str]) -> list[str]:
    """A file's leading comment: prose as paragraphs, indented lines (command examples) as code."""
    out, prose, code = [], [], []

    def flush():
        if prose:
            out.extend([_prose(" ".join(prose)), ""])
            prose.clear()
        if code:
            out.extend(["```text", *code, "```", ""])
            code.clear()

    for line in lines:
        if line.startswith("  "):
            if prose:
                flush()
            code.append(line[2:] if line.startswith("  ") else line)
        else:
            if code:
                flush()
            prose.append(line.strip())
    flush()
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def group_anchor(group: str) -> str:
    return "group-" + _slug(group)


def option_anchor(group: str, option: str) -> str:
    return _slug(f"{group}-{option}")


def primary_anchor(name: str) -> str:
    return _slug(f"{name}-yaml")


def _key_table(keys: list[dict], rules: dict) -> list[str]:
    out = ["| Key | Default | Allowed | Description |", "| --- | --- | --- | --- |"]
    for k in keys:
        rule = rules.get(k["key"])
        allowed = rule["allowed"] if rule else ""
        note = _prose(k["note"]) if k["note"] else ""
        value = k["value"]
        if value == "???":
            note = ("**required** (pass it on the command line). " + note).strip()
        out.append(f"| {_code(k['key'])} | {_code(value)} | {_allowed_cell(allowed)} | {note} |")
    return out


def _allowed_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _option_refs(option: dict, group: str, groups: dict) -> list[str]:
    """What an option's own defaults list does: build on another option, or set other groups."""
    out, sets = [], []
    for entry in option["defaults"]:
        if isinstance(entry, str) and entry != "_self_":
            base = entry
            link = (f"[{_code(f'{group}={base}')}](#{option_anchor(group, base)})"
                    if base in groups.get(group, {}).get("options", {}) else
                    f"{_code(f'{group}/{base}')} (the installed Hydra plugin's config)")
            out.append(f"Builds on {link}: its keys apply unless set here.")
        elif isinstance(entry, dict):
            for target, choice in entry.items():
                name = str(target).removeprefix("override").strip().strip("/")
                if name in groups and choice in groups[name]["options"]:
                    sets.append(f"[{_code(f'{name}={choice}')}](#{option_anchor(name, choice)})")
                else:
                    sets.append(_code(f"{name}={choice}"))
    if sets:
        out.append("Sets " + ", ".join(sets) + ".")
    return out


def _unset_schema_keys(rules: dict, prefixes: Iterable[str], set_keys: set[str]) -> list[str]:
    """Schema fields under `prefixes` that no file sets, itself or below it (`data.records` is set
    through `data.records._target_`)."""
    prefixes = tuple(f"{p}." for p in prefixes)
    return sorted(k for k in rules if k.startswith(prefixes)
                  and not any(s == k or s.startswith(k + ".") for s in set_keys))


def _schema_only_table(keys: list[str], rules: dict, how: str) -> list[str]:
    if not keys:
        return []
    out = [f"Keys the schema accepts that no file sets (add one with {_code(how)}):", "",
           "| Key | Schema default | Allowed |", "| --- | --- | --- |"]
    for key in keys:
        rule = rules[key]
        default = _code(rule["default"]) if rule["default"] is not None else "required"
        out.append(f"| {_code(key)} | {default} | {_allowed_cell(rule['allowed'])} |")
    return [*out, ""]


def render(conf_dir: Path = CONF, root: Path = ROOT) -> str:
    """The whole Configuration reference page (Markdown)."""
    data = collect(conf_dir)
    rules = schema_rules()
    commands = config_commands(root)
    groups, primaries = data["groups"], data["primaries"]
    n_options = sum(len(g["options"]) for g in groups.values())
    set_keys = {k["key"] for g in groups.values() for o in g["options"].values() for k in o["keys"]}
    set_keys |= {k["key"] for p in primaries.values() for k in p["keys"]}
    out = [
        "# Configuration reference",
        "",
        f"Generated by `{SCRIPT}` from `conf/` and `src/defect_detection/schema.py` each time the site is",
        "built: it lists what the files of this version say, nothing written by hand. "
        f"{len(groups)} groups with {n_options} options, and the configs of "
        f"{len(primaries)} commands.",
        "",
        "Every command composes its config from the files below with Hydra: choose an option of a group",
        "with one word (`backbone=resnet18`), change any key with `key=value` (`data.batch_size=16`),",
        "add a key the config does not have with `+key=value`. Values are shown as written in the files:",
        "`${...}` are interpolations, resolved when the command runs (`${paths.output_dir}` is the",
        "run's own folder under `outputs/`); `???` means the command needs that key on its command line.",
        "Print what a command would run with, composed and resolved, with `--cfg job --resolve`",
        "(for example `defect-train backbone=resnet18 --cfg job --resolve`).",
        "",
        "**Allowed** comes from `src/defect_detection/schema.py`: every training run checks its composed",
        "config against it before any data is read and stops with one line per invalid value, naming the",
        "key, the value and what it accepts; `defect-eval` and `defect-data` check their `data` group the",
        "same way, and `defect-predict` checks its `prediction_log` section. An empty cell: the schema",
        "does not restrict the key (the description, the comment in the file, says what it takes).",
        "",
        "## The groups at a glance",
        "",
        "| Group | Options | Default in `train.yaml` |",
        "| --- | --- | --- |",
    ]
    for group, info in groups.items():
        options = ", ".join(f"[{_code(o)}](#{option_anchor(group, o)})" for o in info["options"])
        default = info["chosen"].get("train", "") if "train" in info["chosen"] else ""
        default_text = _code(_flow(default)) if "train" in info["chosen"] else "not in train.yaml"
        out.append(f"| [{_code(group)}](#{group_anchor(group)}) | {options} | {default_text} |")
    out += ["", "## The commands' configs", "",
            "Each command starts from its own file in `conf/`; its defaults list picks one option per group.",
            ""]
    for name, primary in primaries.items():
        command = commands.get(name)
        title = f"`{name}.yaml`" + (f": `{command}`" if command else "")
        out += [f"### {title} {{#{primary_anchor(name)}}}", ""]
        out += _header(primary["header"])
        chosen = _defaults_choices(primary["defaults"])
        if chosen:
            out += ["| Group | Default option |", "| --- | --- |"]
            for group, option in chosen.items():
                link = (f"[{_code(group)}](#{group_anchor(group)})" if group in groups else _code(group))
                if option is None:
                    shown = "`null` (none unless given: " + _code(f"{group}=<option>") + ")"
                elif group in groups and option in groups[group]["options"]:
                    shown = f"[{_code(option)}](#{option_anchor(group, option)})"
                else:
                    shown = _code(option)
                out.append(f"| {link} | {shown} |")
            out.append("")
        if primary["keys"]:
            out += _key_table(primary["keys"], rules) + [""]
        sections = {k["key"].split(".")[0] for k in primary["keys"] if "." in k["key"]} - set(groups)
        out += _schema_only_table(_unset_schema_keys(rules, sorted(sections), set_keys), rules,
                                  "+<key>=<value>")
    out += ["## Config groups", ""]
    for group, info in groups.items():
        prefix = group.replace("/", ".")
        out += [f"### `{group}` {{#{group_anchor(group)}}}", ""]
        uses = [f"{_code(f'{n}.yaml')}: {_code(_flow(c))}" for n, c in info["chosen"].items()]
        lines = [f"Choose with {_code(f'{group}=<option>')}; its keys live under {_code(prefix + '.')} "
                 "unless an option says otherwise."]
        if uses:
            lines.append("Default option: " + "; ".join(uses) + ".")
        else:
            lines.append("No command's config picks an option: it applies only when given.")
        out += [" ".join(lines), ""]
        for option_name, option in info["options"].items():
            out += [f"#### `{group}={option_name}` {{#{option_anchor(group, option_name)}}}", ""]
            out += _header(option["header"])
            notes = []
            if option["package"] == "_global_":
                notes.append("Its keys are global (`# @package _global_`): they set any part of the config.")
            notes += _option_refs(option, group, data["groups"])
            if notes:
                out += [" ".join(notes), ""]
            if option["keys"]:
                out += _key_table(option["keys"], rules) + [""]
            else:
                out += ["Sets no keys of its own.", ""]
        out += _schema_only_table(_unset_schema_keys(rules, [prefix], set_keys), rules,
                                  f"+{prefix}.<key>=<value>")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the page here (default: print it)")
    args = parser.parse_args(argv)
    text = render()
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
