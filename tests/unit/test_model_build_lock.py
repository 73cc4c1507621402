"""Models built side by side in threads of one process (a compression pipeline's steps) keep their tied weights:
transformers swaps ``PreTrainedModel.tie_weights`` for a no-op while it builds a model, and two builds at once
could leave the no-op in place for the rest of the process."""

import threading

import pytest
import torch


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("gpt")
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                            eos_token="[UNK]").save_pretrained(path)
    return path


def test_models_loaded_and_built_in_threads_at_once_keep_their_tied_head(gpt_dir):
    from transformers import PreTrainedModel

    from mass.compression.arch import build
    from mass.models import load_hf_dir

    original = PreTrainedModel.tie_weights
    spec = {"model_type": "gpt2", "vocab_size": 256, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2}
    errors = []

    def work(i):
        try:
            for _ in range(15):
                model = load_hf_dir(gpt_dir, "text-generation")[0] if i % 2 else build(spec)
                assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert PreTrainedModel.tie_weights is original  # nothing left patched for the rest of the process
    model, _ = load_hf_dir(gpt_dir, "text-generation")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert model.lm_head.weight.device == torch.device("cpu")
