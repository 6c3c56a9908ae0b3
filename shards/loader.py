"""Load one rank's slice of a Hugging Face safetensors checkpoint.

A rank opens only the files that hold tensors its stage needs and reads only its slice of each
(`get_slice`), so its peak memory stays close to the size of its shard, not of the model.
"""

import json
from pathlib import Path

from safetensors import safe_open


def weight_map(model_dir) -> dict[str, str]:
    """Tensor name -> file name, from the index of a sharded checkpoint or the one `model.safetensors`."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir} has neither model.safetensors.index.json nor model.safetensors")
    with safe_open(single, "pt") as f:
        return {name: single.name for name in f.keys()}


def load_weights(targets: dict, model_dir, progress=None) -> int:
    """Fill every (parameter, shard id) in `targets` (checkpoint name -> list of them).

    `progress(tensors_done, tensors_total, bytes_read)` is called after each tensor. Returns the bytes read.
    """
    model_dir, files = Path(model_dir), weight_map(model_dir)
    missing = sorted(set(targets) - set(files))
    if missing:
        raise ValueError(f"checkpoint {model_dir} is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    by_file: dict[str, list[str]] = {}
    for name in targets:
        by_file.setdefault(files[name], []).append(name)
    done, loaded = 0, 0
    for file, names in sorted(by_file.items()):
        with safe_open(model_dir / file, "pt") as f:
            for name in names:
                source = f.get_slice(name)
                for param, shard_id in targets[name]:
                    try:
                        loaded += param.weight_loader(param, source, shard_id)
                    except ValueError as e:
                        raise ValueError(f"tensor {name!r} in {file}: {e}") from None
                done += 1
                if progress:
                    progress(done, len(targets), loaded)
    return loaded
