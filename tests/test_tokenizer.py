"""router.tokenizer against the real Qwen2 tokenizer files, with transformers as the reference."""

import copy
import json
import shutil

import pytest
from transformers import AutoTokenizer

from router.tokenizer import ChatTemplateError, Tokenizer
from shards.checkpoint import TOKENIZER_FILES, preset_config, write_random_checkpoint

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643

# Qwen2-Instruct's template: inserts a default system prompt when the conversation has none.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Exercises what the environment must get right: trim_blocks/lstrip_blocks on indented block tags,
# loopcontrols, namespace(), dict(), the tojson filter (no HTML escaping, non-ASCII kept, options),
# the special-token variables, and {% generation %}.
FEATURE_TEMPLATE = """{{ bos_token or '' }}[{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}]
{% set ns = namespace(n=0) %}
    {% for m in messages %}
        {% if m.role == 'stop' %}
            {% break %}
        {% endif %}
        {% if m.role == 'skip' %}{% continue %}{% endif %}
        {% set ns.n = ns.n + 1 %}
  <{{ m.role }}> {{ m.content | tojson }} {{ m | tojson(indent=2, sort_keys=True) }}
        {% generation %}{{ m.content | length }}{% endgeneration %}
    {% endfor %}
{{ dict(a=1, b='é<&>') | tojson(separators=(',', ':')) }} n={{ ns.n }}
{% if add_generation_prompt %}
GEN
{% endif %}
{{ tools | tojson }} {{ documents is none }}
"""

CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Give me a short introduction to large language models."},
    ],
    "no-system": [{"role": "user", "content": "Hello!"}],
    "multi-turn": [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
        {"role": "user", "content": "Thanks"},
    ],
    "unicode": [
        {"role": "user", "content": "你好，世界！🌍 Ça va? \"quotes\" <tags> & \\backslash\n\tnew line"},
        {"role": "assistant", "content": "😀 很好 — «merci»"},
        {"role": "user", "content": "emoji family 👨‍👩‍👧 and combining é"},
    ],
    "reasoning": [
        {"role": "user", "content": "Think first."},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nDone."},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Sure", "reasoning_content": "short"},
    ],
    "tool-calls": [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}},
            {"type": "function", "function": {"name": "get_time", "arguments": "{\"tz\": \"CET\"}"}},
        ]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "12:00"},
        {"role": "user", "content": "Thanks", "name": None},
    ],
}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville <html> & co",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), preset_config("tiny") | {"num_hidden_layers": 1})


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def with_template(tok, template):
    t = copy.copy(tok)
    t.chat_template = template
    return t


