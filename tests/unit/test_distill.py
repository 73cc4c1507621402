"""The student a distillation starts from, without Ray: which teacher layers it keeps, that it holds exactly
those layers' weights (and so, before any training, computes what the teacher's kept layers compute), and every
student that cannot be one refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mass.cluster import worker_error
from mass.compression.distill import length_grouped, pick_layers, student_state
from mass.errors import ConfigError
from mass.registry.imports import minilm_dir


@pytest.mark.parametrize("spec, layers", [("3", [1, 3, 5]), ("2", [2, 5]), ("1", [5]), ("5", [0, 1, 3, 4, 5]),
                                          ("0,2,4", [0, 2, 4]), (" 1, 5 ", [1, 5])])
def test_a_layer_count_keeps_evenly_spaced_layers_with_the_last_and_indices_keep_those(spec, layers):
    assert pick_layers(6, spec) == layers


@pytest.mark.parametrize("spec, needle", [
    ("6", r"a student of 6 layers is not smaller than its teacher \(6 layers\); give 1 to 5"),
    ("9", "not smaller than its teacher"),
    ("0", "a student of 0 layers"),
    ("0,1,2,3,4,5", "a student of 6 layers is not smaller"),
    ("2,1", "distinct, increasing and in 0..5"),
    ("1,1", "distinct"),
    ("0,6", "in 0..5"),
    ("three", "give a layer count"),
])
def test_a_student_that_is_not_smaller_or_not_a_layer_list_is_refused(spec, needle):
    with pytest.raises(ConfigError, match=needle):
        pick_layers(6, spec)


def test_the_student_holds_the_kept_layers_of_its_teacher():
    from transformers import AutoConfig, AutoModel

    teacher = AutoModel.from_pretrained(Path(minilm_dir())).eval()
    config = AutoConfig.for_model(**{**teacher.config.to_dict(), "num_hidden_layers": 2})
    student = AutoModel.from_config(config).eval()
    student.load_state_dict(student_state(teacher.state_dict(), [2, 5]), strict=True)  # no key missing or extra
    for mine, theirs in ((0, 2), (1, 5)):
        assert torch.equal(student.encoder.layer[mine].attention.self.query.weight,
                           teacher.encoder.layer[theirs].attention.self.query.weight)
    assert torch.equal(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    # the student's first layer computes what the teacher's layer 2 does on the same input
    x = torch.randn(1, 4, 384)
    with torch.no_grad():
        assert torch.allclose(student.encoder.layer[0](x)[0], teacher.encoder.layer[2](x)[0])


def test_a_train_worker_error_is_named_by_its_own_line_not_ray_trains_wrapper():
    wrapped = RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n  File \"x.py\", line 3\n"
                           "torch.OutOfMemoryError: cannot allocate 2 GB\n")
    assert worker_error(wrapped) == "torch.OutOfMemoryError: cannot allocate 2 GB"
    assert worker_error(ValueError("plain")) == "plain"


def test_a_causal_students_layers_are_its_teachers_and_its_head_stays_tied():
    from transformers import GPT2Config, GPT2LMHeadModel

    from mass.compression.arch import build

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=4, n_head=4)).eval()
    student = build({**teacher.config.to_dict(), "n_layer": 2}).eval()
    assert type(student).__name__ == "GPT2LMHeadModel" and len(student.transformer.h) == 2
    student.load_state_dict(student_state(teacher.state_dict(), [1, 3]), strict=True)
    assert torch.equal(student.transformer.h[0].mlp.c_fc.weight, teacher.transformer.h[1].mlp.c_fc.weight)
    assert torch.equal(student.transformer.h[1].attn.c_attn.weight, teacher.transformer.h[3].attn.c_attn.weight)
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()


def test_length_grouped_batches_cover_each_text_once_pad_less_than_a_random_cut_and_differ_per_epoch():
    import numpy as np

    rng = np.random.default_rng(7)
    lengths = [int(x) for x in rng.integers(5, 400, size=1000)]
    epochs = [length_grouped(lengths, 32, np.random.default_rng(seed)) for seed in (0, 1)]
    for batches in epochs:
        assert len(batches) == 1000 // 32 and all(len(b) == 32 for b in batches)
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat) == 31 * 32  # no text twice; only the last 8 dropped
    padded = sum(32 * max(lengths[i] for i in b) for b in epochs[0])
    order = np.random.default_rng(0).permutation(1000)
    random_cut = sum(32 * max(lengths[i] for i in order[k:k + 32]) for k in range(0, 992, 32))
    assert padded < 0.6 * random_cut, (padded, random_cut)
    assert epochs[0] != epochs[1]  # each epoch its own pools and batch order


def _minilm_pair(layers: list[int]):
    """MiniLM and a student of its ``layers``, both computing attention eagerly (so it can be returned), in eval."""
    from transformers import AutoModel

    from mass.compression.arch import build
    from mass.compression.distill import training_spec

    teacher = AutoModel.from_pretrained(Path(minilm_dir()), attn_implementation="eager").eval()
    spec = training_spec({**teacher.config.to_dict(), "num_hidden_layers": len(layers)}, eager=True)
    student = build(spec).eval()
    student.load_state_dict(student_state(teacher.state_dict(), layers))
    return teacher, student


def test_the_intermediate_losses_are_zero_against_the_layers_a_student_holds_and_not_against_others():
    from transformers import AutoTokenizer

    from mass.compression.distill import attention_loss, layer_loss

    teacher, student = _minilm_pair([0, 1])  # the student's layers are the teacher's first two: same outputs
    batch = AutoTokenizer.from_pretrained(minilm_dir())(["a short text", "a longer text that pads the other one"],
                                                       padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    flags = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        mine, theirs = student(**batch, **flags), teacher(**batch, **flags)
    mask = batch["attention_mask"]
    assert layer_loss(mine.hidden_states, theirs.hidden_states, mask, [(0, 0), (1, 1)]) < 1e-8
    assert attention_loss(mine.attentions, theirs.attentions, mask, [(0, 0), (1, 1)]) < 1e-6
    assert layer_loss(mine.hidden_states, theirs.hidden_states, mask, [(0, 2), (1, 5)]) > 0.01
    assert attention_loss(mine.attentions, theirs.attentions, mask, [(0, 2), (1, 5)]) > 0.01


def test_the_intermediate_losses_ignore_padding_tokens():
    from mass.compression.distill import attention_loss, layer_loss

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    hidden = [torch.randn(2, 4, 8) for _ in range(3)]
    other = [h + 0.1 for h in hidden]
    attention = [torch.softmax(torch.randn(2, 2, 4, 4), -1) for _ in range(2)]
    other_attention = [torch.softmax(torch.randn(2, 2, 4, 4), -1) for _ in range(2)]
    before = (layer_loss(other, hidden, mask, [(0, 0), (1, 1)]),
              attention_loss(other_attention, attention, mask, [(0, 0), (1, 1)]))
    assert abs(before[0] - 0.01) < 1e-6  # 0.1 squared on every dimension of every real token
    for h in other:  # the student's padding position changes; nothing it is charged for does
        h[0, 3] += 100
    for a in other_attention:
        a[0, :, 3] = torch.softmax(torch.randn(2, 4) * 10, -1)
    after = (layer_loss(other, hidden, mask, [(0, 0), (1, 1)]),
             attention_loss(other_attention, attention, mask, [(0, 0), (1, 1)]))
    assert torch.allclose(torch.stack(before), torch.stack(after))


@pytest.mark.parametrize("spec, zeroed", [
    ({"model_type": "bert", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "hidden_size": 384},
     ("hidden_dropout_prob", "attention_probs_dropout_prob")),
    ({"model_type": "gpt2", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "n_embd": 256},
     ("resid_pdrop", "embd_pdrop", "attn_pdrop")),
])
def test_a_student_trains_without_dropout_and_eagerly_when_its_attention_is_read(spec, zeroed):
    from mass.compression.distill import training_spec

    trained = training_spec(spec, eager=True)
    assert all(trained[k] == 0.0 for k in zeroed) and trained["attn_implementation"] == "eager"
    assert {k: v for k, v in trained.items() if k not in zeroed and k != "attn_implementation"} == \
        {k: v for k, v in spec.items() if k not in zeroed}
    assert "attn_implementation" not in training_spec(spec)


def test_a_users_data_file_trains_instead_of_the_corpus_less_the_texts_the_card_measures_on(tmp_path, caplog):
    import json

    from mass.compression.card import causal_texts, eval_texts
    from mass.compression.distill import train_blocks, train_texts
    from mass.data.tokenizer import train_tokenizer

    mine = [f"support chat {i}: the printer on floor {i} is out of toner again" for i in range(6)]
    held_out = eval_texts()[0][0]  # a query the card measures students on
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*mine, held_out]))
    with caplog.at_level("WARNING", logger="mass.compression.distill"):
        texts = train_texts(data=str(path), seed=1)
    assert sorted(texts) == sorted(mine)  # the file's texts, not the corpus's, and never a held-out one
    assert "1 of its 7 texts are held-out texts the card measures on" in caplog.text  # and the user is told
    assert len(train_texts(limit=4, data=str(path))) == 4

    # a causal LM's card measures perplexity on these (one without a blank line: .txt documents are cut at them)
    document = next(t for t in causal_texts() if "\n\n" not in t)
    txt = tmp_path / "chats.txt"
    txt.write_text("\n\n".join([*mine, document]))
    tokenizer = train_tokenizer(mine * 20, vocab_size=300, model_max_length=64)
    blocks = train_blocks(tokenizer, 8, data=str(txt))
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in mine) // 8
    assert blocks.shape == (expected, 8)  # the file's six documents packed, the card's document left out


def test_a_data_file_that_cannot_train_a_student_is_refused_by_name(tmp_path):
    import json

    from mass.compression.card import eval_texts
    from mass.compression.distill import train_texts
    from mass.errors import DataError

    with pytest.raises(DataError, match="data file not found"):
        train_texts(data=str(tmp_path / "missing.jsonl"))
    only_held_out = tmp_path / "held.jsonl"
    only_held_out.write_text(json.dumps({"text": eval_texts()[1][0]}) + "\n")
    with pytest.raises(DataError, match=r"held\.jsonl: every one of its 1 texts is one the card measures"):
        train_texts(data=str(only_held_out))
    wrong = tmp_path / "chats.csv"
    wrong.write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported data format '.csv'"):
        train_texts(data=str(wrong))


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively_and_an_unknown_one_is_refused(
        monkeypatch, caplog):
    import mass.hardware
    from mass.compression.distill import training_precision

    monkeypatch.setattr(mass.hardware, "native_bf16", lambda device="cpu": True)
    assert training_precision("auto") == "bf16" and training_precision("fp32") == "fp32"
    monkeypatch.setattr(mass.hardware, "native_bf16", lambda device="cpu": False)
    assert training_precision("auto") == "fp32"
    with caplog.at_level("WARNING"):
        assert training_precision("bf16") == "bf16"  # asked for: done, with a warning that it is emulated here
    assert "no native bfloat16" in caplog.text
    with pytest.raises(ConfigError, match="precision 'fp16': give one of auto, fp32, bf16"):
        training_precision("fp16")


def test_the_losses_under_bf16_autocast_are_fp32_and_close_to_the_fp32_ones():
    """bf16 training computes the matrix products in bfloat16; the losses read them in fp32 and stay within a
    few percent of the fp32 losses (a student of other layers than the teacher's: the losses are not zero)."""
    from transformers import AutoTokenizer

    from mass.compression.distill import _pooled, attention_loss, layer_loss

    teacher, student = _minilm_pair([0, 2])
    batch = AutoTokenizer.from_pretrained(minilm_dir())(["a short text", "a longer text that pads the other one"],
                                                       padding=True, return_tensors="pt")
    flags, mask, pairs = {"output_hidden_states": True, "output_attentions": True}, batch["attention_mask"], [(0, 1),
                                                                                                             (1, 3)]
    losses = {}
    for bf16 in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            mine, theirs = student(**batch, **flags), teacher(**batch, **flags)
            query = student.encoder.layer[0].attention.self.query(mine.hidden_states[0])
            assert (query.dtype == torch.bfloat16) == bf16  # the layers' matrix products ran in bf16
            losses[bf16] = torch.stack([layer_loss(mine.hidden_states, theirs.hidden_states, mask, pairs),
                                        attention_loss(mine.attentions, theirs.attentions, mask, pairs),
                                        _pooled(mine.last_hidden_state, mask).norm()])
    assert losses[True].dtype == torch.float32 and (losses[False] > 1e-3).all()
    assert torch.allclose(losses[True], losses[False], rtol=0.05) and not torch.equal(losses[True], losses[False])
