"""Ensemble: the ``blend`` stage, from several backbones' probabilities to one.

:mod:`kit.ensemble.search` fits the blend on arrays: :class:`~kit.ensemble.search.BlendSearch`,
a scikit-learn-style estimator, finds weights over the backbones' OOF probabilities and
per-class biases, scored nested (fold by fold) besides in sample. :mod:`kit.ensemble.blend`
checks the inputs under ``runs/``, runs the search, applies it to the test probabilities,
records the provenance and hands the labels to :mod:`kit.submission.package`, which writes
the validated submission file and its manifest.
"""
