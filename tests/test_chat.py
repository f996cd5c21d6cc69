"""Chat templates against transformers' apply_chat_template, and assistant spans on the real
conversations."""
from __future__ import annotations

import pytest

from eeyore.model.chat import LLAMA3_TEMPLATE, ChatTemplate, TemplateError, tokenize_conversation
from eeyore.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llama3(llama3_path) -> Tokenizer:
    """The real Llama 3 tokenizer carrying the reference's template (a fresh copy: it is changed)."""
    tok = Tokenizer.from_pretrained(llama3_path)
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def hf_llama3(llama3, tmp_path_factory):
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("llama3")
    llama3.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def _until_last_assistant(conv: list[dict]) -> list[dict]:
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    return conv[: last + 1]


def _ids(encoded) -> list[int]:
    return encoded if isinstance(encoded, list) else encoded["input_ids"]


def test_llama3_template_renders_like_transformers(llama3, hf_llama3, conversations):
    template = ChatTemplate.for_tokenizer(llama3)
    for conv in conversations:
        for prompt in (False, True):
            ours = template.render(conv, add_generation_prompt=prompt)
            assert ours == hf_llama3.apply_chat_template(conv, tokenize=False, add_generation_prompt=prompt)
        assert ours.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
        assert ours.count("<|begin_of_text|>") == 1
        assert ours.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def _expected_llama3(tok: Tokenizer, conv: list[dict]) -> tuple[list[int], list[bool]]:
    """Ids and assistant-target mask built piece by piece: headers and eot are special tokens, so
    the text between them tokenizes on its own."""
    ids, mask = [tok.bos_id], [False]
    for m in conv:
        header = tok.encode(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n")
        body = tok.encode(m["content"].strip()) + tok.encode("<|eot_id|>")
        ids += header + body
        mask += [False] * len(header) + [m["role"] == "assistant"] * len(body)
    return ids, mask


def test_llama3_assistant_spans(llama3, hf_llama3, conversations):
    for conv in conversations:
        ids, spans = tokenize_conversation(llama3, conv)
        kept = _until_last_assistant(conv)  # what follows the last assistant turn is dropped
        assert ids == _ids(hf_llama3.apply_chat_template(kept, tokenize=True))
        assistant = [m["content"] for m in kept if m["role"] == "assistant"]
        assert [llama3.decode(ids[s:e]) for s, e in spans] == [c.strip() + "<|eot_id|>" for c in assistant]
        mask = [any(s <= i < e for s, e in spans) for i in range(len(ids))]
        assert (ids, mask) == _expected_llama3(llama3, kept)


def test_chatml_spans_on_converted_smollm2(smollm2_dir, conversations):
    from transformers import AutoTokenizer

    tok = Tokenizer.from_pretrained(smollm2_dir)
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    for conv in conversations[:4]:
        ids, spans = tokenize_conversation(tok, conv)
        kept = _until_last_assistant(conv)
        assert ids == _ids(hf.apply_chat_template(kept, tokenize=True))
        assistant = [m["content"] for m in kept if m["role"] == "assistant"]
        # ChatML keeps the content as is; the newline after <|im_end|> is not a target
        assert [tok.decode(ids[s:e]) for s, e in spans] == [c + "<|im_end|>" for c in assistant]
        assert all(ids[e] == tok.encode("\n")[0] for s, e in spans)


def test_conversation_without_assistant_has_no_spans(llama3):
    ids, spans = tokenize_conversation(llama3, [{"role": "system", "content": "p"}, {"role": "user", "content": "hi"}])
    assert spans == [] and ids[0] == llama3.bos_id


def test_text_instability_raises(llama3):
    counting = "{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(TemplateError, match="not prefix-stable at message 1"):
        tokenize_conversation(llama3, conv, template=counting)


def test_token_instability_raises(llama3):
    # The generation prompt ends in a space that merges with the reply's first word ("Ġhello").
    spaced = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(TemplateError, match="tokens are not prefix-stable at message 1"):
        tokenize_conversation(llama3, conv, template=spaced)


def test_render_prompt(llama3):
    template = ChatTemplate.for_tokenizer(llama3)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " I feel  "}]
    assert template.render_prompt(conv).endswith("I feel<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert template.render_prompt(conv, continue_final=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nI feel"
    )
    with pytest.raises(ValueError, match="last message to be an assistant"):
        template.render_prompt(conv[:1], continue_final=True)


def test_template_sources_and_errors(llama3, tmp_path):
    bare = Tokenizer(llama3.backend, bos_token="<|begin_of_text|>", source="bare")
    with pytest.raises(TemplateError, match="bare has no chat template"):
        ChatTemplate.for_tokenizer(bare)
    assert ChatTemplate.for_tokenizer(bare, "llama3").source == LLAMA3_TEMPLATE
    (tmp_path / "t.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] | tojson }}")
    rendered = ChatTemplate.for_tokenizer(bare, str(tmp_path / "t.jinja")).render([{"role": "user", "content": "<é>"}])
    assert rendered == '<|begin_of_text|>"<é>"'  # HF's tojson: no HTML or ASCII escaping
    failing = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        failing.render([])
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(TemplateError, match="failed to render"):  # the sandbox blocks attribute escapes
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(ValueError, match=r"messages\[1\] \(user\) must have a string 'content'"):
        ChatTemplate(LLAMA3_TEMPLATE).render([{"role": "user", "content": "a"}, {"role": "user", "content": None}])
