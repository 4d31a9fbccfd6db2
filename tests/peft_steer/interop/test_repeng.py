"""repeng, both ways: a control vector written by repeng imports as an adapter that steers exactly as repeng's
``ControlModel`` applies it, and one exported by peft-steer loads in repeng with the same meaning (same logits).

repeng's convention (``repeng/control.py``, ``repeng/extract.py``, 0.4.0): ``directions[N]`` is added to the output of
``model.layers[N]``, for the ``layer_ids`` of its ``ControlModel`` only (negative ids count from the end), times
``coeff``; its ``export_gguf`` writes it as ``direction.N``, the numbering of llama.cpp and peft-steer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.interop import export_gguf, import_gguf, read_gguf
from peft_steer.interop.repeng_import import REPENG_INSTALL, import_repeng
from tests.conftest import make_model
from trl_integration.cli import main

pytest.importorskip("gguf", reason="needs peft-steer[gguf]")
try:
    repeng = import_repeng()  # the product's one shim for repeng 0.4.0 under NumPy 2
except ImportError:
    pytest.skip(f"needs repeng: {REPENG_INSTALL}", allow_module_level=True)

HIDDEN = 64


def test_the_import_leaves_numpy_as_it_was():
    assert repeng.ControlVector.__mul__  # imported whole
    assert hasattr(np, "float_") == (np.lib.NumpyVersion(np.__version__) < "2.0.0")  # the alias was for repeng only


TOLERANCE = 1e-5  # the same float32 additions at the same place: measured 0.0 on CPU
DATASET = [(f"I love question {i} and gladly say yes", f"I hate question {i} and flatly say no") for i in range(8)]


def fresh():
    """The tiny Llama (hidden 64, 4 blocks) of every test, the same weights each call: repeng's ControlModel
    replaces the model's blocks, so each side gets its own copy."""
    return make_model("llama", hidden=HIDDEN)


@pytest.fixture
def base_folder(tmp_path):
    fresh().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture
def ids():
    return torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, input_ids, attention_mask=None):
    """Logits with explicit ``(batch, seq)`` position ids: repeng 0.4.0's padding mask (``control.py:172-181``)
    reshapes them to the batch, so transformers' default ``(1, seq)`` fails for a batch of 2."""
    if attention_mask is None:
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    else:  # as generate makes them: 0 at each row's first real token, 1 on the left padding
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def trained_repeng_vector(tokenizer):
    """A vector as repeng users make one: ``ControlVector.train`` (PCA of the contrast pairs' differences)."""
    dataset = [repeng.DatasetEntry(positive=p, negative=n) for p, n in DATASET]
    return repeng.ControlVector.train(fresh(), tokenizer, dataset)


def repeng_logits(vector, layer_ids, input_ids, coeff=1.0, attention_mask=None):
    control = repeng.ControlModel(fresh(), layer_ids)
    control.set_control(vector, coeff=coeff)
    return logits(control, input_ids, attention_mask)


def steered_logits(adapter, input_ids, multiplier=None, attention_mask=None):
    model = PeftModel.from_pretrained(fresh(), adapter)
    if multiplier is None:
        return logits(model, input_ids, attention_mask)
    with peft_steer.steering(model, multiplier=multiplier):
        return logits(model, input_ids, attention_mask)


# ---- repeng -> peft-steer ----------------------------------------------------------------------------------------


