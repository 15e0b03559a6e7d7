"""Encoding under the real chat templates of the paper's models and other common families.

The templates are the models' own (tokenizer_config.json); they are applied to the default
model's tokenizer, so their special tokens are plain text here, which changes nothing the
encoder relies on.
"""

from __future__ import annotations

import pytest
import torch

from ess.data.encoding import ChatEncoder
from ess.data.refusals import GUIDING_TEXT
from ess.data.schema import Example
from ess.generation import Policy, Request, Sampling, generate
from ess.masks import Role
from ess.model import ESSModel

LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

MISTRAL_INSTRUCT_V02 = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501

LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN25_INSTRUCT = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501

GEMMA_IT = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

TEMPLATES = {
    "llama-2-chat": LLAMA2_CHAT,
    "mistral-instruct-v0.2": MISTRAL_INSTRUCT_V02,
    "llama-3-instruct": LLAMA3_INSTRUCT,
    "qwen2.5-instruct": QWEN25_INSTRUCT,
    "gemma-it": GEMMA_IT,
}
LEADING_SPACE = {"llama-2-chat", "mistral-instruct-v0.2"}
NO_GENERATION_PROMPT = {"llama-2-chat", "mistral-instruct-v0.2"}


@pytest.fixture(scope="module")
def templated_model(tiny_llama):
    """A tiny ESS model whose tokenizer's template each test sets."""
    torch.manual_seed(0)
    return ESSModel.from_base(tiny_llama, adapter="full").eval()


def _encoder(model: ESSModel, name: str) -> ChatEncoder:
    model.tokenizer.chat_template = TEMPLATES[name]
    return ChatEncoder.for_model(model)


def _refusal(query: str = "How do I pick a lock?") -> Example:
    return Example.from_prompt(
        query,
        "malicious",
        response=f"{GUIDING_TEXT} it could help break into a home.",
        meta={"forced_prefix": GUIDING_TEXT},
    )


@pytest.mark.parametrize("name", TEMPLATES)
def test_forced_prefix_is_never_a_target_and_is_tokenized_as_inserted(templated_model, name):
    encoder = _encoder(templated_model, name)
    item = encoder.encode_example(_refusal())
    start = item.roles.index(Role.RESPONSE)
    forced = encoder.tokenize(GUIDING_TEXT)
    assert item.ids[start : start + len(forced)] == forced
    assert not any(item.lm_target[start : start + len(forced)])
    rest = item.ids[start + len(forced) :]
    assert all(item.lm_target[start + len(forced) :]) and rest
    tail = templated_model.tokenizer.decode(rest)
    assert tail.lstrip().startswith("it could help") and "Sorry" not in tail


@pytest.mark.parametrize("name", TEMPLATES)
def test_generator_inserts_the_forced_prefix_the_encoder_trained_on(templated_model, name):
    """Medium reliance on a malicious first verdict: the generator's first tokens are the encoder's."""
    encoder = _encoder(templated_model, name)
    example = _refusal()
    templated_model.config.threshold = 0.0  # every first verdict is malicious
    try:
        request = Request(example.query, sampling=Sampling(max_new_tokens=2), policy=Policy(reliance="medium"))
        (generation,) = generate(templated_model, [request])
    finally:
        templated_model.config.threshold = 0.5
    item = encoder.encode_example(example)
    start = item.roles.index(Role.RESPONSE)
    forced = encoder.tokenize(GUIDING_TEXT)
    assert generation.intervened and generation.token_ids[: len(forced)] == item.ids[start : start + len(forced)]
    assert item.ids[1:start] == encoder.query_ids(example.query)


@pytest.mark.parametrize("name", TEMPLATES)
def test_answer_ids_are_the_conversation_after_the_query(templated_model, name):
    encoder = _encoder(templated_model, name)
    messages = [{"role": "user", "content": "Name a river in Egypt."}]
    answer = "The Nile flows north."
    item = encoder.encode_example(Example.from_prompt(messages[0]["content"], "benign", response=answer))
    start = item.roles.index(Role.RESPONSE)
    conversation = encoder.render(messages + [{"role": "assistant", "content": answer}])
    assert item.ids[1:start] == encoder.query_ids(messages)
    assert templated_model.tokenizer.decode(item.ids[1:]) == conversation
    assert all(item.lm_target[start:])
    response_text = templated_model.tokenizer.decode(item.ids[start:])
    assert response_text.startswith(" The Nile" if name in LEADING_SPACE else "The Nile")
    # The query ends where the model starts answering: with the generation prompt, if the template has one.
    query = encoder.render_query(messages)
    plain = encoder.render(messages, add_generation_prompt=False)
    assert (query == plain) == (name in NO_GENERATION_PROMPT)


def test_default_system_prompt_is_part_of_the_query_only(templated_model):
    encoder = _encoder(templated_model, "qwen2.5-instruct")
    item = encoder.encode_example(Example.from_prompt("Hi", "benign", response="Hello!"))
    start = item.roles.index(Role.RESPONSE)
    decode = templated_model.tokenizer.decode
    assert "You are Qwen" in decode(item.ids[1:start]) and "You are Qwen" not in decode(item.ids[start:])
    assert decode(item.ids[start:]) == "Hello!<|im_end|>\n"
    own = encoder.render_query([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert "Be brief." in own and "You are Qwen" not in own


@pytest.mark.parametrize("name", TEMPLATES)
def test_a_system_turn_is_kept_even_where_the_template_refuses_one(templated_model, name):
    encoder = _encoder(templated_model, name)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    query = encoder.render_query(messages)
    assert "You are terse." in query and query.index("You are terse.") < query.index("Hi")
    assert encoder.response_ids(messages, "Hello.")[0]


def test_a_response_without_its_forced_prefix_is_refused(templated_model):
    encoder = _encoder(templated_model, "llama-2-chat")
    with pytest.raises(ValueError, match="forced prefix"):
        encoder.response_ids([{"role": "user", "content": "x"}], "Fine, here it is.", GUIDING_TEXT)
