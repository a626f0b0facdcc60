"""Submission: what leaves the kit, and the record that makes it reproducible.

:mod:`kit.submission.package` writes the submission CSV (validated before it exists) and its
manifest; :mod:`kit.submission.submit` uploads it to Kaggle and records each upload;
:mod:`kit.submission.reproduce` re-runs a blend from its manifest and compares bytes;
:mod:`kit.submission.report` writes ``runs/report.html`` from every stage's files.
"""
