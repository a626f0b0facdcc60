"""Models: the networks a patch goes through, built but not trained here.

:mod:`kit.models.backbones` is the registry of feature extractors (timm CNNs and ViTs,
Hugging Face and pathology foundation models: creation, input size and normalisation,
freezing, BatchNorm recalibration), created with the weights :mod:`kit.models.weights` finds
(``--weights auto|PATH|random``: local folders, the Hugging Face and torch caches, a hub
download; strict loading). :mod:`kit.models.heads` holds the classification heads put on a
backbone: a patch MLP, or attention MIL over an image's patches.
"""
