"""Carrying out a plan: write beside the target, verify, rename into place.

:mod:`~tiecli.write.run` runs a rewrite and knows no format (each format's
``write`` writes and checks one file); :mod:`~tiecli.write.paths` says where
outputs go; :mod:`~tiecli.write.folder` copies a folder's other files;
:mod:`~tiecli.write.compare` compares written tensors with the input.
"""
