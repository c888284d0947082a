"""Sphinx configuration: MyST pages, API reference from the docstrings."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

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
