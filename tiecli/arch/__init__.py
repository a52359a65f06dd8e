"""What tiecli knows about architectures and about how tensors share memory.

- :mod:`.storage`: the one answer to "are these two tensors one storage, and how
  does one view the other?" (torch tensors and pickle entries alike).
- :mod:`.declared`: the one answer to "which ties does this architecture
  declare?" (:func:`~.declared.module_ties` for a live module,
  :func:`~.declared.declared_ties` for a checkpoint's config.json, cached).
- :mod:`.build`: a model built from an untrusted config.json: offline, bounded
  by the checkpoint's size, never running the folder's code.
- :mod:`.patterns`: the pattern table (``data/tie_patterns.json``) for when
  transformers cannot be asked, with the config flags that switch ties on.
"""
