"""MkDocs hooks (mkdocs.yml `hooks:`): the generated reference and the checks that keep pages honest.

- reference/configs.md is generated at build time by scripts/config_reference.py from conf/ and the
  schema of this checkout (never a file in docs/: what the site shows is what the configs say).
- reference/commands.md must have a "## `defect-...`" section for every command of pyproject's
  [project.scripts], and none for a command that is gone: the build fails otherwise.
- The Results section of the nav lists results/index.md and then every other docs/results/*.md,
  so a new measured page is on the site the moment it is added (mkdocs.yml names the rest).
- `mkdocs serve` also watches conf/, the schema, the generator and pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
GENERATED = "reference/configs.md"
COMMANDS_PAGE = "reference/commands.md"
RESULTS_SECTION = "Results"


def _generator():
    """scripts/config_reference.py as a module (the scripts are not a package), with this checkout's
    src/ first on the path so the schema documented is the one beside the configs."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    name = "config_reference"  # loaded afresh each time: `mkdocs serve` picks up an edited generator
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def on_config(config):
    """Results: index first, then every measured page in docs/results/ not already listed."""
    docs = Path(config["docs_dir"])
    for entry in config["nav"] or []:
        if isinstance(entry, dict) and RESULTS_SECTION in entry:
            section = entry[RESULTS_SECTION]
            listed = {next(iter(e.values())) if isinstance(e, dict) else e for e in section}
            pages = sorted(p.relative_to(docs).as_posix() for p in (docs / "results").glob("*.md"))
            section.extend(p for p in pages if p not in listed)
    return config


def on_files(files, config):
    """reference/configs.md, generated from conf/ and the schema (replaces any stray copy)."""
    stray = files.get_file_from_path(GENERATED)
    if stray is not None:
        files.remove(stray)
    files.append(File.generated(config, GENERATED, content=_generator().render()))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == COMMANDS_PAGE:
        documented = set(re.findall(r"^## `(defect-[\w-]+)`", markdown, flags=re.MULTILINE))
        commands = set(_generator().console_scripts(ROOT))
        missing, stale = sorted(commands - documented), sorted(documented - commands)
        if missing or stale:
            raise PluginError(
                f"{COMMANDS_PAGE}: every command of pyproject.toml's [project.scripts] needs a "
                f"'## `<command>`' section; missing: {missing or 'none'}, not a command: {stale or 'none'}")
    return markdown


def on_serve(server, config, builder):
    for path in ("conf", "src/defect_detection/schema.py", "scripts/config_reference.py", "pyproject.toml"):
        server.watch(str(ROOT / path))
    return server
