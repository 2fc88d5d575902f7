"""Hugging Face tokenizer directories through generate, serve and SFT, against transformers.

Two directories are built locally with the `tokenizers` library (no download): a Llama-3-style one
(<|begin_of_text|> added by tokenizer.json's post-processor, the <|start_header_id|>...<|eot_id|> template in
tokenizer_config.json, three eos ids in generation_config.json) and a ChatML one written by transformers'
own save_pretrained (chat_template.jinja beside tokenizer_config.json). transformers'
PreTrainedTokenizerFast loaded from the same directory is the reference for rendered prompts, token ids
and assistant masks. Stopping is checked with a "chain" model whose greedy next token is a chosen
function of the current token, so the test knows exactly which token comes when.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import openai
import pytest
from flax import nnx
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from jaxformer.config import ModelConfig
from jaxformer.data.tokenizer import copy_tokenizer_files, load_tokenizer
from jaxformer.finetune import sft
from jaxformer.infer import Engine, SamplingParams, generate
from jaxformer.models import DecoderLM
from jaxformer.serve import ServerThread, create_app

TEXT = ("Hello there, how are you? I am fine, thank you. The quick brown fox jumps over the lazy dog. "
        "Write a loop in Python: for i in range(10): print(i)\n") * 4
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eom_id|>", "<|eot_id|>")
# Meta-Llama-3-8B-Instruct's template, verbatim
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# the same text, with the assistant replies marked for transformers' return_assistant_tokens_mask
LLAMA3_MARKED = ("{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
                 "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
                 "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
                 "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's ChatML template (no tools)
CHATML_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                   "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_MARKED = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
                 "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
                 "{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "how are you?"},
     {"role": "assistant", "content": " I am fine, thank you "}, {"role": "user", "content": "A loop in Python?"},
     {"role": "assistant", "content": "for i in range(10): print(i)"}],
    [{"role": "user", "content": "The quick brown fox"}, {"role": "assistant", "content": "jumps over the lazy dog."}],
]


def bpe(specials, post_processor=None) -> HFTokenizer:
    """Byte-level BPE (~300 tokens) with `specials` first, as the Llama 3 and Qwen tokenizers are built."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = post_processor(tok) if post_processor else processors.ByteLevel(trim_offsets=False)
    return tok


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """Llama-3.x-Instruct's layout: BOS from the post-processor, eos ids in generation_config.json."""
    d = tmp_path_factory.mktemp("llama3_tok")
    tok = bpe(LLAMA3_SPECIALS, lambda t: processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", t.token_to_id("<|begin_of_text|>"))])]))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE, "clean_up_tokenization_spaces": True, "model_max_length": 131072}))
    ids = [tok.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": ids}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": ids[0]}))  # not read: gen wins
    return d


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """Qwen2.5 (base)'s layout as transformers 5 saves it: chat_template.jinja, eos <|endoftext|>, no BOS."""
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("chatml_tok")
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe(CHATML_SPECIALS), eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    hf.save_pretrained(str(d))
    assert (d / "chat_template.jinja").is_file() and "chat_template" not in json.loads(
        (d / "tokenizer_config.json").read_text())
    return d


