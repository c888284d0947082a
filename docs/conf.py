"""Sphinx configuration: MyST pages, API reference from the docstrings."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

from sphinx.pycode import ModuleAnalyzer  # noqa: E402

import jaxsce  # noqa: E402

project = "jaxsce"
author = "the jaxsce developers"
copyright = "2026, the jaxsce developers"
release = version = jaxsce.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]

autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"jaxsce {release}"


# The functions whose return type follows a flag (``return_aux``,
# ``return_entropy``) carry ``typing.overload``s for type checkers. Autodoc
# would print those (``**options``) instead of the full signature; the API
# pages show the implementation's signature, every option by name.
_analyze = ModuleAnalyzer.analyze


def _analyze_without_overloads(self):
    _analyze(self)
    if self.modname.startswith("jaxsce"):
        self.overloads = {}


ModuleAnalyzer.analyze = _analyze_without_overloads
