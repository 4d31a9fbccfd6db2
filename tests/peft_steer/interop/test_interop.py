"""Official BiPO vectors in, llama.cpp control vectors out and in; nothing half-written on a failure."""

import pickle

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.interop import export_gguf, import_official, load_official_vector, read_adapter, read_gguf
from tests.conftest import SHARED_DATA, make_model
from trl_integration.cli import main

OFFICIAL = SHARED_DATA / "bipo" / "pretrained_vector"
POWER = OFFICIAL / "power-seeking_llama-2/vec_ep20_layer15.pt"


def llama_7b_shaped(tmp_path):
    """Hidden size 4096 and 18 blocks (the last hidden state is after the final norm, so block 15 must not be
    the last); one narrow head and a narrow MLP keep it small."""
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=4096, intermediate_size=8, num_hidden_layers=18, num_attention_heads=1,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "llama-4096")
    return model, tmp_path / "llama-4096"


@pytest.mark.skipif(not POWER.exists(), reason="the official vectors live in ../shared/data")
def test_official_power_seeking_vector_moves_block_15_by_exactly_that_vector(tmp_path, input_ids):
    official = load_official_vector(POWER)
    assert official.layer == 15 and official.epoch == 20 and official.vector.shape == (4096,)
    base, folder = llama_7b_shaped(tmp_path)
    with torch.no_grad():
        expected = base(input_ids, output_hidden_states=True).hidden_states
    assert main(["import-official", str(POWER), "--base-model", str(folder), "--out", str(tmp_path / "power")]) == 0
    steered = PeftModel.from_pretrained(base, tmp_path / "power")
    with torch.no_grad():
        hidden = steered(input_ids, output_hidden_states=True).hidden_states
    assert torch.equal(hidden[15], expected[15])
    assert torch.equal(hidden[16], expected[16] + official.vector)
    assert steered.peft_config["default"].base_model_name_or_path == str(folder)


def test_files_that_are_not_one_plain_tensor_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "evil.pt", "wb") as file:
        pickle.dump(Payload(), file)
    torch.save({"vector": torch.zeros(4)}, tmp_path / "dict.pt")
    torch.save(torch.zeros(2, 4), tmp_path / "matrix.pt")
    for name, message in [("evil.pt", "weights_only"), ("dict.pt", "holds a dict"), ("matrix.pt", "shape \\(2, 4\\)")]:
        with pytest.raises(ValueError, match=message):
            load_official_vector(tmp_path / name)


def test_failed_import_writes_nothing(tmp_path):
    make_model().save_pretrained(tmp_path / "base")
    torch.save(torch.zeros(32), tmp_path / "vec_ep1_layer9.pt")  # block 9 of a 4-block model
    with pytest.raises(ValueError, match="block 9 is out of range"):
        import_official(tmp_path / "vec_ep1_layer9.pt", tmp_path / "base", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".peft-steer")] == []
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        import_official(tmp_path / "vec_ep1_layer9.pt", tmp_path / "base", tmp_path / "busy", layer=1)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]


def test_gguf_round_trip_gives_the_same_vectors(tmp_path):
    pytest.importorskip("gguf")
    make_model().save_pretrained(tmp_path / "base")
    model = get_peft_model(make_model(), SteeringConfig(layers=[1, 3], multiplier=2.0))
    generator = torch.Generator().manual_seed(0)
    peft_steer.set_vectors(model, {1: torch.randn(32, generator=generator), 3: torch.randn(32, generator=generator)})
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    assert main(["export-gguf", str(tmp_path / "adapter"), str(tmp_path / "vec.gguf")]) == 0
    vectors, hint = read_gguf(tmp_path / "vec.gguf")
    assert hint == "llama"
    original = peft_steer.get_vectors(model)
    assert sorted(vectors) == [1, 3]
    for block in (1, 3):  # the file holds multiplier * v, as llama.cpp applies it at scale 1
        assert torch.equal(vectors[block], 2.0 * original[block])
    args = ["import-gguf", str(tmp_path / "vec.gguf"), "--base-model", str(tmp_path / "base"), "--out"]
    assert main([*args, str(tmp_path / "back")]) == 0
    config, back = read_adapter(str(tmp_path / "back"))
    assert config.multiplier == 1.0 and all(torch.equal(back[b], vectors[b]) for b in (1, 3))


def test_llama_cpp_cannot_steer_block_0(tmp_path, capsys):
    pytest.importorskip("gguf")
    import gguf

    model = get_peft_model(make_model(), SteeringConfig(layers=[0], init="random"))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="llama.cpp cannot steer"):
        export_gguf(tmp_path / "adapter", tmp_path / "zero.gguf")
    assert not (tmp_path / "zero.gguf").exists() and not (tmp_path / "zero.gguf.partial").exists()
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), arch="controlvector")
    writer.add_tensor("direction.0", torch.zeros(32).numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    make_model().save_pretrained(tmp_path / "base")
    args = ["import-gguf", str(tmp_path / "bad.gguf"), "--base-model", str(tmp_path / "base"), "--out"]
    assert main([*args, str(tmp_path / "out")]) == 2
    assert "direction.0 is not a valid control vector block" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello world\n", "is not a PyTorch tensor file"),
        (b"", "is not a PyTorch tensor file"),
        (pickle.dumps(print), "weights_only"),
    ],
)
def test_a_file_that_is_no_tensor_file_is_one_line_naming_it(tmp_path, content, message):
    (tmp_path / "vec_ep1_layer1.pt").write_bytes(content)
    with pytest.raises(ValueError) as raised:
        load_official_vector(tmp_path / "vec_ep1_layer1.pt")
    text = str(raised.value)
    assert str(tmp_path / "vec_ep1_layer1.pt") in text and message in text and "\n" not in text


def test_a_negative_layer_is_the_block_counted_from_the_end(tmp_path):
    make_model().save_pretrained(tmp_path / "base")
    torch.save(torch.ones(32), tmp_path / "vector.pt")
    config = import_official(tmp_path / "vector.pt", tmp_path / "base", tmp_path / "last", layer=-1)
    assert config.layers == [3]
    loaded = PeftModel.from_pretrained(make_model(), tmp_path / "last")
    assert torch.equal(peft_steer.get_vectors(loaded)[3], torch.ones(32))
