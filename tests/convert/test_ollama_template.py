"""The Modelfile TEMPLATE, rendered by Go's own text/template as Ollama renders it, against the
HF chat template: the same prompt text for the SmolLM2 (ChatML), Qwen2.5, Llama 3 and InternLM2
templates. Without Debian's golang-go (`apt-get install golang-go`) the Go half is skipped."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tuneforge.convert.ollama import modelfile
from tuneforge.convert.ollama_template import (
    ChatShape,
    Turn,
    go_quote,
    learn,
    ollama_template,
    render,
)
from tuneforge.data.templates import NAMED_TEMPLATES, Template, get_template
from tuneforge.errors import UserError

DATA = Path(__file__).parent / "data"

# Ollama's Execute, reduced to what a chat needs: the Modelfile's SYSTEM goes first when the chat
# has none, consecutive messages of one role are merged, and the template sees .System (every
# system message joined), .Messages, .Tools (none) and an empty .Response, parsed with
# missingkey=zero and Ollama's one extra function, json.
GO_RENDER = r"""package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Job struct {
	Template string      `json:"template"`
	System   string      `json:"system"`
	Chats    [][]Message `json:"chats"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var job Job
	if err := json.NewDecoder(os.Stdin).Decode(&job); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(job.Template))
	out := []string{}
	for _, chat := range job.Chats {
		msgs := chat
		if len(msgs) > 0 && msgs[0].Role != "system" && job.System != "" {
			msgs = append([]Message{{Role: "system", Content: job.System}}, msgs...)
		}
		system, collated := collate(msgs)
		var b strings.Builder
		err := tmpl.Execute(&b, map[string]any{"System": system, "Messages": collated, "Tools": nil,
			"Response": "", "Think": false, "IsThinkSet": false})
		if err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
"""


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """render(template, system, chats) -> the texts Ollama's Go template engine produces."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go)")
    root = tmp_path_factory.mktemp("go-render")
    (root / "main.go").write_text(GO_RENDER)
    env = {**os.environ, "GOCACHE": str(root / "cache"), "GOPATH": str(root / "gopath"),
           "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    subprocess.run(["go", "build", "-o", str(root / "render"), str(root / "main.go")], check=True,
                   env=env, capture_output=True, timeout=600)

    def run(template: str, system: str, chats: list) -> list[str]:
        proc = subprocess.run([str(root / "render")], input=json.dumps(
            {"template": template, "system": system, "chats": chats}), capture_output=True, text=True,
            timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return run


def read_modelfile(text: str) -> dict:
    """TEMPLATE, SYSTEM and the stop parameters, read as Ollama's parser reads them: a
    triple-quoted value is taken verbatim, and characters that are not printable are dropped."""
    assert re.search(r"^FROM \./model\.gguf$", text, re.M)
    fields = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""', text, re.S | re.M))
    for value in fields.values():
        assert all(ch.isprintable() or ch in "\n\t" for ch in value)
    return {"template": fields["TEMPLATE"], "system": fields.get("SYSTEM", ""),
            "stop": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)}


def fake_llama3_tokenizer():
    """A tokenizer with Llama 3's special tokens that, like Llama 3's, adds <|begin_of_text|>."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, **{t: i + 2 for i, t in enumerate(specials)}},
                                         unk_token="<unk>"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", unk_token="<unk>",
                                   extra_special_tokens=specials[2:4])


@pytest.fixture(scope="module")
def internlm2_tokenizer(tmp_path_factory):
    from internlm2_checkpoint import make_internlm2

    from tuneforge.models.load import load_tokenizer

    return load_tokenizer(make_internlm2(tmp_path_factory.mktemp("internlm2")))


def families(tokenizer, internlm2_tokenizer) -> dict:
    """family -> (template, tokenizer) for the four chat formats of our presets."""
    from internlm2_checkpoint import CHAT_TEMPLATE

    llama3 = fake_llama3_tokenizer()
    return {
        "smollm2": (get_template("auto", tokenizer), tokenizer),
        "qwen2.5": (Template("auto", (DATA / "qwen2_5_chat_template.jinja").read_text(), ("<|im_end|>",)),
                    tokenizer),
        "llama3": (Template("auto", (DATA / "llama3_chat_template.jinja").read_text(), ("<|eot_id|>",)),
                   llama3),
        "llama3_chat": (NAMED_TEMPLATES["llama3_chat"], llama3),
        "internlm2": (Template("auto", CHAT_TEMPLATE, ("<|im_end|>",)), internlm2_tokenizer),
        "internlm2_chat": (NAMED_TEMPLATES["internlm2_chat"], internlm2_tokenizer),
    }


SINGLE = [{"role": "user", "content": "Please introduce yourself"}]
MULTI = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是龙的小助手。"},
         {"role": "user", "content": "Tell me five scenic spots in Shanghai.\nOne line each."}]
SYSTEM = [{"role": "system", "content": "You are Long's assistant."}, *MULTI]
CHATS = [SINGLE, MULTI, SYSTEM, SYSTEM[:2]]


def hf(template: Template, tokenizer, chat: list, **kwargs) -> str:
    kwargs.setdefault("add_generation_prompt", True)
    return tokenizer.apply_chat_template(chat, chat_template=template.chat_template, tokenize=False, **kwargs)


def added_bos(tokenizer) -> str:
    """The text of the BOS the tokenizer adds itself (Ollama adds it when it tokenizes)."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token if ids[:1] == [tokenizer.bos_token_id] else ""


@pytest.mark.parametrize("family", ["smollm2", "qwen2.5", "llama3", "llama3_chat", "internlm2", "internlm2_chat"])
def test_go_renders_the_trained_template_exactly(family, go_render, tokenizer, internlm2_tokenizer):
    template, tok = families(tokenizer, internlm2_tokenizer)[family]
    parsed = read_modelfile(modelfile(template, tok, "", "m")[0])
    bos = added_bos(tok)
    got = go_render(parsed["template"], parsed["system"], CHATS)
    for chat, text in zip(CHATS, got, strict=True):
        expected = hf(template, tok, chat)
        assert expected.startswith(bos)
        assert text == expected[len(bos):], (family, chat)
    assert parsed["stop"] == list(template.stop_words)


@pytest.mark.parametrize("family", ["smollm2", "qwen2.5", "llama3", "internlm2"])
def test_the_modelfile_system_is_the_trained_system_prompt(family, go_render, tokenizer, internlm2_tokenizer):
    """With SYSTEM in the Modelfile, Ollama's chat without a system message renders as training
    rendered it with SYSTEM set (a system message first); a chat's own system message wins."""
    template, tok = families(tokenizer, internlm2_tokenizer)[family]
    trained = "You are 龙's assistant.\nAnswer in one line."
    parsed = read_modelfile(modelfile(template, tok, trained, "m")[0])
    assert parsed["system"] == trained
    bos = added_bos(tok)
    got = go_render(parsed["template"], parsed["system"], [SINGLE, MULTI, SYSTEM])
    assert got[0] == hf(template, tok, [{"role": "system", "content": trained}, *SINGLE])[len(bos):]
    assert got[1] == hf(template, tok, [{"role": "system", "content": trained}, *MULTI])[len(bos):]
    assert got[2] == hf(template, tok, SYSTEM)[len(bos):]


@pytest.mark.parametrize("family", ["smollm2", "llama3", "internlm2"])
def test_a_chat_ending_with_the_assistant_is_continued(family, go_render, tokenizer, internlm2_tokenizer):
    template, tok = families(tokenizer, internlm2_tokenizer)[family]
    parsed = read_modelfile(modelfile(template, tok, "", "m")[0])
    chat = [*SINGLE, {"role": "assistant", "content": "I am"}]
    expected = hf(template, tok, chat, add_generation_prompt=False, continue_final_message=True)
    assert go_render(parsed["template"], "", [chat]) == [expected[len(added_bos(tok)):]]


def test_learnt_shape_of_chatml_with_a_default_system_prompt(tokenizer):
    shape = learn(lambda chat, gen: hf(get_template("auto", tokenizer), tokenizer, chat,
                                       add_generation_prompt=gen))
    assert shape.first_system == Turn("<|im_start|>system\n", "<|im_end|>\n")
    assert shape.opening == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                             "Hugging Face<|im_end|>\n")
    assert shape.turns["user"] == Turn("<|im_start|>user\n", "<|im_end|>\n")
    assert shape.generation == "<|im_start|>assistant\n" and not shape.trims
    assert render(shape, SINGLE) == hf(get_template("auto", tokenizer), tokenizer, SINGLE)


def test_llama3_trims_contents_and_says_so():
    template = Template("auto", (DATA / "llama3_chat_template.jinja").read_text(), ("<|eot_id|>",))
    text, notes = modelfile(template, fake_llama3_tokenizer(), "", "m")
    assert any("whitespace" in n for n in notes)
    body = read_modelfile(text)["template"].split("\n", 1)[1]  # below the comment
    assert "<|begin_of_text|>" not in body  # Ollama's tokenizer adds it


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # the system prompt goes into the last user message: adding a turn changes an earlier one
    odd = Template("odd", "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['content'] }}"
                          "{% endfor %}", ())
    with pytest.raises(UserError, match="cannot be written as an Ollama TEMPLATE"):
        modelfile(odd, tokenizer, "", "m")


def test_go_strings_hold_only_printable_characters():
    assert go_quote('a"b\\c\nd\te') == '"a\\"b\\\\c\\nd\\te"'
    assert go_quote("龙\u200b\x00") == '"龙\\u200b\\u0000"'
    assert go_quote("\U0001f600") == '"\U0001f600"'


def test_a_triple_quote_cannot_go_into_a_modelfile(tokenizer):
    with pytest.raises(UserError, match='"""'):
        modelfile(get_template("auto", tokenizer), tokenizer, 'say """hi"""', "m")


def test_shape_without_prefix_strips_the_bos_only_where_it_is():
    shape = ChatShape(Turn("<s>[S]", "[/S]"), "<s>", {"user": Turn("[U]", "[/U]")}, "[A]")
    bare = shape.without_prefix("<s>")
    assert bare.first_system.head == "[S]" and bare.opening == ""
    with pytest.raises(UserError, match="cannot be written"):
        ollama_template(lambda chat, gen: "", "", "n")  # renders nothing: no shape to learn
