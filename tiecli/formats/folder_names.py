"""The file names of a Hugging Face model folder, in one table.

Reading picks weights by them (:data:`FOLDER_PREFERENCE`); a rewrite names
what it writes by them (a converted pickle, a new index, a moved config). The
names that tell a pickle or a torch distributed checkpoint are here too, so that
telling one reads none of its reader's modules (zipfile, pickle...).
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.json"
INDEX_SUFFIX = ".index.json"
SAFETENSORS_STEM = "model"  # model.safetensors, model-00001-of-00002.safetensors
PICKLE_STEM = "pytorch_model"  # pytorch_model.bin, pytorch_model-00001-of-00002.bin
SAFETENSORS_FILE = SAFETENSORS_STEM + ".safetensors"
SAFETENSORS_INDEX = SAFETENSORS_FILE + INDEX_SUFFIX
PICKLE_FILE = PICKLE_STEM + ".bin"
PICKLE_INDEX = PICKLE_FILE + INDEX_SUFFIX

# Weight files of a Hugging Face folder, most preferred first.
FOLDER_PREFERENCE = (SAFETENSORS_INDEX, SAFETENSORS_FILE, PICKLE_INDEX, PICKLE_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # what torch.save is saved as
DCP_METADATA = ".metadata"  # the file that makes a folder a torch distributed checkpoint
MAX_SHARD_SIZE = 50 * 10**9  # transformers 5 save_pretrained's default "50GB"


def safetensors_name(name: str) -> str:
    """The safetensors file name a converted pickle gets."""
    stem = name.rsplit(".", 1)[0]
    if stem.startswith(PICKLE_STEM):
        stem = SAFETENSORS_STEM + stem[len(PICKLE_STEM) :]
    return stem + ".safetensors"


def is_dcp(path: Path) -> bool:
    """Whether ``path`` is a torch distributed checkpoint's folder (or its ``.metadata``
    file); named here so that asking reads none of the DCP reader's modules."""
    if path.name == DCP_METADATA and path.is_file():
        return True
    return path.is_dir() and (path / DCP_METADATA).is_file()
