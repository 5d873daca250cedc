import torch
from torch import nn

from conftest import TinyCNN, tiny_bert, tiny_vit
from frostline.inspect import inspect_model


def _owners(model_map):
    return [n for e in model_map.entries for n in e.param_names]


def test_entries_follow_forward_order_not_attribute_order(tiny_cnn):
    model, x = tiny_cnn
    model_map = inspect_model(model, x)

    assert [e.path for e in model_map.entries] == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert [e.kind for e in model_map.entries] == ["stem", "block", "block", "block", "head"]


def test_without_example_batch_the_map_uses_attribute_order(tiny_cnn):
    model, _ = tiny_cnn
    model_map = inspect_model(model, None)

    assert [e.path for e in model_map.entries][0] == "head"
    assert model_map.head == "head"
    assert model_map.head_found_by == "the conventional head name 'head'"


def test_every_parameter_belongs_to_exactly_one_entry(tiny_cnn):
    model, x = tiny_cnn
    model_map = inspect_model(model, x)

    owners = _owners(model_map)
    assert sorted(owners) == sorted(n for n, _ in model.named_parameters())
    assert len(owners) == len(set(owners))
    assert model_map.params == sum(p.numel() for p in model.parameters())


def test_head_climbs_out_of_a_dropout_linear_sequential(tiny_cnn):
    model, x = tiny_cnn
    model_map = inspect_model(model, x)

    assert model_map.head == "head"
    assert model_map.head_found_by == "the module whose output is the model's output"


def test_head_is_found_when_the_output_is_post_processed():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8))
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.body(x)) * 2.0  # the head's output is not the model's output

    model_map = inspect_model(Scaled(), torch.randn(2, 4))

    assert model_map.head == "out"
    assert model_map.head_found_by == "the last module with parameters to run"
    assert [e.path for e in model_map.blocks] == ["body.0", "body.1"]


def test_a_bare_sequential_has_its_last_linear_as_head():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model_map = inspect_model(model, torch.randn(2, 4))

    assert model_map.head == "4"
    assert [e.path for e in model_map.blocks] == ["0", "2"]


def test_tracing_leaves_batchnorm_statistics_and_training_flags_alone(tiny_cnn):
    model, x = tiny_cnn
    model.train()
    before = {n: b.clone() for n, b in model.named_buffers()}

    inspect_model(model, x)

    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())


def test_transformers_bert_map():
    model, batch = tiny_bert()
    model_map = inspect_model(model, batch)

    assert model_map.head == "classifier"
    assert model_map.head_found_by == "transformers attribute 'classifier'"
    assert [e.path for e in model_map.blocks] == [f"bert.encoder.layer.{i}" for i in range(4)]
    assert model_map.entries[0].path == "bert.embeddings"
    assert model_map.entries[0].kind == "embedding"
    assert model_map.entry("bert.pooler").kind == "other"


def test_transformers_vit_map_has_final_norm():
    model, batch = tiny_vit()
    model_map = inspect_model(model, batch)

    assert model_map.head == "classifier"
    assert len(model_map.blocks) == 4
    assert model_map.entry("vit.layernorm").kind == "norm"
    assert model_map.entry("vit.embeddings").kind == "embedding"


def test_a_module_that_never_runs_is_marked_and_kept_last():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(3, 3)
            self.layers = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.layers(x))

    model_map = inspect_model(WithSpare(), torch.randn(2, 4))

    assert model_map.entries[-1].path == "spare"
    assert model_map.entries[-1].called is False


def test_to_dict_reports_totals_and_head(tiny_cnn):
    model, x = tiny_cnn
    data = inspect_model(model, x).to_dict()

    assert data["head"] == "head"
    assert data["blocks"] == 3
    assert data["tensors"] == sum(1 for _ in model.parameters())
    assert "param_names" not in data["entries"][0]


def test_map_of_the_tiny_cnn_is_stable():
    torch.manual_seed(0)
    model_map = inspect_model(TinyCNN(), torch.randn(2, 3, 8, 8))

    assert [(e.path, e.tensors, e.params) for e in model_map.entries] == [
        ("stem", 2, 224),
        ("blocks.0", 4, 600),
        ("blocks.1", 4, 600),
        ("blocks.2", 4, 600),
        ("head", 2, 27),
    ]
