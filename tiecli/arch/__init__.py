"""What tiecli knows about architectures and about how tensors share memory.

- :mod:`.storage`: the one answer to "are these two tensors one storage, and how
  does one view the other?" (torch tensors and pickle entries alike).
"""
