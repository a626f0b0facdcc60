"""Data: from the raw challenge folder to what training reads.

:mod:`kit.data.dataset` loads and validates the challenge layout (``validate``);
:mod:`kit.data.clean` flags junk training images (``folds/outliers.csv``, the review page)
and groups near-duplicates with :mod:`kit.data.neardup`'s perceptual hashes;
:mod:`kit.data.patches` cuts the top-K mask-coverage patches of every image into a cached
array (stain-normalised by :mod:`kit.data.stain` on request); :mod:`kit.data.folds` writes the
stratified, image-grouped split ``folds/folds.csv``. :mod:`kit.data.synth` is the kit's one
synthetic-data generator (the demo's dataset through :mod:`kit.data.demo`, the benches, the
tests). Nothing here builds or trains a model.
"""