def reference(path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


@pytest.mark.parametrize("which", ["llama3", "chatml"])
def test_prompts_and_ids_equal_transformers(which, llama3_dir, chatml_dir):
    path = llama3_dir if which == "llama3" else chatml_dir
    tok, ref = load_tokenizer(path), reference(path)
    for chat in CHATS:
        for gen in (True, False):
            want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == want
            assert tok.encode_chat(chat, add_generation_prompt=gen) == ref.apply_chat_template(
                chat, add_generation_prompt=gen)["input_ids"]
    for text in ("Hello there", "def f(x):\n    return x  # ünïcode"):
        assert tok.encode_prompt(text) == ref(text)["input_ids"]
    prompt, chat_ids = tok.encode_prompt("Hello"), tok.encode_chat(CHATS[1])
    if which == "llama3":  # BOS once: from the post-processor for text, from the template for chats
        bos = tok.token_id("<|begin_of_text|>")
        assert prompt[0] == bos == chat_ids[0] and prompt.count(bos) == chat_ids.count(bos) == 1
        assert tok.eos_ids == {tok.token_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
    else:
        assert prompt == tok.encode("Hello") and chat_ids[0] == tok.token_id("<|im_start|>")
        assert tok.eos_ids == {tok.token_id("<|endoftext|>")}
        assert tok.chat_stop_ids == {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")}


def test_template_environment_equals_transformers(chatml_dir):
    """Loop controls, namespace, tojson (no HTML escaping, non-ASCII kept), tools=None, strftime_now, the named
    special tokens, {% generation %} marks: what real templates (Llama 3.1, Qwen2.5, SmolLM) lean on."""
    from jaxformer.data.tokenizer import Tokenizer

    template = ("{%- set ns = namespace(n=0) %}{%- for m in messages %}{%- if m.role == 'system' %}{% continue %}"
                "{% endif %}{%- set ns.n = ns.n + 1 %}{{ m.role | upper }} {% generation %}{{ m.content | tojson }}"
                "{% endgeneration %}\n{%- if ns.n > 1 %}{% break %}{% endif %}{%- endfor %}{{ ns.n }} {{ eos_token }}"
                "{% if tools is not none %}tools{% endif %}{{ strftime_now('%Y') }}{{ bos_token is defined }}")
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "<b>ünï</b> & 'x'"},
            {"role": "assistant", "content": "ok", "tool_calls": None}, {"role": "user", "content": "unseen"}]
    config = {**json.loads((chatml_dir / "tokenizer_config.json").read_text()), "chat_template": template}
    tok = Tokenizer(load_tokenizer(chatml_dir).tok, config)
    want = reference(chatml_dir).apply_chat_template(chat, tokenize=False, chat_template=template)
    assert tok.apply_chat_template(chat, add_generation_prompt=False) == want
    assert '"<b>ünï</b> & \'x\'"' in want and "unseen" not in want and "tools" not in want


def test_chat_template_file_wins_and_travels(chatml_dir, tmp_path):
    config = json.loads((chatml_dir / "tokenizer_config.json").read_text())
    src = tmp_path / "src"
    shutil.copytree(chatml_dir, src)
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'stale' }}"}))
    chat = CHATS[2]
    want = reference(src).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "stale" not in want and load_tokenizer(src).apply_chat_template(chat) == want
    dst = tmp_path / "dst"
    dst.mkdir()
    copy_tokenizer_files(src, dst)  # what a fine-tuned or quantized model directory carries
    assert load_tokenizer(dst).apply_chat_template(chat) == want


def test_no_template_is_a_clear_error(tmp_path):
    bpe(CHATML_SPECIALS).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.encode_prompt("Hello") == reference(tmp_path)("Hello")["input_ids"]
    with pytest.raises(ValueError, match="no chat template.*chat_template.jinja"):
        tok.apply_chat_template(CHATS[0])


@pytest.mark.parametrize("which", ["llama3", "chatml"])
def test_sft_masks_follow_the_template(which, llama3_dir, chatml_dir):
    """Trained tokens == transformers' assistant mask under the same template with {% generation %} marks."""
    path = llama3_dir if which == "llama3" else chatml_dir
    marked, plain = (LLAMA3_MARKED, LLAMA3_TEMPLATE) if which == "llama3" else (CHATML_MARKED, CHATML_TEMPLATE)
    tok, ref = load_tokenizer(path), reference(path)
    for chat in CHATS[1:]:
        assert ref.apply_chat_template(chat, tokenize=False, chat_template=marked) == ref.apply_chat_template(
            chat, tokenize=False, chat_template=plain)  # the marks change no text
        out = ref.apply_chat_template(chat, chat_template=marked, return_dict=True, return_assistant_tokens_mask=True)
        ids, trained = sft.render(chat, tok)
        assert ids == out["input_ids"] and trained == [bool(m) for m in out["assistant_masks"]]
        prompt = tok.encode_chat(chat[:-1])  # what the server feeds for the last reply: a prefix
        assert ids[:len(prompt)] == prompt and not trained[len(prompt) - 1] and trained[len(prompt)]
        replies = [i for i, t in zip(ids, trained) if t]
        ends = [tok.token_id("<|eot_id|>" if which == "llama3" else "<|im_end|>")]
        assert replies.count(ends[0]) == sum(m["role"] == "assistant" for m in chat)  # each reply ends its turn


def chain_model(vocab: int, successor: dict[int, int]) -> DecoderLM:
    """A 1-layer Llama whose greedy next token is successor[current token] (0 for tokens not in it).

    Attention and MLP outputs are zeroed, so logits = lm_head(rmsnorm(embedding)); orthonormal embeddings
    and lm_head rows equal to the predecessor's embedding make the successor's logit sqrt(D), all others 0.
    """
    cfg = ModelConfig.llama(vocab_size=vocab, d_model=vocab, n_layers=1, n_heads=4, d_ff=16, max_seq_len=64)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    emb = np.linalg.qr(np.random.default_rng(0).normal(size=(vocab, vocab)))[0].astype(np.float32)  # rows: |e|=1
    head = np.zeros((vocab, vocab), np.float32)
    for cur, nxt in successor.items():
        head[nxt] += emb[cur]
    model.embed_tokens.weight[...] = emb
    model.lm_head.weight[...] = head
    for layer in model.layers:
        layer.self_attn.o_proj.weight[...] = np.zeros_like(layer.self_attn.o_proj.weight[...])
        layer.mlp.down_proj.weight[...] = np.zeros_like(layer.mlp.down_proj.weight[...])
    return model


