"""The README lists every setting and shows the two commands a newcomer runs."""
from dataclasses import fields
from pathlib import Path

from worker.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    missing = [f.metadata["variable"] for f in fields(Settings) if f"`{f.metadata['variable']}`" not in README]
    assert not missing, f"README.md lacks {missing}: paste Settings.describe() into its Settings section"


def test_the_readme_shows_make_demo_and_make_test():
    assert "make demo" in README and "make test" in README
