"""The book's configuration: one repository URL, every chapter in the table of contents, the
README's test command equal to CI's, and the offline build step (tools/offline_book.py)."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import posixpath
import re
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from docutils import nodes
from sphinx.errors import ExtensionError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import offline_book  # noqa: E402

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
CLONE = re.compile(r"git clone\b[^\n]*?(?:\s|\\\n)+(https?://\S+)")
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^\s)\"']+")


def repository() -> tuple[str, str, str]:
    """(url, "owner/name", branch) from ``_config.yml``'s ``repository``."""
    repo = CONFIG["repository"]
    match = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?", repo["url"])
    assert match, f"repository.url {repo['url']!r} is not https://github.com/OWNER/NAME"
    return repo["url"].rstrip("/"), match.group(1), repo.get("branch", "main")


def toc_files() -> list[str]:
    """Every file ``_toc.yml`` names (root, chapters, sections), without suffix."""
    files, stack = [TOC["root"]], list(TOC.get("chapters", []))
    for part in TOC.get("parts", []):
        stack += part.get("chapters", [])
    while stack:
        entry = stack.pop(0)
        files.append(entry["file"])
        stack[:0] = entry.get("sections", [])
    return files


def notebook_problems(notebook: dict, docname: str) -> list[str]:
    """Where a chapter's Colab badge (first cell) or ``git clone`` disagrees with _config.yml."""
    url, slug, branch = repository()
    in_repo = posixpath.join(CONFIG["repository"].get("path_to_book") or "", f"{docname}.ipynb")
    expected = f"https://colab.research.google.com/github/{slug}/blob/{branch}/{in_repo}"
    cells = notebook["cells"]
    problems = []
    first = "".join(cells[0]["source"]) if cells else ""
    if expected not in COLAB_LINK.findall(first):
        problems.append(f"the first cell has no Colab badge linking {expected}")
    for cell in cells:
        source = "".join(cell["source"])
        problems += [f"Colab link {link} is not {expected}" for link in COLAB_LINK.findall(source)
                     if link != expected]
        if cell["cell_type"] == "code":
            problems += [f"git clone of {clone}, not {url}" for clone in CLONE.findall(source)
                         if clone.removesuffix(".git").rstrip("/") != url]
    if not any(CLONE.findall("".join(c["source"])) for c in cells if c["cell_type"] == "code"):
        problems.append("no code cell clones the repository (for Colab)")
    return problems


NOTEBOOKS = [f for f in toc_files() if (ROOT / f"{f}.ipynb").exists()]


@pytest.mark.parametrize("docname", NOTEBOOKS)
def test_badge_and_clone_name_the_configured_repository(docname: str) -> None:
    notebook = json.loads((ROOT / f"{docname}.ipynb").read_text())
    assert notebook_problems(notebook, docname) == []


# Monospace characters a code block shows without scrolling in a 1280-pixel-wide window
# (684-pixel column, 14-pixel font: 77 fit); book/_static/offline.css wraps longer lines.
CODE_COLUMNS = 76
FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.S | re.M)


def long_code_lines(cells: list[dict]) -> list[str]:
    """Lines of code cells, and of fenced blocks in markdown, wider than ``CODE_COLUMNS``."""
    found = []
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        code = source if cell["cell_type"] == "code" else "\n".join(FENCE.findall(source))
        found += [f"cell {i}: {line[:50]}... ({len(line)} characters)"
                  for line in code.splitlines() if len(line) > CODE_COLUMNS]
    return found


@pytest.mark.parametrize("docname", toc_files())
def test_code_fits_the_column(docname: str) -> None:
    """Readers see every code line whole at a laptop's width (tests/test_browser.py: no scrolling)."""
    path = ROOT / f"{docname}.ipynb"
    if path.exists():
        cells = json.loads(path.read_text())["cells"]
    else:
        cells = [{"cell_type": "markdown", "source": [(ROOT / f"{docname}.md").read_text()]}]
    assert long_code_lines(cells) == []


def test_long_code_line_check_sees_code_and_fenced_blocks() -> None:
    wide = "x = " + "1 + " * 20 + "1"
    assert long_code_lines([{"cell_type": "code", "source": ["y = 1\n", wide]}])
    assert long_code_lines([{"cell_type": "markdown", "source": [f"text\n```python\n{wide}\n```\n"]}])
    assert not long_code_lines([{"cell_type": "markdown", "source": [f"prose {wide}"]}])
    assert not long_code_lines([{"cell_type": "code", "source": ["y = 1\n# short"]}])


def test_notebook_check_catches_another_repository() -> None:
    """The oracle for the check above: a badge or a clone of another repository is reported."""
    url, slug, branch = repository()
    badge = f"[![Open In Colab](x.svg)](https://colab.research.google.com/github/{slug}/blob/{branch}/book/ch.ipynb)"
    clone = f"!git clone -q --depth 1 {url} /content/bcbook"

    def nb(first: str, code: str) -> dict:
        return {"cells": [{"cell_type": "markdown", "source": [first]}, {"cell_type": "code", "source": [code]}]}

    assert notebook_problems(nb(badge, clone), "book/ch") == []
    assert notebook_problems(nb(badge.replace(slug, "someone/fork"), clone), "book/ch")
    assert notebook_problems(nb(badge, clone.replace(slug, "someone/fork")), "book/ch")
    assert notebook_problems(nb(badge, "import bclib"), "book/ch")


