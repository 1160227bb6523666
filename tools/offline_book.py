"""Sphinx extension: a built book that loads nothing from outside its own folder.

MathJax comes from the PyPI package ``sphinx-mathjax-offline`` (listed in ``_config.yml``).
This extension supplies the rest of what a page with maths, widgets and badges loads:

- the widget manager ``@jupyter-widgets/html-manager`` (``embed-amd.js`` and the fonts it
  loads from its own folder) and ``require.js``, which MyST-NB's ``nb_ipywidgets_js`` names.
  They are fetched with ``npm pack`` at pinned versions, checked against pinned sha512
  digests and served from ``_static/vendor``; the tarballs are cached beside the HTML output
  (``<path-output>/_build/offline-assets``), so only a fresh build folder reaches npm;
- a local copy of the Colab badge, in place of the remote image the chapters' first cells name;
- animations without matplotlib's CDN stylesheet: ``to_jshtml()`` links FontAwesome 4 for its
  button icons; the theme's own FontAwesome 6 (``_static/scripts/fontawesome.js``) draws them;
- each script once per page (see :func:`drop_repeated_scripts`);
- a build-wide figure default: every chapter's kernel starts with high-dpi ("retina") inline
  PNGs, via an IPython profile in the build folder (``IPYTHONDIR``).

The build fails, with what to change, when a configured script or stylesheet is remote.
"""
from __future__ import annotations

import base64
import hashlib
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError

VENDOR = "vendor"  # folder under _static holding the npm files


@dataclass(frozen=True)
class NpmAsset:
    """Files taken from one pinned npm package into ``_static/vendor/<folder>``."""

    name: str
    version: str
    integrity: str  # the registry's dist.integrity of this version (sha512, base64)
    folder: str
    members: tuple[str, ...]  # paths inside the tarball's package/ folder; "dir/*.ext" globs

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


FONT_GLOBS = tuple(f"dist/*.{ext}" for ext in ("woff2", "woff", "ttf", "eot", "svg"))
NPM_ASSETS = (
    # BSD-3-Clause; embed-amd.js resolves its fonts relative to its own URL
    NpmAsset("@jupyter-widgets/html-manager", "1.0.15",
             "sha512-5thBIV6ymNgmPVOHvzx+gGy8ZSKmSazhtGw4/c4xJDVzRhG9PTeQsRjF3FUTopvFi//SABeNz1yp47bCrJ3CQA==",
             "html-manager", ("package.json", "dist/embed-amd.js", "dist/embed.js.LICENSE.txt") + FONT_GLOBS),
    # MIT (licence header in require.js)
    NpmAsset("requirejs", "2.3.8",
             "sha512-7/cTSLOdYkNBNJcDMWf+luFvMriVm7eYxp4BcFCsAX0wF421Vyce5SXP17c+Jd5otXKGNehIonFlyQXSowL6Mw==",
             "requirejs", ("package.json", "require.js")),
)

# Remote images named in the notebooks -> files in the book's own _static.
LOCAL_IMAGES = {"https://colab.research.google.com/assets/colab-badge.svg": "colab-badge.svg"}

# The stylesheet link matplotlib's HTMLWriter (Animation.to_jshtml) puts before each animation.
JSHTML_FONTAWESOME = re.compile(
    r'<link rel="stylesheet"\s+href="https://maxcdn\.bootstrapcdn\.com/font-awesome/[^"]*">\s*')

KERNEL_CONFIG = "c.InlineBackend.figure_formats = {'retina'}\n"


def _is_remote(path: str) -> bool:
    return path.startswith(("http://", "https://", "//"))


