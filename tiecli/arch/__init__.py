"""What tiecli knows about architectures and about how tensors share memory.

- :mod:`.storage`: the one answer to "are these two tensors one storage, and how
  does one view the other?" (torch tensors and pickle entries alike).
- :mod:`.patterns`: the pattern table (``data/tie_patterns.json``) for when
  transformers cannot be asked, with the config flags that switch ties on.
"""