def test_toc_lists_every_chapter_and_only_existing_files() -> None:
    listed = toc_files()
    pages = sorted(p.relative_to(ROOT).with_suffix("").as_posix()
                   for p in (ROOT / "book").glob("*") if p.suffix in (".ipynb", ".md"))
    assert sorted(set(listed)) == pages, "every book/*.ipynb and book/*.md is a page of _toc.yml"
    assert len(listed) == len(set(listed)), "a file is listed twice in _toc.yml"


def test_launch_buttons_use_the_repository() -> None:
    """The Binder and Colab buttons are built from repository.url: both need their services set."""
    repository()
    buttons = CONFIG["launch_buttons"]
    assert buttons["binderhub_url"].startswith("https://") and buttons["colab_url"].startswith("https://")
    assert CONFIG["html"]["use_repository_button"] is True


def test_readme_test_command_is_the_one_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Run the tests.*?\n```bash\n(.+?)\n```", readme, re.S)
    assert block, "README.md has a 'Run the tests' section with one bash block"
    command = block.group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f".ci/run does not run the README's test command:\n{command}"


def test_config_loads_nothing_from_a_cdn() -> None:
    sphinx = CONFIG["sphinx"]
    assert "mathjax_path" not in sphinx["config"], "sphinx-mathjax-offline sets mathjax_path"
    assert "sphinx-mathjax-offline" in sphinx["extra_extensions"]
    assert "offline_book" in sphinx["local_extensions"]
    for path in sphinx["config"]["nb_ipywidgets_js"]:
        assert not offline_book._is_remote(path), path
    assert sphinx["config"]["nb_render_markdown_format"] == "myst"


# --- tools/offline_book.py, without the network --------------------------------------------

def _tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _asset(data: bytes, members: tuple[str, ...]) -> offline_book.NpmAsset:
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    return offline_book.NpmAsset("@scope/pkg", "1.2.3", digest, "pkg", members)


def test_cached_tarball_is_checked_and_its_members_extracted(tmp_path: Path) -> None:
    data = _tarball({"dist/embed.js": b"js", "dist/a.woff2": b"font", "dist/a.js.map": b"map",
                     "src/embed.ts": b"ts"})
    asset = _asset(data, ("dist/embed.js", "dist/*.woff2"))
    (tmp_path / "scope-pkg-1.2.3.tgz").write_bytes(data)  # cached: npm is not called
    written = offline_book.extract(asset, offline_book.npm_pack(asset, tmp_path), tmp_path / "static")
    assert sorted(written) == ["vendor/pkg/a.woff2", "vendor/pkg/embed.js"]
    assert (tmp_path / "static/vendor/pkg/embed.js").read_bytes() == b"js"


def test_tampered_tarball_and_missing_member_are_refused(tmp_path: Path) -> None:
    data = _tarball({"dist/embed.js": b"js"})
    asset = _asset(data, ("dist/embed.js", "dist/other.js"))
    (tmp_path / "scope-pkg-1.2.3.tgz").write_bytes(data + b"x")
    with pytest.raises(ExtensionError, match="pinned sha512"):
        offline_book.npm_pack(asset, tmp_path)
    (tmp_path / "scope-pkg-1.2.3.tgz").write_bytes(data)
    with pytest.raises(ExtensionError, match="lacks"):
        offline_book.extract(asset, tmp_path / "scope-pkg-1.2.3.tgz", tmp_path / "static")


def test_remote_scripts_fail_the_build(tmp_path: Path) -> None:
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static/w.js").write_text("")
    good = dict(mathjax_path="mathjax/tex-chtml.js", html_static_path=["_static"],
                nb_ipywidgets_js={"w.js": {}}, html_js_files=[], html_css_files=["a.css"])
    offline_book.check_local(SimpleNamespace(**good), tmp_path)
    for bad in ({"mathjax_path": "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"},
                {"nb_ipywidgets_js": {"https://cdn.jsdelivr.net/npm/x/embed-amd.js": {}}},
                {"nb_ipywidgets_js": {"missing.js": {}}},
                {"html_css_files": ["https://cdn.example.org/a.css"]}):
        with pytest.raises(ExtensionError):
            offline_book.check_local(SimpleNamespace(**{**good, **bad}), tmp_path)


def test_badge_and_fontawesome_link_become_local() -> None:
    doc = nodes.document(None, None)
    remote = next(iter(offline_book.LOCAL_IMAGES))
    doc += nodes.image(uri=remote)
    doc += nodes.image(uri="https://example.org/other.png")
    html = '<link rel="stylesheet"\nhref="https://maxcdn.bootstrapcdn.com/font-awesome/4.4.0/css/font-awesome.min.css">\n<div class="animation"></div>'
    doc += nodes.raw("", html, format="html")
    offline_book.localise_images(None, doc, "book/01_mdl")
    offline_book.drop_cdn_links(None, doc, "book/01_mdl")
    assert [i["uri"] for i in doc.findall(nodes.image)] == ["../_static/colab-badge.svg", "https://example.org/other.png"]
    assert [r.astext() for r in doc.findall(nodes.raw)] == ['<div class="animation"></div>']
