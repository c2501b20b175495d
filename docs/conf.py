"""Sphinx configuration: the API reference is built from the docstrings (Pyro's convention)."""

import os
import sys

# Build from the checkout, installed or not.
sys.path.insert(0, os.path.abspath(".."))

import pyro_lvm  # noqa: E402

project = "pyro_lvm"
author = "pyro_lvm developers"
copyright = "pyro_lvm developers"
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
# for that library's own Sphinx setup (LightningModule.configure_optimizers uses a
# `testcode` directive: an error here); document only what this package says.
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


def _link_reexports(app, env, node, contnode):
    """Resolve ``pyro_lvm.VAE``, ``pyro_lvm.fit``, ... to where autodoc documents them.

    The package re-exports its main names at the top level, and docstrings use those short
    names; the objects are documented under their defining modules (``pyro_lvm.models.vae.VAE``).
    """
    import pydoc

    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("pyro_lvm."):
        return None
    obj = pydoc.locate(target)
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if module is None or qualname is None or f"{module}.{qualname}" == target:
        return None
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], f"{module}.{qualname}", node, contnode
    )


def setup(app):
    app.connect("missing-reference", _link_reexports)
