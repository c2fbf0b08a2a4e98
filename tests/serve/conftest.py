"""The model the serving tests serve: an export folder of a small MoD model (controlled causal
decision, two routed blocks) that reads the tiny tokenizer, its weights random at a scale large
enough that greedy continuations vary (an untrained model at the usual scale repeats its last
token, which would test no decoding). Its end-of-text token's output row is zero, so a greedy
continuation never ends before ``max_tokens`` (the tests that need a request to keep running rely
on it; the end-of-text token's own path is tested with the engine)."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from modlm import ModelConfig, MoDTransformer
from modlm.data.tokenizer import end_of_text_id


@pytest.fixture(scope="session")
def model_folder(tiny_tokenizer, tmp_path_factory) -> Path:
    text = Path(tiny_tokenizer[1]).read_text()
    tokenizer = Tokenizer.from_str(text)
    torch.manual_seed(0)
    model = MoDTransformer(
        ModelConfig(
            vocab_size=tokenizer.get_vocab_size(),
            d_model=64,
            n_layers=4,
            n_heads=4,
            max_seq_len=8192,
            capacity=0.5,
            init_std=0.2,
        )
    ).eval()
    with torch.no_grad():
        model.lm_head.weight[end_of_text_id(tokenizer)] = 0
    model.tokenizer_json = text
    folder = tmp_path_factory.mktemp("served") / "model"
    model.save_pretrained(folder)
    return folder