def test_a_vector_trained_and_written_by_repeng_steers_as_its_control_model(tmp_path, base_folder, ids, tokenizer):
    vector = trained_repeng_vector(tokenizer)
    assert sorted(vector.directions) == [1, 2, 3]  # repeng's default hidden_layers: -1 .. -(L-1), never block 0
    vector.export_gguf(str(tmp_path / "repeng.gguf"))
    expected = repeng_logits(vector, sorted(vector.directions), ids, coeff=1.5)
    assert max_diff(expected, logits(fresh(), ids)) > 0.1  # it does steer

    args = ["import-gguf", str(tmp_path / "repeng.gguf"), "--base-model", str(base_folder), "--out"]
    assert main([*args, str(tmp_path / "adapter"), "--multiplier", "1.5"]) == 0  # --multiplier is repeng's coeff
    assert max_diff(steered_logits(tmp_path / "adapter", ids), expected) <= TOLERANCE
    # coeff 1.0 is the file as it is, and a negative coeff the opposite behavior, as peft-steer's multiplier
    import_gguf(tmp_path / "repeng.gguf", base_folder, tmp_path / "plain")
    for coeff in (1.0, -2.0):
        expected = repeng_logits(vector, [1, 2, 3], ids, coeff=coeff)
        assert max_diff(steered_logits(tmp_path / "plain", ids, multiplier=coeff), expected) <= TOLERANCE


def test_a_control_model_on_some_layers_is_layers_on_import(tmp_path, base_folder, ids, tokenizer):
    """repeng users apply a vector on fewer blocks than it has (its README: ControlModel(model, range(-5, -18, -1)));
    the file does not say which, so import takes them as ``layers``, negative from the end as repeng counts."""
    vector = trained_repeng_vector(tokenizer)
    vector.export_gguf(str(tmp_path / "repeng.gguf"))
    assert repeng.ControlModel(fresh(), [-2, -1]).layer_ids == [2, 3]
    expected = repeng_logits(vector, [-2, -1], ids)

    args = ["import-gguf", str(tmp_path / "repeng.gguf"), "--base-model", str(base_folder), "--out"]
    assert main([*args, str(tmp_path / "last-two"), "--layers", "-2", "-1"]) == 0
    assert peft_steer.get_vectors(PeftModel.from_pretrained(fresh(), tmp_path / "last-two")).keys() == {2, 3}
    assert max_diff(steered_logits(tmp_path / "last-two", ids), expected) <= TOLERANCE
    import_gguf(tmp_path / "repeng.gguf", base_folder, tmp_path / "all")  # every direction: not the same
    assert max_diff(steered_logits(tmp_path / "all", ids), expected) > 0.01


