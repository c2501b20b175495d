"""Model/guide pairs written the way Pyro's examples and tutorials write them, to test pyro_lvm as a Pyro user would.

Each module holds one pair, as an ``nn.Module`` with ``model`` and ``guide`` methods (so that a YAML config can
name its class for ``pyro-lvm fit``), written in Pyro's idioms: ``pyro.module`` registration, ``pyro.plate``,
boolean-mask indexing, ``obs_mask``, enumeration, autoguides, and site and argument names of Pyro's own examples.
They are this project's own code, in the manner of those examples.

* :mod:`.vae`: the VAE of Pyro's VAE tutorial (a latent site named ``latent``, an observed site named ``obs``);
* :mod:`.cvae`: the conditional VAE of Pyro's CVAE example (arguments ``xs``/``ys``, boolean indexing of the
  hidden pixels, a learned prior network): it does not broadcast over particles;
* :mod:`.ssvae`: a semi-supervised VAE (Kingma et al.'s M2): the digit observed where labelled (``obs_mask``),
  enumerated or sampled elsewhere;
* :mod:`.gmm`: the Gaussian mixture of Pyro's GMM tutorial: global weights, locations and scale under
  ``AutoDelta``, the assignment enumerated in the model;
* :mod:`.factor_analysis`: Bayesian factor analysis: global loadings under ``AutoNormal``, local factors under
  an amortized guide, in an ``AutoGuideList``.
"""