def _sha512(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def npm_pack(asset: NpmAsset, cache: Path) -> Path:
    """The package's tarball in ``cache``, fetched with ``npm pack`` unless already there."""
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / (asset.name.lstrip("@").replace("/", "-") + f"-{asset.version}.tgz")
    if not tarball.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise ExtensionError(
                f"offline_book: npm is needed once per build folder to fetch {asset.spec} "
                f"(served from the book's _static); install it (Debian: apt-get install npm) "
                f"or put the tarball at {tarball}")
        done = subprocess.run([npm, "pack", asset.spec, "--silent", "--pack-destination", str(cache)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not tarball.exists():
            raise ExtensionError(f"offline_book: `npm pack {asset.spec}` failed: {done.stderr.strip()}")
    if _sha512(tarball) != asset.integrity:
        raise ExtensionError(f"offline_book: {tarball} does not match the pinned sha512 of "
                             f"{asset.spec}; delete it to fetch it again")
    return tarball


def extract(asset: NpmAsset, tarball: Path, static: Path) -> list[str]:
    """Copy the asset's members into ``static/vendor/<folder>``; their paths under ``static``."""
    target = static / VENDOR / asset.folder
    written = []
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            inner = member.name.removeprefix("package/")
            if not member.isfile() or not any(
                    posixpath.dirname(inner) == posixpath.dirname(m)
                    and Path(inner).match(posixpath.basename(m)) for m in asset.members):
                continue
            out = target / posixpath.basename(inner)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(out.suffix + ".tmp")
            tmp.write_bytes(tar.extractfile(member).read())
            os.replace(tmp, out)  # atomic: a reader never sees half a file
            written.append(out.relative_to(static).as_posix())
    missing = [m for m in asset.members if "*" not in m and f"{VENDOR}/{asset.folder}/{posixpath.basename(m)}" not in written]
    if missing:
        raise ExtensionError(f"offline_book: {asset.spec} lacks {missing}; update NPM_ASSETS")
    return written


def check_local(config: Config, confdir: Path) -> None:
    """Fail when a script or stylesheet the pages load is remote or not in ``html_static_path``."""
    if _is_remote(config.mathjax_path):
        raise ExtensionError(f"offline_book: mathjax_path is remote ({config.mathjax_path}); remove "
                             "it from _config.yml: sphinx-mathjax-offline serves MathJax")
    statics = [confdir / folder for folder in config.html_static_path]
    for path in config.nb_ipywidgets_js:
        if _is_remote(path) or not any((folder / path).is_file() for folder in statics):
            raise ExtensionError(f"offline_book: nb_ipywidgets_js names {path!r}, which is not a "
                                 f"file in html_static_path {config.html_static_path}")
    for entry in list(config.html_js_files) + list(config.html_css_files):
        path = entry[0] if isinstance(entry, tuple) else entry
        if _is_remote(path):
            raise ExtensionError(f"offline_book: {path} is remote; serve it from _static instead")


def write_kernel_profile(build: Path) -> Path:
    """An IPython folder whose kernel profile sets the build's figure default."""
    ipython = build / "ipython"
    profile = ipython / "profile_default"
    profile.mkdir(parents=True, exist_ok=True)
    config = profile / "ipython_kernel_config.py"
    tmp = config.with_suffix(".tmp")
    tmp.write_text(KERNEL_CONFIG)
    os.replace(tmp, config)
    return ipython


def on_config_inited(app: Sphinx, config: Config) -> None:
    build = Path(app.outdir).parent  # <path-output>/_build
    cache = build / "offline-assets"
    static = cache / "static"
    for asset in NPM_ASSETS:
        extract(asset, npm_pack(asset, cache / "npm"), static)
    config.html_static_path.append(str(static))
    check_local(config, Path(app.confdir))
    os.environ["IPYTHONDIR"] = str(write_kernel_profile(build))  # the kernels inherit it


def localise_images(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    """Point remote badge images at the book's own copies in ``_static``."""
    for image in doctree.findall(nodes.image):
        local = LOCAL_IMAGES.get(image["uri"])
        if local is not None:
            image["uri"] = posixpath.relpath(f"_static/{local}", posixpath.dirname(docname) or ".")


def drop_cdn_links(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    """Remove the FontAwesome CDN link from raw HTML outputs (jshtml animations)."""
    for raw in list(doctree.findall(nodes.raw)):
        text = raw.astext()
        if "html" in raw.get("format", "").split() and JSHTML_FONTAWESOME.search(text):
            local = raw.copy()  # the attributes, not the text
            local += nodes.Text(JSHTML_FONTAWESOME.sub("", text))
            raw.replace_self(local)


def drop_repeated_scripts(app: Sphinx, pagename: str, templatename: str,
                          context: dict[str, Any], doctree: nodes.document | None) -> None:
    """Keep the first of identical scripts: sphinx-thebe adds its inline ``const`` settings
    once per read phase, and a second copy is a JavaScript error on every page."""
    seen, unique = set(), []
    for script in context.get("script_files", []):
        # an inline script's filename is None or "" depending on who added it
        key = (getattr(script, "filename", script) or "", tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"][:] = unique  # in place: later handlers append to this list


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("config-inited", on_config_inited, priority=900)  # after MyST-NB's own defaults
    app.connect("doctree-resolved", localise_images)
    app.connect("doctree-resolved", drop_cdn_links)
    # early: a handler that returns a template name ends the event for those after it
    app.connect("html-page-context", drop_repeated_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