def test_block_0_written_by_repeng_imports_only_when_named(tmp_path, base_folder, ids, capsys):
    """repeng steers and writes block 0 when asked; llama.cpp refuses such a file, and so does a plain import."""
    generator = np.random.default_rng(0)
    directions = {block: generator.standard_normal(HIDDEN).astype(np.float32) for block in (0, 2)}
    vector = repeng.ControlVector(model_type="llama", directions=directions)
    vector.export_gguf(str(tmp_path / "zero.gguf"))
    args = ["import-gguf", str(tmp_path / "zero.gguf"), "--base-model", str(base_folder), "--out"]
    assert main([*args, str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "direction.0 is not a valid control vector block" in err and "--layers" in err
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ValueError, match="direction.0 is not a valid"):
        read_gguf(tmp_path / "zero.gguf")

    import_gguf(tmp_path / "zero.gguf", base_folder, tmp_path / "with-0", layers=[0, 2])
    assert max_diff(steered_logits(tmp_path / "with-0", ids), repeng_logits(vector, [0, 2], ids)) <= TOLERANCE
    import_gguf(tmp_path / "zero.gguf", base_folder, tmp_path / "without-0", layers=[-2])
    assert max_diff(steered_logits(tmp_path / "without-0", ids), repeng_logits(vector, [2], ids)) <= TOLERANCE


@pytest.mark.parametrize(
    "layers, message",
    [
        ([4], r"block 4 is out of range for a model of 4 decoder blocks"),
        ([1], r"has no direction for block 1"),
        ([], ""),
    ],
)
def test_layers_that_the_file_or_model_lacks_are_refused(tmp_path, base_folder, layers, message):
    vector = repeng.ControlVector(model_type="llama", directions={2: np.ones(HIDDEN, np.float32)})
    vector.export_gguf(str(tmp_path / "two.gguf"))
    with pytest.raises(ValueError, match=message or "selects no block"):
        import_gguf(tmp_path / "two.gguf", base_folder, tmp_path / "out", layers=layers)
    assert not (tmp_path / "out").exists()


# ---- peft-steer -> repeng ----------------------------------------------------------------------------------------


def exported(tmp_path, base_folder, **config):
    """A saved adapter on blocks 1 and 3 (multiplier -2) and its control vector written by ``export-gguf``."""
    model = get_peft_model(fresh(), SteeringConfig(layers=[1, 3], multiplier=-2.0, **config))
    generator = torch.Generator().manual_seed(0)
    peft_steer.set_vectors(model, {block: torch.randn(HIDDEN, generator=generator) for block in (1, 3)})
    model.peft_config["default"].base_model_name_or_path = str(base_folder)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", tmp_path / "ours.gguf"


def test_an_exported_vector_means_the_same_in_repeng(tmp_path, base_folder, ids):
    adapter, gguf_file = exported(tmp_path, base_folder)
    assert main(["export-gguf", str(adapter), str(gguf_file)]) == 0
    vector = repeng.ControlVector.import_gguf(str(gguf_file))
    assert vector.model_type == "llama" and sorted(vector.directions) == [1, 3]
    expected = steered_logits(adapter, ids)  # multiplier -2: the file holds -2 * v, repeng's coeff 1 is the same
    assert max_diff(expected, logits(fresh(), ids)) > 0.1
    assert max_diff(repeng_logits(vector, sorted(vector.directions), ids), expected) <= TOLERANCE
    # repeng's coeff scales the file: coeff 0.5 of (-2 * v) is peft-steer's multiplier -1
    got = repeng_logits(vector, [1, 3], ids, coeff=0.5)
    assert max_diff(got, steered_logits(adapter, ids, multiplier=-1.0)) <= TOLERANCE


def test_left_padding_repeng_leaves_alone_changes_no_real_token(tmp_path, base_folder, ids):
    """repeng does not steer left padding (it reads generate's position ids); peft-steer's positions="all" does,
    but padding is masked out of attention: the logits of every real token are the same."""
    adapter, gguf_file = exported(tmp_path, base_folder)
    export_gguf(adapter, gguf_file)
    vector = repeng.ControlVector.import_gguf(str(gguf_file))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    real = mask.bool()
    expected = steered_logits(adapter, ids, attention_mask=mask)[real]
    got = repeng_logits(vector, [1, 3], ids, attention_mask=mask)[real]
    assert max_diff(got, expected) <= TOLERANCE


def test_greedy_generation_is_the_same_in_repeng(tmp_path, base_folder, ids):
    adapter, gguf_file = exported(tmp_path, base_folder)
    export_gguf(adapter, gguf_file)
    vector = repeng.ControlVector.import_gguf(str(gguf_file))
    control = repeng.ControlModel(fresh(), [1, 3])
    control.set_control(vector)
    steered = PeftModel.from_pretrained(fresh(), adapter)
    options = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        theirs, ours = control.generate(ids[:1], **options), steered.generate(input_ids=ids[:1], **options)
    assert torch.equal(theirs.sequences, ours.sequences)
    assert max(max_diff(a, b) for a, b in zip(theirs.logits, ours.logits, strict=True)) <= TOLERANCE


def test_a_completion_only_adapter_is_exported_only_when_told(tmp_path, base_folder, capsys):
    """llama.cpp and repeng add a control vector at every position: a positions="completion" adapter would steer
    the prompt too there, so export asks for --all-positions."""
    adapter, gguf_file = exported(tmp_path, base_folder, positions="completion")
    assert main(["export-gguf", str(adapter), str(gguf_file)]) == 2
    err = capsys.readouterr().err
    assert "positions='completion'" in err and "--all-positions" in err and not gguf_file.exists()
    assert main(["export-gguf", str(adapter), str(gguf_file), "--all-positions"]) == 0
    assert sorted(repeng.ControlVector.import_gguf(str(gguf_file)).directions) == [1, 3]
