"""Training: the ``cv`` stage, one model per fold, scored out of fold.

:mod:`kit.training.cv` reads the patch cache and the folds and trains every fold with the
kit's one loop, :func:`kit.training.train.fit`: on pixels (:mod:`kit.training.augment`'s
pipeline, CutMix, class balance) or, when nothing in the backbone trains, on the embedding
cache of :mod:`kit.training.features`. Predictions average :mod:`kit.training.tta`'s views;
the outputs are ``runs/<bb>/`` (OOF and test probabilities, metrics, checkpoints).
:mod:`kit.training.params` decides which keys of a tuned ``best.yaml`` (``cv --params``)
apply to the training path at hand.
"""
