"""The docs site stays true to the code: every config option and key is in the generated reference,
every command has its section, every nav page exists; `mkdocs build --strict` passes (slow)."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from defect_detection import project_root
from tests.conftest import load_script

ROOT = project_root()
CONF = ROOT / "conf"
DOCS = ROOT / "docs"
GENERATED = "reference/configs.md"  # made by docs/hooks/reference.py at build time, not a file


@pytest.fixture(scope="module")
def generator():
    return load_script("config_reference")


@pytest.fixture(scope="module")
def page(generator) -> str:
    return generator.render()


def _leaf_keys(node, prefix=()):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaf_keys(value, (*prefix, str(key)))
    else:
        yield ".".join(prefix)


def _package(path: Path) -> str | None:
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            return None
        if line.lstrip("# ").startswith("@package"):
            return line.split("@package", 1)[1].strip()
    return None


def _keys_of(path: Path, prefix: str) -> list[str]:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    data.pop("defaults", None)
    package = _package(path)
    if package is not None:
        prefix = "" if package == "_global_" else package
    return [f"{prefix}.{k}" if prefix else k for k in _leaf_keys(data)]


def _row(page: str, key: str) -> list[str]:
    return [line for line in page.splitlines() if line.startswith(f"| `{key}` |")]


def test_every_group_option_and_key_is_in_the_reference(page):
    options = keys = 0
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group == ".":  # a command's own config
            assert f"### `{path.stem}.yaml`" in page, path
            prefix = ""
        else:
            assert f"#### `{group}={path.stem}`" in page, f"option {group}={path.stem} missing"
            options += 1
            prefix = group.replace("/", ".")
        for key in _keys_of(path, prefix):
            assert _row(page, key), f"{key} ({path.relative_to(ROOT)}) missing from the reference"
            keys += 1
    assert options > 50 and keys > 300  # the whole of conf/, not an empty walk


def test_the_reference_shows_defaults_as_written_and_the_train_defaults(page):
    assert "| `data.categories` | `[disc, plate, mesh]` |" in page  # data=synthetic
    uri = '${oc.env:MLFLOW_TRACKING_URI,"sqlite:///${paths.mlruns_dir}/mlflow.db"}'
    assert f"| `tracking_uri` | `{uri}` |" in page  # an interpolation as written, not resolved
    train = yaml.safe_load((CONF / "train.yaml").read_text())["defaults"]
    for entry in train:
        if isinstance(entry, dict):
            (group, option), = entry.items()
            shown = "`null`" if option is None else f"`{option}`"
            line = next(ln for ln in page.splitlines() if ln.startswith(f"| [`{group}`](#group-"))
            assert line.endswith(f"| {shown} |"), line


def test_allowed_values_come_from_the_schema(page):
    from defect_detection import schema

    fields = {f"threshold.{k}": f for k, f in schema.ThresholdSchema.model_fields.items()}
    fields |= {f"loss.{k}": f for k, f in schema.LossSchema.model_fields.items()}
    fields |= {f"input.{k}": f for k, f in schema.InputSchema.model_fields.items()}
    checked = 0
    for key, field in fields.items():
        if typing.get_origin(field.annotation) is typing.Literal:
            rows = _row(page, key)
            assert rows, key
            for value in typing.get_args(field.annotation):
                assert all(f"`{value}`" in row for row in rows), (key, value)
            checked += 1
    assert checked >= 3
    assert "number, > 0, <= 10" in _row(page, "optimizer.lr")[0]
    # a key the schema accepts with a default but no file sets is listed too
    assert "| `threshold.fallback` | `0.5` |" in page


def test_comments_become_descriptions(page):
    tie = _row(page, "auto.tie_se")[0]
    assert "standard errors" in tie and "first of them" in tie  # the comment continued on the next line
    assert "Image score from tile scores" in _row(page, "input.aggregate.how")[0]  # its mapping's comment
    assert "runs:/&lt;id&gt;/model" in page  # comment text escaped, not read as HTML


def test_the_reference_is_deterministic(generator, page):
    assert generator.render() == page


def test_every_command_has_its_section(generator):
    scripts = generator.console_scripts(ROOT)  # pyproject.toml's [project.scripts]
    text = (DOCS / "reference" / "commands.md").read_text()
    documented = set(re.findall(r"^## `(defect-[\w-]+)`", text, flags=re.MULTILINE))
    assert set(scripts) == documented


def _nav_paths(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_paths(value)]
    if isinstance(node, list):
        return [p for item in node for p in _nav_paths(item)]
    return []


def _mkdocs_config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # !relative, !ENV
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def test_every_nav_page_exists():
    config = _mkdocs_config()
    paths = _nav_paths(config["nav"])
    assert GENERATED in paths and "reference/commands.md" in paths and "results/index.md" in paths
    missing = [p for p in paths if p != GENERATED and not (DOCS / p).is_file()]
    assert not missing, f"in mkdocs.yml's nav but not in docs/: {missing}"
    assert not (DOCS / GENERATED).exists(), f"docs/{GENERATED} is generated at build time; delete the file"


def test_the_hook_refuses_a_commands_page_missing_a_command():
    pytest.importorskip("mkdocs")
    import importlib.util

    from mkdocs.exceptions import PluginError

    spec = importlib.util.spec_from_file_location("docs_hook", DOCS / "hooks" / "reference.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    page = type("Page", (), {"file": type("File", (), {"src_uri": "reference/commands.md"})()})()
    text = (DOCS / "reference" / "commands.md").read_text()
    assert hook.on_page_markdown(text, page, None, None) == text
    with pytest.raises(PluginError, match="defect-monitor"):
        hook.on_page_markdown(text.replace("## `defect-monitor`", "## defect monitor"), page, None, None)


@pytest.mark.slow
def test_the_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
               "-d", str(tmp_path / "site")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "configs" / "index.html").is_file()
