"""The README starts where a user starts, and its commands are the ones that run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_two_commands_come_right_after_what_the_project_is():
    lines = README.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("make train"))
    assert first < 45 and lines[first + 1].startswith("make test")
    assert "## Usage" in "\n".join(lines[first:first + 30])  # then the usage example


def test_every_local_link_of_the_readme_and_docs_exists():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_ci_runs_the_readmes_test_command_and_make_test_shows_progress_and_the_slowest():
    assert "make test" in README and (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
    test_target = re.search(r"(?m)^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text()).group(1)
    assert "--durations=" in test_target and "console_output_style=progress" in test_target


def test_the_suite_time_is_stated_not_left_as_a_placeholder():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        assert "TODO-SUITE-TIME" not in page.read_text(), page.name
