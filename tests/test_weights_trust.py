"""Cached weights are data, never code: a pickle planted in torch hub's or the Hugging Face cache is refused
with one message naming the file and the fix, and what it would have run never runs; genuine files load bit
for bit, and a file that is there but broken is an error, never a silent fall back to random weights."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from frostline import ModelRefError, open_model
from frostline.sources import vision
from frostline.sources.vision import load_torchvision_weights
from frostline.sources.weights import check_hash_prefix, read_cached_weights

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

RESNET18 = torchvision.models.ResNet18_Weights.DEFAULT
TIMM_NAME = "test_resnet"
TIMM_REPO = timm.models.get_pretrained_cfg(TIMM_NAME).hf_hub_id
CLI = [sys.executable, "-c", "import sys; from frostline.cli.main import main; sys.exit(main())"]


class Payload:
    """Unpickling this creates the marker file: it stands for any code a planted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_payload(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv1.weight": Payload(marker)}, path)
    return path


def hash_named(path: Path) -> Path:
    """Rename `path` to `<stem>-<first 8 hex digits of its SHA-256><suffix>`, the way torchvision names files."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return path.rename(path.with_name(f"{path.stem}-{digest}{path.suffix}"))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    # set_dir() elsewhere in the process would win over TORCH_HOME: make sure the planted folder is the one read
    assert checkpoints == tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


@pytest.fixture
def published(torch_home, monkeypatch):
    """Plant a file as if it were resnet18's published one: named by its own hash, weights.url pointing to it."""

    def plant(write) -> Path:
        draft = torch_home / "resnet18.pth"
        write(draft)
        path = hash_named(draft)
        monkeypatch.setattr(RESNET18.value, "url", f"https://download.pytorch.org/models/{path.name}")
        return path

    return plant


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A Hugging Face cache laid out as huggingface_hub writes it; `plant(filename)` gives the snapshot path."""
    hub = tmp_path / "hf" / "hub"
    # read at import time from HF_HUB_CACHE, so the module constant is what a running process uses
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))

    def plant(filename: str) -> Path:
        repo = hub / f"models--{TIMM_REPO.replace('/', '--')}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        return repo / "snapshots" / commit / filename

    return plant


def test_planted_torchvision_checkpoint_is_refused_and_never_run(torch_home, tmp_path):
    marker = tmp_path / "ran"
    path = plant_payload(torch_home / Path(RESNET18.url).name, marker)

    with pytest.raises(ModelRefError) as info:
        open_model("torchvision:resnet18", num_classes=3)

    message = str(info.value)
    assert message.startswith(f"cannot use the weights file {path}: its SHA-256 begins ")
    assert message.endswith(f"delete it to use random weights, or replace it with the file from {RESNET18.url}")
    assert "\n" not in message
    assert not marker.exists()


def test_planted_pickle_that_matches_its_hash_is_still_read_as_data(published, tmp_path):
    marker = tmp_path / "ran"
    path = published(lambda p: plant_payload(p, marker))

    with pytest.raises(ModelRefError) as info:
        open_model("torchvision:resnet18", num_classes=3)

    message = str(info.value)
    assert message.startswith(f"cannot use the weights file {path}: it holds pickled objects besides tensors")
    assert "(it asks for io.open), and loading them could run code; delete it" in message
    assert not marker.exists()


def test_cli_inspect_refuses_a_planted_checkpoint_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    path = plant_payload(tmp_path / "torch" / "hub" / "checkpoints" / Path(RESNET18.url).name, marker)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}

    result = subprocess.run(
        [*CLI, "inspect", "torchvision:resnet18"], env=env, capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot use the weights file {path}: its SHA-256 begins ")
    assert not marker.exists()


def test_genuine_torchvision_weights_load_bit_for_bit_and_the_head_is_replaced(published):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18().state_dict()
    path = published(lambda p: torch.save(reference, p))

    source = open_model("torchvision:resnet18", num_classes=3)

    assert source.pretrained
    assert str(path) in source.notes[0]
    assert source.notes[1] == "new head fc: Linear(512, 3) in place of 1000 outputs"
    loaded = source.model.state_dict()
    assert set(loaded) == set(reference)
    body = [k for k in reference if not k.startswith("fc.")]
    assert len(body) == 120
    assert all(torch.equal(loaded[k], reference[k]) for k in body)
    assert source.model.fc.weight.shape == (3, 512)


def test_hash_check_refuses_a_file_that_is_not_the_one_its_name_promises(tmp_path):
    good = tmp_path / "weights.pth"
    torch.save({"w": torch.arange(4.0)}, good)
    good = hash_named(good)
    check_hash_prefix(good, "fix it")
    forged = good.with_name("resnet18-00000000.pth")
    forged.write_bytes(good.read_bytes())
    truncated = good.with_name(good.name.replace("weights", "truncated"))
    truncated.write_bytes(good.read_bytes()[:-100])

    for path in (forged, truncated):
        with pytest.raises(ModelRefError) as info:
            check_hash_prefix(path, "fix it")
        expected = path.name.rpartition("-")[2].removesuffix(".pth")
        assert str(info.value).startswith(f"cannot use the weights file {path}: its SHA-256 begins ")
        assert f"not {expected} as its name says" in str(info.value)
        assert str(info.value).endswith("; fix it")


def test_torchvision_loader_checks_the_hash_before_it_reads(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(reference, path)
    path = hash_named(path)

    model = load_torchvision_weights("resnet18", RESNET18, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())

    forged = path.with_name("resnet18-00000000.pth")
    path.rename(forged)
    with pytest.raises(ModelRefError, match="not 00000000 as its name says"):
        load_torchvision_weights("resnet18", RESNET18, forged)


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (lambda p: p.write_bytes(b"not a checkpoint"), "it is not a readable weights file (torch.load with weights"),
        (lambda p: p.write_bytes(b"hello world"), "it is not a readable weights file (KeyError: 101)"),
        (lambda p: torch.save([torch.ones(2)], p), "it holds a list that is not a dict of named tensors"),
        (lambda p: torch.save({"w": 3}, p), "it holds a dict that is not a dict of named tensors"),
    ],
)
def test_unreadable_files_are_named_with_what_is_wrong(tmp_path, write, problem):
    path = tmp_path / "weights.pth"
    write(path)
    with pytest.raises(ModelRefError) as info:
        read_cached_weights(path, "fix it")
    assert str(info.value).startswith(f"cannot use the weights file {path}: {problem}")


def test_truncated_files_are_refused_in_both_formats(tmp_path):
    for path, save in ((tmp_path / "w.pth", torch.save), (tmp_path / "w.safetensors", save_file)):
        save({"w": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:-200])
        with pytest.raises(ModelRefError) as info:
            read_cached_weights(path, "fix it")
        assert str(info.value).startswith(f"cannot use the weights file {path}: it is not a readable weights file (")
        assert "\n" not in str(info.value)


def test_tensors_that_do_not_fit_are_an_error_not_random_weights(published):
    state = torchvision.models.resnet18().state_dict()
    del state["layer4.1.bn2.weight"]
    state["fc.weight"] = torch.zeros(10, 512)
    published(lambda p: torch.save(state, p))

    with pytest.raises(ModelRefError, match=r"wrong shape: fc.weight \(10, 512\) for \(1000, 512\)"):
        open_model("torchvision:resnet18", num_classes=3)

    state["fc.weight"] = torch.zeros(1000, 512)
    state["extra"] = torch.zeros(1)
    published(lambda p: torch.save(state, p))
    with pytest.raises(ModelRefError, match=r"\(missing: layer4\.1\.bn2\.weight; unexpected: extra\); delete it"):
        open_model("torchvision:resnet18", num_classes=3)


def test_planted_timm_checkpoint_is_refused_and_never_run(hf_cache, tmp_path):
    marker = tmp_path / "ran"
    path = plant_payload(hf_cache("pytorch_model.bin"), marker)

    with pytest.raises(ModelRefError) as info:
        open_model(f"timm:{TIMM_NAME}", num_classes=3)

    message = str(info.value)
    assert message.startswith(f"cannot use the weights file {path}: it holds pickled objects besides tensors")
    assert message.endswith(
        "delete it to use random weights, or replace it with the file from "
        f"https://huggingface.co/{TIMM_REPO}/resolve/main/pytorch_model.bin"
    )
    assert not marker.exists()


def test_cli_inspect_refuses_a_planted_timm_checkpoint(hf_cache, tmp_path):
    marker = tmp_path / "ran"
    path = plant_payload(hf_cache("pytorch_model.bin"), marker)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "1"}

    result = subprocess.run(
        [*CLI, "inspect", f"timm:{TIMM_NAME}"], env=env, capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot use the weights file {path}: it holds pickled objects besides tensors")
    assert not marker.exists()


@pytest.mark.parametrize("timm_takes_state_dict", [True, False], ids=["state_dict overlay", "older timm"])
@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_genuine_timm_weights_load_bit_for_bit(hf_cache, monkeypatch, filename, timm_takes_state_dict):
    monkeypatch.setattr(vision, "_timm_takes_state_dict", lambda: timm_takes_state_dict)
    torch.manual_seed(1)
    reference = timm.create_model(TIMM_NAME).state_dict()
    path = hf_cache(filename)
    (save_file if filename.endswith(".safetensors") else torch.save)(reference, path)

    source = open_model(f"timm:{TIMM_NAME}", num_classes=3)

    assert source.pretrained
    assert source.notes == [
        f"timm {TIMM_NAME} with pretrained weights from {path}",
        "new head: 3 outputs in place of 1000 (timm reset_classifier)",
    ]
    assert "state_dict" not in source.model.pretrained_cfg
    loaded = source.model.state_dict()
    body = [k for k in reference if not k.startswith("fc.")]
    assert set(loaded) == set(reference)
    assert all(torch.equal(loaded[k], reference[k]) for k in body)
    assert source.model.fc.weight.shape == (3, reference["fc.weight"].shape[1])


def test_timm_file_whose_tensors_do_not_fit_is_an_error(hf_cache):
    path = hf_cache("model.safetensors")
    save_file({"conv1.weight": torch.zeros(1)}, path)

    with pytest.raises(ModelRefError) as info:
        open_model(f"timm:{TIMM_NAME}", num_classes=3)

    assert str(info.value).startswith(f"cannot use the weights file {path}: its tensors do not fit timm {TIMM_NAME} (")
    assert "\n" not in str(info.value)