def distinct_words(tok, n: int, avoid: set[int]) -> list[int]:
    """n different ordinary tokens of TEXT, none in `avoid`."""
    ids = list(dict.fromkeys(tok.encode(TEXT)))
    return [i for i in ids if i not in avoid and tok.token_text(i).strip()][:n]


def test_generation_stops_at_each_eos_id_of_generation_config(llama3_dir):
    tok = load_tokenizer(llama3_dir)
    eos = [tok.token_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    prompts = [tok.encode_prompt(p) for p in ("Hello there", "how are you?", "the lazy dog.")]
    assert len({p[-1] for p in prompts}) == 3  # each prompt starts its own chain
    words = distinct_words(tok, 6, {p[-1] for p in prompts})
    successor = {}
    for prompt, word, stop, after in zip(prompts, words[:3], eos, words[3:]):  # prompt -> word -> eos -> more
        successor.update({prompt[-1]: word, word: stop, stop: after})
    engine = Engine(chain_model(304, successor), max_batch=2)  # the serve test's shapes: compiled steps are shared
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    free = generate(engine, prompts, params, tokenizer=tok)  # no stop ids: the model runs past every eos
    assert [s.tokens[:3] for s in free] == [[w, e, a] for w, e, a in zip(words, eos, words[3:])]
    stopped = generate(engine, prompts, params, tokenizer=tok, stop_ids=tok.eos_ids)
    assert [(s.tokens, s.finish_reason) for s in stopped] == [([w], "stop") for w in words[:3]]
    assert [s.text for s in stopped] == [tok.decode([w]) for w in words[:3]]


def test_serve_chat_stops_at_end_of_turn(chatml_dir):
    """Chat replies end at the end-of-turn <|im_end|>; a completion of the same ids runs on to the eos
    (<|endoftext|>, as Qwen2.5 base names it)."""
    tok = load_tokenizer(chatml_dir)
    messages = [{"role": "user", "content": "how are you?"}]
    prompt = tok.encode_chat(messages)
    fine, thanks = distinct_words(tok, 2, {prompt[-1]})
    im_end, eot = tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")
    model = chain_model(304, {prompt[-1]: fine, fine: im_end, im_end: thanks, thanks: eot, eot: fine})
    srv = ServerThread(create_app(model, tok, model_name="chain", max_batch=2, max_queue=4)).start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="chain", messages=messages, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == tok.decode([fine]) and r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 1
        c = client.completions.create(model="chain", prompt=prompt, max_tokens=8, temperature=0)
        assert c.choices[0].text == tok.decode([fine, im_end, thanks])  # special tokens are not shown
        assert c.choices[0].finish_reason == "stop" and c.usage.completion_tokens == 3
    finally:
        srv.stop()


GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")
# Gemma 3's text template (Gemma 3n and 4 keep its turns): the system message folded into the first user turn,
# roles checked with raise_exception, "assistant" written as "model", contents trimmed
GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
    "'\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")


def test_gemma_template_equals_transformers(tmp_path):
    """Gemma's layout (BOS from the post-processor and the template alike, <end_of_turn> as the chat's stop): prompts
    and ids equal transformers'; a conversation the template rejects is an error naming its message."""
    tok = bpe(GEMMA_SPECIALS, lambda t: processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B:1",
                                      special_tokens=[("<bos>", t.token_to_id("<bos>"))])]))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "chat_template": GEMMA_TEMPLATE}))
    ids = [tok.token_to_id(t) for t in ("<eos>", "<end_of_turn>")]
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": ids}))
    ours, ref = load_tokenizer(tmp_path), reference(tmp_path)
    for chat in CHATS:
        for gen in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == ref.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=gen)
            assert ours.encode_chat(chat, add_generation_prompt=gen) == ref.apply_chat_template(
                chat, add_generation_prompt=gen)["input_ids"]
    assert ours.encode_chat(CHATS[1]).count(ours.token_id("<bos>")) == 1
    assert ours.eos_ids == set(ids)
    from jinja2.exceptions import TemplateError  # what transformers raises too; the server answers it with a 400

    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "first"}])
