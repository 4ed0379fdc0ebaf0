"""The option tables in docs/ are generated from the option schema: a drifted table fails here."""

from pathlib import Path

import pytest

from eaft_plugins.tools import doc_tables
from eaft_plugins.options import SETTINGS

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("page, kind", [("loss.md", "loss"), ("loss.md", "methods"),
                                        ("llamafactory.md", "llamafactory"), ("swift.md", "swift"), ("megatron.md", "swift"),
                                        ("trl.md", "trl")])
def test_every_options_table_is_the_schema(page, kind):
    text = (DOCS / page).read_text(encoding="utf-8")
    assert f"<!-- options table: {kind}" in text, f"{page} lost its generated options table"
    assert doc_tables.render(text) == text, f"{page}: run `python -m eaft_plugins.tools.doc_tables` to regenerate"


def test_a_table_lists_every_setting_with_its_help():
    swift = doc_tables.table("swift")
    for s in SETTINGS:
        assert f"| `--{s.key}` | `{s.default_text}` |" in swift and s.help.replace("|", "\\|") in swift
    loss = doc_tables.table("loss")
    assert "| `ignore_index` | `-100` |" in loss and "`eaft_fused`" not in loss  # loss options only


def test_render_replaces_a_stale_table():
    stale = "x\n<!-- options table: swift -->\n| old |\n<!-- end of options table -->\ny"
    new = doc_tables.render(stale)
    assert "| old |" not in new and "`--eaft_topk`" in new and new.startswith("x\n") and new.endswith("y")


def test_loss_md_names_every_statistic_sum():
    from eaft_plugins.stats import _FIELDS

    text = (DOCS / "loss.md").read_text(encoding="utf-8")
    assert f"of {['no', 'one', 'two', 'three', 'four', 'five', 'six', 'seven'][len(_FIELDS)]} float64" in text
    for name in _FIELDS:
        assert f"`{name}`" in text, name


def test_every_doc_a_script_or_page_cites_exists():
    import re

    root = DOCS.parent
    sources = list((root / "scripts").glob("*.sh")) + list(DOCS.glob("*.md")) + [root / "README.md"]
    for path in sources:
        for cited in re.findall(r"\bdocs/[\w.-]+\.md\b", path.read_text(encoding="utf-8")):
            assert (root / cited).is_file(), f"{path.name} cites {cited}, which does not exist"


def test_the_families_table_is_the_stored_family_sweeps():
    text = (DOCS / "performance.md").read_text(encoding="utf-8")
    assert "<!-- families table -->\n" in text, "performance.md lost its generated families table"
    assert doc_tables.render(text) == text, "performance.md: run `python -m eaft_plugins.tools.doc_tables`"
    for version in ("5.6.0", "5.19.0", "5.24.0"):  # the transformers of .venv, .venv-swift, .venv-trl
        assert f"| {version} |" in text, version


def test_main_rewrites_a_stale_table_in_the_folder_it_is_given(tmp_path, capsys):
    (tmp_path / "page.md").write_text("x\n<!-- options table: loss -->\n| old |\n<!-- end of options table -->\n")
    (tmp_path / "current.md").write_text(doc_tables.render("<!-- options table: trl -->\n<!-- end of options table -->"))
    assert doc_tables.main([str(tmp_path)]) == 0
    assert "`ignore_index`" in (tmp_path / "page.md").read_text()
    assert capsys.readouterr().out == f"rewrote {tmp_path / 'page.md'}\n"  # the current page is left alone


def test_a_missing_docs_folder_is_an_error(tmp_path, monkeypatch, capsys):
    assert doc_tables.DOCS == DOCS  # by default, the checkout's docs/
    assert doc_tables.main([str(tmp_path / "nowhere")]) == 2
    assert "no docs folder at" in capsys.readouterr().err
    monkeypatch.setattr(doc_tables, "DOCS", tmp_path / "docs")  # an installed package: no docs/ beside it
    assert doc_tables.main([]) == 2
    err = capsys.readouterr().err
    assert "not a source checkout" in err and "pass the docs folder" in err


def test_help_prints_usage_not_a_missing_folder(capsys):
    with pytest.raises(SystemExit) as stop:
        doc_tables.main(["--help"])
    assert stop.value.code == 0 and "docs folder" in capsys.readouterr().out
