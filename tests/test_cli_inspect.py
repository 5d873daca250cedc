import json
import os
import subprocess
import sys
from pathlib import Path

from frostline.cli.main import main

MINILM_LAST2_TRAINABLE = 2 * 1_774_464 + 384 * 2 + 2


def test_inspect_minilm_last2_json_runs_offline_as_a_console_script():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = Path(sys.executable).with_name("frostline")
    result = subprocess.run(
        [str(script), "inspect", "hf:minilm", "--freeze", "last:2", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["map"]["head"] == "classifier"
    assert data["map"]["blocks"] == 6
    assert data["freeze"]["spec"] == "last:2"
    assert data["freeze"]["trainable_tensors"] == 2 * 16 + 2
    assert data["freeze"]["trainable_params"] == MINILM_LAST2_TRAINABLE
    assert data["freeze"]["trainable_params_before"] == data["map"]["params"]


def test_inspect_prints_a_table_with_the_head_marked(capsys):
    assert main(["inspect", "efficientnet-lite0", "--num-classes", "10", "--freeze", "head"]) == 0
    out = capsys.readouterr().out

    assert "_fc" in out and "HEAD" in out
    assert "16 blocks" in out
    assert "freeze head: 2 of 149 tensors train (12,810 of 3,383,818 parameters" in out
    # stem, its BatchNorm, 16 blocks, the final conv and its BatchNorm; swish, pooling and dropout before the head
    assert "23 frozen modules held in eval mode through model.train(): dropout off, BatchNorm statistics fixed" in out


def test_inspect_says_when_weights_are_random(capsys):
    assert main(["inspect", "torchvision:resnet18"]) == 0
    assert "RANDOM weights" in capsys.readouterr().out


def test_bad_freeze_spec_is_one_message_and_exit_1(capsys):
    assert main(["inspect", "efficientnet-lite0", "--freeze", "from:_block.3"]) == 1
    err = capsys.readouterr().err

    assert err.startswith("error: from:_block.3 names no entry of the model map; did you mean _blocks.3")
    assert "Traceback" not in err


def test_bad_model_ref_is_one_message_and_exit_1(capsys):
    assert main(["inspect", "timm:not_a_model"]) == 1
    assert "timm:not_a_model is not a timm model name" in capsys.readouterr().err
