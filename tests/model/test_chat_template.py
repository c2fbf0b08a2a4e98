"""A model's chat template travels with it: read from transformers folders (``chat_template.jinja`` or
``tokenizer_config.json``), kept by ``save_pretrained``/``from_pretrained``, written by both kinds of
``to_hf`` export (whose tokenizer then keeps special tokens whole, so transformers tokenizes a conversation
as modlm does), and read back by ``load_saved``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from modlm import ModelConfig, MoDTransformer
from modlm.data.chat import ChatEncoder
from modlm.model.chat_template import CHAT_TEMPLATE_FILE, read_chat_template
from modlm.model.errors import UserError
from modlm.saved import load_saved
from tests.helpers.chat import CHATML_TEMPLATE, CONVERSATION, chatml_tokenizer_folder
from tests.helpers.pretrained import pretrained_folder

os.environ.setdefault("HF_MODULES_CACHE", str(Path(tempfile.gettempdir()) / "modlm-test-hf-modules"))
transformers = pytest.importorskip("transformers")


def test_a_folder_keeps_its_template_in_either_place(tmp_path):
    assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert read_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "A"}))
    assert read_chat_template(tmp_path) == "A"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert read_chat_template(tmp_path) == "D"
    (tmp_path / CHAT_TEMPLATE_FILE).write_text("J")  # transformers 5's file wins, as transformers reads it
    assert read_chat_template(tmp_path) == "J"
    (tmp_path / CHAT_TEMPLATE_FILE).unlink()
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="is not a JSON object"):
        read_chat_template(tmp_path)


@pytest.fixture(scope="module")
def llama_chat(tmp_path_factory, tiny_tokenizer) -> Path:
    """A transformers Llama whose tokenizer (ChatML tokens) has its template in tokenizer_config.json."""
    folder = pretrained_folder(tmp_path_factory.mktemp("llama") / "llama", "llama-gqa-untied")
    chatml_tokenizer_folder(folder, tiny_tokenizer[0])
    return folder


def test_the_template_travels_through_every_folder(llama_chat, tmp_path):
    model = MoDTransformer.from_hf(llama_chat)
    assert model.chat_template == CHATML_TEMPLATE
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / CHAT_TEMPLATE_FILE).read_text() == CHATML_TEMPLATE
    assert MoDTransformer.from_pretrained(tmp_path / "saved").chat_template == CHATML_TEMPLATE
    assert load_saved(str(llama_chat)).chat_template == CHATML_TEMPLATE

    for kind, converted in (("standard", model), ("remote-code", MoDTransformer.from_hf(llama_chat, route_every=2))):
        folder = tmp_path / kind
        assert converted.to_hf(folder) == kind
        assert (folder / CHAT_TEMPLATE_FILE).read_text() == CHATML_TEMPLATE
        assert json.loads((folder / "tokenizer_config.json").read_text())["split_special_tokens"] is False
        assert load_saved(str(folder)).chat_template == CHATML_TEMPLATE
        hf = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        encoder = ChatEncoder(converted.tokenizer_json, converted.chat_template)
        for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:4], True)):
            want = encoder.encode(messages, prompt)[0]
            assert hf.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=False) == want


def test_a_model_without_a_template_exports_as_before(tiny_tokenizer, tmp_path):
    from modlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer[1])
    torch.manual_seed(0)
    model = MoDTransformer(
        ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=2, max_seq_len=32, route_every=0)
    )
    assert model.chat_template is None
    model.to_hf(tmp_path / "plain", tok)
    assert not (tmp_path / "plain" / CHAT_TEMPLATE_FILE).exists()
    assert json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())["split_special_tokens"] is True
    assert load_saved(str(tmp_path / "plain")).chat_template is None


def test_a_checkpoint_carries_its_template(llama_chat, tmp_path):
    """The key a run writes (``chat_template``) is read back onto the model, which exports it."""
    from modlm.model.version import VERSION_KEY, written_by
    from modlm.saved.travel import CHAT_TEMPLATE_KEY

    model = MoDTransformer.from_hf(llama_chat)
    ckpt = {
        VERSION_KEY: written_by(),
        "hyper_parameters": model.config.to_dict(),
        "global_step": 0,
        CHAT_TEMPLATE_KEY: CHATML_TEMPLATE,
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
    }
    torch.save(ckpt, tmp_path / "a.ckpt")
    del ckpt[CHAT_TEMPLATE_KEY]
    torch.save(ckpt, tmp_path / "b.ckpt")
    saved = load_saved(str(tmp_path / "a.ckpt"))
    assert saved.chat_template == saved.model.chat_template == CHATML_TEMPLATE
    assert load_saved(str(tmp_path / "b.ckpt")).chat_template is None
