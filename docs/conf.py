"""Sphinx configuration: the API reference is built from the docstrings (Pyro's convention)."""

import os
import sys

# Build from the checkout, installed or not.
sys.path.insert(0, os.path.abspath(".."))

import pyro_lvm  # noqa: E402

project = "pyro_lvm"
author = "pyro_lvm developers"
copyright = "2025, pyro_lvm developers"
version = release = pyro_lvm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# Docstrings follow zuko / Pyro: "Arguments:", "Example:", "References:" sections.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# An alias, so that the type hints (autodoc_typehints = "description") merge into the same list.
napoleon_custom_sections = [("Arguments", "Parameters")]
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Methods that override Lightning's or Pyro's hooks without a docstring of their own
# (training_step, setup, ...) would otherwise show the parent's long docstring, written
# for that library's own Sphinx setup; document only what this package says.
autodoc_inherit_docstrings = False

nitpicky = False
templates_path = []
exclude_patterns = ["_build"]
source_suffix = ".rst"
master_doc = "index"

html_theme = "alabaster"
html_theme_options = {
    "description": "Latent-variable models as first-class citizens of Pyro",
    "fixed_sidebar": True,
}
html_static_path = []
