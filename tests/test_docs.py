"""The documentation: the site builds strictly, result tables come from the benchmark files, links resolve, and
every option a page shows exists in its command."""

from __future__ import annotations

import configparser
import importlib
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
STAMP = {"commit", "date", "host", "torch"}


def commands() -> dict[str, str]:
    """Console script -> 'module:function', from setup.cfg."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def documented_calls(text: str) -> list[tuple[str, set[str]]]:
    """(command, options) of every fsseg command line in the page's code blocks: continuation lines (after a
    backslash, or indented) joined, comments and what follows ``&&`` or ``;`` left out."""
    calls = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        block = re.sub(r"\\?\n[ \t]+", " ", block.replace("\\\n", "\n "))
        for line in block.splitlines():
            line = re.split(r"\s#\s", line)[0]
            for command, rest in re.findall(r"\b(fsseg-[a-z-]+)((?:\s+(?!&&|;)\S+)*)", line):
                calls.append((command, set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest))))
    return calls


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (make test installs it)")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "benchmarks" / "index.html").is_file()


def test_the_result_tables_are_generated_from_the_benchmark_files():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "render_docs.py"), "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    readme = (REPO / "README.md").read_text()
    assert re.search(
        r"<!-- results:fewshot_real -->\n.*\| `affine-ln` \|.*<!-- /results:fewshot_real -->", readme, re.S
    )


def test_each_benchmark_has_one_result_file_whose_rows_say_where_they_were_measured():
    for path in sorted((REPO / "bench" / "results").glob("*.json")):
        document = json.loads(path.read_text())
        assert document["benchmark"] == path.stem and document["question"] and document["command"]
        unstamped = [row for row in document["rows"] if not STAMP <= set(row)]
        assert document["rows"] and not unstamped, path.name
        assert (REPO / "bench" / f"{path.stem}.py").is_file(), f"{path.name} has no benchmark script"


def test_the_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (REPO / target).exists(), target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_option_a_page_shows_exists_in_its_command(page, capsys):
    entry_points = commands()
    for command, options in documented_calls(page.read_text()):
        assert command in entry_points, f"{page.name}: {command} is not a command"
        module, function = entry_points[command].split(":")
        with pytest.raises(SystemExit):
            getattr(importlib.import_module(module), function)(["--help"])
        known = set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))
        assert options <= known, f"{page.name}: {command} has no {', '.join(sorted(options - known))}"