def tokenizer_dir(src, dst, *, config_update=None, drop=(), generation_config=None):
    """A copy of the tokenizer files in `dst`, with tokenizer_config.json edited."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, dst / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(config_update or {})
    for key in drop:
        config.pop(key, None)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    if generation_config is not None:
        (dst / "generation_config.json").write_text(json.dumps(generation_config))
    return dst


# --- encode / decode ---


def test_documented_examples(tok):
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode(" Hello world") == [21927, 1879]
    assert tok.decode([9707, 1879]) == "Hello world"


@pytest.mark.parametrize("text", [
    "中文分词测试：你好，世界！",
    "emoji 😀🎉👨‍👩‍👧‍👦 flags 🇨🇭🇯🇵 and a rare 𠀋 character",
    "def f(x):\n    return {'a': [x ** 2, \"s\"]}  # comment\n\n\tif x != 0: pass\r\n",
    "   leading and trailing spaces   \n\n\n",
    "",
])
def test_round_trip_matches_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf.decode(ids)


def test_special_tokens_in_text(tok, hf):
    text = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><think>x</think>"
    ids = tok.encode(text)
    assert ids[0] == IM_START and IM_END in ids and ENDOFTEXT in ids
    assert ids == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids) == "user\nhi\n<think>x</think>"  # <think> is an added token but not special


def test_vocab_special_ids_and_id_to_token(tok, hf):
    assert tok.vocab_size == len(hf) == 151669
    assert tok.special_ids == set(hf.all_special_ids)
    assert {IM_START, IM_END, ENDOFTEXT} <= tok.special_ids
    assert tok.id_to_token(IM_START) == "<|im_start|>"
    assert tok.id_to_token(9707) == "Hello"
    assert tok.id_to_token(21927) == "ĠHello"  # byte-level form
    assert tok.id_to_token(tok.vocab_size + 10) is None


# --- chat template ---


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_transformers(tok, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_default_generation_prompt(tok):
    rendered = tok.apply_chat_template(CONVERSATIONS["no-system"])
    assert rendered == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_tools_and_kwargs_match_transformers(tok, hf):
    messages = CONVERSATIONS["tool-calls"]
    expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True,
                                      enable_thinking=False)
    assert tok.apply_chat_template(messages, tools=TOOLS, enable_thinking=False) == expected
    assert "Météo d'une ville <html> & co" in expected  # tojson: no escaping, non-ASCII kept


def test_qwen2_default_system_prompt(tok, hf, model_dir, tmp_path):
    qwen2 = Tokenizer.from_pretrained(tokenizer_dir(model_dir, tmp_path / "q2", config_update={"chat_template": QWEN2_TEMPLATE}))
    assert qwen2.chat_template == QWEN2_TEMPLATE
    for messages in CONVERSATIONS.values():
        if any("tool_calls" in m for m in messages):
            continue
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, chat_template=QWEN2_TEMPLATE, tokenize=False,
                                              add_generation_prompt=gen)
            assert qwen2.apply_chat_template(messages, add_generation_prompt=gen) == expected
    rendered = qwen2.apply_chat_template(CONVERSATIONS["no-system"])
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")


def test_environment_features_match_transformers(tok, hf):
    custom = with_template(tok, FEATURE_TEMPLATE)
    messages = [{"role": "user", "content": "a<b>&'é"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "😀", "extra": [1, 2.5, None, True]},
                {"role": "stop", "content": "z"}, {"role": "user", "content": "never"}]
    for gen in (True, False):
        expected = hf.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, tokenize=False,
                                          add_generation_prompt=gen)
        assert custom.apply_chat_template(messages, add_generation_prompt=gen) == expected
    assert "never" not in expected and "n=2" in expected


def test_separate_chat_template_file_takes_priority(model_dir, tmp_path):
    d = tokenizer_dir(model_dir, tmp_path / "jinja")
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }};{% endfor %}")
    assert Tokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": "x"}]) == "x;"


def test_raise_exception_becomes_chat_template_error(tok):
    template = ("{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
                "{{ raise_exception('Conversation roles must be user or assistant, got ' + m.role) }}"
                "{% endif %}{{ m.content }}{% endfor %}")
    t = with_template(tok, template)
    assert t.apply_chat_template([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="roles must be user or assistant, got system"):
        t.apply_chat_template([{"role": "system", "content": "s"}])


def test_missing_template_is_a_clear_error(model_dir, tmp_path):
    t = Tokenizer.from_pretrained(tokenizer_dir(model_dir, tmp_path / "m", drop=["chat_template"]))
    assert t.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])
    assert t.encode("Hello world") == [9707, 1879]  # plain text still works


def test_broken_templates_and_messages(tok):
    bad = with_template(tok, "{% for %}")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        bad.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([])  # Qwen's template reads messages[0]
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template(["not a dict"])
    assert issubclass(ChatTemplateError, ValueError)


def test_sandbox_refuses_unsafe_access(tok):
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError, match="unsafe"):
        with_template(tok, template).apply_chat_template([{"role": "user", "content": "x"}])
    mutate = "{% set _ = messages.append(1) %}{{ messages | length }}"
    with pytest.raises(ChatTemplateError, match="unsafe"):
        with_template(tok, mutate).apply_chat_template([{"role": "user", "content": "x"}])
